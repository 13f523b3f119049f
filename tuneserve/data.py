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

Prompt and target are tokenized apart, as they meet at inference (serving encodes the prompt alone and the model
writes the target after it): the ids trained for turn i begin with exactly the ids serving sends for
messages[:i], and no token straddles the boundary, whatever the tokenizer merges there.

Tool calling: a row's `tools` (or the TOOLS file) and the messages' `tool_calls` / `tool_call_id` reach the
template as vLLM hands a request's to it; a message with `"weight": 0` (OpenAI's fine-tuning format) is context,
not a target.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import logging
import lzma
import os
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneserve.config import template_fields
from tuneserve.exitcodes import ConfigError, DataError
from tuneserve.layout import EVAL_ROWS, TRAIN_ROWS, written_atomically
from tuneserve.refs import COMPRESSIONS, TEXT_EXTENSIONS, data_extension, looks_local
from tuneserve.settings import Settings
from tuneserve.tokenizer import render

log = logging.getLogger(__name__)

ROW = "__row__"  # original row number, kept through shuffling so errors name the user's rows
ROLES = ("system", "user", "assistant", "tool")
# Message fields besides role and content that templates read (Qwen3's reasoning_content, gpt-oss's thinking).
EXTRA_MESSAGE_FIELDS = ("reasoning_content", "thinking", "name", "tool_call_id")
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
    tools: list[dict] | None = None  # the function schemas the template renders (a chat row's or TOOLS)

    def to_json(self) -> dict[str, Any]:
        if self.kind == "chat":
            out = {"row": self.row, "messages": self.messages, "trained_turns": self.trained_turns}
            out |= {"tools": self.tools} if self.tools else {}
            return out | ({"source": self.source} if self.source is not None else {})
        if self.kind == "pc":
            return {"row": self.row, "prompt": self.prompt, "completion": self.completion}
        return {"row": self.row, "text": self.text}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Example:
        if "messages" in d:
            return cls(
                d["row"],
                "chat",
                messages=d["messages"],
                trained_turns=d.get("trained_turns"),
                source=d.get("source"),
                tools=d.get("tools"),
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
    tool_call_samples: list[dict] = field(default_factory=list)  # see tool_call_samples


# ---------------------------------------------------------------------------------------------- loading
def max_line_bytes(max_seq_length: int) -> int:
    """The longest line a row that fits MAX_SEQ_LENGTH tokens can plausibly take (64 bytes a token; 1 MiB at
    least). Longer lines are rejected before they are parsed: parsing and tokenizing a 50 MB line costs
    minutes and gigabytes only to drop it."""
    return max(1 << 20, 64 * max_seq_length)


OPENERS = dict(zip(COMPRESSIONS, (gzip.open, bz2.open, lzma.open)))


def file_kind(path: Path) -> tuple[str | None, Callable]:
    """(data extension, opener for its compression) of a data file: train.jsonl.gz -> ('.jsonl', gzip.open)."""
    return data_extension(path.name), OPENERS.get(path.suffix, open)


@dataclass
class FileRows:
    """Where the rows of one file are: `lines[k]` is the 1-based line of row k of a JSON-lines file; a JSON array
    or CSV file's rows are numbered (lines None)."""

    path: Path
    count: int
    lines: array | None = None

    def place(self, k: int) -> str:
        return f"{self.path}:{self.lines[k]}" if self.lines is not None else f"{self.path} row {k + 1}"


@dataclass
class Origin:
    """Where a split's rows come from, so that errors name a row the way its user finds it: the file and 1-based
    line of a JSON-lines file, the file and 1-based row of other files, the dataset, split and 1-based row of a
    Hub dataset (or of files whose rows cannot be placed)."""

    dataset: str
    split: str
    files: list[FileRows] | None = None  # the split's files in the loaded order

    def __call__(self, row: int) -> str:
        k = row
        for f in self.files or []:
            if 0 <= k < f.count:
                return f.place(k)
            k -= f.count
        return f"DATASET={self.dataset!r} split {self.split!r} row {row + 1}"


def check_text_file(path: Path, limit: int) -> FileRows | None:
    """Reads a local .jsonl, .json or .csv file (compressed too: .gz, .bz2, .xz) in bounded memory before the loader
    does. DataError naming the file, the 1-based line and the cause for invalid UTF-8, an overlong line, malformed
    JSON or a row that is not an object; and for a file with no rows. Returns where its rows are, or None for a file
    it does not read (parquet)."""
    ext, opener = file_kind(path)
    if ext not in TEXT_EXTENSIONS:
        return None
    if ext == ".json" and _is_json_document(path, opener):
        return _check_json_document(path, opener)
    jsonl = ext in (".jsonl", ".json")
    lines = array("I")
    with opener(path, "rb") as f:
        for number, line in enumerate(iter(lambda: f.readline(limit + 1), b""), start=1):
            if len(line) > limit:
                raise DataError(
                    f"{path}:{number}: the line is longer than {limit} bytes, more than any row of "
                    "MAX_SEQ_LENGTH tokens takes; shorten or remove it (nothing was parsed)"
                )
            text = _utf8(line, f"{path}:{number}")
            if not text.strip():
                continue
            lines.append(number)
            if jsonl:
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno}); each "
                        "line of a JSON-lines file is one JSON object"
                    ) from None
                if not isinstance(row, dict):
                    raise DataError(
                        f"{path}:{number}: a row must be a JSON object with the dataset's columns, "
                        f"not a JSON {type(row).__name__}"
                    )
    if jsonl:
        if not lines:
            raise DataError(f"{path}: the file has no rows")
        return FileRows(path, len(lines), lines)
    return _csv_rows(path, opener)


