"""Ready-made networks, and :data:`MODELS`, the registry the CLI's ``--model`` reads.

    lenet5          LeNet-5; for 1×28×28 exactly the PyTorch Sequential of that name, and for inputs
                    below 12×12 (the bundled 8×8 digits) the same layers with more padding and twice
                    the convolution channels
    digits_cnn      a small CNN for the 1×8×8 digits
    resnet8         a CIFAR-style ResNet-8: 3×3 stem, three stages of one residual block each (two 3×3
                    convolutions with BatchNorm; stages 2 and 3 halve the size, 1×1 strided shortcut),
                    global average pooling, a linear classifier
    mobilenet_tiny  depthwise-separable blocks (3×3 depthwise conv + BatchNorm + ReLU, then 1×1
                    pointwise conv + BatchNorm + ReLU), global average pooling, a linear classifier

Every builder takes ``num_classes``, ``seed`` (seeds the weight initialisation), ``in_channels`` and,
for the ones whose layers depend on it, ``input_size`` (an int or an (H, W) pair).
"""
from .nn import (
    AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU, Residual, Sequential, manual_seed,
    positive_int,
)

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


def _start(num_classes, seed):
    num_classes = positive_int("num_classes", num_classes)
    if seed is not None:
        manual_seed(seed)
    return num_classes


def _size(input_size):
    if isinstance(input_size, (tuple, list)) and len(input_size) == 2:
        return positive_int("input_size", input_size[0]), positive_int("input_size", input_size[1])
    s = positive_int("input_size", input_size)
    return s, s


@_small_output_init
def lenet5(num_classes=10, seed=None, in_channels=1, input_size=28):
    """LeNet-5. For 28×28 input (the default) exactly the PyTorch ``Sequential`` of the same name
    (conv 5×5 pad 2 → pool → conv 5×5 → pool → 400 → 120 → 84 → classes). Inputs too small for the
    unpadded second convolution (below 12×12, e.g. the 8×8 digits) are padded instead: the first
    convolution by 4 (as if the image sat on a canvas 8 larger), the second by 2; the convolutions have
    twice the channels (12 and 32, as the image has a twelfth of MNIST's pixels), and the first linear
    layer takes what is left (8×8: 32·3·3 = 288). On validation splits of the digits' training part
    (20 splits and seeds, `gpu-cnn train`'s lenet5 settings) the wider convolutions gave 98.9% where 6
    and 16 gave 98.7%, and a padding of 2 and 2, or no second pool, no better."""
    num_classes = _start(num_classes, seed)
    in_channels = positive_int("in_channels", in_channels)
    h, w = _size(input_size)
    small = min(h, w) < 12  # an unpadded 5×5 on the pooled 28-geometry needs >= 6 rows after the first pool
    pad1, pad2 = (4, 2) if small else (2, 0)
    c1, c2 = (12, 32) if small else (6, 16)
    h1, w1 = (h + 2 * pad1 - 4) // 2, (w + 2 * pad1 - 4) // 2  # after conv1 and the first pool
    h2, w2 = (h1 + 2 * pad2 - 4) // 2, (w1 + 2 * pad2 - 4) // 2
    return Sequential(
        Conv2d(in_channels, c1, 5, padding=pad1), ReLU(), MaxPool2d(2),
        Conv2d(c1, c2, 5, padding=pad2), ReLU(), MaxPool2d(2),
        Flatten(),
        Linear(c2 * h2 * w2, 120), ReLU(),
        Linear(120, 84), ReLU(),
        Linear(84, num_classes),
    )


@_small_output_init
def digits_cnn(num_classes=10, seed=None, in_channels=1):
    """A small CNN for scikit-learn's 1×8×8 digits: 8×8 → conv3 → 8×8 → pool → 4×4 → conv3 → pool → 2×2."""
    num_classes = _start(num_classes, seed)
    in_channels = positive_int("in_channels", in_channels)
    return Sequential(
        Conv2d(in_channels, 16, 3, padding=1), ReLU(), MaxPool2d(2),
        Conv2d(16, 32, 3, padding=1), ReLU(), MaxPool2d(2),
        Flatten(),
        Linear(32 * 2 * 2, 64), ReLU(),
        Linear(64, num_classes),
    )


