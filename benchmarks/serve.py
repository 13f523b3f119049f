"""Benchmark 4, serving: `python -m entrypoints.serve` against the same vLLM server less the gate, on the same
merged model; and that model in bfloat16 against its QUANTIZE=int8 copy.

    .venv-train/bin/python -m benchmarks.serve [--smoke]

The model is a small one (Qwen2 architecture, head_dim 64 as vLLM's CPU attention needs) merged by
`tuneserve.merge` from a random LoRA adapter. "Ours" is our entrypoint, configured by environment variables as a
user would. "Direct" is the vLLM server process ours runs (under its supervisor), started with that process's own
argv and environment, read from /proc, less the gate: the `--middleware` pair and the variables only the gate reads
(`without_gate`). Every start checks that the two processes differ in exactly that (`differences`), and the result
records both commands (secrets redacted). The int8 copy is made by `tuneserve.quantize` (compressed-tensors W8A8,
what vLLM's CPU build serves) and served by direct's command on the other folder: that pair differs in the weights.

Each start brings every server up (after one throwaway import of vLLM warms the page cache); startup is the time
from starting the process to the first 200 from GET /health (polled every 0.25 s), memory the resident memory of
its process tree once ready. Then the rounds: vLLM's own `vllm bench serve` (benchmarks/vllm_bench.py), random
prompts of INPUT_LEN tokens and exactly OUTPUT_LEN streamed output tokens (ignore_eos), at concurrency 1, 8 and
32, each level run against every server in turn, ABBA over the rounds. Servers waiting for their turn are idle
(their CPU use is measured). So the ratios compare the servers seconds apart under the same conditions, round by
round, instead of minutes apart.

Targets: throughput ratio (ours / direct, median of the rounds) at least 0.98 at every concurrency, at most 2 s of
added startup time, zero failed requests, no command difference beyond the gate. The int8 figures are reported
beside bfloat16 without a target: on a CPU without int8 dot-product instructions they measure that CPU.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common
from devtools.health import free_port, stop_server, wait_healthy
from tuneserve.gate import GATE_ENV, READY_FD_ENV
from tuneserve.serve import GATE_MIDDLEWARE

TITLE = "Serving: python -m entrypoints.serve vs vLLM started directly"
INPUT_LEN, OUTPUT_LEN = 128, 64
# Four ABBA rounds and 256 requests at concurrency 32: with two rounds of 128 the ratio of two identical
# servers moved between 0.90 and 1.14 from run to run on the 2-core machine.
FULL = {
    "starts": 2,
    "rounds": 10,
    "levels": {1: 16, 8: 64, 32: 256},
    "input_len": INPUT_LEN,
    "output_len": OUTPUT_LEN,
    "servers": ("ours", "direct", "control", "int8"),
    "profile": True,
}
# Smoke: ours and direct (the comparison and its argv/environment check), a short load.
SMOKE = {
    "starts": 1,
    "rounds": 1,
    "levels": {1: 2, 4: 4},
    "input_len": 32,
    "output_len": 8,
    "servers": ("ours", "direct"),
    "profile": False,
}
IDLE_SECONDS = 10  # how long the servers' idle CPU use is measured, once all are up
THROUGHPUT_TARGET, STARTUP_TARGET_S = 0.98, 2.0
READY_TIMEOUT_S = 600


# ------------------------------------------------------------------------------------------- the model
def prepare_model(work: Path) -> Path:
    merged = work / "merged"
    if not (merged / "merge_info.json").is_file() or not (work / "quantized" / "quantize_info.json").is_file():
        common.run_child("benchmarks.serve", {"kind": "model", "work": str(work)}, log=work / "logs" / "model.log")
    return merged


def _model(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from devtools import textsql
    from devtools.tiny import build_tiny_model, save_random_adapter
    from tuneserve.merge import merge
    from tuneserve.quantize import quantize

    work = Path(spec["work"])
    base = build_tiny_model(
        work / "base", textsql.corpus(), template="chatml", hidden_size=256, num_layers=4, vocab_size=1500
    )
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    adapter = work / "adapter"
    save_random_adapter(model, AutoTokenizer.from_pretrained(base), adapter, "<|im_end|>", r=16, lora_alpha=16)
    merge(str(base), None, adapter, work / "merged")
    quantize(work / "merged", work / "quantized", scheme="int8")
    return {}


# ------------------------------------------------------------------------------------------- servers
BENCH_KEY = "sk-bench-local-only"  # both servers require it; the load generator sends it (OPENAI_API_KEY)


def serve_settings(merged: Path, port: int) -> dict[str, str]:
    return {
        "MODEL_ID": str(merged),
        "SERVED_MODEL_NAME": "bench",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "MAX_MODEL_LEN": "512",
        "API_KEY": BENCH_KEY,
    }


GATE_ARGS = ("--middleware", GATE_MIDDLEWARE)
# What only the gate reads: its settings and the pipe on which it tells the supervisor it is ready.
GATE_ENV_NAMES = frozenset({GATE_ENV, READY_FD_ENV})
SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


def ours_argv(merged: Path, port: int) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of our entrypoint, configured as a user would (environment variables only)."""
    env = common.clean_env(
        VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), VLLM_NO_USAGE_STATS="1"
    )
    return [str(common.SERVE_PYTHON), "-m", "entrypoints.serve"], {**env, **serve_settings(merged, port)}


