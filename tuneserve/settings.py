"""Typed environment-variable schemas: one registry per entrypoint, validated before torch is imported.

Every variable an entrypoint reads is declared once here (`Var`): its type, default and one line of
help. `--help`, `--print-config` and the variable tables in docs/configuration.md are generated from these
declarations. Values come from the process environment and from a `.env` file (python-dotenv);
`ENV_FILE` names another file; the real environment wins over the file.

Parsing reports every problem at once (`ConfigError` -> exit 2): the variable, the value and what is
allowed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneserve.exitcodes import ConfigError

TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")
MASK = "***"
SECRET_FILE_MAX_BYTES = 65536  # a token or key file; anything larger is a mistake (a file of the wrong kind)


def parse_bool(raw: str) -> bool:
    low = raw.strip().lower()
    if low in TRUE_WORDS:
        return True
    if low in FALSE_WORDS:
        return False
    raise ValueError(f"expected a boolean ({'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)})")


def parse_auto_bool(raw: str) -> bool | str:
    """`auto` (the tool decides, and logs why) or a boolean."""
    if raw.strip().lower() == "auto":
        return "auto"
    try:
        return parse_bool(raw)
    except ValueError as exc:
        raise ValueError(f"expected auto or {str(exc).removeprefix('expected ')}") from None


def parse_list(raw: str) -> list[str]:
    """A JSON list, or a comma-separated list (`q_proj,v_proj`)."""
    text = raw.strip()
    if text.startswith("["):
        value = json.loads(text)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError("expected a JSON list of strings")
        return value
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_int_or_fraction(raw: str) -> float | int:
    """A count (`200`) or a fraction of the dataset in (0, 1) (`0.1`)."""
    text = raw.strip()
    try:
        value = int(text)
    except ValueError:
        value = float(text)
        if not 0.0 < value < 1.0:
            raise ValueError("expected a count (integer >= 1) or a fraction in (0, 1)") from None
        return value
    if value < 1:
        raise ValueError("expected a count (integer >= 1) or a fraction in (0, 1)")
    return value


def parse_text(raw: str) -> str:
    """Free text in which the two-character sequences backslash-n and backslash-t mean a newline and a tab,
    so multi-line prompts fit in `docker run -e` and one-line .env values."""
    return raw.replace("\\n", "\n").replace("\\t", "\t")


PARSERS: dict[str, Callable[[str], Any]] = {
    "str": str,
    "text": parse_text,
    "int": lambda s: int(s.strip()),
    "float": lambda s: float(s.strip()),
    "bool": parse_bool,
    "auto|bool": parse_auto_bool,
    "list": parse_list,
    "json": json.loads,
    "count|fraction": parse_int_or_fraction,
}


def shorten(value: Any, limit: int = 80, quote: bool = True) -> str:
    """A value for a message: its repr (or the text itself), cut to `limit` characters with its length said."""
    text = repr(value) if quote else str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _without(message: str, raw: str) -> str:
    """A parser's message about a long value, cut: parsers quote their input (int() up to 200 characters)."""
    return message if len(raw) <= 80 else shorten(message, limit=100, quote=False)


@dataclass(frozen=True)
class Var:
    """One environment variable."""

    name: str
    type: str  # a key of PARSERS
    default: Any
    help: str
    group: str = "General"
    required: bool = False
    secret: bool = False
    choices: tuple[str, ...] | None = None
    minimum: float | None = None  # inclusive
    exclusive_minimum: float | None = None
    maximum: float | None = None  # inclusive

    def parse(self, raw: str) -> Any:
        if self.type not in ("str", "text") and raw.strip().lower() in ("", "none", "null") and not self.required:
            return None
        value = PARSERS[self.type](raw)
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"expected one of {', '.join(self.choices)}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if self.minimum is not None and value < self.minimum:
                raise ValueError(f"must be >= {self.minimum:g}")
            if self.exclusive_minimum is not None and value <= self.exclusive_minimum:
                raise ValueError(f"must be > {self.exclusive_minimum:g}")
            if self.maximum is not None and value > self.maximum:
                raise ValueError(f"must be <= {self.maximum:g}")
        return value

    @property
    def attr(self) -> str:
        return self.name.lower()

    def default_text(self) -> str:
        if self.required:
            return "(required)"
        if self.default is None:
            return "(unset)"
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        if isinstance(self.default, list):
            return ",".join(self.default)
        return str(self.default)


