"""
A PostgreSQL database of its own for a test run: the machine's server on
127.0.0.1:5432 (trust authentication, user C{postgres}), a uniquely named
database created for the run and dropped afterwards.

PostgreSQL missing is a failure, never a skip: CI starts it (C{.ci/run}).
Set C{PFO3_TEST_PG} to another server's URL (without the database) to use it.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Iterator

import pytest

SERVER = os.environ.get("PFO3_TEST_PG", "postgresql://postgres@127.0.0.1:5432")


def admin(sql: str, *params: Any) -> Any:
    """
    Run one statement on the server's C{postgres} database, outside a
    transaction (C{CREATE DATABASE} needs that).
    """
    import psycopg

    with psycopg.connect(f"{SERVER}/postgres", autocommit=True, connect_timeout=5) as conn:
        cur = conn.execute(sql, params or None)
        return cur.fetchall() if cur.description else None


class Database:
    """
    A database created for this test run.

    @ivar name: Its name.
    @ivar url: The URL that C{--store} takes.
    """

    def __init__(self) -> None:
        self.name = f"pfo3_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self.url = f"{SERVER}/{self.name}"

    def create(self) -> None:
        admin(f'CREATE DATABASE "{self.name}"')

    def drop(self) -> None:
        admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def query(self, sql: str, *params: Any) -> Any:
        import psycopg

        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            cur = conn.execute(sql, params or None)
            return cur.fetchall() if cur.description else None

    def refuse_connections(self) -> None:
        """
        Make the database unreachable: no new connections, existing ones
        ended.  L{accept_connections} undoes it.
        """
        admin(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS false')
        admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
              self.name)

    def accept_connections(self) -> None:
        admin(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true')


@pytest.fixture
def pg_database() -> Iterator[Database]:
    """
    A fresh PostgreSQL database, dropped after the test.
    """
    db = Database()
    db.create()
    try:
        yield db
    finally:
        try:
            db.accept_connections()
        finally:
            db.drop()
