"""Op implementations behind ``gpu_cnn.functional``: validation, the ``cpu`` (NumPy) path, and the
launch of the CUDA kernels on the ``cuda`` and ``sim`` backends. One module per op family."""