@dataclass(frozen=True)
class Prefix:
    """A family of pass-through variables: `<PREFIX><FIELD>` sets field `<field>` of a library config."""

    prefix: str  # e.g. "SFT_"
    table: str  # key in passthrough_fields.json
    target: str  # human name, e.g. "trl.SFTConfig"
    # Fields the schema sets itself; naming them under the prefix is an error that points to the variable.
    managed: Mapping[str, str] = field(default_factory=dict)
    # For BNB_: try the whole lowercased name first (BNB_4BIT_QUANT_TYPE -> bnb_4bit_quant_type).
    whole_name_first: bool = False
    # Variables that share the prefix but belong to someone else (e.g. bitsandbytes' BNB_CUDA_VERSION).
    foreign: tuple[str, ...] = ()
    # Where the field table comes from when it is not in passthrough_fields.json (field -> value kinds).
    fields: Callable[[], Mapping[str, list[str]]] | None = None


def convert_kinds(raw: str, kinds: list[str]) -> Any:
    text = raw.strip()
    if "none" in kinds and text.lower() in ("none", "null"):
        return None
    if "bool" in kinds and text.lower() in TRUE_WORDS + FALSE_WORDS and not ("int" in kinds and text in ("0", "1")):
        return parse_bool(text)
    if "int" in kinds:
        try:
            return int(text)
        except ValueError:
            pass
    if "float" in kinds:
        try:
            return float(text)
        except ValueError:
            pass
    if "json" in kinds and (text[:1] in "[{" or "str" not in kinds):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON ({exc.msg} at position {exc.pos})") from None
    if "str" in kinds:
        return raw
    raise ValueError(f"expected {' or '.join(k for k in kinds if k != 'none')}")


class Settings:
    """The resolved configuration: attribute access by lowercased variable name."""

    def __init__(
        self, schema: Schema, values: dict[str, Any], extras: dict[str, dict[str, Any]], sources: dict[str, str]
    ):
        self._schema = schema
        self._values = values
        self.extras = extras  # prefix table -> {field: value}
        self.sources = sources  # variable -> "env" | ".env path" | "default"

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name.upper()]
        except KeyError:
            raise AttributeError(name) from None

    def get(self, name: str) -> Any:
        return self._values[name]

    def pin(self, name: str, value: Any, source: str) -> None:
        """Fix NAME for the rest of the run, and for the processes it starts (a Hub revision resolved to its commit
        by rundir); `source` says where the value came from."""
        self._values[name] = value
        self.sources[name] = source
        os.environ[name] = str(value)

    def masked(self) -> dict[str, Any]:
        """The resolved configuration, secrets replaced by `***` (used for printing and for files)."""
        out: dict[str, Any] = {}
        for var in self._schema.vars:
            value = self._values[var.name]
            out[var.name] = MASK if (var.secret and value) else value
        for p in self._schema.prefixes:
            for key, value in self.extras.get(p.table, {}).items():
                out[f"{p.prefix}{key.upper()}"] = value
        return out

    def secret(self, name: str) -> str | None:
        """The secret NAME: its variable when set, else the contents of the file NAME_FILE names (a mounted
        Kubernetes Secret), without the surrounding whitespace files end with. None when neither is set."""
        value = self._values.get(name)
        if value is not None:
            return value
        path = self._values.get(f"{name}_FILE")
        return Path(path).read_text().strip() if path else None

    def secret_file_problems(self, name: str) -> list[str]:
        """Why NAME_FILE cannot be read, when NAME is not set and NAME_FILE is."""
        path = self._values.get(f"{name}_FILE")
        if self._values.get(name) is not None or not path:
            return []
        if not Path(path).is_file():
            return [f"{name}_FILE={path!r}: no such file"]
        try:
            if (size := Path(path).stat().st_size) > SECRET_FILE_MAX_BYTES:
                return [f"{name}_FILE={path!r}: {size} bytes, not a secret (at most {SECRET_FILE_MAX_BYTES} are read)"]
            Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            return [f"{name}_FILE={path!r}: cannot be read ({type(exc).__name__})"]
        return []

    def secrets(self) -> list[str]:
        """Every secret value, whether set directly or read from its *_FILE (for redacting logs)."""
        out = []
        for v in self._schema.vars:
            if not v.secret:
                continue
            try:
                value = self.secret(v.name) if f"{v.name}_FILE" in self._schema.by_name else self._values[v.name]
            except (OSError, UnicodeDecodeError):
                value = None
            if value:
                out.append(value)
        return out


