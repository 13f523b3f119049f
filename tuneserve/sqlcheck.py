"""The evaluate stage's SQL check: does a generated query run on sqlite against the row's schema (its
`sql_context`: CREATE TABLE + INSERT statements), and does it return the reference query's rows?"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass


@dataclass
class ExecutionResult:
    runs: bool  # the generated query executes on the schema
    matches: bool  # ... and returns the reference query's rows
    error: str | None = None


_MAX_STEPS = 1_000_000


def _run(conn: sqlite3.Connection, sql: str):
    cur = conn.execute(sql)
    return cur.fetchmany(10_000)


def execution_match(predicted: str, reference: str, context: str) -> ExecutionResult:
    """Run both queries on a fresh in-memory sqlite database built from `context`. Rows are compared as
    multisets unless the reference orders them (ORDER BY)."""
    predicted = predicted.strip()
    conn = sqlite3.connect(":memory:")
    steps = {"n": 0}

    def budget() -> int:  # abort runaway queries (sqlite calls this every 1000 VM instructions)
        steps["n"] += 1
        return 1 if steps["n"] > _MAX_STEPS // 1000 else 0

    conn.set_progress_handler(budget, 1000)
    try:
        conn.executescript(context)
        expected = _run(conn, reference)
        try:
            got = _run(conn, predicted)
        except sqlite3.Error as exc:
            return ExecutionResult(False, False, str(exc))
        ordered = re.search(r"\border\s+by\b", reference, re.I) is not None
        same = got == expected if ordered else sorted(map(repr, got)) == sorted(map(repr, expected))
        return ExecutionResult(True, same)
    finally:
        conn.close()
