"""The one generator of the documentation's generated sections (`make docs`), in README.md and docs/*.md.

A section sits between `<!-- BEGIN name -->` and `<!-- END name -->` in its file. SECTIONS maps each
(file, section name) to the function that writes its body; every marker section in README.md and docs/*.md
must be in it, and every section in it must have its markers in its file (either missing is an error).

    python -m devtools.docs            # rewrite the stale files
    python -m devtools.docs --check    # exit 1 listing the stale files (tests/test_docs.py does the same)

docs/benchmarks.md is not a marker file: benchmarks/report.py writes it whole, then calls `write()` here.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from tuneserve.config import TRAIN_SCHEMA
from tuneserve.engine_eval import EVAL_SCHEMA
from tuneserve.exitcodes import EXIT_CODE_HELP, ExitCode
from tuneserve.serve import SERVE_SCHEMA

REPO = Path(__file__).resolve().parents[1]
IMAGES_RESULT = REPO / "benchmarks" / "results" / "images.json"
IMAGES_CUDA_RESULT = REPO / "benchmarks" / "results" / "images-cuda.json"
MEMORY_RESULT = REPO / "benchmarks" / "results" / "memory.json"
K8S_BASE = REPO / "k8s" / "base"


class DocsError(Exception):
    """A marker section missing from its file, or one no generator writes."""


MARKER = re.compile(r"^<!-- (BEGIN|END) ([A-Za-z0-9_-]+) -->$", re.M)  # a marker is a line of its own


# ------------------------------------------------------------------------------------------------ sections
def exit_codes_table() -> str:
    """The training entrypoint's exit codes (tuneserve/exitcodes.py)."""
    rows = ["| Code | Meaning |", "|---|---|"]
    rows += [f"| {int(c)} | {EXIT_CODE_HELP[c]} |" for c in ExitCode]
    return "\n".join(rows)


def train_variables() -> str:
    return TRAIN_SCHEMA.markdown_table()


def evaluate_variables() -> str:
    return EVAL_SCHEMA.markdown_table()


def serve_variables() -> str:
    return SERVE_SCHEMA.markdown_table()


def _size(gb: float) -> str:
    return f"{gb:.3g} GB" if gb >= 0.1 else f"{gb * 1000:.3g} MB"


def image_sizes(path: Path = IMAGES_RESULT, cuda_path: Path = IMAGES_CUDA_RESULT) -> str:
    """The image-size table of docs/images.md, from the images benchmark's result file and, once
    `make image-train-check` has built the CUDA training image, its measured sizes instead of the estimate."""
    if not path.is_file():
        return "Not measured yet: `make test-images`, then `make bench BENCH=images`."
    r = json.loads(path.read_text())
    cuda = json.loads(cuda_path.read_text()) if cuda_path.is_file() else None
    lines = ["| Image | Compressed | Unpacked |", "|---|---|---|"]
    for row in r["rows"]:
        if cuda and "(estimate" in row["image"]:
            continue
        image = row["image"].replace("|", "\\|")
        lines.append(f"| {image} | {_size(row['compressed_gb'])} | {_size(row['unpacked_gb'])} |")
    if cuda:
        lines += [
            f"| training image, CUDA (measured: `{cuda['command']}`) | {_size(cuda['compressed_gb'])} "
            f"| {_size(cuda['unpacked_gb'])} |",
            f"| training image, CUDA, above its base | {_size(cuda['added_compressed_gb'])} "
            f"| {_size(cuda['added_unpacked_gb'])} |",
        ]
    m = r["machine"]
    lines += [
        "",
        f"Measured {r['finished'][:10]} by `{r['command']}` on {m['cpu']}, {m['cores']} cores; targets "
        "and method: [docs/benchmarks.md](benchmarks.md#7-images-compressed-and-unpacked-sizes).",
    ]
    if cuda:
        lines.append(
            f"The CUDA training image: built and inspected {cuda['date']} by `{cuda['command']}` "
            f"({'passed' if cuda['passed'] else 'FAILED'}) on {cuda['machine']['cpu']}, on the "
            f"local stand-in base ({_size(cuda['base_compressed_gb'])} compressed; the official slim base is "
            "smaller), so the row above its base is what Dockerfile.train adds "
            "([below](#the-cuda-image-built-and-inspected))."
        )
    return "\n".join(lines)


