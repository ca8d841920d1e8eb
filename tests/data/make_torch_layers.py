"""Record PyTorch float64 references for the layers of issue 13 (needs PyTorch; not a dependency).

    python tests/data/make_torch_layers.py      # writes tests/data/torch_layers.npz and torch_models.npz

torch_layers.npz: for every case NAME, NAME/<array> entries (inputs, outputs and every gradient) for
conv2d with dilation / groups / 'same' / 'valid' / unbatched input, max_pool2d with dilation and
ceil_mode, avg_pool2d, adaptive_avg_pool2d, BatchNorm2d over several training steps (outputs,
gradients, running statistics) and in eval, and Dropout masks computed by an independent pure-Python
implementation of the documented hash (PyTorch's own RNG cannot be reproduced, so the mask's definition
is checked instead, and the scaling by torch).

torch_models.npz: resnet8 and mobilenet_tiny (width 4) built in PyTorch with the same structure and
names as gpu_cnn.models, trained for two SGD steps in train mode (so the running statistics are not
trivial), then the eval-mode logits for a fixed batch; state_dict entries as float32 (count int64).

The tests read these files and never import torch.
"""
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

# (name, x shape, w shape, kwargs): odd shapes, every new argument
CONV_CASES = [
    ("dil2", (2, 3, 9, 8), (4, 3, 3, 3), dict(stride=1, padding=1, dilation=2)),
    ("dil21-s2", (1, 2, 11, 9), (3, 2, 3, 2), dict(stride=(2, 1), padding=(2, 1), dilation=(2, 1))),
    ("groups2", (2, 4, 7, 6), (6, 2, 3, 3), dict(stride=1, padding=1, groups=2)),
    ("depthwise", (2, 3, 7, 5), (3, 1, 3, 3), dict(stride=2, padding=1, groups=3)),
    ("depthwise-mult2", (1, 3, 6, 7), (6, 1, 3, 2), dict(stride=1, padding=(1, 0), groups=3)),
    ("same-odd", (2, 2, 7, 6), (3, 2, 3, 3), dict(padding="same")),
    ("same-even-k", (1, 2, 6, 7), (3, 2, 2, 4), dict(padding="same")),  # asymmetric: extra at bottom/right
    ("same-dil", (1, 4, 7, 7), (2, 2, 3, 2), dict(padding="same", dilation=(2, 3), groups=2)),
    ("valid", (2, 2, 6, 5), (3, 2, 3, 2), dict(padding="valid", stride=(1, 2))),
    ("unbatched", (3, 6, 7), (2, 3, 3, 3), dict(padding=1, stride=2)),
]
MAXPOOL_CASES = [
    ("dil2", (2, 3, 9, 8), dict(kernel_size=3, stride=2, padding=1, dilation=2)),
    ("ceil", (2, 2, 7, 8), dict(kernel_size=2, stride=2, ceil_mode=True)),
    ("ceil-pad-s2", (1, 3, 8, 7), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    ("dil-ceil", (1, 2, 9, 10), dict(kernel_size=(2, 3), stride=(2, 3), padding=(1, 0), dilation=(2, 1),
                                      ceil_mode=True)),
    ("unbatched", (3, 7, 6), dict(kernel_size=3, stride=1, padding=1)),
]
AVGPOOL_CASES = [
    ("k3s2p1", (2, 3, 7, 8), dict(kernel_size=3, stride=2, padding=1)),
    ("k3s2p1-nopad", (2, 3, 7, 8), dict(kernel_size=3, stride=2, padding=1, count_include_pad=False)),
    ("ceil", (1, 2, 7, 9), dict(kernel_size=2, stride=2, ceil_mode=True)),
    ("ceil-pad", (1, 2, 8, 7), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    ("ceil-pad-nopad", (1, 2, 8, 7), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True,
                                          count_include_pad=False)),
    ("rect", (2, 2, 6, 7), dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 1))),
    ("unbatched", (3, 5, 6), dict(kernel_size=2)),
]
ADAPTIVE_CASES = [
    ("global", (2, 3, 5, 7), 1),
    ("3x2", (2, 2, 7, 5), (3, 2)),
    ("upsample", (1, 2, 3, 2), (5, 4)),
    ("none-axis", (1, 2, 6, 5), (4, None)),
    ("unbatched", (3, 7, 6), (2, 4)),
]
BN_SHAPE = (3, 4, 5, 3)
BN_STEPS = 3
DROPOUT_CASES = [("p0.3", 7, 1, (2, 3, 5, 4), 0.3), ("p0.5", 12345, 4, (3, 37), 0.5), ("p0.9", 2**31 - 5, 2, (101,), 0.9)]


# --- the hash, written out independently of gpu_cnn (Python ints, no NumPy wrap-around) -------------


