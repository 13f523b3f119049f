"""QUANTIZE and the engine evaluation, end to end on the CPU with the real engine: a run trains with QUANTIZE=int8
(compressed-tensors W8A8, which vLLM's CPU build serves), `python -m entrypoints.evaluate` answers the held-out
rows with vLLM for the merged and the quantized model, gates the quantized one, and the quantized model then
answers over HTTP. A quantized model that lost its task is refused by the gate (exit 4) and by the server."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import (
    CORPUS,
    LEARN_ENV,
    QA,
    REPO,
    SERVE_PYTHON,
    Server,
    ask,
    clean_env,
    copy_output,
    need_vllm,
    run_train,
    write_jsonl,
)

KEY = "sk-quantize-test-KEY1"


def run_evaluate(env: dict, *args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SERVE_PYTHON), "-m", "entrypoints.evaluate", *args],
        env=clean_env(VLLM_CPU_KVCACHE_SPACE="1", **env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def quantized_output(tmp_path_factory, chatml_base):
    """A run on the question/answer pairs with QUANTIZE=int8; its held-out split asks the same questions (the
    tiny model learns them exactly, so the figures are known: every answer right and stopped)."""
    root = tmp_path_factory.mktemp("quantized")
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    write_jsonl(root / "data" / "train.jsonl", rows)
    write_jsonl(root / "data" / "test.jsonl", rows)
    out = root / "out"
    env = {"BASE_MODEL": str(chatml_base), "DATASET": str(root / "data"), "EVAL_SPLIT": "test"}
    res = run_train({**env, "OUTPUT_DIR": str(out), "QUANTIZE": "int8", **LEARN_ENV}, cwd=root)
    assert res.returncode == 0, res.stderr[-4000:]
    return out


@pytest.mark.slow
def test_quantize_writes_a_compressed_tensors_folder_vllm_reads(quantized_output):
    from safetensors import safe_open

    folder = quantized_output / "quantized"
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "int-quantized"
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["type"], weights["strategy"]) == (8, "int", "channel")
    assert config["config_groups"]["group_0"]["input_activations"]["dynamic"] is True
    with safe_open(str(next(folder.glob("*.safetensors"))), "pt") as f:
        dtypes = {name: str(f.get_slice(name).get_dtype()) for name in f.keys()}
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == "I8"
    assert "model.layers.0.self_attn.q_proj.weight_scale" in dtypes
    assert dtypes["lm_head.weight"] in ("BF16", "F16", "F32")  # kept in 16 bits
    info = json.loads((folder / "quantize_info.json").read_text())
    assert info["scheme"] == "int8" and info["quantized_layers"] == 14 and info["bytes"] < info["source_bytes"]
    for name in ("tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (folder / name).read_bytes() == (quantized_output / "merged" / name).read_bytes()
    assert not (folder / "engine_gate.json").exists()  # no verdict until the engine evaluation


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["fp8", "w4a16"])
def test_gpu_schemes_write_checkpoints_that_answer_like_the_merged_model(tmp_path, quantized_output, scheme):
    """fp8 and w4a16 need kernels this CPU's vLLM lacks (fp8: Ada/Hopper GPUs; w4a16: AVX-512), so here their
    checkpoints are read back by transformers' compressed-tensors loader, which decompresses them: the same
    greedy answers as the merged model, from the format, group sizes and scales vLLM reads."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneserve.quantize import SCHEMES, quantize

    merged = quantized_output / "merged"
    info = quantize(merged, tmp_path / scheme, scheme=scheme)
    config = json.loads((tmp_path / scheme / "config.json").read_text())["quantization_config"]
    assert config["format"] == SCHEMES[scheme][1] and info["bytes"] < info["source_bytes"]
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / scheme, dtype=torch.bfloat16)
    for question, answer in QA:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        out = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
        assert tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip() == answer


