"""The engine evaluation (serving image, `python -m entrypoints.evaluate`): the held-out rows of a training run
answered by vLLM itself, and the gate a quantized model must pass before it is published or served.

Training verifies and evaluates in transformers; users serve in vLLM, and "worse once served" is a known
complaint (a different chat template path, stop ids, kernels, and quantization). So after training, on the
same OUTPUT_DIR:

1. OUTPUT_DIR/merged, then OUTPUT_DIR/quantized (QUANTIZE), each load into a vLLM engine of their own (a child
   process each, so the first one's memory is gone before the second starts) and answer the held-out rows
   (data/eval.jsonl, at most the EVAL_MAX_SAMPLES training used): greedy, through the model's own chat
   template, at most EVAL_MAX_NEW_TOKENS tokens. Memory (weights) and generated tokens per second are recorded.
   Each engine spans as many GPUs as its folder's weights need (tensor parallelism, choose_tensor_parallel, or
   ENGINE_TENSOR_PARALLEL_SIZE); a model the visible GPUs cannot hold is refused (exit 2) before vLLM starts.
2. The answers are scored by the evaluate stage's own code (exact match, stop rate, SQL execution with
   EVAL_SQL_EXECUTION), with the evaluation settings the training run recorded in config.json.
3. Engine parity: the merged model's figures in vLLM beside the evaluate stage's (transformers) figures, with
   the rows whose answers differ. Reported, not gated: both are the same weights.
4. The gate: each figure of the quantized model may be at most QUANTIZE_MAX_DROP below the merged model's
   (both measured here). The verdict is written into the quantized folder (engine_gate.json) with the sha256 of
   every file the engine loaded; the serving entrypoint refuses a quantized folder of this tool without a passing
   verdict for exactly those files, and HUB_QUANTIZED_MODEL_ID is published only when it passed. Outside the
   budget: exit 4, nothing published.

Everything is written to OUTPUT_DIR/engine_eval.json, and both model cards get the table.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tuneserve.config import TRAIN_SCHEMA
from tuneserve.exitcodes import ConfigError, VerifyError
from tuneserve.layout import (
    ENGINE_GATE,
    EVAL_ROWS,
    MERGE_INFO,
    QUANTIZE_INFO,
    Layout,
    merged_id,
    read_json,
    read_json_or_none,
    sha256_file,
    visible_files,
    write_json_atomic,
)
from tuneserve.memory import gpus as gpu_totals
from tuneserve.memory import weights_bytes
from tuneserve.settings import Schema, Settings, Var
from tuneserve.trainlog import CURVES_PNG

log = logging.getLogger(__name__)

G_GATE, G_PUBLISH, G_RUN = "Gate", "Publish the quantized model", "Run"
GATED = ("exact_match", "sql_execution_match", "stop_rate")  # the task figures the gate compares
# Written after the evaluation: the verdict, the card and its picture.
NOT_MEASURED = frozenset({ENGINE_GATE, "README.md", CURVES_PNG})
_shared = TRAIN_SCHEMA.by_name
EVAL_VARS = [
    _shared["OUTPUT_DIR"],
    Var(
        "QUANTIZE_MAX_DROP",
        "float",
        0.02,
        "Accuracy budget: how far below the merged model each task figure of the quantized one (exact match, SQL "
        "execution match, stop rate; fractions of the held-out rows, both answered by vLLM) may fall. Beyond it: "
        "exit 4, the quantized model is neither published nor served.",
        G_GATE,
        minimum=0.0,
        maximum=1.0,
    ),
    Var(
        "ENGINE_MAX_MODEL_LEN",
        "int",
        None,
        "vLLM's context length for the evaluation (default: the longest held-out prompt + EVAL_MAX_NEW_TOKENS).",
        G_GATE,
        minimum=16,
    ),
    Var(
        "ENGINE_TENSOR_PARALLEL_SIZE",
        "int",
        None,
        "GPUs each model's vLLM engine spans (default: per model, the fewest visible GPUs that hold its weights "
        "with room for the KV cache and that divide its attention heads; 1 on the CPU).",
        G_GATE,
        minimum=1,
    ),
    Var(
        "HUB_QUANTIZED_MODEL_ID",
        "str",
        None,
        "Publish OUTPUT_DIR/quantized here (with its card) once it passed the gate; unset: it stays on the volume.",
        G_PUBLISH,
    ),
    _shared["HUB_PRIVATE"],
    _shared["HUB_REVISION"],
    _shared["PUBLISH_RETRIES"],
    _shared["PUBLISH_BACKOFF_SECONDS"],
    _shared["HF_TOKEN"],
    _shared["HF_TOKEN_FILE"],
    _shared["LOG_LEVEL"],
    _shared["ENV_FILE"],
]


def _validate(s: Settings) -> list[str]:
    problems = s.secret_file_problems("HF_TOKEN")
    repo = s.hub_quantized_model_id
    if repo is not None and repo.count("/") != 1:
        problems.append(f"HUB_QUANTIZED_MODEL_ID={repo!r}: expected a repo id like org/name")
    return problems


EVAL_SCHEMA = Schema("evaluate", EVAL_VARS, (), _validate)


# --------------------------------------------------------------------------------------------- the gate
def gate(merged: dict[str, Any], quantized: dict[str, Any], budget: float) -> dict[str, Any]:
    """Each gated figure's drop from the merged to the quantized model; passed when none exceeds the budget."""
    shared = [k for k in GATED if merged.get(k) is not None and quantized.get(k) is not None]
    drops = {k: round(merged[k] - quantized[k], 4) for k in shared}
    over = {k: d for k, d in drops.items() if d > budget + 1e-9}
    return {"passed": bool(drops) and not over, "budget": budget, "drops": drops, "over_budget": over}