class Schema:
    def __init__(
        self,
        name: str,
        vars: list[Var],
        prefixes: list[Prefix] = (),
        validate: Callable[[Settings], list[str]] | None = None,
    ):
        self.name = name
        self.vars = list(vars)
        self.by_name = {v.name: v for v in self.vars}
        self.prefixes = list(prefixes)
        self.validate = validate
        assert len(self.by_name) == len(self.vars), "duplicate variable"

    # ---- reading -------------------------------------------------------------------------
    def read_environment(self, environ: Mapping[str, str] | None = None) -> tuple[dict[str, str], dict[str, str]]:
        """Merge `.env` (or ENV_FILE) under the real environment. Returns (values, sources)."""
        env = dict(os.environ if environ is None else environ)
        sources = {k: "environment" for k in env}
        env_file = env.get("ENV_FILE")
        path = Path(env_file) if env_file else Path(".env")
        if env_file and not path.is_file():
            raise ConfigError(f"ENV_FILE={env_file!r}: no such file; point ENV_FILE at a .env file or unset it")
        if path.is_file():
            from dotenv import dotenv_values

            for key, value in dotenv_values(path).items():
                if key not in env and value is not None:
                    env[key] = value
                    sources[key] = str(path)
        return env, sources

    def load(self, environ: Mapping[str, str] | None = None) -> Settings:
        env, sources = self.read_environment(environ)
        problems: list[str] = []
        values: dict[str, Any] = {}
        for var in self.vars:
            raw = env.get(var.name)
            if raw is None or (raw.strip() == "" and var.type not in ("str", "text")):
                if var.required:
                    problems.append(f"{var.name} is required: {var.help}")
                values[var.name] = var.default
                continue
            if var.required and raw.strip() == "":
                problems.append(f"{var.name} is required and is empty: {var.help}")
                values[var.name] = None
                continue
            try:
                values[var.name] = var.parse(raw)
            except (ValueError, json.JSONDecodeError) as exc:
                shown = MASK if var.secret else shorten(raw)
                problems.append(f"{var.name}={shown}: {_without(str(exc), raw)}")
                values[var.name] = var.default
        extras, extra_problems = self._load_prefixed(env)
        problems += extra_problems
        settings = Settings(self, values, extras, {k: sources.get(k, "default") for k in values})
        if self.validate is not None:
            problems += self.validate(settings)
        if problems:
            raise ConfigError(problems)
        return settings

    def _load_prefixed(self, env: Mapping[str, str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
        from tuneserve import passthrough

        tables = passthrough.load()
        extras: dict[str, dict[str, Any]] = {p.table: {} for p in self.prefixes}
        problems: list[str] = []
        for key in sorted(env):
            if key in self.by_name:
                continue
            for p in self.prefixes:
                if not key.startswith(p.prefix) or key in p.foreign:
                    continue
                fields = p.fields() if p.fields is not None else tables[p.table]
                candidates = [key[len(p.prefix) :].lower()]
                if p.whole_name_first:
                    candidates.insert(0, key.lower())
                name = next((c for c in candidates if c in fields), None)
                if name is None:
                    problems.append(
                        f"{key}: {p.prefix}* variables set fields of {p.target}, and it has no field "
                        f"{candidates[-1]!r}; check the spelling (fields are listed in its documentation)"
                    )
                elif name in p.managed:
                    problems.append(f"{key}: {p.target}.{name} is set by this tool; {p.managed[name]}")
                else:
                    try:
                        extras[p.table][name] = convert_kinds(env[key], fields[name])
                    except ValueError as exc:
                        problems.append(f"{key}={shorten(env[key])}: {_without(str(exc), env[key])}")
                break
        return extras, problems

    # ---- documentation -----------------------------------------------------------------------
    def help_text(self) -> str:
        lines: list[str] = []
        group = None
        for var in self.vars:
            if var.group != group:
                group = var.group
                lines.append(f"\n{group}:")
            extra = f" One of: {', '.join(var.choices)}." if var.choices else ""
            secret = " Secret: never printed." if var.secret else ""
            lines.append(f"  {var.name}  [{var.type}, default: {var.default_text()}]")
            lines.append(f"      {var.help}{extra}{secret}")
        if self.prefixes:
            lines.append("\nPass-through prefixes (any other field of these configs; lists/dicts as JSON):")
            for p in self.prefixes:
                lines.append(f"  {p.prefix}<FIELD>  ->  {p.target}")
        return "\n".join(lines)

    def markdown_table(self) -> str:
        rows = ["| Variable | Type | Default | Description |", "|---|---|---|---|"]
        for var in self.vars:
            extra = f" One of: `{'`, `'.join(var.choices)}`." if var.choices else ""
            secret = " Secret: never printed or written." if var.secret else ""
            default = var.default_text()
            default = default if default.startswith("(") else f"`{default}`"
            rows.append(f"| `{var.name}` | {var.type} | {default} | {var.help}{extra}{secret} |")
        return "\n".join(rows)
