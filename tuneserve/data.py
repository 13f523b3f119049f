"""Stage: dataset loading, shaping and tokenization.

Formats are detected from the columns: conversational `messages` (or ShareGPT `conversations`),
`prompt`/`completion` (plain strings or message lists), plain text (TEXT_FIELD), or any columns turned
into conversations by USER_TEMPLATE/ASSISTANT_FIELD/SYSTEM_PROMPT (the text-to-SQL guide's recipe).

Rows are tokenized here rather than by SFTTrainer: the loss mask of a conversation is computed by
rendering it with the chat template turn by turn (the text each assistant turn adds, its end-of-turn
token included, is trained), which works for any prefix-preserving template, with or without
`{% generation %}` markers (TRL's `assistant_only_loss` needs those markers or one of its bundled
training templates). It also gives the exact token length of every row, so overlong rows are named
before any compute. SFTTrainer receives `input_ids` + `labels` and uses them as they are.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneserve.config import DATA_EXTENSIONS, looks_local, template_fields
from tuneserve.exitcodes import ConfigError, DataError
from tuneserve.settings import Settings
from tuneserve.tokenizer import render

log = logging.getLogger(__name__)

ROW = "__row__"  # original row number, kept through shuffling so errors name the user's rows
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool"}
MAX_LISTED = 20


@dataclass
class Example:
    row: int
    kind: str  # "chat" | "pc" (plain prompt/completion) | "text"
    messages: list[dict] | None = None
    trained_turns: list[int] | None = None  # indexes of messages in the loss; None: every token
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None
    source: dict | None = None  # the original columns of a column-recipe row (e.g. sql_context for evaluation)

    def to_json(self) -> dict[str, Any]:
        if self.kind == "chat":
            out = {"row": self.row, "messages": self.messages, "trained_turns": self.trained_turns}
            return out | ({"source": self.source} if self.source is not None else {})
        if self.kind == "pc":
            return {"row": self.row, "prompt": self.prompt, "completion": self.completion}
        return {"row": self.row, "text": self.text}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Example:
        if "messages" in d:
            return cls(d["row"], "chat", messages=d["messages"], trained_turns=d.get("trained_turns"),
                       source=d.get("source"))
        if "prompt" in d:
            return cls(d["row"], "pc", prompt=d["prompt"], completion=d["completion"])
        return cls(d["row"], "text", text=d["text"])


def read_jsonl(path: Path) -> list[Example]:
    return [Example.from_json(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class PreparedData:
    format: str
    train: Any  # datasets.Dataset with input_ids, labels
    eval: Any | None
    train_examples: list[Example]
    eval_examples: list[Example]
    stats: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- loading
def _load_split(cfg: Settings, split: str):
    import datasets

    ref = cfg.dataset
    try:
        if looks_local(ref):
            path = Path(ref).expanduser()
            if path.is_file():
                builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}[
                    next(e for e in DATA_EXTENSIONS if ref.endswith(e))]
                if split != "train":
                    raise ConfigError(f"DATASET={ref!r} is a single file, which has only the 'train' split; "
                                      f"{split!r} was asked for (DATASET_SPLIT/EVAL_SPLIT). Use a directory with "
                                      "<split>.jsonl files, or EVAL_SIZE")
                return datasets.load_dataset(builder, data_files=str(path), split="train")
            dd = datasets.load_dataset(str(path))
        else:
            dd = datasets.load_dataset(ref, cfg.dataset_config)
    except (ConfigError, DataError):
        raise
    except Exception as exc:  # datasets raises many types (DatasetGenerationError, ArrowInvalid, ...)
        if "corresponds to no data" in str(exc):
            raise DataError(f"DATASET={ref!r} split {split!r} is empty") from None
        raise DataError(f"DATASET={ref!r}: cannot be loaded: {type(exc).__name__}: {str(exc).splitlines()[0]}") \
            from None
    if split not in dd:
        raise DataError(f"DATASET={ref!r} has no split {split!r}; it has: {', '.join(dd)}")
    return dd[split]


def load_raw(cfg: Settings):
    """(train, eval) datasets.Dataset, each with the original row number in column __row__."""
    train = _load_split(cfg, cfg.dataset_split)
    if len(train) == 0:
        raise DataError(f"DATASET={cfg.dataset!r} split {cfg.dataset_split!r} is empty")
    train = train.add_column(ROW, list(range(len(train))))
    evalset = None
    if cfg.eval_split:
        evalset = _load_split(cfg, cfg.eval_split)
        evalset = evalset.add_column(ROW, list(range(len(evalset))))
    elif cfg.eval_size:
        size = cfg.eval_size
        if isinstance(size, int) and size >= len(train):
            raise DataError(f"EVAL_SIZE={size} leaves no training rows: the split has only {len(train)}")
        parts = train.train_test_split(test_size=size, seed=cfg.seed, shuffle=True)
        train, evalset = parts["train"], parts["test"]
    train = train.shuffle(seed=cfg.seed)
    if cfg.max_samples and cfg.max_samples < len(train):
        train = train.select(range(cfg.max_samples))
    return train, evalset


# ---------------------------------------------------------------------------------------------- shaping
def detect_format(cfg: Settings, columns: list[str], first: dict) -> str:
    if cfg.user_template is not None:
        return "columns"
    if "messages" in columns:
        return "conversational"
    if "conversations" in columns:
        return "sharegpt"
    if "prompt" in columns and "completion" in columns:
        return "conversational_prompt_completion" if isinstance(first["prompt"], list) else "prompt_completion"
    if cfg.text_field in columns:
        return "text"
    raise DataError(
        f"DATASET={cfg.dataset!r}: cannot tell its format from its columns {columns}. Expected one of: "
        f"'messages' (conversations), 'prompt' + 'completion', a text column (TEXT_FIELD={cfg.text_field!r}), "
        "or set USER_TEMPLATE/ASSISTANT_FIELD to build conversations from columns")


def _check_messages(value: Any, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: expected a non-empty list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}[{i}]: expected {{'role': ..., 'content': ...}}, got {m!r:.80}")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}[{i}]: role {m['role']!r} is not one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"{where}[{i}]: content must be a string, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def shape_row(cfg: Settings, fmt: str, row: dict) -> Example:
    idx = row[ROW]
    if fmt == "columns":
        try:
            user = cfg.user_template.format(**{k: v for k, v in row.items() if k != ROW})
        except KeyError as exc:
            raise ValueError(f"USER_TEMPLATE uses {{{exc.args[0]}}}, which is not a column") from None
        answer = row.get(cfg.assistant_field)
        if not isinstance(answer, str):
            raise ValueError(f"ASSISTANT_FIELD {cfg.assistant_field!r} must be a string, got {type(answer).__name__}")
        messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        trained = [len(messages) - 1] if cfg.assistant_only_loss else None
        source = {k: v for k, v in row.items() if k != ROW and isinstance(v, (str, int, float, bool))}
        return Example(idx, "chat", messages=messages, trained_turns=trained, source=source)
    if fmt in ("conversational", "sharegpt"):
        raw = row["messages"] if fmt == "conversational" else [
            {"role": SHAREGPT_ROLES.get(m.get("from"), m.get("from")), "content": m.get("value")}
            for m in (row["conversations"] or []) if isinstance(m, dict)]
        messages = _check_messages(raw, "messages")
        if cfg.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": cfg.system_prompt})
        trained = [i for i, m in enumerate(messages) if m["role"] == "assistant"] if cfg.assistant_only_loss \
            else None
        return Example(idx, "chat", messages=messages, trained_turns=trained)
    if fmt == "conversational_prompt_completion":
        prompt = _check_messages(row["prompt"], "prompt")
        completion = _check_messages(row["completion"], "completion")
        messages = prompt + completion
        trained = list(range(len(prompt), len(messages))) if cfg.completion_only_loss else None
        return Example(idx, "chat", messages=messages, trained_turns=trained)
    if fmt == "prompt_completion":
        p, c = row["prompt"], row["completion"]
        if not isinstance(p, str) or not isinstance(c, str):
            raise ValueError(f"prompt and completion must be strings, got {type(p).__name__}/{type(c).__name__}")
        return Example(idx, "pc", prompt=p, completion=c)
    text = row[cfg.text_field]
    if not isinstance(text, str):
        raise ValueError(f"{cfg.text_field!r} must be a string, got {type(text).__name__}")
    return Example(idx, "text", text=text)


def shape(cfg: Settings, fmt: str, ds, split: str) -> list[Example]:
    if fmt == "columns":
        missing = [c for c in template_fields(cfg.user_template) + [cfg.assistant_field] if c not in ds.column_names]
        if missing:
            raise DataError(f"DATASET={cfg.dataset!r} ({split}) lacks column(s) {', '.join(missing)} used by "
                            f"USER_TEMPLATE/ASSISTANT_FIELD; it has: {', '.join(c for c in ds.column_names if c != ROW)}")
    examples, errors = [], []
    for row in ds:
        try:
            examples.append(shape_row(cfg, fmt, row))
        except ValueError as exc:
            errors.append(f"row {row[ROW]}: {exc}")
    if errors:
        listed = "\n  ".join(errors[:MAX_LISTED])
        more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
        raise DataError(f"DATASET={cfg.dataset!r} ({split}): {len(errors)} row(s) have the wrong shape for the "
                        f"{fmt} format:\n  {listed}{more}")
    return examples


# ---------------------------------------------------------------------------------------------- encoding
def encode_chat(tok, messages: list[dict], trained_turns: list[int] | None) -> tuple[list[int], list[int]]:
    """input_ids and labels of a conversation; labels are -100 outside the trained turns."""
    full = render(tok, messages)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if trained_turns is None:
        return ids, list(ids)
    spans = []
    for i in trained_turns:
        start = len(render(tok, messages[:i], add_generation_prompt=True)) if i > 0 else 0
        upto = render(tok, messages[: i + 1])
        if not full.startswith(upto) or len(upto) < start:
            raise ValueError("the chat template is not prefix-preserving for this conversation (rendering it turn "
                             "by turn does not give prefixes of the whole), so its assistant turns cannot be located")
        spans.append((start, len(upto)))
    labels = [tid if any(s < e_tok and b_tok < e for s, e in spans) else -100
              for tid, (b_tok, e_tok) in zip(ids, offsets)]
    return ids, labels


def encode(tok, ex: Example) -> tuple[list[int], list[int]]:
    if ex.kind == "chat":
        return encode_chat(tok, ex.messages, ex.trained_turns)
    eos = tok.eos_token_id
    if ex.kind == "pc":
        # Prompt and completion are tokenized apart: that is how they meet at inference (the prompt is
        # encoded alone, the completion generated after it), and a token can never straddle the boundary.
        prompt_ids = tok(ex.prompt)["input_ids"]
        completion_ids = tok(ex.completion, add_special_tokens=False)["input_ids"]
        if not completion_ids or completion_ids[-1] != eos:
            completion_ids = completion_ids + [eos]
        return prompt_ids + completion_ids, [-100] * len(prompt_ids) + completion_ids
    ids = tok(ex.text)["input_ids"]
    if not ids or ids[-1] != eos:
        ids = ids + [eos]
    return ids, list(ids)


def encode_all(cfg: Settings, tok, examples: list[Example], split: str, *, check_lengths: bool = True):
    from tqdm.auto import tqdm

    rows, too_long, no_loss, errors = [], [], [], []
    for ex in tqdm(examples, desc=f"tokenizing {split}", unit="row", disable=len(examples) < 2000):
        try:
            ids, labels = encode(tok, ex)
        except ValueError as exc:
            errors.append(f"row {ex.row}: {exc}")
            continue
        if len(ids) > cfg.max_seq_length:
            too_long.append((ex.row, len(ids)))
            continue
        if all(lbl == -100 for lbl in labels):
            no_loss.append(ex.row)
            continue
        rows.append((ex, ids, labels))
    if errors:
        raise DataError(f"{split}: {len(errors)} row(s) cannot be tokenized:\n  " + "\n  ".join(errors[:MAX_LISTED]))
    if no_loss:
        listed = ", ".join(map(str, no_loss[:MAX_LISTED])) + (" ..." if len(no_loss) > MAX_LISTED else "")
        raise DataError(f"{split}: {len(no_loss)} row(s) have no tokens to learn from (no assistant turn / empty "
                        f"completion): rows {listed}")
    if too_long:
        frac = len(too_long) / len(examples)
        listed = ", ".join(f"{r} ({n} tokens)" for r, n in too_long[:MAX_LISTED]) + (
            " ..." if len(too_long) > MAX_LISTED else "")
        msg = (f"{split}: {len(too_long)} of {len(examples)} rows ({frac:.1%}) are longer than "
               f"MAX_SEQ_LENGTH={cfg.max_seq_length}: rows {listed}")
        if frac > cfg.max_overlong_fraction:
            raise DataError(f"{msg}. That is more than MAX_OVERLONG_FRACTION={cfg.max_overlong_fraction}; raise "
                            "MAX_SEQ_LENGTH or MAX_OVERLONG_FRACTION, or shorten those rows")
        log.warning("%s; they are dropped (truncating would cut off the end of the answer)", msg)
    if not rows:
        raise DataError(f"{split}: no rows left to train on")
    return rows, [r for r, _ in too_long]


def check_end_of_turn_trained(tok, eot: str, rows) -> None:
    """Preflight: the token ending the assistant turn is inside the loss of the first conversation."""
    eot_id = tok.convert_tokens_to_ids(eot)
    ex, ids, labels = rows[0]
    if ex.kind != "chat" or ex.trained_turns is None:
        return
    trained = [i for i, (t, lbl) in enumerate(zip(ids, labels)) if t == eot_id and lbl != -100]
    if not trained:
        shown = "".join(tok.convert_ids_to_tokens([t if lbl != -100 else tok.pad_token_id
                                                   for t, lbl in zip(ids, labels)]))
        raise DataError(f"row {ex.row}: the end-of-turn token {eot!r} is not inside the loss mask, so the model "
                        f"would never learn to stop. Trained part: {shown!r}")


def write_jsonl(path: Path, examples: list[Example]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for ex in examples:
            f.write(json.dumps(ex.to_json(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)


@dataclass
class Shaped:
    format: str
    train: list[Example]
    eval: list[Example]

    @property
    def is_chat(self) -> bool:
        return self.train[0].kind == "chat"


def load_and_shape(cfg: Settings) -> Shaped:
    """Load the dataset and turn every row into an Example (no tokenizer needed yet)."""
    train_raw, eval_raw = load_raw(cfg)
    columns = [c for c in train_raw.column_names if c != ROW]
    fmt = detect_format(cfg, columns, train_raw[0])
    log.info("dataset %s: %d training rows%s, format: %s", cfg.dataset, len(train_raw),
             f", {len(eval_raw)} evaluation rows" if eval_raw is not None else "", fmt)
    train_ex = shape(cfg, fmt, train_raw, "train")
    eval_ex = shape(cfg, fmt, eval_raw, "eval") if eval_raw is not None else []
    return Shaped(fmt, train_ex, eval_ex)


def tokenize(cfg: Settings, tok_info, shaped: Shaped, data_dir: Path | None) -> PreparedData:
    """Tokenize and check. Writes the kept rows to data_dir (train.jsonl, eval.jsonl) unless None."""
    from datasets import Dataset

    tok = tok_info.tokenizer
    train_rows, dropped = encode_all(cfg, tok, shaped.train, "train")
    if tok_info.end_of_turn is not None:
        check_end_of_turn_trained(tok, tok_info.end_of_turn, train_rows)
    eval_rows = encode_all(cfg, tok, shaped.eval, "eval")[0] if shaped.eval else []

    def to_ds(rows):
        return Dataset.from_dict({"input_ids": [r[1] for r in rows], "labels": [r[2] for r in rows]})

    lengths = [len(r[1]) for r in train_rows]
    trained_tokens = sum(sum(1 for lbl in r[2] if lbl != -100) for r in train_rows)
    stats = {"format": shaped.format, "train_rows": len(train_rows), "eval_rows": len(eval_rows),
             "dropped_overlong_rows": dropped, "train_tokens": sum(lengths), "trained_tokens": trained_tokens,
             "max_row_tokens": max(lengths), "mean_row_tokens": round(sum(lengths) / len(lengths), 1)}
    log.info("tokenized: %d rows, %d tokens (%d in the loss), longest row %d tokens", len(train_rows),
             sum(lengths), trained_tokens, max(lengths))
    kept_train = [r[0] for r in train_rows]
    kept_eval = [r[0] for r in eval_rows]
    if data_dir is not None:
        write_jsonl(data_dir / "train.jsonl", kept_train)
        if kept_eval:
            write_jsonl(data_dir / "eval.jsonl", kept_eval)
    return PreparedData(shaped.format, to_ds(train_rows), to_ds(eval_rows) if eval_rows else None, kept_train,
                        kept_eval, stats)
