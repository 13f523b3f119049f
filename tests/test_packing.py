"""Flattened micro-batches (PACKING) never let examples see each other, the loss TRL computes trains what we ask,
and the batch planner keeps the batch users ask for.

Each supported family (Qwen2, Llama, Gemma 3 with sliding-window layers, the text path of multimodal Gemma 3) is
loaded the way training loads it (4-bit NF4 through bitsandbytes, float32 compute for a tight tolerance), its rows
encoded by our data stage and a micro-batch of them flattened by TRL's padding-free collator, exactly what the
trainer feeds the model with PACKING. Every row's logits and per-token log-probabilities (TRL's fused LM head, the
loss) must equal those of the row run alone.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from devtools.tiny import build_tokenizer
from tests.helpers import CORPUS, clean_env, qa_messages, run_train, write_jsonl
from tuneserve import batching, data, tokenizer
from tuneserve.config import load_train_config
from tuneserve.exitcodes import ConfigError

TOLERANCE = 1e-4  # absolute, on logits and log-probabilities in float32; contamination moves them by ~0.1-1
FAMILIES = ("qwen2", "llama", "gemma3_text", "gemma3")
ATTENTION = ("sdpa", "eager")  # the allowed kernels that run on the CPU (flash attention needs CUDA)


def build_family(out: Path, family: str) -> Path:
    """A tiny random base of `family` with a ChatML tokenizer; Gemma 3's sliding window (4 tokens) is shorter than
    every row, so its sliding layers' packed mask is exercised."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Gemma3Config, Gemma3ForConditionalGeneration

    tok = build_tokenizer(CORPUS, template="chatml")
    shapes = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    gemma = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16)
    torch.manual_seed(0)
    if family == "gemma3":
        vision = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
        config = Gemma3Config(
            text_config={**shapes, **gemma},
            vision_config=vision,
            mm_tokens_per_image=4,
            image_token_index=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        model = Gemma3ForConditionalGeneration(config)
    else:
        config = AutoConfig.for_model(family, **shapes, **(gemma if family == "gemma3_text" else {}))
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {f: build_family(root / f, f) for f in FAMILIES}


def load(base: Path, data_file: Path, **env):
    from tuneserve.model import load_model, resolve_placement

    cfg = load_train_config(
        {"BASE_MODEL": str(base), "DATASET": str(data_file), "DTYPE": "float32", "DEVICE": "cpu", **env}
    )
    shaped = data.load_and_shape(cfg)
    info = tokenizer.prepare_tokenizer(cfg, needs_template=shaped.is_chat)
    model = load_model(cfg, info, resolve_placement(cfg))
    return cfg, info, data.tokenize(cfg, info, shaped, None), model


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("family", FAMILIES)
def test_flattened_rows_equal_each_row_alone(families, tmp_path, family, attn):
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    from trl.trainer.utils import add_fused_lm_head

    rows = qa_messages() + [
        {"messages": [{"role": "system", "content": "Answer briefly."}, *m["messages"]]} for m in qa_messages()[:3]
    ]
    cfg, info, prepared, model = load(
        families[family], write_jsonl(tmp_path / "qa.jsonl", rows), ATTN_IMPLEMENTATION=attn, MAX_SEQ_LENGTH="96"
    )
    assert "Linear4bit" in {type(m).__name__ for m in model.modules()}  # trained through real 4-bit layers
    add_fused_lm_head(model)  # what SFTTrainer does to every model it trains
    collate = DataCollatorForLanguageModeling(pad_token_id=info.tokenizer.pad_token_id, padding_free=True)
    examples = [prepared.train[i] for i in range(len(prepared.train))]
    assert len(examples) >= 8
    batch = collate(examples)  # every row in one micro-batch, flattened into one sequence
    model.train()
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        log_probs = model(**batch, fused_lm_head=True).log_probs[0]
    eot = info.tokenizer.convert_tokens_to_ids("<|im_end|>")
    offset, seen = 0, 0
    train_rows = {tuple(ids): labels for ids, labels in zip(prepared.train["input_ids"], prepared.train["labels"])}
    flat_ids, flat_labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    for ex in examples:
        n = len(ex["input_ids"])
        ids = flat_ids[offset : offset + n]
        labels = train_rows[tuple(ids)]
        # The loss mask survives flattening: the same trained tokens (prompt masked, end-of-turn trained), except
        # the first token, which the collator masks so no row is predicted from the one before it.
        assert flat_labels[offset : offset + n] == [-100] + labels[1:]
        assert labels[0] == -100 and eot in [t for t in labels if t != -100]
        with torch.no_grad():
            alone = torch.tensor([ids])
            ref_logits = model(input_ids=alone).logits[0]
            ref_log_probs = model(input_ids=alone, labels=torch.tensor([labels]), fused_lm_head=True).log_probs[0]
        assert (logits[offset : offset + n] - ref_logits).abs().max().item() < TOLERANCE
        # log_probs[t] scores the label at t + 1; the last position of a row is never scored.
        assert (log_probs[offset : offset + n - 1] - ref_log_probs[: n - 1]).abs().max().item() < TOLERANCE
        offset, seen = offset + n, seen + 1
    assert seen == len(prepared.train)


def test_packing_check_refuses_an_attention_that_lets_packed_rows_see_each_other(families, tmp_path):
    """The check training runs on the loaded model: a kernel that ignores the block-diagonal mask (here registered
    as `causal_only`, plain causal attention over the whole packed sequence) is refused with exit 2's error; the
    allowed kernels pass it."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    def causal_only(module, query, key, value, attention_mask, **kwargs):
        return sdpa_attention_forward(
            module, query, key, value, None, is_causal=True, **{k: v for k, v in kwargs.items() if k != "is_causal"}
        )

    AttentionInterface.register("causal_only", causal_only)
    AttentionMaskInterface.register("causal_only", sdpa_mask)
    rows = write_jsonl(tmp_path / "qa.jsonl", qa_messages())
    *_, model = load(families["llama"], rows, PACKING="false", ATTN_IMPLEMENTATION="causal_only")
    with pytest.raises(ConfigError, match="rows flattened together attend to each other"):
        batching.check_packing(model, pad_token_id=0)
    for attn in ATTENTION:
        *_, model = load(families["gemma3_text"], rows, ATTN_IMPLEMENTATION=attn)
        assert batching.check_packing(model, pad_token_id=0) < TOLERANCE


@pytest.mark.parametrize(
    "env, message",
    [
        (
            {"ATTN_IMPLEMENTATION": "paged|sdpa", "PACKING": "true"},
            "ATTN_IMPLEMENTATION='paged|sdpa' with PACKING=true: packed rows would",
        ),
        ({"SFT_PACKING_STRATEGY": "wrapped"}, "SFT_PACKING_STRATEGY: trl.SFTConfig.packing_strategy is set by this"),
        ({"SFT_PADDING_FREE": "true"}, "SFT_PADDING_FREE: trl.SFTConfig.padding_free is set by this tool; use PACKING"),
        ({"LORA_TARGET_MODULES": "q_proj,lm_head"}, "LORA_TARGET_MODULES includes lm_head"),
        (
            {"SFT_USE_LIGER_KERNEL": "true", "SFT_LIGER_KERNEL_CONFIG": '{"fused_linear_cross_entropy": true}'},
            "fused_linear_cross_entropy replaces the model's forward",
        ),
    ],
)
def test_combinations_that_would_train_wrong_exit_2_before_loading_anything(tmp_path, qa_dataset, env, message):
    proc = run_train(
        {"BASE_MODEL": "org/never-downloaded", "DATASET": str(qa_dataset), "OUTPUT_DIR": str(tmp_path / "out"), **env},
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert not (tmp_path / "out").exists()
    # Without PACKING=true the same kernel is allowed (PACKING=auto then pads the rows of a micro-batch).
    if "ATTN_IMPLEMENTATION" in env:
        for packing in ("false", "auto"):
            load_train_config(clean_env(BASE_MODEL="org/m", DATASET=str(qa_dataset), **{**env, "PACKING": packing}))


@pytest.mark.parametrize("family", ["gemma3_text", "qwen2"])
def test_trl_loss_trains_the_guides_modules_to_save(families, tmp_path, family):
    """TRL's default loss (nll, computed by its fused LM head from `lm_head.weight` in chunks) with
    LORA_MODULES_TO_SAVE=lm_head,embed_tokens, as the Gemma guide sets it: it equals the cross-entropy of the full
    logits, and its gradient reaches the trained copies of lm_head and embed_tokens, not the frozen originals."""
    import torch
    from peft import get_peft_model
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    from trl.trainer.utils import add_fused_lm_head

    from tuneserve.model import get_peft_config

    cfg, info, prepared, model = load(
        families[family],
        write_jsonl(tmp_path / "qa.jsonl", qa_messages()),
        LOAD_IN_4BIT="false",
        LORA_MODULES_TO_SAVE="lm_head,embed_tokens",
    )
    add_fused_lm_head(model)
    peft_model = get_peft_model(model, get_peft_config(cfg, [], model))
    batch = DataCollatorForLanguageModeling(pad_token_id=info.tokenizer.pad_token_id, padding_free=True)(
        [prepared.train[i] for i in range(4)]
    )
    fused = peft_model(**batch, fused_lm_head=True).loss
    logits = peft_model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0, :-1]
    labels = batch["labels"][0, 1:]
    full = torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=-100)
    assert abs(fused.item() - full.item()) < TOLERANCE
    fused.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    for module in ("lm_head", "embed_tokens"):
        trained = [n for n in grads if f"{module}.modules_to_save" in n]
        assert trained and all(grads[n] is not None and grads[n].abs().sum() > 0 for n in trained), module
    frozen = [p for n, p in peft_model.named_parameters() if "original_module" in n]
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)


# ------------------------------------------------------------------------------------------- batching rules
def settings(**env):
    return load_train_config({"BASE_MODEL": "org/m", "DATASET": "org/d", **env})


WORLDS = (1, 2, 3, 4, 8, 16)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("world", WORLDS)
def test_the_default_batch_adapts_to_any_number_of_processes(world, device):
    """Nothing set: the guide's 4 sequences per step, rounded up to a multiple of the processes, each taking an equal
    share in micro-batches that fit the device's token budget."""
    for rows in (24, 512, 4096):
        plan = batching.plan(settings(), world, device, row_tokens=rows)
        assert plan.batch == world * -(-batching.DEFAULT_BATCH // world) and plan.world == world
        assert plan.micro * plan.accum * world == plan.batch
        budget = batching.GPU_MICRO_BATCH_TOKENS if device == "cuda" else batching.CPU_MICRO_BATCH_TOKENS
        assert plan.micro == 1 or plan.micro * rows <= budget
        assert "BATCH_SIZE default 4" in plan.describe()


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize(
    "name, values",
    [
        ("BATCH_SIZE", (48, 96, 144)),
        ("PER_DEVICE_TRAIN_BATCH_SIZE", (1, 3, 8)),
        ("GRADIENT_ACCUMULATION_STEPS", (1, 2, 4, 16)),
    ],
)
def test_any_one_batch_variable_set_alone_defines_the_batch(name, values, world):
    for value in values:
        for device in ("cpu", "cuda"):
            plan = batching.plan(settings(**{name: str(value)}), world, device, row_tokens=128)
            assert plan.micro * plan.accum * world == plan.batch
            if name == "BATCH_SIZE":
                assert plan.batch == value  # a multiple of every number of processes here
            elif name == "PER_DEVICE_TRAIN_BATCH_SIZE":
                assert (plan.micro, plan.accum, plan.batch) == (value, 1, value * world)  # TRL's meaning
            else:
                # The least micro-batch that keeps at least the default batch.
                assert plan.accum == value and plan.batch >= batching.DEFAULT_BATCH
                assert plan.micro == 1 or (plan.micro - 1) * value * world < batching.DEFAULT_BATCH
            assert f"{name} as set" in plan.why


@pytest.mark.parametrize(
    "env, world, expected",
    [
        ({"BATCH_SIZE": "12", "PER_DEVICE_TRAIN_BATCH_SIZE": "2"}, 3, (12, 2, 2)),
        ({"BATCH_SIZE": "12", "GRADIENT_ACCUMULATION_STEPS": "2"}, 2, (12, 3, 2)),
        ({"PER_DEVICE_TRAIN_BATCH_SIZE": "8", "GRADIENT_ACCUMULATION_STEPS": "3"}, 2, (48, 8, 3)),
        ({"BATCH_SIZE": "48", "PER_DEVICE_TRAIN_BATCH_SIZE": "8", "GRADIENT_ACCUMULATION_STEPS": "3"}, 2, (48, 8, 3)),
    ],
)
def test_values_set_together_are_kept_as_set(env, world, expected):
    plan = batching.plan(settings(**env), world, "cuda")
    assert (plan.batch, plan.micro, plan.accum) == expected


def test_two_nodes_share_the_batch_among_every_process_of_both():
    from tuneserve import launch

    cfg = settings(NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1", NPROC_PER_NODE="4")
    assert launch.planned_world(cfg) == 8
    plan = batching.plan(cfg, launch.planned_world(cfg), "cuda")
    assert (plan.batch, plan.micro, plan.accum, plan.world) == (8, 1, 1, 8)
    with pytest.raises(ConfigError, match="BATCH_SIZE=12 cannot be shared equally by 8 training process"):
        batching.plan(settings(BATCH_SIZE="12", NNODES="2", MASTER_ADDR="h", NPROC_PER_NODE="4"), 8, "cuda")


def test_micro_batches_fill_the_token_budget_of_the_device():
    def split(cfg, world, device, rows=None):
        plan = batching.plan(cfg, world, device, row_tokens=rows)
        return plan.micro, plan.accum

    assert split(settings(BATCH_SIZE="32"), 1, "cuda", 512) == (8, 4)
    assert split(settings(BATCH_SIZE="32"), 2, "cuda", 2048) == (2, 8)
    assert split(settings(), 1, "cuda", 8192) == (1, 4)
    assert split(settings(), 1, "cpu", 200) == (2, 2)
    assert split(settings(), 1, "cpu", 100) == (4, 1)
    assert split(settings(MAX_SEQ_LENGTH="256"), 1, "cpu") == (2, 2)  # rows unknown: MAX_SEQ_LENGTH each


@pytest.mark.parametrize(
    "packing, device, micro, attn, flattened",
    [
        ("auto", "cuda", 4, None, True),
        ("auto", "cpu", 4, None, False),  # the CPU: padding costs less than attention over flattened rows
        ("auto", "cuda", 4, "flex_attention", False),  # a kernel not known to keep flattened rows apart
        ("true", "cpu", 4, None, True),
        ("false", "cuda", 4, None, False),
        ("true", "cuda", 1, None, False),  # one row: nothing to flatten
    ],
)
def test_packing_decides_the_layout_of_a_micro_batch_only(packing, device, micro, attn, flattened):
    env = {"PACKING": packing, "PER_DEVICE_TRAIN_BATCH_SIZE": str(micro), "GRADIENT_ACCUMULATION_STEPS": "2"}
    if attn:
        env["ATTN_IMPLEMENTATION"] = attn
    plan = batching.plan(settings(**env), 2, device)
    assert plan.padding_free is flattened
    assert (plan.batch, plan.micro, plan.accum) == (micro * 2 * 2, micro, 2)  # the batch is the same either way


@pytest.mark.parametrize(
    "env, world, message",
    [
        ({"BATCH_SIZE": "6"}, 4, "BATCH_SIZE=6 cannot be shared equally by 4 training process(es)"),
        ({"BATCH_SIZE": "4"}, 8, "use a multiple of 8 such as 8 or 16, or leave BATCH_SIZE unset"),
        ({"BATCH_SIZE": "8", "PER_DEVICE_TRAIN_BATCH_SIZE": "3"}, 1, "PER_DEVICE_TRAIN_BATCH_SIZE=3 does not divide"),
        ({"BATCH_SIZE": "8", "GRADIENT_ACCUMULATION_STEPS": "3"}, 2, "is 4 sequence(s) each, which GRADIENT_ACC"),
        (
            {"BATCH_SIZE": "8", "PER_DEVICE_TRAIN_BATCH_SIZE": "2", "GRADIENT_ACCUMULATION_STEPS": "2"},
            1,
            "BATCH_SIZE=8 but PER_DEVICE_TRAIN_BATCH_SIZE=2 x GRADIENT_ACCUMULATION_STEPS=2 x 1 training process(es)",
        ),
    ],
)
def test_only_values_the_user_set_that_contradict_exit_2_saying_why(env, world, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        batching.plan(settings(**env), world, "cuda")


@pytest.mark.parametrize(
    "cpuinfo, native",
    [
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n", True),  # AMD Zen 4, Cooper Lake
        ("flags\t\t: fpu sse2 avx2 avx512f amx_tile amx_bf16\n", True),  # Sapphire Rapids
        ("Features\t: fp asimd bf16 i8mm sve\n", True),  # Arm v8.6+ (Graviton 3)
        ("flags\t\t: fpu sse2 avx2 avx512f avx512bw\n", False),  # Skylake: emulated
        ("", False),
    ],
)
def test_cpu_bfloat16_only_where_the_hardware_computes_it(cpuinfo, native):
    from tuneserve.model import cpu_native_bf16

    assert cpu_native_bf16(cpuinfo)[0] is native


def test_dtype_auto_on_the_cpu_follows_the_hardware_and_says_why(caplog, monkeypatch):
    from tuneserve import model

    for native, dtype in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(model, "cpu_native_bf16", lambda native=native: (native, "this CPU (test)"))
        with caplog.at_level("INFO", logger="tuneserve.model"):
            assert model.resolve_placement(settings(DEVICE="cpu")).dtype_name == dtype
        assert f"compute dtype {dtype} (DTYPE=auto: this CPU (test) " in caplog.text


def test_cpu_threads_follow_the_containers_cpu_quota(tmp_path, monkeypatch):
    from tuneserve.model import cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)))  # a 64-core node
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # a 1.5-CPU limit
    assert cpu_threads(tmp_path)[0] == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_threads(tmp_path)[0] == 64
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads(tmp_path)[1] == "OMP_NUM_THREADS=3"


def test_gradient_checkpointing_auto_turns_on_only_where_memory_needs_it(monkeypatch):
    from types import SimpleNamespace

    text = SimpleNamespace(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26)  # Gemma 3 1B
    model = SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: text))
    need = batching.activation_bytes(model, 4 * 512, 2)
    assert need == 4 * 512 * 26 * (16 * 1152 + 6 * 6912) * 2  # about 6.4 GB for 4 x 512 tokens in bfloat16
    cfg = settings()
    monkeypatch.setattr(batching, "free_memory", lambda device: (120 * 2**30, "free GPU memory"))  # an H200
    assert batching.checkpointing(cfg, model, 4, "cuda", 2) is False
    monkeypatch.setattr(batching, "free_memory", lambda device: (5 * 2**30, "free GPU memory"))  # a small GPU
    assert batching.checkpointing(cfg, model, 4, "cuda", 2) is True
    assert batching.checkpointing(settings(GRADIENT_CHECKPOINTING="false"), model, 4, "cuda", 2) is False
    assert settings(GRADIENT_CHECKPOINTING="on").gradient_checkpointing is True
    with pytest.raises(ConfigError, match="GRADIENT_CHECKPOINTING='sometimes': expected auto or a boolean"):
        settings(GRADIENT_CHECKPOINTING="sometimes")
