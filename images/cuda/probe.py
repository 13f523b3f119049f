"""Inside the CUDA training image, with no GPU and no network (images/cuda/check.sh runs it as the image's user on a
read-only root filesystem): what must hold before the image meets a GPU. Prints one JSON report; exit 1 on a failure.
(Named probe.py, not inspect.py: its folder comes first on sys.path, and the standard library has an inspect.)

  torch    the CUDA build (torch.version.cuda), importable without a GPU
  ldd      every shared library of torch, bitsandbytes' CUDA build (the one it loads for torch's CUDA version) and
           Triton resolves, except the driver's own (libcuda.so.1 and the NVIDIA management library come from the
           host's driver at run time); bitsandbytes' CUDA library is also loaded (dlopen) after torch, the way
           bitsandbytes loads it
  triton   a kernel compiled ahead of time for sm_90 (H100/H200) and sm_100 (B200) with the ptxas Triton ships,
           its cache under /tmp
"""

from __future__ import annotations

import ctypes
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# What the NVIDIA container runtime mounts from the host's driver: nothing in the image may provide them.
DRIVER_LIBS = {"libcuda.so.1", "libnvidia-ml.so.1"}
TARGETS = (90, 100)


def site_packages() -> Path:
    import torch

    return Path(torch.__file__).resolve().parents[1]


def libraries(sp: Path) -> dict[str, list[Path]]:
    """The shared libraries to check, by package."""

    def so(*patterns: str) -> list[Path]:
        return sorted({Path(p) for pat in patterns for p in glob.glob(str(sp / pat), recursive=True)})

    return {
        "torch": so("torch/lib/*.so*", "torch/*.so"),
        "bitsandbytes": so(f"bitsandbytes/{bnb_library()}"),
        "triton": so("triton/**/*.so"),
    }


def bnb_library() -> str:
    """The CUDA library bitsandbytes loads with this torch: libbitsandbytes_cuda<major><minor>.so for
    torch.version.cuda (bitsandbytes/cextension.py). The wheel's libraries for other CUDA versions are never loaded
    here (they need another CUDA's runtime), so they are counted, not checked."""
    import torch

    major, minor = torch.version.cuda.split(".")[:2]
    return f"libbitsandbytes_cuda{major}{minor}.so"


def ldd_missing(lib: Path, env: dict[str, str]) -> list[str]:
    res = subprocess.run(["ldd", str(lib)], capture_output=True, text=True, env=env)
    return sorted({ln.split("=>")[0].strip() for ln in res.stdout.splitlines() if "not found" in ln})


def check_ldd(sp: Path) -> tuple[dict, list[str]]:
    """torch's libraries find the nvidia-* wheels' through their RUNPATH ($ORIGIN/../../nvidia/...). bitsandbytes'
    carries no RUNPATH: it resolves against what torch loaded first (torch preloads CUDA's runtime and cuBLAS with
    RTLD_GLOBAL), so ldd reads it with the nvidia-* wheels' folders on LD_LIBRARY_PATH, and a real dlopen after
    `import torch` confirms it."""
    failures: list[str] = []
    nvidia_dirs = sorted(glob.glob(str(sp / "nvidia" / "*" / "lib")) + glob.glob(str(sp / "nvidia" / "cu*" / "lib")))
    out: dict = {}
    for pkg, libs in libraries(sp).items():
        env = dict(os.environ)
        if pkg == "bitsandbytes":
            env["LD_LIBRARY_PATH"] = os.pathsep.join(nvidia_dirs)
        if pkg == "triton":  # its plugins are loaded into a process that has loaded triton/_C/libtriton.so
            env["LD_LIBRARY_PATH"] = str(sp / "triton" / "_C")
        if not libs:
            failures.append(f"{pkg}: no shared library found")
        driver: set[str] = set()
        missing: dict[str, list[str]] = {}
        for lib in libs:
            gone = ldd_missing(lib, env)
            driver.update(g for g in gone if g in DRIVER_LIBS)
            if other := [g for g in gone if g not in DRIVER_LIBS]:
                missing[str(lib.relative_to(sp))] = other
        out[pkg] = {"libraries": len(libs), "unresolved": missing, "driver_libraries_needed": sorted(driver)}
        failures += [f"{lib}: {', '.join(m)} not found" for lib, m in missing.items()]
    import torch  # noqa: F401  (its global CUDA libraries first, as bitsandbytes finds them)

    loaded = []
    for lib in libraries(sp)["bitsandbytes"]:
        try:
            ctypes.CDLL(str(lib))
            loaded.append(lib.name)
        except OSError as exc:
            failures.append(f"dlopen {lib.name} after torch: {exc}")
    out["bitsandbytes"]["loaded_after_torch"] = loaded
    out["bitsandbytes"]["other_cuda_versions_not_loaded"] = sorted(
        p.name for p in (sp / "bitsandbytes").glob("libbitsandbytes_cuda*.so") if p.name != bnb_library()
    )
    return out, failures


def check_triton() -> tuple[dict, list[str]]:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    @triton.jit
    def add(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask), mask=mask)

    signature = {"x_ptr": "*fp32", "y_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}
    out: dict = {"version": triton.__version__, "cache": os.environ.get("TRITON_CACHE_DIR"), "targets": {}}
    failures: list[str] = []
    for arch in TARGETS:
        try:
            src = triton.compiler.ASTSource(fn=add, signature=signature, constexprs={"BLOCK": 256})
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32))
            ptx_target = re.search(r"^\.target\s+(\S+)", kernel.asm["ptx"], re.M)
            out["targets"][f"sm_{arch}"] = {
                "ptx_target": ptx_target.group(1) if ptx_target else None,
                "cubin_bytes": len(kernel.asm["cubin"]),
            }
            if not (ptx_target and ptx_target.group(1).startswith(f"sm_{arch}")) or not kernel.asm["cubin"]:
                failures.append(f"sm_{arch}: unexpected target {out['targets'][f'sm_{arch}']}")
        except Exception as exc:  # noqa: BLE001  (reported: the image cannot build kernels for this GPU)
            out["targets"][f"sm_{arch}"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            failures.append(f"sm_{arch}: {type(exc).__name__}: {exc}"[:500])
    return out, failures


def main() -> int:
    import torch

    report: dict = {
        "python": sys.version.split()[0],
        "uid": os.getuid(),
        "root_read_only": not os.access("/", os.W_OK) and not _writable("/opt/venv"),
        "torch": {
            "version": torch.__version__,
            "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(),
        },
    }
    failures: list[str] = []
    if not torch.version.cuda:
        failures.append(f"torch {torch.__version__} is not a CUDA build")
    sp = site_packages()
    report["ldd"], f = check_ldd(sp)
    failures += f
    report["triton"], f = check_triton()
    failures += f
    report["failures"] = failures
    report["passed"] = not failures
    print(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


def _writable(path: str) -> bool:
    try:
        with tempfile.NamedTemporaryFile(dir=path):
            return True
    except OSError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