def _utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{where}: not valid UTF-8 (byte {exc.start + 1} of the line: {raw[exc.start : exc.start + 1]!r}); "
            "save the file as UTF-8"
        ) from None


def _is_json_document(path: Path, opener) -> bool:
    """A .json file holding one JSON document (an array of rows, or an object of columns), as opposed to JSON lines:
    its first non-blank line is not a complete JSON value."""
    with opener(path, "rb") as f:
        for line in iter(lambda: f.readline(1 << 20), b""):
            if line.strip():
                try:
                    json.loads(line)
                    return False
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return True
    return False


def _check_json_document(path: Path, opener) -> FileRows | None:
    """A .json document is parsed whole, as `datasets` does: the error names the line and column."""
    with opener(path, "rb") as f:
        text = _utf8(f.read(), str(path))
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(doc, list):
        for i, row in enumerate(doc):
            if not isinstance(row, dict):
                raise DataError(
                    f"{path} row {i + 1}: a row must be a JSON object with the dataset's columns, not a JSON "
                    f"{type(row).__name__}"
                )
        if not doc:
            raise DataError(f"{path}: the file has no rows")
        return FileRows(path, len(doc))
    return None  # an object of columns (or a `field`): rows have no place of their own


def _csv_rows(path: Path, opener) -> FileRows:
    with opener(path, "rb") as raw:
        reader = csv.reader(io.TextIOWrapper(raw, encoding="utf-8", newline=""))
        try:
            count = sum(1 for _ in reader) - 1  # the first record is the header
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from None
    if count < 1:
        raise DataError(f"{path}: the file has no rows")
    return FileRows(path, count)