def process_command(pid: int) -> tuple[list[str], dict[str, str]]:
    """The argv and environment a running process was started with (/proc)."""
    argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]]
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    env = dict(item.decode().split("=", 1) for item in raw if b"=" in item)
    return argv, env


def without_gate(argv: list[str], env: dict[str, str], port: int) -> tuple[list[str], dict[str, str]]:
    """The vLLM server our entrypoint runs, as it runs it, less the gate: its --middleware pair and what only the
    gate reads. vLLM then checks the key itself (VLLM_API_KEY) and applies no limit and no drain. `port` replaces
    the port (in the argv and in PORT), so that several servers can be up at once."""
    at = next(i for i in range(len(argv) - 1) if tuple(argv[i : i + 2]) == GATE_ARGS)
    argv = argv[:at] + argv[at + 2 :]
    argv[argv.index("--port") + 1] = str(port)
    env = {k: v for k, v in env.items() if k not in GATE_ENV_NAMES}
    if "PORT" in env:
        env["PORT"] = str(port)
    return argv, env


def differences(
    a: tuple[list[str], dict[str, str]],
    b: tuple[list[str], dict[str, str]],
    names: tuple[str, str] = ("ours", "direct"),
) -> list[str]:
    """How two (argv, environment) pairs differ, ports aside: the argv items only one has (in order) and the
    variables whose values differ or that only one has. Values are not shown (the key is among them)."""
    import difflib

    def unported(argv: list[str]) -> list[str]:
        argv = list(argv)
        if "--port" in argv:
            argv[argv.index("--port") + 1] = "<port>"
        return argv

    (argv_a, env_a), (argv_b, env_b) = a, b
    found = []
    matcher = difflib.SequenceMatcher(a=unported(argv_a), b=unported(argv_b), autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op != "equal" and i2 > i1:
            found.append(f"argv only in {names[0]}: {' '.join(argv_a[i1:i2])}")
        if op != "equal" and j2 > j1:
            found.append(f"argv only in {names[1]}: {' '.join(argv_b[j1:j2])}")
    for name in sorted(set(env_a) | set(env_b)):
        if name != "PORT" and env_a.get(name) != env_b.get(name):
            found.append(f"env: {name}")
    return found


def gate_differences() -> list[str]:
    """`differences(ours, without_gate(ours))`: what the comparison may differ by, and nothing else."""
    return [f"argv only in ours: {' '.join(GATE_ARGS)}", *(f"env: {name}" for name in sorted(GATE_ENV_NAMES))]


def redacted(env: dict[str, str]) -> dict[str, str]:
    return {k: "<redacted>" if any(m in k.upper() for m in SECRET_MARKERS) else v for k, v in sorted(env.items())}


class Server:
    """One server. `ours` is our entrypoint; any other kind runs the `argv`/`env` given."""

    def __init__(
        self,
        kind: str,
        merged: Path,
        log: Path,
        extra_env: dict[str, str] | None = None,
        command: tuple[list[str], dict[str, str]] | None = None,
        port: int | None = None,
    ):
        self.kind, self.port = kind, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv, env = command if command is not None else ours_argv(merged, self.port)
        env = {**env, **(extra_env or {})}
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.start = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv,
            env=env,
            cwd=merged.parent,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self) -> float:
        """Seconds from the server's start to its first healthy answer."""

        def check_alive():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited {self.proc.returncode}; log: {self.log}")

        try:
            wait_healthy(self.url, check_alive, READY_TIMEOUT_S - (time.monotonic() - self.start), interval=0.25)
        except TimeoutError:
            raise RuntimeError(f"{self.kind} server not ready after {READY_TIMEOUT_S}s; log: {self.log}") from None
        return time.monotonic() - self.start

    def _tree(self) -> list:
        import psutil

        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def vllm_pid(self) -> int:
        """The vLLM API server's process: this process, or the one our supervisor runs."""
        for p in self._tree():
            argv = p.cmdline()
            if len(argv) > 2 and argv[1] == "-m" and argv[2].startswith("vllm.entrypoints."):
                return p.pid
        raise RuntimeError(f"{self.kind}: no vLLM server process among {[p.cmdline()[:3] for p in self._tree()]}")

    def vllm_command(self) -> tuple[list[str], dict[str, str]]:
        """The argv and environment the vLLM API server process was started with."""
        return process_command(self.vllm_pid())

    def memory_mb(self) -> float:
        """Resident memory of the server and every process it started (vLLM's engine core), in MB."""
        import psutil

        total = 0
        for p in self._tree():
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return round(total / 1e6, 1)

    def cpu_seconds(self) -> float:
        """CPU time used so far by the server and every process it started."""
        import psutil

        total = 0.0
        for p in self._tree():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self) -> None:
        stop_server(self.proc)
        try:  # vLLM's engine process, if it outlived the server (its own process group, started here)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def load(servers: list[Server], merged: Path, plan: dict, out: Path) -> dict[str, dict[int, dict]]:
    """vllm bench serve at every concurrency level of the plan, one process (benchmarks/vllm_bench.py); at each
    level the servers take turns in the order given, so that what changes on the machine over time reaches all."""
    levels = ",".join(f"{c}:{n}" for c, n in plan["levels"].items())
    argv = [
        str(common.SERVE_PYTHON),
        "-m",
        "benchmarks.vllm_bench",
        "--levels",
        levels,
        "--targets",
        ",".join(f"{s.kind}={s.url}" for s in servers),
        "--backend",
        "openai",
        "--endpoint",
        "/v1/completions",
        "--model",
        "bench",
        "--tokenizer",
        str(merged),
        "--dataset-name",
        "random",
        "--random-input-len",
        str(plan["input_len"]),
        "--random-output-len",
        str(plan["output_len"]),
        "--ignore-eos",
        "--seed",
        "0",
        "--disable-tqdm",
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,99",
        "--save-result",
        "--result-dir",
        str(out),
        "--result-filename",
        "load.json",
    ]
    res = subprocess.run(
        argv, env=common.dev_env(OPENAI_API_KEY=BENCH_KEY), cwd=out, capture_output=True, text=True, timeout=3600
    )
    (out / "load.log").write_text(res.stdout + "\n--- stderr ---\n" + res.stderr)
    if res.returncode != 0:
        raise RuntimeError(f"vllm bench serve exited {res.returncode}:\n{res.stderr[-3000:]}")
    results: dict[str, dict[int, dict]] = {}
    for server in servers:
        results[server.kind] = {}
        for concurrency in plan["levels"]:
            r = json.loads((out / f"load-{server.kind}-c{concurrency}.json").read_text())
            results[server.kind][concurrency] = {
                k: r.get(k)
                for k in (
                    "completed",
                    "failed",
                    "duration",
                    "request_throughput",
                    "output_throughput",
                    "total_token_throughput",
                    "p50_ttft_ms",
                    "p99_ttft_ms",
                    "p50_itl_ms",
                    "p99_itl_ms",
                    "p50_tpot_ms",
                    "p99_tpot_ms",
                    "p50_e2el_ms",
                    "p99_e2el_ms",
                )
            }
        print(
            f"  {server.kind}: "
            + ", ".join(f"c={c} {results[server.kind][c]['output_throughput'] or 0:.0f} tok/s" for c in plan["levels"])
            + f", failed {sum(r['failed'] or 0 for r in results[server.kind].values())}",
            flush=True,
        )
    return results


