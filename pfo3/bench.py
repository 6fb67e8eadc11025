"""
C{pfo3-bench}: a load generator for JSON-lines task servers.

It opens C{--connections} connections to a Twisted client endpoint, keeps
C{--inflight} requests in flight on each (pipelined: a new request leaves as
soon as a reply comes back) for C{--duration} seconds or C{--count} requests,
and prints throughput, latency percentiles and errors by code.  The load
itself is L{pfo3.load}.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from typing import Any, Dict, List, Optional, Sequence

from twisted.python import usage

from pfo3.load import (
    DEFAULT_ENDPOINT,
    DEFAULT_TEXT,
    Plan,
    Result,
    make_text,
    parse_mix,
    run_load,
    run_procs,
    split,
)

__all__ = ["Options", "format_report", "main", "report"]


# --- command line -------------------------------------------------------------


class Options(usage.Options):
    """
    Command-line options of C{pfo3-bench}.
    """

    synopsis = "Usage: pfo3-bench [options]"
    longdesc = (
        "Load generator for pfo3 (and any server speaking its JSON-lines protocol). "
        "Examples: pfo3-bench -c 64 -i 8 -d 10; "
        "pfo3-bench --mix uppercase:80,sleep=0.01:20 --count 100000; "
        "pfo3-bench --burst 10000 --burst-sleep 1 -c 100. "
        "The mix is TIPO[=CONTENIDO][:WEIGHT],...; CONTENIDO is JSON when it parses."
    )

    optParameters: List[List[Any]] = [
        ["endpoint", "e", DEFAULT_ENDPOINT,
         "Twisted client endpoint: tcp:HOST:PORT, tls:HOST:PORT, unix:PATH, ..."],
        ["connections", "c", 64, "Connections to open.", int],
        ["inflight", "i", 8, "Requests in flight per connection (pipelined).", int],
        ["duration", "d", 10.0, "Seconds to keep sending (unless --count).", float],
        ["count", "n", None, "Send this many requests in all instead of --duration.", int],
        ["mix", "m", None,
         "Task mix, e.g. uppercase:80,sleep=0.01:20 (default: uppercase)."],
        ["size", "s", None,
         "Characters of text for text tasks (default: the 10 of 'hola mundo').", int],
        ["procs", "P", 1, "Load processes; connections and count are split among them.", int],
        ["burst", None, None,
         "Sleep burst: send this many sleeps at once (spread over the connections) "
         "and report the wall time until all are answered.", int],
        ["burst-sleep", None, 1.0, "Seconds each sleep of --burst lasts.", float],
        ["timeout", None, 30.0,
         "Give up when requests are outstanding and no reply came for this long.", float],
    ]

    optFlags: List[List[Optional[str]]] = [
        ["json", "j", "Print one JSON object instead of the human report."],
        ["quiet", "q", "No live progress line."],
    ]

    optParameters += [
        ["token", None, None,
         "A JWT for a server that requires one (default: the PFO3_TOKEN "
         "environment variable)."],
        ["auth", None, "connection",
         "How the token is sent: 'connection' (op: auth once per connection) "
         "or 'request' (a token field in every request)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["tipos"] = []

    def opt_version(self) -> None:
        """
        Print the version of pfo3 and exit.
        """
        from pfo3 import __version__

        print(f"pfo3-bench (pfo3) {__version__}")
        sys.exit(0)

    def opt_tipo(self, spec: str) -> None:
        """
        Add TIPO[=CONTENIDO][:WEIGHT] to the mix (repeatable).
        """
        self["tipos"].append(spec)

    opt_t = opt_tipo

    def postOptions(self) -> None:
        for name in ("connections", "inflight", "procs"):
            if self[name] < 1:
                raise usage.UsageError(f"--{name} must be at least 1")
        if self["auth"] not in ("connection", "request"):
            raise usage.UsageError("--auth must be 'connection' or 'request'")
        if self["count"] is not None and self["count"] < 1:
            raise usage.UsageError("--count must be at least 1")
        if not self["duration"] > 0 or not self["timeout"] > 0:
            raise usage.UsageError("--duration and --timeout must be positive")
        if self["size"] is not None and self["size"] < 0:
            raise usage.UsageError("--size must not be negative")
        if self["procs"] > self["connections"]:
            raise usage.UsageError("--procs must not exceed --connections")
        text = DEFAULT_TEXT if self["size"] is None else make_text(self["size"])
        specs = list(self["tipos"])
        if self["mix"]:
            specs.insert(0, self["mix"])
        if self["burst"] is not None:
            if self["burst"] < 1:
                raise usage.UsageError("--burst must be at least 1")
            if specs:
                raise usage.UsageError("--burst sends only sleeps; drop --mix/--tipo")
            if not self["burst-sleep"] >= 0:
                raise usage.UsageError("--burst-sleep must not be negative")
            specs = [f"sleep={self['burst-sleep']!r}"]
            self["count"] = self["burst"]
            self["inflight"] = -(-self["burst"] // self["connections"])
        try:
            self["kinds"] = parse_mix(specs or ["uppercase"], text)
        except ValueError as e:
            raise usage.UsageError(str(e))

    def plans(self) -> List[Plan]:
        """
        @return: One plan per load process.
        """
        procs = self["procs"]
        conns = split(self["connections"], procs)
        counts: List[Optional[int]] = (
            list(split(self["count"], procs)) if self["count"] is not None else [None] * procs
        )
        plans = []
        for i in range(procs):
            plans.append(Plan(
                endpoint=self["endpoint"], connections=conns[i], inflight=self["inflight"],
                kinds=self["kinds"], count=counts[i], duration=self["duration"],
                timeout=self["timeout"], offset=sum(conns[:i]),
                token=self["token"] or os.environ.get("PFO3_TOKEN") or None, auth=self["auth"],
            ))
        return plans


def report(options: Options, result: Result) -> Dict[str, Any]:
    """
    @return: The run's settings and figures, as printed by C{--json}.
    """
    out: Dict[str, Any] = {
        "endpoint": options["endpoint"],
        "connections": options["connections"],
        "inflight": options["inflight"],
        "procs": options["procs"],
        "mix": [k.label() for k in options["kinds"]],
        "mode": ("burst" if options["burst"] is not None
                 else "count" if options["count"] is not None else "duration"),
    }
    out.update(result.summary())
    return out


def count(n: int, noun: str, plural: str = "") -> str:
    """
    @return: C{"1 connection"}, C{"2 connections"}.
    """
    return f"{n} {noun}" if n == 1 else f"{n} {plural or noun + 's'}"


def format_report(summary: Dict[str, Any]) -> str:
    """
    @return: The human-readable report.
    """
    lat = summary["latency_ms"]
    lines = [
        f"endpoint     {summary['endpoint']}  ({count(summary['connections'], 'connection')} "
        f"x {summary['inflight']} in flight, "
        f"{count(summary['procs'], 'load process', 'load processes')})",
        f"mix          {', '.join(summary['mix'])}",
        f"requests     {summary['sent']} sent, {count(summary['replies'], 'reply', 'replies')} "
        f"({summary['ok']} ok, {count(summary['error_count'], 'error')}, "
        f"{summary['unanswered']} unanswered) in {summary['elapsed_s']:.3f} s",
        f"throughput   {summary['throughput']:.0f} replies/s",
        f"latency ms   p50 {lat['p50']:.2f}  p90 {lat['p90']:.2f}  p99 {lat['p99']:.2f}  "
        f"max {lat['max']:.2f}",
    ]
    if summary["mode"] == "burst":
        lines.append(f"burst        all {summary['replies']} answered after "
                     f"{summary['elapsed_s']:.3f} s")
    if summary["errors"]:
        lines.append("errors       " + ", ".join(
            f"{code}: {n}" for code, n in summary["errors"].items()))
    if summary["connect_errors"]:
        lines.append(f"connect      {summary['connect_errors']} failed: "
                     f"{summary['connect_error']}")
    if summary["lost_connections"]:
        lines.append(f"lost         {count(summary['lost_connections'], 'connection')} "
                     f"closed early "
                     f"({summary['lost_reason']})")
    lines.append(f"client cpu   {summary['client_cpu_s']:.2f} s")
    return "\n".join(lines)


def _raise_nofile(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
        except (ValueError, OSError):
            pass


def _show_progress(replies: int, elapsed: float) -> None:
    rate = replies / elapsed if elapsed > 0 else 0.0
    sys.stderr.write(f"\r{elapsed:6.1f} s  {replies:10d} replies  {rate:9.0f}/s ")
    sys.stderr.flush()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """
    Run C{pfo3-bench}.

    @return: The exit status: 0 after a run with replies; 1 when it could not
        connect or saw no reply; 2 on a command-line error.
    """
    options = Options()
    try:
        options.parseOptions(list(sys.argv[1:] if argv is None else argv))
    except usage.UsageError as e:
        sys.stderr.write(f"{options}\npfo3-bench: {e}\n")
        return 2
    _raise_nofile(options["connections"] + 64)
    live = not options["quiet"] and not options["json"] and sys.stderr.isatty()
    plans = options.plans()
    if len(plans) == 1:
        result = run_load(plans[0], progress=_show_progress if live else None)
    else:
        result = run_procs(plans, progress=_show_progress if live else None)
    if live:
        sys.stderr.write("\r" + " " * 60 + "\r")
    summary = report(options, result)
    if options["json"]:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        sys.stdout.write(format_report(summary) + "\n")
    sys.stdout.flush()
    if result.connect_errors or result.connected == 0:
        sys.stderr.write(f"pfo3-bench: could not connect to {options['endpoint']}: "
                         f"{result.connect_error}\n")
        return 1
    if result.replies == 0:
        sys.stderr.write("pfo3-bench: no replies\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
