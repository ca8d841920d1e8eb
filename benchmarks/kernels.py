"""Kernel benchmarks: every op, every version of it, against the vendor library, with a roofline.

    python -m benchmarks.kernels                      # backend: $GPU_CNN_BACKEND, else cuda if present, else cpu
    python -m benchmarks.kernels --backend cuda       # full sweep on the GPU (cuDNN/cuBLAS via PyTorch if importable)
    python -m benchmarks.kernels --backend cpu --quick
    python -m benchmarks.kernels --only conv2d,gemm --repeats 100
    python -m benchmarks.kernels --backend sim --check # correctness only, tiny shapes (the simulator cannot time)
    gpu-cnn bench --backend cpu --quick                # the same, from the command line tool

Ops (``--only`` takes families -- conv2d, conv2d_relu_pool, relu, bias_relu, maxpool, linear, gemm, softmax_xent, sgd,
adam -- or full op names such as ``conv2d.bwd_weight``):

    conv2d.fwd  conv2d.bwd_input  conv2d.bwd_weight  conv2d.bwd_bias    (cpu backend: conv2d.bwd, all three)
    conv2d_relu_pool.fwd  (the fused conv + bias + ReLU + 2x2 max-pool; vendor: cuDNN conv, then torch's ReLU and pool)
    relu.fwd  relu.bwd  bias_relu.fwd  maxpool.fwd  maxpool.bwd
    linear.fwd  linear.bwd (dx, dw, db)  gemm.nn  gemm.nt  gemm.tn
    softmax_xent.fwd  softmax_xent.bwd  sgd.step (momentum 0.9)  adam.step

Versions come from each kernel module (``VERSIONS`` and friends); the cpu backend has one, ``cpu``
(the vectorized NumPy path of ``gpu_cnn.functional``).

For every (op, shape, version), in this order:

1. correctness: fresh random inputs, outputs poisoned with NaN, one run, compared with a float64
   reference by ‖out − ref‖ / ‖ref‖ (float32 lands far under TOL; TF32 would not). A failing version is
   reported and not timed. The vendor's output is checked the same way (TF32 is switched off).
2. warm-up: every rotation set once (compiles the kernel, lets cuDNN choose its algorithm), then more
   until ~20 ms have run.
3. timing: ``--repeats`` runs (at least 20 on the GPU), each between two CUDA events with the GPU kept busy
   by a spin kernel while Python enqueues the run, rotating among several input/output sets so that
   together they exceed twice the L2 cache where memory allows; the median is reported. On the cpu
   backend each run is timed with ``time.perf_counter``.

Reported per line: ms (median), GFLOP/s = FLOP / time, GB/s = compulsory bytes / time (each input read
once, each output written once), % of the measured roofline min(peak, AI × bandwidth), the vendor's ms,
and speed vs vendor = vendor ms / our ms (1.00 = as fast; 0.50 = twice as slow). The FLOP and byte
formulas are written next to each case below.
"""
import argparse
import inspect
import math
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from . import common as C

TOL = 1e-4  # ‖out − ref‖ / ‖ref‖ for float32 outputs: float32 lands near 1e-6; TF32 (≈3e-4) fails
F4 = 4  # bytes per float32 / int32

FAMILY_MODULE = {"conv2d": "conv2d", "conv2d_relu_pool": "conv2d", "relu": "activation", "bias_relu": "activation", "maxpool": "pool",
                 "linear": "gemm", "gemm": "gemm", "softmax_xent": "softmax", "sgd": "optim", "adam": "optim"}
FAMILIES = tuple(FAMILY_MODULE)


# ---------------------------------------------------------------------------------------------------
# a benchmark case: one op on one shape


class Case:
    """One op on one shape.

    inputs(rng)        -> {name: host array}; float32 (int32 for labels / indices)
    outputs            {name: (shape, dtype)} written by the op (poisoned before the check)
    inplace            names of inputs the op updates in place (checked like outputs)
    reference(inp)     -> {name: float64 expected} (a subset of outputs + inplace)
    extra_check(inp, out) -> None or an error string
    kernel(mod, b, version) runs our kernel dispatcher on device arrays b; versions(mod) lists them
    cpu(b)             runs gpu_cnn.functional on the cpu backend (host arrays b, outputs preallocated)
    vendor(T, t)       -> {name: tensor}: the vendor library (PyTorch) on tensors t; vendor_prepare(T, t)
                       may add derived tensors once per set
    """

    def __init__(self, op, case, params, flop, nbytes, inputs, outputs, reference, kernel=None, versions=None,
                 cpu=None, vendor=None, vendor_prepare=None, vendor_name="torch", inplace=(), extra_check=None,
                 tol=TOL, backends=("cuda", "sim", "cpu")):
        self.op, self.case, self.params = op, case, params
        self.family = op.split(".")[0]
        self.flop, self.bytes = int(flop), int(nbytes)
        self.inputs, self.outputs, self.reference = inputs, outputs, reference
        self.kernel, self.versions, self.cpu = kernel, versions, cpu
        self.vendor, self.vendor_prepare, self.vendor_name = vendor, vendor_prepare, vendor_name
        self.inplace, self.extra_check, self.tol = tuple(inplace), extra_check, tol
        self.backends = backends


def _call(fn, *args, version=None, **kw):
    """Call a dispatcher, passing version= only when it takes one."""
    try:
        takes = "version" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        takes = False
    if takes:
        return fn(*args, version=version, **kw)
    return fn(*args, **kw)


def _versions(mod, names, default):
    """The first of the module attributes `names` that exists, else (default,)."""
    for n in names:
        v = getattr(mod, n, None)
        if v:
            return tuple(v)
    return (default,)


