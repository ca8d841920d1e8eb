"""Build every kernel in ``gpu_cnn.kernels`` for real GPUs, without one, and report what the machine
code says: PTX with ``numba.cuda.compile_ptx``, then a cubin with ``ptxas`` from the project's own
install (the ``nvidia-cuda-nvcc-cu12`` wheel), then SASS with ``nvdisasm`` (the ``nvidia-cuda-nvdisasm``
wheel, in the ``dev`` extra; without it the SASS columns say so and the rest still works).

Per kernel, for sm_90 (and sm_80 in the JSON):

- registers, shared bytes, spill stores/loads (``ptxas -v``);
- blocks and warps resident per SM, from registers, shared memory and the block size the kernel's
  registration gives (``_common.kernel(..., block=)``), with the limit that binds (see :func:`occupancy`);
- the instruction mix of the hottest loop of the SASS: FFMA share of all its instructions, shared loads
  (``LDS*``) per FFMA and global loads (``LDG*``) per FFMA. A loop is a backward branch (``BRA`` to a
  label at or before it): its body is the instructions from the label to the branch. The hottest loop is
  the innermost one (containing no other loop) with the most FFMA; a kernel whose innermost loops hold
  no FFMA gets the smallest loop with the most FFMA; a kernel with no loop, the whole kernel (see
  :func:`hot_loop`).

Runs with the CUDA simulator off (``compile_ptx`` does not work under it), so tests call it in a
subprocess: ``python -m gpu_cnn.compile_check --json``; ``gpu-cnn kernels`` prints the table.
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
SASS_ARCH = (9, 0)  # the arch whose SASS is disassembled for the instruction mix

# Per-SM limits for the occupancy figures (CUDA C Programming Guide, "Technical Specifications per
# Compute Capability"; H100/H200 for sm_90, A100 for sm_80). Shared memory: the whole SM's carve-out,
# the most one block may use, and the 1 KB the runtime reserves per block.
SM_LIMITS = {
    "sm_90": dict(regs=65536, smem=228 * 1024, smem_per_block=227 * 1024, smem_reserved=1024, threads=2048, blocks=32,
                  warps=64, reg_alloc_unit=256, smem_alloc_unit=128, max_regs_per_thread=255),
    "sm_80": dict(regs=65536, smem=164 * 1024, smem_per_block=163 * 1024, smem_reserved=1024, threads=2048, blocks=32,
                  warps=64, reg_alloc_unit=256, smem_alloc_unit=128, max_regs_per_thread=255),
}


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


def find_nvdisasm():
    """Path of nvdisasm from the nvidia-cuda-nvdisasm wheel (site-packages/nvidia/cu13/bin), or None."""
    import sysconfig

    roots = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path]
    for root in roots:
        for sub in ("cu13", "cu12", "cuda_nvdisasm"):
            exe = Path(root) / "nvidia" / sub / "bin" / "nvdisasm"
            if exe.is_file():
                return str(exe)
    return None


NVDISASM_MISSING = "nvdisasm not found: pip install nvidia-cuda-nvdisasm (the dev extra) for the SASS columns"


def _round_up(x, unit):
    return (x + unit - 1) // unit * unit


def occupancy(registers, shared_bytes, block, arch="sm_90"):
    """Blocks and warps resident per SM for a kernel using `registers` per thread, `shared_bytes` of
    static shared memory per block and blocks of `block` threads (int or tuple), as the CUDA occupancy
    calculator counts them: registers are allocated per warp in units of 256, shared memory per block in
    units of 128 bytes plus the 1 KB the runtime reserves. Returns a dict with ``blocks_per_sm``,
    ``warps_per_sm``, ``threads_per_block`` and ``limited_by`` (``registers``, ``shared``, ``threads``, ``blocks``,
    joined by ``+`` when several bind), or None when `block` is None."""
    if block is None:
        return None
    lim = SM_LIMITS[arch]
    threads = 1
    for d in (block if isinstance(block, (tuple, list)) else (block,)):
        threads *= int(d)
    warps = (threads + 31) // 32
    regs_per_warp = _round_up(max(registers, 1) * 32, lim["reg_alloc_unit"])
    by = {
        "registers": (lim["regs"] // regs_per_warp) // warps,
        "threads": min(lim["threads"] // threads, lim["warps"] // warps),
        "blocks": lim["blocks"],
    }
    smem = _round_up(shared_bytes + lim["smem_reserved"], lim["smem_alloc_unit"])
    by["shared"] = lim["smem"] // smem if shared_bytes <= lim["smem_per_block"] else 0
    n = min(by.values())
    limited_by = "+".join(k for k in ("registers", "shared", "threads", "blocks") if by[k] == n)  # all that bind
    return dict(threads_per_block=threads, blocks_per_sm=n, warps_per_sm=n * warps, limited_by=limited_by)


# One SASS instruction line of nvdisasm: "        /*0a40*/   @!P1 FFMA R3, R4, R5, R3 ;"
_RE_INSN = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_RE_LABEL = re.compile(r"^(\.L_x_\d+):")
_RE_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_RE_PRED = re.compile(r"^@!?U?P[T0-9]+\s+")


def parse_sass(text):
    """nvdisasm output -> (instructions, labels): instructions a list of (address, opcode, text) in
    order, labels {name: index of the instruction it precedes}."""
    insns, labels, pending = [], {}, []
    for line in text.splitlines():
        m = _RE_LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _RE_INSN.match(line)
        if not m:
            continue
        body = _RE_PRED.sub("", m.group(2).strip())
        if not body:
            continue
        for name in pending:
            labels[name] = len(insns)
        pending = []
        insns.append((int(m.group(1), 16), body.split()[0], body))
    for name in pending:
        labels[name] = len(insns)
    return insns, labels


def _mix(insns):
    ops = [op for _, op, _ in insns]
    ffma = sum(op.startswith("FFMA") for op in ops)
    lds = sum(op.startswith("LDS") for op in ops)
    ldg = sum(op.startswith("LDG") for op in ops)
    return dict(instructions=len(ops), ffma=ffma, lds=lds, ldg=ldg,
                ffma_share=ffma / len(ops) if ops else 0.0,
                lds_per_ffma=lds / ffma if ffma else None, ldg_per_ffma=ldg / ffma if ffma else None)


def hot_loop(text):
    """The instruction mix of the hottest loop in one kernel's SASS (see the module docstring).

    Loops are backward branches: ``BRA`` at index b to a label at index t < b spans [t, b]; branches
    to the same label are one loop (the farthest branch ends it); the ``BRA`` to itself that ends
    every kernel (after its last ``EXIT``) is not a loop. Innermost loops contain no other loop;
    of those the one with the most FFMA (ties: the longer) is the hot loop. When every innermost loop
    has 0 FFMA, the smallest loop with the most FFMA is taken; with no loop at all, the whole kernel.
    Returns the dict of :func:`_mix` plus ``loop`` ("[start, end]" addresses) and ``loops`` (how many).
    """
    insns, labels = parse_sass(text)
    ends = {}
    for i, (_, op, body) in enumerate(insns):
        if op.startswith("BRA"):
            m = _RE_TARGET.search(body)
            # t < i: a branch to itself is the trap nvdisasm shows after the last EXIT, not a loop
            if m and m.group(1) in labels and labels[m.group(1)] < i:
                t = labels[m.group(1)]
                ends[t] = max(ends.get(t, i), i)
    loops = sorted(ends.items())
    if not loops:
        res = _mix(insns)
        res.update(loop="whole kernel (no loop)", loops=0)
        return res

    def contains(a, b):
        return a != b and a[0] <= b[0] and b[1] <= a[1]

    mixes = {lp: _mix(insns[lp[0]: lp[1] + 1]) for lp in loops}
    inner = [lp for lp in loops if not any(contains(lp, other) for other in loops)]
    best = max(inner, key=lambda lp: (mixes[lp]["ffma"], mixes[lp]["instructions"]))
    if mixes[best]["ffma"] == 0:
        top = max(mixes[lp]["ffma"] for lp in loops)
        if top > 0:
            best = min((lp for lp in loops if mixes[lp]["ffma"] == top), key=lambda lp: lp[1] - lp[0])
    res = dict(mixes[best])
    res.update(loop=f"[{insns[best[0]][0]:#06x}, {insns[best[1]][0]:#06x}]", loops=len(loops))
    return res


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


def build(name, entry, cc, ptxas, workdir, block=None, nvdisasm=None):
    """Compile one kernel for one arch. Returns a result dict; 'error' is set on failure."""
    from numba import cuda

    disp, sig, _ = entry
    is_device = bool(disp.targetoptions.get("device"))
    res = {"kernel": name, "arch": f"sm_{cc[0]}{cc[1]}", "signature": sig}
    try:
        # as the kernel's cuda.jit was given them (numba-cuda keeps them in targetoptions)
        bounds = getattr(disp, "launch_bounds", None) or disp.targetoptions.get("launch_bounds")
        ptx, _ = cuda.compile_ptx(disp.py_func, sig, cc=cc, device=is_device, launch_bounds=bounds)
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
    res["block"] = list(block) if isinstance(block, (tuple, list)) else block
    res["occupancy"] = occupancy(res["registers"], res["shared_bytes"], block, res["arch"])
    if tuple(cc) == SASS_ARCH:
        if nvdisasm is None:
            res["sass_error"] = NVDISASM_MISSING
        else:
            dis = subprocess.run([nvdisasm, "-c", str(path.with_suffix(".cubin"))], capture_output=True, text=True)
            if dis.returncode != 0 or "/*" not in dis.stdout:
                res["sass_error"] = f"nvdisasm: {(dis.stderr or dis.stdout).strip()[-500:]}"
            else:
                res["hot_loop"] = hot_loop(dis.stdout)
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


def check_all(archs=ARCHS, jobs=None, only=None):
    """Build every registered kernel (or those whose name contains one of `only`) for `archs`."""
    from gpu_cnn.kernels import _common

    ptxas = find_ptxas()
    nvdisasm = find_nvdisasm()
    kernels = collect_kernels()
    if only:
        kernels = {k: v for k, v in kernels.items() if any(s in k for s in only)}
    _type_device_functions_without_gpu(min(archs))
    blocks = dict(_common.KERNEL_BLOCKS)
    tasks = [(name, entry, cc) for name, entry in sorted(kernels.items()) for cc in archs]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(jobs or os.cpu_count() or 2) as pool:
        return list(pool.map(lambda t: build(t[0], t[1], t[2], ptxas, tmp, blocks.get(t[0]), nvdisasm), tasks))


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def format_table(results, arch="sm_90"):
    rows = [r for r in results if r["arch"] == arch]
    width = max([len("kernel")] + [len(r["kernel"]) for r in rows])
    head = (f"{'kernel':<{width}}  {'regs':>4}  {'smem B':>6}  {'spill st/ld':>11}  {'block':>7}  {'blk/SM':>6}  "
            f"{'warps/SM':>8}  {'limit':>15}  {'FFMA %':>6}  {'LDS/FFMA':>8}  {'LDG/FFMA':>8}  {'loop insns':>10}")
    lines = [head + f"   ({arch}; FFMA, LDS, LDG: hottest loop of the sm_90 SASS)"]
    notes = set()
    for r in rows:
        if "error" in r:
            lines.append(f"{r['kernel']:<{width}}  FAILED: {r['error'].splitlines()[0]}")
            continue
        if r.get("device_function"):
            lines.append(f"{r['kernel']:<{width}}  device function, inlined into its callers")
            continue
        occ = r.get("occupancy")
        blk = r.get("block")
        blk = "-" if blk is None else ("x".join(map(str, blk)) if isinstance(blk, list) else str(blk))
        if occ is None:
            notes.add("blk/SM, warps/SM: '-' where the kernel's registration gives no block= size")
        hl = r.get("hot_loop")
        if r.get("sass_error"):
            notes.add(r["sass_error"])
        lines.append(
            f"{r['kernel']:<{width}}  {r['registers']:>4}  {r['shared_bytes']:>6}  "
            f"{str(r['spill_stores']) + '/' + str(r['spill_loads']):>11}  {blk:>7}  "
            f"{_fmt(occ and occ['blocks_per_sm'], 'd'):>6}  {_fmt(occ and occ['warps_per_sm'], 'd'):>8}  "
            f"{(occ['limited_by'] if occ else '-'):>15}  "
            f"{_fmt(hl and 100 * hl['ffma_share'], '.1f'):>6}  {_fmt(hl and hl['lds_per_ffma'], '.3f'):>8}  "
            f"{_fmt(hl and hl['ldg_per_ffma'], '.3f'):>8}  {_fmt(hl and hl['instructions'], 'd'):>10}"
        )
    lines += [f"note: {n}" for n in sorted(notes)]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m gpu_cnn.compile_check", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--arch", default="sm_90", help="architecture shown in the table (default sm_90)")
    ap.add_argument("--only", action="append", metavar="TEXT",
                    help="only the kernels whose name contains TEXT (repeatable), e.g. --only gemm")
    args = ap.parse_args(argv)
    results = check_all(only=args.only)
    print(json.dumps(results, indent=1) if args.json else format_table(results, args.arch))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