def training_job(base: Path = K8S_BASE) -> dict:
    """The training Job of k8s/base (the one every overlay's single-node Job is)."""
    jobs = [
        doc
        for path in sorted(base.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if isinstance(doc, dict) and doc.get("kind") == "Job"
    ]
    if len(jobs) != 1:
        raise DocsError(f"{base}: expected one Job, found {len(jobs)}")
    return jobs[0]


def job_action(job: dict, code: int, disrupted: bool = False) -> str:
    """What the Job's podFailurePolicy does with a pod whose main container exited with `code`."""
    (container,) = job["spec"]["template"]["spec"]["containers"]
    for rule in job["spec"]["podFailurePolicy"]["rules"]:
        if "onPodConditions" in rule:
            if disrupted and any(
                c["type"] == "DisruptionTarget" and c.get("status", "True") == "True" for c in rule["onPodConditions"]
            ):
                return rule["action"]
            continue
        codes = rule["onExitCodes"]
        if codes.get("containerName", container["name"]) != container["name"]:
            continue
        if (code in codes["values"]) == (codes["operator"] == "In"):
            return rule["action"]
    return "Count"


def k8s_exit_codes_table(job: dict | None = None) -> str:
    """What each exit code of the training container does to the Job, from the Job's podFailurePolicy."""
    job = training_job() if job is None else job
    limit = job["spec"]["backoffLimit"]
    does = {
        "FailJob": "Fails the Job at once; no new pod.",
        "Count": f"A new pod resumes from the claim; counts toward `backoffLimit` ({limit}).",
        "Ignore": "A new pod resumes from the claim; not counted.",
    }
    rows = [
        "| Exit code | Name | What the Job does |",
        "|---|---|---|",
        f"| {int(ExitCode.OK)} | `{ExitCode.OK.name}` | The Job completes. |",
    ]
    rows += [f"| {int(c)} | `{c.name}` | {does[job_action(job, int(c))]} |" for c in ExitCode if c is not ExitCode.OK]
    rows.append(
        f"| any, after preemption, eviction or a node drain (`DisruptionTarget`) | | "
        f"{does[job_action(job, int(ExitCode.TERMINATED), disrupted=True)]} |"
    )
    return "\n".join(rows)


# (file relative to the repository, section name) -> the function that writes the section's body.
# Published shapes (config.json on the Hub) the memory table is computed for: Llama 3.1 8B and 70B, Gemma 3 27B's
# language model.
REFERENCE_MODELS = {
    "Llama 3.1 8B": (
        "llama",
        dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256, architectures=["LlamaForCausalLM"]),
    ),
    "Gemma 3 27B": (
        "gemma3_text",
        dict(hidden_size=5376, intermediate_size=21504, num_hidden_layers=62, num_attention_heads=32,
             num_key_value_heads=16, head_dim=128, vocab_size=262208, architectures=["Gemma3ForCausalLM"]),
    ),
    "Llama 3.1 70B": (
        "llama",
        dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
             num_key_value_heads=8, vocab_size=128256, architectures=["LlamaForCausalLM"]),
    ),
}  # fmt: skip
GPU_SIZES = (24, 48, 80, 141)  # GB: L4/A10-class, L40S/A6000, A100/H100, H200


def _train_stage(size, four_bit: bool, gpu_gb: float):
    from tuneserve import memory

    node = memory.Host(64 * 10**9, 64 * 10**9, "")
    planned = memory.plan(
        size,
        device="cuda",
        compute_bytes=2,
        load_in_4bit=four_bit,
        gpu_memory=[int(gpu_gb * 1e9)],
        hosted=node,
        quantize=True,
    )
    return planned.stages[0]