def _randn(rng, shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# --- conv2d: FLOP = 2·N·C_out·H_out·W_out·C_in·kH·kW for the forward, dX and dW each; N·C_out·Ho·Wo for db.
#             bytes = each operand once: x, w, b, y (fwd); dy, w, dx (dX); dy, x, dw (dW); dy, db (db).


def conv_cases(label, n, c, h, w, o, k, s, p, backend):
    ho, wo = C.conv_out_size(h, k, s, p), C.conv_out_size(w, k, s, p)
    xs, ws, ys = (n, c, h, w), (o, c, k, k), (n, o, ho, wo)
    nx, nw, ny = n * c * h * w, o * c * k * k, n * o * ho * wo
    macs = n * o * ho * wo * c * k * k
    st, pd = (s, s), (p, p)
    params = {"x": xs, "w": ws, "y": ys, "stride": s, "padding": p}

    def inp_fwd(rng):
        return {"x": _randn(rng, xs), "w": _randn(rng, ws, 1 / math.sqrt(c * k * k)), "b": _randn(rng, (o,))}

    def inp_bwd(rng):
        d = inp_fwd(rng)
        d["dy"] = _randn(rng, ys)
        return d

    def t_conv_bwd(T, t, mask):
        return T.ops.aten.convolution_backward(t["dy"], t["x"], t["w"], [o], list(st), list(pd), [1, 1], False,
                                               [0, 0], 1, mask)

    cases = [Case(
        "conv2d.fwd", label, params,
        flop=2 * macs,                                   # 2·N·Cout·Ho·Wo·Cin·kH·kW
        nbytes=F4 * (nx + nw + o + ny),                  # x, w, b read; y written
        inputs=inp_fwd, outputs={"y": (ys, np.float32)},
        reference=lambda d: {"y": C.conv2d_ref(d["x"], d["w"], d["b"], st, pd)},
        versions=lambda m: tuple(v for v in m.VERSIONS if v != "tiled" or m.tiled_supported(ws, st)),
        kernel=lambda m, b, v: _call(m.conv2d_forward, b["x"], b["w"], b["b"], b["y"], st, pd, version=v),
        cpu=lambda b: _F().conv2d(b["x"], b["w"], b["b"], stride=s, padding=p, out=b["y"]),
        vendor=lambda T, t: {"y": T.nn.functional.conv2d(t["x"], t["w"], t["b"], stride=s, padding=p)},
        vendor_name="cudnn")]
    if backend == "cpu":  # the public API computes the three gradients at once
        cases.append(Case(
            "conv2d.bwd", label, params,
            flop=4 * macs + ny,                          # dX and dW: 2·macs each; db: N·Cout·Ho·Wo adds
            nbytes=F4 * (ny + nx + nw + nx + nw + o),    # dy, x, w read; dx, dw, db written
            inputs=inp_bwd, outputs={"dx": (xs, np.float32), "dw": (ws, np.float32), "db": ((o,), np.float32)},
            reference=lambda d: {"dx": C.conv2d_backward_input_ref(d["dy"], d["w"], xs, st, pd),
                                 "dw": C.conv2d_backward_weight_ref(d["dy"], d["x"], ws, st, pd),
                                 "db": C.conv2d_backward_bias_ref(d["dy"])},
            cpu=lambda b: _F().conv2d_backward(b["dy"], b["x"], b["w"], stride=s, padding=p,
                                               out=(b["dx"], b["dw"], b["db"])),
            vendor=lambda T, t: dict(zip(("dx", "dw", "db"), t_conv_bwd(T, t, [True, True, True]))),
            vendor_name="cudnn", backends=("cpu",)))
        return cases
    cases += [
        Case("conv2d.bwd_input", label, params,
             flop=2 * macs,                              # 2·N·Cout·Ho·Wo·Cin·kH·kW
             nbytes=F4 * (ny + nw + nx),                 # dy, w read; dx written
             inputs=inp_bwd, outputs={"dx": (xs, np.float32)},
             reference=lambda d: {"dx": C.conv2d_backward_input_ref(d["dy"], d["w"], xs, st, pd)},
             versions=lambda m: _versions(m, ("BACKWARD_INPUT_VERSIONS", "BACKWARD_VERSIONS"), "gather"),
             kernel=lambda m, b, v: _call(m.conv2d_backward_input, b["dy"], b["w"], b["dx"], st, pd, version=v),
             vendor=lambda T, t: {"dx": t_conv_bwd(T, t, [True, False, False])[0]}, vendor_name="cudnn",
             backends=("cuda", "sim")),
        Case("conv2d.bwd_weight", label, params,
             flop=2 * macs,                              # 2·N·Cout·Ho·Wo·Cin·kH·kW
             nbytes=F4 * (ny + nx + nw),                 # dy, x read; dw written
             inputs=inp_bwd, outputs={"dw": (ws, np.float32)},
             reference=lambda d: {"dw": C.conv2d_backward_weight_ref(d["dy"], d["x"], ws, st, pd)},
             versions=lambda m: _versions(m, ("BACKWARD_WEIGHT_VERSIONS", "BACKWARD_VERSIONS"), "blocks"),
             kernel=lambda m, b, v: _call(m.conv2d_backward_weight, b["dy"], b["x"], b["dw"], st, pd, version=v),
             vendor=lambda T, t: {"dw": t_conv_bwd(T, t, [False, True, False])[1]}, vendor_name="cudnn",
             backends=("cuda", "sim")),
        Case("conv2d.bwd_bias", label, params,
             flop=ny,                                    # one add per dy element
             nbytes=F4 * (ny + o),                       # dy read; db written
             inputs=inp_bwd, outputs={"db": ((o,), np.float32)},
             reference=lambda d: {"db": C.conv2d_backward_bias_ref(d["dy"])},
             versions=lambda m: _versions(m, ("BACKWARD_BIAS_VERSIONS",), "blocks"),
             kernel=lambda m, b, v: _call(m.conv2d_backward_bias, b["dy"], b["db"], version=v),
             vendor=lambda T, t: {"db": t_conv_bwd(T, t, [False, False, True])[2]}, vendor_name="cudnn",
             backends=("cuda", "sim")),
    ]
    return cases


# --- fused conv + bias + ReLU + 2x2 max-pool: FLOP = the conv's 2·macs (the ReLU and the pool's compares
#     are not counted); bytes = x, w, b read once, the pooled y and idx (int32) written.


def fused_cases(label, n, c, h, w, o, k, s, p):
    ho, wo = C.conv_out_size(h, k, s, p), C.conv_out_size(w, k, s, p)
    xs, ws, ps = (n, c, h, w), (o, c, k, k), (n, o, ho // 2, wo // 2)
    macs = n * o * ho * wo * c * k * k
    st, pd = (s, s), (p, p)
    params = {"x": xs, "w": ws, "y": ps, "stride": s, "padding": p, "pool": 2}

    def inp(rng):
        return {"x": _randn(rng, xs), "w": _randn(rng, ws, 1 / math.sqrt(c * k * k)), "b": _randn(rng, (o,))}

    def ref(d):
        return C.max_pool2d_ref(C.relu_ref(C.conv2d_ref(d["x"], d["w"], d["b"], st, pd)), (2, 2), (2, 2), (0, 0))

    def check_idx(d, out):  # every idx names a cell of its conv-output plane holding the window's max
        a = C.relu_ref(C.conv2d_ref(d["x"], d["w"], d["b"], st, pd)).reshape(n * o, -1)
        idx = out["idx"].reshape(n * o, -1).astype(np.int64)
        if idx.min() < 0 or idx.max() >= ho * wo:
            return f"idx out of range [{idx.min()}, {idx.max()}]"
        got = np.take_along_axis(a, idx, axis=1)
        bad = int((np.abs(got - ref(d)[0].reshape(n * o, -1)) > 1e-4 * (1 + np.abs(got))).sum())
        return f"{bad} idx do not point at their maximum" if bad else None

    return [Case(
        "conv2d_relu_pool.fwd", label, params,
        flop=2 * macs,                                   # the conv's 2·N·Cout·Ho·Wo·Cin·kH·kW
        nbytes=F4 * (n * c * h * w + o * c * k * k + o + 2 * int(np.prod(ps))),  # x, w, b read; y, idx written
        inputs=inp, outputs={"y": (ps, np.float32), "idx": (ps, np.int32)},
        reference=lambda d: {"y": ref(d)[0]}, extra_check=check_idx,
        versions=lambda m: ("fused",),
        kernel=lambda m, b, v: m.conv2d_relu_maxpool_fused(b["x"], b["w"], b["b"], b["y"], b["idx"], st, pd),
        cpu=lambda b: _F().conv2d_relu_maxpool2d(b["x"], b["w"], b["b"], s, p, out=(b["y"], b["idx"])),
        vendor=lambda T, t: {"y": T.nn.functional.max_pool2d(
            T.relu(T.nn.functional.conv2d(t["x"], t["w"], t["b"], stride=s, padding=p)), 2)},
        vendor_name="cudnn+torch")]


# --- element-wise: relu FLOP = 1 per element (a max), bytes = x read + y written;
#     relu_backward: 1 per element, dy and x read, dx written; bias_relu: 2 per element, x (+ b) read, y written.


def act_cases(label, shape):
    n = int(np.prod(shape))
    ch = shape[1]
    bshape = (1, -1) + (1,) * (len(shape) - 2)
    params = {"x": shape}

    def inp(rng):
        return {"x": _randn(rng, shape), "dy": _randn(rng, shape), "b": _randn(rng, (ch,))}

    def check_straddles(d, out):  # ReLU inputs must straddle zero, or the check proves little
        x = d["x"]
        return None if (x > 0).any() and (x < 0).any() else "inputs do not straddle zero"

    vers = lambda m: tuple(m.VERSIONS)  # noqa: E731
    return [
        Case("relu.fwd", label, params, flop=n, nbytes=F4 * 2 * n,
             inputs=inp, outputs={"y": (shape, np.float32)}, reference=lambda d: {"y": C.relu_ref(d["x"])},
             versions=vers, kernel=lambda m, b, v: _call(m.relu_forward, b["x"], b["y"], version=v),
             cpu=lambda b: _F().relu(b["x"], out=b["y"]), vendor=lambda T, t: {"y": T.relu(t["x"])},
             extra_check=check_straddles),
        Case("relu.bwd", label, params, flop=n, nbytes=F4 * 3 * n,
             inputs=inp, outputs={"dx": (shape, np.float32)},
             reference=lambda d: {"dx": C.relu_backward_ref(d["dy"], d["x"])},
             versions=vers, kernel=lambda m, b, v: _call(m.relu_backward, b["dy"], b["x"], b["dx"], version=v),
             cpu=lambda b: _F().relu_backward(b["dy"], b["x"], out=b["dx"]),
             vendor=lambda T, t: {"dx": T.ops.aten.threshold_backward(t["dy"], t["x"], 0)},
             extra_check=check_straddles),
        Case("bias_relu.fwd", label, params, flop=2 * n, nbytes=F4 * (2 * n + ch),
             inputs=inp, outputs={"y": (shape, np.float32)}, reference=lambda d: {"y": C.bias_relu_ref(d["x"], d["b"])},
             versions=vers, kernel=lambda m, b, v: _call(m.bias_relu, b["x"], b["b"], b["y"], version=v),
             cpu=lambda b: _F().bias_relu(b["x"], b["b"], out=b["y"]),
             vendor=lambda T, t: {"y": T.relu(t["x"] + t["b"].view(*bshape))}),
    ]


# --- max pooling: forward FLOP = one comparison per window cell (N·C·Ho·Wo·kh·kw), bytes = x read, y and
#     idx (int32) written; backward FLOP = one add per dy element, bytes = dy and idx read, dx written.


def pool_cases(label, shape, k, s, p):
    n, c, h, w = shape
    ho, wo = C.conv_out_size(h, k, s, p), C.conv_out_size(w, k, s, p)
    ys = (n, c, ho, wo)
    nx, ny = n * c * h * w, n * c * ho * wo
    kk, ss, pp = (k, k), (s, s), (p, p)
    params = {"x": shape, "y": ys, "kernel_size": k, "stride": s, "padding": p}

    def inp(rng):
        x = _randn(rng, shape)
        _, idx = C.max_pool2d_ref(x, kk, ss, pp)
        return {"x": x, "dy": _randn(rng, ys), "idx": idx.astype(np.int32)}

    def check_idx(d, out):  # every idx points at a cell of its plane holding exactly the max
        idx = out["idx"].reshape(n * c, -1).astype(np.int64)
        if idx.min() < 0 or idx.max() >= h * w:
            return f"idx out of range [{idx.min()}, {idx.max()}]"
        got = np.take_along_axis(d["x"].reshape(n * c, -1), idx, axis=1)
        bad = int((got != out["y"].reshape(n * c, -1)).sum())
        return f"{bad} idx do not point at their maximum" if bad else None

    def t_prep(T, t):
        t["tidx"] = T.ops.aten.max_pool2d_with_indices(t["x"], list(kk), list(ss), list(pp))[1]

    return [
        Case("maxpool.fwd", label, params,
             flop=ny * k * k,                            # one comparison per window cell
             nbytes=F4 * (nx + 2 * ny),                  # x read; y and idx (int32) written
             inputs=inp, outputs={"y": (ys, np.float32), "idx": (ys, np.int32)},
             reference=lambda d: {"y": C.max_pool2d_ref(d["x"], kk, ss, pp)[0]},
             versions=lambda m: _versions(m, ("FORWARD_VERSIONS",), "direct"),
             kernel=lambda m, b, v: _call(m.max_pool2d_forward, b["x"], b["y"], b["idx"], kk, ss, pp, version=v),
             cpu=lambda b: _F().max_pool2d(b["x"], k, s, p, out=(b["y"], b["idx"])),
             vendor=lambda T, t: {"y": T.ops.aten.max_pool2d_with_indices(t["x"], list(kk), list(ss), list(pp))[0]},
             extra_check=check_idx),
        Case("maxpool.bwd", label, params,
             flop=ny,                                    # one add per dy element
             nbytes=F4 * (2 * ny + nx),                  # dy and idx read; dx written
             inputs=inp, outputs={"dx": (shape, np.float32)},
             reference=lambda d: {"dx": C.max_pool2d_backward_ref(d["dy"], d["idx"], shape)},
             versions=lambda m: tuple(m.VERSIONS),
             kernel=lambda m, b, v: _call(m.max_pool2d_backward, b["dy"], b["idx"], b["dx"], kk, ss, pp, version=v),
             cpu=lambda b: _F().max_pool2d_backward(b["dy"], b["idx"], shape, k, s, p, out=b["dx"], check_idx=False),
             vendor_prepare=t_prep,
             vendor=lambda T, t: {"dx": T.ops.aten.max_pool2d_with_indices_backward(
                 t["dy"], t["x"], list(kk), list(ss), list(pp), [1, 1], False, t["tidx"])}),
    ]


# --- dense: linear forward FLOP = 2·N·in·out (+ N·out bias adds), bytes = x, w, b read, y written;
#     backward FLOP = 4·N·in·out (dx and dw) + N·out (db), bytes = dy, x, w read, dx, dw, db written;
#     gemm FLOP = 2·M·N·K, bytes = A and B read, C written.


def linear_cases(label, n, fin, fout):
    xs, ws, ys = (n, fin), (fout, fin), (n, fout)
    params = {"x": xs, "w": ws, "y": ys}

    def inp(rng):
        return {"x": _randn(rng, xs), "w": _randn(rng, ws, 1 / math.sqrt(fin)), "b": _randn(rng, (fout,)),
                "dy": _randn(rng, ys)}

    vers = lambda m: tuple(m.VERSIONS)  # noqa: E731

    def t_bwd(T, t):
        return {"dx": T.mm(t["dy"], t["w"]), "dw": T.mm(t["dy"].t(), t["x"]), "db": t["dy"].sum(0)}

    return [
        Case("linear.fwd", label, params,
             flop=2 * n * fin * fout + n * fout,         # x·wᵀ, then + b
             nbytes=F4 * (n * fin + fout * fin + fout + n * fout),
             inputs=inp, outputs={"y": (ys, np.float32)}, reference=lambda d: {"y": C.linear_ref(d["x"], d["w"], d["b"])},
             versions=vers, kernel=lambda m, b, v: _call(m.linear_forward, b["x"], b["w"], b["b"], b["y"], version=v),
             cpu=lambda b: _F().linear(b["x"], b["w"], b["b"], out=b["y"]),
             vendor=lambda T, t: {"y": T.nn.functional.linear(t["x"], t["w"], t["b"])}, vendor_name="cublas"),
        Case("linear.bwd", label, params,
             flop=4 * n * fin * fout + n * fout,         # dx = dy·w, dw = dyᵀ·x, db = Σ dy
             nbytes=F4 * (n * fout + n * fin + fout * fin + n * fin + fout * fin + fout),
             inputs=inp, outputs={"dx": (xs, np.float32), "dw": (ws, np.float32), "db": ((fout,), np.float32)},
             reference=lambda d: dict(zip(("dx", "dw", "db"), C.linear_backward_ref(d["dy"], d["x"], d["w"]))),
             versions=vers,
             kernel=lambda m, b, v: _call(m.linear_backward, b["dy"], b["x"], b["w"], b["dx"], b["dw"], b["db"], version=v),
             cpu=lambda b: _F().linear_backward(b["dy"], b["x"], b["w"], out=(b["dx"], b["dw"], b["db"])),
             vendor=t_bwd, vendor_name="cublas"),
    ]


def gemm_cases(label, m_, n_, k_, layouts=("nn", "nt")):
    """C = op(A)·op(B) for each layout: "nn", "nt" (B stored transposed: a dense layer's forward x·wᵀ) and
    "tn" (A stored transposed: its weight gradient dyᵀ·x)."""
    cases = []
    for lay in layouts:
        trans_a = lay == "tn"
        trans_b = lay == "nt"
        bs = (n_, k_) if trans_b else (k_, n_)
        as_ = (k_, m_) if trans_a else (m_, k_)
        params = {"a": as_, "b": bs, "c": (m_, n_), "layout": lay}

        def inp(rng, bs=bs, as_=as_):
            return {"a": _randn(rng, as_), "b": _randn(rng, bs)}

        def ref(d, trans_a=trans_a, trans_b=trans_b):
            a, b = C._f64(d["a"]), C._f64(d["b"])
            return {"c": (a.T if trans_a else a) @ (b.T if trans_b else b)}

        def cpu(b, trans_a=trans_a, trans_b=trans_b):
            if trans_b:  # the project's dense layer: y = x·wᵀ
                _F().linear(b["a"], b["b"], out=b["c"])
            else:
                np.matmul(b["a"].T if trans_a else b["a"], b["b"], out=b["c"])

        cases.append(Case(
            f"gemm.{lay}", label, params,
            flop=2 * m_ * n_ * k_,                       # 2·M·N·K
            nbytes=F4 * (m_ * k_ + k_ * n_ + m_ * n_),   # A, B read; C written
            inputs=inp, outputs={"c": ((m_, n_), np.float32)}, reference=ref,
            versions=lambda m: tuple(m.VERSIONS),
            kernel=lambda m, b, v, trans_a=trans_a, trans_b=trans_b: _call(m.gemm, b["a"], b["b"], b["c"], trans_a,
                                                                          trans_b, version=v),
            cpu=cpu,
            vendor=lambda T, t, trans_a=trans_a, trans_b=trans_b: {
                "c": T.mm(t["a"].t() if trans_a else t["a"], t["b"].t() if trans_b else t["b"])},
            vendor_name="cublas"))
    return cases


# --- softmax + cross-entropy: forward FLOP ≈ 4 per logit (max, sub, exp, sum) + the division; bytes =
#     logits and labels read, probs, per-row losses and the mean written. Backward FLOP = 2 per logit,
#     bytes = probs and labels read, dlogits written.


def softmax_cases(label, n, c):
    params = {"logits": (n, c)}

    def inp(rng):
        z = _randn(rng, (n, c), 3.0)
        labels = rng.integers(0, c, n).astype(np.int32)
        _, probs, _ = C.softmax_xent_ref(z, labels)
        return {"logits": z, "labels": labels, "probs": probs.astype(np.float32)}

    def ref_fwd(d):
        loss, probs, rows = C.softmax_xent_ref(d["logits"], d["labels"])
        return {"probs_out": probs, "loss_buf": np.concatenate([rows, [loss]]), "loss": np.array([loss])}

    def t_fwd(T, t):
        lp = T.log_softmax(t["logits"], 1)
        return {"loss": T.nn.functional.nll_loss(lp, t["tlabels"]).reshape(1), "probs_out": lp.exp()}

    def t_prep(T, t):
        t["tlabels"] = t["labels"].long()
        z = t["logits"].detach().clone().requires_grad_(True)
        t["z"] = z
        t["graph_loss"] = T.nn.functional.cross_entropy(z, t["tlabels"])

    def t_bwd(T, t):  # what autograd runs: nll_loss_backward + log_softmax_backward
        return {"dlogits": T.autograd.grad(t["graph_loss"], t["z"], retain_graph=True)[0]}

    def kernel_fwd(m, b, v):  # per-row losses and their mean in one (N + 1,) buffer, as the op layer keeps them
        buf = b["loss_buf"]
        _call(m.softmax_cross_entropy_forward, b["logits"], b["labels"], b["probs_out"], buf[:n], buf[n:], version=v)

    return [
        Case("softmax_xent.fwd", label, params,
             flop=5 * n * c,                             # max, subtract, exp, sum, divide per logit
             nbytes=F4 * (n * c + n + n * c + n + 1),    # logits, labels read; probs, row losses, mean written
             inputs=inp, outputs={"probs_out": ((n, c), np.float32), "loss_buf": ((n + 1,), np.float32)},
             reference=ref_fwd, versions=lambda m: tuple(m.VERSIONS), kernel=kernel_fwd,
             cpu=lambda b: _F().softmax_cross_entropy(b["logits"], b["labels"], out=(b["probs_out"], b["loss_buf"])),
             vendor_prepare=t_prep, vendor=t_fwd),
        Case("softmax_xent.bwd", label, params,
             flop=2 * n * c,                             # subtract the one-hot, divide by N
             nbytes=F4 * (n * c + n + n * c),            # probs, labels read; dlogits written
             inputs=inp, outputs={"dlogits": ((n, c), np.float32)},
             reference=lambda d: {"dlogits": C.softmax_xent_backward_ref(d["probs"], d["labels"])},
             versions=lambda m: _versions(m, ("BACKWARD_VERSIONS",), "elementwise"),
             kernel=lambda m, b, v: _call(m.softmax_cross_entropy_backward, b["probs"], b["labels"], b["dlogits"], version=v),
             cpu=lambda b: _F().softmax_cross_entropy_backward(b["probs"], b["labels"], out=b["dlogits"]),
             vendor_prepare=t_prep, vendor=t_bwd),
    ]


# --- optimizers (element-wise, in place): SGD with momentum FLOP ≈ 4 per element, bytes = p, g, buf read,
#     p, buf written (5 × 4 per element); Adam FLOP ≈ 12 per element, bytes = p, g, m, v read, p, m, v
#     written (7 × 4 per element).

LR = 1e-2  # large enough that the update, checked as new − old, is far above float32 rounding of p
MOMENTUM = 0.9


def optim_cases(label, numel):
    shape = (numel,)
    params = {"p": shape}

    def inp(rng):
        return {"p": _randn(rng, shape), "g": _randn(rng, shape), "buf": _randn(rng, shape),
                "m": _randn(rng, shape, 0.1), "v": np.abs(_randn(rng, shape, 0.01))}

    def sgd_cpu_factory(b):
        from gpu_cnn.optim import SGD

        opt = SGD([(b["p"], b["g"])], lr=LR, momentum=MOMENTUM)
        return opt.step

    def adam_cpu_factory(b):
        from gpu_cnn.optim import Adam

        opt = Adam([(b["p"], b["g"])], lr=LR)
        return opt.step

    def t_sgd_prep(T, t):
        t["p"].requires_grad_(True)
        t["p"].grad = t["g"]
        t["opt"] = T.optim.SGD([t["p"]], lr=LR, momentum=MOMENTUM)

    def t_adam_prep(T, t):
        t["p"].requires_grad_(True)
        t["p"].grad = t["g"]
        t["opt"] = T.optim.Adam([t["p"]], lr=LR, **({"fused": True} if t["p"].is_cuda else {}))

    def t_step(T, t):
        with T.no_grad():
            t["opt"].step()
        return {"p": t["p"]}

    sgd = Case("sgd.step", label, params,
               flop=4 * numel,                           # buf = m·buf + g; p -= lr·buf
               nbytes=F4 * 5 * numel,                    # p, g, buf read; p, buf written
               inputs=inp, outputs={}, inplace=("p", "buf"),
               reference=lambda d: dict(zip(("p", "buf"), C.sgd_momentum_ref(d["p"], d["g"], d["buf"], LR, MOMENTUM, True))),
               versions=lambda m: tuple(m.VERSIONS),
               kernel=lambda m, b, v: _call(m.sgd_step, b["p"], b["g"], b["buf"], LR, MOMENTUM, first_step=b.get("_first", False),
                                            version=v),
               cpu=sgd_cpu_factory, vendor_prepare=t_sgd_prep, vendor=t_step)
    adam = Case("adam.step", label, params,
                flop=12 * numel,                         # moments, bias corrections, sqrt, divide, update
                nbytes=F4 * 7 * numel,                   # p, g, m, v read; p, m, v written
                inputs=inp, outputs={}, inplace=("p", "m", "v"),
                reference=lambda d: dict(zip(("p", "m", "v"), C.adam_ref(d["p"], d["g"], d["m"], d["v"], 1, LR))),
                versions=lambda m: tuple(m.VERSIONS),
                kernel=lambda m, b, v: _call(m.adam_step, b["p"], b["g"], b["m"], b["v"], 1, LR, version=v),
                cpu=adam_cpu_factory, vendor_prepare=t_adam_prep, vendor=t_step)
    # gpu_cnn.optim and torch.optim own their state, fresh at the first step (SGD: buf = g; Adam: m = v = 0),
    # so their check compares p with that; the kernels take the state as arguments and are checked with it.
    sgd.cpu_factory = adam.cpu_factory = True
    sgd.fresh_reference = lambda d: {"p": C.sgd_momentum_ref(d["p"], d["g"], None, LR, MOMENTUM, True)[0]}
    adam.fresh_reference = lambda d: {"p": C.adam_ref(d["p"], d["g"], 0.0, 0.0, 1, LR)[0]}
    return [sgd, adam]


def _F():
    from gpu_cnn import functional

    return functional


# ---------------------------------------------------------------------------------------------------
# the sweeps

LENET_PARAMS = 6 * 1 * 25 + 6 + 16 * 6 * 25 + 16 + 400 * 120 + 120 + 120 * 84 + 84 + 84 * 10 + 10  # 61,706


def build_cases(sweep, backend):
    cases = []
    if sweep == "tiny":  # odd shapes, a few thousand threads per launch: fast under the simulator
        # (dW runs one block per weight element, with barriers: the slow one under the simulator)
        cases += conv_cases("tiny.k3s2p1", 2, 2, 7, 7, 2, 3, 2, 1, backend)
        cases += fused_cases("tiny.k3p1", 1, 2, 7, 5, 3, 3, 1, 1)
        cases += act_cases("tiny", (2, 3, 7, 9))
        cases += pool_cases("tiny.k2", (2, 3, 7, 9), 2, 2, 0)
        cases += pool_cases("tiny.k3s2p1", (1, 2, 9, 9), 3, 2, 1)
        cases += linear_cases("tiny", 5, 13, 7)
        cases += gemm_cases("tiny", 19, 23, 13, layouts=("nn",))  # linear.* already run the nt and tn products
        cases += softmax_cases("tiny", 5, 7)
        cases += optim_cases("tiny", 103)
        return [c for c in cases if backend in c.backends]
    if sweep == "sanitize":  # real GPU, compute-sanitizer: odd shapes larger than every tile, partial tiles
        cases += conv_cases("odd.k3p1", 3, 5, 19, 23, 7, 3, 1, 1, backend)
        cases += conv_cases("odd.k5s2p2", 2, 3, 21, 17, 4, 5, 2, 2, backend)
        cases += conv_cases("odd.k7", 1, 2, 37, 35, 3, 7, 1, 0, backend)
        cases += fused_cases("odd.k5p2", 3, 5, 19, 23, 7, 5, 1, 2)
        cases += act_cases("odd", (3, 5, 19, 23))
        cases += pool_cases("odd.k2", (3, 5, 19, 23), 2, 2, 0)
        cases += pool_cases("odd.k3s2p1", (2, 3, 21, 17), 3, 2, 1)
        cases += linear_cases("odd", 37, 131, 67)
        cases += gemm_cases("odd", 131, 67, 45)
        cases += softmax_cases("odd", 37, 1001)
        cases += optim_cases("odd", 100003)
        return [c for c in cases if backend in c.backends]
    quick = sweep == "quick"
    B = 128
    cases += conv_cases("lenet.conv1", B, 1, 28, 28, 6, 5, 1, 2, backend)
    cases += conv_cases("lenet.conv2", B, 6, 14, 14, 16, 5, 1, 0, backend)
    cases += conv_cases("cifar.conv", B, 3, 32, 32, 64, 3, 1, 1, backend)
    cases += fused_cases("lenet.conv1", B, 1, 28, 28, 6, 5, 1, 2)
    cases += fused_cases("lenet.conv2", B, 6, 14, 14, 16, 5, 1, 0)
    if not quick:
        cases += conv_cases("resnet.conv", 32, 64, 56, 56, 64, 3, 1, 1, backend)
        cases += conv_cases("mid.conv", 64, 64, 56, 56, 64, 3, 1, 1, backend)  # issue 11's mid-size layer
    cases += act_cases("lenet.conv1", (B, 6, 28, 28))
    cases += act_cases("lenet.conv2", (B, 16, 10, 10))
    cases += act_cases("cifar.conv", (B, 64, 32, 32))
    if not quick:
        cases += act_cases("resnet.conv", (32, 64, 56, 56))
    cases += pool_cases("lenet.pool1", (B, 6, 28, 28), 2, 2, 0)
    cases += pool_cases("lenet.pool2", (B, 16, 10, 10), 2, 2, 0)
    cases += pool_cases("cifar.pool", (B, 64, 32, 32), 2, 2, 0)
    if not quick:
        cases += pool_cases("resnet.pool", (32, 64, 56, 56), 2, 2, 0)
    cases += linear_cases("lenet.fc1", B, 400, 120)
    cases += linear_cases("lenet.fc2", B, 120, 84)
    cases += linear_cases("lenet.fc3", B, 84, 10)
    # the dense layers' three products one by one (batch 128): forward x·wᵀ (nt), dx = dy·w (nn),
    # dw = dyᵀ·x (tn): where split_k_ticket is the dispatcher's pick
    for name, fin, fout in (("fc1", 400, 120), ("fc2", 120, 84), ("fc3", 84, 10)):
        cases += gemm_cases(f"lenet.{name}.fwd", B, fout, fin, layouts=("nt",))
        cases += gemm_cases(f"lenet.{name}.dx", B, fin, fout, layouts=("nn",))
        cases += gemm_cases(f"lenet.{name}.dw", fout, fin, B, layouts=("tn",))
    cases += gemm_cases("gemm1024", 1024, 1024, 1024, layouts=("nt",) if quick else ("nn", "nt"))
    if not quick:
        cases += gemm_cases("gemm4096", 4096, 4096, 4096)
    cases += softmax_cases("lenet", B, 10)
    if not quick:
        cases += softmax_cases("b128.c1000", B, 1000)
        cases += softmax_cases("b4096.c1000", 4096, 1000)
    cases += optim_cases("lenet", LENET_PARAMS)
    if not quick:
        cases += optim_cases("16M", 1 << 24)
    return [c for c in cases if backend in c.backends]


def select(cases, only):
    if not only:
        return cases
    want = [w.strip() for w in only.split(",") if w.strip()]
    unknown = [w for w in want if w not in FAMILIES and not any(c.op == w for c in cases)]
    if unknown:
        raise SystemExit(f"--only: unknown op(s) {', '.join(unknown)}; families: {', '.join(FAMILIES)}")
    return [c for c in cases if c.family in want or c.op in want]


# ---------------------------------------------------------------------------------------------------
# running one case on one backend


class Backend:
    """Arrays and runs for one backend: 'cuda' and 'sim' run the kernel dispatchers on device arrays,
    'cpu' runs gpu_cnn.functional on host arrays."""

    def __init__(self, name):
        self.name = name
        self.kernels = name in ("cuda", "sim")
        if self.kernels:
            from numba import cuda

            self.cuda = cuda
        self._mods = {}

    def module(self, family):
        import importlib

        mod = FAMILY_MODULE[family]
        if mod not in self._mods:
            self._mods[mod] = importlib.import_module(f"gpu_cnn.kernels.{mod}")
        return self._mods[mod]

    def versions(self, case):
        if not self.kernels:
            return ("cpu",)
        return tuple(case.versions(self.module(case.family)))

    def to_dev(self, a):
        return self.cuda.to_device(np.ascontiguousarray(a)) if self.kernels else np.array(a, copy=True)

    def empty(self, shape, dtype, poison):
        if self.kernels:
            if poison:
                return self.cuda.to_device(np.full(shape, np.nan if dtype == np.float32 else -7, dtype))
            return self.cuda.device_array(shape, dtype)
        return np.full(shape, np.nan if dtype == np.float32 else -7, dtype) if poison else np.empty(shape, dtype)

    def host(self, a):
        return a.copy_to_host() if self.kernels else np.array(a)

    def buffers(self, case, inp, poison):
        b = {k: self.to_dev(v) for k, v in inp.items()}
        for k, (shape, dtype) in case.outputs.items():
            b[k] = self.empty(shape, dtype, poison)
        return b

    def runner(self, case, version, b, first_step=False):
        """A no-argument callable running the case once on buffers b."""
        if self.kernels:
            mod = self.module(case.family)
            if first_step:
                b["_first"] = True
            return lambda: case.kernel(mod, b, version)
        if getattr(case, "cpu_factory", False):
            return case.cpu(b)
        return lambda: case.cpu(b)

    def sync(self):
        if self.kernels:
            self.cuda.synchronize()


def _compare(case, ref, out, inp):
    """{name: rel err} over the reference entries the run produced; at least one must be compared.

    Arrays updated in place (optimizer parameters and state) are compared by their change, new − old:
    a small update to a large parameter would otherwise pass whatever the update was."""
    errs = {}
    for k, r in ref.items():
        if k not in out:
            continue
        o = np.asarray(out[k], np.float64).reshape(np.shape(r))
        if k in case.inplace:
            old = np.asarray(inp[k], np.float64)
            o, r = o - old, np.asarray(r, np.float64) - old
        errs[k] = C.rel_err(o, r)
    if not errs:
        raise RuntimeError(f"nothing to compare: reference has {sorted(ref)}, the run gave {sorted(out)}")
    return errs


def _verdict(case, errs, msg=None):
    bad = {k: e for k, e in errs.items() if not e <= case.tol}
    if bad or msg:
        parts = [f"{k}: rel err {e:.2e} > {case.tol:.0e}" for k, e in bad.items()]
        raise CheckFailed("; ".join(parts + ([msg] if msg else [])), errs)
    return errs


def check_version(be, case, version, rng):
    """Run once on fresh inputs with poisoned outputs; return {name: rel err}, or raise CheckFailed."""
    inp = case.inputs(rng)
    b = be.buffers(case, inp, poison=True)
    be.runner(case, version, b, first_step=True)()
    be.sync()
    fresh = getattr(case, "cpu_factory", False) and not be.kernels
    ref = case.fresh_reference(inp) if fresh else case.reference(inp)
    out = {k: be.host(b[k]) for k in list(case.outputs) + list(case.inplace)}
    errs = _compare(case, ref, out, inp)
    msg = case.extra_check(inp, out) if case.extra_check else None
    return _verdict(case, errs, msg)


def check_vendor(T, dev, case, rng):
    inp = case.inputs(rng)
    t = _torch_set(T, dev, inp, case)
    out = case.vendor(T, t)
    ref = case.fresh_reference(inp) if hasattr(case, "fresh_reference") else case.reference(inp)
    out = {k: v.detach().cpu().double().numpy() for k, v in out.items()}
    return _verdict(case, _compare(case, ref, out, inp))


class CheckFailed(RuntimeError):
    def __init__(self, msg, errs):
        super().__init__(msg)
        self.errs = errs


def _torch_set(T, dev, inp, case):
    t = {}
    for k, v in inp.items():
        t[k] = T.from_numpy(np.ascontiguousarray(v)).to(dev) if dev != "cpu" else T.from_numpy(np.array(v))
    if case.vendor_prepare:
        case.vendor_prepare(T, t)
    return t


# ---------------------------------------------------------------------------------------------------
# the run


PROG = "python -m benchmarks.kernels"


def parse_args(argv, prog=PROG, out_default="benchmarks/results/<device>-<date>/"):
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=("cuda", "cpu", "sim"), default=None,
                    help="default: $GPU_CNN_BACKEND, else cuda when a GPU is present, else cpu")
    ap.add_argument("--quick", action="store_true", help="a reduced sweep (LeNet-5 layers, CIFAR conv, 1024³ GEMM)")
    ap.add_argument("--sweep", choices=("full", "quick", "tiny", "sanitize"), default=None,
                    help="full (default), quick (= --quick), tiny (odd shapes for tests and the simulator) or sanitize "
                         "(odd shapes past every tile size, for compute-sanitizer)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per configuration (default 50 on cuda, 20 on cpu)")
    ap.add_argument("--out", default=None, help=f"output folder (default {out_default})")
    ap.add_argument("--only", default=None, help="comma-separated op families or op names")
    ap.add_argument("--check", action="store_true", help="correctness only: no timing, no files (tiny shapes under sim)")
    ap.add_argument("--no-vendor", action="store_true", help="skip PyTorch/CuPy (cuDNN, cuBLAS) comparisons")
    ap.add_argument("--no-ceilings", action="store_true", help="skip measuring the roofline ceilings and launch overhead")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.sweep is None:
        args.sweep = "quick" if args.quick else "full"
    if args.repeats is not None and args.repeats < 1:
        ap.error("--repeats: expected a positive int")
    return args


def main(argv=None, prog=PROG, results_root=None):
    """The benchmark; `prog` names it in --help, `results_root` replaces benchmarks/results/ as the root
    of the default output folder (``gpu-cnn bench`` writes under runs/bench/, not into the checkout)."""
    out_default = f"{results_root or 'benchmarks/results'}/<device>-<date>/"
    args, argv, backend = C.start(prog, lambda a: parse_args(a, prog, out_default), argv)
    if backend is None:
        return 2
    args.results_root = results_root
    if backend == "sim" and "--sweep" not in " ".join(argv):
        args.sweep = "tiny"  # the simulator runs Python threads: only tiny shapes are practical
    if args.repeats is None:
        args.repeats = 50 if backend == "cuda" else 20
    if backend == "cuda" and args.sweep != "tiny" and args.repeats < 20:
        print(f"--repeats {args.repeats}: raised to 20 (medians of fewer GPU runs are noise)")
        args.repeats = 20
    cases = select(build_cases(args.sweep, backend), args.only)
    if args.check:
        return run_check(backend, cases, args)
    return run_bench(backend, cases, args, argv)


def run_check(backend, cases, args):
    """Correctness of every version of every case (and of the vendor where importable); no timing."""
    be = Backend(backend)
    rng = np.random.default_rng(args.seed)
    T = None if (args.no_vendor or backend == "sim") else C.import_torch(backend)
    dev = "cuda" if backend == "cuda" else "cpu"
    failures = 0
    print(f"correctness pass on backend {backend!r}, sweep {args.sweep!r}, tolerance {TOL:.0e} (‖out − ref‖ / ‖ref‖)")
    for case in cases:
        try:
            versions = be.versions(case)
        except Exception as exc:
            failures += 1
            print(f"  FAIL {case.op:<18} {case.case:<14} versions: {type(exc).__name__}: {exc}")
            continue
        for v in versions:
            t0 = time.perf_counter()
            try:
                errs = check_version(be, case, v, rng)
                worst = max(errs.values()) if errs else 0.0
                print(f"  ok   {case.op:<18} {case.case:<14} {v:<15} max rel err {worst:.1e}  ({time.perf_counter() - t0:.1f} s)")
            except Exception as exc:
                failures += 1
                print(f"  FAIL {case.op:<18} {case.case:<14} {v:<15} {type(exc).__name__}: {exc}")
        if T is not None and case.vendor is not None:
            try:
                errs = check_vendor(T, dev, case, rng)
                print(f"  ok   {case.op:<18} {case.case:<14} {'vendor':<15} max rel err {max(errs.values()):.1e}")
            except Exception as exc:
                failures += 1
                print(f"  FAIL {case.op:<18} {case.case:<14} {'vendor':<15} {type(exc).__name__}: {exc}")
    print(f"{'all checks passed' if not failures else f'{failures} check(s) FAILED'}")
    return 1 if failures else 0


HEADER = (f"{'op':<18} {'case':<14} {'version':<15} {'ms':>9} {'GFLOP/s':>9} {'GB/s':>8} {'%roof':>6} "
          f"{'vendor ms':>9} {'vs vendor':>9} {'rel err':>8}")


def _line(r):
    return (f"{r['op']:<18} {r['case']:<14} {r['version']:<15} {C.fmt(r.get('ms'), '9.4f'):>9} "
            f"{C.num(r.get('gflops')):>9} {C.num(r.get('gbps')):>8} {C.num(r.get('roofline_pct')):>6} "
            f"{C.fmt(r.get('vendor_ms'), '9.4f'):>9} {C.fmt(r.get('vs_vendor'), '9.2f'):>9} {C.fmt(r.get('rel_err'), '8.1e'):>8}")


def _time(timer, backend, fns, repeats, min_runs):
    """Warm-up, then repeats timed runs (adaptive on cpu: about 3 s per configuration at most)."""
    for f in fns:  # every set once: compiles, and lets cuDNN pick its algorithm
        f()
    timer.sync()
    t0 = time.perf_counter()  # then at least one more run, and more until ~20 ms have run
    warm = 0
    while warm == 0 or (time.perf_counter() - t0 < 0.02 and warm < 50):
        fns[warm % len(fns)]()
        warm += 1
    timer.sync()
    per_run = (time.perf_counter() - t0) / warm
    if backend == "cpu":
        repeats = int(max(min_runs, min(repeats, 3.0 / max(per_run, 1e-6))))
    host_us = timer.host_us(fns[0]) if backend == "cuda" else None
    if backend == "cuda":
        times = timer.measure(fns, repeats, spin_us=max(50.0, 2 * host_us + 30.0))
        loop = timer.loop_ms(fns, int(min(200, max(10, 0.05 / max(per_run, 1e-6)))))
    else:
        times = timer.measure(fns, repeats)
        loop = None
    res = C.summarize(times)
    res["host_us_per_call"] = host_us
    res["loop_ms_per_call"] = loop
    return res


def _derive(r, ceil):
    ms = r.get("ms")
    if not ms:
        return r
    r["gflops"] = r["flop"] / (ms * 1e-3) / 1e9
    r["gbps"] = r["bytes"] / (ms * 1e-3) / 1e9
    r["ai"] = r["flop"] / r["bytes"] if r["bytes"] else None
    bw, peak = ceil.get("bandwidth_GBps"), ceil.get("compute_GFLOPs")
    if bw and peak and r["ai"]:
        r["roofline_GFLOPs"] = min(peak, r["ai"] * bw)
        r["roofline_pct"] = 100.0 * r["gflops"] / r["roofline_GFLOPs"]
    return r


def run_bench(backend, cases, args, argv):
    info = C.device_info(backend)
    out_dir = Path(args.out) if args.out else C.default_out_dir(info)
    if not args.out and getattr(args, "results_root", None):
        out_dir = Path(args.results_root) / out_dir.name
    record = C.base_record("kernels", backend, info, args, argv)
    be = Backend(backend)
    timer = C.CudaTimer() if backend == "cuda" else C.CpuTimer()
    record["timer"] = timer.kind
    T = None if args.no_vendor else C.import_torch(backend)
    cupy = None if (args.no_vendor or backend != "cuda") else C.import_cupy()
    dev = "cuda" if backend == "cuda" else "cpu"
    if T is not None:
        record["vendor"] = {"library": "torch", "torch": T.__version__, "tf32": False,
                            "cudnn": (T.backends.cudnn.version() if backend == "cuda" else None),
                            "cudnn_benchmark": bool(T.backends.cudnn.benchmark) if backend == "cuda" else None,
                            "threads": T.get_num_threads()}
        if backend == "cuda":
            record["vendor"]["torch_stream_is_legacy_default"] = T.cuda.current_stream().cuda_stream == 0
    else:
        record["vendor"] = None
    print(f"benchmarks.kernels: backend {backend}, device {info.get('name')}, sweep {args.sweep}, "
          f"repeats {args.repeats}, timer {timer.kind}, vendor {'torch ' + T.__version__ if T is not None else 'none'}")

    print(f"{len(cases)} cases; results go to {out_dir}", flush=True)
    ceil = {}
    if not args.no_ceilings:
        print("measuring the roofline ceilings and the launch overhead ...", flush=True)
        try:
            ceil = (C.gpu_ceilings(timer, T, cupy, quick=args.sweep != "full") if backend == "cuda"
                    else C.cpu_ceilings(quick=args.sweep != "full"))
            record["launch_overhead_us"] = (C.launch_overhead_gpu(T, cupy) if backend == "cuda"
                                            else C.launch_overhead_cpu(T))
        except Exception as exc:
            record.setdefault("errors", []).append(f"ceilings: {type(exc).__name__}: {exc}")
            traceback.print_exc()
        print("ceilings: " + ", ".join(f"{k} {v:,.1f}" for k, v in ceil.items() if isinstance(v, float)))
        if record.get("launch_overhead_us"):
            print("launch overhead (µs per call): " + ", ".join(
                f"{k} {v:.2f}" for k, v in record["launch_overhead_us"].items() if isinstance(v, float)))
    record["ceilings"] = ceil

    rng = np.random.default_rng(args.seed)
    cache = info.get("cache_bytes") or 50 << 20
    ctx = {"be": be, "timer": timer, "T": T, "dev": dev, "rng": rng, "cache": cache, "ceil": ceil, "args": args,
           "backend": backend, "limits": (16, 2 << 30) if backend == "cuda" else (8, 512 << 20),
           "errors": record.setdefault("errors", [])}
    rows = []
    record["results"] = rows
    print()
    print(HEADER)
    # a stage timeout (SIGTERM) or ^C still leaves the cases done so far on disk, with their plots
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if hasattr(signal, "SIGTERM") else None
    try:
        for i, case in enumerate(cases):
            rows += bench_case(case, ctx)
            record["cases_done"] = f"{i + 1} of {len(cases)}"
            print(f"  [{i + 1}/{len(cases)} cases done]", file=sys.stderr, flush=True)
            C.write_json(Path(out_dir) / "kernels.json", record)  # partial results survive a timeout
    except KeyboardInterrupt:
        record["interrupted"] = f"stopped after {record.get('cases_done', '0 of ' + str(len(cases)))} cases"
        print(f"\ninterrupted: {record['interrupted']}; writing what was measured")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    record["failed_checks"] = sum(1 for r in rows if str(r.get("error", "")).startswith("check failed"))
    write_outputs(out_dir, record, rows, ceil, info, backend)
    return 1 if (record["failed_checks"] or record.get("interrupted")) else 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def bench_case(case, ctx):
    """Check and time every version of one case, and the vendor; returns the result rows."""
    be, timer, T, dev, rng, ceil, args = (ctx[k] for k in ("be", "timer", "T", "dev", "rng", "ceil", "args"))
    backend, errors = ctx["backend"], ctx["errors"]
    set_bytes = case.bytes + sum(int(np.prod(s)) * F4 for s, _ in case.outputs.values())
    nsets = C.sets_for(set_bytes, ctx["cache"], *ctx["limits"])
    base = {"op": case.op, "case": case.case, "shape": case.params, "flop": case.flop, "bytes": case.bytes,
            "sets": nsets, "footprint_bytes": nsets * set_bytes, "cache_bytes": ctx["cache"]}
    try:
        versions = be.versions(case)
        hosts = [case.inputs(rng) for _ in range(nsets)]
        sets = [be.buffers(case, h, poison=False) for h in hosts]
    except Exception as exc:
        errors.append(f"{case.op} {case.case}: setup: {type(exc).__name__}: {exc}")
        print(f"{case.op:<18} {case.case:<14} setup failed: {type(exc).__name__}: {exc}")
        return [dict(base, version="—", impl="gpu_cnn", error=f"setup failed: {type(exc).__name__}: {exc}")]
    vendor = None
    if T is not None and case.vendor is not None:
        vendor = dict(base, version=case.vendor_name if backend == "cuda" else "torch-cpu", impl="vendor")
        try:
            try:
                vendor["rel_err"] = max(check_vendor(T, dev, case, rng).values())
            except CheckFailed as exc:  # e.g. an FFT/Winograd algorithm picked by cudnn.benchmark: report, still time
                vendor["rel_err"] = max(exc.errs.values(), default=math.inf)
                vendor["note"] = f"vendor result off the float64 reference ({exc}); timed anyway"
            tsets = [_torch_set(T, dev, h, case) for h in hosts]
            vendor.update(_time(timer, backend, [(lambda t=t: case.vendor(T, t)) for t in tsets],
                                args.repeats, min_runs=5))
            del tsets
        except Exception as exc:
            vendor["error"] = f"{type(exc).__name__}: {exc}"
            errors.append(f"{case.op} {case.case} vendor: {vendor['error']}")
        _derive(vendor, ceil)
    rows = []
    for v in versions:
        r = dict(base, version=v, impl="gpu_cnn")
        try:
            r["rel_err"] = max(check_version(be, case, v, rng).values() or [0.0])
        except Exception as exc:
            r["error"] = f"check failed: {type(exc).__name__}: {exc}"
            r["rel_err"] = max(getattr(exc, "errs", {}).values() or [math.inf])
            errors.append(f"{case.op} {case.case} {v}: {r['error']}")
            rows.append(r)
            print(f"{case.op:<18} {case.case:<14} {v:<15} {r['error']}")
            continue
        try:
            fns = [be.runner(case, v, b) for b in sets]
            r.update(_time(timer, backend, fns, args.repeats, min_runs=10 if args.sweep != "tiny" else 2))
        except Exception as exc:
            r["error"] = f"timing failed: {type(exc).__name__}: {exc}"
            errors.append(f"{case.op} {case.case} {v}: {r['error']}")
        _derive(r, ceil)
        if vendor is not None and vendor.get("ms") and r.get("ms"):
            r["vendor_ms"] = vendor["ms"]
            r["vs_vendor"] = vendor["ms"] / r["ms"]
        rows.append(r)
        print(_line(r), flush=True)
    if vendor is not None:
        if vendor.get("ms"):
            vendor["vendor_ms"], vendor["vs_vendor"] = vendor["ms"], 1.0
        print(_line(vendor) if not vendor.get("error") else
              f"{case.op:<18} {case.case:<14} {vendor['version']:<15} {vendor['error']}", flush=True)
        rows.append(vendor)
    del sets
    return rows


def write_outputs(out_dir, record, rows, ceil, info, backend):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"{info.get('name')} ({backend}) — {record['date'][:10]}"
    files = {"json": out_dir / "kernels.json", "markdown": out_dir / "kernels.md"}
    try:
        files["roofline"] = C.roofline_png(rows, ceil, out_dir / "roofline.png", f"Roofline: {title}")
        files["versions"] = C.versions_png(rows, out_dir / "versions.png", f"Kernel versions: {title}")
    except Exception as exc:  # a plot is not worth losing the numbers for
        record.setdefault("errors", []).append(f"plots: {type(exc).__name__}: {exc}")
        traceback.print_exc()
    record["files"] = {k: str(Path(v).name) for k, v in files.items()}
    C.write_json(files["json"], record)
    files["markdown"].write_text(markdown_report(record, rows, ceil, info, backend))
    print(f"\nwrote {', '.join(str(p) for p in files.values())}")
    return files


def markdown_report(record, rows, ceil, info, backend):
    v = record["versions"]
    lines = [f"# Kernel benchmarks: {info.get('name')} ({backend}), {record['date'][:10]}", "",
             f"Command: `{record['command']}`" + (f" (= `{record['invocation']}`)" if record["invocation"] != record["command"] else "") + "  ",
             f"Timer: {record['timer']}; median of "
             f"{record['settings'].get('repeats')} runs (fewer for slow cpu configurations: see `runs` in the JSON), "
             "rotating among several input sets; correctness checked first against a float64 reference.  ",
             "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + "  "]
    if backend == "cuda":
        lines.append(f"Device: {info.get('name')}, CC {info.get('compute_capability')}, {info.get('sm_count')} SMs, "
                     f"L2 {(info.get('l2_bytes') or 0) / 2**20:.0f} MiB, driver {info.get('driver')}, "
                     f"CUDA toolkit (NVRTC) {info.get('cuda_toolkit')}, driver API {info.get('cuda_driver_api')}  ")
    else:
        lines.append(f"CPU: {info.get('cpu')}, {info.get('cpu_count')} logical cores; BLAS threads "
                     f"{ceil.get('blas_threads')}; torch threads {(record.get('vendor') or {}).get('threads')}  ")
    if ceil:
        lines.append(f"Ceilings (measured): {C.fmt(ceil.get('bandwidth_GBps'), ',.0f')} GB/s ({ceil.get('bandwidth_source')}); "
                     f"{C.fmt(ceil.get('compute_GFLOPs'), ',.0f')} GFLOP/s FP32 ({ceil.get('compute_source')}"
                     + (f"; FMA-bound kernel {C.fmt(ceil.get('fma_GFLOPs'), ',.0f')}" if ceil.get("fma_GFLOPs") else "") + ")  ")
    lo = record.get("launch_overhead_us")
    if lo:
        lines.append("Launch overhead, µs per call from Python: " + ", ".join(
            f"{k.replace('_us', '')} {val:.2f}" for k, val in lo.items() if isinstance(val, float)) + "  ")
    lines += ["", "`vs vendor` = vendor ms / our ms (1.00 = as fast, 0.50 = twice as slow). `%roof` = GFLOP/s over "
              "min(peak FP32, AI × bandwidth), with the measured main-memory bandwidth: over 100 means the data stayed "
              "in cache (the small LeNet-5 tensors do). GB/s counts compulsory traffic only (each operand once).", ""]
    header = ["op", "case", "version", "ms", "GFLOP/s", "GB/s", "%roof", "vendor ms", "vs vendor", "rel err", "note"]
    body = []
    for r in rows:
        body.append([r["op"], r["case"], r["version"], C.fmt(r.get("ms"), ".4f"), C.num(r.get("gflops")),
                     C.num(r.get("gbps")), C.num(r.get("roofline_pct")), C.fmt(r.get("vendor_ms"), ".4f"),
                     C.fmt(r.get("vs_vendor"), ".2f"), C.fmt(r.get("rel_err"), ".1e"),
                     (r.get("error") or r.get("note") or "").replace("|", "/")[:120]])
    lines.append(C.markdown_table(header, body, ["l", "l", "l", "r", "r", "r", "r", "r", "r", "r", "l"]))
    if record.get("errors"):
        lines += ["", "Errors:", ""] + [f"- {e}" for e in record["errors"]]
    lines += ["", "![roofline](roofline.png)", "", "![versions](versions.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