def lowbias32(v):
    v &= 0xFFFFFFFF
    v ^= v >> 16
    v = (v * 0x7FEB352D) & 0xFFFFFFFF
    v ^= v >> 15
    v = (v * 0x846CA68B) & 0xFFFFFFFF
    v ^= v >> 16
    return v


def keep_mask(seed, step, n, p):
    key = lowbias32(step ^ lowbias32(seed))
    threshold = int(np.ceil(p * 2**24))  # keep when the top 24 bits, as an integer, reach p * 2**24
    return np.array([(lowbias32(i ^ key) >> 8) >= threshold for i in range(n)])


def main():
    import torch
    import torch.nn as tnn
    import torch.nn.functional as tF

    torch.set_default_dtype(torch.float64)
    rng = np.random.default_rng(2026)
    out = {}

    def T(a):
        return torch.tensor(np.asarray(a, np.float64), requires_grad=True)

    def f32(a):
        return np.asarray(a, np.float32)

    for name, xs, ws, kw in CONV_CASES:
        x, w, b = f32(rng.standard_normal(xs)), f32(rng.standard_normal(ws)), f32(rng.standard_normal(ws[0]))
        tx, tw, tb = T(x), T(w), T(b)
        y = tF.conv2d(tx, tw, tb, **kw)
        dy = f32(rng.standard_normal(tuple(y.shape)))
        y.backward(torch.tensor(dy, dtype=torch.float64))
        for k, v in dict(x=x, w=w, b=b, dy=dy, y=y.detach().numpy(), dx=tx.grad.numpy(), dw=tw.grad.numpy(),
                         db=tb.grad.numpy()).items():
            out[f"conv/{name}/{k}"] = v
    for name, xs, kw in MAXPOOL_CASES:
        # distinct values: no ties, so the argmax is PyTorch's whatever the visiting order
        x = f32(rng.permutation(int(np.prod(xs))).reshape(xs) / 10.0 - 3.0)
        tx = T(x)
        y, idx = tF.max_pool2d(tx, return_indices=True, **kw)
        dy = f32(rng.standard_normal(tuple(y.shape)))
        y.backward(torch.tensor(dy, dtype=torch.float64))
        for k, v in dict(x=x, dy=dy, y=y.detach().numpy(), idx=idx.numpy().astype(np.int32), dx=tx.grad.numpy()).items():
            out[f"maxpool/{name}/{k}"] = v
    for name, xs, kw in AVGPOOL_CASES:
        x = f32(rng.standard_normal(xs))
        tx = T(x)
        y = tF.avg_pool2d(tx, **kw)
        dy = f32(rng.standard_normal(tuple(y.shape)))
        y.backward(torch.tensor(dy, dtype=torch.float64))
        for k, v in dict(x=x, dy=dy, y=y.detach().numpy(), dx=tx.grad.numpy()).items():
            out[f"avgpool/{name}/{k}"] = v
    for name, xs, size in ADAPTIVE_CASES:
        x = f32(rng.standard_normal(xs))
        tx = T(x)
        y = tF.adaptive_avg_pool2d(tx, size)
        dy = f32(rng.standard_normal(tuple(y.shape)))
        y.backward(torch.tensor(dy, dtype=torch.float64))
        for k, v in dict(x=x, dy=dy, y=y.detach().numpy(), dx=tx.grad.numpy()).items():
            out[f"adaptive/{name}/{k}"] = v

    # BatchNorm2d: BN_STEPS training steps (output and every gradient each step), then eval
    for tag, kw in (("default", {}), ("mom-none", dict(momentum=None, eps=1e-3))):
        c = BN_SHAPE[1]
        bn = tnn.BatchNorm2d(c, **kw)
        with torch.no_grad():
            bn.weight.copy_(torch.tensor(rng.uniform(0.5, 1.5, c)))
            bn.bias.copy_(torch.tensor(rng.standard_normal(c)))
        out[f"bn/{tag}/weight"] = f32(bn.weight.detach().numpy())
        out[f"bn/{tag}/bias"] = f32(bn.bias.detach().numpy())
        bn.train()
        for step in range(BN_STEPS):
            x = f32(rng.standard_normal(BN_SHAPE) * rng.uniform(0.5, 3.0, c)[None, :, None, None] + step)
            tx = T(x)
            bn.zero_grad()
            y = bn(tx)
            dy = f32(rng.standard_normal(BN_SHAPE))
            y.backward(torch.tensor(dy, dtype=torch.float64))
            for k, v in dict(x=x, dy=dy, y=y.detach().numpy(), dx=tx.grad.numpy(), dweight=bn.weight.grad.numpy(),
                             dbias=bn.bias.grad.numpy(), running_mean=bn.running_mean.numpy(),
                             running_var=bn.running_var.numpy()).items():
                out[f"bn/{tag}/step{step}/{k}"] = np.array(v)  # a copy: torch updates its buffers in place
        out[f"bn/{tag}/num_batches_tracked"] = np.array(int(bn.num_batches_tracked), np.int64)
        bn.eval()
        x = f32(rng.standard_normal(BN_SHAPE))
        tx = T(x)
        y = bn(tx)
        dy = f32(rng.standard_normal(BN_SHAPE))
        y.backward(torch.tensor(dy, dtype=torch.float64))
        for k, v in dict(x=x, dy=dy, y=y.detach().numpy(), dx=tx.grad.numpy()).items():
            out[f"bn/{tag}/eval/{k}"] = v

    for name, seed, step, shape, p in DROPOUT_CASES:
        n = int(np.prod(shape))
        mask = keep_mask(seed, step, n, p).reshape(shape)
        x = f32(rng.standard_normal(shape))
        tx = T(x)
        y = tx * torch.tensor(mask, dtype=torch.float64) / (1 - p)  # dropout's definition given the mask
        dy = f32(rng.standard_normal(shape))
        y.backward(torch.tensor(dy, dtype=torch.float64))
        for k, v in dict(x=x, dy=dy, mask=mask, y=y.detach().numpy(), dx=tx.grad.numpy(),
                         meta=np.array([seed, step], np.int64), p=np.array(p)).items():
            out[f"dropout/{name}/{k}"] = v
    np.savez_compressed(HERE / "torch_layers.npz", **out)
    print(f"wrote {HERE / 'torch_layers.npz'} ({len(out)} arrays, torch {torch.__version__})")

    models = make_models(torch, tnn, rng)
    np.savez_compressed(HERE / "torch_models.npz", **models)
    print(f"wrote {HERE / 'torch_models.npz'} ({len(models)} arrays)")


