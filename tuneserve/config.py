"""The training configuration: every variable `python -m entrypoints.train` reads.

Defaults follow Google's "fine-tune Gemma with QLoRA for text-to-SQL" guide (r=16, alpha=16,
dropout 0.05, all-linear targets, lr 2e-4 constant, warmup 3%, max grad norm 0.3, 3 epochs,
4 sequences per step, max length 512), except where noted in the help: how the batch is split
into micro-batches and laid out, gradient checkpointing and the CPU's dtype follow the hardware.
"""

from __future__ import annotations

import re
from pathlib import Path

from tuneserve.layout import MERGE_BASES
from tuneserve.refs import DATA_EXTENSIONS, data_extension, looks_local
from tuneserve.settings import Prefix, Schema, Settings, Var

NAMED_TEMPLATES = ("chatml", "llama3", "gemma")
# Attention kernels that keep the rows of a packed sequence apart: flash attention through the sequence boundaries
# the collator passes (cu_seq_lens), sdpa and eager through the block-diagonal mask transformers builds from the
# per-row position ids (masking_utils.find_packed_sequence_indices). Training also checks it on the loaded model.
# flex_attention keeps them apart too, but is compiled on first use, and torch 2.13's CPU code generation fails
# on some of its masks (Gemma 3's sliding window packed), so it is not offered for packing.
PACKED_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")

G_MODEL, G_DATA, G_LOSS, G_QUANT, G_LORA, G_TRAIN, G_DIST, G_MERGE, G_PUBLISH, G_RUN = (
    "Model",
    "Dataset and formatting",
    "Loss",
    "Quantization and precision",
    "LoRA",
    "Training",
    "Distributed",
    "Merge, verify, evaluate",
    "Publish",
    "Run",
)
# Experiment trackers' credentials, read by their libraries from the environment (pipeline.use_token hands over
# the *_FILE forms): secrets like HF_TOKEN, masked in config.json and redacted from every log line.
TRACKER_SECRETS = {
    "WANDB_API_KEY": "Weights & Biases API key",
    "MLFLOW_TRACKING_PASSWORD": "MLflow tracking server password",
    "MLFLOW_TRACKING_TOKEN": "MLflow tracking server token",
}

