"""The evaluation stage (tuneserve.evaluate, tuneserve.sqlcheck): held-out rows answered by the merged model and
scored, SQL answers by running them on SQLite."""

from __future__ import annotations

import json

import pytest

from tests.helpers import CORPUS, LEARN_ENV, run_train, write_jsonl

pytestmark = pytest.mark.slow

SQL_PAIRS = [
    ("How many users are there?", "SELECT COUNT(*) FROM users;"),
    ("List all user names.", "SELECT name FROM users;"),
    ("What is the oldest age?", "SELECT MAX(age) FROM users;"),
    ("What is the youngest age?", "SELECT MIN(age) FROM users;"),
    ("What is the average age?", "SELECT AVG(age) FROM users;"),
    ("Who is older than 30?", "SELECT name FROM users WHERE age > 30;"),
    ("Show users by age.", "SELECT name FROM users ORDER BY age;"),
    ("What is the total age?", "SELECT SUM(age) FROM users;"),
]
SQL_CONTEXT = (
    "CREATE TABLE users (id INT, name TEXT, age INT); INSERT INTO users VALUES (1, 'Ann', 34); "
    "INSERT INTO users VALUES (2, 'Bob', 25);"
)


def test_evaluation_scores_sql_by_execution_on_sqlite(tmp_path):
    """The text-to-SQL recipe end to end: column rows -> conversations, training, merge, verify, and an evaluation
    that runs the generated SQL. A reference written differently from the learned answer (COUNT(id) vs COUNT(*))
    is no exact match but returns the same rows: execution match counts it."""
    from devtools.tiny import build_tiny_model
    from tuneserve import sqlcheck

    base = build_tiny_model(
        tmp_path / "base", CORPUS + [q + " " + s for q, s in SQL_PAIRS] * 10 + [SQL_CONTEXT], template="chatml"
    )
    rows = [{"question": q, "context": SQL_CONTEXT, "query": s} for q, s in SQL_PAIRS]
    data = tmp_path / "sql"
    write_jsonl(data / "train.jsonl", rows)
    held = [dict(rows[0], query="SELECT COUNT(id) FROM users;")] + rows[1:4] + [dict(rows[4], query="SELECT 1;")]
    write_jsonl(data / "test.jsonl", held)
    out = tmp_path / "out"
    res = run_train(
        {
            "BASE_MODEL": str(base),
            "DATASET": str(data),
            "EVAL_SPLIT": "test",
            "OUTPUT_DIR": str(out),
            "USER_TEMPLATE": "{question}",
            "ASSISTANT_FIELD": "query",
            "EVAL_SQL_EXECUTION": "true",
            "EVAL_SQL_CONTEXT_FIELD": "context",
            **LEARN_ENV,
        },
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())
    assert [a["answer"] for a in report["answers"]] == [s for _, s in SQL_PAIRS[:5]]
    assert [a["exact_match"] for a in report["answers"]] == [False, True, True, True, False]
    assert [a["sql_matches"] for a in report["answers"]] == [True, True, True, True, False]
    assert report["exact_match"] == 0.6 and report["sql_execution_match"] == 0.8 and report["sql_executes"] == 1.0
    assert report["eval_loss"] is not None and report["rows"] == 5
    summary = json.loads((out / "verify.json").read_text())["eval"]
    assert summary["sql_execution_match"] == 0.8 and "answers" not in summary
    card = (out / "merged" / "README.md").read_text()
    assert "| SQL execution match | 0.8 |" in card
    assert sqlcheck.execution_match("SELECT name FROM users;", "SELECT name FROM users;", SQL_CONTEXT).matches
