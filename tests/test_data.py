"""Data shaping and loss masks, on real tokenizers built by the tests (no model needed)."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from pathlib import Path

import pytest

from devtools.tiny import build_tokenizer
from tests.helpers import CORPUS, QA, qa_messages, run_train, write_jsonl
from tuneserve import data, tokenizer
from tuneserve.config import load_train_config
from tuneserve.exitcodes import ConfigError, DataError

SQL_ROWS = [
    {
        "sql_prompt": "How many users are there?",
        "sql_context": "CREATE TABLE users (id INT, name TEXT);",
        "sql": "SELECT COUNT(*) FROM users;",
        "domain": "web",
    },
    {
        "sql_prompt": "List all names.",
        "sql_context": "CREATE TABLE users (id INT, name TEXT);",
        "sql": "SELECT name FROM users;",
        "domain": "web",
    },
]


def save_tokenizer(tmp_path: Path, template: str | None, **kw) -> Path:
    folder = tmp_path / f"tok-{template}"
    build_tokenizer(CORPUS, template=template, **kw).save_pretrained(folder)
    return folder


def setup(tmp_path, rows_or_path, template="chatml", **env):
    tok_dir = save_tokenizer(tmp_path, template)
    ds = rows_or_path if isinstance(rows_or_path, (str, Path)) else write_jsonl(tmp_path / "d.jsonl", rows_or_path)
    cfg = load_train_config({"BASE_MODEL": str(tok_dir), "DATASET": str(ds), **env})
    shaped = data.load_and_shape(cfg)
    info = tokenizer.prepare_tokenizer(cfg, needs_template=shaped.is_chat)
    return cfg, shaped, info


def trained_text(tok, ids, labels) -> str:
    return tok.decode([t for t, lbl in zip(ids, labels) if lbl != -100])


def masked_text(tok, ids, labels) -> str:
    return tok.decode([t for t, lbl in zip(ids, labels) if lbl == -100])


# ------------------------------------------------------------------------------------------- formats
def test_conversational_messages(tmp_path):
    cfg, shaped, info = setup(tmp_path, qa_messages())
    assert shaped.format == "conversational" and len(shaped.train) == len(QA)
    assert {ex.messages[-1]["content"] for ex in shaped.train} == {a for _, a in QA}


def test_sharegpt_conversations_are_converted(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in QA]
    cfg, shaped, info = setup(tmp_path, rows)
    assert shaped.format == "sharegpt"
    assert shaped.train[0].messages[0]["role"] == "user" and shaped.train[0].messages[1]["role"] == "assistant"


def test_plain_prompt_completion_from_parquet_masks_the_prompt(tmp_path):
    import pandas as pd

    path = tmp_path / "pc.parquet"
    pd.DataFrame({"prompt": [q + " " for q, _ in QA], "completion": [a for _, a in QA]}).to_parquet(path)
    cfg, shaped, info = setup(tmp_path, path)
    assert shaped.format == "prompt_completion" and not shaped.is_chat
    tok = info.tokenizer
    ex = next(e for e in shaped.train if e.completion == "Paris")
    [(ids, labels)], _ = data.encode(tok, ex)
    assert trained_text(tok, ids, labels) == "Paris" + tok.eos_token
    assert masked_text(tok, ids, labels) == "What is the capital of France? "


def test_conversational_prompt_completion_trains_only_the_completion(tmp_path):
    rows = [
        {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]} for q, a in QA
    ]
    cfg, shaped, info = setup(tmp_path, rows)
    assert shaped.format == "conversational_prompt_completion"
    ex = next(e for e in shaped.train if e.messages[-1]["content"] == "Ice")
    [(ids, labels)], _ = data.encode(info.tokenizer, ex)
    assert trained_text(info.tokenizer, ids, labels) == "Ice<|im_end|>\n"


def test_plain_text_from_csv_trains_every_token_and_ends_with_eos(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("body\n" + "".join(f'"{q} {a}"\n' for q, a in QA))
    cfg, shaped, info = setup(tmp_path, path, TEXT_FIELD="body")
    assert shaped.format == "text"
    [(ids, labels)], _ = data.encode(info.tokenizer, shaped.train[0])
    assert ids == labels and ids[-1] == info.tokenizer.eos_token_id


def test_text_to_sql_column_recipe_builds_the_guides_conversations(tmp_path):
    system = "You are a text to SQL query translator."
    user = (
        "Given the <SCHEMA>, answer the <USER_QUERY>.\n<SCHEMA>\n{sql_context}\n</SCHEMA>\n"
        "<USER_QUERY>\n{sql_prompt}\n</USER_QUERY>"
    )
    cfg, shaped, info = setup(
        tmp_path, SQL_ROWS, template="gemma", SYSTEM_PROMPT=system, USER_TEMPLATE=user, ASSISTANT_FIELD="sql"
    )
    assert shaped.format == "columns"
    ex = next(e for e in shaped.train if e.messages[-1]["content"] == "SELECT name FROM users;")
    assert ex.messages[0] == {"role": "system", "content": system}
    assert ex.messages[1]["content"] == user.format(**SQL_ROWS[1])
    [(ids, labels)], _ = data.encode(info.tokenizer, ex)
    # Gemma folds the system prompt into the user turn; only the model turn and <end_of_turn> are trained.
    assert trained_text(info.tokenizer, ids, labels) == "SELECT name FROM users;<end_of_turn>\n"
    assert info.end_of_turn == "<end_of_turn>"


# ------------------------------------------------------------------------------------------- loss masks
@pytest.mark.parametrize(
    "template,eot,prompt_turns",
    [("chatml", "<|im_end|>", 3), ("llama3", "<|eot_id|>", 3), ("gemma", "<end_of_turn>", 2)],
)  # gemma folds the system turn
def test_loss_mask_trains_answer_and_end_of_turn_not_prompt(tmp_path, template, eot, prompt_turns):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Who wrote Hamlet?"},
                {"role": "assistant", "content": "Shakespeare"},
                {"role": "user", "content": "Frozen water?"},
                {"role": "assistant", "content": "Ice"},
            ]
        }
    ]
    cfg, shaped, info = setup(tmp_path, rows, template=template)
    tok = info.tokenizer
    assert info.end_of_turn == eot and eot != tok.eos_token
    [(ids, labels)], _ = data.encode(tok, shaped.train[0])
    trained = trained_text(tok, ids, labels)
    assert trained.count(eot) == 2  # both assistant turns end with a trained end-of-turn token
    assert "Shakespeare" in trained and "Ice" in trained
    for prompt_text in ("Be brief.", "Who wrote Hamlet?", "Frozen water?"):
        assert prompt_text not in trained and prompt_text in masked_text(tok, ids, labels)
    eot_id = tok.convert_tokens_to_ids(eot)
    assert [lbl for t, lbl in zip(ids, labels) if t == eot_id].count(-100) == prompt_turns


def test_assistant_only_loss_false_trains_everything(tmp_path):
    cfg, shaped, info = setup(tmp_path, qa_messages(), ASSISTANT_ONLY_LOSS="false")
    [(ids, labels)], _ = data.encode(info.tokenizer, shaped.train[0])
    assert ids == labels


def test_end_of_turn_survives_collation_when_pad_equals_eos_equals_end_of_turn(tmp_path):
    """trl#1623: with pad == eos, masking pads by token id also masks the eos that ends each answer."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}"
        "{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    cfg, shaped, info = setup(tmp_path, qa_messages(), CHAT_TEMPLATE=template)
    tok = info.tokenizer
    assert info.end_of_turn == tok.eos_token == tok.pad_token
    rows = [dict(zip(("input_ids", "labels"), data.encode(tok, ex)[0][0])) for ex in shaped.train[:3]]
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(rows)
    for i, row in enumerate(rows):
        real_eos = [p for p, t in enumerate(row["input_ids"]) if t == tok.eos_token_id]
        assert real_eos and all(batch["labels"][i, p] == tok.eos_token_id for p in real_eos)
        assert (batch["labels"][i, len(row["input_ids"]) :] == -100).all()  # padding itself is masked


