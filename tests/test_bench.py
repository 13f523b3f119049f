"""Benchmarks (docs/benchmarks.md): the smoke variant of every benchmark runs end to end (tiny sizes), writes a result
file of the expected structure with sane values, and the report is generated from those files alone.
Timings are never asserted: the benchmarks are not timed tests. Marked slow: it trains and starts vLLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import serve as serve_bench
from tests.helpers import REPO, SERVE_PYTHON, clean_env, need_vllm

pytestmark = pytest.mark.slow

ORDER = ("merge", "data", "train", "serve", "gate", "startup", "images", "memory")  # the report's numbering
# What `make setup` alone can run. The images benchmark measures the images `make test-images` builds: its
# smoke test lives in that lane (tests/test_images.py), so `make test` needs neither podman nor images. The memory
# benchmark's code runs in tests/test_bigmodel.py, at its full size.
SMOKE = ("merge", "data", "train", "serve", "gate")


# The GPU machine's layout, emulated here: its python3 is a virtual environment holding torch, transformers, peft
# and accelerate (and numpy, pyarrow, ...) but not trl, bitsandbytes, datasets or python-dotenv, and it has no make.
NOT_ON_THE_MACHINE = ("trl", "bitsandbytes", "datasets", "python-dotenv", "tuneserve")


def emulated_gpu_machine(root: Path) -> tuple[Path, Path]:
    """(python3, a PATH folder): a venv made from .venv-train's python whose site-packages links every entry of
    .venv-train's but those of NOT_ON_THE_MACHINE (this project's editable install included), and a folder with
    every command on this PATH but make and the Pythons."""
    import shutil
    import sysconfig
    from importlib.metadata import distribution

    venv = root / "opt-torch-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python3"
    theirs = Path(sysconfig.get_paths()["purelib"])
    ours = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    left_out = {f.parts[0] for name in NOT_ON_THE_MACHINE for f in distribution(name).files or []}
    for entry in theirs.iterdir():
        if entry.name not in left_out and entry.name != "__pycache__":
            (ours / entry.name).symlink_to(entry)
    path = root / "bin"
    path.mkdir()
    for folder in os.environ["PATH"].split(os.pathsep):
        for tool in Path(folder).glob("*") if Path(folder).is_dir() else ():
            name = tool.name
            if name in ("make", "gmake") or name.startswith(("python", "pip")) or (path / name).exists():
                continue
            if os.access(tool, os.X_OK) and not tool.is_dir():
                (path / name).symlink_to(tool)
    assert shutil.which("make", path=f"{venv / 'bin'}{os.pathsep}{path}") is None
    return python, path


@pytest.fixture(scope="module")
def gpu_check_smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """The GPU check's one command (benchmarks/gpu-check.sh, as docs/development.md gives it) on tiny sizes and the
    CPU, on the emulated GPU machine, with the carried wheels repacked from .venv-train (offline): (its exit, its
    OUT folder). Its bench stage is the train benchmark's --smoke run, which `smoke` reads instead of running it a
    second time."""
    root = tmp_path_factory.mktemp("gpu-machine")
    python, path = emulated_gpu_machine(root)
    probe = "import sys, torch, transformers, peft, accelerate; print(sys.prefix != sys.base_prefix)"
    assert subprocess.run([str(python), "-c", probe], capture_output=True, text=True).stdout.strip() == "True"
    assert subprocess.run([str(python), "-c", "import trl"], capture_output=True).returncode != 0
    wheels = root / "gpu-wheels"
    subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "wheels", "--from-installed", "--out", str(wheels)],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    out = root / "out"
    env = clean_env(
        PATH=f"{python.parent}{os.pathsep}{path}", GPU_WHEELS=str(wheels), GPU_CHECK_TMP=str(root / "tmp"), OUT=str(out)
    )
    res = subprocess.run(
        ["bash", "benchmarks/gpu-check.sh", "--smoke"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=3900,  # the smoke's budget is 3600 s
    )
    return res, out


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, gpu_check_smoke) -> Path:
    """Every benchmark's --smoke run into one results folder; a failing one fails the test that reads it. The train
    benchmark's is the GPU check's bench stage (the same command: benchmarks.train --smoke, in its own process)."""
    root = tmp_path_factory.mktemp("bench")
    results = root / "results"
    results.mkdir()
    train = gpu_check_smoke[1] / "train.json"
    if train.is_file():  # else the tests reading it fail, naming it
        (results / "train.json").write_bytes(train.read_bytes())
    for name in SMOKE:
        if name == "train" or (name in ("serve", "gate") and not SERVE_PYTHON.is_file()):
            continue
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                f"benchmarks.{name}",
                "--smoke",
                "--results-dir",
                str(results),
                "--work-dir",
                str(root / "work" / name),
            ],
            env=clean_env(),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=900,
        )
        (root / f"{name}.log").write_text(res.stdout + res.stderr)
        assert res.returncode == 0, f"benchmarks.{name} --smoke exited {res.returncode}:\n{res.stderr[-4000:]}"
    return results


def result(results: Path, name: str) -> dict:
    path = results / f"{name}.json"
    assert path.is_file(), f"{name}.json was not written"
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", SMOKE)
def test_smoke_result_has_the_documented_structure(smoke, name):
    if name in ("serve", "gate") and not SERVE_PYTHON.is_file():
        pytest.skip(".venv-serve is missing (make setup)")
    assert_documented_structure(result(smoke, name), name)


def assert_documented_structure(r: dict, name: str) -> None:
    assert r["name"] == name and r["smoke"] is True
    assert r["command"] == f".venv-train/bin/python -m benchmarks.{name} --smoke"
    assert r["machine"]["cores"] >= 1 and r["machine"]["memory_gib"] > 0 and r["machine"]["packages"]["torch"]
    assert r["rows"] and r["figures"]
    for f in r["figures"]:
        assert set(f) >= {"key", "label", "value", "unit", "target", "met"}
        if f["target"] is None:
            assert f["met"] is None
        elif f["value"] is None:  # a targeted figure not measured here says why
            assert f["met"] is None and f["note"].startswith("not run")
        else:
            assert isinstance(f["met"], bool)
    targeted = [f["met"] for f in r["figures"] if f["met"] is not None]
    assert r["met"] == (all(targeted) if targeted else None)
    for n in r["not_run"]:
        assert n["what"] and n["reason"]


def figures(r: dict) -> dict:
    return {f["key"]: f["value"] for f in r["figures"]}


def test_merge_smoke_outputs_match_peft_and_memory_is_measured(smoke):
    r = result(smoke, "merge")
    f = figures(r)
    assert f["max_weight_ulps"] <= 1 and f["max_abs_logit_diff"] < 1e-2
    assert r["setup"]["shards"] > 1 and r["setup"]["comparison"]["tensors_changed_vs_base"] > 0
    for row in r["rows"]:
        assert 0 < row["baseline_rss_gib"] <= row["peak_rss_gib"] and row["seconds"] > 0


def test_data_smoke_counts_every_position(smoke):
    r = result(smoke, "data")
    rows = {row["key"]: row for row in r["rows"]}
    assert set(rows) == {"ours", "ours-packing", "ours-padded", "guide", "trl-defaults"}
    for row in rows.values():
        assert row["rows_in"] == r["setup"]["rows"] and row["samples_per_second"] > 0
        assert 0 < row["real_tokens"] <= row["positions"] and 0 < row["real_fraction"] <= 1
        assert 0 < row["loss_tokens"] <= row["real_tokens"]
    # Ours never packs rows into new sequences: one sequence per row, several rows a micro-batch. PACKING=true
    # flattens them (nothing padded); the default pads them on the CPU, as PACKING=false does. The guide packs.
    for key in ("ours", "ours-packing", "ours-padded"):
        assert not rows[key]["packing"] and rows[key]["sequences"] == rows[key]["rows_in"]
        assert rows[key]["batch_size"] > 1 and rows[key]["loss_tokens"] == rows["ours"]["loss_tokens"]
    assert rows["ours-packing"]["padding_free"] and rows["ours-packing"]["real_fraction"] == 1
    assert not rows["ours"]["padding_free"] and rows["ours"]["real_fraction"] == rows["ours-padded"]["real_fraction"]
    assert rows["guide"]["packing"] and rows["guide"]["sequences"] < rows["guide"]["rows_in"]
    assert 0 < rows["guide"]["pack_fill"] <= 1
    # Ours trains on the answer only, the guide (TRL's default) on every token.
    assert rows["ours"]["loss_tokens"] < rows["guide"]["loss_tokens"]


@pytest.mark.parametrize(
    "gpu, peak",
    [
        ("NVIDIA H200", 989e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA RTX PRO 6000 Blackwell", None),
        (None, None),
    ],
)
def test_mfu_takes_the_peak_of_the_exact_gpu_and_none_for_an_unknown_one(gpu, peak):
    from benchmarks.train import mfu

    r = {"device": "cuda", "gradient_checkpointing": False, "matmul_parameters": 10**9, "tokens_per_second": 10**4}
    assert mfu(r, gpu) == (None if peak is None else round(4e13 / peak, 4))


def test_mfu_counts_each_matmul_once_from_its_shape(chatml_base):
    """A 4-bit layer stores half a byte per weight and PEFT's wrappers expose their base layer's weight: N must
    be in x out of each linear layer the base computes with, whatever wraps it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from benchmarks.train import matmul_parameters

    plain = AutoModelForCausalLM.from_pretrained(chatml_base)
    expected = sum(m.weight.shape.numel() for m in plain.modules() if isinstance(m, torch.nn.Linear))
    quantized = AutoModelForCausalLM.from_pretrained(
        chatml_base,
        device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    )
    assert matmul_parameters(quantized) == matmul_parameters(plain) == expected
    peft = get_peft_model(quantized, LoraConfig(r=4, target_modules="all-linear", modules_to_save=["lm_head"]))
    assert matmul_parameters(peft) == expected