def measured_files(folder: Path) -> dict[str, str]:
    """Relative name -> sha256 of every file of a model folder the engine evaluation vouches for (hidden files,
    the verdict and the card aside)."""
    return {
        str(p.relative_to(folder)): sha256_file(p)
        for p in visible_files(folder)
        if str(p.relative_to(folder)) not in NOT_MEASURED
    }


def gate_problem(folder: Path) -> str | None:
    """Why a folder must not be served: a quantized folder of this tool without a passing verdict for exactly
    these files. None for anything else (a merged folder, a model from elsewhere)."""
    if not (folder / QUANTIZE_INFO).exists() and not (folder / ENGINE_GATE).exists():
        return None
    info = read_json_or_none(folder / QUANTIZE_INFO)  # unreadable: the file comparison below names it
    verdict = read_json_or_none(folder / ENGINE_GATE)
    if verdict is None:
        return (
            f"{folder} is a quantized model ({(info or {}).get('scheme')}) that has not been through the engine "
            "evaluation: run `python -m entrypoints.evaluate` (serving image) on its OUTPUT_DIR first, or serve the "
            "merged folder"
        )
    if info is not None and (
        verdict.get("source_id") != info.get("source_id") or verdict.get("scheme") != info.get("scheme")
    ):
        return f"{folder}: its engine_gate.json is for other weights; rerun `python -m entrypoints.evaluate`"
    if not verdict.get("passed"):
        return (
            f"{folder} failed the engine evaluation's gate (drops {verdict.get('drops')} > budget "
            f"{verdict.get('budget')}); serve the merged folder instead"
        )
    measured, now = verdict.get("files") or {}, measured_files(folder)
    if not measured:
        return f"{folder}: its engine_gate.json names no files (an older evaluation); rerun the engine evaluation"
    for name in sorted(measured.keys() | now.keys()):
        if measured.get(name) != now.get(name):
            how = "is missing" if name not in now else "was not evaluated" if name not in measured else "changed"
            return (
                f"{folder / name} {how} since the engine evaluation passed: these are not the weights it measured; "
                "rerun `python -m entrypoints.evaluate` on the OUTPUT_DIR, or serve the merged folder"
            )
    return None


