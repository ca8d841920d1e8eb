"""Launch every kernel, every version, forward and backward, once, on small odd shapes on the real GPU --
the program compute-sanitizer watches:

    compute-sanitizer --tool memcheck  --error-exitcode 3 python -m benchmarks.sanitize
    compute-sanitizer --tool racecheck --error-exitcode 3 python -m benchmarks.sanitize

It runs the correctness pass of ``benchmarks.kernels`` on the ``sanitize`` sweep (shapes past every tile
size, partial tiles, strides and padding; each version once, its result checked against float64),
then the launches that sweep does not make (SGD without momentum, Nesterov, AdamW, conv2d without a
bias), then lists any registered kernel that was never launched. Exit status: 0 when every check passed
and every kernel was launched, 1 otherwise, 2 without a GPU.
"""
import argparse
import importlib
import pkgutil
import sys

import numpy as np


def extra_launches(rng):
    """Kernel paths the benchmark sweep does not take. Returns the number of failed checks."""
    from numba import cuda

    from gpu_cnn.kernels import conv2d, optim

    from . import common as C

    failures = 0

    def report(name, err, tol=1e-4):
        nonlocal failures
        ok = err <= tol
        failures += not ok
        print(f"  {'ok  ' if ok else 'FAIL'} {name:<48} rel err {err:.1e}")

    n = 100003
    p, g, buf = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
    for v in optim.VERSIONS:
        dp = cuda.to_device(p)
        optim.sgd_step(dp, cuda.to_device(g), None, 0.01, momentum=0.0, version=v)
        report(f"optim.sgd_step momentum=0 [{v}]", C.rel_err(dp.copy_to_host() - p, -0.01 * g.astype(np.float64)))
        dp, db = cuda.to_device(p), cuda.to_device(buf)
        optim.sgd_step(dp, cuda.to_device(g), db, 0.01, momentum=0.9, nesterov=True, weight_decay=1e-2,
                       first_step=False, version=v)
        gg = g.astype(np.float64) + 1e-2 * p
        b2 = 0.9 * buf + gg
        report(f"optim.sgd_step nesterov, weight decay [{v}]", C.rel_err(dp.copy_to_host() - p, -0.01 * (gg + 0.9 * b2)))
        dp, dm, dv = cuda.to_device(p), cuda.to_device(np.zeros(n, np.float32)), cuda.to_device(np.zeros(n, np.float32))
        optim.adam_step(dp, cuda.to_device(g), dm, dv, 1, 0.01, weight_decay=1e-2, decoupled=True, version=v)
        ref = C.adam_ref(p * (1 - 0.01 * 1e-2), g, 0.0, 0.0, 1, 0.01)[0]
        report(f"optim.adam_step AdamW [{v}]", C.rel_err(dp.copy_to_host() - p, ref - p))
    x = rng.standard_normal((2, 3, 13, 11)).astype(np.float32)
    w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    ref = C.conv2d_ref(x, w, None, (1, 1), (1, 1))
    for v in conv2d.VERSIONS:
        y = cuda.device_array(ref.shape, np.float32)
        conv2d.conv2d_forward(cuda.to_device(x), cuda.to_device(w), None, y, (1, 1), (1, 1), version=v)
        report(f"conv2d.conv2d_forward without bias [{v}]", C.rel_err(y.copy_to_host(), ref))
    cuda.synchronize()
    return failures


def never_launched():
    """Registered kernels (not device functions) with no compiled overload: never launched."""
    import gpu_cnn.kernels as pkg
    from gpu_cnn.kernels import _common

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")
    missing = []
    for name, (disp, _sig, _mod) in sorted(_common.KERNELS.items()):
        if not hasattr(disp, "overloads"):  # numba-cuda internals moved: cannot tell, so claim nothing
            return None, len(_common.KERNELS)
        if getattr(disp, "targetoptions", {}).get("device"):
            continue
        if not disp.overloads:
            missing.append(name)
    return missing, len(_common.KERNELS)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sanitize", description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", default="sanitize", choices=("sanitize", "tiny"))
    ap.add_argument("--only", default=None, help="comma-separated op families (as benchmarks.kernels --only)")
    args = ap.parse_args(argv)
    import gpu_cnn

    try:
        gpu_cnn.set_backend("cuda")
    except gpu_cnn.BackendError as exc:
        print(f"benchmarks.sanitize: {exc}", file=sys.stderr)
        return 2
    from . import kernels

    kargv = ["--backend", "cuda", "--check", "--sweep", args.sweep, "--no-vendor"]
    if args.only:
        kargv += ["--only", args.only]
    rc = kernels.main(kargv)
    failures = 0
    if not args.only:
        print("launches outside the sweep:")
        failures = extra_launches(np.random.default_rng(1))
    missing, total = never_launched()
    if missing is None:
        print(f"could not tell which of the {total} registered kernels were launched "
              "(this numba-cuda's dispatchers have no .overloads)")
    elif missing and not args.only:
        print(f"NOT LAUNCHED ({len(missing)} of {total} registered): {', '.join(missing)}")
    else:
        print(f"every registered kernel was launched ({total} registered, device functions included)"
              if not missing else f"{len(missing)} kernels not launched (--only given)")
    return 1 if (rc or failures or (missing and not args.only)) else 0


if __name__ == "__main__":
    sys.exit(main())