def test_train_smoke_measures_both_sides_and_marks_gpu_rows(smoke):
    r = result(smoke, "train")
    rows = {row["key"]: row for row in r["rows"]}
    epoch_sides = {"ours", "ours-packing", "ours-padded", "guide"}
    assert set(rows) == {"ours", "guide"} | {f"small:{side}" for side in epoch_sides}
    for row in rows.values():
        assert row["tokens_per_second"] > 0 and row["tokens"] > 0 and row["peak_rss_gib"] > 0
    # Epoch for epoch: every side trained the same whole epoch; ours takes the same steps however it lays out a
    # micro-batch (PACKING=true flattens, the default pads on the CPU), the guide fewer (it packs rows into bins).
    epochs = {side: rows[f"small:{side}"] for side in epoch_sides}
    assert {row["epochs"] for row in epochs.values()} == {1.0}
    assert epochs["ours"]["optimizer_steps"] == epochs["ours-packing"]["optimizer_steps"]
    assert epochs["ours"]["optimizer_steps"] == epochs["ours-padded"]["optimizer_steps"]
    assert epochs["guide"]["optimizer_steps"] < epochs["ours"]["optimizer_steps"]
    assert epochs["ours-packing"]["padding_free"] and not epochs["ours"]["padding_free"]
    figures = {f["key"]: f for f in r["figures"]}
    assert figures["small_steps_vs_padded"]["value"] == 1.0 and figures["small_eval_loss_vs_padded"]["met"]
    # The guide trains lm_head and embed_tokens in full; ours trains the LoRA weights only.
    assert rows["guide"]["trainable_parameters"] > rows["ours"]["trainable_parameters"]
    if r["machine"]["gpu"] is None:
        assert any(n["reason"] == "no GPU" for n in r["not_run"])
        gpu = {f["key"]: f for f in r["figures"]}["gpu_tokens_ratio"]
        assert gpu["value"] is None and gpu["target"] == ">= 1.5"


