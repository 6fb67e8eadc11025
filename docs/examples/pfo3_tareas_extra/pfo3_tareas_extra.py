"""
An example third-party package that adds two task types to pfo3.

Installed next to pfo3, its entry points (see C{pyproject.toml} beside this
file) make C{twistd pfo3} accept C{"tipo": "sha256"} and C{"tipo": "suma"}
without any change to pfo3 itself.
"""

from __future__ import annotations

import hashlib
from typing import Any, List

from pfo3 import INLINE, THREAD, TaskType
from pfo3.errors import InvalidContent, MissingContent
from pfo3.tasks import MISSING


def _numbers(contenido: Any) -> List[float]:
    if contenido is MISSING:
        raise MissingContent("Falta 'contenido': una lista de números.")
    if not isinstance(contenido, list) or not all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in contenido
    ):
        raise InvalidContent("'contenido' debe ser una lista de números.")
    return contenido


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _text(contenido: Any) -> str:
    if not isinstance(contenido, str):
        raise InvalidContent("'contenido' debe ser un texto.")
    return contenido


#: Hashing large texts is real CPU work: it runs on the thread pool.
SHA256 = TaskType(
    "sha256", 101, ("hash",), "Calcula el SHA-256 (hex) del texto.", _sha256, THREAD, _text,
)

#: Adding a few numbers is cheap: it runs inline.
SUMA = TaskType("suma", 102, ("sumar",), "Suma una lista de números.", sum, INLINE, _numbers)
