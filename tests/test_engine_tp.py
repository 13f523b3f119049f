"""The engine evaluation's GPUs per model (tuneserve/engine_eval.py, choose_tensor_parallel): the tensor parallel
size chosen from the weights, the GPUs and the heads, ENGINE_TENSOR_PARALLEL_SIZE respected or refused, and the
size reaching vLLM's LLM(...). No GPU is needed: the GPUs are faked (visible_gpus), and so is vLLM (a module whose
LLM records its arguments), except in the last test, which runs the serving environment's real CLI on the CPU."""

from __future__ import annotations

import importlib.machinery
import json
import subprocess
import sys
import types
from types import SimpleNamespace

import pytest

from tests.helpers import SERVE_PYTHON, clean_env, need_vllm, write_jsonl
from tuneserve import engine_eval
from tuneserve.engine_eval import (
    EVAL_SCHEMA,
    GPU_MEMORY_UTILIZATION,
    WEIGHTS_SHARE,
    choose_tensor_parallel,
    model_heads,
)
from tuneserve.exitcodes import ConfigError, ExitCode
from tuneserve.layout import merged_id

GIB = 2**30
H100 = 80 * GIB  # what torch reports for an 80 GB card, about
L4 = 24 * GIB


def divides(size: int, heads: int, kv: int) -> bool:
    """vLLM's own rules, restated for the test: attention heads split evenly (verify_with_parallel_config), KV
    heads split evenly or replicated evenly (QKVParallelLinear)."""
    return heads % size == 0 and (kv % size == 0 or size % kv == 0)


def fits(weights: int, size: int, memory: int) -> bool:
    return weights / size <= WEIGHTS_SHARE * GPU_MEMORY_UTILIZATION * memory


# weights (bytes), visible GPUs, GPU memory, attention heads, KV heads -> the size, or an error's words
AUTO = [
    pytest.param(16 * 10**9, 1, H100, 32, 8, 1, id="8B-bf16-one-gpu"),
    pytest.param(16 * 10**9, 8, H100, 32, 8, 1, id="8B-bf16-uses-one-of-eight"),
    pytest.param(141 * 10**9, 8, H100, 64, 8, 4, id="70B-bf16-4-not-3-which-does-not-divide-64"),
    pytest.param(72 * 10**9, 8, H100, 64, 8, 2, id="70B-int8-2"),
    pytest.param(38 * 10**9, 8, H100, 64, 8, 1, id="70B-w4a16-1"),
    pytest.param(65 * 10**9, 4, H100, 40, 8, 2, id="32B-bf16-40-heads"),
    pytest.param(80 * 10**9, 8, L4, 40, 8, 8, id="5-divides-40-heads-not-the-8-kv-heads"),
    pytest.param(40 * 10**9, 8, L4, 32, 2, 4, id="kv-heads-replicated-4-over-2"),
    pytest.param(2 * 10**9, 1, L4, 14, 2, 1, id="qwen-0.5B"),
    pytest.param(45 * 10**9, 14, L4, 14, 2, 14, id="14-heads-3-to-7-do-not-divide-the-2-kv-heads"),
    pytest.param(141 * 10**9, 2, H100, 64, 8, "it needs 4 GPUs", id="70B-bf16-on-two"),
    pytest.param(141 * 10**9, 1, H100, 64, 8, "it needs 4 GPUs", id="70B-bf16-on-one"),
    pytest.param(160 * 10**9, 8, L4, 64, 8, "it needs 16 GPUs", id="160GB-on-eight-L4s"),
    pytest.param(400 * 10**9, 8, L4, 8, 4, "does not fit even spread over 8", id="more-than-the-heads-allow"),
]