# ------------------------------------------------------------------------------------------- where the time goes
PY_SPY = Path(sys.executable).with_name("py-spy")  # requirements/bench.txt
LOOP_FRAME = "(asyncio/runners.py:"  # the API process's event loop thread runs under asyncio's Runner
# Frames of the server and the app (py-spy writes `function (package/module.py:line)`): a stack whose innermost gate
# frame calls into one of these is their work.
NOT_THE_GATE = tuple(
    f"({m}/"
    for m in ("starlette", "fastapi", "vllm", "uvicorn", "prometheus_client", "prometheus_fastapi_instrumentator")
)


def gate_share(stacks: Path) -> dict:
    """A py-spy raw profile (`stack count` lines, innermost frame last) of vLLM's API process, read for its event
    loop thread, where the gate runs and which is the process's limit (Python, one thread): the loop's samples, those
    in which it was busy (not waiting in its poll: innermost frame the loop's run call), the gate's own work among
    them (the innermost project frame is the gate's and nothing it calls is the server's or the app's: the key check,
    reading and parsing the body, the limits, the drain's bookkeeping), and where the busy samples went (innermost
    frame's package). Other threads (vLLM's tokenizer pool) are counted in `samples` only."""
    import collections
    import re

    total = loop = busy = own = 0
    where: collections.Counter = collections.Counter()
    for line in stacks.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        if not any(LOOP_FRAME in f for f in frames):
            continue
        loop += n
        if LOOP_FRAME in frames[-1]:
            continue
        busy += n
        inner = [i for i, f in enumerate(frames) if "tuneserve/gate.py" in f]
        if inner and not any(m in f for f in frames[inner[-1] + 1 :] for m in NOT_THE_GATE):
            own += n
            where["the gate's own work"] += n
            continue
        module = re.search(r"\(([^:)]*)", frames[-1])  # the innermost frame's file: package/module.py
        parts = (module.group(1) if module else frames[-1]).split("/")
        where["/".join(parts[:2]) if len(parts) > 2 else parts[0]] += n
    top = {name: round(n / busy, 3) for name, n in where.most_common(8)} if busy else {}
    return {"samples": total, "loop_samples": loop, "loop_busy": busy, "gate_samples": own, "where": top}


