"""Ready-made networks."""
from .nn import Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential, manual_seed, positive_int

MODELS = ("lenet5", "digits_cnn")

# The output layer starts this much smaller than nn.Linear's default (He) init, so that a fresh model's
# logits are near zero and its first loss near ln(num_classes) instead of 3-7 for ten classes.
OUTPUT_INIT_SCALE = 0.1


def _small_output_init(build):
    """Decorator for a model constructor: scale the last Linear's weight by OUTPUT_INIT_SCALE (nn.Linear's
    own default init is left as it is for users' layers)."""
    import functools

    @functools.wraps(build)
    def wrapper(*args, **kwargs):
        model = build(*args, **kwargs)
        last = [m for m in getattr(model, "layers", ()) if isinstance(m, Linear)]
        if last:
            w = last[-1].weight
            w.assign(w.numpy() * OUTPUT_INIT_SCALE)
        return model

    return wrapper


@_small_output_init
def lenet5(num_classes=10, seed=None):
    """LeNet-5 for 1×28×28 input, exactly as the PyTorch ``Sequential`` of the same name."""
    num_classes = positive_int("num_classes", num_classes)
    if seed is not None:
        manual_seed(seed)
    return Sequential(
        Conv2d(1, 6, 5, padding=2), ReLU(), MaxPool2d(2),
        Conv2d(6, 16, 5), ReLU(), MaxPool2d(2),
        Flatten(),
        Linear(400, 120), ReLU(),
        Linear(120, 84), ReLU(),
        Linear(84, num_classes),
    )


@_small_output_init
def digits_cnn(num_classes=10, seed=None):
    """A small CNN for scikit-learn's 1×8×8 digits: 8×8 → conv3 → 8×8 → pool → 4×4 → conv3 → pool → 2×2."""
    num_classes = positive_int("num_classes", num_classes)
    if seed is not None:
        manual_seed(seed)
    return Sequential(
        Conv2d(1, 16, 3, padding=1), ReLU(), MaxPool2d(2),
        Conv2d(16, 32, 3, padding=1), ReLU(), MaxPool2d(2),
        Flatten(),
        Linear(32 * 2 * 2, 64), ReLU(),
        Linear(64, num_classes),
    )


def get_model(name, num_classes=10, seed=None):
    """One of :data:`MODELS` by name; num_classes a positive int, seed a non-negative int or None."""
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"model: expected one of {', '.join(MODELS)}, got {name!r}")
    return globals()[name](num_classes=num_classes, seed=seed)
