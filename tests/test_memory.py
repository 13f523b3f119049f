"""Memory (tuneserve/memory.py): the machine's memory under its cgroup limit, the sizes preflight plans with, the plan
that refuses a run which cannot fit, and the placement that lets verify and evaluate load a model larger than the
memory they are given, giving the same logits."""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path

import pytest

from tests.helpers import run_train, write_jsonl
from tuneserve import memory

GB = 10**9
GiB = 1 << 30


# --------------------------------------------------------------------------------------------- host memory
def cgroup_tree(tmp_path: Path, version: int, limits: dict[str, str], usage: int, inactive: int) -> dict:
    """A fake /proc/self/cgroup and cgroup mount: the process in /a/b, with `limits` by folder ("", "a", "a/b")."""
    root = tmp_path / "cgroup"
    if version == 2:
        base, limit_file, usage_file, inactive_key = root, "memory.max", "memory.current", "inactive_file"
        root.mkdir(parents=True)
        (root / "cgroup.controllers").write_text("cpu memory\n")
        line = "0::/a/b\n"
    else:
        base, limit_file, usage_file, inactive_key = (
            root / "memory",
            "memory.limit_in_bytes",
            "memory.usage_in_bytes",
            "total_inactive_file",
        )
        line = "5:memory:/a/b\n3:cpu,cpuacct:/a/b\n"
    for sub in ("", "a", "a/b"):
        folder = base / sub
        folder.mkdir(parents=True, exist_ok=True)
        if sub in limits:
            (folder / limit_file).write_text(limits[sub] + "\n")
    (base / "a/b" / usage_file).write_text(f"{usage}\n")
    (base / "a/b" / "memory.stat").write_text(f"anon 5\n{inactive_key} {inactive}\nfile 7\n")
    proc = tmp_path / "proc-cgroup"
    proc.write_text(line)
    return {"proc_cgroup": proc, "root": root}


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize(
    "limits, expected",
    [
        ({"a/b": str(3 * GB)}, 3 * GB),
        ({"a": str(2 * GB), "a/b": str(3 * GB)}, 2 * GB),  # a parent's tighter limit holds for its children
        ({"": str(4 * GB), "a/b": "max"}, 4 * GB),
        ({"a/b": "max"}, None),
        ({"a/b": str(9223372036854771712)}, None),  # cgroup v1's "no limit"
        ({}, None),
    ],
)
def test_the_cgroup_limit_is_the_tightest_of_the_process_and_its_ancestors(tmp_path, version, limits, expected):
    paths = cgroup_tree(tmp_path, version, limits, usage=900, inactive=300)
    found = memory.cgroup_memory(**paths)
    if expected is None:
        assert found is None
    else:
        assert found == (expected, 600)  # working set: usage less the inactive file cache


