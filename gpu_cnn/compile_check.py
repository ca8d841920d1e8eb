"""Build every kernel in ``gpu_cnn.kernels`` for real GPUs, without one: PTX with
``numba.cuda.compile_ptx`` then machine code with ``ptxas`` from the project's own install
(the ``nvidia-cuda-nvcc-cu12`` wheel), reporting registers, shared memory and spills.

Runs with the CUDA simulator off (``compile_ptx`` does not work under it), so tests call it in a
subprocess: ``python -m gpu_cnn.compile_check --json``.
"""
import argparse
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ARCHS = ((8, 0), (9, 0))


def find_ptxas():
    """Path of ptxas shipped by the nvidia-cuda-nvcc-cu12 wheel (never the machine's own)."""
    import sysconfig

    roots = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path]
    for root in roots:
        exe = Path(root) / "nvidia" / "cuda_nvcc" / "bin" / "ptxas"
        if exe.is_file():
            return str(exe)
    raise RuntimeError(
        "ptxas not found under site-packages/nvidia/cuda_nvcc/bin: install the project "
        "(numba-cuda[cu12] brings the nvidia-cuda-nvcc-cu12 wheel that ships it)"
    )


def collect_kernels():
    """Import every module of gpu_cnn.kernels; return {name: (dispatcher, signature, module)}.

    Raises if a module defines a CUDA kernel that was not declared through ``_common.kernel`` (and so
    carries no signature to build it with).
    """
    os.environ["NUMBA_ENABLE_CUDASIM"] = "0"
    import gpu_cnn.kernels as pkg
    from gpu_cnn.kernels import _common
    from numba.cuda.dispatcher import CUDADispatcher

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")
    registered = {id(entry[0]) for entry in _common.KERNELS.values()}
    missing = []
    for modname, mod in list(sys.modules.items()):
        if not modname.startswith(pkg.__name__ + "."):
            continue
        for attr, obj in vars(mod).items():
            if isinstance(obj, CUDADispatcher) and id(obj) not in registered:
                missing.append(f"{modname}.{attr}")
    if missing:
        raise RuntimeError("kernels without a signature (declare them with _common.kernel): " + ", ".join(missing))
    return dict(_common.KERNELS)


_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_SMEM = re.compile(r"(\d+) bytes smem")


def build(name, entry, cc, ptxas, workdir):
    """Compile one kernel for one arch. Returns a result dict; 'error' is set on failure."""
    from numba import cuda

    disp, sig, _ = entry
    is_device = bool(disp.targetoptions.get("device"))
    res = {"kernel": name, "arch": f"sm_{cc[0]}{cc[1]}", "signature": sig}
    try:
        ptx, _ = cuda.compile_ptx(disp.py_func, sig, cc=cc, device=is_device)
    except Exception as exc:  # report every failure, do not stop at the first
        res["error"] = f"compile_ptx: {type(exc).__name__}: {exc}"
        return res
    path = Path(workdir) / f"{name}.sm{cc[0]}{cc[1]}.ptx"
    path.write_text(ptx)
    cmd = [ptxas, f"-arch=sm_{cc[0]}{cc[1]}", "-v", str(path), "-o", str(path.with_suffix(".cubin"))]
    if is_device:
        cmd.insert(1, "-c")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        res["error"] = f"ptxas: {out.strip()[-2000:]}"
        return res
    regs = _RE_REGS.search(out)
    spill = _RE_SPILL.search(out)
    smem = _RE_SMEM.search(out)
    if is_device:  # built alone only to prove it compiles: it is inlined, its registers count in its callers
        res.update(device_function=True, registers=None, shared_bytes=None, spill_stores=None, spill_loads=None)
        return res
    res.update(
        registers=int(regs.group(1)) if regs else 0,
        shared_bytes=int(smem.group(1)) if smem else 0,
        spill_stores=int(spill.group(1)) if spill else 0,
        spill_loads=int(spill.group(2)) if spill else 0,
    )
    return res


def _type_device_functions_without_gpu(cc):
    """Let kernels that call device functions build with no GPU present.

    Typing such a call compiles the device function for ``get_current_device().compute_capability``
    (numba-cuda 0.30, ``CUDADispatcher.compile_device``), which needs a driver. Without one, answer
    with ``cc``, the oldest arch built: the device function stays LLVM IR until it is linked into each
    kernel, and the kernel's own ``cc`` decides its PTX. With a GPU nothing is changed.
    """
    from numba import cuda
    from numba.cuda import dispatcher

    if cuda.is_available():
        return

    class _NoDevice:
        compute_capability = cc

    dispatcher.get_current_device = lambda: _NoDevice


def check_all(archs=ARCHS, jobs=None):
    ptxas = find_ptxas()
    kernels = collect_kernels()
    _type_device_functions_without_gpu(min(archs))
    tasks = [(name, entry, cc) for name, entry in sorted(kernels.items()) for cc in archs]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(jobs or os.cpu_count() or 2) as pool:
        return list(pool.map(lambda t: build(t[0], t[1], t[2], ptxas, tmp), tasks))


def format_table(results, arch="sm_90"):
    rows = [r for r in results if r["arch"] == arch]
    width = max([len("kernel")] + [len(r["kernel"]) for r in rows])
    lines = [f"{'kernel':<{width}}  {'regs':>5}  {'smem B':>7}  {'spill st':>8}  {'spill ld':>8}   ({arch})"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['kernel']:<{width}}  FAILED: {r['error'].splitlines()[0]}")
        elif r.get("device_function"):
            lines.append(f"{r['kernel']:<{width}}  {'device function, inlined into its callers':>35}")
        else:
            lines.append(
                f"{r['kernel']:<{width}}  {r['registers']:>5}  {r['shared_bytes']:>7}  {r['spill_stores']:>8}  {r['spill_loads']:>8}"
            )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m gpu_cnn.compile_check", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--arch", default="sm_90", help="architecture shown in the table (default sm_90)")
    args = ap.parse_args(argv)
    results = check_all()
    print(json.dumps(results, indent=1) if args.json else format_table(results, args.arch))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
