"""The benchmarks check before they time, refuse to time under the simulator, and write their results.

* the correctness pass of ``benchmarks.kernels`` (every op, every kernel version, tiny odd shapes) on the
  kernel backend -- the simulator here, the GPU under ``GPU_CNN_BACKEND=cuda``;
* a cpu timing run of ``benchmarks.kernels`` and of ``benchmarks.train`` on tiny shapes, into tmp_path,
  and the JSON / Markdown / PNG files they write;
* the refusal under the simulator, and that a wrong or unwritten result fails the check;
* the benchmarks' float64 references against the kernel modules' own references;
* the benchmarks' helper kernels (spin, FMA, empty) build for sm_80 and sm_90.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import gpu_cnn
from benchmarks import common as C
from benchmarks import kernels as KB
from benchmarks import train as TB

# the kernel backend conftest chose (sim, or cuda under GPU_CNN_BACKEND=cuda)
KERNEL_BACKEND = os.environ.get("GPU_CNN_BACKEND", "sim").strip().lower()
KERNEL_BACKEND = KERNEL_BACKEND if KERNEL_BACKEND in ("sim", "cuda") else "sim"

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def restore_backend():
    """The benchmarks set the process backend; put back the one the other tests expect."""
    yield
    gpu_cnn.set_backend(KERNEL_BACKEND)


# --- correctness pass on the kernel backend ----------------------------------------------------------


def test_check_pass_runs_every_kernel_version(capsys):
    rc = KB.main(["--backend", KERNEL_BACKEND, "--check", "--sweep", "tiny", "--no-vendor"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "all checks passed" in out
    from gpu_cnn.kernels import activation, conv2d, gemm, optim, pool, softmax

    expected = {("conv2d.fwd", v) for v in conv2d.VERSIONS} | {("maxpool.bwd", v) for v in pool.VERSIONS} \
        | {("linear.fwd", v) for v in gemm.VERSIONS} | {("gemm.nn", v) for v in gemm.VERSIONS} \
        | {("relu.fwd", v) for v in activation.VERSIONS} | {("softmax_xent.fwd", v) for v in softmax.VERSIONS} \
        | {("sgd.step", v) for v in optim.VERSIONS} | {("adam.step", v) for v in optim.VERSIONS}
    seen = {tuple(line.split()[1:4:2]) for line in out.splitlines() if line.strip().startswith("ok ")}
    assert expected <= seen, sorted(expected - seen)
    for op in ("conv2d.bwd_input", "conv2d.bwd_weight", "conv2d.bwd_bias", "relu.bwd", "bias_relu.fwd",
               "maxpool.fwd", "linear.bwd", "softmax_xent.bwd"):
        assert any(s[0] == op for s in seen), op


def test_check_fails_on_wrong_or_unwritten_output():
    gpu_cnn.set_backend("cpu")
    be = KB.Backend("cpu")
    relu = next(c for c in KB.build_cases("tiny", "cpu") if c.op == "relu.fwd")
    rng = np.random.default_rng(0)
    assert KB.check_version(be, relu, "cpu", rng)["y"] <= KB.TOL

    relu.cpu = lambda b: np.copyto(b["y"], b["x"])  # forgot the max: wrong where x < 0
    with pytest.raises(KB.CheckFailed, match="rel err"):
        KB.check_version(be, relu, "cpu", rng)
    relu.cpu = lambda b: None  # wrote nothing: the NaN poison is still there
    with pytest.raises(KB.CheckFailed, match="rel err inf"):
        KB.check_version(be, relu, "cpu", rng)


# --- refusal under the simulator ----------------------------------------------------------------------


@pytest.mark.parametrize("module", [KB, TB], ids=["kernels", "train"])
def test_refuses_to_time_under_the_simulator(module, capsys, monkeypatch):
    assert module.main(["--backend", "sim"]) == 2
    err = capsys.readouterr().err
    assert "refusing to time under the CUDA simulator" in err and "--check" in err
    monkeypatch.setenv("GPU_CNN_BACKEND", "sim")
    assert module.main([]) == 2
    assert "refusing to time" in capsys.readouterr().err


# --- cpu timing runs and their files ------------------------------------------------------------------


def test_kernels_cpu_quick_tiny_writes_results(tmp_path, capsys):
    rc = KB.main(["--backend", "cpu", "--quick", "--sweep", "tiny", "--repeats", "3", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    for name in ("kernels.json", "kernels.md", "roofline.png", "versions.png"):
        assert (tmp_path / name).is_file(), name
    for name in ("roofline.png", "versions.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    rec = json.loads((tmp_path / "kernels.json").read_text())
    assert rec["kind"] == "kernels" and rec["backend"] == "cpu" and rec["timer"] == "perf_counter"
    assert rec["command"]  # the process's own command line (pytest here)
    assert rec["invocation"].startswith("python -m benchmarks.kernels --backend cpu") and "--sweep tiny" in rec["invocation"]
    assert rec["device"]["name"] and rec["device"]["cpu_count"]
    assert {"python", "numpy", "numba"} <= set(rec["versions"])
    assert rec["ceilings"]["bandwidth_GBps"] > 0 and rec["ceilings"]["compute_GFLOPs"] > 0
    ours = [r for r in rec["results"] if r["impl"] == "gpu_cnn"]
    ops = {r["op"] for r in ours}
    assert {"conv2d.fwd", "conv2d.bwd", "relu.fwd", "relu.bwd", "bias_relu.fwd", "maxpool.fwd", "maxpool.bwd",
            "linear.fwd", "linear.bwd", "gemm.nn", "softmax_xent.fwd", "softmax_xent.bwd", "sgd.step",
            "adam.step"} <= ops
    for r in ours:
        assert "error" not in r, r
        assert r["ms"] > 0 and r["runs"] >= 2 and r["flop"] > 0 and r["bytes"] > 0, r
        assert r["gflops"] == pytest.approx(r["flop"] / (r["ms"] * 1e-3) / 1e9)
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["ms"] * 1e-3) / 1e9)
        assert 0 <= r["rel_err"] <= KB.TOL and r["roofline_pct"] > 0 and r["shape"]
    md = (tmp_path / "kernels.md").read_text()
    assert "| op | case | version | ms | GFLOP/s | GB/s |" in md and "conv2d.fwd" in md
    assert "ms" in out and "GFLOP/s" in out  # the aligned table on stdout


def test_train_cpu_tiny_writes_results(tmp_path, capsys):
    rc = TB.main(["--backend", "cpu", "--batch-sizes", "8", "--warmup", "1", "--windows", "2", "--steps", "2",
                  "--batches", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    rec = json.loads((tmp_path / "train.json").read_text())
    assert rec["kind"] == "train" and rec["backend"] == "cpu" and rec["threads"]["cpu_count"]
    rows = {r["impl"]: r for r in rec["results"]}
    ours = rows["gpu_cnn"]
    assert ours["batch"] == 8 and ours["steps_per_window"] == 2 and ours["windows"] == 2
    assert ours["ms_per_step"] > 0 and ours["images_per_s"] == pytest.approx(8 / (ours["ms_per_step"] * 1e-3))
    assert ours["check"]["loss_step1_relerr"] <= TB.LOSS_RTOL
    if "torch" in rows:
        assert ours["ratio_vs_torch"] == pytest.approx(ours["images_per_s"] / rows["torch"]["images_per_s"])
    assert "| batch | impl |" in (tmp_path / "train.md").read_text()


# --- the references the checks rely on ----------------------------------------------------------------


def test_float64_references_match_the_kernel_modules(rng):
    from gpu_cnn.kernels import conv2d, gemm, pool, softmax

    x = rng.standard_normal((2, 3, 9, 7))
    w = rng.standard_normal((4, 3, 3, 3))
    b = rng.standard_normal(4)
    for s, p in (((1, 1), (1, 1)), ((2, 1), (0, 2))):
        y = C.conv2d_ref(x, w, b, s, p)
        np.testing.assert_allclose(y, conv2d.conv2d_reference(x, w, b, s, p), rtol=1e-12, atol=1e-12)
        dy = rng.standard_normal(y.shape)
        dx, dw, db = conv2d.conv2d_backward_reference(dy, x, w, s, p)
        np.testing.assert_allclose(C.conv2d_backward_input_ref(dy, w, x.shape, s, p), dx, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(C.conv2d_backward_weight_ref(dy, x, w.shape, s, p), dw, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(C.conv2d_backward_bias_ref(dy), db, rtol=1e-12, atol=1e-12)
    for k, s, p in (((2, 2), (2, 2), (0, 0)), ((3, 3), (2, 1), (1, 1))):
        y, idx = C.max_pool2d_ref(x, k, s, p)
        y_ref, idx_ref = pool.max_pool2d_reference(x, k, s, p)
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(idx, idx_ref)
        dy = rng.standard_normal(y.shape)
        np.testing.assert_allclose(C.max_pool2d_backward_ref(dy, idx, x.shape),
                                   pool.max_pool2d_backward_reference(dy, idx_ref, x.shape), rtol=1e-12, atol=1e-12)
    z = rng.standard_normal((5, 7)) * 3
    labels = rng.integers(0, 7, 5)
    loss, probs, rows = C.softmax_xent_ref(z, labels)
    loss_r, probs_r, rows_r = softmax.softmax_cross_entropy_reference(z, labels)
    assert loss == pytest.approx(loss_r, rel=1e-12)
    np.testing.assert_allclose(probs, probs_r, rtol=1e-12)
    np.testing.assert_allclose(C.softmax_xent_backward_ref(probs, labels),
                               softmax.softmax_cross_entropy_backward_reference(probs_r, labels), rtol=1e-12)
    a, m = rng.standard_normal((6, 5)), rng.standard_normal((4, 5))
    np.testing.assert_allclose(C.linear_ref(a, m, b), gemm.linear_forward_reference(a, m, b), rtol=1e-12)
    dy = rng.standard_normal((6, 4))
    for mine, theirs in zip(C.linear_backward_ref(dy, a, m), gemm.linear_backward_reference(dy, a, m)):
        np.testing.assert_allclose(mine, theirs, rtol=1e-12)


def test_rel_err_and_rotation_sets():
    assert C.rel_err(np.ones(3), np.ones(3)) == 0.0
    assert C.rel_err(np.array([1.0, np.nan]), np.ones(2)) == float("inf")  # a NaN never passes
    assert C.sets_for(1 << 20, 50 << 20, 16, 1 << 30) == 16  # small sets: as many as allowed
    assert C.sets_for(64 << 20, 50 << 20, 16, 1 << 30) == 2  # cover twice the cache
    assert C.sets_for(600 << 20, 50 << 20, 16, 1 << 30) == 1  # never above the memory cap


# --- helper kernels build for real GPUs ---------------------------------------------------------------

_BUILD = r"""
import json, os, subprocess, sys, tempfile
os.environ["NUMBA_ENABLE_CUDASIM"] = "0"
from numba import cuda
from benchmarks import common as C
from gpu_cnn.compile_check import find_ptxas
C.gpu_helpers()
ptxas = find_ptxas()
res = []
for name, (fn, sig) in C.HELPER_SIGNATURES.items():
    for cc in ((8, 0), (9, 0)):
        ptx, _ = cuda.compile_ptx(fn, sig, cc=cc)
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        p = subprocess.run([ptxas, "-v", f"-arch=sm_{cc[0]}{cc[1]}", f.name, "-o", os.devnull],
                           capture_output=True, text=True)
        os.unlink(f.name)
        res.append({"kernel": name, "arch": cc, "rc": p.returncode, "log": p.stderr[-400:]})
