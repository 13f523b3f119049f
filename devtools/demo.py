"""The main job on a tiny local model, offline and on the CPU: `make demo` (python -m devtools.demo).

1. generate a text-to-SQL dataset in the style of the Gemma guide (schema + question -> SQL that runs on
   sqlite), with held-out rows;
2. build a small local base model (a Qwen2 architecture with a BPE tokenizer trained on the domain's text;
   its ChatML template ends assistant turns with <|im_end|>, not eos) and pretrain it briefly on plain
   text of the domain, as a real base has seen SQL before it is fine-tuned;
3. run the training image's command, `python -m entrypoints.train`, configured by environment variables
   only (the guide's column recipe): QLoRA, merge, verify, evaluate;
4. serve the merged model with the serving image's command, `python -m entrypoints.serve` (real vLLM, CPU);
5. ask the held-out questions over HTTP with the openai client and print the answers next to the expected
   SQL, and the fraction whose SQL runs on sqlite and returns the expected rows.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

from devtools import textsql
from devtools.health import free_port, wait_healthy
from tuneserve import sqlcheck

REPO = Path(__file__).resolve().parents[1]

TRAIN_ROWS, TEST_ROWS, PRETRAIN_ROWS = 1000, 20, 3000
STEPS = 5
DEMO_ENV = {
    "SYSTEM_PROMPT": textsql.SYSTEM_PROMPT,
    "USER_TEMPLATE": textsql.USER_TEMPLATE,
    "ASSISTANT_FIELD": "sql",
    "EVAL_SPLIT": "test",
    "EVAL_SQL_EXECUTION": "true",
    "EVAL_MAX_NEW_TOKENS": "48",
    "VERIFY_MAX_NEW_TOKENS": "64",
    "LORA_R": "32",
    "LORA_ALPHA": "64",
    "LEARNING_RATE": "2e-3",
    "MAX_GRAD_NORM": "1.0",
    "NUM_TRAIN_EPOCHS": "2",
    "BATCH_SIZE": "2",  # 2 rows a step: 500 optimizer steps an epoch
    "LOGGING_STEPS": "25",
    "SAVE_STEPS": "100",
}
SERVE_PYTHON = Path(os.environ.get("SERVE_PYTHON", REPO / ".venv-serve" / "bin" / "python"))


def banner(step: int, text: str) -> None:
    print(f"\n==> [{step}/{STEPS}] {text}", flush=True)


def write_dataset(folder: Path) -> None:
    rows = textsql.generate(TRAIN_ROWS + TEST_ROWS, seed=1)
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[:TRAIN_ROWS]), ("test", rows[TRAIN_ROWS:])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 600) -> None:
    def check_alive():
        if proc.poll() is not None:
            raise SystemExit(f"the server exited {proc.returncode}; its log: {log}")

    def progress(elapsed: float) -> None:
        print(f"  waiting for {url}/health ({elapsed:.0f}s)", end="\r", flush=True)

    try:
        waited = wait_healthy(url, check_alive, timeout, interval=2, progress=progress)
    except TimeoutError:
        raise SystemExit(f"the server was not ready in {timeout:.0f}s; its log: {log}") from None
    print(f"  ready after {waited:.0f}s", flush=True)


def main() -> int:
    work = Path(os.environ.get("DEMO_DIR", REPO / "output" / "demo")).resolve()
    data, base, out = work / "data", work / "base", work / "run"
    start = time.monotonic()

    banner(1, f"text-to-SQL dataset: {TRAIN_ROWS} training rows, {TEST_ROWS} held out -> {data}")
    write_dataset(data)
    print(json.dumps(json.loads((data / "test.jsonl").read_text().splitlines()[0]), indent=2))

    banner(2, f"tiny local base model (Qwen2 architecture, 4 layers, hidden 256), pretrained on SQL text -> {base}")
    if not (base / "config.json").is_file():
        from devtools.tiny import build_tiny_model, pretrain

        tmp = work / ".base.tmp"
        build_tiny_model(tmp, textsql.corpus(), template="chatml", hidden_size=256, num_layers=4, vocab_size=1500)
        rows = textsql.generate(PRETRAIN_ROWS, seed=777)
        pretrain(tmp, [f"{r['sql_context']}\n{r['sql_prompt']}\n{r['sql']}" for r in rows])
        tmp.rename(base)
    else:
        print(f"  reusing {base}")

    banner(3, "python -m entrypoints.train: QLoRA on the CPU, merge, verify, evaluate")
    env = {
        **os.environ,
        "BASE_MODEL": str(base),
        "DATASET": str(data),
        "OUTPUT_DIR": str(out),
        "HF_HUB_OFFLINE": "1",
        **DEMO_ENV,
    }
    for key in [k for k in env if k.startswith(("HUB_", "PUSH_"))]:
        env.pop(key)
    code = subprocess.call([sys.executable, "-m", "entrypoints.train"], env=env, cwd=REPO)
    if code != 0:
        print(f"training exited {code}", file=sys.stderr)
        return code

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    banner(4, f"python -m entrypoints.serve: vLLM on {out / 'merged'} at {url}")
    log = work / "serve.log"
    key = secrets.token_urlsafe(24)  # the server refuses to start without one
    serve_env = {
        **os.environ,
        "API_KEY": key,
        "MODEL_ID": str(out / "merged"),
        "SERVED_MODEL_NAME": "text-to-sql",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "MAX_MODEL_LEN": "512",
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
    }
    server = subprocess.Popen(
        [str(SERVE_PYTHON), "-m", "entrypoints.serve"],
        env=serve_env,
        cwd=REPO,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_ready(server, url, log)
        banner(5, "held-out questions over HTTP (openai client), SQL checked on sqlite")
        import openai

        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key)
        rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
        runs = matches = stops = 0
        for r in rows:
            reply = client.chat.completions.create(
                model="text-to-sql",
                temperature=0,
                max_tokens=64,
                messages=[
                    {"role": "system", "content": textsql.SYSTEM_PROMPT},
                    {"role": "user", "content": textsql.USER_TEMPLATE.format(**r)},
                ],
            )
            answer = reply.choices[0].message.content.strip()
            res = sqlcheck.execution_match(answer, r["sql"], r["sql_context"])
            runs, matches = runs + res.runs, matches + res.matches
            stops += reply.choices[0].finish_reason == "stop"
            mark = "OK " if res.matches else ("RUN" if res.runs else "ERR")
            print(f"[{mark}] {r['sql_prompt']}\n      expected: {r['sql']}\n      answer:   {answer}")
    finally:
        server.send_signal(15)
        server.wait(timeout=120)
    n = len(rows)
    print(
        f"\nOver HTTP: the SQL runs on sqlite for {runs}/{n} held-out questions and returns the expected rows for "
        f"{matches}/{n} ({matches / n:.0%}); {stops}/{n} answers ended with finish_reason 'stop'.\n"
        f"Merged model: {out / 'merged'}; evaluation figures: {out / 'verify.json'}. "
        f"Took {time.monotonic() - start:.0f}s."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