TRAIN_VARS = [
    # ---- model
    Var("BASE_MODEL", "str", None, "Base model: Hub id (org/name) or local directory.", G_MODEL, required=True),
    Var(
        "BASE_MODEL_REVISION",
        "str",
        None,
        "Hub revision (branch, tag or commit) of BASE_MODEL. Unset: the default branch, whose commit the first run "
        "pins in run.json for every later stage and retry.",
        G_MODEL,
    ),
    Var(
        "TOKENIZER",
        "str",
        None,
        "Tokenizer to use instead of BASE_MODEL's (e.g. the -it tokenizer with a -pt model, as the Gemma guide does).",
        G_MODEL,
    ),
    Var("TOKENIZER_REVISION", "str", None, "Hub revision of TOKENIZER (pinned as BASE_MODEL_REVISION is).", G_MODEL),
    Var("TRUST_REMOTE_CODE", "bool", False, "Allow model/tokenizer code from the Hub repository to run.", G_MODEL),
    Var(
        "ATTN_IMPLEMENTATION",
        "str",
        None,
        "Attention kernel (eager, sdpa, flash_attention_2, ...); unset lets "
        "transformers choose (sdpa). PACKING=true needs one that keeps flattened rows apart: "
        f"{', '.join(PACKED_ATTENTION)}.",
        G_MODEL,
    ),
    Var("HF_TOKEN", "str", None, "Hugging Face token for gated/private models and datasets.", G_MODEL, secret=True),
    Var(
        "HF_TOKEN_FILE",
        "str",
        None,
        "File holding the Hugging Face token (e.g. a mounted Kubernetes Secret); used when HF_TOKEN is unset.",
        G_MODEL,
    ),
    # ---- data
    Var(
        "DATASET",
        "str",
        None,
        "Dataset: Hub id, local .jsonl/.json/.csv/.parquet file, or a directory of them.",
        G_DATA,
        required=True,
    ),
    Var("DATASET_CONFIG", "str", None, "Dataset configuration (subset) name on the Hub.", G_DATA),
    Var("DATASET_REVISION", "str", None, "Hub revision of DATASET (pinned as BASE_MODEL_REVISION is).", G_DATA),
    Var("DATASET_SPLIT", "str", "train", "Split to train on.", G_DATA),
    Var("EVAL_SPLIT", "str", None, "Split held out for evaluation (exclusive with EVAL_SIZE).", G_DATA),
    Var(
        "EVAL_SIZE",
        "count|fraction",
        None,
        "Hold out this many rows (or this fraction) of the training split for evaluation, chosen with SEED.",
        G_DATA,
    ),
    Var(
        "MAX_SAMPLES",
        "int",
        None,
        "Use at most this many training rows (after shuffling with SEED).",
        G_DATA,
        minimum=1,
    ),
    Var("TEXT_FIELD", "str", "text", "Column holding plain text for language-modelling datasets.", G_DATA),
    Var(
        "SYSTEM_PROMPT",
        "text",
        None,
        "Column datasets: system message of every conversation (folded into the "
        "user turn by templates without a system role).",
        G_DATA,
    ),
    Var(
        "USER_TEMPLATE",
        "text",
        None,
        "Column datasets: user message built from columns with {column} "
        "placeholders, e.g. '{sql_context}\\n{sql_prompt}' (\\n and \\t are a newline and a tab). Setting it "
        "turns column rows into conversations.",
        G_DATA,
    ),
    Var("ASSISTANT_FIELD", "str", None, "Column datasets: column holding the assistant's answer.", G_DATA),
    Var(
        "TOOLS",
        "str",
        None,
        "JSON file with the function schemas (OpenAI's `tools` list) of every conversation, for tool-calling "
        "data; a row's own `tools` column wins. The chat template renders them as serving does.",
        G_DATA,
    ),
    Var(
        "CHAT_TEMPLATE",
        "str",
        None,
        "Chat template: a .jinja file, the template text, or a well-known name "
        f"({', '.join(NAMED_TEMPLATES)}). Unset: the tokenizer's own. Missing special tokens are added and "
        "trained.",
        G_DATA,
    ),
    Var(
        "MAX_SEQ_LENGTH",
        "int",
        512,
        "Longest tokenized row; longer rows are dropped and listed (TRL: max_length).",
        G_DATA,
        minimum=8,
    ),
    Var(
        "MAX_OVERLONG_FRACTION",
        "float",
        0.01,
        "Fail (exit 3) when more than this fraction of rows is longer "
        "than MAX_SEQ_LENGTH; below it they are dropped with a warning naming them.",
        G_DATA,
        minimum=0.0,
        maximum=1.0,
    ),
    Var(
        "PACKING",
        "auto|bool",
        "auto",
        "How a micro-batch's rows are laid out; speed only: the batch, the steps per epoch and each step's rows "
        "are the same either way. true: flattened into one padding-free sequence, each row keeping its own "
        "position ids, so rows never attend to each other (checked on the model). false: padded side by side. "
        "auto: flattened on a GPU (with an attention kernel that keeps rows apart), padded on the CPU (where "
        "attention over the flattened rows costs more than the padding saves).",
        G_DATA,
    ),
    # ---- loss
    Var(
        "ASSISTANT_ONLY_LOSS",
        "bool",
        True,
        "Conversations: train only on assistant turns (end-of-turn token "
        "included). Works with any template; no {% generation %} markers needed.",
        G_LOSS,
    ),
    Var("COMPLETION_ONLY_LOSS", "bool", True, "Prompt/completion rows: train only on the completion.", G_LOSS),
    # ---- quantization and precision
    Var(
        "LOAD_IN_4BIT",
        "bool",
        True,
        "QLoRA: load the base in 4-bit (bitsandbytes NF4, double quantization). "
        "false: plain LoRA on the unquantized base.",
        G_QUANT,
    ),
    Var(
        "DTYPE",
        "str",
        "auto",
        "Compute dtype: auto = bfloat16 where the hardware computes it natively (GPUs "
        "from Ampere on; CPUs with AVX512-BF16 or AMX, Arm with BF16), else float16 on a GPU and float32 on a CPU "
        "(emulated bfloat16 is several times slower). The log says what was chosen and why.",
        G_QUANT,
        choices=("auto", "bfloat16", "float16", "float32"),
    ),
    Var(
        "DEVICE",
        "str",
        "auto",
        "Where to train: auto = CUDA when available, else the CPU.",
        G_QUANT,
        choices=("auto", "cuda", "cpu"),
    ),
    # ---- lora
    Var("LORA_R", "int", 16, "LoRA rank.", G_LORA, minimum=1),
    Var("LORA_ALPHA", "int", 16, "LoRA alpha (scaling = alpha / r).", G_LORA, minimum=1),
    Var("LORA_DROPOUT", "float", 0.05, "LoRA dropout.", G_LORA, minimum=0.0, maximum=1.0),
    Var(
        "LORA_TARGET_MODULES",
        "list",
        ["all-linear"],
        "Modules to adapt: all-linear (on a multimodal base: those of its language model), or a comma/JSON list.",
        G_LORA,
    ),
    Var(
        "LORA_MODULES_TO_SAVE",
        "list",
        None,
        "Modules trained in full and saved with the adapter (e.g. lm_head,embed_tokens, as the Gemma guide does).",
        G_LORA,
    ),
    # ---- training
    Var("NUM_TRAIN_EPOCHS", "float", 3.0, "Epochs.", G_TRAIN, exclusive_minimum=0.0),
    Var("MAX_STEPS", "int", -1, "Optimizer steps; overrides NUM_TRAIN_EPOCHS when > 0.", G_TRAIN),
    Var(
        "BATCH_SIZE",
        "int",
        4,
        "Training sequences (rows, or assistant turns where the template needs one sequence each) per optimizer "
        "step, all processes together. Set alone, the split follows. Unset: PER_DEVICE_TRAIN_BATCH_SIZE x "
        "GRADIENT_ACCUMULATION_STEPS x processes when either is set, else 4 (the guide's 1 x 4) rounded up to a "
        "multiple of the processes.",
        G_TRAIN,
        minimum=1,
    ),
    Var(
        "PER_DEVICE_TRAIN_BATCH_SIZE",
        "int",
        None,
        "Sequences per forward pass in each process (micro-batch). Set alone: the batch is this x processes, no "
        "accumulation (as in TRL). Unset: the most of each process's share whose rows fit 4096 tokens on a GPU "
        "(small passes leave it waiting on kernel launches), 512 on the CPU (the guide's memory), counting each row "
        "as the longest.",
        G_TRAIN,
        minimum=1,
    ),
    Var(
        "GRADIENT_ACCUMULATION_STEPS",
        "int",
        None,
        "Micro-batches per optimizer step in each process. Set alone: the micro-batch is the least that keeps the "
        "batch at 4 or more. Unset: each process's share of BATCH_SIZE / micro-batch.",
        G_TRAIN,
        minimum=1,
    ),
    Var("LEARNING_RATE", "float", 2e-4, "Peak learning rate.", G_TRAIN, exclusive_minimum=0.0),
    Var(
        "LR_SCHEDULER_TYPE",
        "str",
        "constant",
        "Learning-rate schedule (transformers SchedulerType).",
        G_TRAIN,
        choices=(
            "linear",
            "cosine",
            "cosine_with_restarts",
            "polynomial",
            "constant",
            "constant_with_warmup",
            "inverse_sqrt",
            "reduce_lr_on_plateau",
            "cosine_with_min_lr",
            "warmup_stable_decay",
        ),
    ),
    Var(
        "WARMUP_RATIO",
        "float",
        0.03,
        "Fraction of steps spent warming up (transformers: warmup_steps < 1).",
        G_TRAIN,
        minimum=0.0,
        maximum=0.99,
    ),
    Var("MAX_GRAD_NORM", "float", 0.3, "Gradient clipping norm.", G_TRAIN, minimum=0.0),
    Var(
        "OPTIM",
        "str",
        "adamw_torch_fused",
        "Optimizer (transformers OptimizerNames, e.g. adamw_torch, paged_adamw_8bit).",
        G_TRAIN,
    ),
    Var(
        "GRADIENT_CHECKPOINTING",
        "auto|bool",
        "auto",
        "Recompute activations in the backward pass to save memory "
        "(about a third more compute). auto: on when one micro-batch's activations, estimated as tokens x layers "
        "x (16 x hidden + 6 x intermediate) x dtype bytes, would take more than half the memory free once the "
        "model is loaded (GPU memory, or the CPU's available RAM).",
        G_TRAIN,
    ),
    Var("NEFTUNE_NOISE_ALPHA", "float", None, "NEFTune embedding noise (e.g. 5).", G_TRAIN, minimum=0.0),
    Var("SEED", "int", 42, "Seed for shuffling, splitting and training.", G_TRAIN),
    Var("LOGGING_STEPS", "int", 10, "Log loss every N steps.", G_TRAIN, minimum=1),
    Var("SAVE_STEPS", "int", 100, "Checkpoint every N steps (what a preempted run resumes from).", G_TRAIN, minimum=1),
    Var("SAVE_TOTAL_LIMIT", "int", 2, "Checkpoints kept.", G_TRAIN, minimum=1),
    Var(
        "REPORT_TO",
        "list",
        ["none"],
        "Experiment trackers: none, tensorboard (event files in OUTPUT_DIR/tensorboard), all, or any other "
        "transformers integration installed in the image (wandb, mlflow, ...: not in this one; an uninstalled one "
        "exits 2 before training). Progress lines and OUTPUT_DIR/metrics.jsonl are written whatever this is.",
        G_TRAIN,
    ),
    *(
        var
        for name, what in TRACKER_SECRETS.items()
        for var in (
            Var(name, "str", None, f"{what}, for REPORT_TO in an image with the tracker.", G_TRAIN, secret=True),
            Var(f"{name}_FILE", "str", None, f"File holding {name}; used when {name} is unset.", G_TRAIN),
        )
    ),
    # ---- merge, verify, evaluate
    Var(
        "MERGE",
        "bool",
        True,
        "Merge the adapter into the base (OUTPUT_DIR/merged). false: adapter-only run "
        "(no verify, evaluate or model publish).",
        G_MERGE,
    ),
    Var(
        "MERGE_BASE",
        "str",
        "original",
        "What the adapter is added to: the base's original 16-bit weights, or "
        "the dequantized 4-bit weights it was trained against (replays the NF4 round trip).",
        G_MERGE,
        choices=MERGE_BASES,
    ),
    Var(
        "VERIFY_SAMPLES",
        "int",
        4,
        "Held-out prompts the merged model is checked on before publishing.",
        G_MERGE,
        minimum=1,
    ),
    Var(
        "VERIFY_MAX_NEW_TOKENS",
        "int",
        256,
        "Every verification answer must end with a stop id within this many tokens.",
        G_MERGE,
        minimum=1,
    ),
    Var(
        "VERIFY_MAX_PROB_DIFF",
        "float",
        None,
        "Largest allowed difference of any next-token probability "
        "between the merged and the adapter model. Unset: 0.05 when the merged weights are those the adapter "
        "model computes with (MERGE_BASE=dequantized, or no 4-bit), 0.25 for MERGE_BASE=original over NF4.",
        G_MERGE,
        minimum=0.0,
        maximum=1.0,
    ),
    Var(
        "VERIFY_COMPARE_MERGE_BASES",
        "bool",
        False,
        "Also build the other MERGE_BASE in a scratch folder and "
        "report how far it is from the adapter model (doubles the merge time).",
        G_MERGE,
    ),
    Var("EVAL_MAX_SAMPLES", "int", 200, "Held-out rows scored on the merged model.", G_MERGE, minimum=1),
    Var("EVAL_MAX_NEW_TOKENS", "int", 256, "Longest greedy answer generated during evaluation.", G_MERGE, minimum=1),
    Var(
        "EVAL_SQL_EXECUTION",
        "bool",
        False,
        "Answers are SQL: also check that each runs on sqlite against the "
        "row's schema and returns the reference query's rows.",
        G_MERGE,
    ),
    Var(
        "EVAL_SQL_CONTEXT_FIELD",
        "str",
        "sql_context",
        "Column holding the schema (CREATE TABLE/INSERT "
        "statements) for EVAL_SQL_EXECUTION; otherwise the prompt's <SCHEMA>...</SCHEMA> block.",
        G_MERGE,
    ),
    Var(
        "QUANTIZE",
        "str",
        "none",
        "After verify and evaluate, also write OUTPUT_DIR/quantized: the merged model in a scheme vLLM serves "
        "natively, in compressed-tensors format, no calibration data needed. int8: int8 weights per channel and "
        "activations per token (GPU; CPU); fp8: the same in fp8 (GPUs with fp8: Ada, Hopper and newer); w4a16: "
        "int4 weights in groups of 128 (GPU; CPU with AVX-512). Published and served only once the engine "
        "evaluation (python -m entrypoints.evaluate, serving image) finds it within QUANTIZE_MAX_DROP of the "
        "merged model.",
        G_MERGE,
        choices=("none", "int8", "fp8", "w4a16"),
    ),
    # ---- publish
    Var(
        "HUB_MODEL_ID",
        "str",
        None,
        "Publish the merged model to this Hub repo (org/name). Unset: the merged folder in OUTPUT_DIR is the result.",
        G_PUBLISH,
    ),
    Var("HUB_PRIVATE", "bool", True, "Create the repo private.", G_PUBLISH),
    Var("HUB_REVISION", "str", "main", "Branch to publish to (created when missing).", G_PUBLISH),
    Var("PUSH_ADAPTER", "bool", False, "Also publish the LoRA adapter, to HUB_ADAPTER_MODEL_ID.", G_PUBLISH),
    Var("HUB_ADAPTER_MODEL_ID", "str", None, "Repo for the adapter (default: HUB_MODEL_ID + '-adapter').", G_PUBLISH),
    Var(
        "PUBLISH_RETRIES",
        "int",
        5,
        "Attempts per Hub call on transient failures (timeouts, 5xx, connection errors) before exiting 75.",
        G_PUBLISH,
        minimum=1,
    ),
    Var("PUBLISH_BACKOFF_SECONDS", "float", 5.0, "First retry delay; doubles each attempt.", G_PUBLISH, minimum=0.0),
    # ---- distributed (torch's elastic launcher, i.e. torchrun, underneath; launch.py)
    Var(
        "NPROC_PER_NODE",
        "str",
        "auto",
        "Training processes on this node, one per GPU: auto = every visible GPU "
        "(1 on the CPU), or a number. More than one starts them with torchrun's launcher (data parallel).",
        G_DIST,
    ),
    Var(
        "NNODES", "int", 1, "Nodes taking part (each runs this same command with its own NODE_RANK).", G_DIST, minimum=1
    ),
    Var(
        "NODE_RANK",
        "int",
        0,
        "This node's rank, 0 to NNODES-1 (on Kubernetes: the Indexed Job's completion index).",
        G_DIST,
        minimum=0,
    ),
    Var(
        "MASTER_ADDR",
        "str",
        None,
        "Host of node rank 0, where the group meets (static rendezvous). Required when NNODES > 1.",
        G_DIST,
    ),
    Var("MASTER_PORT", "int", 29500, "Rendezvous port on MASTER_ADDR (NNODES > 1).", G_DIST, minimum=1, maximum=65535),
    Var(
        "DISTRIBUTED_STRATEGY",
        "str",
        "ddp",
        "ddp: every GPU holds the 4-bit model (the model must fit one GPU). "
        "fsdp: FSDP2 shards the model's layers, gradients and optimizer state across GPUs (4-bit storage in the "
        "compute dtype); each GPU still loads the whole 4-bit model first; needs CUDA.",
        G_DIST,
        choices=("ddp", "fsdp"),
    ),
    # ---- run
    Var(
        "OUTPUT_DIR",
        "str",
        "./output",
        "Everything the run writes: checkpoints/, adapter/, reports. Rerunning with the same directory resumes.",
        G_RUN,
    ),
    Var("RESUME", "bool", True, "Resume from the newest complete checkpoint in OUTPUT_DIR/checkpoints.", G_RUN),
    Var(
        "RESTART",
        "bool",
        False,
        "When OUTPUT_DIR holds a run made with settings that change the weights: remove "
        "that run's own files (checkpoints/, adapter/, merged/, data/, reports; nothing else) and start over. "
        "Without it such a rerun exits 2 listing the changes. An identical rerun resumes either way.",
        G_RUN,
    ),
    Var(
        "MEMORY_CHECK",
        "bool",
        True,
        "Preflight works out each stage's memory from the model's config, this machine's GPUs and its memory limit "
        "(logged, and in OUTPUT_DIR/memory.json) and exits 2 when training or a later stage cannot fit. false: log "
        "the plan and go on.",
        G_RUN,
    ),
    Var("LOG_LEVEL", "str", "info", "Log level.", G_RUN, choices=("debug", "info", "warning", "error")),
    Var(
        "ENV_FILE", "str", None, "A .env file to read (default: ./.env when present); the real environment wins.", G_RUN
    ),
]

