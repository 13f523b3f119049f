"""The model card (tuneserve.card) in the merged folder: how to serve the model, the training settings, and the
verification result it reports, checked after the verified generations that result rests on."""

from __future__ import annotations

import json

import pytest

from tests.helpers import QA

pytestmark = pytest.mark.slow


def test_verify_generations_and_model_card(trained_output):
    report = json.loads((trained_output / "verify.json").read_text())
    assert report["passed"] and report["checks"]["stops"]["stopped"] == report["checks"]["stops"]["of"] == 4
    answers = dict(QA)
    for s in report["samples"]:
        assert s["stopped"] and s["generation"] == answers[s["prompt"][-1]["content"]] == s["reference"]
    card = (trained_output / "merged" / "README.md").read_text()
    assert f"vllm serve {trained_output / 'merged'}" in card and "docker run --gpus all -p 8000:8000" in card
    assert '"LORA_R": 32' in card and "Passed: **True**" in card