# --------------------------------------------------------------------------------------------- GPUs per engine
# vLLM's share of each GPU's memory (gpu_memory_utilization, passed to LLM(...) so that the estimate and the engine
# agree: the serving default, GPU_MEMORY_UTILIZATION; vLLM 0.32's own is 0.92), and the part of that share a GPU's
# slice of the weights may take: the rest is for the KV cache, activations and CUDA graphs.
GPU_MEMORY_UTILIZATION = 0.9
WEIGHTS_SHARE = 0.8
GB = 1e9
# The config attributes vLLM reads the KV heads from (ModelArchConfigConvertor.get_total_num_kv_heads), in order;
# none of them: as many as attention heads.
KV_HEAD_ATTRS = ("n_head_kv", "num_kv_heads", "num_key_value_heads", "multi_query_group_num", "num_attention_groups")
GIVE_GPUS = (
    "give the evaluation {n} GPUs: `nvidia.com/gpu: {n}` in the evaluation Job's limits and requests "
    "(k8s/components/engine-eval/evaluate-job.yaml), `docker run --gpus {n}` (or --gpus '\"device=0,...\"')"
)


def visible_gpus() -> tuple[int, int] | None:
    """(GPUs this process sees, the smallest one's memory in bytes); None without CUDA (vLLM's CPU build).
    torch counts the GPUs CUDA_VISIBLE_DEVICES leaves (the container's, on Kubernetes and docker --gpus)."""
    totals = gpu_totals()
    return (len(totals), min(totals)) if totals else None


