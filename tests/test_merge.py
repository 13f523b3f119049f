"""The merge: equal to PEFT's merge_and_unload, memory-bounded, replaying the weights the 4-bit model computed
with, and a servable folder; the streamed safetensors reading and writing it is built on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import CORPUS, clean_env, qa_messages, run_train, write_jsonl

pytestmark = pytest.mark.slow

# Tolerance of the comparison with PEFT: our merge does PEFT's arithmetic in the same order and dtype
# (float32, then one rounding to the checkpoint dtype), so results are bit-equal in practice. The float32
# matmul B @ A may accumulate in a different order in another BLAS call, which after rounding to bfloat16
# can flip the last bit: at most 1 bfloat16 ulp, a relative error of 2**-8.
RTOL = 2**-8


def peft_reference(base: Path, adapter: Path) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer
    from trl.trainer.utils import create_model_from_path

    model = create_model_from_path(str(base), dtype=torch.bfloat16)  # the class the config names
    tok = AutoTokenizer.from_pretrained(adapter)
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok))
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().state_dict()


def merged_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_equal_to_peft(base: Path, adapter: Path, merged: Path) -> None:
    import torch

    from tuneserve.merge import checkpoint_names

    ref, ours = peft_reference(base, adapter), merged_tensors(merged)
    names = checkpoint_names(merged, list(ours))  # checkpoint names -> module names, as transformers loads them
    ours = {names[k] or k: v for k, v in ours.items()}
    config = json.loads((merged / "config.json").read_text())
    if config.get("tie_word_embeddings", False):
        ref.pop("lm_head.weight", None)  # tied: not stored, as save_pretrained does
    assert set(ref) == set(ours)
    for name, r in ref.items():
        assert ours[name].dtype == r.dtype and ours[name].shape == r.shape, name
        torch.testing.assert_close(ours[name].float(), r.float(), rtol=RTOL, atol=1e-6, msg=name)


def train_adapter(tmp_path: Path, base: Path, **env) -> Path:
    out = tmp_path / "out"
    res = run_train(
        {
            "BASE_MODEL": str(base),
            "DATASET": str(write_jsonl(tmp_path / "d.jsonl", qa_messages())),
            "OUTPUT_DIR": str(out),
            "MAX_STEPS": "3",
            "PER_DEVICE_TRAIN_BATCH_SIZE": "4",
            "LEARNING_RATE": "1e-2",
            "MERGE": "false",
            **env,
        },
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert not (out / "merged").exists()  # MERGE=false: adapter-only run
    return out / "adapter"


# ------------------------------------------------------------------------------------------- equality
def test_qlora_adapter_merge_equals_peft(trained_output, chatml_base):
    info = json.loads((trained_output / "merged" / "merge_info.json").read_text())
    assert info["method"] == "sharded" and info["merge_base"] == "original"
    assert_equal_to_peft(chatml_base, trained_output / "adapter", trained_output / "merged")


def test_added_tokens_resized_vocabulary_merge_equals_peft(tmp_path, pt_base):
    from tuneserve.merge import merge

    adapter = train_adapter(tmp_path, pt_base, CHAT_TEMPLATE="chatml")
    result = merge(str(pt_base), None, adapter, tmp_path / "merged")
    out = result.folder
    assert result.method == "sharded"
    assert_equal_to_peft(pt_base, adapter, out)
    vocab = json.loads((pt_base / "config.json").read_text())["vocab_size"]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == vocab + 2
    assert merged_tensors(out)["model.embed_tokens.weight"].shape[0] == vocab + 2


def test_tied_multi_shard_base_with_modules_to_save_merge_equals_peft(tmp_path):
    from devtools.tiny import build_tiny_model
    from tuneserve.merge import merge

    base = build_tiny_model(
        tmp_path / "tied", CORPUS, template="chatml", tie_word_embeddings=True, num_layers=4, max_shard_size="300KB"
    )
    assert len(list(base.glob("*.safetensors"))) > 1 and (base / "model.safetensors.index.json").is_file()
    adapter = train_adapter(tmp_path, base, LORA_MODULES_TO_SAVE="embed_tokens,lm_head")
    result = merge(str(base), None, adapter, tmp_path / "merged")
    out = result.folder
    assert result.method == "sharded"
    assert_equal_to_peft(base, adapter, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(merged_tensors(out))
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in base.glob("*.safetensors"))
    # The trained output layer differs from the trained embeddings, so the merged model must not tie them.
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


def test_multimodal_base_fine_tunes_on_text_rows_and_merges(tmp_path):
    """A Gemma 3 image-text-to-text base (the Gemma guide's 4B+ case) loads as its own class, trains on text
    rows, and merges like PEFT does."""
    from devtools.tiny import build_tiny_multimodal
    from tuneserve.merge import merge

    base = build_tiny_multimodal(tmp_path / "gemma3", CORPUS)
    assert json.loads((base / "config.json").read_text())["architectures"] == ["Gemma3ForConditionalGeneration"]
    adapter = train_adapter(tmp_path, base)
    assert json.loads((adapter / "training_meta.json").read_text())["end_of_turn"] == "<end_of_turn>"
    targets = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    assert targets and all(".language_model." in f".{t}." for t in targets)  # text rows: no vision-tower LoRA
    result = merge(str(base), None, adapter, tmp_path / "merged")
    assert result.method == "sharded"
    assert_equal_to_peft(base, adapter, result.folder)
    assert json.loads((result.folder / "config.json").read_text())["architectures"] == [
        "Gemma3ForConditionalGeneration"
    ]


# ------------------------------------------------------------------------------------------- memory bound
MEMORY_CHILD = """
import gc, sys
from pathlib import Path
import torch, safetensors, transformers, peft
from tuneserve.merge import merge
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
base, adapter, scratch = sys.argv[1:4]
merge(base, None, Path(adapter), Path(scratch) / "warm-up")  # one-time allocations: thread pools, arenas
gc.collect()
open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS watermark (VmHWM) to the current RSS
before = status("VmRSS")
merge(base, None, Path(adapter), Path(scratch) / "merged")
print("PEAK_GROWTH", status("VmHWM") - before)
"""


def test_merge_peak_memory_stays_bounded_on_a_model_four_times_larger(tmp_path):
    """Merging a 260 MB checkpoint (10 shards) may grow the process's peak resident memory by at most 64 MB:
    the merge holds one tensor (and the adapter) at a time, never the model or a whole shard."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from devtools.tiny import build_tiny_model, save_random_adapter

    allowed = 64 * 2**20
    base = build_tiny_model(tmp_path / "big", CORPUS, hidden_size=1024, num_layers=16, max_shard_size="30MB")
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    assert size > 4 * allowed
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    adapter = tmp_path / "adapter"
    peft_model = save_random_adapter(
        model, AutoTokenizer.from_pretrained(base), adapter, "<|im_end|>", r=8, lora_alpha=16
    )
    del model, peft_model
    res = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(base), str(adapter), str(tmp_path)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    growth = int(res.stdout.split("PEAK_GROWTH")[1])
    assert growth < allowed, f"peak memory grew by {growth / 2**20:.0f} MB merging a {size / 2**20:.0f} MB model"
    assert len(merged_tensors(tmp_path / "merged")) == len(merged_tensors(base))


# ------------------------------------------------------------------------------------------- merge base
def test_dequantized_merge_replays_the_weights_the_4bit_model_computed_with(trained_output, chatml_base):
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from safetensors.torch import load_file

    from tuneserve.config import load_train_config
    from tuneserve.merge import nf4_roundtrip
    from tuneserve.model import load_model, resolve_placement
    from tuneserve.tokenizer import prepare_tokenizer

    meta = json.loads((trained_output / "adapter" / "training_meta.json").read_text())
    cfg = load_train_config({"BASE_MODEL": str(chatml_base), "DATASET": str(trained_output / "data" / "train.jsonl")})
    model = load_model(cfg, prepare_tokenizer(cfg, needs_template=True), resolve_placement(cfg))
    original = load_file(str(chatml_base / "model.safetensors"))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert sorted(layers) == meta["quantization"]["modules"] and meta["quantization"]["device"] == "cpu"
    for name, layer in layers.items():
        # What the 4-bit layer computed with, in the checkpoint's dtype (the merged model's).
        in_training = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        w = original[f"{name}.weight"]
        assert (nf4_roundtrip(w, meta["quantization"]) == in_training.to(w.dtype)).all(), name


# ------------------------------------------------------------------------------------------- servable folder
@pytest.mark.parametrize(
    "template,eot", [("chatml", "<|im_end|>"), ("gemma", "<end_of_turn>"), ("llama3", "<|eot_id|>")]
)
def test_merged_folder_is_self_sufficient_with_stop_ids_repaired(tmp_path, template, eot):
    from transformers import AutoTokenizer, GenerationConfig

    from devtools.tiny import build_tiny_model
    from tuneserve.merge import merge

    base = build_tiny_model(tmp_path / "base", CORPUS, template=template)
    base_gen = json.loads((base / "generation_config.json").read_text())
    assert base_gen["eos_token_id"] != AutoTokenizer.from_pretrained(base).convert_tokens_to_ids(eot)
    adapter = train_adapter(tmp_path, base)
    out = merge(str(base), None, adapter, tmp_path / "merged").folder

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    tok = AutoTokenizer.from_pretrained(out)
    template_text = (out / "chat_template.jinja").read_text()
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == template_text
    assert eot in template_text and tok.chat_template == template_text
    gen = GenerationConfig.from_pretrained(out)
    assert set(gen.eos_token_id) == {tok.eos_token_id, tok.convert_tokens_to_ids(eot)}
    info = json.loads((out / "merge_info.json").read_text())
    assert info["end_of_turn"] == eot and set(info["stop_token_ids"]) == set(gen.eos_token_id)


def test_adapter_and_merged_files_are_readable_by_another_user_of_the_volume(trained_output):
    # safetensors writes 0600 whatever the umask; a serving container running as another user on the
    # same volume must still read the adapter (adapter mode) and the merged model.
    for folder in (trained_output / "adapter", trained_output / "merged"):
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert any(p.suffix == ".safetensors" for p in files)
        for path in files:
            assert path.stat().st_mode & 0o044 == 0o044, f"{path} is {oct(path.stat().st_mode)}"


# ------------------------------------------------------------------------------------------- streaming I/O
def test_streamed_safetensors_match_the_library(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from tuneserve import stream

    tensors = {
        "a": torch.randn(3, 5, dtype=torch.bfloat16),
        "b": torch.arange(7, dtype=torch.int64),
        "c": torch.randn(2, 2, 2, dtype=torch.float16),
        "empty": torch.zeros(0, 4),
        "s": torch.tensor(3.5),
    }
    lib = tmp_path / "lib.safetensors"
    save_file(tensors, str(lib), metadata={"format": "pt"})
    read = dict((e.name, t) for e, t in stream.iter_tensors(lib))
    assert set(read) == set(tensors) and all(torch.equal(read[k], tensors[k]) for k in tensors)
    ours = tmp_path / "ours.safetensors"
    writer = stream.Writer(
        ours, [(k, stream.CODES[str(t.dtype)[6:]], tuple(t.shape)) for k, t in tensors.items()], {"format": "pt"}
    )
    for k, t in tensors.items():
        writer.write(k, t)
    writer.close()
    loaded = load_file(str(ours))
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    from safetensors import safe_open

    with safe_open(str(ours), "pt") as f:
        assert f.metadata() == {"format": "pt"}
