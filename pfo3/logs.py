"""
C{--log-format json}: one JSON object per log event, for log collectors.

Each line is an object with C{time} (ISO 8601, UTC), C{level},
C{namespace}, C{message} (the event's text, as twistd would print it) and
the event's own fields: C{tarea_id}, C{tipo}, C{worker}, C{duration},
C{estado}, C{peer} and C{identity} (left out for an anonymous client) for
the per-task events of C{--log-tasks N}, whatever other fields an event
carries, and C{traceback} for a failure.  Only logged events are formatted:
the per-task events stay sampled (C{--log-tasks}), nothing is added to a
task's path.

Under C{twistd} the observer replaces twistd's text one (it becomes the
application's L{ILogObserver}), and writes to standard output: run the
server with C{twistd -n} under a supervisor that collects it (systemd,
runit, a container runtime).
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import IO, Any, Dict, Optional

from twisted.logger import ILogObserver, LogEvent, formatEvent, formatEventAsClassicLogText
from twisted.python import usage
from twisted.python.components import Componentized
from zope.interface import provider

FORMATS = ("text", "json")

#: Keys of twisted.python.log's legacy events, and ours that say nothing.
_SKIP = frozenset(("message", "format", "isError", "system", "time", "why", "failure"))


def event_as_json(event: LogEvent) -> str:
    """
    @return: One line of JSON (without its newline) for C{event}.
    """
    when = event.get("log_time")
    level = event.get("log_level")
    out: Dict[str, Any] = {
        "time": datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="microseconds")
        if isinstance(when, (int, float)) else None,
        "level": getattr(level, "name", None),
        "namespace": event.get("log_namespace"),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in _SKIP or key in out:
            continue
        if key == "identity" and value in ("-", ""):
            continue
        out[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        try:
            out["traceback"] = failure.getTraceback()
        except Exception:
            out["traceback"] = repr(failure)
    return json.dumps(out, ensure_ascii=False, default=repr)


def json_observer(stream: IO[str]) -> ILogObserver:
    """
    @return: An observer writing one JSON line per event to C{stream}.
    """

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        try:
            line = event_as_json(event)
        except Exception as e:  # a field that even repr() cannot show
            line = json.dumps({"message": f"unformattable event: {e!r}"})
        stream.write(line + "\n")
        stream.flush()

    return observe


def check_operations(options: usage.Options) -> None:
    """
    Validate C{--metrics} and C{--log-format} (in C{postOptions}).
    """
    if options["log-format"] not in FORMATS:
        raise usage.UsageError(
            f"--log-format must be one of {', '.join(FORMATS)}, not {options['log-format']!r}")
    if options["metrics"]:
        from twisted.internet import endpoints, reactor

        try:
            endpoints.serverFromString(reactor, options["metrics"])
        except Exception as e:
            raise usage.UsageError(f"invalid --metrics {options['metrics']!r}: {e}")


class JSONLogsOnParent:
    """
    Mixed into a service: when it is given to C{twistd}'s application, the
    application's log observer becomes C{log_observer} (when set), which
    C{twistd} then uses instead of its text observer.
    """

    log_observer: Any = None

    def setServiceParent(self, parent: Any) -> None:
        if self.log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)  # type: ignore[misc]


def use_json_logs(service: Any, stream: Optional[IO[str]] = None) -> None:
    """
    Make C{service} (a L{JSONLogsOnParent}) log JSON lines to C{stream}
    (standard output as it is now, before C{twistd} redirects it into the
    log) once C{twistd} runs it.
    """
    service.log_observer = json_observer(stream if stream is not None else sys.stdout)


def use_process_logs(service: Any, log_format: str, pid: int,
                     stream: Optional[IO[str]] = None) -> None:
    """
    Make C{service} (a L{JSONLogsOnParent}) of one process among several
    (C{--processes N}) say which process logged each event: a C{pid} field
    in JSON lines, or C{pid N} after the system in text lines
    (C{[pfo3#info pid 5121]}).  They share the parent's standard output.
    """
    out = stream if stream is not None else sys.stdout
    if log_format == "json":
        inner = json_observer(out)

        @provider(ILogObserver)
        def observe(event: LogEvent) -> None:
            inner({**event, "pid": pid})

    else:

        @provider(ILogObserver)
        def observe(event: LogEvent) -> None:
            level = event.get("log_level")
            system = event.get("log_system") or "{}#{}".format(
                event.get("log_namespace", "-"), getattr(level, "name", "-"))
            text = formatEventAsClassicLogText({**event, "log_system": f"{system} pid {pid}"})
            if text is not None:
                out.write(text)
                out.flush()

    service.log_observer = observe
