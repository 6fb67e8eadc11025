"""
Tests for L{pfo3.tasks}: the registry, the built-ins and entry points.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator, List

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogEvent, globalLogPublisher

from pfo3.errors import UnknownType
from pfo3.tasks import (
    BUILTINS,
    ENTRY_POINT_GROUP,
    INLINE,
    SLEEP,
    UPPERCASE,
    TaskRegistry,
    TaskType,
    default_registry,
)

from .conftest import ROOT

EXAMPLE = ROOT / "docs" / "examples" / "pfo3_tareas_extra"


def test_builtins_compute_the_seed_results() -> None:
    """
    The four built-ins compute what the seed's tasks computed.
    """
    reg = default_registry(entry_points=False)
    assert reg.lookup("uppercase").run("hola mundo") == "HOLA MUNDO"
    assert reg.lookup("reverse").run("hola") == "aloh"
    assert reg.lookup("word_count").run("  uno dos\ttres\n") == 3
    clock = Clock()
    d = reg.lookup("sleep").run(clock, 1.5)
    assert not d.called
    clock.advance(1.5)
    assert "1.5" in d.result


def test_describe_lists_types_by_code() -> None:
    """
    describe() gives code, canonical name, aliases and description, by code.
    """
    described = default_registry(entry_points=False).describe()
    assert [d["codigo"] for d in described] == [1, 2, 3, 4]
    assert described[0] == {
        "codigo": 1, "tipo": "uppercase", "alias": ["mayus", "mayusculas", "upper"],
        "descripcion": UPPERCASE.description,
    }


def test_register_refuses_clashes() -> None:
    """
    A new type cannot take a name, alias or code already in use.
    """
    reg = TaskRegistry(BUILTINS)
    for clash in (
        TaskType("mayus", 50, (), "d", str, INLINE),
        TaskType("otro", 1, (), "d", str, INLINE),
        TaskType("otro", 51, ("espera",), "d", str, INLINE),
    ):
        with pytest.raises(ValueError):
            reg.register(clash)
    assert len(reg) == 4


def test_task_type_checks_its_fields() -> None:
    """
    A task type needs a known mode and a lower-case trimmed name.
    """
    with pytest.raises(ValueError):
        TaskType("x", 9, (), "d", str, "fast")
    with pytest.raises(ValueError):
        TaskType("Upper", 9, (), "d", str, INLINE)


def test_unknown_lookup_lists_valid_types() -> None:
    """
    An unknown tipo is refused with a message listing the valid ones.
    """
    with pytest.raises(UnknownType) as info:
        TaskRegistry(BUILTINS).lookup("cuadrado")
    assert "1=uppercase" in info.value.mensaje and "4=sleep" in info.value.mensaje


@pytest.fixture
def installed_example(tmp_path: Path) -> Iterator[Path]:
    """
    Make the example package importable with real entry-point metadata, as
    C{pip install} would leave it.
    """
    dist = tmp_path / "pfo3_tareas_extra-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: pfo3-tareas-extra\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\n"
        "sha256 = pfo3_tareas_extra:SHA256\n"
        "suma = pfo3_tareas_extra:SUMA\n"
        "roto = pfo3_tareas_extra:NO_SUCH_NAME\n"
        "clash = pfo3.tasks:SLEEP\n"
    )
    (tmp_path / "pfo3_tareas_extra.py").write_text((EXAMPLE / "pfo3_tareas_extra.py").read_text())
    sys.path.insert(0, str(tmp_path))
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("pfo3_tareas_extra", None)


def test_entry_points_add_task_types(installed_example: Path) -> None:
    """
    Task types published in the pfo3.tasks entry-point group are registered
    and run; a broken or clashing entry point is logged and skipped.
    """
    events: List[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        reg = default_registry()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert sorted(t.name for t in reg) == sorted(
        ["uppercase", "reverse", "word_count", "sleep", "sha256", "suma"]
    )
    assert reg.lookup("hash").run("abc").startswith("ba7816bf")
    assert reg.lookup(102).run(reg.lookup("suma").validate([1, 2, 3.5])) == 6.5
    assert reg.lookup("sleep") is SLEEP
    skipped = [e for e in events if e.get("log_failure") is not None]
    assert sorted(e["name"] for e in skipped) == ["clash", "roto"]


def test_entry_points_can_be_turned_off(installed_example: Path) -> None:
    """
    default_registry(entry_points=False) holds only the built-ins.
    """
    assert [t.name for t in default_registry(entry_points=False)] == [
        "uppercase", "reverse", "word_count", "sleep",
    ]