print(json.dumps(res))
"""


def test_helper_kernels_build_for_sm80_and_sm90():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    env.pop("GPU_CNN_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", _BUILD], capture_output=True, text=True, env=env, timeout=300)
    if "ptxas not found" in proc.stderr:
        pytest.skip("ptxas is not installed here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {r["kernel"] for r in res} == set(C.HELPER_SIGNATURES) and len(res) == 2 * len(C.HELPER_SIGNATURES)
    bad = [r for r in res if r["rc"] != 0]
    assert not bad, bad


def test_sanitize_lists_kernels_never_launched_and_admits_when_it_cannot_tell(monkeypatch):
    from benchmarks import sanitize
    from gpu_cnn.kernels import _common

    class Disp:
        def __init__(self, overloads, device=False):
            self.overloads, self.targetoptions = overloads, {"device": device}

    sanitize.never_launched()  # imports every kernel module first, so none registers into the table below
    table = {"launched": (Disp({"sig": object()}), None, None), "idle": (Disp({}), None, None),
             "helper": (Disp({}, device=True), None, None)}
    monkeypatch.setattr(_common, "KERNELS", table)
    assert sanitize.never_launched() == (["idle"], 3)  # a device function is inlined, never launched

    class Opaque:  # a numba-cuda whose dispatchers keep their overloads elsewhere
        targetoptions = {}

    monkeypatch.setitem(table, "opaque", (Opaque(), None, None))
    assert sanitize.never_launched() == (None, 4)
