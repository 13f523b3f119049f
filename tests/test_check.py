"""`--check` raises every configuration error the training stage can raise, before anything is trained.

The training stage's configuration errors live in the functions listed in TRAIN_STAGE_ERRORS (found by reading the
code: every `raise ConfigError` in the modules the stage runs). Each has at least one case below, and each case runs
`python -m entrypoints.train --check`'s own code in this process: it must exit 2 with the error training would give.
A new `raise ConfigError` in those modules fails `test_every_training_error_site_has_a_check_case` until it gets one.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from entrypoints import train as entry
from tests.helpers import REPO, clean_env, qa_messages, write_jsonl
from tuneserve.exitcodes import ExitCode

pytestmark = pytest.mark.slow

# The modules the training stage runs after the data and tokenizer (which --check has always prepared itself).
TRAIN_STAGE_MODULES = ("tuneserve/batching.py", "tuneserve/train.py", "tuneserve/model.py")

# Function -> the cases (environment, message) that make it raise. Functions whose only errors need hardware this
# machine lacks say so instead of a case.
CASES: dict[str, list[tuple[dict, str]]] = {
    "_split": [
        ({"NPROC_PER_NODE": "3", "BATCH_SIZE": "4"}, "BATCH_SIZE=4 cannot be shared equally by 3 training process"),
        (
            {"NNODES": "2", "MASTER_ADDR": "10.0.0.1", "BATCH_SIZE": "3"},
            "BATCH_SIZE=3 cannot be shared equally by 2 training process",
        ),
        ({"BATCH_SIZE": "6", "PER_DEVICE_TRAIN_BATCH_SIZE": "4"}, "PER_DEVICE_TRAIN_BATCH_SIZE=4 does not divide"),
        ({"BATCH_SIZE": "6", "GRADIENT_ACCUMULATION_STEPS": "4"}, "GRADIENT_ACCUMULATION_STEPS=4 does not divide"),
        (
            {"BATCH_SIZE": "6", "PER_DEVICE_TRAIN_BATCH_SIZE": "2", "GRADIENT_ACCUMULATION_STEPS": "2"},
            "BATCH_SIZE=6 but PER_DEVICE_TRAIN_BATCH_SIZE=2 x GRADIENT_ACCUMULATION_STEPS=2",
        ),
    ],
    "check_packing": [
        ({"PACKING": "true", "PER_DEVICE_TRAIN_BATCH_SIZE": "2", "_SDPA": "causal_only"}, "rows flattened together"),
    ],
    "build_sft_config": [
        ({"SFT_LOAD_BEST_MODEL_AT_END": "true"}, "training configuration rejected by trl.SFTConfig"),
    ],
    "get_quantization_config": [
        ({"BNB_4BIT_QUANT_STORAGE": "bogus"}, "rejected by transformers.BitsAndBytesConfig"),
        # DISTRIBUTED_STRATEGY=fsdp with an integer storage: fsdp needs CUDA (the configuration refuses it on the
        # CPU first); resolve_placement calls get_quantization_config for it, in --check too.
    ],
    "get_peft_config": [
        ({"LORA_LAYERS_PATTERN": "layers"}, "LoRA configuration rejected by peft.LoraConfig"),
    ],
    "model_config": [
        ({"_BASE": "no-weights"}, "holds a config but no weights"),
        ({"_BASE": "no-config"}, "cannot load the model's config"),
    ],
    # load_model's errors (the weights cannot be read, a package the model needs is missing) are what model_config
    # finds before loading: a folder without weights, or a config it cannot read.
    "load_model": [({"_BASE": "no-weights"}, "holds a config but no weights")],
    "resolve_placement": [
        ({"DEVICE": "cuda"}, "DEVICE=cuda but no CUDA device is visible"),
        ({"DTYPE": "float16"}, "DTYPE=float16 is not supported for training on the CPU"),
    ],
}


def raising_functions(path: Path) -> set[str]:
    """The functions of a module whose own body raises ConfigError."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Raise) and sub.exc is not None:
                    call = sub.exc.func if isinstance(sub.exc, ast.Call) else sub.exc
                    if isinstance(call, ast.Name) and call.id == "ConfigError":
                        found.add(node.name)
    return found