def test_template_that_never_closes_the_assistant_turn_is_rejected(tmp_path):
    template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(ConfigError, match="does not close the assistant turn with a special token"):
        setup(tmp_path, qa_messages(), CHAT_TEMPLATE=template)


def test_base_tokenizer_gets_template_tokens_added(tmp_path):
    cfg, shaped, info = setup(tmp_path, qa_messages(), template=None, CHAT_TEMPLATE="chatml")
    tok = info.tokenizer
    assert info.added_tokens == ["<|im_start|>", "<|im_end|>"]
    assert info.added_token_ids == [len(tok) - 2, len(tok) - 1]
    assert info.end_of_turn == "<|im_end|>"
    [(ids, labels)], _ = data.encode(tok, shaped.train[0])
    assert tok.convert_tokens_to_ids("<|im_end|>") in [t for t, lbl in zip(ids, labels) if lbl != -100]


def test_conversations_without_template_need_chat_template(tmp_path):
    with pytest.raises(ConfigError, match="has no chat template; set CHAT_TEMPLATE"):
        setup(tmp_path, qa_messages(), template=None)


# ------------------------------------------------------------------------------------------- data errors
def test_missing_columns_are_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"lacks column\(s\) sql_context"):
        setup(
            tmp_path,
            [{"sql_prompt": "q", "sql": "s"}],
            USER_TEMPLATE="{sql_context} {sql_prompt}",
            ASSISTANT_FIELD="sql",
        )
    with pytest.raises(DataError, match="cannot tell its format from its columns"):
        setup(tmp_path, [{"question": "q", "answer": "a"}])