def local_split_files(path: Path) -> dict[str, list[Path]]:
    """The files `datasets.load_dataset` reads for each split of a local directory, in its order (its own
    resolution of the split patterns: `train.jsonl`, `data/train-00000-of-00002.jsonl.gz`, `train/part.json`, ...)."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        files = DataFilesDict.from_patterns(get_data_patterns(str(path)), str(path))
    except Exception:  # noqa: BLE001 - no data files: load_dataset names the problem
        return {}
    return {str(split): [Path(f) for f in found] for split, found in files.items()}


def _root_cause(exc: BaseException) -> str:
    """The innermost message of an exception chain (datasets wraps the parser's error that names the row)."""
    seen = exc
    while seen.__cause__ is not None or seen.__context__ is not None:
        seen = seen.__cause__ or seen.__context__
    first = next(iter(str(seen).splitlines()), "")
    return f"{type(seen).__name__}: {first}"


def check_local_files(cfg: Settings) -> dict[str, list[FileRows] | None]:
    """Reads every file of a local dataset once, each split's (check_text_file): split -> where its rows are (None
    when a file's rows cannot be placed). Every split's, since the loader reads them all. {} for a Hub dataset."""
    if not looks_local(cfg.dataset):
        return {}
    path = Path(cfg.dataset).expanduser()
    by_split = {"train": [path]} if path.is_file() else local_split_files(path) if path.is_dir() else {}
    limit = max_line_bytes(cfg.max_seq_length)
    placed = {}
    for split, files in by_split.items():
        rows = [check_text_file(f, limit) for f in files]
        placed[split] = rows if all(r is not None for r in rows) else None
    return placed


def _load_split(cfg: Settings, split: str, files: list[FileRows] | None):
    """(the split as a datasets.Dataset, where its rows come from); `files`: from check_local_files."""
    import datasets

    ref = cfg.dataset
    origin = Origin(ref, split, files)
    try:
        if looks_local(ref):
            path = Path(ref).expanduser()
            if path.is_file():
                builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}[data_extension(ref)]
                if split != "train":
                    raise ConfigError(
                        f"DATASET={ref!r} is a single file, which has only the 'train' split; "
                        f"{split!r} was asked for (DATASET_SPLIT/EVAL_SPLIT). Use a directory with "
                        "<split>.jsonl files, or EVAL_SIZE"
                    )
                return datasets.load_dataset(builder, data_files=str(path), split="train"), origin
            dd = datasets.load_dataset(str(path))
        else:
            dd = datasets.load_dataset(ref, cfg.dataset_config, revision=cfg.dataset_revision)
    except (ConfigError, DataError):
        raise
    except Exception as exc:  # datasets raises many types (DatasetGenerationError, ArrowInvalid, ...)
        if "corresponds to no data" in str(exc):
            raise DataError(f"DATASET={ref!r} split {split!r} is empty") from None
        first = next(iter(str(exc).splitlines()), "")
        raise DataError(
            f"DATASET={ref!r}: cannot be loaded: {type(exc).__name__}: {first} (cause: {_root_cause(exc)})"
        ) from None
    if split not in dd:
        raise DataError(f"DATASET={ref!r} has no split {split!r}; it has: {', '.join(dd)}")
    if files is not None and sum(f.count for f in files) != len(dd[split]):
        origin.files = None  # the loader read the files otherwise than line by line: name rows by number
    return dd[split], origin


def load_raw(cfg: Settings):
    """(train, eval, {split: Origin}): datasets.Dataset, each with the original row number in column __row__."""
    placed = check_local_files(cfg)
    train, origin = _load_split(cfg, cfg.dataset_split, placed.get(cfg.dataset_split))
    if len(train) == 0:
        raise DataError(f"DATASET={cfg.dataset!r} split {cfg.dataset_split!r} is empty")
    train = train.add_column(ROW, list(range(len(train))))
    origins = {"train": origin, "eval": origin}  # EVAL_SIZE rows keep their numbers in the training split
    evalset = None
    if cfg.eval_split:
        evalset, origins["eval"] = _load_split(cfg, cfg.eval_split, placed.get(cfg.eval_split))
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
    return train, evalset, origins


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


def _without_nulls(value: Any) -> Any:
    """A JSON value without null object members. Arrow gives every row of a column the union of the keys its
    rows have, filling the missing ones with null; a template would render those nulls, which no client sends."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _json_value(value: Any, where: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    return _without_nulls(value)


def normalize_tools(value: Any, where: str = "tools") -> list[dict] | None:
    """Function schemas as vLLM hands a request's `tools` to the chat template (ChatCompletionToolsParam's dump:
    type, then function with name, description and parameters, null when absent). Written here because the
    training image has no vLLM; the end-to-end test compares both renderings through vLLM's /tokenize."""
    value = _json_value(value, where)
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a list of tools, got {type(value).__name__}")
    out = []
    for i, tool in enumerate(value):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(fn, dict)
            or not isinstance(fn.get("name"), str)
            or tool.get("type", "function") != "function"
        ):
            raise ValueError(
                f"{where}[{i}]: expected {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}, "
                f"got {tool!r:.120}"
            )
        function = {"name": fn["name"], "description": fn.get("description"), "parameters": fn.get("parameters")}
        if fn.get("strict") is not None:
            function["strict"] = fn["strict"]
        out.append({"type": "function", "function": function})
    return out