# SFTConfig/LoraConfig/BitsAndBytesConfig fields this tool sets from its own variables.
SFT_MANAGED = {
    "output_dir": "use OUTPUT_DIR",
    "max_length": "use MAX_SEQ_LENGTH",
    "packing": "use PACKING",
    "padding_free": "use PACKING (each micro-batch's rows flattened padding-free)",
    "packing_strategy": "PACKING lays out each micro-batch's own rows, flattened padding-free; no rows are "
    "binned or cut (the batch counts rows either way)",
    "num_train_epochs": "use NUM_TRAIN_EPOCHS",
    "max_steps": "use MAX_STEPS",
    "seed": "use SEED",
    "per_device_train_batch_size": "use PER_DEVICE_TRAIN_BATCH_SIZE",
    "gradient_accumulation_steps": "use GRADIENT_ACCUMULATION_STEPS",
    "learning_rate": "use LEARNING_RATE",
    "lr_scheduler_type": "use LR_SCHEDULER_TYPE",
    "warmup_steps": "use WARMUP_RATIO",
    "max_grad_norm": "use MAX_GRAD_NORM",
    "optim": "use OPTIM",
    "gradient_checkpointing": "use GRADIENT_CHECKPOINTING",
    "neftune_noise_alpha": "use NEFTUNE_NOISE_ALPHA",
    "logging_steps": "use LOGGING_STEPS",
    "save_steps": "use SAVE_STEPS",
    "save_total_limit": "use SAVE_TOTAL_LIMIT",
    "report_to": "use REPORT_TO",
    "completion_only_loss": "use COMPLETION_ONLY_LOSS",
    "assistant_only_loss": "use ASSISTANT_ONLY_LOSS",
    "use_cpu": "use DEVICE",
    "bf16": "use DTYPE",
    "fp16": "use DTYPE",
    "chat_template_path": "use CHAT_TEMPLATE",
    "dataset_text_field": "use TEXT_FIELD",
    "resume_from_checkpoint": "resuming is automatic (RESUME)",
    "hub_token": "the token is read from HF_TOKEN / HF_TOKEN_FILE only (a token here would be saved into "
    "every checkpoint's training_args.bin)",
    "push_to_hub": "publishing is a separate stage after merge and verification",
    "model_init_kwargs": "the model is loaded by this tool (see the Model variables)",
    "save_strategy": "checkpoints are taken every SAVE_STEPS steps",
}
LORA_MANAGED = {
    "r": "use LORA_R",
    "lora_alpha": "use LORA_ALPHA",
    "lora_dropout": "use LORA_DROPOUT",
    "target_modules": "use LORA_TARGET_MODULES",
    "modules_to_save": "use LORA_MODULES_TO_SAVE",
    "task_type": "it is always CAUSAL_LM",
}
BNB_MANAGED = {
    "load_in_4bit": "use LOAD_IN_4BIT",
    "load_in_8bit": "this tool trains 4-bit QLoRA or unquantized LoRA",
}

