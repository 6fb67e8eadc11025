"""
Tests of the robustness suite (L{pfo3.chaos}) against real servers: the
fuzz run, and fault injection that the other integration tests do not
already cover.
"""

from __future__ import annotations

import random

import pytest

from pfo3.chaos import fuzz

pytestmark = pytest.mark.integration


def test_fuzz_lines_decide_blankness_as_the_server_does() -> None:
    """
    The fuzz expects no reply exactly for the lines the server skips: empty
    or ASCII whitespace once a trailing CR goes.
    """
    assert fuzz._blank(b"") and fuzz._blank(b"\r") and fuzz._blank(b" \t\r")
    assert not fuzz._blank(b"\xa0") and not fuzz._blank(b"x\r") and fuzz._blank(b"\r\r")


def test_proxy_headers_are_well_formed() -> None:
    """
    The PROXY headers the fuzz calls valid are version 1 lines or version 2
    blocks whose length field matches what follows.
    """
    rng = random.Random(3)
    for _ in range(200):
        h = fuzz.proxy_header(rng, valid=True)
        if h.startswith(b"PROXY "):
            assert h.endswith(b"\r\n") and h.count(b" ") == 5
        else:
            assert h[:12] == fuzz.V2_SIGNATURE
            assert int.from_bytes(h[14:16], "big") == len(h) - 16


def test_fuzz_run_leaves_the_server_unharmed() -> None:
    """
    Twenty thousand fuzzed lines over TCP, TLS and PROXY-protocol TCP, in
    batches, a byte at a time and cut off mid-line: every complete line is
    answered once with a documented reply, and afterwards the server
    answers a ping at once, holds no more file descriptors than before, is
    back near its memory of before, and logged no traceback.
    """
    figures = fuzz.fuzz(lines=20_000, seed=7)
    print(fuzz.report(figures))
    assert figures["ok"], figures["problems"]
    assert figures["lines"] >= 20_000
    assert set(figures["transports"]) == {"tcp", "tls", "proxy"}
    assert figures["replies"]["ok"] > 0 and figures["replies"]["utf8_invalido"] > 0