def test_serve_smoke_runs_the_load_generator_without_failures(smoke):
    need_vllm()
    r = result(smoke, "serve")
    assert figures(r)["failed_requests"] == 0 and figures(r)["ours_startup_s"] > 0
    for row in r["rows"]:
        assert row["completed"] == row["prompts"] and row["output_throughput"] > 0
        assert 0 < row["p50_ttft_ms"] <= row["p99_ttft_ms"]
    # Direct was read from ours' running vLLM process, and the two differed in the gate only.
    assert figures(r)["command_differences"] == 0
    assert r["setup"]["command_check"] == [
        "ours' vLLM process and direct differ in: " + "; ".join(serve_bench.gate_differences())
    ]
    ours, direct = r["setup"]["commands"]["ours"], r["setup"]["commands"]["direct"]
    assert "--middleware tuneserve.gate.Gate" in ours["argv"] and "--middleware" not in direct["argv"]
    assert ours["env"]["VLLM_API_KEY"] == direct["env"]["VLLM_API_KEY"] == "<redacted>"
    for f in r["figures"]:
        if f["key"].startswith("throughput_ratio_c"):
            assert f["value"] > 0 and "rounds" in f["note"] and "spread" in f["note"]


def test_gate_smoke_reports_its_cost_per_request_and_per_chunk(smoke):
    need_vllm()
    r = result(smoke, "gate")
    assert figures(r)["per_request_us"] is not None and figures(r)["per_chunk_us"] is not None
    assert [row["chunks"] for row in r["rows"]] == sorted(row["chunks"] for row in r["rows"])
    for row in r["rows"]:
        assert row["direct_us"] > 0 and row["gate_us"] > 0 and len(row["gate_rounds_us"]) == r["setup"]["rounds"]


