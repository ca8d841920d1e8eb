"""Kernel launches of a LeNet-5 training step with the cuda backend's defaults (issue 12: at most 16).

Counted under the simulator with benchmarks.host's probe, which skips kernel bodies (so the step costs
milliseconds) and counts every launch by kernel; the cuda defaults are forced (fusion on, the
implicit-GEMM conv forward), so these are the launches a GPU step makes. Per step inside ``fit`` =
(launches of a 3-batch epoch - those of a 1-batch epoch) / 2: what fit does once an epoch cancels.
The values these fused launches compute are tested against float64 and the unfused paths in
test_gemm.py, test_conv2d_igemm.py and test_metrics.py.
"""
import numpy as np
import pytest

import gpu_cnn

BATCH = 4
BUDGET = 16  # issue 12's target for a LeNet-5 SGD or Adam step


@pytest.fixture
def cuda_defaults(kernel_backend):
    from benchmarks.host import kernel_defaults

    with kernel_defaults("cuda"):  # what the benchmark counts with: fusion and the implicit-GEMM forward
        yield


def _per_step(optimizer):
    from benchmarks.host import HostProbe

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3 * BATCH, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 3 * BATCH)
    with HostProbe() as probe:
        trainer = gpu_cnn.Trainer(gpu_cnn.models.lenet5(num_classes=10, seed=0), optimizer=optimizer, lr=1e-3,
                                  batch_size=BATCH, seed=0, progress=False)
        trainer.fit((x[:BATCH], y[:BATCH]), epochs=1)  # plans every buffer
        probe.reset()
        trainer.fit((x[:BATCH], y[:BATCH]), epochs=1)
        one = probe.snapshot()
        probe.reset()
        trainer.fit((x, y), epochs=1)
        three = probe.snapshot()
    total = (three[0]["launch"] - one[0]["launch"]) / 2
    kernels = {k: (three[1].get(k, 0) - one[1].get(k, 0)) / 2 for k in set(one[1]) | set(three[1])}
    return total, {k: v for k, v in kernels.items() if v}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_lenet5_step_launches_at_most_16_kernels(cuda_defaults, optimizer):
    total, kernels = _per_step(optimizer)
    assert total == sum(kernels.values())
    assert total <= BUDGET, kernels
    names = " ".join(kernels)
    # what the fusions removed: no separate ReLU, ReLU-backward, pool-backward, bias-gradient, split-K
    # reduction, softmax, loss-mean or metrics launch
    for gone in ("relu_kernel", "relu_backward", "maxpool_backward", "bias_grad", "reduce", "softmax",
                 "batch_mean", "epoch_metrics"):
        assert gone not in names, (gone, kernels)
    assert kernels["train_loss_step_block_kernel"] == 1  # softmax, loss, dlogits and metrics: one launch
    assert kernels["gemm_split_k_ticket_kernel"] == 9  # 3 dense layers: forward, dx, dw (+db)
    assert sum(v for k, v in kernels.items() if k.startswith(("sgd", "adam"))) == 1
