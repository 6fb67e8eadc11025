"""
Tests for L{pfo3.framing.LineSplitter} and L{pfo3.framing.BufferBudget}.
"""

from __future__ import annotations

import tracemalloc
from typing import List, Optional, Tuple, Union

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pfo3.framing import OVER_BUDGET, TOO_LONG, BufferBudget, LineSplitter


def feed_all(splitter: LineSplitter, chunks: List[bytes]) -> List[Union[bytes, str]]:
    """
    Feed C{chunks} in order; the lines, with each refusal in its place.
    """
    out: List[Union[bytes, str]] = []
    for chunk in chunks:
        out.extend(splitter.feed(chunk))
        if splitter.refused is not None:
            out.append(splitter.refused)
    return out


def cut(data: bytes, points: List[int]) -> List[bytes]:
    """
    C{data} cut at the given offsets (taken modulo its length, in order).
    """
    if not data:
        return [data]
    offsets = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in zip(offsets, offsets[1:])]


def outcome(line: Union[bytes, str], max_line: Optional[int]) -> Union[bytes, str]:
    """
    What a caller that drops a trailing \\r and checks the length makes of
    a line: the line, or L{TOO_LONG}.
    """
    if isinstance(line, str):
        return line
    body = line[:-1] if line.endswith(b"\r") else line
    if max_line is not None and len(body) > max_line:
        return TOO_LONG
    return line


streams = st.lists(
    st.sampled_from([b"a", b"bc", b"\n", b"\r", b"\r\n", b"xyz" * 5, b"{}"]), max_size=60,
).map(b"".join)


class TestSplitting:
    def test_whole_lines(self) -> None:
        """
        Whole lines in one chunk come back in order, without their \\n, with
        a \\r before it and blank lines kept for the caller to handle.
        """
        s = LineSplitter()
        assert s.feed(b"uno\ndos\r\n\n  \n") == [b"uno", b"dos\r", b"", b"  "]
        assert s.pending_bytes == 0

    def test_line_across_chunks(self) -> None:
        """
        A line split over several chunks is returned once, whole, by the
        chunk that ends it; the bytes after it start the next line.
        """
        s = LineSplitter()
        assert s.feed(b"ho") == []
        assert s.pending_bytes == 2
        assert s.feed(b"l") == []
        assert s.feed(b"a\nsig") == [b"hola"]
        assert s.pending_bytes == 3
        assert s.feed(b"o\n") == [b"sigo"]
        assert s.pending_bytes == 0

    def test_take_tail(self) -> None:
        """
        At end of input, take_tail gives the unfinished line (without a
        \\n) once and leaves the splitter empty.
        """
        s = LineSplitter(100)
        assert s.feed(b'uno\n{"tipo": 1') == [b"uno"]
        assert s.take_tail() == b'{"tipo": 1'
        assert s.pending_bytes == 0
        assert s.take_tail() == b""
        assert s.feed(b"otra\n") == [b"otra"]

    def test_take_tail_of_refused_line_is_empty(self) -> None:
        """
        The tail of a refused line is not a line: take_tail gives nothing.
        """
        s = LineSplitter(3)
        s.feed(b"abcdef")
        assert s.refused == TOO_LONG
        assert s.take_tail() == b""

    def test_too_long_refused_once_and_discarded(self) -> None:
        """
        An unfinished line past max_line + 1 bytes is refused once; nothing
        of it is held and its bytes are dropped up to the next \\n; the
        lines completed before it, and after its end, are returned.
        """
        s = LineSplitter(5)
        assert s.feed(b"ok\n123") == [b"ok"]
        assert s.feed(b"4567") == []
        assert s.refused == TOO_LONG
        assert s.pending_bytes == 0 and s.discarding
        for _ in range(10):
            assert s.feed(b"zzzz") == []
            assert s.refused is None
            assert s.pending_bytes == 0
        assert s.feed(b"zz\nsigue\nmas") == [b"sigue"]
        assert not s.discarding
        assert s.pending_bytes == 3

    def test_limit_leaves_room_for_cr(self) -> None:
        """
        An unfinished line of max_line + 1 bytes is still held (it may end
        in \\r\\n); one more byte is refused.
        """
        s = LineSplitter(4)
        s.feed(b"abcd\r")
        assert s.refused is None
        assert s.feed(b"\n") == [b"abcd\r"]
        s.feed(b"abcde")
        assert s.refused is None
        s.feed(b"f")
        assert s.refused == TOO_LONG

    def test_complete_long_line_returned(self) -> None:
        """
        A complete line is returned whatever its length: the caller checks
        it (the server answers it with linea_demasiado_larga).
        """
        s = LineSplitter(3)
        assert s.feed(b"abcdefgh\nab\n") == [b"abcdefgh", b"ab"]
        assert s.refused is None

    @given(streams, st.lists(st.integers(min_value=0), max_size=30))
    def test_any_chunking_same_lines(self, data: bytes, points: List[int]) -> None:
        """
        Without a limit, any chunking of a stream gives the same lines, and
        the same unfinished tail, as the stream in one chunk.
        """
        one = LineSplitter()
        many = LineSplitter()
        assert feed_all(many, cut(data, points)) == feed_all(one, [data])
        assert many.take_tail() == one.take_tail() == data.split(b"\n")[-1]

    @given(streams, st.lists(st.integers(min_value=0), max_size=30),
           st.integers(min_value=0, max_value=12))
    def test_any_chunking_same_outcome_with_limit(
        self, data: bytes, points: List[int], max_line: int
    ) -> None:
        """
        With max_line, any chunking gives the same outcome for every line as
        one chunk, once lines are checked as the server checks them: each
        line is either returned or refused as too long, in the same order.
        """
        one = feed_all(LineSplitter(max_line), [data])
        many = feed_all(LineSplitter(max_line), cut(data, points))
        assert [outcome(x, max_line) for x in many] == [outcome(x, max_line) for x in one]


