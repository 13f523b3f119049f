"""The benchmark report: docs/benchmarks.md and its plots, generated from the result files alone.

    .venv-train/bin/python -m benchmarks.report [--results-dir DIR] [--out FILE]

Every figure in the report is read from `<results dir>/<name>.json`; nothing is typed by hand. Plots go
to a folder named after the report (docs/benchmarks/*.png).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks import common

INTRO = """\
Each benchmark measures one step of the job against what a user would otherwise run (the guides' code and
the libraries' defaults), both sides in the same run on the same machine, so that figures are ratios and
noise on a shared machine mostly cancels out. `make bench` runs them all and regenerates this file from
`benchmarks/results/*.json` (`python -m benchmarks.report`); `make bench-smoke` runs the same code on tiny
sizes (its figures mean nothing; it keeps the benchmarks working, and `tests/test_bench.py` runs it).
Figures that need hardware this machine lacks are listed as not run, with the reason."""


def met_text(f: dict) -> str:
    if f.get("target") is None:
        return ""
    if f.get("met") is None:
        return "not run" + (
            f" ({f['note'].removeprefix('not run (').rstrip(')')})"
            if str(f.get("note", "")).startswith("not run")
            else ""
        )
    return "yes" if f["met"] else "**no**"


def value_text(f: dict) -> str:
    if f.get("value") is None:
        return "n/a"
    unit = f" {f['unit']}" if f.get("unit") else ""
    return f"{common.fmt(f['value'])}{unit}"


def esc(text: str) -> str:
    return text.replace("|", "\\|")


def cell(v: Any) -> str:
    if isinstance(v, (dict, list)):
        return "`" + json.dumps(v, separators=(", ", ": ")) + "`"
    return esc(common.fmt(v))


def table(rows: list[dict], skip: tuple[str, ...] = ("key",)) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols and k not in skip]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return out


def packages_text(m: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in (m.get("packages") or {}).items() if v)


# ------------------------------------------------------------------------------------------- plots
def _bars(ax, labels: list[str], values: list[float], title: str, unit: str) -> None:
    colors = ["#2a6f97" if i == 0 else "#a9a9a9" for i in range(len(values))]
    bars = ax.barh(range(len(values)), values, color=colors)
    ax.set_yticks(range(len(values)), [_wrap(label) for label in labels], fontsize=8)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(unit, fontsize=8)
    for b, v in zip(bars, values):
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {common.fmt(v)}", va="center", fontsize=8)
    ax.margins(x=0.25)


def _wrap(text: str, width: int = 34) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:  # requirements/train.txt (make setup installs it): the tables are written without plots
        print(
            f"report: matplotlib is not installed, no plot for {result['name']} (pip install -r "
            "requirements/train.txt -c requirements/constraints.txt)"
        )
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name, rows = result["name"], result["rows"]
    if not rows:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.55 * max(len(rows), 3) + 1.6))
    if name == "merge":
        labels = [r["variant"] for r in rows]
        _bars(axes[0], labels, [r["peak_rss_gib"] for r in rows], "peak RSS", "GiB")
        _bars(axes[1], labels, [r["seconds"] for r in rows], "wall time", "s")
    elif name == "data":
        labels = [r["variant"] for r in rows]
        _bars(axes[0], labels, [100 * r["real_fraction"] for r in rows], "positions holding real tokens", "%")
        axes[0].axvline(95, color="#c0392b", linestyle="--", linewidth=1)
        _bars(axes[1], labels, [r["samples_per_second"] for r in rows], "preparation speed", "rows/s")
    elif name == "train":
        labels = [r["variant"] for r in rows]
        _bars(
            axes[0],
            labels,
            [r["tokens_per_second"] for r in rows],
            f"training tokens/s ({rows[0]['device']})",
            "tokens/s",
        )
        mem = "peak_gpu_gib" if rows[0].get("peak_gpu_gib") is not None else "peak_rss_gib"
        _bars(axes[1], labels, [r[mem] for r in rows], "peak memory of the training loop", "GiB")
    elif name == "serve":
        plt.close(fig)
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
        for key, style in (("ours", "-o"), ("direct", "--s"), ("int8", ":^")):
            rs = [r for r in rows if r["key"] == key]
            if not rs:
                continue
            cs = [r["concurrency"] for r in rs]
            axes[0].plot(cs, [r["output_throughput"] for r in rs], style, label=rs[0]["server"])
            axes[1].plot(cs, [r["p50_ttft_ms"] for r in rs], style, label=f"{key} p50")
            axes[1].plot(cs, [r["p99_ttft_ms"] for r in rs], style, alpha=0.5, label=f"{key} p99")
        for ax, title, unit in ((axes[0], "output throughput", "tokens/s"), (axes[1], "time to first token", "ms")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency", fontsize=8)
            ax.set_ylabel(unit, fontsize=8)
            ax.set_title(title, fontsize=10)
            ax.legend(fontsize=7)
    elif name == "images":
        labels = [r["image"] for r in rows]
        _bars(axes[0], labels, [r["compressed_gb"] or 0 for r in rows], "compressed", "GB")
        _bars(axes[1], labels, [r["unpacked_gb"] or 0 for r in rows], "unpacked", "GB")
    elif name == "memory":
        labels = [r["stage"] for r in rows]
        _bars(axes[0], labels, [r["peak_gib"] for r in rows], "peak memory", "GiB")
        _bars(axes[1], labels, [r["ratio_to_16bit"] for r in rows], "peak / the model's 16-bit weights", "x")
    else:
        plt.close(fig)
        return False
    fig.suptitle(result["title"] + (" (smoke)" if result.get("smoke") else ""), fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------- the document
def section(i: int, name: str, result: dict | None, plots: Path, out: Path) -> list[str]:
    if result is None:
        cmd = f".venv-train/bin/python -m benchmarks.{name}"
        return [f"## {i}. {name}", "", f"Not run yet: `{cmd}`.", ""]
    m = result["machine"]
    verdict = {True: "every target met", False: "**not every target met**", None: "no target measured here"}[
        result["met"]
    ]
    lines = [
        f"## {i}. {result['title']}",
        "",
        f"- Command: `{result['command']}`" + (" (smoke: tiny sizes)" if result.get("smoke") else ""),
        f"- Machine: {common.machine_text(m)}; {m['os']}, Python {m['python']}; {packages_text(m)}"
        + (f"; load average {m['load_average'][1]} (5 min) when written" if m.get("load_average") else ""),
        f"- Finished: {result['finished']}, in {common.fmt(result['seconds'])} s; result: "
        f"`{Path(result.get('_path', '')).name}` ({verdict})",
        "",
    ]
    lines += ["| Figure | Value | Target | Met |", "|---|---|---|---|"]
    for f in result["figures"]:
        note = f" ({f['note']})" if f.get("note") and not str(f["note"]).startswith("not run") else ""
        lines.append(f"| {esc(f['label'] + note)} | {value_text(f)} | {f.get('target') or ''} | {met_text(f)} |")
    lines.append("")
    png = plots / f"{name}.png"
    if plot(result, png):
        lines += [f"![{result['title']}]({png.relative_to(out.parent).as_posix()})", ""]
    lines += ["Measurements:", ""] + table(result["rows"]) + [""]
    if result["not_run"]:
        lines += ["Not run:", ""] + [f"- {n['what']}: {n['reason']}" for n in result["not_run"]] + [""]
    setup = result.get("setup") or {}
    if setup:
        lines += ["Setup:", ""] + [f"- {k}: {cell(v)}" for k, v in setup.items()] + [""]
    if result.get("notes"):
        lines += ["Notes:", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return lines


def render(results_dir: Path, out: Path) -> str:
    plots = out.with_suffix("")  # docs/benchmarks.md -> docs/benchmarks/
    results: dict[str, dict | None] = {}
    for name in common.ORDER:
        path = results_dir / f"{name}.json"
        results[name] = json.loads(path.read_text()) | {"_path": str(path)} if path.is_file() else None
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by `python -m benchmarks.report` from the result files; do not edit. -->",
        "",
        INTRO,
        "",
        "## Summary",
        "",
        "| Benchmark | Figure | Value | Target | Met |",
        "|---|---|---|---|---|",
    ]
    for i, name in enumerate(common.ORDER, 1):
        r = results[name]
        if r is None:
            lines.append(f"| {i}. {name} | not run yet | | | |")
            continue
        for f in r["figures"]:
            if f.get("target"):
                lines.append(f"| {i}. {name} | {esc(f['label'])} | {value_text(f)} | {f['target']} | {met_text(f)} |")
    lines.append("")
    for i, name in enumerate(common.ORDER, 1):
        lines += section(i, name, results[name], plots, out)
    lines += gpu_section(results_dir / "gpu.json")
    return "\n".join(lines).rstrip() + "\n"


def gpu_section(path: Path) -> list[str]:
    """`make gpu-check`'s report (benchmarks/gpu_check.py), committed only from a run on a GPU."""
    lines = ["## GPU check (`make gpu-check`)", ""]
    if not path.is_file():
        return lines + [
            'Not run: no GPU has run it yet. Every GPU figure above says "not run" for the same reason.',
            "",
        ]
    r = json.loads(path.read_text())
    m = r["machine"]
    lines += [
        f"- Machine: {common.machine_text(m)}; Python {m['python']}; {packages_text(m)}",
        f"- Started: {r['started']}" + (" (smoke: tiny sizes)" if r.get("smoke") else ""),
        "",
        "| Stage | Status | Seconds | Result |",
        "|---|---|---|---|",
    ]
    for st in r["stages"]:
        detail = st.get("result") if st["status"] == "passed" else st.get("error") or st.get("why")
        lines.append(f"| {st['stage']} | {st['status']} | {common.fmt(st.get('seconds'))} | {cell(detail)} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--results-dir", type=Path, default=common.RESULTS)
    p.add_argument("--out", type=Path, default=common.REPO / "docs" / "benchmarks.md")
    args = p.parse_args(argv)
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(args.results_dir.resolve(), out))
    print(f"report: wrote {out}")
    if args.results_dir.resolve() == common.RESULTS.resolve():
        # The image-size table of docs/images.md follows images.json: the one docs generator rewrites it.
        from devtools import docs

        for path in docs.write():
            print(f"report: updated {path.relative_to(common.REPO)} (make docs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
