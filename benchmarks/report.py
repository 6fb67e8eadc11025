"""
Render the suite's results (C{benchmarks/results/latest.json}) as
C{docs/benchmarks.md} and C{docs/benchmarks.png}.

Every comparison is a median of ratios taken within the same round (pfo3 and
the floor measured minutes apart on the same machine state), never a ratio of
absolute figures from different runs.
"""

from __future__ import annotations

import os
import statistics
from typing import Any, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))

#: The targets: (what, load level, system, compared with, figure,
#: comparison, limit); the measured value is the median over rounds of the
#: system's figure divided by the other's in the same round.  The first two
#: are the first performance round's, the next two the second's (against
#: the floor that takes every trick pfo3 takes); at 64x1 and 1x1, where the
#: seed's own clients live (one request at a time), the limit is "no slower
#: than the seed".
TARGETS: Tuple[Tuple[str, str, str, str, str, str, float], ...] = (
    ("throughput ÷ floor", "64x8", "pfo3", "floor", "throughput", ">=", 0.85),
    ("server CPU per task ÷ floor", "64x8", "pfo3", "floor", "server_cpu_us_per_task",
     "<=", 1.5),
    ("throughput ÷ floor, round two", "64x8", "pfo3", "floor", "throughput", ">=", 1.0),
    ("server CPU per task ÷ floor, round two", "64x8", "pfo3", "floor",
     "server_cpu_us_per_task", "<=", 1.2),
    ("p99 latency ÷ seed architecture", "64x8", "pfo3", "seed", "p99_ms", "<=", 0.2),
    ("p99 latency ÷ seed architecture", "64x1", "pfo3", "seed", "p99_ms", "<=", 1.0),
    ("p50 round trip ÷ seed architecture", "1x1", "pfo3", "seed", "p50_ms", "<=", 1.0),
    ("over TLS: server CPU per task ÷ over TCP", "64x8", "pfo3-tls", "pfo3",
     "server_cpu_us_per_task", "<=", 1.2),
    ("over TLS: server CPU per task ÷ over TCP", "64x1", "pfo3-tls", "pfo3",
     "server_cpu_us_per_task", "<=", 1.5),
    ("--metrics scraped 1/s: throughput ÷ without", "64x8", "pfo3-metrics", "pfo3",
     "throughput", ">=", 0.9),
    ("--metrics scraped 1/s: throughput ÷ without", "64x1", "pfo3-metrics", "pfo3",
     "throughput", ">=", 0.9),
)
BURST_TARGET_S = 1.5
IDLE_TARGET_BYTES = 10 * 1024


def verdict(value: Optional[float], cmp: str, limit: float) -> str:
    """
    @return: C{"met"}, C{"missed"}, or C{"–"} when there is no value.
    """
    if value is None:
        return "–"
    return "met" if (value >= limit if cmp == ">=" else value <= limit) else "missed"