@pytest.mark.parametrize(
    "argv_edit, env_edit, expected",
    [
        (None, None, []),
        (lambda a: a + ["--max-num-seqs", "8"], None, ["argv only in direct: --max-num-seqs 8"]),
        (
            lambda a: [
                x.replace("vllm.entrypoints.launchers.api_server.entry", "vllm.entrypoints.openai.api_server")
                for x in a
            ],
            None,
            [
                "argv only in ours: vllm.entrypoints.launchers.api_server.entry",
                "argv only in direct: vllm.entrypoints.openai.api_server",
            ],
        ),
        (None, lambda e: {**e, "VLLM_USE_AOT_COMPILE": "1"}, ["env: VLLM_USE_AOT_COMPILE"]),
        (None, lambda e: {k: v for k, v in e.items() if k != "OMP_NUM_THREADS"}, ["env: OMP_NUM_THREADS"]),
        (None, lambda e: {**e, "VLLM_API_KEY": "another-key-entirely"}, ["env: VLLM_API_KEY"]),
    ],
)
def test_direct_is_ours_less_the_gate_and_any_other_difference_is_named(argv_edit, env_edit, expected):
    ours = (
        [
            "/v/bin/python",
            "-m",
            "vllm.entrypoints.launchers.api_server.entry",
            "--model",
            "/m",
            "--port",
            "8000",
            "--middleware",
            "tuneserve.gate.Gate",
        ],
        {
            "PORT": "8000",
            "VLLM_API_KEY": "k" * 20,
            "OMP_NUM_THREADS": "2",
            "TUNESERVE_GATE": "{}",
            "TUNESERVE_READY_FD": "5",
            "VLLM_USE_AOT_COMPILE": "0",
        },
    )
    argv, env = serve_bench.without_gate(*ours, 9001)
    assert "--middleware" not in argv and argv[argv.index("--port") + 1] == "9001" and env["PORT"] == "9001"
    assert not set(env) & serve_bench.GATE_ENV_NAMES
    argv, env = (argv_edit or (lambda a: a))(argv), (env_edit or (lambda e: e))(env)
    found = serve_bench.differences(ours, (argv, env))
    assert sorted(found) == sorted(serve_bench.gate_differences() + expected), found
    assert "k" * 20 not in " ".join(found) and "another-key" not in " ".join(found)  # names, never values


def test_report_is_generated_from_the_result_files(smoke, tmp_path):
    out = tmp_path / "benchmarks.md"
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.report", "--results-dir", str(smoke), "--out", str(out)],
        env=clean_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    text = out.read_text()
    for name in ORDER:
        r = json.loads((smoke / f"{name}.json").read_text()) if (smoke / f"{name}.json").is_file() else None
        if r is None:
            assert f"| {ORDER.index(name) + 1}. {name} | not run yet" in text
            continue
        assert f"`{r['command']}`" in text and r["title"] in text
        for f in r["figures"]:
            if f["target"]:
                assert f["target"] in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "benchmarks" / "merge.png").is_file()