# ------------------------------------------------------------------ streamed, shard by shard, as the loaded model
def quantize_loaded_model(merged: Path, out: Path, scheme: str) -> int:
    """The reference: quantization as tuneserve.quantize did it before it streamed, with the whole merged model
    loaded in host memory (compressed-tensors compressing the loaded model, save_pretrained writing it)."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from transformers import AutoModelForCausalLM

    from tuneserve.quantize import COPIED, IGNORE, SCHEMES

    preset, fmt = SCHEMES[scheme]
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16, device_map={"": "cpu"})
    config = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])}, ignore=IGNORE)
    apply_quantization_config(model, config)
    layers = loaded_model_weight_scales(model)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    for pattern in COPIED:
        for f in merged.glob(pattern):
            if not (out / f.name).exists():
                shutil.copy2(f, out / f.name)
    return layers


def loaded_model_weight_scales(model) -> int:
    """The reference's scales: tuneserve.quantize.set_weight_scales as it was, on the loaded model's modules."""
    from compressed_tensors.quantization import QuantizationStrategy
    from compressed_tensors.quantization.utils import calculate_qparams

    count = 0
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        args = scheme.weights
        w = module.weight.data.float()
        if args.strategy == QuantizationStrategy.GROUP:
            grouped = w.reshape(w.shape[0], -1, args.group_size)
            low, high = grouped.amin(-1), grouped.amax(-1)
        else:
            low, high = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
        scale, zero_point = calculate_qparams(low, high, args)
        module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)
        if hasattr(module, "weight_zero_point"):
            zp = module.weight_zero_point
            zp.data = zero_point.to(zp.dtype).reshape(zp.shape)
        count += 1
    return count


def read_tensors(folder: Path) -> dict[str, tuple[str, object]]:
    """Every tensor of a model folder: name -> (file, tensor)."""
    from safetensors import safe_open

    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                assert key not in tensors, f"{key} in two files"
                tensors[key] = (path.name, f.get_tensor(key))
    return tensors


def reshard(folder: Path, files: int) -> None:
    """The folder's model.safetensors split into `files` shards and an index, the tensors dealt out in name order
    like cards, so that each layer's weight and bias are in different files."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    shard = [f"model-{i + 1:05d}-of-{files:05d}.safetensors" for i in range(files)]
    weight_map = {name: shard[i % files] for i, name in enumerate(names)}
    for file in shard:
        save_file({n: tensors[n] for n in names if weight_map[n] == file}, folder / file, metadata={"format": "pt"})
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "model.safetensors").unlink()


@pytest.fixture(scope="module")
def small_merged(tmp_path_factory) -> dict[str, Path]:
    """Tiny merged folders (merge_info.json stands for the merge's record): Qwen2 (biases on q/k/v) untied in 5
    shards, each layer's weight and bias in different files; Qwen2 with a tied lm_head in one file; and a Gemma 3
    image-text model (vision tower, projector, tied lm_head) in 3 shards, whose checkpoint names
    (language_model.model.*) are not its modules' names (model.language_model.*)."""
    from devtools.tiny import build_tiny_model, build_tiny_multimodal

    root = tmp_path_factory.mktemp("small-merged")
    models = {
        "sharded": build_tiny_model(root / "sharded", CORPUS),
        "tied": build_tiny_model(root / "tied", CORPUS, tie_word_embeddings=True),
        "multimodal": build_tiny_multimodal(root / "multimodal", CORPUS),
    }
    reshard(models["sharded"], 5)
    reshard(models["multimodal"], 3)
    for folder in models.values():
        (folder / "merge_info.json").write_text("{}")
    return models