def test_wrong_types_name_the_rows(tmp_path):
    rows = qa_messages() + [
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": [{"role": "wizard", "content": "hi"}]},
    ]
    with pytest.raises(DataError) as err:
        setup(tmp_path, rows)
    assert "2 row(s) have the wrong shape" in err.value.message
    # Each row is named by its file and 1-based line, as an editor shows it.
    assert "d.jsonl:9: messages[0]: content must be a string or a list of text parts, got int" in err.value.message
    assert "d.jsonl:10: messages[0]: role 'wizard' is not one of" in err.value.message


def test_empty_dataset_is_a_data_error(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("text\n")
    with pytest.raises(DataError, match="empty.csv: the file has no rows"):
        setup(tmp_path, path)


def test_overlong_rows_fail_past_the_threshold_and_are_named(tmp_path):
    rows = qa_messages() + [
        {"messages": [{"role": "user", "content": "long " * 200}, {"role": "assistant", "content": "x"}]}
    ]
    cfg, shaped, info = setup(tmp_path, rows, MAX_SEQ_LENGTH="64")
    with pytest.raises(DataError) as err:
        data.tokenize(cfg, info, shaped, None)
    assert "1 of 9 rows (11.1%) are longer than MAX_SEQ_LENGTH=64: " in err.value.message
    assert "d.jsonl:9 (" in err.value.message
    cfg, shaped, info = setup(tmp_path, rows, MAX_SEQ_LENGTH="64", MAX_OVERLONG_FRACTION="0.2")
    prepared = data.tokenize(cfg, info, shaped, None)
    assert prepared.stats["dropped_overlong_rows"] == [8] and len(prepared.train) == 8


def test_rows_without_loss_tokens_are_a_data_error(tmp_path):
    rows = qa_messages() + [{"messages": [{"role": "user", "content": "only a question"}]}]
    cfg, shaped, info = setup(tmp_path, rows)
    with pytest.raises(DataError, match="1 row\\(s\\) have no tokens to learn from (.|\n)*d.jsonl:9$"):
        data.tokenize(cfg, info, shaped, None)


# ------------------------------------------------------------------------------------------- splits
def test_eval_size_holds_out_rows_and_max_samples_caps_training(tmp_path):
    rows = qa_messages() * 5  # 40 rows
    cfg, shaped, info = setup(tmp_path, rows, EVAL_SIZE="10", MAX_SAMPLES="12", SEED="3")
    assert len(shaped.eval) == 10 and len(shaped.train) == 12
    assert not {e.row for e in shaped.eval} & {e.row for e in shaped.train}
    prepared = data.tokenize(cfg, info, shaped, tmp_path / "out")
    written = [json.loads(line) for line in (tmp_path / "out" / "eval.jsonl").read_text().splitlines()]
    assert [w["row"] for w in written] == [e.row for e in shaped.eval]
    assert prepared.eval is not None and len(prepared.eval) == 10


def test_directory_dataset_with_named_splits(tmp_path):
    folder = tmp_path / "ds"
    write_jsonl(folder / "train.jsonl", qa_messages())
    write_jsonl(folder / "test.jsonl", qa_messages()[:3])
    cfg, shaped, info = setup(tmp_path, folder, EVAL_SPLIT="test")
    assert len(shaped.train) == 8 and len(shaped.eval) == 3
    with pytest.raises(DataError, match="has no split 'validation'; it has: train, test"):
        setup(tmp_path, folder, EVAL_SPLIT="validation")


def test_sql_schema_comes_from_the_column_or_the_prompts_schema_block():
    from tuneserve.data import Example
    from tuneserve.evaluate import clean_sql, sql_context

    with_column = Example(
        0, "chat", messages=[{"role": "user", "content": "q"}], source={"ctx": "CREATE TABLE a (x INT);"}
    )
    assert sql_context(with_column, "ctx") == "CREATE TABLE a (x INT);"
    in_prompt = Example(
        1, "chat", messages=[{"role": "user", "content": "<SCHEMA>\nCREATE TABLE b (y INT);\n</SCHEMA>\nq"}]
    )
    assert sql_context(in_prompt, "ctx") == "CREATE TABLE b (y INT);"
    assert sql_context(Example(2, "chat", messages=[{"role": "user", "content": "q"}]), "ctx") is None
    assert clean_sql("```sql\nSELECT 1;\n```") == "SELECT 1;" and clean_sql(" SELECT 2; ") == "SELECT 2;"


def test_execution_match_compares_rows_not_text():
    from devtools.textsql import generate
    from tuneserve.sqlcheck import execution_match

    ctx = "CREATE TABLE t (a INT, b TEXT); INSERT INTO t VALUES (2, 'x'); INSERT INTO t VALUES (1, 'y');"
    assert execution_match("SELECT b FROM t", "SELECT b FROM t;", ctx).matches
    assert execution_match("SELECT b FROM t ORDER BY b DESC", "SELECT b FROM t;", ctx).matches  # unordered reference
    assert not execution_match("SELECT b FROM t ORDER BY b DESC", "SELECT b FROM t ORDER BY b;", ctx).matches
    bad = execution_match("SELEC b FROM t", "SELECT b FROM t;", ctx)
    assert not bad.runs and "syntax error" in bad.error
    assert all(execution_match(r["sql"], r["sql"], r["sql_context"]).matches for r in generate(200, seed=3))


def test_packing_keeps_every_loss_mask(tmp_path):
    """PACKING=true hands a micro-batch of our rows to TRL's padding-free collator, which flattens them into one
    sequence; the labels (and so the trained end-of-turn tokens) must survive it unchanged, row by row."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    cfg, shaped, info = setup(tmp_path, qa_messages() * 4, PACKING="true")
    prepared = data.tokenize(cfg, info, shaped, None)
    rows = [prepared.train[i] for i in range(len(prepared.train))]
    batch = DataCollatorForLanguageModeling(pad_token_id=info.tokenizer.pad_token_id, padding_free=True)(rows)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # one flattened sequence
    assert batch["labels"][0].tolist() == [t for row in rows for t in row["labels"]]
    eot = info.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert batch["labels"][0].tolist().count(eot) == len(rows)  # one trained end-of-turn per conversation


# ------------------------------------------------------------------------------------------- broken files
GOOD_ROW = (
    json.dumps(
        {"messages": [{"role": "user", "content": "What do bees make?"}, {"role": "assistant", "content": "Honey"}]}
    ).encode()
    + b"\n"
)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("utf8.jsonl", GOOD_ROW + b'{"text": "caf\xe9"}\n', "utf8.jsonl:2: not valid UTF-8 (byte 14 of the line"),
        ("empty.jsonl", b"", "empty.jsonl: the file has no rows"),
        ("blank.jsonl", b"\n  \n", "blank.jsonl: the file has no rows"),
        ("malformed.jsonl", GOOD_ROW + b"{not json\n", "malformed.jsonl:2: not valid JSON (Expecting property name"),
        (
            "list.jsonl",
            b"[1, 2]\n",
            "list.jsonl:1: a row must be a JSON object with the dataset's columns, not a JSON list",
        ),
        (
            "types.jsonl",
            b'{"messages": [{"role": "user", "content": 5}]}\n',
            "types.jsonl:1: messages[0]: content must be a string",
        ),
        ("malformed.jsonl.gz", gzip.compress(GOOD_ROW + b"{not json\n"), "malformed.jsonl.gz:2: not valid JSON"),
        ("malformed.jsonl.bz2", bz2.compress(GOOD_ROW * 2 + b"[}\n"), "malformed.jsonl.bz2:3: not valid JSON"),
        ("lines.json", GOOD_ROW + b"\n" + b'{"messages": [}\n', "lines.json:3: not valid JSON"),
        ("array.json", b"[\n" + GOOD_ROW.strip() + b',\n{"messages": ]\n]\n', "array.json:3: not valid JSON"),
        ("scalars.json", b"[\n" + GOOD_ROW.strip() + b",\n7\n]\n", "scalars.json row 2: a row must be a JSON object"),
        ("array.json.xz", lzma.compress(b"[" + GOOD_ROW.strip() + b",\n{]"), "array.json.xz:2: not valid JSON"),
        (
            "huge.jsonl",
            b'{"text": "' + b"a" * (1 << 20) + b'"}\n',
            "huge.jsonl:1: the line is longer than 1048576 bytes",
        ),
        ("utf8.csv", b"prompt,completion\nx,\xff\n", "utf8.csv:2: not valid UTF-8"),
        ("header.csv", b"prompt,completion\n", "header.csv: the file has no rows"),
        ("long.jsonl", GOOD_ROW * 3, "3 of 3 rows (100.0%) are longer than MAX_SEQ_LENGTH=8"),
    ],
)
def test_broken_dataset_files_are_data_errors_naming_file_line_and_cause(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        cfg, shaped, info = setup(tmp_path, path, MAX_SEQ_LENGTH="8")
        data.tokenize(cfg, info, shaped, None)
    assert message in str(err.value)


def test_a_broken_file_exits_3_without_a_traceback(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(b"\xff\n")
    res = run_train(
        {
            "BASE_MODEL": str(save_tokenizer(tmp_path, "chatml")),
            "DATASET": str(tmp_path / "d.jsonl"),
            "OUTPUT_DIR": str(tmp_path / "out"),
        },
        "--check",
        cwd=tmp_path,
    )
    assert res.returncode == 3 and "d.jsonl:1: not valid UTF-8" in res.stderr and "Traceback" not in res.stderr


# ------------------------------------------------------------------------------------------- where a bad row is
def shards(folder: Path, *rows_per_shard: list[bytes]) -> Path:
    """A Hub-style dataset folder: data/train-0000i-of-0000n.jsonl.gz, one per list of lines."""
    (folder / "data").mkdir(parents=True)
    for i, lines in enumerate(rows_per_shard):
        name = f"train-{i:05d}-of-{len(rows_per_shard):05d}.jsonl.gz"
        (folder / "data" / name).write_bytes(gzip.compress(b"".join(lines)))
    return folder


def test_rows_of_nested_compressed_shards_are_named_by_file_and_line(tmp_path):
    good = [json.dumps(r).encode() + b"\n" for r in qa_messages()]
    wizard = json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode() + b"\n"
    folder = shards(tmp_path / "ds", good[:4], good[4:6] + [b"\n", wizard] + good[6:])
    with pytest.raises(DataError) as err:
        setup(tmp_path, folder)
    assert "data/train-00001-of-00002.jsonl.gz:4: messages[0]: role 'wizard'" in str(err.value)


def test_rows_without_a_line_are_named_by_split_and_1_based_row(tmp_path):
    import pandas as pd

    path = tmp_path / "d.parquet"
    rows = [{"prompt": q, "completion": a} for q, a in QA]
    rows[3]["completion"] = None
    pd.DataFrame(rows).to_parquet(path)
    with pytest.raises(DataError) as err:
        setup(tmp_path, path)
    assert f"DATASET={str(path)!r} split 'train' row 4: prompt and completion must be strings" in str(err.value)


def test_a_null_column_in_user_template_is_a_data_error_not_the_text_none(tmp_path):
    rows = [dict(r) for r in SQL_ROWS] + [{**SQL_ROWS[0], "sql_context": None}]
    with pytest.raises(DataError) as err:
        setup(tmp_path, rows, USER_TEMPLATE="{sql_context} {sql_prompt}", ASSISTANT_FIELD="sql")
    assert "d.jsonl:3: column(s) sql_context used by USER_TEMPLATE are null" in str(err.value)


def test_an_assistant_turn_that_opens_the_conversation_is_context(tmp_path):
    """No prompt serving could send precedes it, so it is not trained; the turns after it are. A row with no other
    assistant turn has nothing to learn: a data error naming it."""
    opener = {"role": "assistant", "content": "Hello, ask me anything."}
    rows = [{"messages": [opener, *r["messages"]]} for r in qa_messages()]
    cfg, shaped, info = setup(tmp_path, rows)
    ex = shaped.train[0]
    assert ex.trained_turns == [2]
    [(ids, labels)], _ = data.encode(info.tokenizer, ex)
    assert "Hello" not in trained_text(info.tokenizer, ids, labels)
    assert trained_text(info.tokenizer, ids, labels) == ex.messages[2]["content"] + "<|im_end|>\n"
    with pytest.raises(DataError) as err:
        cfg, shaped, info = setup(tmp_path, qa_messages() + [{"messages": [opener]}])
        data.tokenize(cfg, info, shaped, None)
    assert "have no tokens to learn from" in str(err.value) and "d.jsonl:9" in str(err.value)


def _raising_template_case(tmp_path: Path) -> dict:
    from tests.test_tools import family_tokenizer, tool_rows

    rows = tool_rows(True)
    call = rows[0]["messages"][1]["tool_calls"][0]
    rows[0]["messages"][1]["tool_calls"] = [call, {**call, "id": "call_2"}]
    return {
        "BASE_MODEL": str(family_tokenizer(tmp_path / "llama", "llama3.2")),
        "DATASET": str(write_jsonl(tmp_path / "tools.jsonl", rows)),
        "MAX_SEQ_LENGTH": "2048",
    }


def _file_case(name: str, content: bytes, **env):
    def make(tmp_path: Path) -> dict:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
        return {"DATASET": str(tmp_path / (name.split("/")[0] if "/" in name else name)), **env}

    return make


BAD_ROW_CASES = {
    "raising template": (
        _raising_template_case,
        "tools.jsonl:1: the chat template refuses it: This model only supports single tool-calls at once!",
    ),
    "null template column": (
        _file_case(
            "sql.jsonl",
            b"".join(json.dumps(r).encode() + b"\n" for r in SQL_ROWS + [{**SQL_ROWS[0], "sql_prompt": None}]),
            USER_TEMPLATE="{sql_prompt}",
            ASSISTANT_FIELD="sql",
        ),
        "sql.jsonl:3: column(s) sql_prompt used by USER_TEMPLATE are null",
    ),
    "assistant-only row": (
        _file_case("a.jsonl", GOOD_ROW + b'{"messages": [{"role": "assistant", "content": "Hi"}]}\n'),
        "have no tokens to learn from",
    ),
    "malformed nested": (
        _file_case("ds/data/train-00000-of-00001.jsonl", GOOD_ROW + b"{oops\n"),
        "data/train-00000-of-00001.jsonl:2: not valid JSON",
    ),
    "malformed compressed": (
        _file_case("c.jsonl.gz", gzip.compress(GOOD_ROW * 3 + b'{"messages": [}\n')),
        "c.jsonl.gz:4: not valid JSON",
    ),
    "malformed .json": (_file_case("j.json", b"[\n" + GOOD_ROW.strip() + b",\n{]\n"), "j.json:3: not valid JSON"),
}


@pytest.mark.parametrize("case", list(BAD_ROW_CASES))
def test_bad_rows_exit_3_naming_the_file_and_line(tmp_path, case):
    make, message = BAD_ROW_CASES[case]
    env = {"BASE_MODEL": str(save_tokenizer(tmp_path, "chatml")), "OUTPUT_DIR": str(tmp_path / "out")}
    env |= make(tmp_path)
    res = run_train(env, "--check", cwd=tmp_path)
    assert res.returncode == 3, res.stderr[-2000:]
    assert message in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
