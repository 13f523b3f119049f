"""Serving: configuration checks (fast), and the main job end to end with real vLLM (CPU build): a model
trained and merged by `python -m entrypoints.train` served by `python -m entrypoints.serve`, queried
with the official openai client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import QA, REPO, ask, clean_env, free_port
from tuneserve.health import stop_server, wait_healthy

SERVE_PYTHON = Path(os.environ.get("SERVE_PYTHON", REPO / ".venv-serve" / "bin" / "python"))
KEY = "sk-serve-test-KEY123"


def serve_cmd(*args: str, python: Path | str = sys.executable) -> list[str]:
    return [str(python), "-m", "entrypoints.serve", *args]


def run_serve(env: dict, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(serve_cmd(*args), env=clean_env(**env), cwd=cwd, capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------------------------------- configuration
def test_serve_help_lists_every_variable(tmp_path):
    from tuneserve.serve import SERVE_SCHEMA

    out = run_serve({}, "--help", cwd=tmp_path)
    assert out.returncode == 0
    for var in SERVE_SCHEMA.vars:
        assert f"{var.name}  [{var.type}, default: {var.default_text()}]" in out.stdout
    assert "VLLM_ARG_<FIELD>" in out.stdout


def test_serve_configuration_errors_exit_2_all_at_once(tmp_path):
    out = run_serve({"PORT": "http", "LORA_ADAPTERS": "broken", "VLLM_ARG_NOPE": "1", "VLLM_ARG_API_KEY": "x",
                     "VLLM_ARG_KV_CACHE_DTYPE": "int3", "VLLM_PORT": "tcp://10.0.0.1:8000"}, cwd=tmp_path)
    assert out.returncode == 2
    err = out.stderr
    assert "found 7 configuration problems" in err and "Traceback" not in err
    for expected in ("MODEL_ID is required", "PORT='http'", "LORA_ADAPTERS='broken': 'broken' is not name=",
                     "VLLM_ARG_NOPE: VLLM_ARG_* variables set fields of vLLM", "VLLM_ARG_API_KEY: vLLM",
                     "VLLM_ARG_KV_CACHE_DTYPE='int3': expected one of", "VLLM_PORT='tcp://10.0.0.1:8000' was "
                     "injected by Kubernetes"):
        assert expected in err, expected


def test_command_keeps_the_key_out_of_argv_and_maps_variables(tmp_path, trained_output):
    from tuneserve.serve import SERVE_SCHEMA, build_command

    cfg = SERVE_SCHEMA.load({"MODEL_ID": str(trained_output / "merged"), "API_KEY": KEY, "MAX_MODEL_LEN": "128",
                             "SERVED_MODEL_NAME": "qa", "ENABLE_PREFIX_CACHING": "false", "MAX_OUTPUT_TOKENS": "64",
                             "VLLM_ARG_MAX_NUM_BATCHED_TOKENS": "512", "VLLM_ARG_ENFORCE_EAGER": "true",
                             "PIPELINE_PARALLEL_SIZE": "2"})
    args, env = build_command(cfg)
    assert KEY not in " ".join(args) and env == {"VLLM_API_KEY": KEY}
    joined = " ".join(args)
    for part in ("--served-model-name qa", "--max-model-len 128", "--no-enable-prefix-caching",
                 "--tensor-parallel-size 1", "--pipeline-parallel-size 2", "--max-num-batched-tokens 512", "--enforce-eager",
                 '--override-generation-config {"max_new_tokens": 64}'):
        assert part in joined, part
    # The merged folder already stops at <|im_end|>: no generation_config override is needed.
    assert "--generation-config" not in args
    out = run_serve({"MODEL_ID": str(trained_output / "merged"), "API_KEY": KEY}, "--check", cwd=tmp_path)
    assert out.returncode == 0 and KEY not in out.stdout + out.stderr


def test_adapter_mode_sets_rank_and_stop_ids_without_touching_the_base(tmp_path, trained_output, chatml_base):
    from transformers import GenerationConfig

    from tuneserve.serve import SERVE_SCHEMA, build_command

    before = (chatml_base / "generation_config.json").read_bytes()
    cfg = SERVE_SCHEMA.load({"MODEL_ID": str(chatml_base), "LORA_ADAPTERS": f"qa={trained_output / 'adapter'}"})
    args, _ = build_command(cfg)
    joined = " ".join(args)
    assert "--enable-lora --max-lora-rank 32 --max-loras 1" in joined  # trained with LORA_R=32
    assert f"--lora-modules qa={trained_output / 'adapter'}" in joined
    gen = GenerationConfig.from_pretrained(args[args.index("--generation-config") + 1])
    assert set(gen.eos_token_id) == {0, 2}  # <|endoftext|> and <|im_end|> of the tiny tokenizer
    assert (chatml_base / "generation_config.json").read_bytes() == before


def test_adapters_vllm_cannot_serve_are_refused_with_advice(tmp_path, trained_output, chatml_base):
    import shutil

    adapter = shutil.copytree(trained_output / "adapter", tmp_path / "with-mts")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["modules_to_save"] = ["lm_head", "embed_tokens"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    out = run_serve({"MODEL_ID": str(chatml_base), "LORA_ADAPTERS": f"mts={adapter}"}, "--check", cwd=tmp_path)
    assert out.returncode == 2
    assert "cannot be served by vLLM as an adapter: it trains whole modules" in out.stderr
    assert "Merge it into the base instead" in out.stderr
    config.update(modules_to_save=None, use_dora=True)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    out = run_serve({"MODEL_ID": str(chatml_base), "LORA_ADAPTERS": f"dora={adapter}"}, "--check", cwd=tmp_path)
    assert out.returncode == 2 and "it uses DoRA" in out.stderr


# ------------------------------------------------------------------------------------------- real vLLM
def need_vllm() -> None:
    if not SERVE_PYTHON.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{SERVE_PYTHON} is missing: `make setup` creates .venv-serve with vLLM's CPU build")
        pytest.skip(f"{SERVE_PYTHON} is missing (make setup creates it)")


class Server:
    def __init__(self, env: dict, cwd: Path):
        self.port = free_port()
        self.log = cwd / f"serve-{self.port}.log"
        self.proc = subprocess.Popen(
            serve_cmd(python=SERVE_PYTHON),
            env=clean_env(HOST="127.0.0.1", PORT=str(self.port), VLLM_CPU_KVCACHE_SPACE="1", **env),
            cwd=cwd, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 300) -> None:
        def check_alive():
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")

        try:
            wait_healthy(self.url, check_alive, timeout)
        except TimeoutError:
            raise AssertionError(f"server not ready in {timeout}s:\n{self.log.read_text()[-4000:]}") from None

    def stop(self) -> int:
        return stop_server(self.proc)


@pytest.fixture(scope="module")
def merged_server(tmp_path_factory, trained_output):
    need_vllm()
    server = Server({"MODEL_ID": str(trained_output / "merged"), "SERVED_MODEL_NAME": "qa-model", "API_KEY": KEY,
                     "MAX_MODEL_LEN": "128", "MAX_OUTPUT_TOKENS": "8"}, tmp_path_factory.mktemp("serve"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_served_merged_model_answers_exactly_and_stops(merged_server):
    import openai

    client = openai.OpenAI(base_url=f"{merged_server.url}/v1", api_key=KEY)
    assert ask(client, "qa-model") == [(a, "stop") for _, a in QA]
    assert [m.id for m in client.models.list().data] == ["qa-model"]


@pytest.mark.slow
def test_api_key_is_required_and_limits_are_applied(merged_server):
    import urllib.error
    import urllib.request

    import openai

    with pytest.raises(openai.AuthenticationError) as err:
        openai.OpenAI(base_url=f"{merged_server.url}/v1", api_key="wrong").models.list()
    assert err.value.status_code == 401
    request = urllib.request.Request(f"{merged_server.url}/v1/models")
    with pytest.raises(urllib.error.HTTPError) as no_key:
        urllib.request.urlopen(request, timeout=10)
    assert no_key.value.code == 401
    request.add_header("Authorization", f"Bearer {KEY}")
    with urllib.request.urlopen(request, timeout=10) as ok:
        assert ok.status == 200
    client = openai.OpenAI(base_url=f"{merged_server.url}/v1", api_key=KEY)
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model="qa-model", messages=[{"role": "user", "content": "bees " * 400}],
                                       max_tokens=8)
    assert too_long.value.status_code == 400
    with urllib.request.urlopen(f"{merged_server.url}/health", timeout=10) as health:
        assert health.status == 200
    # MAX_OUTPUT_TOKENS caps every answer, whatever the request asks for.
    long = client.chat.completions.create(model="qa-model", messages=[{"role": "user", "content": "What do bees make?"}],
                                          max_tokens=100, extra_body={"ignore_eos": True})
    assert long.usage.completion_tokens == 8 and long.choices[0].finish_reason == "length"


@pytest.mark.slow
def test_sigterm_stops_the_server_cleanly(tmp_path, trained_output):
    need_vllm()
    server = Server({"MODEL_ID": str(trained_output / "merged")}, tmp_path)
    try:
        server.wait_ready()
        # The entrypoint exec'd vLLM: the process we started is the server itself, so SIGTERM reaches it.
        cmdline = Path(f"/proc/{server.proc.pid}/cmdline").read_bytes().split(b"\0")
        assert b"vllm.entrypoints.launchers.api_server.entry" in cmdline
    finally:
        code = server.stop()
    assert code == 0, server.log.read_text()[-3000:]
    assert "Shutting down" in server.log.read_text() or "shutdown" in server.log.read_text().lower()


@pytest.mark.slow
def test_adapter_mode_answers_like_the_merged_model(tmp_path, trained_output, chatml_base):
    import openai

    need_vllm()
    server = Server({"MODEL_ID": str(chatml_base), "LORA_ADAPTERS": f"qa={trained_output / 'adapter'}",
                     "MAX_MODEL_LEN": "128"}, tmp_path)
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        assert ask(client, "qa") == [(a, "stop") for _, a in QA]
    finally:
        server.stop()


def test_vllm_flag_table_matches_the_installed_vllm():
    need_vllm()
    probe = ("import json, sys\nfrom tuneserve import vllm_flags\n"
             "sys.exit(0 if vllm_flags.generate() == vllm_flags.load() else 1)\n")
    res = subprocess.run([str(SERVE_PYTHON), "-c", probe], env=clean_env(), cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, "run `make lock` to regenerate tuneserve/vllm_flags.json\n" + res.stderr[-2000:]