@pytest.mark.parametrize("model", ["sharded", "tied", "multimodal"])
@pytest.mark.parametrize("scheme", ["int8", "fp8", "w4a16"])
def test_quantizing_shard_by_shard_writes_what_quantizing_the_loaded_model_wrote(tmp_path, small_merged, model, scheme):
    """Every tensor (name, dtype, shape, bits), config.json (quantization_config and the rest) and every other
    file as the whole-model path wrote them; the shards keep the merged folder's names, the index maps each tensor
    to the file that holds it."""
    import torch

    from tuneserve.quantize import quantize

    merged = small_merged[model]
    reference_layers = quantize_loaded_model(merged, tmp_path / "loaded", scheme)
    info = quantize(merged, tmp_path / "streamed", scheme=scheme)
    loaded, streamed = tmp_path / "loaded", tmp_path / "streamed"

    expected, got = read_tensors(loaded), read_tensors(streamed)
    assert sorted(got) == sorted(expected)
    for name, (_, want) in expected.items():
        have = got[name][1]
        assert (have.dtype, have.shape) == (want.dtype, want.shape), name
        assert torch.equal(have.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), name
    assert info["quantized_layers"] == reference_layers > 0
    if model == "sharded":  # untied: the output layer is kept in 16 bits (tied, it is the embedding, saved once)
        assert got["lm_head.weight"][1].dtype == torch.bfloat16

    config, reference = (json.loads((f / "config.json").read_text()) for f in (streamed, loaded))
    assert config["quantization_config"] == reference["quantization_config"]
    assert config == reference
    # The reference copied the merged folder's stale index beside its single file; the streamed folder has its own.
    skip = {"model.safetensors.index.json", "quantize_info.json"}
    others = sorted(p.name for p in loaded.iterdir() if p.suffix != ".safetensors" and p.name not in skip)
    assert sorted(p.name for p in streamed.iterdir() if p.suffix != ".safetensors" and p.name not in skip) == others
    for name in others:
        assert (streamed / name).read_bytes() == (loaded / name).read_bytes(), name

    shards = sorted(p.name for p in merged.glob("*.safetensors"))
    assert sorted(p.name for p in streamed.glob("*.safetensors")) == shards
    if model != "tied":
        index = json.loads((streamed / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == {name: file for name, (file, _) in got.items()}
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for _, t in got.values())
    else:
        assert not (streamed / "model.safetensors.index.json").exists()


def test_a_merged_folder_without_a_layers_weight_is_refused_and_leaves_nothing(tmp_path, small_merged):
    """A weight missing from the shards (the loaded model would have got a random one) is named, not written."""
    from safetensors.torch import load_file, save_file

    from tuneserve.quantize import quantize

    merged = shutil.copytree(small_merged["tied"], tmp_path / "merged")
    tensors = load_file(merged / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, merged / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks weights of the model: model\.layers\.1\.mlp\.up_proj\.weight"):
        quantize(merged, tmp_path / "quantized", scheme="int8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # neither quantized/ nor its scratch folder


MEMORY_CHILD = """
import json, resource, sys
from pathlib import Path
import compressed_tensors.compressors, compressed_tensors.quantization, safetensors.torch, torch  # noqa: F401
from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401
from tuneserve.quantize import quantize
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
info = quantize(Path(sys.argv[1]), Path(sys.argv[2]), scheme="int8")
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"growth": after - before, "layers": info["quantized_layers"]}))
"""

BUILD_CHILD = """
import sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
config = LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=4096, num_hidden_layers=10,
                     num_attention_heads=16, num_key_value_heads=16, head_dim=64, tie_word_embeddings=False)
with torch.device("meta"):
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.to_empty(device="cpu")
generator = torch.Generator().manual_seed(0)
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0, 0.02, generator=generator)
model.save_pretrained(sys.argv[1], max_shard_size="30MB")
(Path(sys.argv[1]) / "merge_info.json").write_text("{}")
"""


def test_quantizing_holds_about_one_shard_not_the_model(tmp_path):
    """A 340 MB (bfloat16) Llama-shaped model in 13 shards of at most 30 MB, quantized to int8 in a process of
    its own: its peak resident memory grows by well under half the model (about 100 MB measured: a shard mapped,
    its int8 form and one weight's float32 work; the whole-model path grew by about 720 MB)."""
    import sys

    merged, out = tmp_path / "merged", tmp_path / "quantized"
    run = {"cwd": REPO, "env": clean_env(), "capture_output": True, "text": True, "timeout": 300}
    res = subprocess.run([sys.executable, "-c", BUILD_CHILD, str(merged)], **run)
    assert res.returncode == 0, res.stderr[-3000:]
    size = sum(p.stat().st_size for p in merged.glob("*.safetensors"))
    assert len(list(merged.glob("*.safetensors"))) >= 10 and size > 300e6
    res = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(merged), str(out)], **run)
    assert res.returncode == 0, res.stderr[-3000:]
    measured = json.loads(res.stdout.strip().splitlines()[-1])
    assert measured["layers"] == 70  # 10 layers of 7 Linear each, lm_head kept
    assert measured["growth"] < 0.5 * size, f"peak RSS grew {measured['growth'] / 1e6:.0f} MB for {size / 1e6:.0f} MB"


@pytest.mark.slow
def test_setting_quantize_later_quantizes_without_training_again(tmp_path, trained_output):
    out = copy_output(trained_output, tmp_path / "out")
    trained = json.loads((out / "config.json").read_text())
    env = {"BASE_MODEL": trained["BASE_MODEL"], "DATASET": trained["DATASET"], **LEARN_ENV}
    res = run_train({**env, "OUTPUT_DIR": str(out), "QUANTIZE": "int8"}, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "training already done" in res.stderr and "merge already done" in res.stderr
    assert (out / "quantized" / "quantize_info.json").is_file()


def serve_check(folder: Path, cwd: Path) -> subprocess.CompletedProcess:
    """The serving entrypoint's --check on a model folder (the serving environment)."""
    return subprocess.run(
        [str(SERVE_PYTHON), "-m", "entrypoints.serve", "--check"],
        env=clean_env(MODEL_ID=str(folder), API_KEY=KEY),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_engine_evaluation_gates_the_quantized_model_which_then_answers_over_http(tmp_path, quantized_output):
    need_vllm()
    out = shutil.copytree(quantized_output, tmp_path / "out")
    res = run_evaluate({"OUTPUT_DIR": str(out), "QUANTIZE_MAX_DROP": "0"}, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-6000:]
    report = json.loads((out / "engine_eval.json").read_text())
    merged, quantized = report["models"]["merged"], report["models"]["quantized"]
    assert report["rows"] == len(QA)
    for m in (merged, quantized):  # the evaluate stage's figures, computed from vLLM's answers
        assert m["exact_match"] == 1.0 and m["stop_rate"] == 1.0
        assert m["generated_tokens"] > 0 and m["tokens_per_second"] > 0
        assert [a["answer"] for a in m["answers"]] == [a for _, a in QA]
    assert quantized["weights_bytes"] < merged["weights_bytes"]
    transformers = json.loads((out / "eval.json").read_text())
    assert report["parity"]["figures"]["exact_match"] == {
        "vllm": 1.0,
        "transformers": transformers["exact_match"],
        "difference": round(1.0 - transformers["exact_match"], 4),
    }
    verdict = json.loads((out / "quantized" / "engine_gate.json").read_text())
    assert verdict["passed"] and verdict["budget"] == 0 and verdict["scheme"] == "int8"
    assert verdict["drops"] == {"exact_match": 0.0, "stop_rate": 0.0}
    for folder in ("merged", "quantized"):
        card = (out / folder / "README.md").read_text()
        assert "## Measured in vLLM" in card and "| quantized (vLLM) | 1.0 |" in card

    server = Server(
        {"MODEL_ID": str(out / "quantized"), "SERVED_MODEL_NAME": "qa-int8", "API_KEY": KEY, "MAX_MODEL_LEN": "128"},
        tmp_path,
    )
    try:
        server.wait_ready()
        import openai

        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY)
        assert ask(client, "qa-int8") == [(a, "stop") for _, a in QA]
    finally:
        server.stop()
    assert "CompressedTensorsW8A8Int8" in server.log.read_text()  # served as int8, not dequantized
    # The verdict holds for the files it measured: a weight file changed afterwards is refused, by name.
    assert {"config.json", "quantize_info.json"} <= verdict["files"].keys()
    shard = next(iter(sorted((out / "quantized").glob("*.safetensors"))))
    assert shard.name in verdict["files"]
    with shard.open("r+b") as fh:
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 1]))
    check = serve_check(out / "quantized", tmp_path)
    assert check.returncode == 2 and f"{shard} changed since the engine evaluation passed" in check.stderr