@pytest.mark.parametrize(("weights", "gpus", "memory", "heads", "kv", "expected"), AUTO)
def test_auto_chooses_the_smallest_size_that_divides_the_heads_and_fits(weights, gpus, memory, heads, kv, expected):
    if isinstance(expected, str):
        with pytest.raises(ConfigError) as refused:
            choose_tensor_parallel(weights, heads, kv, (gpus, memory))
        message = refused.value.message
        assert expected in message and ("nvidia.com/gpu" in message or "more memory" in message), message
        assert f"{weights / 1e9:.1f} GB of weights" in message and f"{memory / 1e9:.1f} GB" in message
        # Refused only when no visible size would do.
        assert not any(divides(n, heads, kv) and fits(weights, n, memory) for n in range(1, gpus + 1))
        if "needs" in expected:
            needed = int(expected.split()[2])
            assert f"--gpus {needed}" in message and divides(needed, heads, kv) and fits(weights, needed, memory)
        return
    plan = choose_tensor_parallel(weights, heads, kv, (gpus, memory))
    size = plan["size"]
    assert size == expected and plan["mode"] == "auto"
    # The properties, whatever the case: divides the heads, at most the GPUs, fits, and nothing smaller does.
    assert divides(size, heads, kv) and 1 <= size <= gpus and fits(weights, size, memory)
    assert not any(divides(n, heads, kv) and fits(weights, n, memory) for n in range(1, size))
    assert plan["weights_bytes"] == weights and plan["visible_gpus"] == gpus and plan["gpu_memory_bytes"] == memory
    assert plan["attention_heads"] == heads and plan["kv_heads"] == kv and "GB of weights" in plan["reason"]


def test_the_properties_hold_over_a_grid_of_models_and_nodes():
    for heads, kv in ((32, 8), (64, 8), (40, 8), (14, 2), (28, 4), (16, 16), (8, 1), (48, 8)):
        for gpus in range(1, 9):
            for tenths in range(1, 130, 7):  # weights from a tenth of a GPU's memory to 13 GPUs' worth
                weights = tenths * H100 // 10
                possible = [n for n in range(1, gpus + 1) if divides(n, heads, kv) and fits(weights, n, H100)]
                try:
                    size = choose_tensor_parallel(weights, heads, kv, (gpus, H100))["size"]
                except ConfigError:
                    assert not possible, (heads, kv, gpus, tenths)
                    continue
                assert size == min(possible), (heads, kv, gpus, tenths)


@pytest.mark.parametrize(
    ("weights", "gpus", "override", "expected"),
    [
        (16 * 10**9, 8, 2, 2),  # more GPUs than needed: the user's choice
        (16 * 10**9, 8, 8, 8),
        (141 * 10**9, 2, 2, 2),  # fits vLLM's share, not the headroom: allowed, said so
        (141 * 10**9, 8, 16, "only 8 GPU(s) are visible; give the evaluation 16 GPUs"),
        (141 * 10**9, 8, 3, "sizes that do, up to the 8 visible GPU(s): 1, 2, 4, 8"),
        (16 * 10**9, 8, 6, "sizes that do, up to the 8 visible GPU(s): 1, 2, 4, 8"),
        (141 * 10**9, 8, 1, "more than vLLM may use of a 85.9 GB GPU"),
    ],
)
def test_engine_tensor_parallel_size_is_respected_or_refused(weights, gpus, override, expected):
    if isinstance(expected, str):
        with pytest.raises(ConfigError) as refused:
            choose_tensor_parallel(weights, 64, 8, (gpus, H100), override)
        assert f"ENGINE_TENSOR_PARALLEL_SIZE={override}" in refused.value.message and expected in refused.value.message
        return
    plan = choose_tensor_parallel(weights, 64, 8, (gpus, H100), override)
    assert plan["size"] == expected and plan["mode"] == "ENGINE_TENSOR_PARALLEL_SIZE"
    assert ("little room" in plan["reason"]) == (not fits(weights, override, H100))