def _tool_calls(value: Any, where: str) -> list[dict]:
    """Assistant tool calls as vLLM hands them to the template: OpenAI's shape, `arguments` a JSON object (vLLM's
    `_postprocess_messages` parses the string clients send)."""
    value = _json_value(value, where)
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a list of tool calls, got {type(value).__name__}")
    calls = []
    for i, call in enumerate(value):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(
                f"{where}[{i}]: expected {{'type': 'function', 'function': {{'name': ..., 'arguments': ...}}}}, "
                f"got {call!r:.120}"
            )
        args = _json_value(fn.get("arguments") or {}, f"{where}[{i}].arguments")
        if not isinstance(args, dict):
            raise ValueError(f"{where}[{i}]: arguments must be a JSON object, got {type(args).__name__}")
        out = {k: v for k, v in call.items() if k != "function" and v is not None}
        calls.append({**out, "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return calls


def _content(value: Any, where: str) -> str:
    """Message content as vLLM hands it to the template: null is empty, a list of text parts is joined by newlines."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "\n".join(str(p.get("text") or "") for p in value)
    raise ValueError(f"{where}: content must be a string or a list of text parts, got {type(value).__name__}")


def _check_messages(value: Any, where: str) -> tuple[list[dict], list[int]]:
    """(messages as the template gets them, indexes of the messages marked `"weight": 0`)."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: expected a non-empty list of messages, got {type(value).__name__}")
    out, unweighted = [], []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and not m.get("tool_calls")):
            raise ValueError(f"{where}[{i}]: expected {{'role': ..., 'content': ...}}, got {m!r:.80}")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}[{i}]: role {m['role']!r} is not one of {', '.join(ROLES)}")
        message = {"role": m["role"], "content": _content(m.get("content"), f"{where}[{i}]")}
        message |= {k: m[k] for k in EXTRA_MESSAGE_FIELDS if isinstance(m.get(k), str)}
        if m.get("tool_calls"):
            if m["role"] != "assistant":
                raise ValueError(f"{where}[{i}]: only assistant messages make tool calls, not {m['role']!r}")
            message["tool_calls"] = _tool_calls(m["tool_calls"], f"{where}[{i}].tool_calls")
        weight = m.get("weight")
        if weight is not None:
            if weight not in (0, 1) or isinstance(weight, bool):
                raise ValueError(f"{where}[{i}]: weight must be 0 (context, not learned) or 1, got {weight!r}")
            if weight == 0:
                unweighted.append(i)
        out.append(message)
    return out, unweighted


def _assistant_turns(messages: list[dict], context: list[int]) -> list[int]:
    """The assistant turns that are targets: all but the `context` ones, which stay in the sequence, outside the
    loss."""
    return [i for i, m in enumerate(messages) if m["role"] == "assistant" and i not in context]


def _row_tools(row: dict, tools: list[dict] | None) -> list[dict] | None:
    """A row's `tools` column when it has one, else the TOOLS file's tools."""
    own = row.get("tools")
    return normalize_tools(own, "tools") if own not in (None, "", []) else tools


def shape_row(cfg: Settings, fmt: str, row: dict, tools: list[dict] | None = None) -> Example:
    idx = row[ROW]
    if fmt == "columns":
        values = {k: v for k, v in row.items() if k != ROW}
        nulls = [f for f in template_fields(cfg.user_template) if values.get(f) is None and f in values]
        if nulls:
            raise ValueError(f"column(s) {', '.join(nulls)} used by USER_TEMPLATE are null")
        try:
            user = cfg.user_template.format(**values)
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
        source = {k: v for k, v in values.items() if isinstance(v, (str, int, float, bool))}
        return Example(idx, "chat", messages=messages, trained_turns=trained, source=source, tools=tools)
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
        messages, context = _check_messages(raw, "messages")
        if messages[0]["role"] == "assistant":  # it opens the conversation: no prompt serving could send precedes it
            context.append(0)
        if cfg.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": cfg.system_prompt})
            context = [i + 1 for i in context]
        trained = _assistant_turns(messages, context) if cfg.assistant_only_loss else None
        return Example(idx, "chat", messages=messages, trained_turns=trained, tools=_row_tools(row, tools))
    if fmt == "conversational_prompt_completion":
        prompt, unweighted = _check_messages(row["prompt"], "prompt")
        completion, unweighted_c = _check_messages(row["completion"], "completion")
        messages = prompt + completion
        trained = None
        if cfg.completion_only_loss:
            skip = unweighted + [len(prompt) + i for i in unweighted_c]
            trained = [i for i in range(len(prompt), len(messages)) if i not in skip]
        return Example(idx, "chat", messages=messages, trained_turns=trained, tools=_row_tools(row, tools))
    if fmt == "prompt_completion":
        p, c = row["prompt"], row["completion"]
        if not isinstance(p, str) or not isinstance(c, str):
            raise ValueError(f"prompt and completion must be strings, got {type(p).__name__}/{type(c).__name__}")
        return Example(idx, "pc", prompt=p, completion=c)
    text = row[cfg.text_field]
    if not isinstance(text, str):
        raise ValueError(f"{cfg.text_field!r} must be a string, got {type(text).__name__}")
    return Example(idx, "text", text=text)


