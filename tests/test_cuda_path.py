"""The CUDA path, right by construction: what can be shown without a GPU is shown here, on the CPU.

What needs the GPU itself (TRL's Triton kernel, bitsandbytes' CUDA kernels, sdpa on CUDA, the speed) runs in
`make gpu-check` (benchmarks/gpu_check.py), whose CPU smoke mode is tested in test_bench.py.
"""

from __future__ import annotations

import pytest

from tests.helpers import run_train
from tuneserve.config import load_train_config
from tuneserve.exitcodes import ConfigError


def settings(**env):
    return load_train_config({"BASE_MODEL": "org/m", "DATASET": "org/d", **env})


@pytest.mark.parametrize(
    "name, device, needs",
    [
        ("flash_attention_2", "cuda", "'flash_attn' package"),
        ("flash_attention_3", "cuda", "'flash_attn_interface' package"),
        ("kernels-community/flash-attn2", "cuda", "'kernels' package"),
    ],
)
def test_an_attention_kernel_whose_package_is_missing_is_named_before_loading(name, device, needs):
    from tuneserve.model import attention_problem

    assert needs in attention_problem(name, device)
    assert attention_problem("sdpa", device) is None and attention_problem("eager", "cpu") is None


def test_an_unavailable_attention_kernel_exits_2_naming_the_package(tmp_path, chatml_base, qa_dataset):
    res = run_train(
        {
            "BASE_MODEL": str(chatml_base),
            "DATASET": str(qa_dataset),
            "OUTPUT_DIR": str(tmp_path / "o"),
            "ATTN_IMPLEMENTATION": "flash_attention_2",
        },
        "--check",
        cwd=tmp_path,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert "ATTN_IMPLEMENTATION=flash_attention_2: needs the 'flash_attn' package" in res.stderr
    assert "Traceback" not in res.stderr


def test_one_process_never_silently_drives_several_gpus(monkeypatch):
    """transformers counts every visible GPU for a lone process and TRL then refuses nn.DataParallel (a crash
    at the trainer); here it is a configuration error with both ways out."""
    import torch

    from tuneserve import model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(model, "compiler_problem", lambda: None)  # whatever this machine has
    with pytest.raises(
        ConfigError,
        match=r"one training process but 4 GPUs are visible \(NPROC_PER_NODE=1\).*"
        r"NPROC_PER_NODE=auto.*CUDA_VISIBLE_DEVICES",
    ):
        model.resolve_placement(settings(NPROC_PER_NODE="1"))
    # NPROC_PER_NODE=auto starts one process per GPU (here its preflight, --check, runs in this process).
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert model.resolve_placement(settings(NPROC_PER_NODE="auto")).device == "cuda"
    # A worker of a group (one per GPU) sees them all too, and uses its own.
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert model.resolve_placement(settings(NPROC_PER_NODE="1")).device == "cuda"


def test_training_on_cuda_needs_the_compiler_triton_builds_its_launcher_with(monkeypatch):
    """TRL's loss runs a Triton kernel on CUDA; Triton compiles a C module with gcc or clang on first use. Without
    one the first training step would fail after the model loaded: preflight exits 2 instead. (The image has gcc:
    tests/test_images.py builds a module there the way Triton does.)"""
    import shutil

    import torch

    from tuneserve import model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match=r"no C compiler \(gcc, clang or \$CC\): Triton"):
        model.resolve_placement(settings())
    assert model.resolve_placement(settings(DEVICE="cpu")).device == "cpu"  # the CPU path never compiles


@pytest.mark.parametrize("emulated_only, dtype", [(True, "float16"), (False, "bfloat16")])
def test_dtype_auto_on_a_gpu_counts_only_native_bfloat16(monkeypatch, emulated_only, dtype):
    """torch.cuda.is_bf16_supported() says True on a T4 or V100 (emulation); auto must pick float16 there."""
    import torch

    from tuneserve import model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(model, "compiler_problem", lambda: None)  # whatever this machine has
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or not emulated_only
    )
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4" if emulated_only else "NVIDIA H200")
    assert model.resolve_placement(settings()).dtype_name == dtype
    if emulated_only:
        with pytest.raises(ConfigError, match=r"DTYPE=bfloat16 but this GPU \(Tesla T4\) does not compute"):
            model.resolve_placement(settings(DTYPE="bfloat16"))


