"""Text-to-SQL rows in the style of the Gemma guide's dataset (philschmid/gretel-synthetic-text-to-sql:
`sql_prompt`, `sql_context` with CREATE TABLE + INSERT statements, `sql`), and the guide's prompt. The check
that a query runs and returns the reference's rows is the evaluate stage's (tuneserve.sqlcheck).

The generator lets the demo, the tests and the benchmarks run offline with SQL that is known to execute.
"""

from __future__ import annotations

import random

SYSTEM_PROMPT = (
    "You are a text to SQL query translator. Users will ask you questions in English and you will "
    "generate a SQL query based on the provided SCHEMA."
)
USER_TEMPLATE = (
    "Given the <USER_QUERY> and the <SCHEMA>, generate the corresponding SQL command to retrieve the "
    "desired data, considering the query's syntax, semantics, and schema constraints.\n\n"
    "<SCHEMA>\n{sql_context}\n</SCHEMA>\n\n<USER_QUERY>\n{sql_prompt}\n</USER_QUERY>\n"
)

# table -> (singular, text columns, numeric columns, sample text values)
TABLES: dict[str, tuple[str, list[str], list[str], list[str]]] = {
    "employees": ("employee", ["name", "department"], ["salary", "age"], ["Sales", "Legal", "Finance"]),
    "products": ("product", ["name", "category"], ["price", "stock"], ["Toys", "Books", "Garden"]),
    "orders": ("order", ["customer", "status"], ["quantity", "total"], ["open", "closed", "late"]),
    "students": ("student", ["name", "major"], ["score", "age"], ["Physics", "History", "Art"]),
    "cities": ("city", ["name", "country"], ["population", "area"], ["Chile", "Kenya", "Norway"]),
    "books": ("book", ["title", "author"], ["year", "pages"], ["Austen", "Tolstoy", "Orwell"]),
    "vehicles": ("vehicle", ["model", "fuel"], ["weight", "speed"], ["diesel", "electric", "petrol"]),
    "hospitals": ("hospital", ["name", "region"], ["beds", "staff"], ["North", "South", "East"]),
    "farms": ("farm", ["owner", "crop"], ["acres", "yield"], ["wheat", "rice", "corn"]),
    "games": ("game", ["title", "genre"], ["rating", "players"], ["puzzle", "sports", "racing"]),
}


def _templates(t: str, singular: str, text: str, num: str, val: str, n: int) -> list[tuple[str, str]]:
    return [
        (f"How many {t} are there?", f"SELECT COUNT(*) FROM {t};"),
        (f"What is the average {num} of all {t}?", f"SELECT AVG({num}) FROM {t};"),
        (f"What is the highest {num} among the {t}?", f"SELECT MAX({num}) FROM {t};"),
        (f"What is the lowest {num} among the {t}?", f"SELECT MIN({num}) FROM {t};"),
        (f"What is the total {num} of all {t}?", f"SELECT SUM({num}) FROM {t};"),
        (f"List the {text} of {t} with {num} above {n}.", f"SELECT {text} FROM {t} WHERE {num} > {n};"),
        (f"List the {text} of {t} with {num} below {n}.", f"SELECT {text} FROM {t} WHERE {num} < {n};"),
        (f"Show the {text} of every {singular} ordered by {num}.", f"SELECT {text} FROM {t} ORDER BY {num};"),
        (f"How many {t} have {text} '{val}'?", f"SELECT COUNT(*) FROM {t} WHERE {text} = '{val}';"),
        (f"Show all {t} whose {text} is '{val}'.", f"SELECT * FROM {t} WHERE {text} = '{val}';"),
    ]


def _context(rng: random.Random, t: str, texts: list[str], nums: list[str], values: list[str]) -> str:
    cols = ", ".join(["id INT"] + [f"{c} TEXT" for c in texts] + [f"{c} INT" for c in nums])
    stmts = [f"CREATE TABLE {t} ({cols});"]
    for i in range(1, 4):
        row = [str(i)] + [f"'{rng.choice(values)}'" for _ in texts] + [str(rng.randrange(1, 100)) for _ in nums]
        stmts.append(f"INSERT INTO {t} VALUES ({', '.join(row)});")
    return " ".join(stmts)


def generate(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n rows with `sql_prompt`, `sql_context`, `sql`, `domain`; every `sql` runs on its `sql_context`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        t = rng.choice(sorted(TABLES))
        singular, texts, nums, values = TABLES[t]
        text, num, val, k = rng.choice(texts), rng.choice(nums), rng.choice(values), rng.randrange(10, 90)
        question, sql = rng.choice(_templates(t, singular, text, num, val, k))
        rows.append(
            {"sql_prompt": question, "sql_context": _context(rng, t, texts, nums, values), "sql": sql, "domain": t}
        )
    return rows


def corpus() -> list[str]:
    """Text covering the generator's vocabulary (for training a tokenizer)."""
    return [f"{r['sql_prompt']} {r['sql_context']} {r['sql']}" for r in generate(400, seed=12345)] + [
        SYSTEM_PROMPT,
        USER_TEMPLATE,
    ]