def _listed(problems: list[str]) -> str:
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return "\n  " + "\n  ".join(problems[:MAX_LISTED]) + more


def shape(
    cfg: Settings, fmt: str, ds, split: str, origin: Origin | None = None, tools: list[dict] | None = None
) -> list[Example]:
    origin = origin or Origin(cfg.dataset, split)
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
            examples.append(shape_row(cfg, fmt, row, tools))
        except ValueError as exc:
            errors.append(f"{origin(row[ROW])}: {exc}")
    if errors:
        raise DataError(
            f"DATASET={cfg.dataset!r} ({split}): {len(errors)} row(s) have the wrong shape for the "
            f"{fmt} format:{_listed(errors)}"
        )
    return examples


# ---------------------------------------------------------------------------------------------- encoding
PER_TURN_GENERATION_PROMPT = (
    "the generation prompt adds text the rendered turn does not contain (e.g. it opens a thinking channel)"
)
PER_TURN_HISTORY = (
    "the template renders earlier turns differently once the conversation goes on (e.g. drops their reasoning)"
)
PER_TURN_TOKENS = (
    "the tokenizer merges text across a turn's boundary, so the ids serving sends for a later prompt do not begin "
    "with the ids of the conversation before it"
)


def ids_of(tok, text: str) -> list[int]:
    """Token ids of rendered chat text the way vLLM's chat completions encode a prompt: the template writes the
    special tokens, the tokenizer adds none (ChatCompletionRequest.add_special_tokens defaults to false)."""
    return tok(text, add_special_tokens=False)["input_ids"] if text else []