PREFIXES = [
    Prefix("SFT_", "sft", "trl.SFTConfig", SFT_MANAGED),
    Prefix("LORA_", "lora", "peft.LoraConfig", LORA_MANAGED),
    Prefix(
        "BNB_",
        "bnb",
        "transformers.BitsAndBytesConfig",
        BNB_MANAGED,
        whole_name_first=True,
        foreign=("BNB_CUDA_VERSION",),
    ),
]


def _validate(s: Settings) -> list[str]:
    problems: list[str] = []
    hub_id = re.compile(r"^[\w.\-]+(/[\w.\-]+)?$")
    for name in ("BASE_MODEL", "TOKENIZER"):
        ref = s.get(name)
        if ref is None:
            continue
        if looks_local(ref):
            if not Path(ref).expanduser().is_dir():
                problems.append(
                    f"{name}={ref!r}: no such directory (a local model is a folder with config.json); "
                    "give an existing folder or a Hub id like org/name"
                )
        elif not hub_id.match(ref):
            problems.append(f"{name}={ref!r}: not a Hub id (org/name) nor an existing directory")
    ds = s.dataset
    if ds is not None:
        if looks_local(ds):
            p = Path(ds).expanduser()
            if not p.exists():
                problems.append(
                    f"DATASET={ds!r}: no such file or directory; give a local "
                    f"{'/'.join(DATA_EXTENSIONS)} file (.gz/.bz2/.xz too), a directory, or a Hub id like org/name"
                )
            elif p.is_file() and data_extension(ds) is None:
                problems.append(
                    f"DATASET={ds!r}: unsupported file type; use one of {', '.join(DATA_EXTENSIONS)} "
                    "(compressed with .gz, .bz2 or .xz or not)"
                )
        elif not hub_id.match(ds):
            problems.append(f"DATASET={ds!r}: not a Hub id (org/name) nor an existing path")
    if s.eval_split and s.eval_size:
        problems.append(f"EVAL_SPLIT={s.eval_split!r} and EVAL_SIZE={s.eval_size!r}: set one of them, not both")
    if s.eval_split and s.eval_split == s.dataset_split:
        problems.append(f"EVAL_SPLIT={s.eval_split!r} is also DATASET_SPLIT: evaluation rows must be held out")
    if s.user_template is not None and not s.assistant_field:
        problems.append("USER_TEMPLATE is set but ASSISTANT_FIELD is not: name the column holding the answer")
    if s.assistant_field and s.user_template is None:
        problems.append(
            "ASSISTANT_FIELD is set but USER_TEMPLATE is not: give the user message template, "
            "e.g. USER_TEMPLATE='{question}'"
        )
    if s.user_template is not None:
        try:
            template_fields(s.user_template)
        except ValueError as exc:
            problems.append(f"USER_TEMPLATE={s.user_template!r}: {exc}")
    for name in ("HF_TOKEN", *TRACKER_SECRETS):
        problems += s.secret_file_problems(name)
    if s.tools is not None and not Path(s.tools).expanduser().is_file():
        problems.append(f"TOOLS={s.tools!r}: no such file (a JSON list of function schemas)")
    ct = s.chat_template
    if ct is not None and ct not in NAMED_TEMPLATES and "{" not in ct:
        if not ct.endswith((".jinja", ".j2")):
            problems.append(
                f"CHAT_TEMPLATE={ct!r}: not a known name ({', '.join(NAMED_TEMPLATES)}), a .jinja "
                "file, nor template text"
            )
        elif not Path(ct).is_file():
            problems.append(f"CHAT_TEMPLATE={ct!r}: no such file")
    for name in ("HUB_MODEL_ID", "HUB_ADAPTER_MODEL_ID"):
        repo = s.get(name)
        if repo is not None and (not hub_id.match(repo) or repo.count("/") != 1):
            problems.append(f"{name}={repo!r}: expected a repo id like org/name")
    if s.push_adapter and not s.hub_model_id and not s.hub_adapter_model_id:
        problems.append("PUSH_ADAPTER=true needs HUB_MODEL_ID or HUB_ADAPTER_MODEL_ID")
    if s.quantize != "none" and not s.merge:
        problems.append(f"QUANTIZE={s.quantize} quantizes the merged model: it needs MERGE=true")
    if s.merge_base == "dequantized" and s.load_in_4bit is False:
        problems.append("MERGE_BASE=dequantized needs LOAD_IN_4BIT=true (there is no 4-bit round trip to replay)")
    if s.lora_target_modules == []:
        problems.append("LORA_TARGET_MODULES is empty: use all-linear or name modules")
    problems += _loss_problems(s)
    nproc = s.nproc_per_node
    if nproc != "auto" and not (nproc.isdigit() and int(nproc) >= 1):
        problems.append(f"NPROC_PER_NODE={nproc!r}: expected auto or a number of processes (>= 1)")
    if s.node_rank >= s.nnodes:
        problems.append(f"NODE_RANK={s.node_rank}: must be below NNODES={s.nnodes} (ranks count from 0)")
    if s.nnodes > 1 and not s.master_addr:
        problems.append(f"NNODES={s.nnodes} needs MASTER_ADDR: the host of node rank 0, reachable from every node")
    if s.distributed_strategy == "fsdp":
        if s.device == "cpu":
            problems.append("DISTRIBUTED_STRATEGY=fsdp needs CUDA GPUs; DEVICE=cpu trains with ddp")
    for name in ("OUTPUT_DIR",):
        out = Path(s.get(name))
        if out.exists() and not out.is_dir():
            problems.append(f"{name}={str(out)!r}: exists and is not a directory")
    return problems


