"""Stage: dataset loading, shaping and tokenization.

Formats are detected from the columns: conversational `messages` (or ShareGPT `conversations`),
`prompt`/`completion` (plain strings or message lists), plain text (TEXT_FIELD), or any columns turned
into conversations by USER_TEMPLATE/ASSISTANT_FIELD/SYSTEM_PROMPT (the text-to-SQL guide's recipe).

Rows are tokenized here rather than by SFTTrainer, and each assistant turn is trained on what serving
will show the model: for turn i, the prompt is the template's rendering of messages[:i] with
add_generation_prompt=True, and the target is what the template renders for the turn after the text it
shares with that prompt (the answer, any reasoning the template keeps for the last turn, the end-of-turn
token). Where every such prompt + target is a prefix of the whole conversation's rendering (a
prefix-preserving template), the conversation is one sequence with those spans in the loss. Where it is
not (a template that rewrites earlier turns, e.g. drops their reasoning, or whose generation prompt opens
a thinking channel the rendered turn lacks), the conversation becomes one sequence per assistant turn.
The rule follows from the template's own rendering; no model family is special-cased, and no
`{% generation %}` markers are needed (TRL's `assistant_only_loss` needs them or one of its bundled
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

from tuneserve.config import template_fields
from tuneserve.exitcodes import ConfigError, DataError
from tuneserve.layout import EVAL_ROWS, TRAIN_ROWS
from tuneserve.refs import DATA_EXTENSIONS, looks_local
from tuneserve.settings import Settings
from tuneserve.tokenizer import render

log = logging.getLogger(__name__)

ROW = "__row__"  # original row number, kept through shuffling so errors name the user's rows
ROLES = ("system", "user", "assistant", "tool")
# Message fields besides role and content that templates read (Qwen3's reasoning_content, gpt-oss's thinking).
EXTRA_MESSAGE_FIELDS = ("reasoning_content", "thinking", "name")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
}
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
            return cls(
                d["row"], "chat", messages=d["messages"], trained_turns=d.get("trained_turns"), source=d.get("source")
            )
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
def max_line_bytes(max_seq_length: int) -> int:
    """The longest line a row that fits MAX_SEQ_LENGTH tokens can plausibly take (64 bytes a token; 1 MiB at
    least). Longer lines are rejected before they are parsed: parsing and tokenizing a 50 MB line costs
    minutes and gigabytes only to drop it."""
    return max(1 << 20, 64 * max_seq_length)


def check_text_file(path: Path, limit: int) -> None:
    """Reads a local .jsonl or .csv file line by line, in bounded memory, before the loader does: DataError
    naming the file, the line and the cause for invalid UTF-8, an overlong line, and (.jsonl) malformed JSON
    or a row that is not an object; and for a file with no rows."""
    jsonl = path.suffix == ".jsonl"
    rows = 0
    with path.open("rb") as f:
        for number, line in enumerate(iter(lambda: f.readline(limit + 1), b""), start=1):
            if len(line) > limit:
                raise DataError(
                    f"{path}:{number}: the line is longer than {limit} bytes, more than any row of "
                    "MAX_SEQ_LENGTH tokens takes; shorten or remove it (nothing was parsed)"
                )
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path}:{number}: not valid UTF-8 (byte {exc.start + 1} of the line: "
                    f"{line[exc.start : exc.start + 1]!r}); save the file as UTF-8"
                ) from None
            if not text.strip():
                continue
            rows += 1
            if jsonl:
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno}); each "
                        "line of a .jsonl file is one JSON object"
                    ) from None
                if not isinstance(row, dict):
                    raise DataError(
                        f"{path}:{number}: a row must be a JSON object with the dataset's columns, "
                        f"not a JSON {type(row).__name__}"
                    )
    if rows == 0 or (not jsonl and rows < 2):  # a .csv file's first line is its header
        raise DataError(f"{path}: the file has no rows")


def _load_split(cfg: Settings, split: str):
    import datasets

    ref = cfg.dataset
    try:
        if looks_local(ref):
            path = Path(ref).expanduser()
            files = [path] if path.is_file() else sorted(path.glob(f"{split}.*")) if path.is_dir() else []
            for f in files:
                if f.suffix in (".jsonl", ".csv"):
                    check_text_file(f, max_line_bytes(cfg.max_seq_length))
            if path.is_file():
                builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}[
                    next(e for e in DATA_EXTENSIONS if ref.endswith(e))
                ]
                if split != "train":
                    raise ConfigError(
                        f"DATASET={ref!r} is a single file, which has only the 'train' split; "
                        f"{split!r} was asked for (DATASET_SPLIT/EVAL_SPLIT). Use a directory with "
                        "<split>.jsonl files, or EVAL_SIZE"
                    )
                return datasets.load_dataset(builder, data_files=str(path), split="train")
            dd = datasets.load_dataset(str(path))
        else:
            dd = datasets.load_dataset(ref, cfg.dataset_config)
    except (ConfigError, DataError):
        raise
    except Exception as exc:  # datasets raises many types (DatasetGenerationError, ArrowInvalid, ...)
        if "corresponds to no data" in str(exc):
            raise DataError(f"DATASET={ref!r} split {split!r} is empty") from None
        first = next(iter(str(exc).splitlines()), "")
        raise DataError(f"DATASET={ref!r}: cannot be loaded: {type(exc).__name__}: {first}") from None
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
        "or set USER_TEMPLATE/ASSISTANT_FIELD to build conversations from columns"
    )


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
        extra = {k: m[k] for k in EXTRA_MESSAGE_FIELDS if isinstance(m.get(k), str)}
        out.append({"role": m["role"], "content": m["content"], **extra})
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
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ]
        trained = [len(messages) - 1] if cfg.assistant_only_loss else None
        source = {k: v for k, v in row.items() if k != ROW and isinstance(v, (str, int, float, bool))}
        return Example(idx, "chat", messages=messages, trained_turns=trained, source=source)
    if fmt in ("conversational", "sharegpt"):
        raw = (
            row["messages"]
            if fmt == "conversational"
            else [
                {"role": SHAREGPT_ROLES.get(m.get("from"), m.get("from")), "content": m.get("value")}
                for m in (row["conversations"] or [])
                if isinstance(m, dict)
            ]
        )
        messages = _check_messages(raw, "messages")
        if cfg.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": cfg.system_prompt})
        trained = [i for i, m in enumerate(messages) if m["role"] == "assistant"] if cfg.assistant_only_loss else None
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
            raise DataError(
                f"DATASET={cfg.dataset!r} ({split}) lacks column(s) {', '.join(missing)} used by "
                f"USER_TEMPLATE/ASSISTANT_FIELD; it has: {', '.join(c for c in ds.column_names if c != ROW)}"
            )
    examples, errors = [], []
    for row in ds:
        try:
            examples.append(shape_row(cfg, fmt, row))
        except ValueError as exc:
            errors.append(f"row {row[ROW]}: {exc}")
    if errors:
        listed = "\n  ".join(errors[:MAX_LISTED])
        more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
        raise DataError(
            f"DATASET={cfg.dataset!r} ({split}): {len(errors)} row(s) have the wrong shape for the "
            f"{fmt} format:\n  {listed}{more}"
        )
    return examples


# ---------------------------------------------------------------------------------------------- encoding
PER_TURN_GENERATION_PROMPT = (
    "the generation prompt adds text the rendered turn does not contain (e.g. it opens a thinking channel)"
)
PER_TURN_HISTORY = (
    "the template renders earlier turns differently once the conversation goes on (e.g. drops their reasoning)"
)


def turn_targets(tok, messages: list[dict], trained_turns: list[int]) -> tuple[list[tuple[str, str, int]], str | None]:
    """For each trained turn i: (serving's prompt for messages[:i], what the model must produce after it, the end
    of the turn in the rendering of messages[:i + 1]), and why the conversation cannot be one sequence (None when
    it can). ValueError when a turn's content is not in its target: the template hides the answer."""
    full = render(tok, messages)
    pieces, reason = [], None
    for i in trained_turns:
        prompt = render(tok, messages[:i], add_generation_prompt=True) if i > 0 else ""
        upto = render(tok, messages[: i + 1])
        shared = len(os.path.commonprefix([prompt, upto]))
        target = upto[shared:]
        content = messages[i]["content"].strip()
        if content and content not in target:
            raise ValueError(
                f"assistant turn {i} cannot be located: the chat template renders it as {target!r:.200} "
                "after the prompt serving would send, which does not contain its content"
            )
        if shared < len(prompt):
            reason = reason or PER_TURN_GENERATION_PROMPT
        elif not full.startswith(upto):
            reason = reason or PER_TURN_HISTORY
        pieces.append((prompt, target, len(upto)))
    return pieces, reason


