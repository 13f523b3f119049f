"""A model larger than the memory it is given: the whole job (train, merge, verify, evaluate, quantize) on a base whose
16-bit weights exceed the process's memory limit, a real one (a memory cgroup, as `docker run --memory` or a pod's
limit sets), passes, and each stage's peak is recorded. The benchmark of the same run (benchmarks/memory.py) puts
the peaks in docs/benchmarks.md."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import memory as memory_bench

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def limited(tmp_path_factory) -> dict:
    return memory_bench.limited_pipeline(tmp_path_factory.mktemp("bigmodel"), **memory_bench.SIZES["full"])


def test_every_stage_runs_under_a_memory_limit_smaller_than_the_16bit_model(limited):
    assert limited["returncode"] == 0, (
        f"exit {limited['returncode']}, oom kills {limited['oom_kills']}:\n" + limited["log"][-5000:]
    )
    assert limited["oom_kills"] == 0
    assert limited["model_bytes_16bit"] > 1.2 * limited["limit"]
    out = Path(limited["out"])
    verify = json.loads((out / "verify.json").read_text())
    assert verify["passed"] and verify["checks"]["fidelity"]["passed"]
    assert math.isfinite(verify["eval"]["eval_loss"])
    info = json.loads((out / "quantized" / "quantize_info.json").read_text())
    assert info["scheme"] == "int8" and info["quantized_layers"] == 12 * 7
    # verify and evaluate could hold only part of the merged model: the rest was read from its files.
    loads = [line for line in limited["log"].splitlines() if "does not fit one device: spread over" in line]
    assert len(loads) == 2 and all("read from disk at each forward" in line for line in loads)
    assert not (out / ".offload").exists()


def test_each_stage_records_its_peak_below_the_limit_and_the_plan_it_was_given(limited):
    peaks, plan = limited["peaks"], limited["plan"]
    assert set(peaks) == set(memory_bench.STAGES)
    for name, peak in peaks.items():
        assert 0 < peak["anon"] < limited["limit"], name
    # Merge and quantize hold a fraction of the 16-bit model, never the model; verify holds the training model again.
    for name in ("merge", "quantize"):
        assert peaks[name]["anon"] < memory_bench.HALF * limited["model_bytes_16bit"], (name, peaks[name])
    assert peaks["verify"]["anon"] < memory_bench.VERIFY_OVER_TRAIN * peaks["train"]["anon"]
    assert plan["model_bytes_16bit"] == pytest.approx(limited["model_bytes_16bit"], rel=0.01)
    assert all(s["fits"] for s in plan["stages"].values())
    assert "read from disk" in plan["verify_placement"]
