"""Record torch.optim trajectories for tests/test_optim.py (needs PyTorch; not a dependency).

    python tests/data/make_torch_optim.py        # writes tests/data/torch_optim.json

The test compares gpu_cnn's optimizers with these values on every run, and re-runs torch itself
where it is installed, so the file cannot drift from what PyTorch computes.
"""
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHAPES = [(7,), (3, 5)]
STEPS = 5
LRS = [0.1, 0.1, 0.1, 0.04, 0.04]
CASES = [
    ("sgd", {}), ("sgd", {"weight_decay": 0.05}), ("sgd", {"momentum": 0.9}),
    ("sgd", {"momentum": 0.9, "nesterov": True}), ("sgd", {"momentum": 0.8, "dampening": 0.3}),
    ("sgd", {"momentum": 0.9, "weight_decay": 0.05, "nesterov": True}),
    ("adam", {}), ("adam", {"weight_decay": 0.1}), ("adam", {"betas": [0.8, 0.99], "eps": 1e-3}),
    ("adam", {"weight_decay": 0.1, "decoupled": True}),
]


def problem(seed=2026):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [[(rng.standard_normal(s) * rng.choice([0.01, 1.0, 3.0], size=s)).astype(np.float32) for s in SHAPES]
             for _ in range(STEPS)]
    return params, grads


def torch_trajectory(torch, kind, kw, params, grads, lrs):
    """Final params and state (momentum_buffer / exp_avg / exp_avg_sq) of torch.optim in float64."""
    tps = [torch.tensor(np.asarray(p, np.float64), requires_grad=True) for p in params]
    if kind == "sgd":
        opt = torch.optim.SGD(tps, lr=lrs[0], **kw)
    else:
        tkw = {k: (tuple(v) if k == "betas" else v) for k, v in kw.items() if k != "decoupled"}
        cls = torch.optim.AdamW if kw.get("decoupled") else torch.optim.Adam
        opt = cls(tps, lr=lrs[0], **({"weight_decay": 0.0} | tkw))  # AdamW's own default is 1e-2
    for step_grads, lr in zip(grads, lrs):
        for tp, g in zip(tps, step_grads):
            tp.grad = torch.tensor(np.asarray(g, np.float64))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
    state = {}
    for name in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
        if name in opt.state[tps[0]] and opt.state[tps[0]][name] is not None:
            state[name] = [opt.state[tp][name].numpy().tolist() for tp in tps]
    return [tp.detach().numpy().tolist() for tp in tps], state


def main():
    import torch

    params, grads = problem()
    record = {
        "torch": torch.__version__, "lrs": LRS,
        "params": [p.tolist() for p in params], "grads": [[g.tolist() for g in gs] for gs in grads],
        "cases": [],
    }
    for kind, kw in CASES:
        final, state = torch_trajectory(torch, kind, kw, params, grads, LRS)
        record["cases"].append({"kind": kind, "kw": kw, "params": final, "state": state})
    out = HERE / "torch_optim.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out} (torch {torch.__version__}, {len(CASES)} cases)")


if __name__ == "__main__":
    sys.exit(main())
