"""
The task registry: what a C{tipo} means and how it runs.

A L{TaskType} names a kind of task (canonical name, numeric code, aliases,
description), validates its C{contenido} and says how it runs:

  - C{INLINE}: a cheap, pure function called directly in the reactor thread.
    Measured here (C{docs/execution.md}), handing a microsecond-sized task to a
    thread costs several times the task itself, so the built-in text tasks
    run inline.
  - C{THREAD}: a blocking function, run on the worker thread pool.
  - C{ASYNC}: a function C{run(clock, arg)} returning a L{Deferred}; it holds
    no thread while it waits (C{sleep} uses L{task.deferLater}).

Third-party packages add task types without editing pfo3 by declaring an
entry point in the C{pfo3.tasks} group whose object is a L{TaskType}.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pfo3.errors import InvalidContent, MissingContent, UnknownType, echo

INLINE = "inline"
THREAD = "thread"
ASYNC = "async"
MODES = (INLINE, THREAD, ASYNC)

#: Entry-point group that third-party task types are loaded from.
ENTRY_POINT_GROUP = "pfo3.tasks"

#: Marker for "the request had no C{contenido} field".
MISSING: Any = object()

_log = Logger()


def _identity(contenido: Any) -> Any:
    if contenido is MISSING:
        raise MissingContent("Falta el campo 'contenido'.")
    return contenido


@dataclass(frozen=True)
class TaskType:
    """
    One kind of task.

    @ivar name: Canonical name, as replies and C{{"op": "tipos"}} show it.
    @ivar code: Numeric code; clients may send it as an integer or a string.
    @ivar aliases: Other accepted names (matched trimmed and lower-cased).
    @ivar description: One line for menus and C{--help}.
    @ivar run: For C{INLINE} and C{THREAD}, C{run(arg) -> result}; for
        C{ASYNC}, C{run(clock, arg) -> Deferred[result]}.  C{arg} is what
        C{validate} returned; the result must be JSON-serialisable.
    @ivar mode: One of L{INLINE}, L{THREAD}, L{ASYNC}.
    @ivar validate: C{validate(contenido) -> arg}; raises
        L{InvalidContent} or L{MissingContent}.  C{contenido} is L{MISSING}
        when the request had none.
    @ivar duration: Optional C{duration(arg) -> seconds}: how long the task
        says it will take, so one longer than the timeout is refused at once.
    """

    name: str
    code: int
    aliases: Tuple[str, ...]
    description: str
    run: Callable[..., Any]
    mode: str = THREAD
    validate: Callable[[Any], Any] = _identity
    duration: Optional[Callable[[Any], float]] = None

    def __post_init__(self) -> None:
        # Checked here, at registration, so that a plugin with a wrong field
        # is skipped at start instead of breaking C{{"op": "tipos"}} later.
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        if not isinstance(self.name, str) or not self.name or (
            self.name != self.name.strip().lower()
        ):
            raise ValueError(f"name must be a lower-case, trimmed text: {self.name!r}")
        if type(self.code) is not int:
            raise ValueError(f"task type {self.name!r}: code must be an int, not {self.code!r}")
        if not isinstance(self.aliases, tuple) or not all(
            isinstance(a, str) and a.strip() for a in self.aliases
        ):
            raise ValueError(
                f"task type {self.name!r}: aliases must be a tuple of non-empty texts"
            )
        if not isinstance(self.description, str):
            raise ValueError(f"task type {self.name!r}: description must be a text")
        for field in ("run", "validate"):
            if not callable(getattr(self, field)):
                raise ValueError(f"task type {self.name!r}: {field} must be callable")
        if self.duration is not None and not callable(self.duration):
            raise ValueError(f"task type {self.name!r}: duration must be callable or None")

    def describe(self) -> Dict[str, Any]:
        """
        @return: The public description sent by C{{"op": "tipos"}}.
        """
        return {
            "codigo": self.code,
            "tipo": self.name,
            "alias": list(self.aliases),
            "descripcion": self.description,
        }


class TaskRegistry:
    """
    The task types a server accepts, looked up by name, alias or code.
    """

    def __init__(self, types: Iterable[TaskType] = ()) -> None:
        self._types: List[TaskType] = []
        self._keys: Dict[Union[str, int], TaskType] = {}
        for t in types:
            self.register(t)

    def register(self, tasktype: TaskType) -> None:
        """
        Add a task type.

        @raise ValueError: if its name, code or an alias is already taken.
        """
        if tasktype in self._types:
            raise ValueError(f"task type {tasktype.name!r} is already registered")
        keys: List[Union[str, int]] = [tasktype.name, tasktype.code, str(tasktype.code)]
        keys.extend(a.strip().lower() for a in tasktype.aliases)
        for key in keys:
            other = self._keys.get(key)
            if other is not None and other is not tasktype:
                raise ValueError(
                    f"task type {tasktype.name!r}: {key!r} is already used by {other.name!r}"
                )
        self._types.append(tasktype)
        for key in keys:
            self._keys[key] = tasktype

    def lookup(self, tipo: Any) -> TaskType:
        """
        Find the task type a request's C{tipo} names.

        @param tipo: A name, alias or code as a string (matched after
            trimming and lower-casing), or an integer code.
        @raise UnknownType: if nothing matches.
        """
        if type(tipo) is str:
            found = self._keys.get(tipo)
            if found is None:
                found = self._keys.get(tipo.strip().lower())
            if found is not None:
                return found
            raise UnknownType(f"Tipo de tarea desconocido: {echo(tipo)}. " + self._hint())
        if type(tipo) is int:
            found = self._keys.get(tipo)
            if found is not None:
                return found
            raise UnknownType(f"Código de tarea desconocido: {echo(tipo)}. " + self._hint())
        raise UnknownType(
            "El campo 'tipo' debe ser un texto o un código entero. " + self._hint()
        )

    def _hint(self) -> str:
        return "Tipos válidos: " + ", ".join(f"{t.code}={t.name}" for t in self._types) + "."

    def __iter__(self) -> Any:
        return iter(self._types)

    def __len__(self) -> int:
        return len(self._types)

    def describe(self) -> List[Dict[str, Any]]:
        """
        @return: Every type's public description, ordered by code.
        """
        return [t.describe() for t in sorted(self._types, key=lambda t: t.code)]

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> List[str]:
        """
        Register every L{TaskType} published in an entry-point group.

        A broken entry point (import error, wrong object, clashing name) is
        logged and skipped: one bad plugin must not keep the server down.

        @return: The names of the task types added.
        """
        added: List[str] = []
        for ep in _entry_points(group):
            try:
                obj = ep.load()
                if not isinstance(obj, TaskType):
                    raise TypeError(f"{ep.value} is a {type(obj).__name__}, not a TaskType")
                self.register(obj)
            except Exception:
                _log.failure("Skipping task entry point {name}", name=ep.name)
            else:
                added.append(obj.name)
                _log.info("Loaded task type {tipo} from {value}", tipo=obj.name, value=ep.value)
        return added


def _entry_points(group: str) -> List[Any]:
    from importlib import metadata

    if sys.version_info >= (3, 10):
        return list(metadata.entry_points(group=group))
    return list(metadata.entry_points().get(group, []))  # pragma: no cover


# --- built-in task types --------------------------------------------------


def _text(contenido: Any) -> str:
    if contenido is MISSING:
        raise MissingContent("Falta el campo 'contenido' (un texto).")
    if not isinstance(contenido, str):
        raise InvalidContent(
            f"'contenido' debe ser un texto, no {_json_type(contenido)}."
        )
    return contenido


#: A number of seconds written as text: plain decimal digits (ASCII only),
#: an optional sign and fraction; no exponent, no underscores.
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)", re.ASCII)


def plain_decimal(text: str) -> Optional[float]:
    """
    @return: The value of a text holding a plain decimal number (ASCII
        digits, an optional sign and fraction, blanks around), as a sleep's
        C{contenido} may be written; L{None} for anything else (exponents,
        underscores, other digits, C{nan}, C{inf}).
    """
    text = text.strip(" \t")
    if _DECIMAL.fullmatch(text) is None:
        return None
    return float(text) + 0.0


def _seconds(contenido: Any) -> float:
    """
    A sleep's duration: a JSON number, or a text holding a plain decimal
    number (the seed's menu sends what the user typed), finite and not
    negative.  Whether it fits the server's timeout is the orchestrator's
    rule (the task must be shorter than the timeout).
    """
    if contenido is MISSING:
        raise MissingContent("Falta el campo 'contenido' (segundos a esperar).")
    if isinstance(contenido, bool) or not isinstance(contenido, (int, float, str)):
        raise InvalidContent(
            f"'contenido' debe ser un número de segundos, no {_json_type(contenido)}."
        )
    if isinstance(contenido, str):
        parsed = plain_decimal(contenido)
        if parsed is None:
            raise InvalidContent(
                f"'contenido' no es un número de segundos: {echo(contenido)}."
            )
        seconds = parsed
    else:
        try:
            seconds = float(contenido)
        except OverflowError:
            seconds = math.inf
    if math.isnan(seconds) or math.isinf(seconds):
        raise InvalidContent("'contenido' debe ser un número finito de segundos.")
    if seconds < 0:
        raise InvalidContent("'contenido' no puede ser negativo.")
    return seconds + 0.0  # -0.0 becomes 0.0


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "un booleano"
    if isinstance(value, (int, float)):
        return "un número"
    if isinstance(value, list):
        return "una lista"
    if isinstance(value, dict):
        return "un objeto"
    return type(value).__name__


def _sleep(clock: IReactorTime, seconds: float) -> Deferred[str]:
    unit = "segundo" if seconds == 1 else "segundos"
    return task.deferLater(clock, seconds, lambda: f"Esperé {seconds:g} {unit}")


def _word_count(text: str) -> int:
    return len(text.split())


UPPERCASE = TaskType(
    "uppercase", 1, ("mayus", "mayusculas", "upper"),
    "Convierte el texto a mayúsculas.", str.upper, INLINE, _text,
)
REVERSE = TaskType(
    "reverse", 2, ("reversa", "invertir"),
    "Invierte el texto recibido.", lambda s: s[::-1], INLINE, _text,
)
WORD_COUNT = TaskType(
    "word_count", 3, ("contar", "palabras"),
    "Cuenta las palabras separadas por espacios.", _word_count, INLINE, _text,
)
SLEEP = TaskType(
    "sleep", 4, ("espera", "delay"),
    "Simula un trabajo pesado esperando N segundos.", _sleep, ASYNC, _seconds,
    duration=lambda seconds: seconds,
)

#: The seed's four task types.
BUILTINS: Tuple[TaskType, ...] = (UPPERCASE, REVERSE, WORD_COUNT, SLEEP)


def default_registry(entry_points: bool = True) -> TaskRegistry:
    """
    @param entry_points: Also load third-party types from L{ENTRY_POINT_GROUP}.
    @return: A registry with the built-ins (and any installed plugins).
    """
    registry = TaskRegistry(BUILTINS)
    if entry_points:
        registry.load_entry_points()
    return registry


__all__ = [
    "ASYNC", "BUILTINS", "ENTRY_POINT_GROUP", "INLINE", "MISSING", "THREAD",
    "TaskRegistry", "TaskType", "default_registry",
]