def test_gpu_check_smoke_runs_every_stage_in_its_own_process_and_reports_each(gpu_check_smoke):
    """The GPU check's one command on the emulated GPU machine (a venv python3 with the ML stack, no trl or
    bitsandbytes, no make), on tiny sizes and the CPU: the plumbing a GPU run depends on never rots."""
    res, out = gpu_check_smoke
    assert (out / "gpu.json").is_file(), res.stderr[-4000:]
    report = json.loads((out / "gpu.json").read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    assert res.returncode == 0, json.dumps(report, indent=1)[-4000:] + (out / "gpu-logs.txt").read_text()[-4000:]
    assert "wheels and tuneserve installed into" in res.stderr
    # What comes back from the machine: the report, the logs, the benchmark's figures; the work stayed in /tmp.
    assert sorted(p.name for p in out.iterdir()) == ["gpu-logs.txt", "gpu.json", "train.json"]
    assert report["python"].endswith("opt-torch-venv/bin/python3")
    assert list(stages) == ["env", "kernels", "train", "train-1b", "bench"] and report["smoke"] is True
    assert all(stages[s]["status"] == "passed" for s in ("env", "kernels", "train", "bench"))
    env, kernels, train = (stages[s]["result"] for s in ("env", "kernels", "train"))
    # The carried pins are the ones imported: only torch's own and the machine's large binaries may differ.
    assert env["versions"]["trl"] and env["pins"]["unexpected"] == []
    assert env["bnb_nf4_round_trip"]["relative_error"] < 0.15
    assert kernels["fused_lm_head"]["log_probs"] < 0.05 and kernels["packing_sdpa"]["largest_difference"] < 1e-2
    assert kernels["nf4_replay_cpu_vs_device"]["differing"] == 0  # the CPU against itself
    assert train["verify_passed"] is True and train["last_loss"] < train["first_loss"] - 1.0
    assert train["quantized_on"] == "cpu"
    assert set(stages["bench"]["result"]["figures"]) >= {"eval_loss_ratio", "cpu_tokens_ratio"}
    assert report["seconds"] <= report["budget_s"]
    if report["machine"]["gpu"] is None:
        assert stages["train-1b"]["status"] == "not run" and stages["train-1b"]["why"] == "needs a GPU"


def test_a_stage_that_fails_or_hangs_is_reported_and_one_that_cannot_finish_is_skipped(tmp_path, monkeypatch):
    from benchmarks import gpu_check

    stages = (("env", 0.01, 0, False), ("nonexistent", 60, 1, False), ("kernels", 60, 100, False))
    monkeypatch.setattr(gpu_check, "STAGES", stages)
    assert gpu_check.run(tmp_path / "out", smoke=True, budget=120, work_root=tmp_path / "work") == 1
    report = json.loads((tmp_path / "out" / "gpu.json").read_text())
    env, missing, kernels = report["stages"]
    # the smoke stretches every deadline by SMOKE_SLACK, and the report names the deadline it applied
    applied = 0.01 * gpu_check.SMOKE_SLACK
    assert env["deadline_s"] == applied
    assert env["status"] == "failed" and f"did not finish within {applied} s" in env["error"]
    assert missing["status"] == "failed" and "invalid choice: 'nonexistent'" in missing["error"]
    assert kernels["status"] == "skipped" and kernels["why"].startswith(
        f"needs at least {100 * gpu_check.SMOKE_SLACK} s"
    )
    assert "===== nonexistent: failed" in (tmp_path / "out" / "gpu-logs.txt").read_text()


def test_a_stage_past_its_deadline_is_killed_with_every_process_it_started(tmp_path):
    from benchmarks.gpu_check import _kill_group

    pid_file = tmp_path / "grandchild"
    leader = subprocess.Popen(["bash", "-c", f"sleep 300 & echo $! > {pid_file}; wait"], start_new_session=True)
    for _ in range(100):
        if pid_file.is_file() and pid_file.read_text().strip():
            break
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    _kill_group(leader)
    assert leader.poll() is not None
    with pytest.raises(ProcessLookupError):
        for _ in range(50):  # reaped by init once killed
            os.kill(grandchild, 0)
            time.sleep(0.1)


def test_the_carried_wheels_are_the_pinned_stack_but_torch_and_fit_the_carry_limit():
    """Only torch and what torch pins (triton, nvidia-*) differ from the image, less a few large binaries the machine
    has; the build backend travels too."""
    from benchmarks.gpu_check import MACHINE_KEEPS, carried

    names = carried()
    assert {"transformers", "peft", "accelerate", "huggingface-hub", "tokenizers", "safetensors"} <= set(names)
    assert {"trl", "bitsandbytes", "datasets", "python-dotenv", "setuptools"} <= set(names)
    assert not {"torch", "triton", *MACHINE_KEEPS} & set(names)
    assert not [n for n in names if n.startswith("nvidia-")]


def test_the_bitsandbytes_wheel_is_trimmed_to_the_cpu_and_cuda_13_libraries(tmp_path):
    import zipfile

    from benchmarks.gpu_check import trim_bitsandbytes

    libs = ["cpu", "cuda118", "cuda128", "cuda130", "cuda132", "rocm64"]
    names = [f"bitsandbytes/libbitsandbytes_{lib}.so" for lib in libs] + ["bitsandbytes/__init__.py"]
    record = "bitsandbytes-0.50.2.dist-info/RECORD"
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for n in names:
            z.writestr(n, b"x" * 1000)
        z.writestr(record, "".join(f"{n},sha256=abc,1000\n" for n in names) + f"{record},,\n")
    trim_bitsandbytes(wheel)
    with zipfile.ZipFile(wheel) as z:
        kept = sorted(z.namelist())
        lines = z.read(record).decode().splitlines()
    expected = sorted(
        ["bitsandbytes/__init__.py", record]
        + [f"bitsandbytes/libbitsandbytes_{lib}.so" for lib in ("cpu", "cuda130", "cuda132")]
    )
    assert kept == expected and sorted(line.split(",")[0] for line in lines) == expected


def test_the_gates_share_of_a_profile_counts_its_own_work_on_the_event_loop_not_the_app_it_calls(tmp_path):
    loop = "main (vllm/x.py:1);Runner.run (asyncio/runners.py:118)"
    gate = f"{loop};Gate._gated (tuneserve/gate.py:260)"
    lines = {
        # The gate's own: its frames innermost, or calling the standard library and pydantic.
        f"{gate};Gate._checked_body (tuneserve/gate.py:350)": 5,
        f"{gate};parse_body (tuneserve/gate.py:101);loads (json/__init__.py:346)": 3,
        f"{gate};_count (tuneserve/gate.py:95);TypeAdapter.validate_python (pydantic/type_adapter.py:421)": 2,
        # The app's and the server's, reached through the gate: not the gate's.
        f"{gate};Gate._run (tuneserve/gate.py:440);CORSMiddleware.__call__ (starlette/middleware/cors.py:77)": 40,
        f"{gate};tracked_send (tuneserve/gate.py:437);RequestResponseCycle.send (uvicorn/protocols/http/h.py:544)": 30,
        f"{gate};x (tuneserve/gate.py:1);serve (vllm/entrypoints/x.py:1);loads (json/__init__.py:346)": 7,
        # The loop's own work outside the gate, and the loop waiting in its poll (not busy).
        f"{loop};process_outputs (vllm/v1/engine/output_processor.py:400)": 13,
        loop: 50,
        # Another thread (vLLM's tokenizer pool): not the loop's.
        "_bootstrap (threading.py:1002);_worker (concurrent/futures/thread.py:81);encode (tokenizers/x.py:1)": 25,
    }
    path = tmp_path / "ours.txt"
    path.write_text("".join(f"{stack} {count}\n" for stack, count in lines.items()) + "\n")
    share = serve_bench.gate_share(path)
    assert (share["samples"], share["loop_samples"], share["loop_busy"], share["gate_samples"]) == (175, 150, 100, 10)
    assert share["where"]["the gate's own work"] == 0.1 and share["where"]["uvicorn/protocols"] == 0.3
    assert share["where"]["vllm/v1"] == 0.13 and share["where"]["starlette/middleware"] == 0.4
    assert "concurrent/futures" not in share["where"] and "tokenizers" not in share["where"]


def test_the_cuda_and_driver_variables_and_pythonpath_reach_every_measured_child(monkeypatch):
    """On the GPU machine the carried wheels are on PYTHONPATH and CUDA's libraries may be found through
    LD_LIBRARY_PATH/CUDA_HOME; Triton builds with CC. A cleaned environment keeps them, and nothing else leaks."""
    from benchmarks import common

    passed = {
        "LD_LIBRARY_PATH": "/usr/local/nvidia/lib64",
        "CUDA_HOME": "/usr/local/cuda",
        "CC": "/usr/bin/gcc",
        "TRITON_CACHE_DIR": "/tmp/triton",
        "NVIDIA_VISIBLE_DEVICES": "0",
        "NVIDIA_DRIVER_CAPABILITIES": "compute,utility",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "PYTHONPATH": "/tmp/tuneserve-gpu-check/site",
    }
    for k, v in passed.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("SOME_SECRET", "x")
    env = common.clean_env()
    assert {k: env.get(k) for k in passed} == passed and "SOME_SECRET" not in env
    assert common.dev_env()["PYTHONPATH"] == f"{REPO}{os.pathsep}/tmp/tuneserve-gpu-check/site"
