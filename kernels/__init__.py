"""Hand-written Numba CUDA kernels, one module per op family (installed as ``gpu_cnn.kernels``).

Importing a kernel module imports ``numba.cuda``; the orchestrator only does that on the ``cuda`` and
``sim`` backends, after it has decided whether the CUDA simulator is on.
"""

KERNEL_MODULES = ("conv2d", "activation", "pool", "gemm", "softmax", "optim", "metrics")
