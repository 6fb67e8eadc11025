"""
How L{pfo3.protocol.TaskProtocol} writes to its transport.

The protocol writes the replies of a whole read at once, with one
C{write}.  Twisted's transports are built for protocols that write many
small pieces, and make each write wait for the reactor:

  - a TCP transport (L{twisted.internet.tcp.Server}) only buffers it,
    registers for writability (an C{epoll_ctl}), sends it when the next
    poll says it may, and unregisters (another C{epoll_ctl});
  - Twisted's TLS transport (L{BufferingTLSTransport}) holds it until the
    next reactor iteration with a delayed call, to make one TLS record of
    many small writes.

For a protocol that already writes once per read both are pure cost: two
system calls and a poll event, or a delayed call, per read.  L{writers_for}
gives the protocol a write function without them, also through a wrapper
that passes writes through unchanged (the PROXY protocol's, on
C{haproxy:} ports).  Over TLS it skips both: the protocol writes one TLS
record per write, and the TLS layer's write of that record to the TCP
transport sends at once too.  Every other transport (UNIX sockets...) is
written to as it is.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Tuple

from twisted.internet import tcp
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOProtocol


def writers_for(transport: Any) -> Tuple[Callable[[bytes], None], Callable[[bytes], None]]:
    """
    @return: Two functions that write bytes to C{transport}, in order, as
        its C{write} would: the first for the replies of a read, sent
        without waiting for the reactor when it need not; the second for a
        reply that is ready on its own (a timer or a thread finished), which
        may wait for the end of the reactor turn so that the replies ready
        in one turn leave together.
    """
    kind = type(transport)
    if kind is tcp.Server:
        sender = SendNow(transport)
        return sender.write, sender.soon
    if kind is BufferingTLSTransport:
        # Past the aggregator, to the TLS layer: one record per write.
        write = partial(TLSMemoryBIOProtocol.write, transport)
        under = transport.transport
        if type(under) is not tcp.Server:
            return write, write
        # The TLS layer writes each record (and its handshake and alerts)
        # with its TCP transport's write, the one place it writes: on this
        # connection a SendNow's takes that method's place, so that records
        # leave as plain TCP replies do.
        sender = SendNow(under)
        under.write = sender.write  # type: ignore[method-assign]

        def soon(data: bytes) -> None:
            sender.buffered = True  # as SendNow.soon: this and what follows
            write(data)

        return write, soon
    if isinstance(transport, ProtocolWrapper) and kind.write is ProtocolWrapper.write:
        # A wrapper that passes writes through as they are (the PROXY
        # protocol's): write to what it wraps.
        return writers_for(transport.transport)
    return transport.write, transport.write


class SendNow:
    """
    Writes to a TCP transport (a server's or a client's) by sending at
    once, as much as the socket takes, while the transport holds nothing;
    what the socket does not take (the peer reads slowly), and everything
    after it, goes through the transport's own buffered C{write}, which
    keeps the order, the flow control (pausing the producer) and the
    reporting of errors.
    """

    __slots__ = ("transport", "buffered", "_buffered_write")

    def __init__(self, transport: tcp.Connection) -> None:
        self.transport = transport
        #: The transport's own write (taken before anything replaces it).
        self._buffered_write = transport.write
        #: Whether the transport may hold unsent bytes of ours: from then on
        #: every write is the transport's (it never tells when it drained).
        self.buffered = False

    def write(self, data: bytes) -> None:
        transport = self.transport
        if not self.buffered:
            if transport.disconnecting or not transport.connected:
                # The transport's rules for a closing connection.
                self._buffered_write(data)
                return
            sent = transport.writeSomeData(data)
            if type(sent) is int:
                if sent == len(data):
                    return
                data = data[sent:]
            # else: the connection is lost; the transport finds that out
            # itself when it tries to send what follows.
            self.buffered = True
        self._buffered_write(data)

    def soon(self, data: bytes) -> None:
        """
        Write C{data} through the transport's buffer, which sends once per
        reactor turn whatever was written to it during the turn: for replies
        that become ready one by one (a burst of timers), one send per turn
        rather than one each.  Every later write goes there too.
        """
        self.buffered = True
        self._buffered_write(data)
