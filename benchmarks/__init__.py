"""Benchmarks of gpu-cnn: ``python -m benchmarks.kernels`` (every kernel version against the vendor
libraries, with a roofline) and ``python -m benchmarks.train`` (LeNet-5 training throughput against
PyTorch). Results go under ``benchmarks/results/<device>-<date>/``; see ``benchmarks/README.md``.
"""
