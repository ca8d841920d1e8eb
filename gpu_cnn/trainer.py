"""Training loop: ``Trainer(model, optimizer, lr, batch_size, seed).fit(data, epochs, val_data)``.

Every buffer a step needs is planned on the first batch (the layers' workspaces, the input and label
staging, the loss buffers, the optimizer state), so later steps allocate no device memory.
"""
import math
import sys
import time

import numpy as np

from . import backend as _backend
from . import functional as F
from .memory import HostStaging, Workspace
from .ops import _base


class TrainingError(RuntimeError):
    """Training stopped (a NaN or infinite loss); the model holds the last good weights."""


def _arrays(data, name):
    """(images float32 NCHW, labels int) from a gpu_cnn.data.Dataset or an (images, labels) pair."""
    if hasattr(data, "images") and hasattr(data, "labels"):
        x, y = data.images, data.labels
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
    else:
        raise TypeError(f"{name}: expected a gpu_cnn.data.Dataset or an (images, labels) pair, got {type(data).__name__}")
    x, y = np.asarray(x), np.asarray(y)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name}: images must be floating point, got {x.dtype}")
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"{name}: labels must be integer class ids, got {y.dtype}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: {x.shape[0]} images but {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: no samples")
    return x, y


class Trainer:
    """Fits a :class:`gpu_cnn.nn.Sequential` classifier with softmax cross-entropy.

    optimizer: "sgd" (with ``momentum``), "adam" or "adamw"; seed: shuffling (and the validation split);
    val_split: fraction of the training data held out when ``fit`` gets no ``val_data``;
    progress: show a tqdm bar (default: only when stderr is a terminal);
    checkpoint_path: where to save the model after every good epoch (kept if training later fails).
    """

    def __init__(self, model, optimizer="sgd", lr=0.01, batch_size=64, seed=0, momentum=0.9,
                 weight_decay=None, val_split=0.0, progress=None, checkpoint_path=None, metadata=None):
        from .optim import make_optimizer

        if not (isinstance(batch_size, int) and batch_size > 0):
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr: expected a positive number, got {lr!r}")
        if not 0.0 <= val_split < 1.0:
            raise ValueError(f"val_split: expected a fraction in [0, 1), got {val_split!r}")
        self.model, self.batch_size, self.seed = model, batch_size, seed
        self.val_split = val_split
        self.progress = progress
        self.checkpoint_path = checkpoint_path
        self.metadata = dict(metadata or {})
        kw = {} if weight_decay is None else {"weight_decay": weight_decay}
        if optimizer == "sgd":
            kw["momentum"] = momentum
        pairs = [(p.data, p.grad) for p in model.parameters()]
        self.optimizer = make_optimizer(optimizer, pairs, lr, **kw)
        self.optimizer_name = optimizer
        self.ws = Workspace("loss")
        self.staging = HostStaging()
        self.rng = np.random.default_rng(seed)
        self.history = []

    # -- one batch
    def _images(self, x):
        """The model's input: a device batch is used where it lies, a host batch is staged."""
        if _base.is_device_array(x):
            if not _backend.uses_kernels():
                raise TypeError("x: a device array needs the cuda (or sim) backend; on cpu pass a NumPy array")
            return x  # the first layer validates dtype, layout and shape
        return self.staging.to_backend("x", x)

    def _labels(self, y):
        """(labels on the backend as int32, labels on the host) from host ints or a device int32 array."""
        if _base.is_device_array(y):
            if not _backend.uses_kernels():
                raise TypeError("y: a device array needs the cuda (or sim) backend; on cpu pass a NumPy array")
            if np.dtype(y.dtype) != np.int32 or len(y.shape) != 1:
                raise TypeError(f"y: a device label array must be 1-D int32, got {np.dtype(y.dtype).name} "
                                f"of shape {tuple(y.shape)}")
            return _base._as_cuda_array(y), _host(y)  # host labels: 4 bytes an image, for the accuracy
        y = np.asarray(y)
        if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
            raise TypeError(f"y: expected 1-D integer class ids, got {y.dtype.name} of shape {y.shape}")
        return self.staging.to_backend("labels", y.astype(np.int32, copy=False), np.int32), y

    def _loss(self, logits, y):
        labels, y_host = self._labels(y)
        probs = self.ws.get("probs", logits.shape)
        loss, probs = F.softmax_cross_entropy(logits, labels, out=probs)
        return float(loss), probs, labels, y_host

    def train_step(self, x, y):
        """One step on a batch: images x (N, C, H, W) float32 and class ids y (N,), each on the host
        (staged through pinned buffers) or already on the device (used in place; y then int32).
        Returns (loss, number correct)."""
        logits = self.model.forward(self._images(x))
        loss, probs, labels, y_host = self._loss(logits, y)
        if not math.isfinite(loss):
            return loss, 0
        dlogits = self.ws.get("dlogits", logits.shape)
        F.softmax_cross_entropy_backward(probs, labels, out=dlogits)
        self.model.backward(dlogits)
        self.optimizer.step()
        return loss, int((_host(probs).argmax(axis=1) == y_host).sum())

    # -- loops
    def fit(self, train_data, epochs=1, val_data=None):
        """Train for `epochs`; returns the history, a list of per-epoch metric dicts."""
        if not (isinstance(epochs, int) and epochs > 0):
            raise ValueError(f"epochs: expected a positive int, got {epochs!r}")
        x, y = _arrays(train_data, "train_data")
        if val_data is None and self.val_split > 0:
            order = np.random.default_rng(self.seed).permutation(len(y))
            n_val = max(1, int(round(len(y) * self.val_split)))
            val_data = (x[order[:n_val]], y[order[:n_val]])
            x, y = x[order[n_val:]], y[order[n_val:]]
        good_state = self.model.state_dict()
        for _ in range(epochs):
            epoch = len(self.history) + 1
            t0 = time.perf_counter()
            order = self.rng.permutation(len(y))
            total_loss, correct, seen = 0.0, 0, 0
            bar = self._bar(len(y), f"epoch {epoch}")
            for start in range(0, len(y), self.batch_size):
                idx = order[start:start + self.batch_size]
                loss, ok = self.train_step(x[idx], y[idx])
                if not math.isfinite(loss):
                    bar.close()
                    self._fail(epoch, start // self.batch_size + 1, loss, good_state)
                total_loss += loss * len(idx)
                correct += ok
                seen += len(idx)
                bar.update(len(idx))
                bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
            bar.close()
            row = {"epoch": epoch, "train_loss": total_loss / seen, "train_acc": correct / seen,
                   "seconds": time.perf_counter() - t0}
            if val_data is not None:
                m = self.evaluate(val_data)
                row.update(val_loss=m["loss"], val_acc=m["accuracy"])
            self.history.append(row)
            good_state = self.model.state_dict()
            if self.checkpoint_path:
                self._save(row)
        return self.history

    def evaluate(self, data):
        """{"loss", "accuracy", "n"} over `data`, in batches of the training batch size."""
        x, y = _arrays(data, "data")
        total, correct = 0.0, 0
        for start in range(0, len(y), self.batch_size):
            xb, yb = x[start:start + self.batch_size], y[start:start + self.batch_size]
            logits = self.model.forward(self._images(xb))
            loss, probs, _, _ = self._loss(logits, yb)
            total += loss * len(yb)
            correct += int((_host(probs).argmax(axis=1) == yb).sum())
        return {"loss": total / len(y), "accuracy": correct / len(y), "n": int(len(y))}

    def predict(self, x):
        """Class probabilities (host, float32) for a batch of images."""
        x = np.asarray(x, dtype=np.float32)
        out = []
        for start in range(0, x.shape[0], self.batch_size):
            logits = _host(self.model.forward(self.staging.to_backend("x", x[start:start + self.batch_size])))
            out.append(_softmax(logits))
        return np.concatenate(out)

    # -- helpers
    def _bar(self, total, desc):
        show = self.progress if self.progress is not None else sys.stderr.isatty()
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="img", leave=False, disable=not show)

    def _save(self, row):
        from .checkpoint import save

        meta = dict(self.metadata, epoch=row["epoch"], metrics=row, backend=_backend.get_backend())
        save(self.model, self.checkpoint_path, metadata=meta)

    def _fail(self, epoch, step, loss, good_state):
        self.model.load_state_dict(good_state)
        where = f"; the last good checkpoint is kept at {self.checkpoint_path}" if self.checkpoint_path else ""
        raise TrainingError(
            f"loss became {loss} at epoch {epoch}, step {step}: training stopped and the model was restored "
            f"to its weights before epoch {epoch}{where}. Try a lower learning rate (lr={self.optimizer.lr})."
        )


def _host(a):
    return a if isinstance(a, np.ndarray) else a.copy_to_host()


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
