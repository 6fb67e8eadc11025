"""
Splitting a byte stream into lines in linear time, with bounded memory.

L{LineSplitter} is the one line splitter of pfo3: the server
(L{pfo3.protocol.TaskProtocol}), the load engine (L{pfo3.load}) and the
plain asyncio baseline (C{benchmarks/asyncio_floor_plain.py}) all use it.  It knows
nothing of Twisted or sockets: bytes go in, complete lines come out.

  - Lines end with C{\\n}.  A line is returned without its C{\\n} and with
    everything else, a trailing C{\\r} included: stripping it, and skipping
    blank lines, is the caller's business.
  - The cost is linear in the bytes fed: a chunk is searched for C{\\n} once,
    and the unfinished line grows in place, in a C{bytearray} (amortised
    constant time per byte, and a few percent of slack rather than an object
    per chunk however small the chunks are); it becomes C{bytes} once, when
    its C{\\n} arrives.  Re-joining the unfinished line to each new chunk
    instead, as the obvious loop does, makes a line that arrives in small
    pieces cost time quadratic in its length.
  - With C{max_line}, an unfinished line longer than C{max_line + 1} bytes
    (the C{+ 1} leaves room for a C{\\r}) is I{refused}: its bytes are
    dropped at once and every byte up to its C{\\n} is dropped as it
    arrives.  A complete line is returned whatever its length (it is never
    longer than the limit plus the chunk that completed it), so the caller
    checks the length of what it gets.
  - With a L{BufferBudget} shared by all the splitters of a server, an
    unfinished line that has grown past the budget's C{small} allowance is
    also refused, the same way, when the bytes held by all unfinished lines
    together would pass the budget's C{limit}.

A refusal is reported once, by L{LineSplitter.refused} after the call to
L{LineSplitter.feed} that caused it; the lines completed by that same call
come before it in the stream.
"""

from __future__ import annotations

from typing import List, Optional

__all__ = [
    "DEFAULT_MAX_BUFFERED", "DEFAULT_SMALL_LINE", "OVER_BUDGET", "TOO_LONG",
    "BufferBudget", "LineSplitter",
]

#: Default of L{BufferBudget.limit} (the server's C{--max-buffered}).
DEFAULT_MAX_BUFFERED = 64 * 1024 * 1024

#: Default of L{BufferBudget.small}: an unfinished line this short is never
#: refused for the budget's sake.
DEFAULT_SMALL_LINE = 16 * 1024

#: L{LineSplitter.refused}: the unfinished line passed C{max_line + 1} bytes.
TOO_LONG = "too_long"

#: L{LineSplitter.refused}: holding the unfinished line would pass the budget.
OVER_BUDGET = "over_budget"


class BufferBudget:
    """
    The bytes that all unfinished lines of a server may hold together.

    Every byte held by a L{LineSplitter} given this budget is counted in
    L{used}, and given back when its line completes, is refused, or the
    splitter is L{released <LineSplitter.release>}.  Past L{limit}, a
    splitter refuses to let an unfinished line grow beyond L{small} bytes;
    lines up to L{small} bytes are always held, so clients that send short
    lines are never refused, and L{used} may pass L{limit} by at most
    C{small} bytes per connection.

    @ivar limit: Bytes of unfinished lines past which large ones are refused.
    @ivar small: Bytes an unfinished line may always hold.
    @ivar used: Bytes held now by all unfinished lines together.
    """

    __slots__ = ("limit", "small", "used")

    def __init__(self, limit: int = DEFAULT_MAX_BUFFERED, small: int = DEFAULT_SMALL_LINE) -> None:
        if limit < 0 or small < 0:
            raise ValueError("a budget's limit and small allowance must be >= 0")
        self.limit = limit
        self.small = small
        self.used = 0

    def __repr__(self) -> str:
        return f"<BufferBudget used={self.used} limit={self.limit} small={self.small}>"


class LineSplitter:
    """
    Split a byte stream into C{\\n}-terminated lines, in linear time.

    @ivar max_line: Longest line accepted in bytes, not counting its C{\\n}
        nor a C{\\r} before it; L{None}: no limit.
    @ivar budget: The server-wide L{BufferBudget} charged with the bytes of
        the unfinished line, or L{None}.
    @ivar refused: L{TOO_LONG} or L{OVER_BUDGET} right after the L{feed}
        that refused the unfinished line; otherwise L{None}.
    """

    __slots__ = ("max_line", "budget", "refused", "_limit", "_tail", "_pending", "_discarding",
                 "_busy")

    def __init__(self, max_line: Optional[int] = None,
                 budget: Optional[BufferBudget] = None) -> None:
        self.max_line = max_line
        self.budget = budget
        self.refused: Optional[str] = None
        # The longest unfinished line held: max_line and a \r.
        self._limit = -1 if max_line is None else max_line + 1
        self._tail = bytearray()
        self._pending = 0
        self._discarding = False
        # Whether there is an unfinished line or one being dropped: the one
        # test on the way of whole lines.
        self._busy = False

    @property
    def pending_bytes(self) -> int:
        """
        Bytes of the unfinished line held now (C{0} while discarding).
        """
        return self._pending

    @property
    def discarding(self) -> bool:
        """
        Whether the bytes up to the next C{\\n} are being dropped, because
        the line they end was refused.
        """
        return self._discarding

    def feed(self, data: bytes) -> List[bytes]:
        """
        Take the next bytes of the stream.

        @return: The lines that C{data} completes, in order, without their
            C{\\n}.  If the unfinished line after them is refused,
            L{refused} says why.
        """
        lines = data.split(b"\n")
        rest = lines.pop()
        if self._busy:
            self.refused = None
            if not lines:
                # No line end: the unfinished line grows, or is still dropped.
                if rest and not self._discarding:
                    self._hold(rest)
                return lines
            if self._discarding:
                self._discarding = self._busy = False
                del lines[0]
            else:
                tail = self._tail
                tail += lines[0]
                lines[0] = bytes(tail)
                self.release()
        if rest:
            self._hold(rest)
        return lines

    def _hold(self, data: bytes) -> None:
        """
        Add C{data}, which has no C{\\n}, to the unfinished line, or refuse
        the line.
        """
        size = self._pending + len(data)
        if 0 <= self._limit < size:
            self._refuse(TOO_LONG)
            return
        budget = self.budget
        if budget is not None:
            if size > budget.small and budget.used + len(data) > budget.limit:
                self._refuse(OVER_BUDGET)
                return
            budget.used += len(data)
        self._tail += data
        self._pending = size
        self._busy = True

    def _refuse(self, why: str) -> None:
        self.release()
        self._discarding = self._busy = True
        self.refused = why

    def take_tail(self) -> bytes:
        """
        End of input: take the unfinished line as it is.

        @return: The bytes held since the last C{\\n} (C{b""} if none, or if
            they belong to a refused line); the splitter is then empty and
            ready for a new stream.
        """
        tail = bytes(self._tail)
        self.release()
        self._discarding = self._busy = False
        self.refused = None
        return tail

    def release(self) -> None:
        """
        Drop the unfinished line and give its bytes back to the budget.

        Call it when the connection is lost; calling it again does nothing.
        """
        if self.budget is not None:
            self.budget.used -= self._pending
        self._tail = bytearray()
        self._pending = 0
        self._busy = self._discarding

    def __repr__(self) -> str:
        state = " discarding" if self._discarding else ""
        return f"<LineSplitter max_line={self.max_line} pending={self._pending}{state}>"
