"""Ready-made networks."""
from .nn import Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential, manual_seed, positive_int

MODELS = ("lenet5", "digits_cnn")


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