@pytest.mark.parametrize(
    "limit, available, expected",
    [
        (2 * GiB, 10 * GiB, (2 * GiB, 2 * GiB - 600, "the cgroup memory limit")),
        (2 * GiB, 1 * GiB, (2 * GiB, 1 * GiB, "the cgroup memory limit")),  # the machine has less free than that
        (64 * GiB, 10 * GiB, (16 * GiB, 10 * GiB, "the machine's memory")),  # a limit above the machine's memory
    ],
)
def test_host_memory_is_the_cgroup_limit_or_the_machines_whichever_is_smaller(tmp_path, limit, available, expected):
    paths = cgroup_tree(tmp_path, 2, {"a/b": str(limit)}, usage=900, inactive=300)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal: {16 * GiB // 1024} kB\nMemFree: 1 kB\nMemAvailable: {available // 1024} kB\n")
    host = memory.host(meminfo, **paths)
    assert (host.limit, host.available, host.source) == expected


# --------------------------------------------------------------------------------------------- sizes
@functools.cache
def llama_size(**overrides) -> memory.ModelSize:
    return memory.model_size(llama(**overrides), target_modules="all-linear", rank=16)


def llama(**overrides):
    """Llama 3.1 70B's config (the docs' memory table computes with the same shape), changed by `overrides`."""
    from transformers import LlamaConfig

    from devtools.docs import REFERENCE_MODELS

    _, shape = REFERENCE_MODELS["Llama 3.1 70B"]
    return LlamaConfig(**{**shape, "dtype": "bfloat16", **overrides})


@pytest.mark.parametrize("targets, rank", [("all-linear", 16), (["q_proj", "v_proj"], 8), (["down_proj"], 64)])
def test_sizes_from_the_config_are_those_of_the_loaded_4bit_model_and_peft_adapter(chatml_base, targets, rank):
    """What preflight computes without weights is what loading and PEFT produce: every parameter, the 4-bit
    model's bytes (within 2%: bitsandbytes' quantization state), the LoRA parameters for the targets and rank."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    config = AutoConfig.from_pretrained(chatml_base)
    size = memory.model_size(config, target_modules=targets, rank=rank)
    plain = AutoModelForCausalLM.from_pretrained(chatml_base, dtype=torch.bfloat16)
    assert size.params == sum(p.numel() for p in plain.parameters())
    assert size.bytes16 == size.params * 2
    assert size.largest_tensor == max(p.numel() for p in plain.parameters())
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    four = AutoModelForCausalLM.from_pretrained(chatml_base, quantization_config=quant, device_map={"": "cpu"})
    planned = int(size.quantized * memory.NF4_BYTES) + (size.params - size.quantized) * 2
    assert abs(planned - four.get_memory_footprint()) <= 0.02 * four.get_memory_footprint()
    peft = get_peft_model(plain, LoraConfig(r=rank, target_modules=targets, task_type="CAUSAL_LM"))
    assert size.lora == peft.get_nb_trainable_parameters()[0]


def test_a_70b_qlora_fits_one_80gb_gpu_and_refuses_one_of_24gb_or_16bit_lora():
    """The plan from a Llama 3 70B config (meta device: no memory): QLoRA's headline, and the refusals around it."""
    size = llama_size()
    assert 70e9 < size.params < 71e9 and 140e9 < size.bytes16 < 142e9
    roomy = memory.Host(512 * GB, 500 * GB, "the machine's memory")

    def train(gpu_gb: float, four_bit: bool = True) -> memory.Stage:
        plan = memory.plan(
            size,
            device="cuda",
            compute_bytes=2,
            load_in_4bit=four_bit,
            gpu_memory=[int(gpu_gb * GB)] * 8,
            hosted=roomy,
            quantize=True,
        )
        return next(s for s in plan.stages if s.name == "train")

    assert train(80).fits and 35 * GB < train(80).need < 50 * GB
    assert not train(24).fits and not train(80, four_bit=False).fits
    # The stages after training never need the 16-bit model in memory; verify spreads it over the 8 GPUs.
    plan = memory.plan(
        size,
        device="cuda",
        compute_bytes=2,
        load_in_4bit=True,
        gpu_memory=[80 * GB] * 8,
        hosted=memory.Host(64 * GB, 60 * GB, "x"),
        quantize=True,
    )
    assert all(s.fits for s in plan.stages) and plan.placement == "spread over GPUs and host memory"
    assert all(s.need < 5 * GB for s in plan.stages if s.name != "train")


@pytest.mark.parametrize("free_gb", [0.5, 2, 8, 40])
def test_every_stage_is_refused_exactly_when_its_need_exceeds_the_memory_it_has(free_gb):
    size = llama_size(num_hidden_layers=4, hidden_size=4096, intermediate_size=14336)
    plan = memory.plan(
        size,
        device="cpu",
        compute_bytes=2,
        load_in_4bit=True,
        gpu_memory=[],
        hosted=memory.Host(64 * GB, int(free_gb * GB), "x"),
        quantize=True,
    )
    assert {s.name for s in plan.stages} == {"train", "merge", "verify", "quantize"}
    refused = {p.split(" needs")[0] for p in plan.problems()}
    assert refused == {s.name for s in plan.stages if s.need > free_gb * GB}
    for problem in plan.problems():
        assert "host memory" in problem and "is free" in problem


# --------------------------------------------------------------------------------------------- placement
def test_a_model_larger_than_the_memory_given_is_spread_and_answers_exactly_as_loaded_whole(
    chatml_base, tmp_path, monkeypatch
):
    """verify's loader with less host memory than the weights: part in memory, the rest read from the checkpoint's
    own files at each forward (nothing copied into the offload folder); the logits and a greedy generation are
    those of the model loaded whole."""
    import torch

    from tuneserve import verify

    folder = tmp_path / "merged"
    shutil.copytree(chatml_base, folder)
    tok, whole = verify.load_merged(folder)
    ids = [tok("What is the capital of France?")["input_ids"], tok("Who wrote Hamlet?")["input_ids"]]
    expected = verify.next_token_logits(whole, ids), verify.generate(whole, tok, ids[0], 8)
    assert not hasattr(whole, "hf_device_map") or set(whole.hf_device_map.values()) == {"cpu"}
    del whole

    size = memory.weights_bytes(folder)
    monkeypatch.setattr(memory, "host", lambda: memory.Host(size, int(size / 2), "a test's limit"))
    kwargs, where = memory.load_kwargs(folder, "cpu", offload_folder=tmp_path / ".offload")
    assert kwargs["device_map"] == "auto" and kwargs["max_memory"] == {"cpu": int(size / 2 * memory.HOST_WEIGHTS_SHARE)}
    assert "read from disk" in where
    tok, spread = verify.load_merged(folder)
    assert "disk" in set(spread.hf_device_map.values()) <= {"cpu", "disk"}
    assert torch.equal(verify.next_token_logits(spread, ids), expected[0])
    assert verify.generate(spread, tok, ids[0], 8) == expected[1]
    assert not any((tmp_path / ".offload").rglob("*.safetensors"))  # read from the merged folder's own files


@pytest.mark.parametrize(
    "gpus_gb, host_gb, expected",
    [
        ([80], 100, {"device_map": {"": "cuda"}}),  # fits GPU 0: as before
        ([24, 24, 24, 24], 100, "auto"),  # over four GPUs
        ([24], 4, "auto"),  # one GPU, host memory and disk
    ],
)
def test_on_gpus_the_model_goes_to_gpu_0_when_it_fits_and_is_spread_over_all_of_them_otherwise(
    tmp_path, monkeypatch, gpus_gb, host_gb, expected
):
    folder = tmp_path / "m"
    folder.mkdir()
    with open(folder / "model.safetensors", "wb") as f:  # a sparse file of a 30 GB checkpoint's size
        f.truncate(30 * GB)
    monkeypatch.setattr(memory, "gpus", lambda: [g * GB for g in gpus_gb])
    monkeypatch.setattr(memory, "host", lambda: memory.Host(host_gb * GB, host_gb * GB, "x"))
    kwargs, _ = memory.load_kwargs(folder, "cuda")
    if expected == "auto":
        assert kwargs["device_map"] == "auto"
        assert kwargs["max_memory"] == {
            **{i: g * GB - memory.GPU_RESERVE for i, g in enumerate(gpus_gb)},
            "cpu": int(host_gb * GB * memory.HOST_WEIGHTS_SHARE),
        }
    else:
        assert kwargs == expected


# --------------------------------------------------------------------------------------------- preflight
@pytest.mark.slow
def test_preflight_refuses_a_run_that_cannot_fit_before_anything_is_written(chatml_base, tmp_path):
    """A 70B base on this machine (its config: preflight reads no weight) exits 2 in preflight, with and without
    --check, naming the stage, what it needs and the fix, having trained and written nothing but its claim;
    MEMORY_CHECK=false logs the plan and goes on; a smaller base then takes the folder over."""
    base = tmp_path / "big"
    shutil.copytree(chatml_base, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg.update(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
    )
    for per_layer in ("layer_types", "max_window_layers"):
        cfg.pop(per_layer, None)
    (base / "config.json").write_text(json.dumps(cfg))
    data = write_jsonl(tmp_path / "rows.jsonl", [{"text": "hello world"}] * 4)
    env = {"BASE_MODEL": str(base), "DATASET": str(data)}
    hosted = memory.host()
    assert hosted.available < 38 * GB, "this test assumes a machine with less free memory than a 70B 4-bit model"
    for args in ((), ("--check",)):
        out = tmp_path / f"out{len(args)}"
        res = run_train({**env, "OUTPUT_DIR": str(out)}, *args, cwd=tmp_path)
        assert res.returncode == 2, res.stderr[-3000:]
        assert "train needs at least" in res.stderr and "MEMORY_CHECK=false" in res.stderr
        assert re.search(r"memory plan: 6\d\.\d\d B parameters, 13\d\.\d\d GB at 16 bits", res.stderr)  # logged first
        # At most the claim (a folder that trained nothing is claimed again by the next settings).
        left = {f.name for f in out.iterdir()} if out.exists() else set()
        assert left <= {"run.json", ".tuneserve.lock", ".tuneserve-digests.json"}, left
        assert not args or not left
    res = run_train({**env, "OUTPUT_DIR": str(tmp_path / "go"), "MEMORY_CHECK": "false"}, "--check", cwd=tmp_path)
    assert "memory plan (MEMORY_CHECK=false): train needs at least" in res.stderr
    assert "preflight passed" in res.stderr, res.stderr[-3000:]
    smaller = run_train(
        {**env, "BASE_MODEL": str(chatml_base), "OUTPUT_DIR": str(tmp_path / "out0")}, "--check", cwd=tmp_path
    )
    assert smaller.returncode == 0, smaller.stderr[-3000:]


# --------------------------------------------------------------------------------------------- measured peaks
@pytest.mark.parametrize("mib", [64, 256])
def test_a_stage_peak_is_what_it_held_at_its_highest_not_what_it_holds_at_its_end(mib, caplog):
    """The peak of a stage that allocates and frees: at least what it held, released by the end; a later stage
    measures its own peak, not the earlier one's."""
    import logging
    import time

    peaks = memory.Peaks()
    before = memory._status()["RssAnon"]
    with caplog.at_level(logging.INFO, logger="tuneserve.memory"), peaks.measure("big"):
        block = bytearray(mib << 20)  # written: resident anonymous memory
        time.sleep(5 * memory.Peaks.INTERVAL)
        del block
    with peaks.measure("small"):
        time.sleep(5 * memory.Peaks.INTERVAL)
    assert peaks.stages["big"]["anon"] >= before + (mib << 20) * 0.95
    assert peaks.stages["small"]["anon"] < peaks.stages["big"]["anon"] - (mib << 20) * 0.5
    assert any(r.getMessage().startswith("big: peak memory") for r in caplog.records)
