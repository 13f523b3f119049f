"""Verification of a finished run (tuneserve.verify): how far each merge base is from the adapter model, the
tolerance that follows from the merge base, and a broken adapter caught before anything is published."""

from __future__ import annotations

import json

import pytest

from tests.helpers import LEARN_ENV, copy_output, run_train
from tuneserve.exitcodes import ExitCode

pytestmark = pytest.mark.slow


def test_verify_reports_how_far_each_merge_base_is_from_the_adapter_model(trained_output):
    report = json.loads((trained_output / "verify.json").read_text())
    fid = report["fidelity"]
    assert set(fid) == {"original", "dequantized"}
    # Replaying the NF4 round trip leaves only bfloat16 rounding between merged and adapter model. (Logits: with
    # float32 compute, the CPU's default without native bfloat16, the largest probability difference of both is
    # the same few 1e-4 and does not tell them apart.)
    assert fid["dequantized"]["max_logit_diff"] < fid["original"]["max_logit_diff"]
    assert fid["dequantized"]["max_prob_diff"] <= fid["original"]["max_prob_diff"]
    assert fid["dequantized"]["max_prob_diff"] <= 0.05
    assert report["checks"]["fidelity"]["tolerance"] == 0.25  # MERGE_BASE=original over NF4


def test_merge_base_dequantized_through_the_entrypoint(tmp_path, trained_output, chatml_base, qa_dataset):
    out = copy_output(trained_output, tmp_path / "out")
    res = run_train(
        {
            **LEARN_ENV,
            "BASE_MODEL": str(chatml_base),
            "DATASET": str(qa_dataset),
            "OUTPUT_DIR": str(out),
            "MERGE_BASE": "dequantized",
        },
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "training already done" in res.stderr and "merge: adapter into the dequantized" in res.stderr
    report = json.loads((out / "verify.json").read_text())
    assert report["checks"]["fidelity"] == {
        "passed": True,
        "max_prob_diff": report["fidelity"]["dequantized"]["max_prob_diff"],
        "tolerance": 0.05,
        "merge_base": "dequantized",
    }


def test_nan_adapter_fails_verification_with_exit_4(tmp_path, trained_output, chatml_base, qa_dataset):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    out = copy_output(trained_output, tmp_path / "out")
    shutil.rmtree(out / "merged")
    (out / "verify.json").unlink()
    weights = out / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    for k in tensors:
        if "lora_B" in k:
            tensors[k] = torch.full_like(tensors[k], float("nan"))
    save_file(tensors, str(weights))
    res = run_train(
        {**LEARN_ENV, "BASE_MODEL": str(chatml_base), "DATASET": str(qa_dataset), "OUTPUT_DIR": str(out)}, cwd=tmp_path
    )
    assert res.returncode == ExitCode.VERIFY, res.stderr[-3000:]
    assert "verification failed, nothing will be published" in res.stderr
    assert "logits are not finite" in res.stderr
    report = json.loads((out / "verify.json").read_text())
    assert report["passed"] is False and report["checks"]["finite_logits"]["passed"] is False