def turn_targets(
    tok, messages: list[dict], trained_turns: list[int], tools: list[dict] | None = None
) -> tuple[list[tuple[str, str, int]], str | None]:
    """For each trained turn i: (serving's prompt for messages[:i], what the model must produce after it, the end
    of the turn in the rendering of messages[:i + 1]), and why the conversation cannot be one sequence (None when
    it can). ValueError when a turn's content or tool calls are not in its target: the template hides them."""
    full = render(tok, messages, tools=tools)
    pieces, reason = [], None
    for i in trained_turns:
        prompt = render(tok, messages[:i], add_generation_prompt=True, tools=tools) if i > 0 else ""
        upto = render(tok, messages[: i + 1], tools=tools)
        shared = len(os.path.commonprefix([prompt, upto]))
        target = upto[shared:]
        content = messages[i]["content"].strip()
        if content and content not in target:
            raise ValueError(
                f"assistant turn {i} cannot be located: the chat template renders it as {target!r:.200} "
                "after the prompt serving would send, which does not contain its content"
            )
        for call in messages[i].get("tool_calls") or []:
            if call["function"]["name"] not in target:
                raise ValueError(
                    f"assistant turn {i}: the chat template does not render its tool call "
                    f"{call['function']['name']!r} (it renders the turn as {target!r:.200}); use the model's "
                    "tool-calling template (CHAT_TEMPLATE)"
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


def encode_chat(
    tok, messages: list[dict], trained_turns: list[int] | None, tools: list[dict] | None = None
) -> tuple[list[tuple], str | None]:
    """The training sequences of a conversation as (input_ids, labels) pairs, labels -100 outside the trained
    turns, and why it was split into one sequence per assistant turn (None: one sequence).

    Every prompt and target is tokenized apart. The conversation is one sequence when that is token-exact: the
    rendering cut at each trained turn's prompt and end, each piece tokenized apart, gives for every trained turn
    exactly the ids serving sends for its prompt. Otherwise each trained turn is its own sequence: the ids of its
    prompt, then the ids of its target."""
    if trained_turns is None:
        ids = ids_of(tok, render(tok, messages, tools=tools))
        return [(ids, list(ids))], None
    pieces, reason = turn_targets(tok, messages, trained_turns, tools)
    if reason is None:
        full = render(tok, messages, tools=tools)
        ids: list[int] = []
        labels: list[int] = []
        at = 0
        for k, (prompt, _, end) in enumerate(pieces):
            context = ids_of(tok, full[at : len(prompt)])
            ids += context
            labels += [-100] * len(context)
            # The first prompt is tokenized whole here; a later one must equal the pieces before it.
            if k > 0 and ids != ids_of(tok, prompt):
                reason = PER_TURN_TOKENS
                break
            target = ids_of(tok, full[len(prompt) : end])
            ids += target
            labels += target
            at = end
        else:
            rest = ids_of(tok, full[at:])
            return [(ids + rest, labels + [-100] * len(rest))], None
    sequences = []
    for prompt, target, _ in pieces:
        prompt_ids, target_ids = ids_of(tok, prompt), ids_of(tok, target)
        sequences.append((prompt_ids + target_ids, [-100] * len(prompt_ids) + target_ids))
    return sequences, reason


def encode(tok, ex: Example) -> tuple[list[tuple[list[int], list[int]]], str | None]:
    """The row's training sequences as (input_ids, labels) pairs, and why a conversation was split per turn."""
    if ex.kind == "chat":
        return encode_chat(tok, ex.messages, ex.trained_turns, ex.tools)
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


def _template_error(exc: Exception) -> str:
    """A template's refusal of a row (its `raise_exception` message), or another rendering failure, in one line."""
    from jinja2 import TemplateError

    first = next(iter(str(exc).splitlines()), "")
    if isinstance(exc, TemplateError):
        return f"the chat template refuses it: {first}"
    return first if isinstance(exc, ValueError) else f"{type(exc).__name__}: {first}"


def encode_all(cfg: Settings, tok, examples: list[Example], split: str, origin: Origin | None = None) -> Encoded:
    from tqdm.auto import tqdm

    origin = origin or Origin(cfg.dataset, split)
    rows, too_long, no_loss, errors, per_turn = [], [], [], [], {}
    for ex in tqdm(examples, desc=f"tokenizing {split}", unit="row", disable=len(examples) < 2000):
        try:
            sequences, reason = encode(tok, ex)
        except Exception as exc:  # noqa: BLE001 - jinja2 errors, and what templates raise on data they reject
            errors.append(f"{origin(ex.row)}: {_template_error(exc)}")
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
        raise DataError(f"{split}: {len(errors)} row(s) cannot be tokenized:{_listed(errors)}")
    if no_loss:
        raise DataError(
            f"{split}: {len(no_loss)} row(s) have no tokens to learn from (no assistant turn after the first "
            f"message, every one weight 0, or an empty completion):{_listed([origin(r) for r in no_loss])}"
        )
    if too_long:
        frac = len(too_long) / len(examples)
        listed = ", ".join(f"{origin(r)} ({n} tokens)" for r, n in too_long[:MAX_LISTED]) + (
            " ..." if len(too_long) > MAX_LISTED else ""
        )
        msg = (
            f"{split}: {len(too_long)} of {len(examples)} rows ({frac:.1%}) are longer than "
            f"MAX_SEQ_LENGTH={cfg.max_seq_length}: {listed}"
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


def check_end_of_turn_trained(tok, eot: str, rows, origin: Callable[[int], str]) -> None:
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
            f"{origin(ex.row)}: the end-of-turn token {eot!r} is not inside the loss mask, so the model "
            f"would never learn to stop. Trained part: {shown!r}"
        )


def check_tools_rendered(tok, examples: list[Example], origin: Callable[[int], str]) -> None:
    """Preflight: when rows carry tools, the chat template writes them into the prompt (a template without tool
    support ignores `tools` silently, and the model would learn to call functions it was never shown)."""
    ex = next((e for e in examples if e.kind == "chat" and e.tools), None)
    if ex is None:
        return
    upto = next((i for i, m in enumerate(ex.messages) if m["role"] == "assistant"), len(ex.messages))
    head = ex.messages[:upto] or ex.messages[:1]
    try:
        with_tools = render(tok, head, add_generation_prompt=True, tools=ex.tools)
        without = render(tok, head, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - the template's own refusal, reported with the row
        raise DataError(
            f"{origin(ex.row)}: the chat template cannot render this row with its tools: {_template_error(exc)}"
        ) from None
    names = [t["function"]["name"] for t in ex.tools]
    if with_tools == without or not all(n in with_tools for n in names):
        raise DataError(
            f"{origin(ex.row)}: the rows carry tools ({', '.join(names)}) but the chat template does not render "
            "them into the prompt, so the model would learn to call functions it is never shown. Use the model's "
            "tool-calling template (CHAT_TEMPLATE=<its .jinja file>), or drop the tools"
        )


def tool_call_samples(tok, examples: list[Example], end_of_turn: str | None, limit: int = 4) -> list[dict]:
    """How the template renders some trained tool-call turns (the text the model learns to write, up to the end of
    its turn) and the calls in them: serving picks the tool-call parser that reads these back."""
    samples = []
    for ex in examples:
        turn = next((i for i in ex.trained_turns or [] if ex.messages[i].get("tool_calls")), None)
        if turn is None:
            continue
        [(_, target, _)], _ = turn_targets(tok, ex.messages, [turn], ex.tools)
        calls = ex.messages[turn]["tool_calls"]
        samples.append(
            {
                "row": ex.row,
                "text": target.split(end_of_turn)[0] if end_of_turn else target,
                "tools": ex.tools,
                "tool_calls": [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls],
            }
        )
        if len(samples) == limit:
            break
    return samples


def write_jsonl(path: Path, examples: list[Example]) -> None:
    with written_atomically(path) as f:
        for ex in examples:
            f.write(json.dumps(ex.to_json(), ensure_ascii=False) + "\n")


@dataclass
class Shaped:
    format: str
    train: list[Example]
    eval: list[Example]
    origins: dict[str, Origin]  # split -> where its rows come from

    @property
    def is_chat(self) -> bool:
        return self.train[0].kind == "chat"

    @property
    def has_tools(self) -> bool:
        return any(ex.tools or any(m.get("tool_calls") for m in ex.messages or []) for ex in self.train)


def read_tools_file(path: str) -> list[dict]:
    """The TOOLS file: a JSON list of function schemas (OpenAI's `tools` request field) for every row."""
    try:
        tools = normalize_tools(Path(path).read_text(), f"TOOLS={path}")
    except OSError as exc:
        raise ConfigError(f"TOOLS={path!r}: cannot be read ({exc.strerror})") from None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not tools:
        raise ConfigError(f"TOOLS={path!r}: the file holds no tools")
    return tools


def load_and_shape(cfg: Settings) -> Shaped:
    """Load the dataset and turn every row into an Example (no tokenizer needed yet)."""
    tools = read_tools_file(cfg.tools) if cfg.tools else None
    train_raw, eval_raw, origins = load_raw(cfg)
    columns = [c for c in train_raw.column_names if c != ROW]
    fmt = detect_format(cfg, columns, train_raw[0])
    log.info(
        "dataset %s: %d training rows%s, format: %s",
        cfg.dataset,
        len(train_raw),
        f", {len(eval_raw)} evaluation rows" if eval_raw is not None else "",
        fmt,
    )
    train_ex = shape(cfg, fmt, train_raw, "train", origins["train"], tools)
    eval_ex = shape(cfg, fmt, eval_raw, "eval", origins["eval"], tools) if eval_raw is not None else []
    return Shaped(fmt, train_ex, eval_ex, origins)


def tokenize(cfg: Settings, tok_info, shaped: Shaped, data_dir: Path | None) -> PreparedData:
    """Tokenize and check. Writes the kept rows to data_dir (train.jsonl, eval.jsonl) unless None."""
    from datasets import Dataset

    tok = tok_info.tokenizer
    path = template_path(tok) if shaped.is_chat else None
    if path is not None:
        log.info("chat template (%s): %s", tok_info.template_source, path)
    origins = shaped.origins
    check_tools_rendered(tok, shaped.train, origins["train"])
    train = encode_all(cfg, tok, shaped.train, "train", origins["train"])
    train_rows = train.rows
    if tok_info.end_of_turn is not None:
        check_end_of_turn_trained(tok, tok_info.end_of_turn, train_rows, origins["train"])
    eval_rows = encode_all(cfg, tok, shaped.eval, "eval", origins["eval"]).rows if shaped.eval else []

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
    samples = tool_call_samples(tok, kept_train, tok_info.end_of_turn) if shaped.is_chat else []
    if samples:
        stats["tool_call_turns"] = sum(
            1 for ex in kept_train for i in ex.trained_turns or [] if ex.messages[i].get("tool_calls")
        )
    return PreparedData(
        shaped.format,
        to_ds(train_rows),
        to_ds(eval_rows) if eval_rows else None,
        kept_train,
        kept_eval,
        stats,
        samples,
    )