def basic_block(c_in, c_out, stride=1):
    """ResNet's basic block: Residual(conv3×3(stride)-BN-ReLU-conv3×3-BN, shortcut), then ReLU. The
    shortcut is the identity when the shape is kept, else a 1×1 strided conv + BN."""
    block = Sequential(Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), BatchNorm2d(c_out), ReLU(),
                       Conv2d(c_out, c_out, 3, padding=1, bias=False), BatchNorm2d(c_out))
    shortcut = None
    if stride != 1 or c_in != c_out:
        shortcut = Sequential(Conv2d(c_in, c_out, 1, stride=stride, bias=False), BatchNorm2d(c_out))
    return [Residual(block, shortcut), ReLU()]


def resnet8(num_classes=10, in_channels=3, seed=None, width=16):
    """ResNet-8, CIFAR-style (He et al. 2016, section 4.2, n = 1): a 3×3 stem of ``width`` channels with
    BatchNorm, three stages of one basic block each (width, 2·width, 4·width channels; stages 2 and 3
    stride 2), global average pooling and a linear classifier: 8 weight layers. Any input size."""
    num_classes = _start(num_classes, seed)
    in_channels = positive_int("in_channels", in_channels)
    w = positive_int("width", width)
    return Sequential(
        Conv2d(in_channels, w, 3, padding=1, bias=False), BatchNorm2d(w), ReLU(),
        *basic_block(w, w, 1), *basic_block(w, 2 * w, 2), *basic_block(2 * w, 4 * w, 2),
        AdaptiveAvgPool2d(1), Flatten(), Linear(4 * w, num_classes),
    )


def separable_block(c_in, c_out, stride=1):
    """MobileNet's depthwise-separable block: 3×3 depthwise conv (groups = c_in) + BN + ReLU, then 1×1
    pointwise conv + BN + ReLU."""
    return [Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False), BatchNorm2d(c_in), ReLU(),
            Conv2d(c_in, c_out, 1, bias=False), BatchNorm2d(c_out), ReLU()]


def mobilenet_tiny(num_classes=10, in_channels=3, seed=None, width=16):
    """A tiny MobileNet (v1-style): a 3×3 stem of ``width`` channels + BN + ReLU, three depthwise-separable
    blocks (to 2·width, 4·width stride 2, 4·width), global average pooling, a linear classifier."""
    num_classes = _start(num_classes, seed)
    in_channels = positive_int("in_channels", in_channels)
    w = positive_int("width", width)
    return Sequential(
        Conv2d(in_channels, w, 3, padding=1, bias=False), BatchNorm2d(w), ReLU(),
        *separable_block(w, 2 * w, 1), *separable_block(2 * w, 4 * w, 2), *separable_block(4 * w, 4 * w, 1),
        AdaptiveAvgPool2d(1), Flatten(), Linear(4 * w, num_classes),
    )


# name -> builder; the CLI's --model choices
MODELS = {"lenet5": lenet5, "digits_cnn": digits_cnn, "resnet8": resnet8, "mobilenet_tiny": mobilenet_tiny}


def get_model(name, num_classes=10, seed=None, input_shape=None):
    """One of :data:`MODELS` by name; num_classes a positive int, seed a non-negative int or None;
    input_shape: one sample's (C, H, W), which sets in_channels (and lenet5's geometry) when given."""
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"model: expected one of {', '.join(MODELS)}, got {name!r}")
    kw = {}
    if input_shape is not None:
        if len(input_shape) != 3:
            raise ValueError(f"input_shape: expected one sample's (C, H, W), got {tuple(input_shape)}")
        kw["in_channels"] = input_shape[0]
        if name == "lenet5":
            kw["input_size"] = tuple(input_shape[1:])
    return MODELS[name](num_classes=num_classes, seed=seed, **kw)