def test_on_the_cpu_the_size_is_one_and_more_is_refused():
    for override in (None, 1):
        plan = choose_tensor_parallel(10**12, 64, 8, None, override)  # no GPU: vLLM's CPU build, one process
        assert plan["size"] == 1 and plan["mode"] == "cpu"
    with pytest.raises(ConfigError) as refused:
        choose_tensor_parallel(10**9, 64, 8, None, 2)
    assert "ENGINE_TENSOR_PARALLEL_SIZE=2: no GPU is visible" in refused.value.message


def test_the_variable_is_an_integer_of_at_least_one():
    assert EVAL_SCHEMA.load({"ENGINE_TENSOR_PARALLEL_SIZE": "4"}).engine_tensor_parallel_size == 4
    assert EVAL_SCHEMA.load({}).engine_tensor_parallel_size is None  # auto
    with pytest.raises(ConfigError, match="ENGINE_TENSOR_PARALLEL_SIZE='0': must be >= 1"):
        EVAL_SCHEMA.load({"ENGINE_TENSOR_PARALLEL_SIZE": "0"})


@pytest.mark.parametrize(
    ("config", "heads"),
    [
        ({"model_type": "llama", "num_attention_heads": 64, "num_key_value_heads": 8}, (64, 8)),
        ({"model_type": "llama", "num_attention_heads": 32}, (32, 32)),  # no GQA: a KV head per head
        ({"model_type": "qwen2", "num_attention_heads": 14, "num_key_value_heads": 2}, (14, 2)),
        # A multimodal model: its text model's heads, as vLLM reads them (hf_text_config).
        (
            {"model_type": "gemma3", "text_config": {"num_attention_heads": 8, "num_key_value_heads": 4}},
            (8, 4),
        ),
    ],
)
def test_heads_are_read_as_vllm_reads_them(tmp_path, config, heads):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert model_heads(tmp_path) == heads


# --------------------------------------------------------------------------------------------- through `run`
GPU_MEMORY = 10**6  # faked GPUs of 1 MB: at most 0.72 MB of weights each
QUESTION, ANSWER = "What is the capital of France?", "Paris"


@pytest.fixture
def output(tmp_path):
    """OUTPUT_DIR of a finished run with QUANTIZE: a merged folder of 2 MB (4 faked GPUs: 3 would hold it but do
    not divide its 64 heads) and a quantized one of 0.5 MB (1 GPU)."""
    out = tmp_path / "out"
    for name, size in (("merged", 2 * 10**6), ("quantized", 5 * 10**5)):
        folder = out / name
        folder.mkdir(parents=True)
        config = {"model_type": "llama", "num_attention_heads": 64, "num_key_value_heads": 8}
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "model.safetensors").write_bytes(b"\0" * size)
    (out / "merged" / "merge_info.json").write_text("{}")
    info = {"scheme": "int8", "source_id": merged_id(out / "merged")}
    (out / "quantized" / "quantize_info.json").write_text(json.dumps(info))
    (out / "config.json").write_text(json.dumps({"EVAL_MAX_SAMPLES": 8, "EVAL_MAX_NEW_TOKENS": 8}))
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]
    write_jsonl(out / "data" / "eval.jsonl", [{"row": 0, "messages": messages, "trained_turns": None}])
    return out


@pytest.fixture
def fake_vllm(monkeypatch):
    """vLLM as a module whose LLM records its arguments and answers every question right; and `_in_child`'s
    process run in this one (its argv through child_main), so the fake reaches the engine's code."""
    engines: list[dict] = []

    class LLM:
        def __init__(self, **kwargs):
            engines.append(kwargs)

        def chat(self, conversations, params, use_tqdm=False, tools=None):
            done = SimpleNamespace(text=ANSWER, token_ids=[1, 2], finish_reason="stop")
            return [SimpleNamespace(outputs=[done]) for _ in conversations]

        def generate(self, prompts, params, use_tqdm=False):
            raise AssertionError("the rows are chat rows")

    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)  # importlib.util.find_spec("vllm") finds it
    module.LLM, module.SamplingParams = LLM, lambda **kwargs: SimpleNamespace(**kwargs)
    monkeypatch.setitem(sys.modules, "vllm", module)

    def call(argv, env=None):
        assert argv[:3] == [sys.executable, "-m", "tuneserve.engine_eval"]
        engine_eval.child_main(argv[3:])
        return 0

    monkeypatch.setattr(engine_eval.subprocess, "call", call)
    monkeypatch.setattr("tuneserve.card.write", lambda *args, **kwargs: None)
    return engines