# A two-exchange conversation with reasoning on both answers: enough to show how a template renders history.
PROBE_CONVERSATION = [
    {"role": "user", "content": "Q1"},
    {"role": "assistant", "content": "A1", "reasoning_content": "R1"},
    {"role": "user", "content": "Q2"},
    {"role": "assistant", "content": "A2", "reasoning_content": "R2"},
]


def template_path(tok) -> str:
    """How conversations are trained with this tokenizer's chat template (reported at preflight)."""
    try:
        _, reason = turn_targets(tok, PROBE_CONVERSATION, [1, 3])
    except Exception as exc:  # noqa: BLE001 - a template that cannot render the probe; real rows decide then
        return f"undetermined (the probe conversation does not render: {type(exc).__name__})"
    return (
        "prefix-preserving: one sequence per conversation"
        if reason is None
        else f"one sequence per assistant turn: {reason}"
    )


def encode_chat(tok, messages: list[dict], trained_turns: list[int] | None) -> tuple[list[tuple], str | None]:
    """The training sequences of a conversation as (input_ids, labels) pairs, labels -100 outside the trained
    turns, and why it was split into one sequence per assistant turn (None: one sequence)."""
    if trained_turns is None:
        ids = tok(render(tok, messages), add_special_tokens=False)["input_ids"]
        return [(ids, list(ids))], None
    pieces, reason = turn_targets(tok, messages, trained_turns)
    if reason is not None:
        # Prompt and target tokenized apart, as they meet at inference: serving encodes the prompt alone.
        sequences = []
        for prompt, target, _ in pieces:
            prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            target_ids = tok(target, add_special_tokens=False)["input_ids"]
            sequences.append((prompt_ids + target_ids, [-100] * len(prompt_ids) + target_ids))
        return sequences, reason
    enc = tok(render(tok, messages), add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    spans = [(len(prompt), end) for prompt, _, end in pieces]
    labels = [
        tid if any(s < e_tok and b_tok < e for s, e in spans) else -100 for tid, (b_tok, e_tok) in zip(ids, offsets)
    ]
    return [(ids, labels)], None


def encode(tok, ex: Example) -> tuple[list[tuple[list[int], list[int]]], str | None]:
    """The row's training sequences as (input_ids, labels) pairs, and why a conversation was split per turn."""
    if ex.kind == "chat":
        return encode_chat(tok, ex.messages, ex.trained_turns)
    return [_encode_plain(tok, ex)], None


def _encode_plain(tok, ex: Example) -> tuple[list[int], list[int]]:
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


@dataclass
class Encoded:
    rows: list[tuple[Example, list[int], list[int]]]  # one per training sequence
    dropped: list[int]  # rows longer than MAX_SEQ_LENGTH
    per_turn: dict[str, int]  # why -> conversations trained as one sequence per assistant turn


def encode_all(cfg: Settings, tok, examples: list[Example], split: str) -> Encoded:
    from tqdm.auto import tqdm

    rows, too_long, no_loss, errors, per_turn = [], [], [], [], {}
    for ex in tqdm(examples, desc=f"tokenizing {split}", unit="row", disable=len(examples) < 2000):
        try:
            sequences, reason = encode(tok, ex)
        except ValueError as exc:
            errors.append(f"row {ex.row}: {exc}")
            continue
        longest = max(len(ids) for ids, _ in sequences)
        if longest > cfg.max_seq_length:
            too_long.append((ex.row, longest))
            continue
        if all(lbl == -100 for _, labels in sequences for lbl in labels):
            no_loss.append(ex.row)
            continue
        if reason is not None:
            per_turn[reason] = per_turn.get(reason, 0) + 1
        rows += [(ex, ids, labels) for ids, labels in sequences]
    if errors:
        raise DataError(f"{split}: {len(errors)} row(s) cannot be tokenized:\n  " + "\n  ".join(errors[:MAX_LISTED]))
    if no_loss:
        listed = ", ".join(map(str, no_loss[:MAX_LISTED])) + (" ..." if len(no_loss) > MAX_LISTED else "")
        raise DataError(
            f"{split}: {len(no_loss)} row(s) have no tokens to learn from (no assistant turn / empty "
            f"completion): rows {listed}"
        )
    if too_long:
        frac = len(too_long) / len(examples)
        listed = ", ".join(f"{r} ({n} tokens)" for r, n in too_long[:MAX_LISTED]) + (
            " ..." if len(too_long) > MAX_LISTED else ""
        )
        msg = (
            f"{split}: {len(too_long)} of {len(examples)} rows ({frac:.1%}) are longer than "
            f"MAX_SEQ_LENGTH={cfg.max_seq_length}: rows {listed}"
        )
        if frac > cfg.max_overlong_fraction:
            raise DataError(
                f"{msg}. That is more than MAX_OVERLONG_FRACTION={cfg.max_overlong_fraction}; raise "
                "MAX_SEQ_LENGTH or MAX_OVERLONG_FRACTION, or shorten those rows"
            )
        log.warning("%s; they are dropped (truncating would cut off the end of the answer)", msg)
    if not rows:
        raise DataError(f"{split}: no rows left to train on")
    for reason, count in per_turn.items():
        log.info(
            "%s: %d conversation(s) trained as one sequence per assistant turn, each on the prompt serving "
            "renders for it: %s",
            split,
            count,
            reason,
        )
    return Encoded(rows, [r for r, _ in too_long], per_turn)


def check_end_of_turn_trained(tok, eot: str, rows) -> None:
    """Preflight: the token ending the assistant turn is inside the loss of the first conversation."""
    eot_id = tok.convert_tokens_to_ids(eot)
    ex, ids, labels = rows[0]
    if ex.kind != "chat" or ex.trained_turns is None:
        return
    trained = [i for i, (t, lbl) in enumerate(zip(ids, labels)) if t == eot_id and lbl != -100]
    if not trained:
        shown = "".join(
            tok.convert_ids_to_tokens([t if lbl != -100 else tok.pad_token_id for t, lbl in zip(ids, labels)])
        )
        raise DataError(
            f"row {ex.row}: the end-of-turn token {eot!r} is not inside the loss mask, so the model "
            f"would never learn to stop. Trained part: {shown!r}"
        )


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
    log.info(
        "dataset %s: %d training rows%s, format: %s",
        cfg.dataset,
        len(train_raw),
        f", {len(eval_raw)} evaluation rows" if eval_raw is not None else "",
        fmt,
    )
    train_ex = shape(cfg, fmt, train_raw, "train")
    eval_ex = shape(cfg, fmt, eval_raw, "eval") if eval_raw is not None else []
    return Shaped(fmt, train_ex, eval_ex)


def tokenize(cfg: Settings, tok_info, shaped: Shaped, data_dir: Path | None) -> PreparedData:
    """Tokenize and check. Writes the kept rows to data_dir (train.jsonl, eval.jsonl) unless None."""
    from datasets import Dataset

    tok = tok_info.tokenizer
    path = template_path(tok) if shaped.is_chat else None
    if path is not None:
        log.info("chat template (%s): %s", tok_info.template_source, path)
    train = encode_all(cfg, tok, shaped.train, "train")
    train_rows = train.rows
    if tok_info.end_of_turn is not None:
        check_end_of_turn_trained(tok, tok_info.end_of_turn, train_rows)
    eval_rows = encode_all(cfg, tok, shaped.eval, "eval").rows if shaped.eval else []

    def to_ds(rows):
        return Dataset.from_dict({"input_ids": [r[1] for r in rows], "labels": [r[2] for r in rows]})

    def distinct(rows):  # the rows behind the sequences, once each and in order
        return list({id(r[0]): r[0] for r in rows}.values())

    lengths = [len(r[1]) for r in train_rows]
    trained_tokens = sum(sum(1 for lbl in r[2] if lbl != -100) for r in train_rows)
    kept_train, kept_eval = distinct(train_rows), distinct(eval_rows)
    stats = {
        "format": shaped.format,
        "train_rows": len(kept_train),
        "eval_rows": len(kept_eval),
        "train_sequences": len(train_rows),
        "template_path": path,
        "per_turn_rows": train.per_turn,
        "dropped_overlong_rows": train.dropped,
        "train_tokens": sum(lengths),
        "trained_tokens": trained_tokens,
        "max_row_tokens": max(lengths),
        "mean_row_tokens": round(sum(lengths) / len(lengths), 1),
    }
    log.info(
        "tokenized: %d rows in %d sequences, %d tokens (%d in the loss), longest sequence %d tokens",
        len(kept_train),
        len(train_rows),
        sum(lengths),
        trained_tokens,
        max(lengths),
    )
    if data_dir is not None:
        write_jsonl(data_dir / TRAIN_ROWS, kept_train)
        if kept_eval:
            write_jsonl(data_dir / EVAL_ROWS, kept_eval)
    return PreparedData(
        shaped.format, to_ds(train_rows), to_ds(eval_rows) if eval_rows else None, kept_train, kept_eval, stats
    )
