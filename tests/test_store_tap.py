"""
C{twistd pfo3} options for the results store, and the store each builds.
"""

from __future__ import annotations

from typing import List

import pytest
from twisted.python import usage

from pfo3.store import DEFAULT_MAX_AGE, DEFAULT_MAX_RECORDS, MemoryStore, SQLStore, from_url
from pfo3.tap import Options, makeService
from pfo3.testing import FakeReactor


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_default_is_a_bounded_memory_store() -> None:
    """
    Without C{--store} every task is recorded in memory, bounded by count
    and age.
    """
    store = makeService(parse(), FakeReactor()).orchestrator.store
    assert isinstance(store, MemoryStore)
    assert (store.max_records, store.max_age) == (DEFAULT_MAX_RECORDS, DEFAULT_MAX_AGE)


def test_memory_bounds_from_options() -> None:
    """
    C{--store-max-records} and C{--store-max-age} reach the memory store.
    """
    o = parse("--store", "memory:", "--store-max-records", "10", "--store-max-age", "60")
    store = makeService(o, FakeReactor()).orchestrator.store
    assert isinstance(store, MemoryStore)
    assert (store.max_records, store.max_age) == (10, 60)


def test_none_turns_recording_off() -> None:
    """
    C{--store none}: the orchestrator has no store.
    """
    assert makeService(parse("--store", "none"), FakeReactor()).orchestrator.store is None


@pytest.mark.parametrize("url, dialect, target", [
    ("sqlite:/tmp/x.db", "sqlite", "/tmp/x.db"),
    ("sqlite:relative.db", "sqlite", "relative.db"),
    ("postgresql://u@h:5433/db", "postgresql", "postgresql://u@h:5433/db"),
    ("postgres://u@h/db", "postgresql", "postgres://u@h/db"),
])
def test_sql_urls(url: str, dialect: str, target: str) -> None:
    """
    C{sqlite:PATH} and C{postgresql://} build the SQL store with their
    dialect, retention from the options, and touch no database yet.
    """
    store = makeService(parse("--store", url, "--store-max-age", "5"),
                        FakeReactor()).orchestrator.store
    assert isinstance(store, SQLStore)
    assert (store.dialect.name, store.target, store.max_age) == (dialect, target, 5)
    assert store._pool is None


def test_password_not_in_logs() -> None:
    """
    The store's description for logs leaves out the password.
    """
    store = from_url("postgresql://u:secreto@h:5432/db", FakeReactor())
    assert isinstance(store, SQLStore)
    assert "secreto" not in store.describe() and "u@h:5432/db" in store.describe()


@pytest.mark.parametrize("argv", [
    ["--store", "mysql://x"],
    ["--store", "sqlite:"],
    ["--store", "memory:x"],
    ["--store", "postgresql:db"],
    ["--store-max-records", "0"],
    ["--store-max-age", "0"],
    ["--store-max-age", "inf"],
])
def test_bad_store_options(argv: List[str]) -> None:
    """
    A store URL or bound that makes no sense is a usage error.
    """
    with pytest.raises(usage.UsageError):
        parse(*argv)