@pytest.mark.slow
def test_a_quantized_model_that_lost_its_task_is_refused_by_the_gate_and_the_server(
    tmp_path, quantized_output, chatml_base
):
    """The quantized folder replaced by a quantization of the untrained base (recorded as if made from this run's
    merged folder): vLLM's answers fall below the merged model's, so exit 4, a failed verdict, nothing to serve."""
    need_vllm()
    from tuneserve.quantize import quantize

    out = shutil.copytree(quantized_output, tmp_path / "out")
    untrained = shutil.copytree(out / "merged", tmp_path / "untrained")
    for f in untrained.glob("*.safetensors"):
        f.unlink()
    for f in chatml_base.glob("*.safetensors"):
        shutil.copy2(f, untrained / f.name)
    quantize(untrained, out / "quantized", scheme="int8")
    info_path = out / "quantized" / "quantize_info.json"
    info = json.loads(info_path.read_text())
    info["source_id"] = json.loads((quantized_output / "quantized" / "quantize_info.json").read_text())["source_id"]
    info_path.write_text(json.dumps(info))

    res = run_evaluate({"OUTPUT_DIR": str(out)}, cwd=tmp_path)
    assert res.returncode == 4, res.stderr[-6000:]
    assert "falls more than QUANTIZE_MAX_DROP=0.02 below the merged model" in res.stderr
    assert "Traceback" not in res.stderr
    verdict = json.loads((out / "quantized" / "engine_gate.json").read_text())
    assert not verdict["passed"] and verdict["over_budget"]["exact_match"] > 0.02
    check = serve_check(out / "quantized", tmp_path)
    assert check.returncode == 2 and "failed the engine evaluation's gate" in check.stderr


