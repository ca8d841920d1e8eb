"""Training loop: ``Trainer(model, optimizer, lr, batch_size, seed).fit(data, epochs, val_data)``.

Every buffer a step needs is planned on the first batch (the layers' workspaces, the input and label
staging, the loss buffers, the optimizer state), so later steps allocate no device memory.
"""
import math
import numbers
import os
import sys
import time

import numpy as np

from . import backend as _backend
from . import functional as F
from .memory import HostStaging, Workspace
from .ops import _base


class TrainingError(RuntimeError):
    """Training stopped (a non-finite loss or weight, or a diverging loss); the model holds the last
    good weights."""


# An epoch whose mean training loss exceeds this many times the reference (see Trainer) has diverged.
DIVERGENCE_FACTOR = 100.0


def _check_images(name, x):
    """The one rule for images on the host, in fit, evaluate, train_step and predict: floating point,
    finite, and within float32's range (the staging copy to float32 would make larger values inf)."""
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name}: images must be floating point, got {x.dtype}")
    if x.size and not np.isfinite(x).all():
        bad = int(np.count_nonzero(~np.isfinite(x).reshape(len(x), -1).all(axis=1))) if x.ndim else 1
        raise ValueError(f"{name}: {bad} image(s) hold NaN or infinite values")
    _base.check_float32_range(name, x)


