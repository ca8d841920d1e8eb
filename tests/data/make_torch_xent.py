"""Record torch.nn.functional.cross_entropy in float64 for tests/test_softmax.py (needs PyTorch; not a
dependency).

    python tests/data/make_torch_xent.py        # writes tests/data/torch_xent.json

Each case: logits, integer targets, optional class weights, ignore_index, label_smoothing, reduction;
PyTorch's loss (a scalar, or the per-row losses for "none") and d(loss)/d(logits) (for "none", of the
sum of the per-row losses). The test compares gpu_cnn's cpu and kernel backends with these values.
"""
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def cases(seed=2026):
    rng = np.random.default_rng(seed)
    out = []
    shapes = [((5, 7), (5,)), ((3, 4, 2, 3), (3, 2, 3)), ((6,), ())]
    for logits_shape, target_shape in shapes:
        c = logits_shape[0] if len(logits_shape) == 1 else logits_shape[1]
        for weighted in (False, True):
            for eps in (0.0, 0.2):
                for reduction in ("mean", "sum", "none"):
                    z = (rng.standard_normal(logits_shape) * 2.0).astype(np.float32)
                    y = rng.integers(0, c, target_shape)
                    if y.size > 2:
                        y.flat[1] = -1  # ignored (ignore_index=-1)
                    w = rng.uniform(0.2, 2.0, c).astype(np.float32) if weighted else None
                    out.append(dict(logits=z.tolist(), labels=np.asarray(y).tolist(), weight=None if w is None else w.tolist(),
                                    ignore_index=-1, label_smoothing=eps, reduction=reduction))
    return out


def main():
    import torch

    recs = []
    for case in cases():
        z = torch.tensor(np.asarray(case["logits"], np.float64), requires_grad=True)
        y = torch.tensor(np.asarray(case["labels"], np.int64))
        w = None if case["weight"] is None else torch.tensor(np.asarray(case["weight"], np.float64))
        loss = torch.nn.functional.cross_entropy(z, y, weight=w, ignore_index=case["ignore_index"],
                                                 label_smoothing=case["label_smoothing"], reduction=case["reduction"])
        loss.sum().backward()
        recs.append(dict(case, loss=loss.detach().numpy().tolist(), grad=z.grad.numpy().tolist()))
    (HERE / "torch_xent.json").write_text(json.dumps({"torch": torch.__version__, "cases": recs}))
    print(f"wrote {len(recs)} cases to {HERE / 'torch_xent.json'}")


if __name__ == "__main__":
    main()