def model_heads(folder: Path) -> tuple[int | None, int | None]:
    """(attention heads, KV heads) of a model folder as vLLM reads them: the text model's config (a multimodal
    model's text_config), KV heads under any of KV_HEAD_ATTRS, else one per attention head."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder).get_text_config()
    heads = getattr(config, "num_attention_heads", None) or None
    kv = next((getattr(config, a) for a in KV_HEAD_ATTRS if getattr(config, a, None) is not None), heads)
    return heads, kv or heads


def divides_heads(tp: int, heads: int | None, kv_heads: int | None) -> bool:
    """vLLM's rules: ModelConfig.verify_with_parallel_config refuses attention heads % tp != 0, and
    QKVParallelLinear splits the KV heads (kv % tp == 0) or replicates them (tp % kv == 0)."""
    if heads and heads % tp:
        return False
    return not kv_heads or kv_heads % tp == 0 or tp % kv_heads == 0


def _weights_fit(weights_bytes: int, tp: int, gpu_memory: int) -> bool:
    return weights_bytes / tp <= WEIGHTS_SHARE * GPU_MEMORY_UTILIZATION * gpu_memory


def choose_tensor_parallel(
    weights_bytes: int,
    heads: int | None,
    kv_heads: int | None,
    gpus: tuple[int, int] | None,
    override: int | None = None,
) -> dict[str, Any]:
    """How many GPUs one model's engine spans: {"size", "mode", "reason", and the figures it was chosen from}.
    `gpus`: visible_gpus(). Auto: the smallest size that divides the heads (divides_heads), is at most the visible
    GPUs and gives each GPU at most WEIGHTS_SHARE of vLLM's share of its memory in weights. ConfigError (exit 2)
    when nothing visible fits, or when `override` (ENGINE_TENSOR_PARALLEL_SIZE) cannot work."""
    figures = {"weights_bytes": weights_bytes, "attention_heads": heads, "kv_heads": kv_heads}
    if gpus is None:
        if override is not None and override > 1:
            raise ConfigError(
                f"ENGINE_TENSOR_PARALLEL_SIZE={override}: no GPU is visible (vLLM's CPU build), where the "
                "evaluation runs one engine process; unset it, or run the evaluation where the GPUs are"
            )
        return {"size": 1, "mode": "cpu", "reason": "no GPU: vLLM's CPU build, one process", **figures}
    count, memory = gpus
    figures |= {"visible_gpus": count, "gpu_memory_bytes": memory}
    per_gpu = WEIGHTS_SHARE * GPU_MEMORY_UTILIZATION * memory
    sizes = [n for n in range(1, count + 1) if divides_heads(n, heads, kv_heads)]
    heads_text = f"{heads} attention heads" + (f" and {kv_heads} KV heads" if kv_heads != heads else "")
    budget = (
        f"{weights_bytes / GB:.1f} GB of weights; each of the {count} visible GPU(s) has {memory / GB:.1f} GB, "
        f"of which at most {per_gpu / GB:.1f} GB for its slice of the weights ({WEIGHTS_SHARE:.0%} of vLLM's "
        f"{GPU_MEMORY_UTILIZATION:.0%}; the rest is KV cache and activations)"
    )
    if override is not None:
        if override > count:
            raise ConfigError(
                f"ENGINE_TENSOR_PARALLEL_SIZE={override}: only {count} GPU(s) are visible; "
                f"{GIVE_GPUS.format(n=override)}, or lower it (unset: chosen from the weights)"
            )
        if not divides_heads(override, heads, kv_heads):
            raise ConfigError(
                f"ENGINE_TENSOR_PARALLEL_SIZE={override}: vLLM splits the model's {heads_text} evenly over its "
                f"GPUs; sizes that do, up to the {count} visible GPU(s): {', '.join(map(str, sizes))}"
            )
        if weights_bytes / override > GPU_MEMORY_UTILIZATION * memory:
            raise ConfigError(
                f"ENGINE_TENSOR_PARALLEL_SIZE={override}: {weights_bytes / override / GB:.1f} GB of weights per GPU "
                f"is more than vLLM may use of a {memory / GB:.1f} GB GPU ({GPU_MEMORY_UTILIZATION:.0%}); raise "
                "it, or unset it to choose automatically"
            )
        short = "" if _weights_fit(weights_bytes, override, memory) else " (little room left for the KV cache)"
        return {"size": override, "mode": "ENGINE_TENSOR_PARALLEL_SIZE", "reason": f"set{short}; {budget}", **figures}
    fitting = [n for n in sizes if _weights_fit(weights_bytes, n, memory)]
    if fitting:
        n = fitting[0]
        why = "the smallest size that" + (" divides the heads and" if n > 1 else "") + " holds the weights"
        return {"size": n, "mode": "auto", "reason": f"{why}: {budget}", **figures}
    limit = heads or kv_heads or 1024
    needed = next(
        (
            n
            for n in range(count + 1, limit + 1)
            if divides_heads(n, heads, kv_heads) and _weights_fit(weights_bytes, n, memory)
        ),
        None,
    )
    if needed is None:
        raise ConfigError(
            f"{budget}: it does not fit even spread over {limit} such GPUs (the {heads_text}); evaluate on GPUs "
            "with more memory"
        )
    raise ConfigError(
        f"{budget}: it needs {needed} GPUs (the fewest that hold it and divide the {heads_text}); "
        f"{GIVE_GPUS.format(n=needed)}, or GPUs with more memory"
    )


def tensor_parallel_plan(folder: Path, override: int | None, gpus: tuple[int, int] | None) -> dict[str, Any]:
    """choose_tensor_parallel for a model folder: its *.safetensors bytes and heads."""
    weights = weights_bytes(folder)
    heads, kv_heads = model_heads(folder)
    return choose_tensor_parallel(weights, heads, kv_heads, gpus, override)


# --------------------------------------------------------------------------------------------- one engine
def answer_in_engine(
    folder: Path,
    rows: Path,
    *,
    max_samples: int,
    max_new_tokens: int,
    max_model_len: int | None,
    tensor_parallel_size: int = 1,
):
    """Start vLLM on `folder` (over `tensor_parallel_size` GPUs, see choose_tensor_parallel) and answer the
    held-out rows greedily. Runs in a child process (see `run`)."""
    from vllm import LLM, SamplingParams

    from tuneserve.data import read_jsonl
    from tuneserve.verify import device, to_prompt

    prompts = [to_prompt(ex) for ex in read_jsonl(rows)[:max_samples]]
    if max_model_len is None:  # room for the longest prompt and its answer, not the model's whole context
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
        max_model_len = max(len(p.encode(tok)) for p in prompts) + max_new_tokens
    load_start = time.perf_counter()
    llm = LLM(
        model=str(folder),
        dtype="auto",
        seed=0,
        max_model_len=max_model_len,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=GPU_MEMORY_UTILIZATION,
        enforce_eager=device() == "cpu",  # CUDA graphs on a GPU; the CPU build has none
        disable_log_stats=True,
    )
    load_seconds = time.perf_counter() - load_start
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    start = time.perf_counter()
    chat = [i for i, p in enumerate(prompts) if p.messages is not None]
    text = [i for i, p in enumerate(prompts) if p.messages is None]
    outputs: dict[int, Any] = {}
    by_tools: dict[str, tuple[list[dict] | None, list[int]]] = {}  # vLLM's chat takes one list of tools per call
    for i in chat:
        by_tools.setdefault(json.dumps(prompts[i].tools), (prompts[i].tools, []))[1].append(i)
    for tools, group in by_tools.values():  # the model's own chat template, as a /v1/chat/completions request gets it
        conversations = [prompts[i].messages for i in group]
        for i, out in zip(group, llm.chat(conversations, params, use_tqdm=False, tools=tools)):
            outputs[i] = out
    if text:
        for i, out in zip(text, llm.generate([prompts[i].text for i in text], params, use_tqdm=False)):
            outputs[i] = out
    seconds = time.perf_counter() - start
    done = [outputs[i].outputs[0] for i in range(len(prompts))]
    generated = sum(len(o.token_ids) for o in done)
    return {
        "answers": [o.text.strip() for o in done],
        "stopped": [o.finish_reason == "stop" for o in done],
        "generated_tokens": generated,
        "generation_seconds": round(seconds, 3),
        "tokens_per_second": round(generated / seconds, 2) if seconds else None,
        "load_seconds": round(load_seconds, 2),
        "weights_bytes": weights_bytes(folder),
    }


def _in_child(
    folder: Path, rows: Path, settings: dict[str, Any], max_model_len: int | None, tensor_parallel_size: int
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tuneserve-engine-") as tmp:
        out = Path(tmp) / "answers.json"
        request = {
            "folder": str(folder),
            "rows": str(rows),
            "max_model_len": max_model_len,
            "tensor_parallel_size": tensor_parallel_size,
            **settings,
        }
        code = subprocess.call(
            [sys.executable, "-m", "tuneserve.engine_eval", json.dumps(request), str(out)],
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
        if code != 0 or not out.is_file():
            raise RuntimeError(f"vLLM could not answer the held-out rows with {folder} (exit {code}; see above)")
        return json.loads(out.read_text())


# --------------------------------------------------------------------------------------------- the command
def run(cfg: Settings, check_only: bool = False) -> int:
    from tuneserve import card
    from tuneserve.data import read_jsonl
    from tuneserve.evaluate import score
    from tuneserve.pipeline import use_token
    from tuneserve.verify import to_prompt

    use_token(cfg)
    layout = Layout.of(cfg.output_dir)
    rows = layout.data / EVAL_ROWS
    if not (layout.merged / MERGE_INFO).is_file() or not layout.config.is_file():
        raise ConfigError(f"OUTPUT_DIR={str(layout.root)!r} holds no merged model of a finished training run")
    if not rows.is_file():
        raise ConfigError(
            f"{rows}: no held-out rows to evaluate with; train with EVAL_SPLIT or EVAL_SIZE so that there are"
        )
    trained = json.loads(layout.config.read_text())

    def used(name: str):  # the evaluation setting the training run used (its default if it predates it)
        return trained.get(name, _shared[name].default)

    settings = {"max_samples": used("EVAL_MAX_SAMPLES"), "max_new_tokens": used("EVAL_MAX_NEW_TOKENS")}
    scoring = {"sql_execution": used("EVAL_SQL_EXECUTION"), "sql_context_field": used("EVAL_SQL_CONTEXT_FIELD")}
    info = read_json(layout.quantized / QUANTIZE_INFO)
    quantized = info is not None
    if quantized and info["source_id"] != merged_id(layout.merged):
        raise ConfigError(
            f"{layout.quantized} was made from another merged folder than {layout.merged}: rerun the training "
            "command with QUANTIZE to quantize this one"
        )
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("the engine evaluation runs vLLM, which this environment lacks: run it in the serving image")
    repo = cfg.hub_quantized_model_id
    if repo and not quantized:
        raise ConfigError(f"HUB_QUANTIZED_MODEL_ID={repo!r}: {layout.quantized} does not exist (train with QUANTIZE)")
    folders = {"merged": layout.merged} | ({"quantized": layout.quantized} if quantized else {})
    plans = tensor_parallel_plans(folders, cfg.engine_tensor_parallel_size)
    if repo:
        from tuneserve import publish

        publish.preflight([repo], attempts=cfg.publish_retries, backoff=cfg.publish_backoff_seconds)
    if check_only:
        sizes = ", ".join(f"{name} on {plan['size']}" for name, plan in plans.items())
        log.info(
            "preflight passed: %s%s (GPUs: %s)", layout.merged, f" and {layout.quantized}" if quantized else "", sizes
        )
        return 0

    examples = read_jsonl(rows)[: settings["max_samples"]]
    prompts = [to_prompt(ex) for ex in examples]
    max_model_len = cfg.engine_max_model_len
    report: dict[str, Any] = {"rows": len(examples), "settings": {**settings, **scoring}, "models": {}}
    measured = measured_files(layout.quantized) if quantized else {}  # what the engine is about to load
    for name, folder in folders.items():
        log.info("==== engine evaluation: %s (%s) in vLLM ====", name, folder)
        engine = _in_child(folder, rows, settings, max_model_len, plans[name]["size"])
        figures = score(examples, prompts, engine.pop("answers"), engine.pop("stopped"), **scoring)
        report["models"][name] = {**{k: v for k, v in figures.items() if k != "answers"}, **engine}
        report["models"][name]["tensor_parallel"] = plans[name]
        report["models"][name]["answers"] = figures["answers"]
        log.info("%s in vLLM: %s", name, _summary(report["models"][name]))
    report["parity"] = parity(report["models"]["merged"], read_json(layout.eval_report))
    for k, v in report["parity"]["figures"].items():
        if v["difference"]:
            log.warning("engine parity: %s is %s in vLLM, %s in transformers", k, v["vllm"], v["transformers"])
    verdict = None
    if quantized:
        verdict = gate(report["models"]["merged"], report["models"]["quantized"], cfg.quantize_max_drop)
        verdict.update(scheme=info["scheme"], source_id=info["source_id"], files=measured)
        report["gate"] = verdict
        write_json_atomic(layout.quantized / ENGINE_GATE, verdict)
    write_json_atomic(layout.engine_eval_report, report)
    card.write(layout, layout.merged, trained.get("HUB_MODEL_ID") or str(layout.merged))
    if quantized:
        card.write(layout, layout.quantized, repo or str(layout.quantized))
    if verdict is not None and not verdict["passed"]:
        raise VerifyError(
            f"the quantized model ({verdict['scheme']}) falls more than QUANTIZE_MAX_DROP={cfg.quantize_max_drop} "
            f"below the merged model in vLLM: {verdict['over_budget']}; it is neither published nor served. "
            f"Serve {layout.merged}, or raise the budget. Details: {layout.engine_eval_report}"
        )
    if verdict is not None:
        log.info("gate passed: drops %s within %s", verdict["drops"], cfg.quantize_max_drop)
    if repo:
        from tuneserve import publish

        log.info("==== publish the quantized model to %s ====", repo)
        publish.publish_folder(
            layout.quantized,
            repo,
            revision=cfg.hub_revision,
            private=cfg.hub_private,
            message=f"{verdict['scheme']} quantization of {trained.get('HUB_MODEL_ID') or 'a tuneserve fine-tune'}",
            attempts=cfg.publish_retries,
            backoff=cfg.publish_backoff_seconds,
            state_file=layout.publish_state,
            kind="quantized",
        )
    log.info("engine evaluation written to %s", layout.engine_eval_report)
    return 0


def tensor_parallel_plans(folders: dict[str, Path], override: int | None) -> dict[str, dict[str, Any]]:
    """Each folder's own tensor parallel size (a quantized folder may need fewer GPUs), logged; every folder's
    problem in one ConfigError (exit 2) before any engine starts."""
    gpus = visible_gpus()
    plans, problems = {}, {}  # problem -> the folders it is about (the same override problem: once)
    for name, folder in folders.items():
        try:
            plans[name] = tensor_parallel_plan(folder, override, gpus)
        except ConfigError as exc:
            for problem in exc.problems:
                problems.setdefault(problem, []).append(str(folder))
            continue
        log.info(
            "%s: tensor parallel size %d (%s: %s)",
            name,
            plans[name]["size"],
            plans[name]["mode"],
            plans[name]["reason"],
        )
    if problems:
        raise ConfigError([f"{' and '.join(where)}: {problem}" for problem, where in problems.items()])
    return plans


def parity(engine: dict[str, Any], transformers: dict[str, Any] | None) -> dict[str, Any]:
    """The merged model in vLLM against the evaluate stage (transformers): each figure, and the rows answered
    differently."""
    if not transformers:
        return {"figures": {}, "differing_rows": [], "note": "no evaluate-stage report (eval.json) to compare with"}
    figures = {
        k: {
            "vllm": engine.get(k),
            "transformers": transformers.get(k),
            "difference": round(engine[k] - transformers[k], 4),
        }
        for k in GATED
        if engine.get(k) is not None and transformers.get(k) is not None
    }
    theirs = {a["row"]: a["answer"] for a in transformers.get("answers", [])}
    differing = [
        {"row": a["row"], "vllm": a["answer"], "transformers": theirs[a["row"]]}
        for a in engine["answers"]
        if a["row"] in theirs and theirs[a["row"]] != a["answer"]
    ]
    return {"figures": figures, "differing_rows": differing}


def _summary(m: dict[str, Any]) -> str:
    shown = [f"{k} {m[k]}" for k in GATED if m.get(k) is not None]
    tp = (m.get("tensor_parallel") or {}).get("size", 1)
    return ", ".join(
        shown + [f"{m['tokens_per_second']} tokens/s", f"weights {m['weights_bytes'] / 1e6:.1f} MB", f"{tp} GPU(s)"]
    )


def child_main(argv: list[str]) -> None:
    """The child process of `_in_child`: argv is [request as JSON, where to write the answers]."""
    request, out_path = json.loads(argv[0]), Path(argv[1])
    logging.basicConfig(level=logging.INFO)
    result = answer_in_engine(
        Path(request["folder"]),
        Path(request["rows"]),
        max_samples=request["max_samples"],
        max_new_tokens=request["max_new_tokens"],
        max_model_len=request["max_model_len"],
        tensor_parallel_size=request["tensor_parallel_size"],
    )
    out_path.write_text(json.dumps(result))


if __name__ == "__main__":
    child_main(sys.argv[1:])