def fake_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(engine_eval, "visible_gpus", lambda: (count, GPU_MEMORY))


def settings(out, **env):
    return EVAL_SCHEMA.load({"OUTPUT_DIR": str(out), "ENGINE_MAX_MODEL_LEN": "64", **env})


def test_each_folders_size_reaches_vllm_and_the_report(output, fake_vllm, monkeypatch):
    fake_gpus(monkeypatch, 4)
    assert engine_eval.run(settings(output)) == 0
    merged, quantized = fake_vllm
    assert merged["model"] == str(output / "merged") and merged["tensor_parallel_size"] == 4
    assert quantized["model"] == str(output / "quantized") and quantized["tensor_parallel_size"] == 1
    assert merged["gpu_memory_utilization"] == GPU_MEMORY_UTILIZATION  # what the estimate assumed
    report = json.loads((output / "engine_eval.json").read_text())
    for name, size in (("merged", 4), ("quantized", 1)):
        plan = report["models"][name]["tensor_parallel"]
        assert plan["size"] == size and plan["mode"] == "auto" and plan["visible_gpus"] == 4
        assert plan["weights_bytes"] == report["models"][name]["weights_bytes"]
    assert report["gate"]["passed"]

    fake_vllm.clear()  # the override: both folders, even the one that needs fewer
    assert engine_eval.run(settings(output, ENGINE_TENSOR_PARALLEL_SIZE="4")) == 0
    assert [e["tensor_parallel_size"] for e in fake_vllm] == [4, 4]


@pytest.mark.parametrize(
    ("gpus", "env", "expected"),
    [
        (2, {}, "it needs 4 GPUs"),
        (4, {"ENGINE_TENSOR_PARALLEL_SIZE": "8"}, "only 4 GPU(s) are visible"),
        (4, {"ENGINE_TENSOR_PARALLEL_SIZE": "3"}, "sizes that do, up to the 4 visible GPU(s): 1, 2, 4"),
    ],
)
def test_too_few_gpus_or_a_wrong_override_exits_2_before_vllm_starts(
    output, fake_vllm, monkeypatch, gpus, env, expected
):
    fake_gpus(monkeypatch, gpus)
    for check_only in (True, False):  # --check catches it too
        with pytest.raises(ConfigError) as refused:
            engine_eval.run(settings(output, **env), check_only=check_only)
        assert refused.value.exit_code == ExitCode.CONFIG and expected in refused.value.message
        assert str(output / "merged") in refused.value.message
    assert fake_vllm == [] and not (output / "engine_eval.json").exists()


def test_the_serving_environment_refuses_more_than_one_engine_process_on_the_cpu(output):
    """The real CLI and environment (vLLM's CPU build, no GPU): --check exits 2 on ENGINE_TENSOR_PARALLEL_SIZE=2
    and passes without it, saying each model runs on 1."""
    need_vllm()

    def check(**env):
        return subprocess.run(
            [str(SERVE_PYTHON), "-m", "entrypoints.evaluate", "--check"],
            env=clean_env(OUTPUT_DIR=str(output), **env),
            cwd=output.parent,
            capture_output=True,
            text=True,
            timeout=300,
        )

    res = check(ENGINE_TENSOR_PARALLEL_SIZE="2")
    assert res.returncode == 2 and "ENGINE_TENSOR_PARALLEL_SIZE=2: no GPU is visible" in res.stderr, res.stderr[-3000:]
    res = check()
    assert res.returncode == 0 and "GPUs: merged on 1, quantized on 1" in res.stderr, res.stderr[-3000:]