def test_the_trained_model_is_freed_before_the_next_stage(tmp_path, monkeypatch, chatml_base, qa_dataset):
    """Reference cycles through TRL's and accelerate's wrapped forwards keep the trained model alive until a
    collection; verify then loads the merged model beside it (on a GPU: the memory of a second model). No object
    of the trained model may outlive the training stage."""
    import weakref

    from tuneserve import data, model, tokenizer, train
    from tuneserve.layout import Layout

    cfg = load_train_config(
        {
            "BASE_MODEL": str(chatml_base),
            "DATASET": str(qa_dataset),
            "MAX_STEPS": "2",
            "OUTPUT_DIR": str(tmp_path / "out"),
            "MERGE": "false",
            "LOGGING_STEPS": "1",
        }
    )
    layout = Layout.of(cfg.output_dir)
    layout.root.mkdir(parents=True)
    placement = model.resolve_placement(cfg)
    shaped = data.load_and_shape(cfg)
    tok_info = tokenizer.prepare_tokenizer(cfg, needs_template=shaped.is_chat)
    prepared = data.tokenize(cfg, tok_info, shaped, layout.data)
    refs = []
    load_model = model.load_model

    def watched(*args):
        loaded = load_model(*args)
        refs.extend(weakref.ref(m) for m in loaded.modules())
        return loaded

    monkeypatch.setattr(model, "load_model", watched)
    train.train(cfg, layout, tok_info, prepared, placement)
    assert (layout.adapter / "adapter_model.safetensors").is_file()
    assert len(refs) > 10 and [r() for r in refs if r() is not None] == []


def test_the_nf4_replay_runs_where_training_quantized(monkeypatch):
    """bitsandbytes' CUDA kernels use fast math and its CPU kernels do not: a base quantized on a GPU is replayed
    on a GPU (MERGE_BASE=dequantized), never silently on the CPU. CPU-trained: test_merge.py replays on the CPU
    bit for bit; CUDA against CPU is measured by make gpu-check."""
    import torch

    from tuneserve.merge import nf4_roundtrip, replay_device

    quant = {"quant_type": "nf4", "blocksize": 64, "double_quant": True, "dtype": "float32", "device": "cuda"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="quantized on a GPU in training and no GPU is visible"):
        nf4_roundtrip(torch.ones(64, 64), quant)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert replay_device(quant) == "cuda"
    assert replay_device({**quant, "device": "cpu"}) == replay_device({}) == "cpu"  # and adapters before the field


@pytest.mark.parametrize("strategy, local_rank", [("ddp", "0"), ("ddp", "3"), ("fsdp", "1")])
def test_the_model_is_loaded_on_this_process_gpu_whatever_the_strategy(monkeypatch, strategy, local_rank):
    """No device_map means TRL's device_map="auto", which spreads the model over every visible GPU and which
    accelerate refuses to train in a process group: each process names its own GPU."""
    from tuneserve import model
    from tuneserve.tokenizer import TokenizerInfo

    seen = {}

    def capture(name, revision, **kwargs):  # what load_base hands TRL's create_model_from_path
        seen.update(kwargs)
        raise OSError("captured")

    monkeypatch.setattr(model, "load_base", capture)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    cfg = settings(DISTRIBUTED_STRATEGY=strategy)
    with pytest.raises(ConfigError, match="captured"):
        model.load_model(cfg, TokenizerInfo.__new__(TokenizerInfo), model.Placement("cuda", "bfloat16"))
    assert seen["device_map"] == {"": int(local_rank)}
    quant = seen["quantization_config"]
    assert quant.load_in_4bit and quant.bnb_4bit_compute_dtype.__repr__() == "torch.bfloat16"
    # FSDP can shard only floating-point storage: the 4-bit weights are stored in the compute dtype.
    assert str(quant.bnb_4bit_quant_storage) == ("torch.bfloat16" if strategy == "fsdp" else "torch.uint8")


def test_fsdp_is_fsdp2_and_a_plan_that_would_replicate_the_4bit_base_is_refused():
    from trl import SFTConfig

    from tuneserve import model
    from tuneserve.train import fsdp_options

    args = SFTConfig(output_dir="unused", bf16=False, **fsdp_options())
    assert args.fsdp_plugin_args["fsdp_version"] == 2 and args.fsdp_plugin_args["reshard_after_forward"] is True
    # The FSDP1-only options that FSDP2 ignores are not set (they would only mislead a reader).
    assert not {"use_orig_params", "sync_module_states", "backward_prefetch"} & set(args.fsdp_config)
    with pytest.raises(ConfigError, match="BNB_4BIT_QUANT_STORAGE=uint8: FSDP cannot shard integer 4-bit storage"):
        model.get_quantization_config(
            settings(DISTRIBUTED_STRATEGY="fsdp", BNB_4BIT_QUANT_STORAGE="uint8"), model.Placement("cuda", "bfloat16")
        )