def _median(values: List[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def medians(results: Dict[str, Any]) -> Dict[Tuple[str, str], Dict[str, Any]]:
    """
    @return: Per (level, system): the median, min and max of each figure.
    """
    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for run in results["runs"]:
        groups.setdefault((run["level"], run["system"]), []).append(run)
    out: Dict[Tuple[str, str], Dict[str, Any]] = {}
    for key, runs in groups.items():
        row: Dict[str, Any] = {"n": len(runs), "errors": sum(r["errors"] for r in runs)}
        for fig in ("throughput", "p50_ms", "p99_ms", "server_cpu_us_per_task"):
            vals = [r[fig] for r in runs if r[fig] is not None]
            row[fig] = _median(vals)
            row[fig + "_min"] = min(vals) if vals else None
            row[fig + "_max"] = max(vals) if vals else None
        out[key] = row
    return out


def paired(results: Dict[str, Any], level: str, system: str, other: str, fig: str
           ) -> Optional[float]:
    """
    @return: The median over rounds of C{system}'s figure divided by
        C{other}'s in the same round, at one level.
    """
    by_round: Dict[int, Dict[str, float]] = {}
    for run in results["runs"]:
        if run["level"] == level and run[fig] is not None:
            by_round.setdefault(run["round"], {})[run["system"]] = run[fig]
    ratios = [
        r[system] / r[other] for r in by_round.values()
        if system in r and other in r and r[other]
    ]
    return _median(ratios)


def ratios(results: Dict[str, Any], level: str, system: str) -> Dict[str, Optional[float]]:
    """
    @return: A system's paired ratios against the floor and the seed.
    """
    return {
        "throughput_vs_floor": paired(results, level, system, "floor", "throughput"),
        "cpu_vs_floor": paired(results, level, system, "floor", "server_cpu_us_per_task"),
        "p99_vs_seed": paired(results, level, system, "seed", "p99_ms"),
        "throughput_vs_seed": paired(results, level, system, "seed", "throughput"),
    }


def _f(value: Optional[float], fmt: str = "{:.2f}") -> str:
    return "–" if value is None else fmt.format(value)


def _burst_rows(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    rows = []
    labels = {s["name"]: s["label"] for s in results["systems"]}
    names = []
    for b in results.get("burst", []):
        if b["system"] not in names:
            names.append(b["system"])
    for name in names:
        runs = [b for b in results["burst"] if b["system"] == name]
        rows.append({
            "system": name, "label": labels.get(name, name), "burst": runs[0]["burst"],
            "connections": runs[0]["connections"], "sleep_s": runs[0]["sleep_s"],
            "wall_s": _median([b["wall_s"] for b in runs]),
            "for_size": _median([b["wall_s_for_size"] for b in runs]),
            "extrapolated": runs[0]["extrapolated_to"] is not None,
            "replies_ok": all(b["replies"] == b["burst"] and not b["errors"] for b in runs),
            "n": len(runs),
        })
    return rows


def _labels(results: Dict[str, Any]) -> Dict[str, str]:
    return {s["name"]: s["label"] for s in results["systems"]}


def _targets(results: Dict[str, Any]) -> List[str]:
    have = {s["name"] for s in results["systems"]}
    out = ["## Targets", "",
           "`uppercase` of `hola mundo`; the load is connections × requests in flight per "
           "connection. Each ratio is the median over rounds of the ratio within a round.", "",
           "| target | load | limit | measured | |", "|---|---|---:|---:|---|"]
    for what, level, system, other, fig, cmp, limit in TARGETS:
        value = (paired(results, level, system, other, fig)
                 if system in have and other in have else None)
        out.append(f"| {what} | {level} | {cmp} {limit:g} | {_f(value)} | "
                   f"{verdict(value, cmp, limit)} |")
    bursts = {b["system"]: b for b in _burst_rows(results)}
    if "pfo3" in bursts:
        b = bursts["pfo3"]
        out.append(f"| {results.get('burst_size', b['burst'])} concurrent "
                   f"{b['sleep_s']:g} s sleeps answered | burst | <= {BURST_TARGET_S:g} s | "
                   f"{_f(b['for_size'], '{:.3f}')} s | "
                   f"{verdict(b['for_size'], '<=', BURST_TARGET_S)} |")
    mem = {m["system"]: m for m in results.get("memory", [])}
    if "pfo3" in mem:
        per = mem["pfo3"]["bytes_per_connection"]
        out.append(f"| RSS per idle connection | {mem['pfo3']['connections']} held | "
                   f"<= {IDLE_TARGET_BYTES // 1024} KiB | {per / 1024:.2f} KiB | "
                   f"{verdict(per, '<=', IDLE_TARGET_BYTES)} |")
    out.append("")
    return out


def _versus(results: Dict[str, Any], system: str, other: str) -> List[str]:
    """
    Rows comparing two systems at every level both ran at: each one's
    median tasks/s, CPU per task and p99, and the paired ratios.
    """
    med = medians(results)
    out = []
    for level in results["levels"]:
        a, b = med.get((level, system)), med.get((level, other))
        if a is None or b is None:
            continue
        out.append(
            f"| {level} | {_f(b['throughput'], '{:,.0f}')} | {_f(a['throughput'], '{:,.0f}')} "
            f"| {_f(paired(results, level, system, other, 'throughput'))} "
            f"| {_f(b['server_cpu_us_per_task'], '{:.1f}')} "
            f"| {_f(a['server_cpu_us_per_task'], '{:.1f}')} "
            f"| {_f(paired(results, level, system, other, 'server_cpu_us_per_task'))} "
            f"| {_f(b['p99_ms'])} | {_f(a['p99_ms'])} |")
    return out


def _pair_section(results: Dict[str, Any], title: str, intro: str, system: str, other: str,
                  names: Tuple[str, str]) -> List[str]:
    unavailable = results.get("unavailable", {})
    why = unavailable.get(system) or unavailable.get(other)
    out = [f"## {title}", "", intro, ""]
    rows = _versus(results, system, other)
    if not rows:
        out += [f"Not measured in this run: {why}." if why else
                "Not measured in this run (the system was not selected).", ""]
        return out
    b, a = names
    out += [f"| load | {b} tasks/s | {a} tasks/s | ratio | {b} CPU µs/task | "
            f"{a} CPU µs/task | ratio | {b} p99 ms | {a} p99 ms |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|", *rows, ""]
    return out


def _profile_layers(results: Dict[str, Any]) -> List[str]:
    """
    pfo3 and the floor at the target level, split into their own code, the
    event loop under it and the loop's wait for sockets, in shares of the
    profile and in µs per task.
    """
    target = results["target_level"]
    med = medians(results)
    profiles = {p["system"]: p for p in results.get("profiles") or []
                if p["name"] == target and p.get("layers")}
    if "pfo3" not in profiles or "floor" not in profiles:
        return []
    labels = _labels(results)
    out = [f"### pfo3 and the floor at {target}, layer by layer", "",
           "*Own code* is the server's Python (pfo3's modules, or the floor's one file) and "
           "the C functions it calls (the JSON scanner, string methods); *event loop* is "
           "Twisted or asyncio with the system calls they make (`recv`, `send`, "
           "`epoll_ctl`), except the wait for sockets, *epoll wait* (`EPollReactor.doPoll`, "
           "`EpollSelector.select`): py-spy counts a thread as busy from the moment it is "
           "runnable, so on a loaded machine that column also holds time spent waiting for "
           "a CPU. Shares are of each py-spy profile's busy samples. The µs per task split "
           "the server CPU per task measured in the load runs at this level (median) "
           "between the first two layers in proportion to their samples, as if the "
           "epoll wait cost no CPU: each is an upper bound.", "",
           "| system | own code | event loop | epoll wait | own code µs/task | "
           "event loop µs/task | CPU µs/task |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name in ("pfo3", "floor"):
        lay = profiles[name]["layers"]
        row = med.get((target, name))
        cpu = row["server_cpu_us_per_task"] if row else None
        busy = lay["server"] + lay["loop"] + lay["other"]
        mine = ["–", "–"] if cpu is None or not busy else [
            f"{lay['server'] / busy * cpu:.1f}",
            f"{(lay['loop'] + lay['other']) / busy * cpu:.1f}"]
        out.append(f"| {labels.get(name, name)} | {lay['server'] * 100:.0f} % | "
                   f"{(lay['loop'] + lay['other']) * 100:.0f} % | {lay['poll'] * 100:.0f} % | "
                   f"{mine[0]} | {mine[1]} | {_f(cpu, '{:.1f}')} |")
    out.append("")
    return out


def markdown(results: Dict[str, Any], chart_name: str = "benchmarks.png") -> str:
    """
    @return: The text of C{docs/benchmarks.md}: every figure on it comes
        from C{results}, and the prose around them has none of its own.
    """
    meta = results["meta"]
    med = medians(results)
    systems = results["systems"]
    labels = _labels(results)
    out: List[str] = ["# Benchmarks", ""]
    out.append(
        "pfo3 measured side by side with the seed prototype's architecture and with the "
        "cheapest Python server known for the same protocol (the *floor*, on asyncio, with "
        "every trick pfo3 uses), in one run, interleaved. The machine is noisy: read the "
        "**ratios**, which compare figures taken in the same round, rather than the "
        "absolute numbers."
    )
    out.append("")
    quick = (" — **quick run** (a smoke test of few, short rounds: its figures are noise)"
             if results.get("quick") else "")
    out.append(
        f"Run of {meta['date']} on {meta['cpus']} CPUs, Python {meta['python']}, Twisted "
        f"{meta['twisted']}, pfo3 at commit `{meta['commit']}`; {results['rounds']} "
        f"round{'' if results['rounds'] == 1 else 's'} of {results['duration_s']:g} s per "
        f"system and load level; the suite took "
        f"{results.get('suite_seconds', 0):.0f} s{quick}. This page and its chart are "
        "written by `benchmarks/run_suite.py` alone, from `benchmarks/results/latest.json`."
    )
    out.append("")
    out.append("| system | what it is |")
    out.append("|---|---|")
    for s in systems:
        out.append(f"| {s['label']} | {s['description']} |")
    for name, why in results.get("unavailable", {}).items():
        out.append(f"| {name} | not run: {why} |")
    out.append("")

    if results["runs"]:
        out += _targets(results)
        out += ["## Load levels", "",
                "Medians over the rounds (min–max in the chart). *CPU* is the server's "
                "user + system time per answered task (all its processes), read with psutil "
                "around each run. Ratios are paired within a round. The variants of pfo3 run "
                "only at the levels where they are compared with it.", ""]
        out += ["| load | system | tasks/s | p50 ms | p99 ms | CPU µs/task | "
                "tasks/s ÷ floor | CPU ÷ floor | p99 ÷ seed | errors |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for level in results["levels"]:
            for s in systems:
                row = med.get((level, s["name"]))
                if row is None:
                    continue
                rr = ratios(results, level, s["name"])
                out.append(
                    f"| {level} | {s['label']} | {_f(row['throughput'], '{:,.0f}')} | "
                    f"{_f(row['p50_ms'])} | {_f(row['p99_ms'])} | "
                    f"{_f(row['server_cpu_us_per_task'], '{:.1f}')} | "
                    f"{_f(rr['throughput_vs_floor'])} | {_f(rr['cpu_vs_floor'])} | "
                    f"{_f(rr['p99_vs_seed'])} | {row['errors']} |")
        out += ["", f"![throughput and p99 per system and load level]({chart_name})", ""]
        out += _pair_section(
            results, "TLS", "pfo3 on an `ssl:` port against the same pfo3 on a `tcp:` port, "
            "with pipelining (64x8) and without (64x1); the ratios are TLS ÷ TCP.",
            "pfo3-tls", "pfo3", ("TCP", "TLS"))
        out += _pair_section(
            results, "Metrics",
            "pfo3 with `--metrics` on a loopback port, scraped once a second during the load "
            "(`benchmarks/scrape.py`, as a Prometheus would), against the same pfo3 without "
            "it; the ratios are with ÷ without (the target is a throughput ratio >= 0.9).",
            "pfo3-metrics", "pfo3", ("without", "with --metrics"))
        out += _pair_section(
            results, "Every core: one process or two",
            "`twistd pfo3 --processes 2` against one process, both loaded by two load "
            "processes (`pfo3-bench --procs 2`, their figures merged), so that the load "
            "generator is not one process's worth of CPU; the ratios are 2 ÷ 1. On a "
            "machine with as many cores as server and load processes together, "
            "throughput is what a second process buys; with fewer, they share the cores "
            "and CPU per task is the sharper measure.",
            "pfo3-p2", "pfo3-p1", ("1 process", "2 processes"))

    bursts_rows = _burst_rows(results)
    if bursts_rows:
        size = results.get("burst_size", 0)
        out += ["## Sleep burst", "",
                f"{size} requests `sleep` of {bursts_rows[0]['sleep_s']:g} s sent at once "
                f"over at most 100 connections; wall time from the first request to the last "
                f"reply (median of {bursts_rows[0]['n']}).", "",
                f"| system | burst run | wall time | for {size} |", "|---|---|---:|---:|"]
        for b in bursts_rows:
            note = " (extrapolated)" if b["extrapolated"] else ""
            bad = "" if b["replies_ok"] else " — **not all answered ok**"
            out.append(f"| {b['label']} | {b['burst']} × {b['sleep_s']:g} s on "
                       f"{b['connections']} connections | {b['wall_s']:.3f} s{bad} | "
                       f"{b['for_size']:.1f} s{note} |")
        if any(b["extrapolated"] for b in bursts_rows):
            out += ["", "The seed architecture runs sleeps on its 4 worker threads, each "
                    "holding a thread for the whole sleep, so a burst drains 4 at a time: its "
                    "wall time grows linearly with the burst. It was run with a smaller "
                    "burst and that wall time scaled by the burst ratio (extrapolated, not "
                    "measured)."]
        out.append("")

    if results.get("memory"):
        out += ["## Memory per idle connection", "",
                "RSS of a fresh server (after a short warm-up load) before and while it "
                "holds idle connections, each of which was answered one `ping` first. The "
                "seed architecture holds each connection with a thread of its own: the "
                "thread's stack is reserved as virtual memory, and only the pages it "
                "touched count in RSS, which is what is measured here.", "",
                "| system | connections | RSS before | RSS holding them | per connection |",
                "|---|---:|---:|---:|---:|"]
        for m in results["memory"]:
            out.append(f"| {labels.get(m['system'], m['system'])} | {m['connections']} | "
                       f"{m['rss_before'] / 2**20:.1f} MiB | {m['rss_during'] / 2**20:.1f} MiB"
                       f" | {m['bytes_per_connection'] / 1024:.2f} KiB |")
        out.append("")

    profiles = results.get("profiles") or []
    notes_path = os.path.join(HERE, "profile-notes.md")
    if profiles or os.path.exists(notes_path):
        out += ["## Where pfo3's server time goes", ""]
        if os.path.exists(notes_path):
            with open(notes_path, encoding="utf-8") as f:
                out += [f.read().strip(), ""]
        out += _profile_layers(results)
        for prof in profiles:
            who = labels.get(prof["system"], prof["system"])
            if prof["name"] == "burst":
                what = (f"during the sleep burst (`pfo3-bench {prof['load']}`, answered in "
                        f"{prof['elapsed_s']:.3f} s while sampled)")
            else:
                what = (f"at {prof['name']}, `uppercase` (`pfo3-bench {prof['load']}`, "
                        f"{prof['throughput']:,.0f} tasks/s while sampled)")
            out += [f"### py-spy: {who} {what}", "",
                    "Samples at 250 Hz in which the server was busy; a C function's time "
                    "(a system call, the JSON scanner, the garbage collector) counts as "
                    "*self* time of the Python function that called it. Raw stacks: "
                    f"`benchmarks/results/{prof['raw']}`.", "",
                    prof["markdown"], ""]

    took = ("" if results.get("quick") or "suite_seconds" not in results else
            f" (this page's run took {results['suite_seconds'] / 60:.0f} min)")
    out += ["## How to reproduce", "", "```sh",
            "pip install -e '.[bench]'            # matplotlib, psutil, py-spy",
            f"python benchmarks/run_suite.py       # rewrites this page{took}",
            "python benchmarks/run_suite.py --quick          # a smoke run",
            "python benchmarks/run_suite.py --systems pfo3,floor --levels 64x8 "
            "--skip burst,memory",
            "python benchmarks/run_suite.py --render-only    # re-render from the JSON",
            "```", "",
            "Raw figures: `benchmarks/results/latest.json`. The suite raises its open-file "
            "limit (and so its servers') to hold the idle connections; with a hard limit "
            "below 11,000 (`ulimit -Hn`) it holds fewer and says how many.", "",
            "One system by hand:", "", "```sh",
            "twistd -n --pidfile= pfo3 --port tcp:9000:interface=127.0.0.1 &",
            "pfo3-bench -e tcp:127.0.0.1:9000 -c 64 -i 8 -d 10",
            "pfo3-bench -e tcp:127.0.0.1:9000 --mix uppercase:80,sleep=0.01:20 -n 200000",
            "pfo3-bench -e tcp:127.0.0.1:9000 --burst 10000 --burst-sleep 1 -c 100",
            "pfo3-bench -e tcp:127.0.0.1:9000 -c 64 -i 8 -d 10 --json   # for scripts",
            "pfo3-bench -e tls:localhost:9443:trustRoots=tls/ca -c 64 -i 1 -d 10   # over TLS",
            "```", "",
            "`--procs N` splits the connections over N load processes and merges their "
            "histograms. On 2 cores the load generator takes about one core itself, which "
            "is why CPU per task is the sharper measure.", "",
            "To add a system (pfo3 over RabbitMQ, Celery), append a `System` to "
            "`benchmarks/systems.py`: how to start its processes on a port, and why it "
            "cannot run when its broker is missing; the suite interleaves it with the "
            "others and the report gains its rows.", ""]
    return "\n".join(out)


def chart(results: Dict[str, Any], path: str) -> None:
    """
    Draw throughput and p99 per system and load level (median bars, min–max
    whiskers) into a PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = medians(results)
    levels = results["levels"]
    systems = [s for s in results["systems"]
               if any((lv, s["name"]) in med for lv in levels)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(systems))
    for k, (ax, fig_key, scale, title) in enumerate((
        (axes[0], "throughput", 1e-3, "throughput (thousand tasks/s, higher is better)"),
        (axes[1], "p99_ms", 1.0, "p99 latency (ms, log scale, lower is better)"),
    )):
        for i, s in enumerate(systems):
            xs, ys, lo, hi = [], [], [], []
            for j, lv in enumerate(levels):
                row = med.get((lv, s["name"]))
                if row is None or row[fig_key] is None:
                    continue
                xs.append(j + (i - (len(systems) - 1) / 2) * width)
                ys.append(row[fig_key] * scale)
                lo.append((row[fig_key] - row[fig_key + "_min"]) * scale)
                hi.append((row[fig_key + "_max"] - row[fig_key]) * scale)
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=s["label"])
        ax.set_xticks(range(len(levels)))
        ax.set_xticklabels(levels)
        ax.set_xlabel("connections x requests in flight")
        ax.set_title(title, fontsize=10)
        if k == 1:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=9)
    fig.suptitle(f"pfo3 vs seed architecture vs asyncio floor, uppercase 'hola mundo' "
                 f"({results['meta']['cpus']} CPUs, medians of {results['rounds']} "
                 f"interleaved rounds)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(results: Dict[str, Any], md_path: str, png_path: str) -> None:
    """
    Write both the page and, when there are load runs, the chart.
    """
    if results["runs"]:
        chart(results, png_path)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(markdown(results, os.path.basename(png_path)))