# --- the models, as gpu_cnn.models builds them, in PyTorch ------------------------------------------

MODEL_WIDTH = 4
MODEL_INPUT = (3, 9, 9)  # odd size: the stride-2 stages round
MODEL_CLASSES = 5


def make_models(torch, tnn, rng):
    class Residual(tnn.Module):
        def __init__(self, block, shortcut=None):
            super().__init__()
            self.block = block
            if shortcut is not None:
                self.shortcut = shortcut
            self.has_shortcut = shortcut is not None

        def forward(self, x):
            return self.block(x) + (self.shortcut(x) if self.has_shortcut else x)

    def basic(c_in, c_out, stride):
        block = tnn.Sequential(tnn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), tnn.BatchNorm2d(c_out), tnn.ReLU(),
                               tnn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), tnn.BatchNorm2d(c_out))
        short = None
        if stride != 1 or c_in != c_out:
            short = tnn.Sequential(tnn.Conv2d(c_in, c_out, 1, stride, bias=False), tnn.BatchNorm2d(c_out))
        return [Residual(block, short), tnn.ReLU()]

    def sep(c_in, c_out, stride):
        return [tnn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), tnn.BatchNorm2d(c_in), tnn.ReLU(),
                tnn.Conv2d(c_in, c_out, 1, bias=False), tnn.BatchNorm2d(c_out), tnn.ReLU()]

    w, c_in, k = MODEL_WIDTH, MODEL_INPUT[0], MODEL_CLASSES
    nets = {
        "resnet8": tnn.Sequential(tnn.Conv2d(c_in, w, 3, 1, 1, bias=False), tnn.BatchNorm2d(w), tnn.ReLU(),
                                  *basic(w, w, 1), *basic(w, 2 * w, 2), *basic(2 * w, 4 * w, 2),
                                  tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(4 * w, k)),
        "mobilenet_tiny": tnn.Sequential(tnn.Conv2d(c_in, w, 3, 1, 1, bias=False), tnn.BatchNorm2d(w), tnn.ReLU(),
                                         *sep(w, 2 * w, 1), *sep(2 * w, 4 * w, 2), *sep(4 * w, 4 * w, 1),
                                         tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(4 * w, k)),
    }
    out = {}
    for name, net in nets.items():
        torch.manual_seed(7)
        net = net.double()
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        net.train()
        for _ in range(2):  # a couple of steps: weights and running statistics move off their init
            x = torch.tensor(rng.standard_normal((8,) + MODEL_INPUT) * 2 + 0.5)
            y = torch.tensor(rng.integers(0, k, 8))
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        net.eval()
        x = rng.standard_normal((3,) + MODEL_INPUT).astype(np.float32)
        with torch.no_grad():
            logits = net(torch.tensor(x, dtype=torch.float64)).numpy()
        for key, v in net.state_dict().items():
            v = v.numpy()
            out[f"{name}/state/{key}"] = v.astype(np.int64) if key.endswith("num_batches_tracked") else v.astype(np.float32)
        out[f"{name}/x"] = x
        out[f"{name}/logits"] = logits
    return out


if __name__ == "__main__":
    main()