def test_every_training_error_site_has_a_check_case():
    sites = set().union(*(raising_functions(REPO / m) for m in TRAIN_STAGE_MODULES))
    assert sites == set(CASES), f"functions raising ConfigError without a --check case: {sites - set(CASES)}"
    assert all(CASES[name] for name in sites)


@pytest.fixture(scope="module")
def bases(chatml_base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    no_weights, no_config = root / "no-weights", root / "no-config"
    for folder in (no_weights, no_config):
        shutil.copytree(chatml_base, folder)
        for f in folder.glob("*.safetensors"):
            f.unlink()
    (no_config / "config.json").unlink()
    shutil.copytree(chatml_base, root / "chatml")
    return {"no-weights": no_weights, "no-config": no_config, "chatml": root / "chatml"}


def causal_only(module, query, key, value, attention_mask, **kwargs):
    """sdpa that ignores the mask: what a model whose attention code mishandles flattened rows would do."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)


def run_check(env: dict, monkeypatch, tmp_path, capfd) -> tuple[int, str]:
    monkeypatch.chdir(tmp_path)  # no developer .env
    for key in list(__import__("os").environ):
        if key not in clean_env():
            monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code = entry.main(["--check"])
    return code, capfd.readouterr().err


@pytest.mark.parametrize(
    "function, case",
    [(name, case) for name, cases in CASES.items() for case in cases],
    ids=lambda v: v if isinstance(v, str) else next(iter(v[0].items()))[0],
)
def test_check_raises_each_configuration_error_of_the_training_stage(
    function, case, bases, qa_dataset, monkeypatch, tmp_path, capfd
):
    settings, message = case
    base = bases[settings.get("_BASE", "chatml")]
    env = {"BASE_MODEL": str(base), "DATASET": str(qa_dataset), "OUTPUT_DIR": str(tmp_path / "out"), "DEVICE": "cpu"}
    env.update({k: v for k, v in settings.items() if not k.startswith("_")})
    if settings.get("_SDPA"):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", causal_only)
    code, err = run_check(env, monkeypatch, tmp_path, capfd)
    assert code == ExitCode.CONFIG, err[-3000:]
    assert message in err, err[-3000:]
    assert "preflight passed" not in err and not (tmp_path / "out").exists()


def test_check_passes_and_logs_the_batch_for_the_processes_that_will_start(monkeypatch, tmp_path, capfd, bases):
    rows = write_jsonl(tmp_path / "rows.jsonl", qa_messages())
    base = {"BASE_MODEL": str(bases["chatml"]), "DATASET": str(rows), "OUTPUT_DIR": str(tmp_path / "out")}
    for env, batch in (
        ({}, "batch 4 sequence(s) per optimizer step = 4 per micro-batch x 1 accumulation step(s) x 1 process(es)"),
        ({"NPROC_PER_NODE": "3"}, "batch 6 sequence(s) per optimizer step = 2 per micro-batch x 1 accumulation"),
        (
            {"NNODES": "2", "MASTER_ADDR": "10.0.0.1", "NPROC_PER_NODE": "4"},
            "batch 8 sequence(s) per optimizer step = 1 per micro-batch x 1 accumulation step(s) x 8 process(es)",
        ),
        ({"PACKING": "true", "PER_DEVICE_TRAIN_BATCH_SIZE": "4"}, "rows flattened together stay apart"),
    ):
        code, err = run_check({**base, "DEVICE": "cpu", **env}, monkeypatch, tmp_path, capfd)
        assert code == ExitCode.OK and batch in err and "preflight passed" in err, err[-3000:]
    assert not (tmp_path / "out").exists()