def profile(servers: list[Server], merged: Path, plan: dict, out: Path) -> dict[str, dict] | None:
    """One more round at the highest concurrency, not counted in the ratios, with py-spy sampling each server's
    API process (not pausing it): where that process spends its time, the gate's share of it. None when py-spy
    is missing or may not read other processes here."""
    if not PY_SPY.is_file():
        return None
    top = max(plan["levels"])
    out.mkdir(parents=True, exist_ok=True)
    spies = {}
    for server in servers:
        argv = [str(PY_SPY), "record", "--pid", str(server.vllm_pid()), "--rate", "100", "--nonblocking"]
        argv += ["--format", "raw", "--output", str(out / f"{server.kind}.txt")]
        spies[server.kind] = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=(out / f"{server.kind}.log").open("w")
        )
    time.sleep(1)
    try:
        load(servers, merged, {**plan, "levels": {top: plan["levels"][top]}}, out)
    finally:
        for spy in spies.values():
            spy.send_signal(signal.SIGINT)
            try:
                spy.wait(timeout=60)
            except subprocess.TimeoutExpired:
                spy.kill()
    if any(spy.returncode not in (0, -signal.SIGINT) or not (out / f"{k}.txt").is_file() for k, spy in spies.items()):
        print(f"  py-spy could not profile here; see {out}/*.log", flush=True)
        return None
    return {kind: gate_share(out / f"{kind}.txt") for kind in spies}