def _loss_problems(s: Settings) -> list[str]:
    """Combinations TRL's SFTTrainer rejects only after the model is loaded, or that would silently train wrong.

    TRL computes the loss by a fused LM head: log-probabilities in chunks straight from `lm_head.weight`, never the
    whole logits. It reads the weight through PEFT's wrapper, so LORA_MODULES_TO_SAVE=lm_head (the Gemma guide's
    setting) trains the saved copy (tests/test_packing.py); a LoRA adapter on lm_head would never be trained."""
    problems: list[str] = []
    if s.packing is True and s.attn_implementation and s.attn_implementation not in PACKED_ATTENTION:
        problems.append(
            f"ATTN_IMPLEMENTATION={s.attn_implementation!r} with PACKING=true: packed rows would attend "
            f"to each other; use one of {', '.join(PACKED_ATTENTION)}, or PACKING=false"
        )
    if any(m == "lm_head" or m.endswith(".lm_head") for m in s.lora_target_modules or []):
        problems.append(
            "LORA_TARGET_MODULES includes lm_head: TRL computes the loss from lm_head.weight directly, "
            "so a LoRA adapter there would never train; train it in full with "
            "LORA_MODULES_TO_SAVE=lm_head instead"
        )
    sft = s.extras.get("sft", {})
    if sft.get("use_liger_kernel") and (sft.get("liger_kernel_config") or {}).get("fused_linear_cross_entropy"):
        problems.append(
            "SFT_LIGER_KERNEL_CONFIG: fused_linear_cross_entropy replaces the model's forward, which "
            "TRL's fused LM head (its loss) needs; leave it false (TRL then applies Liger's other "
            "kernels)"
        )
    return problems


def template_fields(template: str) -> list[str]:
    """The {column} placeholders of a USER_TEMPLATE (str.format syntax; {{ and }} are literal braces)."""
    import string

    names: list[str] = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier():
            raise ValueError(f"placeholder {{{name}}} is not a column name")
        names.append(name)
    return names


TRAIN_SCHEMA = Schema("train", TRAIN_VARS, PREFIXES, _validate)


def load_train_config(environ=None) -> Settings:
    return TRAIN_SCHEMA.load(environ)