def memory_table(path: Path = MEMORY_RESULT) -> str:
    """docs/training.md's memory table: each stage's need computed by tuneserve.memory for published shapes, then
    the benchmark's measured peaks under a memory limit."""
    from transformers import AutoConfig

    from tuneserve import engine_eval, memory

    gb = 1e9
    lines = [
        "| Model | 16-bit weights | QLoRA training, per GPU | LoRA (16-bit base), per GPU | Smallest GPU for QLoRA "
        "| Merge, quantize (host) | Verify, evaluate on one 80 GB GPU, 64 GB host | Engine evaluation (80 GB GPUs) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (kind, shape) in REFERENCE_MODELS.items():
        config = AutoConfig.for_model(kind, dtype="bfloat16", **shape)
        size = memory.model_size(config, target_modules="all-linear", rank=16)
        node = memory.Host(64 * 10**9, 64 * 10**9, "")

        q, lora = _train_stage(size, True, 80), _train_stage(size, False, 80)
        smallest = next((f"{g} GB" for g in GPU_SIZES if _train_stage(size, True, g).fits), "none single")
        on_one = memory.plan(
            size, device="cuda", compute_bytes=2, load_in_4bit=True, gpu_memory=[80 * 10**9], hosted=node, quantize=True
        )
        host = max(s.need for s in on_one.stages if s.name in ("merge", "quantize"))
        text = config.get_text_config()
        tp = engine_eval.choose_tensor_parallel(
            size.bytes16, text.num_attention_heads, text.num_key_value_heads, (8, 80 * 10**9)
        )["size"]
        lines.append(
            f"| {name} | {size.bytes16 / gb:.0f} GB | {q.need / gb:.0f} GB | {lora.need / gb:.0f} GB | {smallest} "
            f"| {host / gb:.1f} GB | {on_one.placement} | {tp} GPU{'s' if tp > 1 else ''} |"
        )
    lines += [
        "",
        "Computed (`tuneserve.memory.plan`, what preflight prints): lower bounds, weights and optimizer state without "
        "activations, LoRA r=16 on every linear layer, bfloat16.",
    ]
    if path.is_file():
        r = json.loads(path.read_text())
        setup = r["setup"]
        rows = {row["stage"]: row for row in r["rows"]}
        lines += [
            "",
            f"Measured ({r['finished'][:10]}, `{r['command']}`, [benchmark](benchmarks.md)): a "
            f"{setup['model_bytes_16bit'] / gb:.2f} GB (16-bit) model on the CPU under a "
            f"{setup['memory_limit_bytes'] / 2**30:.2f} GiB memory limit, the whole job passing:",
            "",
            "| Stage | Peak (GiB) | Peak / 16-bit weights |",
            "|---|---|---|",
            *(f"| {k} | {v['peak_gib']} | {v['ratio_to_16bit']} |" for k, v in rows.items()),
        ]
    return "\n".join(lines)


SECTIONS: dict[tuple[str, str], Callable[[], str]] = {
    ("README.md", "exit-codes"): exit_codes_table,
    ("docs/configuration.md", "train-variables"): train_variables,
    ("docs/configuration.md", "serve-variables"): serve_variables,
    ("docs/configuration.md", "evaluate-variables"): evaluate_variables,
    ("docs/images.md", "image-sizes"): image_sizes,
    ("docs/training.md", "memory-table"): memory_table,
    ("docs/kubernetes.md", "k8s-exit-codes"): k8s_exit_codes_table,
}


# ------------------------------------------------------------------------------------------------ rendering
def marker_files(repo: Path = REPO) -> list[str]:
    """Every file that may hold marker sections: README.md and docs/*.md, plus those SECTIONS names."""
    files = {"README.md", *(p.relative_to(repo).as_posix() for p in sorted((repo / "docs").glob("*.md")))}
    return sorted(files | {f for f, _ in SECTIONS})


def render(file: str, text: str) -> str:
    """`text` (the content of `file`) with each of its generated sections rewritten."""
    names = [m.group(2) for m in MARKER.finditer(text) if m.group(1) == "BEGIN"]
    unknown = sorted(set(names) - {s for f, s in SECTIONS if f == file})
    if unknown:
        raise DocsError(f"{file}: no generator writes the marker sections {', '.join(unknown)} (devtools/docs.py)")
    for (f, name), body in SECTIONS.items():
        if f != file:
            continue
        begin, end = re.escape(f"<!-- BEGIN {name} -->"), re.escape(f"<!-- END {name} -->")
        pattern = re.compile(rf"^({begin}\n).*?^({end})$", re.S | re.M)
        if len(pattern.findall(text)) != 1:
            raise DocsError(f"{file} lacks the markers of section {name!r} (or has them more than once)")
        content = body()
        text = pattern.sub(lambda m, content=content: f"{m.group(1)}{content}\n{m.group(2)}", text)
    return text


def stale(repo: Path = REPO) -> dict[Path, str]:
    """The files whose generated sections are out of date, each with its regenerated text."""
    out = {}
    for file in marker_files(repo):
        path = repo / file
        if not path.is_file():
            raise DocsError(f"{file} is missing (devtools/docs.py SECTIONS names it)")
        text = path.read_text()
        new = render(file, text)
        if new != text:
            out[path] = new
    return out


def write(repo: Path = REPO) -> list[Path]:
    """Rewrite every stale file; returns the files written."""
    changed = stale(repo)
    for path, text in changed.items():
        path.write_text(text)
    return list(changed)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv not in ([], ["--check"]):
        print("usage: python -m devtools.docs [--check]", file=sys.stderr)
        return 2
    try:
        if argv == ["--check"]:
            changed = list(stale())
            for path in changed:
                print(f"{path.relative_to(REPO)} is out of date: run `make docs`", file=sys.stderr)
            return 1 if changed else 0
        for path in write():
            print(f"updated {path.relative_to(REPO)}")
    except DocsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