def test_serving_refuses_a_quantized_folder_the_engine_evaluation_has_not_passed(tmp_path):
    from tuneserve.engine_eval import gate_problem, measured_files

    folder = tmp_path / "quantized"
    folder.mkdir()
    assert gate_problem(folder) is None  # not a quantized folder of this tool: nothing to check
    (folder / "quantize_info.json").write_text(json.dumps({"scheme": "int8", "source_id": "abc"}))
    assert "has not been through the engine evaluation" in gate_problem(folder)
    (folder / "model.safetensors").write_bytes(b"weights" * 100)
    (folder / "sub").mkdir()
    (folder / "sub" / "tokenizer.json").write_text("{}")
    verdict = {"scheme": "int8", "source_id": "abc", "passed": True, "drops": {}, "budget": 0.02}
    (folder / "engine_gate.json").write_text(json.dumps({**verdict, "source_id": "other"}))
    assert "is for other weights" in gate_problem(folder)
    (folder / "engine_gate.json").write_text(json.dumps({**verdict, "passed": False}))
    assert "failed the engine evaluation's gate" in gate_problem(folder)
    (folder / "engine_gate.json").write_text(json.dumps(verdict))
    assert "names no files" in gate_problem(folder)  # a verdict from before files were recorded
    verdict["files"] = measured_files(folder)
    assert set(verdict["files"]) == {"quantize_info.json", "model.safetensors", "sub/tokenizer.json"}
    (folder / "engine_gate.json").write_text(json.dumps(verdict))
    assert gate_problem(folder) is None
    (folder / "README.md").write_text("# a card written after the evaluation")
    assert gate_problem(folder) is None
    # Any measured file changed, removed or added is named, whichever it is and however small the change.
    for name in verdict["files"]:
        path = folder / name
        original = path.read_bytes()
        path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        assert gate_problem(folder).startswith(f"{path} changed since the engine evaluation passed"), name
        path.unlink()
        assert gate_problem(folder).startswith(f"{path} is missing"), name
        path.write_bytes(original)
        assert gate_problem(folder) is None
    (folder / "model-00002.safetensors").write_bytes(b"more")
    assert gate_problem(folder).startswith(f"{folder / 'model-00002.safetensors'} was not evaluated")


@pytest.mark.parametrize(
    "quantized, passed, over",
    [
        ({"exact_match": 0.9, "stop_rate": 1.0}, True, {}),
        ({"exact_match": 0.89, "stop_rate": 1.0}, False, {"exact_match": 0.03}),
        ({"exact_match": 0.92, "stop_rate": 0.95}, False, {"stop_rate": 0.05}),
        ({"exact_match": 1.0, "stop_rate": 1.0}, True, {}),  # better is never a failure
    ],
)
def test_the_gate_allows_each_figure_to_drop_by_the_budget_and_no_more(quantized, passed, over):
    from tuneserve.engine_eval import gate

    verdict = gate({"exact_match": 0.92, "stop_rate": 1.0, "sql_execution_match": None}, quantized, 0.02)
    assert verdict["passed"] is passed and verdict["over_budget"] == over
    assert set(verdict["drops"]) == {"exact_match", "stop_rate"}  # figures the run has, nothing else


def test_the_engine_evaluation_refuses_a_stale_quantized_folder_and_an_environment_without_vllm(tmp_path):
    """Configuration errors, before any model loads: a quantized folder made from an earlier merged folder, and
    the command run where vLLM is missing (the training environment, here)."""
    import sys

    from tuneserve.layout import merged_id

    out = tmp_path / "out"
    (out / "merged").mkdir(parents=True)
    (out / "merged" / "merge_info.json").write_text("{}")
    (out / "config.json").write_text(json.dumps({"EVAL_MAX_SAMPLES": 8, "EVAL_MAX_NEW_TOKENS": 8}))
    write_jsonl(out / "data" / "eval.jsonl", [{"row": 0}])
    (out / "quantized").mkdir()
    info = {"scheme": "int8", "source_id": "an-older-merge"}
    (out / "quantized" / "quantize_info.json").write_text(json.dumps(info))

    def check():
        return subprocess.run(
            [sys.executable, "-m", "entrypoints.evaluate", "--check"],
            env=clean_env(OUTPUT_DIR=str(out)),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )

    res = check()
    assert res.returncode == 2 and "was made from another merged folder" in res.stderr, res.stderr[-3000:]
    info["source_id"] = merged_id(out / "merged")
    (out / "quantized" / "quantize_info.json").write_text(json.dumps(info))
    res = check()
    assert res.returncode == 2 and "run it in the serving image" in res.stderr, res.stderr[-3000:]