def _mean(xs: list[float]) -> float:
    return round(statistics.mean(xs), 3)


def main(argv: list[str] | None = None) -> int:
    args = common.parse_args("serve", __doc__, argv)
    if common.answered_as_child(args, {"model": _model}):
        return 0
    started = time.monotonic()
    plan = SMOKE if args.smoke else FULL
    common.need_serve_python()
    merged = prepare_model(args.work_dir)
    kinds = plan["servers"]
    startups: dict[str, list[float]] = {k: [] for k in kinds}
    memory: dict[str, list[float]] = {k: [] for k in kinds}
    loads: list[dict[str, dict[int, dict]]] = []
    idle_cpu: list[float] = []
    commands: dict[str, tuple[list[str], dict[str, str]]] = {}
    checks: list[list[str]] = []
    profiles: dict[str, dict] | None = None
    # Warm the page cache with vLLM's imports first, so that the first server started does not pay for it.
    subprocess.run(
        [str(common.SERVE_PYTHON), "-c", "import vllm.entrypoints.openai.api_server"],
        env=common.clean_env(),
        capture_output=True,
        timeout=600,
    )
    per_start = -(-plan["rounds"] // plan["starts"])
    for start in range(plan["starts"]):
        servers: dict[str, Server] = {}
        try:
            for kind in kinds:  # ours first: direct is what it runs, read from its process
                print(f"serve: start {start + 1}/{plan['starts']}, {kind} server ...", flush=True)
                log = args.work_dir / "logs" / f"{kind}-{start}.log"
                if kind == "ours":
                    server = Server(kind, merged, log)
                else:
                    port = free_port()
                    command = without_gate(*commands["ours"], port)
                    if kind == "int8":
                        command[0][command[0].index("--model") + 1] = str(merged.parent / "quantized")
                    server = Server(kind, merged, log, command=command, port=port)
                servers[kind] = server
                startups[kind].append(round(server.wait_ready(), 2))
                memory[kind].append(server.memory_mb())
                commands[kind] = server.vllm_command()
                print(f"  ready after {startups[kind][-1]:.1f}s, {memory[kind][-1]:.0f} MB resident", flush=True)
            if "direct" in servers:
                checks.append(differences(commands["ours"], commands["direct"]))
                if checks[-1] != gate_differences():
                    raise RuntimeError(f"ours and direct differ in more than the gate: {checks[-1]}")
            if "control" in servers and differences(commands["direct"], commands["control"]):
                raise RuntimeError(
                    f"control differs from direct: {differences(commands['direct'], commands['control'])}"
                )
            before = {k: s.cpu_seconds() for k, s in servers.items()}
            time.sleep(IDLE_SECONDS)
            idle_cpu.append(max(s.cpu_seconds() - before[k] for k, s in servers.items()) / IDLE_SECONDS)
            for rnd in range(start * per_start, min(plan["rounds"], (start + 1) * per_start)):
                turn = kinds if rnd % 2 == 0 else tuple(reversed(kinds))  # ABBA within each level
                print(f"serve: round {rnd + 1}/{plan['rounds']}, turns {', '.join(turn)} ...", flush=True)
                out = args.work_dir / "runs" / f"round{rnd}"
                out.mkdir(parents=True, exist_ok=True)
                loads.append(load([servers[k] for k in turn], merged, plan, out))
            if start == 0 and plan["profile"] and "direct" in servers:
                print("serve: profiling the API processes (one more round, not counted) ...", flush=True)
                profiles = profile([servers["ours"], servers["direct"]], merged, plan, args.work_dir / "profile")
        finally:
            for server in servers.values():
                server.stop()

    rows, figures, not_run_rows = [], [], []
    levels = list(plan["levels"])
    labels = {
        "ours": "python -m entrypoints.serve",
        "direct": "the same vLLM server, less the gate",
        "int8": "the same, on the QUANTIZE=int8 copy (compressed-tensors W8A8)",
        "control": "direct again, a second server with the same command (the noise floor)",
    }

    def avg(kind: str, c: int, key: str) -> float | None:
        vals = [run[kind][c][key] for run in loads if run[kind][c].get(key) is not None]
        return _mean(vals) if vals else None

    def ratios(a: str, b: str, c: int) -> list[float]:
        return [round(run[a][c]["output_throughput"] / run[b][c]["output_throughput"], 3) for run in loads]

    for kind in kinds:
        for c in levels:
            rows.append(
                {
                    "server": labels[kind],
                    "key": kind,
                    "concurrency": c,
                    "prompts": plan["levels"][c],
                    "startup_s": _mean(startups[kind]),
                    "memory_mb": _mean(memory[kind]),
                    "failed": sum(run[kind][c]["failed"] or 0 for run in loads),
                    "completed": sum(run[kind][c]["completed"] or 0 for run in loads),
                    **{
                        k: avg(kind, c, k)
                        for k in (
                            "output_throughput",
                            "request_throughput",
                            "p50_ttft_ms",
                            "p99_ttft_ms",
                            "p50_itl_ms",
                            "p99_itl_ms",
                        )
                    },
                }
            )
    failed = sum(r["failed"] for r in rows if r["key"] == "ours")
    if "direct" in kinds:
        medians = {c: statistics.median(ratios("ours", "direct", c)) for c in levels}
        added = round(statistics.median(startups["ours"]) - statistics.median(startups["direct"]), 2)
        figures.append(
            common.figure(
                "throughput_ratio_min",
                f"throughput, ours / direct: the lowest median over concurrency {', '.join(map(str, levels))}",
                min(medians.values()),
                "x",
                at_least=THROUGHPUT_TARGET,
            )
        )
        for c in levels:
            each = ratios("ours", "direct", c)
            figures.append(
                common.figure(
                    f"throughput_ratio_c{c}",
                    f"throughput at concurrency {c}, ours / direct (median of {len(each)} rounds)",
                    medians[c],
                    "x",
                    note=f"rounds {', '.join(f'{x:.3f}' for x in each)}; spread {min(each):.3f}-{max(each):.3f}",
                )
            )
        if "control" in kinds:
            for c in levels:
                each = ratios("control", "direct", c)
                figures.append(
                    common.figure(
                        f"control_ratio_c{c}",
                        f"throughput at concurrency {c}, control / direct: two identical servers "
                        f"(median of {len(each)} rounds)",
                        statistics.median(each),
                        "x",
                        note=f"rounds {', '.join(f'{x:.3f}' for x in each)}; spread {min(each):.3f}-{max(each):.3f}",
                    )
                )
        figures.append(
            common.figure(
                "added_startup_s",
                "added startup time (median ours - median direct)",
                added,
                "s",
                at_most=STARTUP_TARGET_S,
            )
        )
        figures.append(
            common.figure(
                "command_differences",
                "argv and environment items in which direct differs from ours' vLLM process, beyond the gate's",
                max(len([d for d in found if d not in gate_differences()]) for found in checks),
                "",
                at_most=0,
            )
        )
    else:
        not_run_rows.append(common.not_run("vLLM started directly (the comparison)", "not in this plan"))
    if profiles is not None:
        ours = profiles["ours"]
        figures += [
            common.figure(
                "gate_cpu_share",
                "the gate's own work in ours' API process under load (share of its event loop's busy samples)",
                round(ours["gate_samples"] / ours["loop_busy"], 4),
                "",
            ),
            common.figure(
                "api_bound_ratio",
                "expected ours / direct where vLLM's API process is the limit (a GPU): 1 - the gate's share",
                round(1 - ours["gate_samples"] / ours["loop_busy"], 3),
                "x",
            ),
        ]
    elif plan["profile"]:
        not_run_rows.append(common.not_run("py-spy profile of the API processes", "py-spy missing or not allowed"))
    if "int8" in kinds and "direct" in kinds:
        figures += [
            common.figure(
                f"int8_throughput_ratio_c{c}",
                f"throughput at concurrency {c}, int8 / bfloat16 (both direct; median of rounds)",
                statistics.median(ratios("int8", "direct", c)),
                "x",
            )
            for c in levels
        ]
        weights = {
            k: sum(p.stat().st_size for p in (merged.parent / k).glob("*.safetensors")) for k in ("merged", "quantized")
        }
        figures += [
            common.figure(
                "int8_memory_ratio",
                "resident memory once ready, int8 / bfloat16 (both direct)",
                round(_mean(memory["int8"]) / _mean(memory["direct"]), 3),
                "x",
            ),
            common.figure(
                "int8_weights_ratio",
                "weights on disk, int8 / bfloat16",
                round(weights["quantized"] / weights["merged"], 3),
                "x",
            ),
        ]
    else:
        not_run_rows.append(common.not_run("int8 (QUANTIZE) against bfloat16", "smoke run: no int8 server"))
    figures += [
        common.figure(
            "failed_requests",
            "failed requests, ours (all rounds; the other servers' are in their rows)",
            failed,
            "",
            at_most=0,
        ),
        common.figure("ours_startup_s", "startup to ready, ours (mean)", _mean(startups["ours"]), "s"),
        common.figure(
            "idle_cpu",
            "CPU use of the busiest idle server while all are up (of one core)",
            round(max(idle_cpu), 3),
            "",
        ),
    ]
    if "direct" in kinds:
        figures.append(
            common.figure("direct_startup_s", "startup to ready, direct (mean)", _mean(startups["direct"]), "s")
        )
    not_run_rows.append(common.not_run("GPU serving (vLLM CUDA image), fp8", "no GPU"))
    setup = {
        "model": "Qwen2 architecture, hidden 256, 4 layers, head_dim 64, vocab 1500, bfloat16, merged by "
        "tuneserve.merge from a random r=16 LoRA adapter",
        "load_generator": "vllm bench serve (vLLM 0.32.0), --backend openai (/v1/completions, streamed), random "
        f"dataset, {plan['input_len']} input tokens, {plan['output_len']} output tokens "
        "(ignore_eos), request rate unlimited within the concurrency cap",
        "levels": {str(c): n for c, n in plan["levels"].items()},
        "starts": plan["starts"],
        "rounds": plan["rounds"],
        "startups_s": startups,
        "memory_mb": memory,
        "commands": {
            k: {"argv": " ".join(Path(a).name if i == 0 else a for i, a in enumerate(argv)), "env": redacted(env)}
            for k, (argv, env) in commands.items()
        },
        "profiles": profiles,
        "command_check": ["ours' vLLM process and direct differ in: " + "; ".join(found) for found in checks],
    }
    notes = [
        "Direct is the vLLM server our entrypoint runs, with the argv and environment read from that running "
        "process (/proc), less the gate's --middleware pair and the variables only the gate reads; each start "
        "checks that the two processes differ in exactly that (command_check). int8 is direct on the other folder.",
        "All servers of a start are up at once and take turns: each round runs every concurrency level against "
        "each server in turn, in ABBA order over the rounds, so drift on the shared machine reaches all of them. "
        "The ratios are per round (the same level, seconds apart) and their median; the spread is their range. "
        "An idle server uses the CPU named in idle_cpu meanwhile. On the 2-core machine some turns stall for seconds "
        "(any server: see control / direct; the load generator's pooled connections then meet uvicorn's 5 s keep-alive "
        "and fail as 'Server disconnected'), which is why single rounds swing and the medians are the figures.",
        "The profile is read for the API process's event loop thread, where the gate runs and which limits that "
        "process: `where` in `profiles` is where its busy samples went, by package of the innermost frame.",
        "Our entrypoint validates the environment, checks the stop ids of the model folder, then execs its "
        "supervisor, which starts the same vLLM server: its added startup is that work.",
        "The model is small: resident memory is mostly vLLM's runtime and the KV cache VLLM_CPU_KVCACHE_SPACE "
        "reserves, the same for both precisions; the weights ratio is the part that grows with the model. On a CPU "
        "without native bfloat16, bfloat16 matmuls are emulated, which the int8 kernels (oneDNN) are not.",
    ]
    common.write_result(
        args,
        title=TITLE,
        started=started,
        setup=setup,
        rows=rows,
        figures=figures,
        not_run_rows=not_run_rows,
        notes=notes,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
