"""Softmax + cross-entropy (gpu_cnn.ops.softmax) against float64 NumPy and finite differences.

Rows of length 1, 7, 10 and 1000 (shorter than, and several times longer than, the SM_TPB threads of
a row's block: 128 on a GPU, 8 under the simulator; the GPU's 128 also run once under the simulator), logits of magnitude 1e4, and every bad label.
On the kernel backend the simulator costs ~150 µs per thread, so batches stay at a few rows.
"""
import numpy as np
import pytest

from gpu_cnn.ops import _base
from gpu_cnn.ops.softmax import softmax_cross_entropy, softmax_cross_entropy_backward


def _ref():
    from gpu_cnn.kernels import softmax as ks  # after the backend is chosen

    return ks


def _reference(logits, labels):
    """float64 (loss, probs), written out here so the tests do not import numba on the cpu backend."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    rows = lse - z[np.arange(len(labels)), labels]
    return float(rows.mean()), np.exp(z - lse[:, None])


def _problem(rng, n, c, scale=3.0):
    logits = (rng.standard_normal((n, c)) * scale).astype(np.float32)
    labels = rng.integers(0, c, n).astype(np.int32)
    return logits, labels


def test_reference_in_kernel_module_agrees(kernel_backend, rng):
    logits, labels = _problem(rng, 4, 9)
    loss, probs, rows = _ref().softmax_cross_entropy_reference(logits, labels)
    ref_loss, ref_probs = _reference(logits, labels)
    assert loss == pytest.approx(ref_loss, rel=1e-12) and rows.shape == (4,)
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-12)


@pytest.mark.parametrize("version", ["fused", "warp"])
@pytest.mark.parametrize("c", [1, 7, 10, 1000])
def test_forward_matches_float64_reference(backend, rng, c, version):
    """C = 1, 7, 10 leave warp lanes with no element (their running max stays -inf); 1000 gives each
    lane 31-32 elements, so the online rescaling of Σexp runs many times."""
    logits, labels = _problem(rng, 3, c)
    loss, probs = softmax_cross_entropy(logits, labels, version=version)
    ref_loss, ref_probs = _reference(logits, labels)
    assert isinstance(loss, float) and isinstance(probs, np.ndarray) and probs.dtype == np.float32
    # float32 exp/log and a C-term sum: a few ulps relative (1000 terms: ~1e-6)
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-5, atol=1e-7)
    # the probabilities of a row sum to one (float32 rounding of up to 1000 terms)
    np.testing.assert_allclose(probs.astype(np.float64).sum(axis=1), 1.0, rtol=0, atol=1e-5)
    if c > 1:
        assert loss > 0 and probs.min() < probs.max()  # a real distribution, not a constant


def test_huge_logits_give_a_finite_accurate_loss(backend, rng):
    logits, labels = _problem(rng, 4, 10, scale=1e4)  # exp(1e4) overflows float32 and float64
    logits[0, 3] = -1e4
    labels[0] = 3  # p[label] = exp(-~2e4) underflows to 0: -log(p) would be inf
    loss, probs = softmax_cross_entropy(logits, labels)
    ref_loss, ref_probs = _reference(logits, labels)
    assert np.isfinite(loss) and np.all(np.isfinite(probs))
    assert ref_loss > 1e3 and probs[0, 3] == 0.0  # the case is the one claimed
    # the loss is (log-sum-exp) - (z_label - max): a difference of float32 values of size 1e4, so
    # float32 rounding of the logits' spacing (1e-3 at 1e4) bounds the error: ~1e-7 relative
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-5, atol=1e-7)


def test_loss_is_not_log_of_a_rounded_probability(backend):
    logits = np.array([[0.0, 200.0]], np.float32)  # p[0] = exp(-200): 0 in float32
    loss, probs = softmax_cross_entropy(logits, np.array([0]))
    assert probs[0, 0] == 0.0
    assert loss == pytest.approx(200.0, rel=1e-6)  # log(1 + e^-200) - (0 - 200) = 200


def test_backward_matches_reference(backend, rng):
    logits, labels = _problem(rng, 5, 7)
    _, probs = softmax_cross_entropy(logits, labels)
    d = softmax_cross_entropy_backward(probs, labels)
    ref = probs.astype(np.float64)
    ref[np.arange(5), labels] -= 1.0
    np.testing.assert_allclose(d, ref / 5, rtol=1e-6, atol=1e-8)  # one float32 subtraction and division
    assert (d < 0).sum() == 5 and (d > 0).sum() == 30  # the label column is the only negative one


def test_backward_matches_finite_differences(backend, rng):
    logits, labels = _problem(rng, 3, 6)
    z = logits.astype(np.float64)
    eps = 1e-6
    num = np.zeros_like(z)
    for i in np.ndindex(z.shape):
        old = z[i]
        z[i] = old + eps
        up = _reference(z, labels)[0]
        z[i] = old - eps
        down = _reference(z, labels)[0]
        z[i] = old
        num[i] = (up - down) / (2 * eps)
    _, probs = softmax_cross_entropy(logits, labels)
    d = softmax_cross_entropy_backward(probs, labels)
    # float32 probabilities (1e-7 relative) against float64 central differences (~1e-10)
    np.testing.assert_allclose(d, num, rtol=1e-5, atol=1e-7)


def test_labels_of_any_integer_dtype(backend, rng):
    logits, labels = _problem(rng, 3, 4)
    a, _ = softmax_cross_entropy(logits, labels.astype(np.int64))
    b, _ = softmax_cross_entropy(logits, labels.astype(np.uint8))
    assert a == b


# --- bad input ----------------------------------------------------------------------------------------


def test_bad_labels_raise_clear_errors(backend, rng):
    logits, labels = _problem(rng, 3, 4)
    with pytest.raises(ValueError, match=r"labels: class ids must be in \[0, 4\) or ignore_index \(-100\), found 4"):
        softmax_cross_entropy(logits, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match="labels: class ids .* found -1"):
        softmax_cross_entropy(logits, np.array([0, -1, 1]))
    with pytest.raises(TypeError, match="labels: soft-label .*targets are not supported"):
        softmax_cross_entropy(logits, labels.astype(np.float32))  # PyTorch's probability targets
    with pytest.raises(TypeError, match="labels: expected integer class ids"):
        softmax_cross_entropy(logits, labels.astype(bool))
    with pytest.raises(ValueError, match=r"labels: expected shape \(3,\)"):
        softmax_cross_entropy(logits, labels[:2])
    with pytest.raises(ValueError, match=r"labels: expected shape \(3,\)"):
        softmax_cross_entropy(logits, labels[:, None])
    probs = np.full((3, 4), 0.25, np.float32)
    with pytest.raises(ValueError, match="labels: class ids"):
        softmax_cross_entropy_backward(probs, np.array([0, 1, 7]))
    with pytest.raises(TypeError, match="labels: soft-label"):
        softmax_cross_entropy_backward(probs, np.array([0.0, 1.0, 2.0]))


def test_bad_logits_raise_clear_errors(backend, rng):
    logits, labels = _problem(rng, 3, 4)
    with pytest.raises(ValueError, match=r"logits: expected logits of shape \(N, num_classes\).*got a 0-D"):
        softmax_cross_entropy(np.float32(1.0), labels)
    with pytest.raises(ValueError, match=r"labels: expected shape \(\)"):
        softmax_cross_entropy(logits[0], labels)  # unbatched (C,) logits take one label
    with pytest.raises(ValueError, match="logits: expected at least one row"):
        softmax_cross_entropy(np.zeros((0, 4), np.float32), labels[:0])
    with pytest.raises(TypeError, match="logits: expected a floating-point"):
        softmax_cross_entropy(logits.astype(np.int32), labels)
    with pytest.raises(ValueError, match="probs: expected logits of shape"):
        softmax_cross_entropy_backward(np.float32(0.5), labels)
    with pytest.raises(ValueError, match=r"out \(probs\): expected shape"):
        softmax_cross_entropy(logits, labels, out=_base.empty((3, 5)))
    with pytest.raises(ValueError, match=r"out \(loss_buf\): expected shape \(4,\)"):
        softmax_cross_entropy(logits, labels, out=(_base.empty((3, 4)), _base.empty((3,))))
    with pytest.raises(ValueError, match="out: expected shape"):
        softmax_cross_entropy_backward(logits, labels, out=_base.empty((4, 4)))


def test_launcher_rejects_bad_arguments(kernel_backend, rng):
    ks = _ref()
    logits, labels = _problem(rng, 2, 3)
    z, probs = _base.to_device(logits), _base.empty((2, 3))
    rows, loss = _base.empty((2,)), _base.empty((1,))
    with pytest.raises(TypeError, match="labels: expected dtype int32"):
        ks.softmax_cross_entropy_forward(z, _base.to_device(labels.astype(np.int64)), probs, rows, loss)
    with pytest.raises(TypeError, match="logits: expected a device array"):
        ks.softmax_cross_entropy_forward(logits, _base.to_device(labels), probs, rows, loss)
    with pytest.raises(ValueError, match="row_loss: expected shape"):
        ks.softmax_cross_entropy_forward(z, _base.to_device(labels), probs, loss, loss)
    with pytest.raises(ValueError, match="version: unknown softmax version"):
        ks.softmax_cross_entropy_forward(z, _base.to_device(labels), probs, rows, loss, version="online")


# --- device arrays, out=, no allocation -------------------------------------------------------------


def test_device_input_gives_device_probs_and_a_float_loss(kernel_backend, rng):
    logits, labels = _problem(rng, 2, 5)
    loss, probs = softmax_cross_entropy(_base.to_device(logits), _base.to_device(labels))
    assert isinstance(loss, float) and not isinstance(probs, np.ndarray)
    ref_loss, ref_probs = _reference(logits, labels)
    assert loss == pytest.approx(ref_loss, rel=1e-5)  # float32 math, few ulps
    np.testing.assert_allclose(probs.copy_to_host(), ref_probs, rtol=1e-5, atol=1e-7)


class _TorchLikeLabels:
    """Stands in for a PyTorch tensor: a CUDA array whose ``dtype`` NumPy cannot read (torch.int32)."""

    dtype = "torch.int32"  # np.dtype("torch.int32") raises TypeError, as np.dtype(torch.int32) does
    __cuda_array_interface__ = {}

    def __init__(self, dev):
        self.dev = dev


def test_labels_from_a_framework_tensor_use_the_converted_arrays_dtype(kernel_backend, rng, monkeypatch):
    logits, labels = _problem(rng, 3, 4)
    convert = _base._as_cuda_array
    monkeypatch.setattr(_base, "_as_cuda_array", lambda a: a.dev if isinstance(a, _TorchLikeLabels) else convert(a))
    dev = _base.to_device(labels)
    assert _base.as_labels("labels", _TorchLikeLabels(dev), 3, 4) is dev  # int32 on the device: used in place
    loss, _ = softmax_cross_entropy(logits, _TorchLikeLabels(dev))
    assert loss == pytest.approx(_reference(logits, labels)[0], rel=1e-5)


def test_out_makes_no_allocation(kernel_backend, rng):
    logits, labels = _problem(rng, 3, 5)
    z, lab = _base.to_device(logits), _base.to_device(labels)
    probs, loss_buf, d = _base.empty((3, 5)), _base.empty((4,)), _base.empty((3, 5))
    ref_loss, _ = _reference(logits, labels)

    before = _base.allocation_stats()
    loss, p = softmax_cross_entropy(z, lab, out=(probs, loss_buf))
    got = softmax_cross_entropy_backward(probs, lab, out=d)
    assert _base.allocation_stats() == before
    assert p is probs and got is d
    host = loss_buf.copy_to_host()
    assert loss == pytest.approx(ref_loss, rel=1e-5) and host[3] == pytest.approx(loss, rel=1e-6)
    assert host[:3].mean() == pytest.approx(loss, rel=1e-5)  # the per-row losses come first

    # out=probs alone: the op's reusable scratch is allocated at most once, then reused
    softmax_cross_entropy(z, lab, out=probs)
    before = _base.allocation_stats()
    loss2, _ = softmax_cross_entropy(z, lab, out=probs)
    softmax_cross_entropy(z[:2], lab[:2], out=probs[:2])  # a smaller (last, partial) batch
    softmax_cross_entropy_backward(probs, lab, out=probs)  # in place
    assert _base.allocation_stats() == before
    assert loss2 == pytest.approx(loss, rel=1e-6)


def test_backward_in_place_on_cpu(cpu_backend, rng):
    logits, labels = _problem(rng, 3, 5)
    _, probs = softmax_cross_entropy(logits, labels)
    expected = softmax_cross_entropy_backward(probs, labels)
    assert softmax_cross_entropy_backward(probs, labels, out=probs) is probs
    np.testing.assert_array_equal(probs, expected)


def test_forward_in_place_on_the_logits(backend, rng):
    """out=logits: the probabilities overwrite the logits, and the loss still reads the label's logit
    (labels on column 0, where the row's first thread writes, and elsewhere)."""
    logits, _ = _problem(rng, 4, 10)
    labels = np.array([0, 0, 3, 9], np.int32)
    ref_loss, ref_probs = _reference(logits, labels)
    z = logits.copy() if backend == "cpu" else _base.to_device(logits)
    loss, probs = softmax_cross_entropy(z, labels, out=z)
    assert probs is z
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    host = z if backend == "cpu" else z.copy_to_host()
    np.testing.assert_allclose(host, ref_probs, rtol=1e-5, atol=1e-7)


def test_gpu_block_size_under_the_simulator(kernel_backend, rng, monkeypatch):
    """The GPU's 128-thread blocks (the suite otherwise runs 8 under the simulator): rows shorter and
    longer than the block, the same trees."""
    ks = _ref()
    monkeypatch.setattr(ks, "SM_TPB", 128)  # the simulator reads module globals when a kernel runs
    logits, labels = _problem(rng, 2, 300)
    logits[1, :] = logits[1, :5].repeat(60)  # repeated maxima
    for c in (5, 300):
        z, lab = np.ascontiguousarray(logits[:, :c]), labels % c
        loss, probs = softmax_cross_entropy(z, lab)
        ref_loss, ref_probs = _reference(z, lab)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        np.testing.assert_allclose(probs, ref_probs, rtol=1e-5, atol=1e-7)


# --- PyTorch's F.cross_entropy keywords (issue 13), against committed float64 PyTorch output -----------

import json  # noqa: E402
from pathlib import Path  # noqa: E402

from numba import cuda  # noqa: E402  (module level: the simulator swaps a kernel's global `cuda`; conftest chose it)

_TORCH = json.loads((Path(__file__).parent / "data" / "torch_xent.json").read_text())["cases"]
_KW = ("weight", "ignore_index", "label_smoothing", "reduction")


def _case_kw(case):
    kw = {k: case[k] for k in _KW}
    if kw["weight"] is not None:
        kw["weight"] = np.asarray(kw["weight"], np.float32)
    return kw


def _case_id(case):
    return (f"{'x'.join(map(str, np.shape(case['logits'])))}-{'w' if case['weight'] else 'nw'}-"
            f"ls{case['label_smoothing']}-{case['reduction']}")


@pytest.mark.parametrize("case", _TORCH, ids=[_case_id(c) for c in _TORCH])
def test_cross_entropy_options_match_pytorch_on_cpu(cpu_backend, case):
    """(N, C), (N, C, d1, d2) and (C,) logits; class weights; ignore_index on one row; label smoothing;
    each reduction: loss and gradient against PyTorch float64 (the inputs are float32-exact). float32
    sums of a few dozen terms of size ~1-10: 2e-5 relative."""
    z = np.asarray(case["logits"], np.float32)
    y = np.asarray(case["labels"], np.int64)
    kw = _case_kw(case)
    loss, probs = softmax_cross_entropy(z, y, **kw)
    np.testing.assert_allclose(loss, case["loss"], rtol=2e-5, atol=1e-6)
    d = softmax_cross_entropy_backward(probs, y, **kw)
    np.testing.assert_allclose(d, case["grad"], rtol=2e-5, atol=1e-6)
    assert np.abs(np.asarray(case["grad"])).max() > 0.01


# a representative subset under the simulator, both kernel versions (each case costs 2-4 launches)
_SIM_CASES = [c for c in _TORCH if (c["weight"] is not None and c["label_smoothing"] > 0)
              or (np.ndim(c["logits"]) == 1 and c["reduction"] == "none")]


@pytest.mark.parametrize("version", ["fused", "warp"])
@pytest.mark.parametrize("case", _SIM_CASES, ids=[_case_id(c) for c in _SIM_CASES])
def test_cross_entropy_options_match_pytorch_on_the_kernels(kernel_backend, case, version):
    z = np.asarray(case["logits"], np.float32)
    y = np.asarray(case["labels"], np.int64)
    kw = _case_kw(case)
    loss, probs = softmax_cross_entropy(z, y, version=version, **kw)
    np.testing.assert_allclose(loss, case["loss"], rtol=2e-5, atol=1e-6)
    d = softmax_cross_entropy_backward(probs, y, **kw)
    np.testing.assert_allclose(d, case["grad"], rtol=2e-5, atol=1e-6)


def test_hand_worked_weighted_mean_with_ignored_row(backend):
    """Two classes, logits 0 (p = 1/2 each): every row's nll is log 2. Rows: label 0 (w 1), label 1
    (w 3), ignored. Weighted mean = (1 + 3) log 2 / (1 + 3) = log 2; sum = 4 log 2; none = [log 2,
    3 log 2, 0]. Gradient of the mean: row 0 (1/4)(1/2 - 1, 1/2), row 1 (3/4)(1/2, 1/2 - 1), row 2 0."""
    z = np.zeros((3, 2), np.float32)
    y = np.array([0, 1, -100])
    w = np.array([1.0, 3.0], np.float32)
    l2 = np.log(2.0)
    loss, probs = softmax_cross_entropy(z, y, weight=w)
    assert loss == pytest.approx(l2, rel=1e-6)
    assert softmax_cross_entropy(z, y, weight=w, reduction="sum")[0] == pytest.approx(4 * l2, rel=1e-6)
    none, _ = softmax_cross_entropy(z, y, weight=w, reduction="none")
    np.testing.assert_allclose(none, [l2, 3 * l2, 0.0], rtol=1e-6)
    d = softmax_cross_entropy_backward(probs, y, weight=w)
    np.testing.assert_allclose(d, [[-0.125, 0.125], [0.375, -0.375], [0.0, 0.0]], rtol=1e-6, atol=1e-7)


def test_every_row_ignored_gives_nan_mean_as_pytorch(backend):
    z = np.zeros((2, 3), np.float32)
    loss, _ = softmax_cross_entropy(z, np.array([-100, -100]))
    assert np.isnan(loss)
    assert softmax_cross_entropy(z, np.array([-100, -100]), reduction="sum")[0] == 0.0


def test_cross_entropy_bad_options(backend, rng):
    logits, labels = _problem(rng, 3, 4)
    with pytest.raises(ValueError, match="reduction: expected one of 'mean', 'sum', 'none'"):
        softmax_cross_entropy(logits, labels, reduction="batchmean")
    with pytest.raises(ValueError, match=r"label_smoothing: expected a float in \[0, 1\]"):
        softmax_cross_entropy(logits, labels, label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"weight: expected a floating-point array of shape \(4,\)"):
        softmax_cross_entropy(logits, labels, weight=np.ones(3, np.float32))
    with pytest.raises(TypeError, match="ignore_index: expected an int"):
        softmax_cross_entropy(logits, labels, ignore_index=0.5)
    with pytest.raises(TypeError, match="labels: soft-label"):
        softmax_cross_entropy(logits, np.full((3, 4), 0.25, np.float32))
    with pytest.raises(ValueError, match="grad: only for reduction='none'"):
        softmax_cross_entropy_backward(np.full((3, 4), 0.25, np.float32), labels, grad=np.ones(3, np.float32))


def test_none_backward_takes_an_incoming_gradient(backend, rng):
    logits, labels = _problem(rng, 4, 5)
    g = rng.standard_normal(4).astype(np.float32)
    _, probs = softmax_cross_entropy(logits, labels, reduction="none")
    d = softmax_cross_entropy_backward(probs, labels, reduction="none", grad=g)
    ref = _ref().softmax_cross_entropy_backward_reference(probs, labels, reduction="none", grad=g)
    np.testing.assert_allclose(d, ref, rtol=1e-5, atol=1e-7)


def test_op_versions_are_the_kernel_versions(kernel_backend):
    from gpu_cnn.ops.softmax import VERSIONS as OP_VERSIONS

    assert OP_VERSIONS == _ref().VERSIONS == ("fused", "warp") and _ref().DEFAULT_VERSION == "warp"


def test_simulated_shuffles_exchange_lane_values(kernel_backend):
    """The simulator's shfl_xor_sync / shfl_down_sync (added by kernels._common): a 32-lane butterfly sum
    gives every lane Σ lanes = 496; shfl_down by 1 gives lane + 1, the last lane its own value."""
    @cuda.jit
    def k(out_xor, out_down):
        lane = cuda.threadIdx.x
        v = lane
        off = 16
        while off > 0:
            v += cuda.shfl_xor_sync(0xFFFFFFFF, v, off)
            off //= 2
        out_xor[lane] = v
        out_down[lane] = cuda.shfl_down_sync(0xFFFFFFFF, lane, 1)

    a, b = _base.empty((32,)), _base.empty((32,))
    k[1, 32](a, b)
    assert (a.copy_to_host() == 496).all()
    np.testing.assert_array_equal(b.copy_to_host(), list(range(1, 32)) + [31])
