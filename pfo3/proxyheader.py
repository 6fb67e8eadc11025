"""
The PROXY protocol header, read strictly.

Twisted's C{haproxy:} endpoints parse the header HAProxy sends before a
connection's data (C{send-proxy}, C{send-proxy-v2}).  Its version 1 parser
(Twisted 26.10) turns most malformed headers into C{InvalidProxyHeader},
which closes the connection, but lets two through as exceptions: an address
that is not UTF-8 (C{UnicodeDecodeError}) and a port that is not a number
(C{ValueError}); each then logs an unhandled-error traceback.  Nor does it
check that the addresses are addresses: C{PROXY TCP6 fd00::π ::1 4000 9000}
makes C{fd00::π} the client.  L{StrictProxyWrapper} refuses all of these the
same way, closing the connection before the protocol behind it sees a byte.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet import endpoints
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._info import ProxyInfo
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory

log = Logger(namespace="pfo3")


class StrictProxyWrapper(HAProxyProtocolWrapper):
    """
    L{HAProxyProtocolWrapper} that closes the connection on any malformed
    header, and on addresses that are not IP addresses.
    """

    def dataReceived(self, data: bytes) -> None:
        if self._proxyInfo is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        # As the parent class does, but checking the header before the
        # protocol behind gets any of the data after it.
        parser = self._parser
        if parser is None:
            if (len(data) >= 16 and data[:12] == V2Parser.PREFIX
                    and ord(data[12:13]) & 0b11110000 == 0x20):
                self._parser = parser = V2Parser()
            elif len(data) >= 8 and data[:5] == V1Parser.PROXYSTR:
                self._parser = parser = V1Parser()
            else:
                self.loseConnection()
                return
        try:
            info, remaining = parser.feed(data)
        except (InvalidProxyHeader, UnicodeDecodeError, ValueError) as e:
            self._refuse(f"{type(e).__name__}")
            return
        if info is None:
            return  # the header is not complete yet
        if not _plausible(info):
            self._refuse("not an IP address")
            return
        self._proxyInfo = info
        if remaining:
            self.wrappedProtocol.dataReceived(remaining)

    def _refuse(self, why: str) -> None:
        peer = self.transport.getPeer() if self.transport is not None else None
        log.info("Dropped a connection from {address}: malformed PROXY header ({why})",
                 address=getattr(peer, "host", peer), why=why)
        self.loseConnection()


class StrictProxyWrappingFactory(HAProxyWrappingFactory):
    """
    L{HAProxyWrappingFactory} with L{StrictProxyWrapper}.
    """

    protocol = StrictProxyWrapper  # type: ignore[assignment]


def _plausible(info: ProxyInfo) -> bool:
    for address in (info.source, info.destination):
        if isinstance(address, (IPv4Address, IPv6Address)):
            try:
                ipaddress.ip_address(address.host)
            except ValueError:
                return False
    return True


def strict(endpoint: IStreamServerEndpoint) -> IStreamServerEndpoint:
    """
    @return: C{endpoint} reading its PROXY headers strictly, when it is a
        C{haproxy:} endpoint; any other as it is.
    """
    if (isinstance(endpoint, endpoints._WrapperServerEndpoint)
            and endpoint._wrapperFactory is HAProxyWrappingFactory):
        return endpoints._WrapperServerEndpoint(
            endpoint._wrappedEndpoint, StrictProxyWrappingFactory)
    return endpoint


def proxied(endpoint: IStreamServerEndpoint) -> Any:
    """
    @return: C{endpoint} behind a strict PROXY header (for endpoints built
        in code rather than parsed from a description).
    """
    return endpoints._WrapperServerEndpoint(endpoint, StrictProxyWrappingFactory)


__all__ = ["StrictProxyWrapper", "StrictProxyWrappingFactory", "proxied", "strict"]
