"""Serving: configuration checks (fast), and the main job end to end with real vLLM (CPU build): a model
trained and merged by `python -m entrypoints.train` served by `python -m entrypoints.serve`, queried
with the official openai client."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import QA, REPO, SERVE_PYTHON, Server, ask, clean_env, need_vllm, serve_cmd

KEY = "sk-serve-test-KEY123"


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
    out = run_serve(
        {
            "PORT": "http",
            "LORA_ADAPTERS": "broken",
            "VLLM_ARG_NOPE": "1",
            "VLLM_ARG_API_KEY": "x",
            "VLLM_ARG_KV_CACHE_DTYPE": "int3",
            "VLLM_PORT": "tcp://10.0.0.1:8000",
        },
        cwd=tmp_path,
    )
    assert out.returncode == 2
    err = out.stderr
    assert "found 8 configuration problems" in err and "Traceback" not in err
    for expected in (
        "MODEL_ID is required",
        "no API key",
        "PORT='http'",
        "LORA_ADAPTERS='broken': 'broken' is not name=",
        "VLLM_ARG_NOPE: VLLM_ARG_* variables set fields of vLLM",
        "VLLM_ARG_API_KEY: vLLM",
        "VLLM_ARG_KV_CACHE_DTYPE='int3': expected one of",
        "VLLM_PORT='tcp://10.0.0.1:8000' was injected by Kubernetes",
    ):
        assert expected in err, expected


def test_command_keeps_the_key_out_of_argv_and_maps_variables(tmp_path, trained_output):
    from tuneserve.serve import SERVE_SCHEMA, build_command

    cfg = SERVE_SCHEMA.load(
        {
            "MODEL_ID": str(trained_output / "merged"),
            "API_KEY": KEY,
            "MAX_MODEL_LEN": "128",
            "SERVED_MODEL_NAME": "qa",
            "ENABLE_PREFIX_CACHING": "false",
            "MAX_OUTPUT_TOKENS": "64",
            "VLLM_ARG_MAX_NUM_BATCHED_TOKENS": "512",
            "VLLM_ARG_ENFORCE_EAGER": "true",
            "PIPELINE_PARALLEL_SIZE": "2",
        }
    )
    args, env = build_command(cfg)
    assert KEY not in " ".join(args) and env["VLLM_API_KEY"] == KEY and KEY not in env["TUNESERVE_GATE"]
    joined = " ".join(args)
    for part in (
        "--served-model-name qa",
        "--max-model-len 128",
        "--no-enable-prefix-caching",
        "--tensor-parallel-size 1",
        "--pipeline-parallel-size 2",
        "--max-num-batched-tokens 512",
        "--enforce-eager",
        '--override-generation-config {"max_new_tokens": 64}',
    ):
        assert part in joined, part
    # The merged folder already stops at <|im_end|>: no generation_config override is needed.
    assert "--generation-config" not in args
    out = run_serve({"MODEL_ID": str(trained_output / "merged"), "API_KEY": KEY}, "--check", cwd=tmp_path)
    assert out.returncode == 0 and KEY not in out.stdout + out.stderr


def test_adapter_mode_sets_rank_and_stop_ids_without_touching_the_base(tmp_path, trained_output, chatml_base):
    from transformers import GenerationConfig

    from tuneserve.serve import SERVE_SCHEMA, build_command

    before = (chatml_base / "generation_config.json").read_bytes()
    cfg = SERVE_SCHEMA.load(
        {"MODEL_ID": str(chatml_base), "LORA_ADAPTERS": f"qa={trained_output / 'adapter'}", "API_KEY": KEY}
    )
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
    out = run_serve(
        {"MODEL_ID": str(chatml_base), "LORA_ADAPTERS": f"mts={adapter}", "API_KEY": KEY}, "--check", cwd=tmp_path
    )
    assert out.returncode == 2
    assert "cannot be served by vLLM as an adapter: it trains whole modules" in out.stderr
    assert "Merge it into the base instead" in out.stderr
    config.update(modules_to_save=None, use_dora=True)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    out = run_serve(
        {"MODEL_ID": str(chatml_base), "LORA_ADAPTERS": f"dora={adapter}", "API_KEY": KEY}, "--check", cwd=tmp_path
    )
    assert out.returncode == 2 and "it uses DoRA" in out.stderr


@pytest.mark.parametrize(
    "env, message",
    [
        ({}, "no API key: set API_KEY or API_KEY_FILE"),
        ({"API_KEY": ""}, "API_KEY: the key is empty or blank"),
        ({"API_KEY": "  \t"}, "API_KEY: the key is empty or blank"),
        ({"API_KEY_FILE": "empty.key"}, "API_KEY_FILE='empty.key': the key is empty or blank"),
        ({"API_KEY_FILE": "blank.key"}, "API_KEY_FILE='blank.key': the key is empty or blank"),
        ({"API_KEY_FILE": "missing.key"}, "API_KEY_FILE='missing.key': no such file"),
        ({"API_KEY": "k", "VLLM_API_KEY": "k"}, "VLLM_API_KEY is set: use API_KEY or API_KEY_FILE"),
        ({"API_KEY": "k", "VLLM_SERVER_DEV_MODE": "1"}, "VLLM_SERVER_DEV_MODE is set"),
        (
            {"ALLOW_UNAUTHENTICATED": "true", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"},
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING is set",
        ),
        ({"API_KEY": "k", "VLLM_ARG_SHUTDOWN_TIMEOUT": "10"}, "use DRAIN_SECONDS"),
        # Keys no client can send, or anyone could guess: refused at start (more in the test below).
        ({"API_KEY": "sk-0123456789\nabcdef"}, "character 14 of the key is a control character (U+000A)"),
        ({"API_KEY_FILE": "huge.key"}, "API_KEY_FILE='huge.key': 10485760 bytes, not a secret"),
        ({"API_KEY": KEY, "COMPILE_CACHE_DIR": "/proc/tuneserve"}, "COMPILE_CACHE_DIR='/proc/tuneserve': cannot write"),
    ],
)
def test_server_fails_closed_without_a_usable_key_or_with_dev_switches(tmp_path, env, message):
    (tmp_path / "model").mkdir()
    (tmp_path / "empty.key").write_text("")
    (tmp_path / "blank.key").write_text(" \n\n")
    (tmp_path / "long.key").write_text("k" * 10_000 + "\n")
    (tmp_path / "huge.key").write_bytes(b"k" * (10 << 20))
    (tmp_path / "odd.key").write_text("sk-0123456789abc\x1bdef\n")
    out = run_serve({"MODEL_ID": str(tmp_path / "model"), **env}, "--check", cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr and "Traceback" not in out.stderr
    if len(env.get("API_KEY", "")) > 1:  # a refused key is described, never printed
        assert env["API_KEY"] not in out.stderr


@pytest.mark.parametrize(
    "env, message",
    [
        ({"API_KEY": "k"}, "API_KEY: the key has 1 characters; at least 16 are required"),
        ({"API_KEY": "sk-fifteen-char"}, "API_KEY: the key has 15 characters; at least 16"),
        ({"API_KEY": "sk-0123456789\tabcdef"}, "character 14 of the key is a control character (U+0009)"),
        ({"API_KEY": "sk-0123456789abc\x7fdef"}, "character 17 of the key is a control character (U+007F)"),
        ({"API_KEY": "sk-0123456789abcdé"}, "character 18 of the key is a character outside ASCII (U+00E9)"),
        ({"API_KEY": "sk-0123456789abc€"}, "character 17 of the key is a character outside ASCII (U+20AC)"),
        ({"API_KEY": "sk-" + "x" * 4094}, "API_KEY: the key has 4097 characters; at most 4096"),
        ({"API_KEY_FILE": "long.key"}, "API_KEY_FILE='long.key': the key has 10000 characters; at most 4096"),
        ({"API_KEY_FILE": "odd.key"}, "API_KEY_FILE='odd.key': character 17 of the key is a control character"),
        ({"API_KEY_FILE": "latin1.key"}, "API_KEY_FILE='latin1.key': cannot be read (UnicodeDecodeError)"),
    ],
)
def test_keys_no_client_can_send_or_anyone_could_guess_are_configuration_errors(tmp_path, monkeypatch, env, message):
    from tuneserve.exitcodes import ConfigError
    from tuneserve.serve import SERVE_SCHEMA

    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "long.key").write_text("k" * 10_000 + "\n")
    (tmp_path / "odd.key").write_text("sk-0123456789abc\x1bdef\n")
    (tmp_path / "latin1.key").write_bytes("sk-0123456789abcdé".encode("latin-1"))
    with pytest.raises(ConfigError) as refused:
        SERVE_SCHEMA.load({"MODEL_ID": str(tmp_path / "model"), **env})
    assert message in refused.value.message
    if len(env.get("API_KEY", "")) > 1:  # described, never shown
        assert env["API_KEY"] not in refused.value.message


def test_keys_any_client_can_send_are_accepted(tmp_path):
    from tuneserve.serve import SERVE_SCHEMA, api_key

    (tmp_path / "model").mkdir()
    for key in ("k" * 16, "sk-" + "x" * 4093, "with inner spaces ok", "!#$%&'()*+,-./:;<=>?@[]^_`{|}~0123"):
        (tmp_path / "key").write_text(f"  {key}\n")
        for env in ({"API_KEY": key}, {"API_KEY_FILE": str(tmp_path / "key")}):
            assert api_key(SERVE_SCHEMA.load({"MODEL_ID": str(tmp_path / "model"), **env})).strip() == key


def test_opt_ins_start_without_a_key_and_with_dev_switches(tmp_path, trained_output):
    env = {
        "MODEL_ID": str(trained_output / "merged"),
        "ALLOW_UNAUTHENTICATED": "true",
        "VLLM_SERVER_DEV_MODE": "1",
        "ALLOW_VLLM_DEV_SWITCHES": "true",
    }
    out = run_serve(env, "--check", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "no API key: ALLOW_UNAUTHENTICATED" in out.stderr


def test_the_gate_is_the_outermost_middleware_and_gets_its_settings(tmp_path, trained_output):
    from tuneserve.gate import GATE_ENV
    from tuneserve.serve import GATE_MIDDLEWARE, SERVE_SCHEMA, build_command

    (tmp_path / "key").write_text("sk-from-a-file-0123\n")
    cfg = SERVE_SCHEMA.load(
        {
            "MODEL_ID": str(trained_output / "merged"),
            "API_KEY_FILE": str(tmp_path / "key"),
            "VLLM_ARG_MIDDLEWARE": "my.Middleware",
            "MAX_CHOICES": "3",
        }
    )
    args, env = build_command(cfg)
    middleware = [args[i + 1] for i, a in enumerate(args) if a == "--middleware"]
    assert middleware == ["my.Middleware", GATE_MIDDLEWARE]  # vLLM adds them in order: the last is outermost
    assert env["VLLM_API_KEY"] == "sk-from-a-file-0123"
    gate = json.loads(env[GATE_ENV])
    assert gate["auth"] is True and gate["max_choices"] == 3 and gate["max_output_tokens"] == 2048
    assert "sk-from-a-file-0123" not in env[GATE_ENV] and "sk-from-a-file-0123" not in " ".join(args)


def test_the_compile_cache_has_a_folder_per_model_version_and_device(tmp_path, monkeypatch):
    from tuneserve import serve
    from tuneserve.serve import SERVE_SCHEMA, compile_cache_env

    models = {}
    for name, hidden in (("a", 64), ("b", 64), ("c", 128)):
        models[name] = tmp_path / name
        models[name].mkdir()
        (models[name] / "config.json").write_text(json.dumps({"hidden_size": hidden}))

    def folder(model: str, **settings) -> Path:
        cfg = SERVE_SCHEMA.load(
            {"MODEL_ID": model, "API_KEY": KEY, "COMPILE_CACHE_DIR": str(tmp_path / "cache"), **settings}
        )
        env = compile_cache_env(cfg)
        roots = {Path(env[v]).parent for v in ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
        assert len(roots) == 1 and next(iter(roots)).parent == tmp_path / "cache"
        return next(iter(roots))

    a = folder(str(models["a"]))
    assert a == folder(str(models["a"])) and a.name.startswith("vllm-")  # the same server finds its cache again
    assert len({a, folder(str(models["b"])), folder(str(models["c"])), folder(str(models["a"]), DTYPE="float16")}) == 4
    assert folder("org/model") != folder("org/model", MODEL_REVISION="v2")
    monkeypatch.setattr(serve, "device_identity", lambda: "gpu:NVIDIA H100 80GB HBM3")
    h100 = folder(str(models["a"]))
    monkeypatch.setattr(serve, "device_identity", lambda: "gpu:NVIDIA H200")
    assert len({a, h100, folder(str(models["a"]))}) == 3
    real = SERVE_SCHEMA.load({"MODEL_ID": str(models["a"]), "API_KEY": KEY})
    assert compile_cache_env(real) == {}  # unset: vLLM's own folders
    monkeypatch.undo()
    assert serve.device_identity().startswith(("cpu:", "gpu:"))


@pytest.mark.parametrize(
    "body, problem",
    [
        ({"n": 4, "max_tokens": 10}, None),
        ({"n": 5}, "n=5 is more than this server allows per request (MAX_CHOICES=4)"),
        ({"best_of": 6, "n": 1}, "best_of=6 is more than this server allows"),
        (
            {"n": 4, "max_tokens": 60},
            (
                "may generate 240 tokens (4 choices x 60 tokens), more than this server allows "
                "per request (MAX_REQUEST_OUTPUT_TOKENS=200)"
            ),
        ),
        ({"n": 3, "max_tokens": 100}, None),  # each answer is capped at MAX_OUTPUT_TOKENS: 3 x 64 = 192
        ({"n": 2}, None),  # no max_tokens: MAX_OUTPUT_TOKENS (64) per choice
        ({"n": 4}, "may generate 256 tokens (4 choices x 64 tokens)"),
        ({"max_tokens": 10_000}, None),  # capped by MAX_OUTPUT_TOKENS: one choice of 64
        ({"prompt": ["a", "b", "c", "d"], "max_tokens": 60}, "may generate 240 tokens (4 prompts x 1 choices x 60"),
        ({"prompt": "one prompt", "max_completion_tokens": 50, "n": 4}, None),
        ({"messages": [[{"role": "user", "content": "a"}]] * 5, "max_tokens": 50}, "250 tokens (5 prompts x 1 choices"),
        ({"messages": [{"role": "user", "content": "a"}] * 5, "max_tokens": 50}, None),  # one conversation
        ({"token_ids": [1, 2], "sampling_params": {"n": 9}}, "n=9 is more than"),
        ({"n": "many"}, None),  # the wrong type is vLLM's to reject
        # Numbers however they are written, as vLLM reads them: no spelling slips past the limits.
        ({"n": "2000", "max_tokens": 1}, "n=2000 is more than"),
        ({"n": 9.0, "max_tokens": 1}, "n=9 is more than"),
        ({"best_of": " 7 ", "max_tokens": 1}, "best_of=7 is more than"),
        ({"prompt": ["a"] * 4, "max_tokens": "60"}, "240 tokens (4 prompts x 1 choices x 60 tokens)"),
        ({"n": True, "max_tokens": 1}, None),
        (["not", "an", "object"], None),
        # Each route's own length field: chat reads max_completion_tokens first, completions ignore it.
        ({"messages": [], "max_tokens": 1, "max_completion_tokens": 60, "n": 4}, "240 tokens (4 choices x 60"),
        ({"prompt": "x", "max_completion_tokens": 1, "n": 4}, None),  # completions: 16 each (vLLM's default)
        ({"prompt": ["a"] * 4, "max_completion_tokens": 1, "n": 4}, "256 tokens (4 prompts x 4 choices x 16"),
        ({"prompt": "x", "messages": [], "max_tokens": 60, "max_completion_tokens": 1, "n": 4}, "240 tokens"),
        ({"input": "x", "max_output_tokens": 60, "n": 4}, "240 tokens"),
    ],
)
def test_generation_limits_count_choices_prompts_and_tokens(body, problem):
    from tuneserve.gate import check_generation_limits

    found = check_generation_limits(body, max_choices=4, max_request_output_tokens=200, max_output_tokens=64)
    assert (found is None) == (problem is None), found
    if problem is not None:
        assert problem in found[0]


@pytest.mark.parametrize(
    "raw",
    [
        json.dumps({"n": "2000"}).encode(),
        b"\xef\xbb\xbf" + json.dumps({"n": "2000"}).encode(),
        json.dumps({"n": "2000"}).encode("utf-16"),
        json.dumps({"n": "2000"}).encode("utf-32"),
        b"\r\n  " + json.dumps({"n": "2000"}).encode(),
    ],
)
def test_bodies_are_read_as_vllm_reads_them_whatever_their_encoding(raw):
    from tuneserve.gate import check_generation_limits, parse_body

    assert parse_body(raw) == {"n": "2000"} == json.loads(raw)
    found = check_generation_limits(parse_body(raw), max_choices=4, max_request_output_tokens=200, max_output_tokens=64)
    assert found is not None and "n=2000" in found[0]
    assert parse_body(b"n=2000") is None


def test_the_gate_counts_what_vllm_reads_for_any_spelling_of_a_request():
    """Thousands of random bodies (counts as numbers, strings, floats, booleans and junk; duplicate keys; UTF-8
    with and without a BOM, UTF-16, UTF-32): for every one vLLM's own request models accept, the gate's count is
    exactly prompts x n x max_tokens as vLLM's length rules give them."""
    need_vllm()
    res = subprocess.run(
        [str(SERVE_PYTHON), str(REPO / "tests" / "gate_fuzz.py"), "4000", "20261206"],
        env=clean_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    found = json.loads(res.stdout.strip().splitlines()[-1])
    assert found["accepted"] > 1000  # enough of them reach vLLM's rules to mean something
    assert found["wrong"] == []


# ------------------------------------------------------------------------------------------- real vLLM
LIMITS = {
    "MAX_OUTPUT_TOKENS": "8",
    "MAX_CHOICES": "4",
    "MAX_REQUEST_OUTPUT_TOKENS": "16",
    "MAX_REQUEST_BYTES": "65536",
    "MAX_TOKENIZE_BYTES": "4096",
    "LIVE_TIMEOUT": "3",
    "LIVE_CACHE_SECONDS": "1",
    "REQUEST_READ_TIMEOUT": "2",
}
CHAT = {"model": "qa-model", "messages": [{"role": "user", "content": "What do bees make?"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def merged_server(tmp_path_factory, trained_output):
    """The module's server. Its /metrics is served as with several API servers (`--api-server-count N`): from the
    files each process writes under PROMETHEUS_MULTIPROC_DIR (the drain test's server serves the default registry),
    which also keep the counts after the server ended."""
    need_vllm()
    folder = tmp_path_factory.mktemp("serve")
    (folder / "prometheus").mkdir()
    server = Server(
        {
            "MODEL_ID": str(trained_output / "merged"),
            "SERVED_MODEL_NAME": "qa-model",
            "API_KEY": KEY,
            "MAX_MODEL_LEN": "128",
            "PROMETHEUS_MULTIPROC_DIR": str(folder / "prometheus"),
            **LIMITS,
        },
        folder,
    )
    server.metrics_dir = folder / "prometheus"
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


def served_routes(log: str) -> dict[str, set[str]]:
    """path -> methods, from the route table vLLM logs at start (every route and mount of the running app)."""
    routes: dict[str, set[str]] = {}
    for path, kind, rest in re.findall(r"Route: (\S+), (Methods|Endpoint): (.+)", log):
        routes.setdefault(path, set()).update(m.strip() for m in rest.split(",") if kind == "Methods")
    return routes


@pytest.mark.slow
def test_every_route_the_server_lists_needs_the_key_except_probes_and_metrics(merged_server):
    from tuneserve.gate import PUBLIC

    routes = served_routes(merged_server.log.read_text())
    # The list is the server's own, whatever this vLLM version serves (SageMaker's /invocations among them).
    assert len(routes) > 20 and "/invocations" in routes and "/v1/chat/completions" in routes
    open_routes = []
    for path, methods in sorted(routes.items()):
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        for method in sorted(methods - {"HEAD"}) or ["GET", "POST"]:
            body = {} if method in ("POST", "PUT", "PATCH") else None
            for key in (None, "wrong-" + KEY, KEY[:-1]):
                status, answer = merged_server.request(concrete, body, key=key, method=method)
                if path in PUBLIC:
                    assert status != 401, (method, path)
                elif status != 401:
                    open_routes.append((method, path, key, status))
                else:
                    assert answer["error"]["code"] == "invalid_api_key", answer  # OpenAI's error shape
    assert not open_routes, f"answered without the right key: {open_routes}"
    for probe in ("/health", "/ping", "/live", "/metrics"):
        assert merged_server.request(probe)[0] == 200, probe
    # With the key, a route vLLM does not guard itself answers: SageMaker's chat route.
    status, answer = merged_server.request("/invocations", CHAT, key=KEY)
    assert status == 200 and answer["choices"][0]["message"]["content"], answer
    assert KEY not in merged_server.log.read_text()


@pytest.mark.slow
def test_limits_are_enforced_before_any_work_and_the_server_stays_healthy(merged_server):
    import http.client

    cases = [
        ("/v1/chat/completions", {**CHAT, "n": 5}, 400, "MAX_CHOICES=4"),
        ("/invocations", {**CHAT, "n": 5}, 400, "MAX_CHOICES=4"),
        ("/v1/chat/completions", {**CHAT, "n": 3, "max_tokens": 8}, 400, "MAX_REQUEST_OUTPUT_TOKENS=16"),
        (
            "/v1/completions",
            {"model": "qa-model", "prompt": ["a", "b", "c"], "max_tokens": 8},
            400,
            "MAX_REQUEST_OUTPUT_TOKENS=16",
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "user", "content": "x" * 70_000}]},
            413,
            "MAX_REQUEST_BYTES=65536",
        ),
        ("/tokenize", {"model": "qa-model", "prompt": "bees " * 1000}, 413, "MAX_TOKENIZE_BYTES=4096"),
    ]
    for path, body, code, limit in cases:
        status, answer = merged_server.request(path, body, key=KEY)
        assert status == code and limit in answer["error"]["message"], (path, status, answer)
        ok, reply = merged_server.request("/v1/chat/completions", {**CHAT, "n": 2}, key=KEY)
        assert ok == 200 and len(reply["choices"]) == 2, reply
        assert merged_server.request("/health")[0] == 200
    # A chunked body declares no length: it is counted as it arrives.
    conn = http.client.HTTPConnection("127.0.0.1", merged_server.port, timeout=60)
    conn.putrequest("POST", "/v1/chat/completions")
    for name, value in (
        ("Authorization", f"Bearer {KEY}"),
        ("Content-Type", "application/json"),
        ("Transfer-Encoding", "chunked"),
    ):
        conn.putheader(name, value)
    conn.endheaders()
    try:
        for _ in range(20):
            chunk = b" " * 8192
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        conn.send(b"0\r\n\r\n")
    except OSError:
        pass  # the server may answer and close before the whole body is sent
    response = conn.getresponse()
    assert response.status == 413 and b"MAX_REQUEST_BYTES" in response.read()
    conn.close()
    assert merged_server.request("/tokenize", {"model": "qa-model", "prompt": "bees"}, key=KEY)[0] == 200
    # MAX_OUTPUT_TOKENS caps every answer, whatever the request asks for; too long a prompt is a 400.
    status, reply = merged_server.request(
        "/v1/chat/completions", {**CHAT, "max_tokens": 100, "ignore_eos": True}, key=KEY
    )
    assert status == 200 and reply["usage"]["completion_tokens"] == 8, reply
    long_prompt = {**CHAT, "messages": [{"role": "user", "content": "bees " * 400}]}
    assert merged_server.request("/v1/chat/completions", long_prompt, key=KEY)[0] == 400


def gate_counters(text: str) -> dict[tuple, float]:
    """The gate's counters in a Prometheus text exposition: (name, label=value, ...) -> value."""
    counters = {}
    for name, labels, value in re.findall(r"^(tuneserve_gate_\w+_total)(?:\{(.*)\})? (\S+)$", text, re.M):
        counters[(name, *sorted(f"{k}={v}" for k, v in re.findall(r'(\w+)="([^"]*)"', labels)))] = float(value)
    return counters


def scraped(server: Server) -> dict[tuple, float]:
    """The gate's counters on the server's /metrics, asked without a key as Prometheus does."""
    status, text = server.request("/metrics")
    assert status == 200, text
    counters = gate_counters(text)
    assert counters, text[-2000:]
    return counters


def counted_after_exit(folder: Path) -> dict[tuple, float]:
    """The gate's counters in a PROMETHEUS_MULTIPROC_DIR, read as /metrics reads it (the server may be gone)."""
    probe = (
        "import sys\nfrom prometheus_client import CollectorRegistry, generate_latest, multiprocess\n"
        "registry = CollectorRegistry()\nmultiprocess.MultiProcessCollector(registry, path=sys.argv[1])\n"
        "print(generate_latest(registry).decode())\n"
    )
    res = subprocess.run(
        [str(SERVE_PYTHON), "-c", probe, str(folder)], env=clean_env(), capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return gate_counters(res.stdout)


def went_up(before: dict[tuple, float], after: dict[tuple, float]) -> dict[tuple, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}


REFUSED = "tuneserve_gate_refused_total"


@pytest.mark.slow
def test_metrics_count_each_request_the_gate_refuses_by_reason(merged_server):
    """tuneserve_gate_refused_total{reason, param}, summed over the files of PROMETHEUS_MULTIPROC_DIR (as with
    several API servers): exactly the refusals sent here, nothing for the requests let through."""
    before = scraped(merged_server)
    # Every series is there from the start, at 0 or more (a rate over a series that does not exist sees nothing).
    for reason in ("invalid_api_key", "request_too_large", "request_timeout", "invalid_body", "draining"):
        assert (REFUSED, "param=", f"reason={reason}") in before, reason
    for param in ("n", "best_of", "max_tokens"):
        assert (REFUSED, f"param={param}", "reason=limit_exceeded") in before, param
    sent = [
        ("/v1/models", None, None, 401),
        ("/v1/chat/completions", CHAT, "wrong-" + KEY, 401),
        ("/v1/chat/completions", {**CHAT, "n": 5}, KEY, 400),
        ("/v1/completions", {"model": "qa-model", "prompt": "a", "best_of": 5}, KEY, 400),
        ("/v1/chat/completions", {**CHAT, "n": 3, "max_tokens": 8}, KEY, 400),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x" * 70_000}]}, KEY, 413),
        ("/tokenize", {"model": "qa-model", "prompt": "bees " * 1000}, KEY, 413),
        ("/invocations", [CHAT], KEY, 400),
        ("/v1/chat/completions", CHAT, KEY, 200),  # let through
        ("/v1/models", None, KEY, 200),
    ]
    for path, body, key, code in sent:
        assert merged_server.request(path, body, key=key)[0] == code, (path, body)
    half_body = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
        b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{" % KEY.encode()
    )
    assert raw_exchange(merged_server.port, half_body)[0].startswith(b"HTTP/1.1 408")  # REQUEST_READ_TIMEOUT=2
    assert went_up(before, scraped(merged_server)) == {
        (REFUSED, "param=", "reason=invalid_api_key"): 2,
        (REFUSED, "param=n", "reason=limit_exceeded"): 1,
        (REFUSED, "param=best_of", "reason=limit_exceeded"): 1,
        (REFUSED, "param=max_tokens", "reason=limit_exceeded"): 1,
        (REFUSED, "param=", "reason=request_too_large"): 2,
        (REFUSED, "param=", "reason=invalid_body"): 1,
        (REFUSED, "param=", "reason=request_timeout"): 1,
    }


@pytest.mark.slow
def test_live_fails_while_the_engine_is_stalled_though_health_says_200(merged_server):
    import signal
    import time

    before = scraped(merged_server)
    status, answer = merged_server.request("/live")
    assert status == 200 and answer["status"] == "ok", answer
    engine = merged_server.engine()
    engine.send_signal(signal.SIGSTOP)  # the engine stops making progress; the API process is untouched
    try:
        time.sleep(1.5)  # past LIVE_CACHE_SECONDS
        started = time.monotonic()
        status, answer = merged_server.request("/live")
        waited = time.monotonic() - started
        assert status == 503 and answer["error"]["code"] == "engine_stalled", answer
        assert 3 <= waited < 10  # LIVE_TIMEOUT=3: the probe answers, it does not hang
        assert merged_server.request("/health")[0] == 200  # what /health cannot see
    finally:
        engine.send_signal(signal.SIGCONT)
    status, answer = merged_server.request("/live")
    assert status == 200 and answer["check"] in ("generated", "progress"), answer
    live = "tuneserve_gate_live_total"
    assert went_up(before, scraped(merged_server)) == {(live, "result=pass"): 2, (live, "result=fail"): 1}


def raw_exchange(port: int, data: bytes, wait: float = 10) -> tuple[bytes, float]:
    """Sends bytes on a fresh connection and reads until the server closes it: (what came back, seconds taken)."""
    import socket
    import time

    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        if data:
            sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return received, time.monotonic() - started


@pytest.mark.slow
def test_clients_that_send_slowly_are_cut_off_and_odd_requests_log_no_traceback(merged_server):
    port = merged_server.port
    auth = f"Authorization: Bearer {KEY}\r\n".encode()
    # REQUEST_READ_TIMEOUT=2: a connection that sends nothing, or headers that never end, is closed; a body that
    # stops half way gets 408. None of them holds its connection for ever.
    for data in (
        b"",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /hea",  # the next request of a kept-alive connection
    ):
        received, took = raw_exchange(port, data)
        assert 1.5 < took < 8, (data, took)
    half_body = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth
    half_body += b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n" + b'{"model": "q'
    received, took = raw_exchange(port, half_body)
    assert received.startswith(b"HTTP/1.1 408") and b"REQUEST_READ_TIMEOUT=2" in received, received
    assert 1.5 < took < 8, took
    # A body the gate cannot count never reaches vLLM (which would read /invocations as JSON whatever its type).
    for body, content_type in (
        (b"n=2000", b"text/plain"),
        (b'[{"n": 2000}]', b"application/json"),
        (b'"text"', b"application/json"),
        (b"\xff\xfe{", b"application/json"),
    ):
        request = b"POST /invocations HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Type: " + content_type
        request += b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
        received, _ = raw_exchange(port, request)
        assert received.startswith(b"HTTP/1.1 400") and b'"invalid_body"' in received, (body, received[:300])
    # WebSocket handshakes to every kind of path, with and without the key, odd paths and methods, a key in the
    # query string: answered, and nothing in the log but access lines.
    log_before = merged_server.log.read_text()
    handshake = (
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n"
    )
    for path in (b"/metrics/x", b"/metrics", b"/health", b"/live", b"/v1/models", b"/v1/realtime", b"/nope"):
        for key in (b"", auth):
            raw_exchange(port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n" + key + handshake + b"\r\n", wait=5)
    for line in (
        b"GET /metrics/../v1/models HTTP/1.1",
        b"GET //v1//models HTTP/1.1",
        b"GET /%00 HTTP/1.1",
        b"GET /v1/models%2f..%2f HTTP/1.1",
        b"BREW /v1/models HTTP/1.1",
        b"GET http://evil/v1/models HTTP/1.1",
        b"POST /metrics HTTP/1.1",
        b"GET /health?api_key=sk-in-the-query-STRING HTTP/1.1",
    ):
        raw_exchange(port, line + b"\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", wait=5)
    assert merged_server.request("/health")[0] == 200
    log = merged_server.log.read_text()[len(log_before) :]
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
    assert "/health" in log and "sk-in-the-query-STRING" not in log  # access lines, without the query


@pytest.mark.slow
def test_a_second_sigterm_ends_the_drain_at_once(merged_server):
    """The last test of this module's server: DRAIN_SECONDS is 30, a request hangs in a stalled engine; the second
    SIGTERM ends it and the process within seconds."""
    import signal
    import threading
    import time

    engine = merged_server.engine()
    answers = []
    engine.send_signal(signal.SIGSTOP)
    try:
        hung = threading.Thread(target=lambda: answers.append(merged_server.request("/v1/chat/completions", CHAT, KEY)))
        hung.start()
        time.sleep(1)
        before = scraped(merged_server)
        merged_server.proc.send_signal(signal.SIGTERM)
        time.sleep(2)
        assert merged_server.proc.poll() is None and not answers  # draining: the request still has 28 s
        # /metrics is served while the drain runs (Prometheus scrapes a draining pod); the /health polls that fail
        # readiness are not refusals.
        assert merged_server.request("/health")[0] == 503
        assert went_up(before, scraped(merged_server)) == {("tuneserve_gate_drains_total",): 1}
        second = time.monotonic()
        merged_server.proc.send_signal(signal.SIGTERM)
        hung.join(timeout=10)
    finally:
        engine.send_signal(signal.SIGCONT)
    status, answer = answers[0]
    assert status == 503 and answer["error"]["code"] == "draining", answer
    code = merged_server.proc.wait(timeout=30)
    assert code == 0 and time.monotonic() - second < 15
    assert "SIGTERM again: ending 1 open request(s) now" in merged_server.log.read_text()
    # Cancelled as the server went away: no scrape could see it, the files of PROMETHEUS_MULTIPROC_DIR keep it.
    after = counted_after_exit(merged_server.metrics_dir)
    assert went_up(before, after) == {("tuneserve_gate_drains_total",): 1, ("tuneserve_gate_drain_cancelled_total",): 1}


def open_stream(port: int, max_tokens: int):
    """A streamed chat request; returns (connection, response) once its first event arrived."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps({**CHAT, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}),
        {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    response = conn.getresponse()
    assert response.status == 200
    first = response.readline()
    assert first.startswith(b"data: {"), first
    return conn, response


def read_events(response) -> list[str]:
    """The stream's remaining data events, until the server closes it."""
    events = []
    while line := response.readline():
        if line.startswith(b"data: "):
            events.append(line[6:].strip().decode())
    return events


def uncooperative_clients(port: int) -> list:
    """Connections that would each hold up a shutdown that waits for clients: a body stopped half way, a stream
    nobody reads (its receive buffer as small as the kernel allows), an idle kept-alive connection, headers that
    never end. Returned open."""
    import socket

    def connect(rcvbuf: int | None = None):
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect(("127.0.0.1", port))
        return sock

    auth = f"Authorization: Bearer {KEY}\r\n".encode()
    half = connect()
    half.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 500\r\n\r\n" + b"{" * 10
    )
    unread = connect(rcvbuf=1024)
    body = json.dumps({**CHAT, "max_tokens": 900, "ignore_eos": True, "stream": True}).encode()
    unread.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    assert unread.recv(12) == b"HTTP/1.1 200"  # under way; from now on it is not read
    idle = connect()
    idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert idle.recv(4096).startswith(b"HTTP/1.1 200")
    headers = connect()
    headers.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    return [half, unread, idle, headers]


@pytest.mark.slow
def test_sigterm_drains_then_ends_every_open_stream_and_exits_cleanly(tmp_path, trained_output):
    import signal
    import threading
    import time

    need_vllm()
    drain = 4
    server = Server(
        {
            "MODEL_ID": str(trained_output / "merged"),
            "SERVED_MODEL_NAME": "qa-model",
            "API_KEY": KEY,
            "MAX_MODEL_LEN": "1024",
            "MAX_OUTPUT_TOKENS": "1000",
            "MAX_NUM_SEQS": "4",
            "DRAIN_SECONDS": str(drain),
            "LIVE_TIMEOUT": "2",
            "LIVE_CACHE_SECONDS": "1",
            "REQUEST_READ_TIMEOUT": "60",  # longer than the drain: only the drain may end these clients
        },
        tmp_path,
    )
    engine = None
    clients = []
    try:
        server.wait_ready()
        # The entrypoint exec'd the supervisor, whose child is vLLM's server.
        cmdline = Path(f"/proc/{server.proc.pid}/cmdline").read_bytes().split(b"\0")
        assert b"tuneserve.supervise" in cmdline
        engine = server.engine()
        # A backlog of legal work: every batch slot (MAX_NUM_SEQS=4) busy with long non-streamed answers, two waves
        # of them, so the probe's own request waits in the queue far past LIVE_TIMEOUT. /live keeps answering 200:
        # the engine steps.
        backlog: list = []
        long_answer = {**CHAT, "max_tokens": 990, "ignore_eos": True}
        workers = [
            threading.Thread(target=lambda: backlog.append(server.request("/v1/chat/completions", long_answer, KEY)))
            for _ in range(8)
        ]
        began = time.monotonic()
        for t in workers:
            t.start()
        lives = []
        while any(t.is_alive() for t in workers):
            lives.append(server.request("/live"))
            time.sleep(0.3)
        took = time.monotonic() - began
        assert [r[1]["usage"]["completion_tokens"] for r in backlog] == [990] * 8, backlog
        assert took > 2 + 1 + 1, took  # longer than LIVE_TIMEOUT + LIVE_CACHE_SECONDS: a probe had to wait
        assert [status for status, _ in lives] == [200] * len(lives), lives
        assert {answer["check"] for _, answer in lives} <= {"progress", "cached", "generated"}

        # The clients first (the unread stream takes a batch slot), then the streams; SIGTERM follows at once.
        clients = uncooperative_clients(server.port)
        streams = {name: open_stream(server.port, n) for name, n in (("long1", 900), ("long2", 900), ("short", 20))}
        ended: dict[str, tuple[float, list[str]]] = {}

        def follow(name):
            events = read_events(streams[name][1])
            ended[name] = (time.monotonic(), events)

        readers = [threading.Thread(target=follow, args=(name,)) for name in streams]
        for t in readers:
            t.start()
        before = scraped(server)
        sigterm = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        # Readiness fails at once and new requests are turned away while the drain runs.
        deadline = time.monotonic() + 2
        while server.request("/health")[0] != 503:
            assert time.monotonic() < deadline, "/health still 200 after SIGTERM"
            time.sleep(0.05)
        status, answer = server.request("/v1/chat/completions", CHAT, key=KEY)
        assert status == 503 and answer["error"]["code"] == "draining", answer
        assert server.request("/live")[0] == 200  # liveness does not restart a draining pod
        # One server process, no PROMETHEUS_MULTIPROC_DIR: the gate's counters in the default registry, on /metrics
        # while the drain runs. The cancellations come at its end, as the server goes away (the module's server
        # reads them after it ended).
        assert went_up(before, scraped(server)) == {
            ("tuneserve_gate_drains_total",): 1,
            (REFUSED, "param=", "reason=draining"): 1,
            ("tuneserve_gate_live_total", "result=pass"): 1,
        }
        # The short request in flight finishes normally; then the engine stalls, so the long ones cannot.
        readers[2].join(timeout=30)
        engine.send_signal(signal.SIGSTOP)
        at, events = ended["short"]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        for t in readers[:2]:
            t.join(timeout=drain + 20)
        for name in ("long1", "long2"):
            at, events = ended[name]
            error = json.loads(events[-1])["error"]
            assert error["code"] == "draining" and f"DRAIN_SECONDS={drain}" in error["message"], events[-3:]
            assert "[DONE]" not in events
            assert drain - 0.5 <= at - sigterm <= drain + 5, at - sigterm  # ended when the budget ran out
        engine.send_signal(signal.SIGCONT)
        code = server.proc.wait(timeout=30)
        took = time.monotonic() - sigterm
    finally:
        if engine is not None and engine.is_running():
            engine.send_signal(signal.SIGCONT)
        server.stop()
        for sock in clients:
            sock.close()
    assert code == 0, server.log.read_text()[-3000:]
    # The uncooperative clients held nothing up: ended by the server itself (code 0), within the stated margin.
    assert took < drain + 10, took
    log = server.log.read_text()
    # Open at the signal: the unread stream and the two long ones, and the short one unless a fast engine already
    # finished its 20 tokens when the server took the signal. The three left were ended by the drain.
    assert re.search(r"SIGTERM: draining [34] request\(s\)", log), log[-4000:]
    assert "drain: 3 request(s) still open after" in log, log[-4000:]
    assert "did not exit in time" not in log
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-4000:]


def alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
def test_sigterm_at_any_point_of_start_up_ends_everything_promptly_with_143(tmp_path, trained_output):
    """Points of start-up found from what the server does, not from timings: the entrypoint checking its
    configuration, the engine process starting, the weights loaded (compilation and warm-up under way)."""
    import signal
    import time

    import psutil

    need_vllm()

    def entrypoint(server):
        return time.monotonic() - server.began > 0.3

    def engine_started(server):
        for p in descendants(server.proc.pid):
            try:
                if "EngineCore" in " ".join(p.cmdline()):
                    return True
            except psutil.Error:  # gone, or a zombie, since it was listed
                continue
        return False

    def weights_loaded(server):
        return "Loading weights took" in server.log.read_text()

    def importing_vllm(server):
        return time.monotonic() - server.began > 6  # past the exec: the supervisor's child loads vLLM

    points = (entrypoint, importing_vllm, engine_started, weights_loaded)
    servers = {}
    try:  # all at once, each stopped at its own point
        for point in points:
            servers[point] = Server(
                {"MODEL_ID": str(trained_output / "merged"), "API_KEY": KEY, "MAX_MODEL_LEN": "128"}, tmp_path
            )
            servers[point].began = time.monotonic()
        signalled, results = {}, {}
        while len(results) < len(points):
            for point, server in servers.items():
                if point in results:
                    continue
                if point in signalled:  # waiting for it to end, without holding up the others' points
                    sent, before = signalled[point]
                    if server.proc.poll() is not None:
                        results[point] = (server.proc.returncode, time.monotonic() - sent, before)
                    assert time.monotonic() - sent < 30, f"{point.__name__}: still running 30 s after SIGTERM"
                    continue
                assert server.proc.poll() is None, (point.__name__, server.log.read_text()[-3000:])
                assert time.monotonic() - server.began < 300, f"{point.__name__} never came"
                if point(server):
                    signalled[point] = (time.monotonic(), descendants(server.proc.pid))
                    server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.05)
    finally:
        for server in servers.values():
            server.stop()
    for point, (code, took, before) in results.items():
        assert code in (143, -signal.SIGTERM), (point.__name__, code, servers[point].log.read_text()[-3000:])
        assert took < 10, (point.__name__, took)
        assert not [p for p in before if alive(p)], point.__name__


@pytest.mark.slow
def test_adapter_mode_answers_like_the_merged_model(tmp_path, trained_output, chatml_base):
    import openai

    need_vllm()
    server = Server(
        {
            "MODEL_ID": str(chatml_base),
            "LORA_ADAPTERS": f"qa={trained_output / 'adapter'}",
            "MAX_MODEL_LEN": "128",
            "ALLOW_UNAUTHENTICATED": "true",
            "TMPDIR": str(tmp_path / "tmp"),
        },
        tmp_path,
    )
    (tmp_path / "tmp").mkdir()
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        assert ask(client, "qa") == [(a, "stop") for _, a in QA]
        # The base's generation_config lacks the end-of-turn stop: served from a repaired copy in a scratch folder
        assert list((tmp_path / "tmp").glob("tuneserve-generation-config-*"))
    finally:
        server.stop()
    assert "(no API key: ALLOW_UNAUTHENTICATED)" in server.log.read_text()
    assert not list((tmp_path / "tmp").glob("tuneserve-generation-config-*"))  # removed when the server ended


def test_vllm_flag_table_matches_the_installed_vllm():
    need_vllm()
    probe = (
        "import json, sys\nfrom tuneserve import vllm_flags\n"
        "sys.exit(0 if vllm_flags.generate() == vllm_flags.load() else 1)\n"
    )
    res = subprocess.run(
        [str(SERVE_PYTHON), "-c", probe], env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, "run `make lock` to regenerate tuneserve/vllm_flags.json\n" + res.stderr[-2000:]
