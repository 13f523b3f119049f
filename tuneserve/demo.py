"""The main job on a tiny local model, offline and on the CPU: `make demo` (python -m tuneserve.demo).

1. generate a text-to-SQL dataset in the style of the Gemma guide (schema + question -> SQL that runs on
   sqlite), with held-out rows;
2. build a small local base model (a Qwen2 architecture with a BPE tokenizer trained on the domain's text;
   its ChatML template ends assistant turns with <|im_end|>, not eos);
3. run the training image's command, `python -m entrypoints.train`, configured by environment variables
   only (the guide's column recipe): train, merge, verify, evaluate;
4. print the held-out answers next to the expected SQL, and the fraction whose SQL runs on sqlite and
   returns the expected rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tuneserve import textsql

REPO = Path(__file__).resolve().parents[1]

TRAIN_ROWS, TEST_ROWS = 1000, 20
# Settings for a randomly initialised tiny base: the output layer and embeddings are trained with the
# adapter (as the Gemma guide does with modules_to_save), a higher learning rate, no gradient clipping.
DEMO_ENV = {
    "SYSTEM_PROMPT": textsql.SYSTEM_PROMPT,
    "USER_TEMPLATE": textsql.USER_TEMPLATE,
    "ASSISTANT_FIELD": "sql",
    "EVAL_SPLIT": "test",
    "EVAL_SQL_EXECUTION": "true",
    "EVAL_MAX_NEW_TOKENS": "48",
    "VERIFY_MAX_NEW_TOKENS": "64",
    "LORA_R": "64",
    "LORA_ALPHA": "128",
    "LORA_MODULES_TO_SAVE": "lm_head,embed_tokens",
    "LEARNING_RATE": "3e-3",
    "MAX_GRAD_NORM": "1.0",
    "NUM_TRAIN_EPOCHS": "3",
    "PER_DEVICE_TRAIN_BATCH_SIZE": "8",
    "GRADIENT_ACCUMULATION_STEPS": "1",
    "LOGGING_STEPS": "25",
    "SAVE_STEPS": "100",
}


def banner(step: int, text: str) -> None:
    print(f"\n==> [{step}/4] {text}", flush=True)


def write_dataset(folder: Path) -> None:
    rows = textsql.generate(TRAIN_ROWS + TEST_ROWS, seed=1)
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[:TRAIN_ROWS]), ("test", rows[TRAIN_ROWS:])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))


def main() -> int:
    work = Path(os.environ.get("DEMO_DIR", REPO / "output" / "demo")).resolve()
    data, base, out = work / "data", work / "base", work / "run"
    start = time.monotonic()

    banner(1, f"text-to-SQL dataset: {TRAIN_ROWS} training rows, {TEST_ROWS} held out -> {data}")
    write_dataset(data)
    print(json.dumps(json.loads((data / "test.jsonl").read_text().splitlines()[0]), indent=2))

    banner(2, f"tiny local base model (Qwen2 architecture, 4 layers, hidden 256) -> {base}")
    if not (base / "config.json").is_file():
        from tuneserve.tiny import build_tiny_model

        build_tiny_model(base, textsql.corpus(), template="chatml", hidden_size=256, num_layers=4, vocab_size=1500)

    banner(3, "python -m entrypoints.train (QLoRA on the CPU, then merge, verify, evaluate)")
    env = {**os.environ, "BASE_MODEL": str(base), "DATASET": str(data), "OUTPUT_DIR": str(out),
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **DEMO_ENV}
    for key in [k for k in env if k.startswith(("HUB_", "PUSH_"))]:
        env.pop(key)
    code = subprocess.call([sys.executable, "-m", "entrypoints.train"], env=env, cwd=REPO)
    if code != 0:
        print(f"training exited {code}", file=sys.stderr)
        return code

    banner(4, "held-out questions answered by the merged model")
    report = json.loads((out / "eval.json").read_text())
    questions = [json.loads(line)["sql_prompt"] for line in (data / "test.jsonl").read_text().splitlines()]
    for item in report["answers"]:
        q = questions[item["row"]]
        mark = "OK " if item.get("sql_matches") else ("RUN" if item.get("sql_runs") else "ERR")
        print(f"[{mark}] {q}\n      expected: {item['reference']}\n      answer:   {item['answer']}")
    print(f"\nSQL that runs on sqlite: {report['sql_executes']:.0%}; returns the expected rows: "
          f"{report['sql_execution_match']:.0%} of {report['sql_rows']} held-out questions "
          f"(exact match {report['exact_match']:.0%}). Merged model: {out / 'merged'}. "
          f"Took {time.monotonic() - start:.0f}s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
