"""``python -m gpu_cnn``: the same command line as ``gpu-cnn``."""
import sys

from .cli import main

sys.exit(main())
