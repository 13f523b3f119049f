"""The peer: Google's "Fine-tune Gemma using Hugging Face Transformers and QLoRA" (text-to-SQL) guide,
https://ai.google.dev/gemma/docs/core/huggingface_text_finetune_qlora, as code on the pinned libraries.

Each setting is the guide's; where the pinned TRL/transformers renamed or dropped a field the translation
is named next to it. Nothing here is tuned: it is what a user copying the guide runs.
"""

from __future__ import annotations

from devtools import textsql

# The guide's prompt (its `user_prompt`); the system message is the one the project's recipe adds
# (docs/training.md: "the text-to-SQL guide with environment variables only"), so both sides get the same text.
SYSTEM_MESSAGE = textsql.SYSTEM_PROMPT
USER_PROMPT = textsql.USER_TEMPLATE


def create_conversation(sample: dict) -> dict:
    """The guide's `create_conversation`: a row -> a `messages` conversation."""
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_MESSAGE},
            {
                "role": "user",
                "content": USER_PROMPT.format(sql_prompt=sample["sql_prompt"], sql_context=sample["sql_context"]),
            },
            {"role": "assistant", "content": sample["sql"]},
        ]
    }


def bnb_config(dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


def model_kwargs(dtype, device: str) -> dict:
    """The guide's `model_kwargs`: eager attention (its comment: flash_attention_2 on Ampere or newer),
    the compute dtype, device_map "auto" (the CPU here is named explicitly), 4-bit NF4 quantization."""
    return dict(
        attn_implementation="eager",
        dtype=dtype,
        device_map={"": 0} if device == "cuda" else {"": "cpu"},
        quantization_config=bnb_config(dtype),
    )


def peft_config():
    from peft import LoraConfig

    return LoraConfig(
        lora_alpha=16,
        lora_dropout=0.05,
        r=16,
        bias="none",
        target_modules="all-linear",
        task_type="CAUSAL_LM",
        modules_to_save=["lm_head", "embed_tokens"],
    )


def sft_kwargs(output_dir: str, dtype_name: str, device: str) -> dict:
    """The guide's SFTConfig arguments on TRL 1.16 / transformers 5."""
    kwargs = dict(
        output_dir=output_dir,
        max_length=512,  # the guide: max_length=512 (max_seq_length=512 in its TRL 0.15 edition)
        packing=True,  # TRL 1.16: best-fit-decreasing packing, padding-free batches
        num_train_epochs=3,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=4,
        gradient_checkpointing=True,
        optim="adamw_torch_fused",
        logging_steps=10,
        save_strategy="epoch",
        learning_rate=2e-4,
        fp16=dtype_name == "float16",
        bf16=dtype_name == "bfloat16",
        max_grad_norm=0.3,
        warmup_steps=0.03,  # the guide: warmup_ratio=0.03 (transformers 5: a float < 1 in warmup_steps)
        lr_scheduler_type="constant",
        push_to_hub=False,  # the guide: True (no Hub here)
        report_to="none",  # the guide: "tensorboard" (not installed; no effect on the step)
        # The guide's dataset_kwargs; TRL 1.16 reads only skip_prepare_dataset and ignores these two.
        dataset_kwargs={"add_special_tokens": False, "append_concat_token": True},
    )
    if device == "cpu":
        kwargs["use_cpu"] = True
    return kwargs


def sft_config(output_dir: str, dtype_name: str, device: str, **overrides):
    from trl import SFTConfig

    return SFTConfig(**{**sft_kwargs(output_dir, dtype_name, device), **overrides})


def trl_default_kwargs(output_dir: str, device: str) -> dict:
    """TRL's own defaults (its SFT guide's `SFTConfig(output_dir=...)`): batch 8, no packing, max_length 1024."""
    kwargs = dict(output_dir=output_dir, report_to="none")
    if device == "cpu":
        kwargs["use_cpu"] = True
    return kwargs