def _arrays(data, name):
    """(images float, labels int) from a gpu_cnn.data.Dataset or an (images, labels) pair, checked: a
    batch (N, ...) of finite floats (the model says which shape it takes), 1-D integer labels, one
    label an image."""
    if hasattr(data, "images") and hasattr(data, "labels"):
        x, y = data.images, data.labels
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
    else:
        raise TypeError(f"{name}: expected a gpu_cnn.data.Dataset or an (images, labels) pair, got {type(data).__name__}")
    x, y = _base.host_array(f"{name} images", x), np.asarray(y)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name}: images must be floating point, got {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"{name}: images must be a batch (N, ...) such as (N, C, H, W), got shape {x.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"{name}: labels must be integer class ids, got {y.dtype}")
    if y.ndim != 1:
        raise ValueError(f"{name}: labels must be 1-D (N,), got shape {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: {x.shape[0]} images but {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: no samples")
    _check_images(name, x)
    return x, y


def _int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return int(value)


class Trainer:
    """Fits a :class:`gpu_cnn.nn.Sequential` classifier with softmax cross-entropy.

    optimizer: "sgd" (with ``momentum``), "adam" or "adamw"; seed: shuffling (and the validation split);
    val_split: fraction of the training data held out when ``fit`` gets no ``val_data``;
    progress: show a tqdm bar (default: only when stderr is a terminal);
    checkpoint_path: where to save the model after every good epoch, the LAST checkpoint; the BEST one
    so far (lowest validation loss, or training loss without validation data) goes beside it as
    :func:`gpu_cnn.checkpoint.best_path` names it (``model.npz`` -> ``model.best.npz``). Their metadata
    say which they are (``"checkpoint": "last"`` or ``"best"``, ``"selected_by"``, ``"epoch"``). A
    failed or diverged epoch writes neither, so neither is ever replaced by a worse model;
    divergence_factor: training stops with :class:`TrainingError`, restoring the last good epoch,
    when a loss or a weight becomes NaN/inf, or when an epoch's mean training loss exceeds
    ``divergence_factor`` × the reference: the larger of the first step's loss (the starting model's)
    and ln(classes) (a uniform guess's). Default :data:`DIVERGENCE_FACTOR` (100); None turns the
    loss test off (non-finite values still stop);
    progress_interval: seconds between the bar's refreshes of loss and accuracy (default 0.5). On the
    kernel backends ``fit`` keeps the loss sum, the correct count and a non-finite flag on the device and
    reads them only at these refreshes and at the end of an epoch, never every step (a NaN loss is then
    found at the next read: the epoch is rolled back all the same, and the error names its step);
    checkpoint_path: where to save the model after every good epoch (kept if training later fails);
    distributed: data-parallel over MPI/NCCL ranks (gpu_cnn.distributed); None = on when launched by
    mpiexec/srun with $GPU_CNN_DISTRIBUTED=1. batch_size is then the global batch, split across ranks
    (each step then reads its loss back: the ranks agree on a NaN at every step);
    planned_step: on the kernel backends, ``fit`` records a full batch's launches on its second and third
    steps and, if they agree, replays them from then on without the layers' Python (gpu_cnn.graph;
    ``trainer.planner.reason`` says why a step was not planned, e.g. Dropout's per-step mask);
    cuda_graph: on ``cuda``, replay the planned step as one CUDA graph launch (None: wherever capture
    works; a failed capture warns once and falls back to the launches). Needs a fixed batch size: the
    last, partial batch of an epoch runs eagerly. On ``sim`` and ``cpu`` it is accepted and has no effect.
    """

    def __init__(self, model, optimizer="sgd", lr=0.01, batch_size=64, seed=0, momentum=0.9,
                 weight_decay=None, val_split=0.0, progress=None, checkpoint_path=None, metadata=None,
                 divergence_factor=DIVERGENCE_FACTOR, progress_interval=0.5, distributed=None,
                 cuda_graph=None, planned_step=True):
        from .nn import Module
        from .optim import OPTIMIZERS, make_optimizer

        if not isinstance(model, Module):
            raise TypeError(f"model: expected a gpu_cnn.nn model (Sequential), got {type(model).__name__}")
        if not isinstance(optimizer, str) or optimizer.lower() not in OPTIMIZERS:
            raise ValueError(f"optimizer: expected one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
        optimizer = optimizer.lower()
        batch_size = _int("batch_size", batch_size, 1)
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr: expected a positive finite number, got {lr!r}")
        if isinstance(val_split, bool) or not isinstance(val_split, numbers.Real) or not 0.0 <= val_split < 1.0:
            raise ValueError(f"val_split: expected a fraction in [0, 1), got {val_split!r}")
        seed = None if seed is None else _int("seed", seed, 0)
        if divergence_factor is not None and (
                isinstance(divergence_factor, bool) or not isinstance(divergence_factor, numbers.Real)
                or not (math.isfinite(divergence_factor) and divergence_factor > 1)):
            raise ValueError(f"divergence_factor: expected a finite number > 1 or None, got {divergence_factor!r}")
        self.divergence_factor = None if divergence_factor is None else float(divergence_factor)
        self._loss_ref = None  # the divergence test's reference, set on the first step
        self._best = None  # (metric, epoch) of the best checkpoint written
        self.dp = _data_parallel(distributed)  # distributed hook: None on one process
        if self.dp:
            seed = self.dp.common_seed(seed)  # every rank shuffles alike, so the shards never overlap
        if checkpoint_path is not None:  # its folder may not exist yet (save makes it), but must be makeable
            folder = os.path.dirname(os.path.abspath(os.fspath(checkpoint_path)))
            existing = folder
            while not os.path.exists(existing):
                existing = os.path.dirname(existing)
            if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
                raise ValueError(f"checkpoint_path: cannot write to {folder} ({existing} is not a writable folder)")
        self.model, self.batch_size, self.seed = model, batch_size, seed
        self.val_split = float(val_split)
        self.progress = progress
        if (isinstance(progress_interval, bool) or not isinstance(progress_interval, numbers.Real)
                or not (math.isfinite(progress_interval) and progress_interval > 0)):
            raise ValueError(f"progress_interval: expected a positive number of seconds, got {progress_interval!r}")
        self.progress_interval = float(progress_interval)
        self.checkpoint_path = checkpoint_path
        from .checkpoint import RESERVED_KEYS, _check_metadata

        self.metadata = _check_metadata(metadata)  # a dict with str keys, named in the error otherwise
        reserved = sorted(set(self.metadata) & (set(RESERVED_KEYS) | set(_RUN_KEYS)))
        if reserved:
            raise ValueError(f"metadata: key {reserved[0]!r} is reserved (the checkpoint writes it itself)")
        kw = {} if weight_decay is None else {"weight_decay": weight_decay}
        if optimizer == "sgd":
            kw["momentum"] = momentum
        # one flat buffer of parameters and one of gradients: the optimizer updates the model in one launch
        flat = model.flatten_parameters()
        pairs = [(p.data, p.grad) for p in model.parameters()]
        self.optimizer = make_optimizer(optimizer, pairs, float(lr), flat=flat, **kw)
        self.optimizer_name = optimizer
        if self.dp:
            self.dp.broadcast_parameters(model)  # every rank starts from rank 0's weights
        self._saved = False  # whether a checkpoint was written by this trainer
        if cuda_graph not in (None, True, False):
            raise TypeError(f"cuda_graph: expected True, False or None, got {cuda_graph!r}")
        if not isinstance(planned_step, bool):
            raise TypeError(f"planned_step: expected True or False, got {planned_step!r}")
        from .graph import StepPlanner

        self.planner = StepPlanner(cuda_graph=cuda_graph, enabled=planned_step)
        self.ws = Workspace("loss")
        self.staging = HostStaging()
        self._feeder = None  # fit's double-buffered batches to the device (memory.BatchFeeder), made once
        self._step_acc = self._step_seen = None  # train_step's running device metrics and their last read
        self.rng = np.random.default_rng(seed)
        self.history = []

    # -- one batch
    def _images(self, x):
        """The model's input: a device batch is used where it lies, a host batch is staged."""
        if _base.is_device_array(x):
            if not _backend.uses_kernels():
                raise TypeError("x: a device array needs the cuda (or sim) backend; on cpu pass a NumPy array")
            return x  # the first layer validates dtype, layout and shape
        x = _base.host_array("x", x)
        _check_images("x", x)  # fit's rule (fit checked its data already; this pass is cheap next to a step)
        return self.staging.to_backend("x", x)

    def _labels(self, y, classes):
        """(labels on the backend as int32, labels on the host) from host ints or a device int32 array."""
        if _base.is_device_array(y):
            if not _backend.uses_kernels():
                raise TypeError("y: a device array needs the cuda (or sim) backend; on cpu pass a NumPy array")
            dev = _base._as_cuda_array(y)  # Numba, CuPy or PyTorch alike (their dtypes are not NumPy's)
            if np.dtype(dev.dtype) != np.int32 or len(dev.shape) != 1:
                raise TypeError(f"y: a device label array must be 1-D int32, got {np.dtype(dev.dtype).name} "
                                f"of shape {tuple(dev.shape)}")
            return dev, dev.copy_to_host()  # host labels: 4 bytes an image, for the accuracy
        y = np.asarray(y)
        if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
            raise TypeError(f"y: expected 1-D integer class ids, got {y.dtype.name} of shape {y.shape}")
        _base.check_class_ids("y", y, classes)  # before the int32 cast, which could wrap
        return self.staging.to_backend("labels", y.astype(np.int32, copy=False), np.int32), y

    def _loss(self, logits, y):
        labels, y_host = self._labels(y, logits.shape[1])
        probs = self.ws.get("probs", logits.shape)
        loss, probs = F.softmax_cross_entropy(logits, labels, out=probs)
        return float(loss), probs, labels, y_host

    def train_step(self, x, y):
        """One step on a batch: images x (N, C, H, W) float32 and class ids y (N,), each on the host
        (staged through pinned buffers) or already on the device (used in place; y then int32).
        Returns (loss, number correct)."""
        if _backend.uses_kernels() and not self.dp:
            return self._kernel_train_step(x, y)
        logits = self.model.forward(self._images(x))
        loss, probs, labels, y_host = self._loss(logits, y)
        if self.dp:  # distributed hook: all ranks agree on a NaN and learn the global batch size
            n_local = self.dp.pop_local_count(len(y_host))
            n_global, finite = self.dp.step_counts(n_local, math.isfinite(loss))
            if not finite:
                return math.nan, 0
        elif not math.isfinite(loss):
            return loss, 0
        dlogits = self.ws.get("dlogits", logits.shape)
        F.softmax_cross_entropy_backward(probs, labels, out=dlogits)
        self.model.backward(dlogits)
        if self.dp:  # distributed hook: the gradient of the global batch's mean loss on every rank
            self.dp.all_reduce_gradients(self.model.parameters(), n_local, n_global)
        self.optimizer.step()
        return loss, int((_host(probs).argmax(axis=1) == y_host).sum())

    def _kernel_train_step(self, x, y):
        """train_step on cuda/sim: the loss, its gradient and the batch's metrics in one launch
        (kernels.metrics.train_loss_step), read back once; no backward and no update on a non-finite loss."""
        from .kernels import metrics as kmetrics

        logits = self.model.forward(self._images(x))
        n, c = logits.shape
        labels, y_host = self._labels(y, c)
        if _base.is_device_array(y):
            _base.check_class_ids("y", y_host, c)  # host labels were checked by _labels, before the int32 cast
        if self._step_acc is None:  # a running accumulator, set once: a step reads the change, copies nothing in
            self._step_acc = kmetrics.reset(self.ws.get("step_metrics", (kmetrics.SLOTS,), np.float64))
            self._step_seen = np.array(kmetrics.EMPTY)
        dlogits = self.ws.get("dlogits", (n, c))
        kmetrics.train_loss_step(logits, labels, dlogits, self._step_acc)
        a, before = self._step_acc.copy_to_host(), self._step_seen
        self._step_seen = a
        if a[2] > before[2]:  # a row's loss is NaN or infinite: reported, nothing learnt from it
            return (float(a[4]) if before[2] == 0 else math.nan), 0  # acc[4]: the first such loss ever seen
        self.model.backward(dlogits)
        self.optimizer.step()
        return float(a[0] - before[0]) / n, int(round(a[1] - before[1]))

    def _device_step(self, batch, step, following=None):
        """train_step for fit on the kernel backends, with nothing read back. ``batch``: a BatchFeeder slot
        already being copied to the device (images and labels were checked when fit got them); the loss
        goes straight to the device accumulator (kernels.metrics), which numbers the batches itself
        (acc[5]: the same count as ``step`` since the epoch's reset). ``following``: the next host batch
        (x, y), whose copy starts once this step's launches are queued; returns its slot."""
        _, xd, labels = batch
        self._feeder.ready(batch)
        self.planner.step(labels.shape[0], (xd, labels), lambda: self._device_compute(xd, labels),
                          token=self.optimizer.lr)
        self._feeder.consumed(batch)
        return self._feeder.put(*following) if following is not None else None

    def _device_compute(self, xd, labels):
        """What a device step launches once its inputs are on the device (recorded and replayed by the
        planner: see gpu_cnn.graph)."""
        from .kernels import metrics as kmetrics

        logits = self.model.forward(xd)
        n, c = logits.shape
        dlogits = self.ws.get("dlogits", (n, c))
        kmetrics.train_loss_step(logits, labels, dlogits, self._acc)  # softmax, loss, dlogits, metrics: one launch
        self.model.backward(dlogits)
        self.optimizer.step()

    def _read_metrics(self):
        """(loss sum, correct, first bad step or None, its loss) of the epoch so far: one small device read."""
        a = self._acc.copy_to_host()
        return float(a[0]), int(a[1]), (int(a[3]) if a[2] > 0 else None), float(a[4])

    # -- checks made before the first step, so that bad data never leaves a half-trained model
    def _check_fits_model(self, name, x, y):
        """The images fit the model's input and the labels its output classes."""
        try:
            out = self.model.output_shape(x.shape[1:])
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{name}: images of shape {x.shape[1:]} do not fit the model: {exc}") from None
        _base.check_class_ids(name, np.asarray(y), int(np.prod(out)), " (the model's outputs)")
        return int(np.prod(out))

    def _snapshot(self):
        return self.model.state_dict(), self.optimizer.state_dict()

    def _restore(self, snapshot):
        model_state, optimizer_state = snapshot
        self.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(optimizer_state)

    # -- loops
    def fit(self, train_data, epochs=1, val_data=None):
        """Train for `epochs`; returns the history, a list of per-epoch metric dicts.

        Everything is checked before the first step. If an epoch fails (a NaN loss, an interrupt, any
        error), the model and the optimizer are restored to where they were before that epoch."""
        epochs = _int("epochs", epochs, 1)
        x, y = _arrays(train_data, "train_data")
        if val_data is None and self.val_split > 0:
            n_val = max(1, int(round(len(y) * self.val_split)))
            if n_val >= len(y):
                raise ValueError(f"val_split: {self.val_split} of {len(y)} samples leaves no training data")
            order = np.random.default_rng(self.seed).permutation(len(y))
            val_data = (x[order[:n_val]], y[order[:n_val]])
            x, y = x[order[n_val:]], y[order[n_val:]]
        classes = self._check_fits_model("train_data", x, y)
        if val_data is not None:
            vx, vy = _arrays(val_data, "val_data")
            self._check_fits_model("val_data", vx, vy)
            val_data = (vx, vy)
        good = self._snapshot()
        self.planner.reset()  # a plan lives within one fit: layers or buffers may change between fits
        for _ in range(epochs):
            epoch = len(self.history) + 1
            t0 = time.perf_counter()
            order = self.rng.permutation(len(y))
            total_loss, correct, seen = 0.0, 0, 0
            bar = self._bar(len(y), f"epoch {epoch}")
            on_device = _backend.uses_kernels() and not self.dp  # distributed: train_step, agreed each step
            if on_device:
                from .kernels import metrics as kmetrics

                self._acc = kmetrics.reset(self.ws.get("metrics", (kmetrics.SLOTS,), np.float64))
                if self._feeder is None:
                    from .memory import BatchFeeder

                    self._feeder = BatchFeeder()
                pending = self._feeder.put(x[order[:self.batch_size]], y[order[:self.batch_size]])
            shown = time.perf_counter()
            try:
                for start in range(0, len(y), self.batch_size):
                    idx = order[start:start + self.batch_size]
                    step = start // self.batch_size + 1
                    n_here = len(idx)
                    if self.dp:  # distributed hook: this rank's shard of the global batch
                        idx, n_here = self.dp.shard(idx)
                    seen += n_here
                    if on_device:  # nothing read back: the loss and the accuracy accumulate on the device
                        nxt = order[start + self.batch_size:start + 2 * self.batch_size]
                        pending = self._device_step(pending, step, (x[nxt], y[nxt]) if len(nxt) else None)
                        if self._loss_ref is None:  # one read in the Trainer's life: the first step's loss
                            first, _, bad_step, bad_loss = self._read_metrics()
                            if bad_step is not None:
                                self._fail(epoch, bad_step, bad_loss, good)
                            self._loss_ref = max(first / len(idx), math.log(max(classes, 2)))
                        refresh = not bar.disable and time.perf_counter() - shown >= self.progress_interval
                        if refresh or start + self.batch_size >= len(y):
                            total_loss, correct, bad_step, bad_loss = self._read_metrics()
                            if bad_step is not None:
                                self._fail(epoch, bad_step, bad_loss, good)
                    else:
                        with np.errstate(over="ignore", invalid="ignore"):  # a diverging step is reported below
                            loss, ok = self.train_step(x[idx], y[idx])
                        if not math.isfinite(loss):
                            self._fail(epoch, step, loss, good)
                        if self._loss_ref is None:
                            self._loss_ref = max(loss, math.log(max(classes, 2)))
                        total_loss += loss * n_here
                        correct += ok if n_here else 0
                        refresh = not bar.disable
                    bar.update(n_here)
                    if refresh and seen:
                        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
                        shown = time.perf_counter()
                if self.dp:  # distributed hook: metrics over all ranks
                    total_loss, correct, seen = self.dp.sum_metrics(total_loss, correct, seen)
                row = {"epoch": epoch, "train_loss": total_loss / seen, "train_acc": correct / seen,
                       "seconds": time.perf_counter() - t0}
                snapshot = self._snapshot()
                self._check_diverged(epoch, row["train_loss"], snapshot, good)
                if val_data is not None:
                    m = self.evaluate(val_data)
                    row.update(val_loss=m["loss"], val_acc=m["accuracy"])
                    if not math.isfinite(m["loss"]):
                        self._diverged(epoch, f"the validation loss became {m['loss']}", good)
                if self.checkpoint_path:
                    self._save(row)
            except TrainingError:
                raise
            except BaseException as exc:  # an error or an interrupt mid-epoch: back to the last whole epoch
                self._restore(good)
                if self.dp:  # distributed hook: one rank's failure stops every rank, with its error
                    self.dp.abort(exc)
                raise
            finally:
                bar.close()
            self.history.append(row)
            good = snapshot
        return self.history

    def evaluate(self, data):
        """{"loss", "accuracy", "n"} over `data`, in batches of the training batch size."""
        x, y = _arrays(data, "data")
        self._check_fits_model("data", x, y)
        n = len(y)
        if self.dp:  # distributed hook: each rank evaluates every size-th image
            x, y = x[self.dp.rank::self.dp.size], y[self.dp.rank::self.dp.size]
        total, correct = 0.0, 0
        was_training = self.model.training
        self.model.eval()  # BatchNorm's running statistics, no Dropout
        try:
            for start in range(0, len(y), self.batch_size):
                xb, yb = x[start:start + self.batch_size], y[start:start + self.batch_size]
                logits = self.model.forward(self._images(xb))
                loss, probs, _, _ = self._loss(logits, yb)
                total += loss * len(yb)
                correct += int((_host(probs).argmax(axis=1) == yb).sum())
        finally:
            self.model.train(was_training)
        if self.dp:
            total, correct = self.dp.sum_metrics(total, correct)
        return {"loss": total / n, "accuracy": correct / n, "n": int(n)}

    def predict(self, x):
        """Class probabilities (host, float32) for a batch of images (N, C, H, W)."""
        x = _base.host_array("x", x)
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"x: images must be floating point, got {x.dtype}")
        if x.ndim < 2:
            raise ValueError(f"x: expected a batch of images (N, ...) (one image: x[None]), got shape {x.shape}")
        _check_images("x", x)  # as fit: NaN images would give NaN probabilities
        try:
            classes = int(np.prod(self.model.output_shape(x.shape[1:])))
        except ValueError as exc:
            raise ValueError(f"x: images of shape {x.shape[1:]} do not fit the model (one image: x[None]): "
                             f"{exc}") from None
        x = x.astype(np.float32, copy=False)
        if x.shape[0] == 0:
            return np.zeros((0, classes), np.float32)
        out = []
        was_training = self.model.training
        self.model.eval()  # BatchNorm's running statistics, no Dropout
        try:
            for start in range(0, x.shape[0], self.batch_size):
                logits = _host(self.model.forward(self.staging.to_backend("x", x[start:start + self.batch_size])))
                out.append(_softmax(logits))
        finally:
            self.model.train(was_training)
        return np.concatenate(out)

    # -- helpers
    def _bar(self, total, desc):
        show = self.progress if self.progress is not None else sys.stderr.isatty()
        show = show and (not self.dp or self.dp.is_root)  # one bar, rank 0's
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="img", leave=False, disable=not show)

    def _save(self, row):
        """Write the last checkpoint, and the best one when this epoch is the best so far."""
        from .checkpoint import best_path, save

        if self.dp and not self.dp.is_root:  # distributed hook: only rank 0 writes
            return
        by = "val_loss" if "val_loss" in row else "train_loss"
        meta = dict(self.metadata, epoch=row["epoch"], metrics=row, backend=_backend.get_backend(),
                    selected_by=by)
        save(self.model, self.checkpoint_path, metadata=dict(meta, checkpoint="last"))
        self._saved = True
        if self._best is None or row[by] < self._best[0]:
            save(self.model, best_path(self.checkpoint_path), metadata=dict(meta, checkpoint="best"))
            self._best = (row[by], row["epoch"])

    def _check_diverged(self, epoch, loss, snapshot, good):
        """Stop on non-finite weights, or an epoch loss divergence_factor × above the reference."""
        for name, value in snapshot[0].items():
            if not np.isfinite(value).all():
                self._diverged(epoch, f"weight {name!r} became NaN or infinite", good)
        if self.divergence_factor is not None and loss > self.divergence_factor * self._loss_ref:
            self._diverged(epoch, f"the mean training loss {loss:.6g} is more than divergence_factor="
                                  f"{self.divergence_factor:g} times the reference {self._loss_ref:.6g} (the "
                                  f"larger of the first step's loss and ln(classes))", good)

    def _fail(self, epoch, step, loss, good):
        self._diverged(epoch, f"loss became {loss} at epoch {epoch}, step {step}", good)

    def _diverged(self, epoch, what, good):
        self._restore(good)
        where = f"; the last good checkpoint is kept at {self.checkpoint_path}" if self._saved else ""
        raise TrainingError(
            f"{what}: training stopped (epoch {epoch} diverged) and the model and the optimizer were restored "
            f"to where they were before epoch {epoch}{where}. Try a lower learning rate "
            f"(lr={self.optimizer.lr}): set trainer.optimizer.lr and call fit again."
        )


def _data_parallel(distributed):
    """The gpu_cnn.distributed hooks, or None for one process (distributed=None: automatic)."""
    from . import distributed as dist

    if distributed is None:
        distributed = dist.requested() and dist.launched_size() > 1
    if not isinstance(distributed, bool):
        raise TypeError(f"distributed: expected True, False or None, got {distributed!r}")
    return dist.DataParallel() if distributed else None


# metadata keys the Trainer writes into its checkpoints itself
_RUN_KEYS = ("checkpoint", "selected_by")


def _host(a):
    return a if isinstance(a, np.ndarray) else a.copy_to_host()


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