class TestLinearity:
    """
    The work done per chunk depends on the chunk, not on how much of the
    line is already held.  Measured without a clock: the bytes a call
    allocates, which in the re-joining loop include a copy of everything
    held so far.
    """

    def allocated_per_feed(self, splitter: LineSplitter, chunks: List[bytes]) -> List[int]:
        grown = []
        tracemalloc.start()
        try:
            for chunk in chunks:
                before, _ = tracemalloc.get_traced_memory()
                tracemalloc.reset_peak()
                splitter.feed(chunk)
                _, peak = tracemalloc.get_traced_memory()
                grown.append(peak - before)
        finally:
            tracemalloc.stop()
        return grown

    def test_long_line_in_small_chunks_is_linear(self) -> None:
        """
        A 1 MB line fed in 200-byte chunks: over all the chunks before its
        end, the splitter allocates less than twice the line (its one
        growing buffer, with its slack), where re-joining would copy ~2.5 GB;
        the chunk that ends it makes the one bytes copy of the line.
        """
        size, step = 1_000_000, 200
        line = b"x" * size
        chunks = [line[i:i + step] for i in range(0, size, step)] + [b"\n"]
        s = LineSplitter(2 * size)
        grown = self.allocated_per_feed(s, chunks)
        assert sum(grown[:-1]) < 2 * size
        assert size <= grown[-1] < 3 * size
        assert s.pending_bytes == 0

    def test_work_per_chunk_does_not_grow_with_held_bytes(self) -> None:
        """
        The most a chunk costs once 900 kB are held is about what it costs
        with 1 kB held (buffer growth aside, which is amortised: at most an
        eighth of what is held, once in a while).
        """
        s = LineSplitter()
        s.feed(b"y" * 1000)
        early = max(self.allocated_per_feed(s, [b"z" * 200] * 50))
        s.feed(b"y" * 900_000)
        late = self.allocated_per_feed(s, [b"z" * 200] * 50)
        typical = sorted(late)[len(late) // 2]
        assert typical <= max(early, 1024)


class TestBudget:
    def test_charges_and_releases_exactly(self) -> None:
        """
        The budget counts every byte of every unfinished line, and gets it
        back when the line completes, is refused, or is released.
        """
        b = BufferBudget(limit=10_000, small=100)
        x, y = LineSplitter(None, b), LineSplitter(None, b)
        x.feed(b"a" * 300)
        y.feed(b"ok\n" + b"b" * 50)
        assert b.used == 350
        x.feed(b"a" * 20)
        assert b.used == 370
        x.feed(b"\nc")
        assert b.used == 51
        y.release()
        assert b.used == 1
        y.release()
        assert b.used == 1
        x.take_tail()
        assert b.used == 0

    def test_refuses_large_line_past_limit(self) -> None:
        """
        Past the limit, an unfinished line that grows beyond `small` bytes
        is refused with OVER_BUDGET, its bytes are returned and the rest of
        it is dropped; the connection's next line is served.
        """
        b = BufferBudget(limit=1000, small=100)
        hog, late = LineSplitter(None, b), LineSplitter(None, b)
        hog.feed(b"h" * 900)
        assert late.feed(b"ok\n" + b"l" * 101) == [b"ok"]
        assert late.refused == OVER_BUDGET
        assert b.used == 900
        assert late.feed(b"l" * 5000) == []
        assert b.used == 900
        assert late.feed(b"l\nnext\n") == [b"next"]

    def test_short_lines_never_refused(self) -> None:
        """
        Lines that stay within `small` bytes are held whatever the budget
        holds (the overshoot is at most `small` per connection).
        """
        b = BufferBudget(limit=1000, small=100)
        LineSplitter(None, b).feed(b"h" * 1000)
        short = [LineSplitter(None, b) for _ in range(20)]
        for s in short:
            s.feed(b"x" * 100)
            assert s.refused is None
        assert b.used == 3000
        for s in short:
            assert s.feed(b"\n") == [b"x" * 100]
        assert b.used == 1000

    def test_too_long_releases(self) -> None:
        """
        A line refused for max_line gives its bytes back to the budget.
        """
        b = BufferBudget(limit=10_000, small=10)
        s = LineSplitter(50, b)
        s.feed(b"a" * 40)
        assert b.used == 40
        s.feed(b"a" * 40)
        assert s.refused == TOO_LONG
        assert b.used == 0

    @given(st.lists(st.tuples(st.integers(0, 3), st.one_of(
        st.none(), streams, st.binary(max_size=40).map(lambda b: b.replace(b"\n", b""))
    )), max_size=80))
    def test_used_is_always_what_is_held(self, ops: List[Tuple[int, Optional[bytes]]]) -> None:
        """
        Whatever four splitters sharing a budget are fed (None: the
        connection is lost), the budget's count equals the bytes they hold,
        never passes limit + small per splitter, and is 0 once all are
        released.
        """
        b = BufferBudget(limit=50, small=10)
        splitters = [LineSplitter(30, b) for _ in range(4)]
        for i, data in ops:
            if data is None:
                splitters[i].release()
            else:
                splitters[i].feed(data)
            assert b.used == sum(s.pending_bytes for s in splitters)
            assert b.used <= 50 + 4 * 10
        for s in splitters:
            s.release()
        assert b.used == 0

    def test_rejects_negative(self) -> None:
        """
        A negative limit is a programming error.
        """
        with pytest.raises(ValueError):
            BufferBudget(-1)
