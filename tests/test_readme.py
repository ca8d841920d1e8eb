"""Every ```python block of README.md runs as written on a fresh install (cpu backend), each in its own
fresh interpreter in an empty folder, and the training example reaches the accuracy the README states."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
TEXT = README.read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```python\n(.*?)^```", TEXT, flags=re.S | re.M)


def test_readme_has_python_blocks_and_the_two_commands():
    assert len(BLOCKS) >= 2
    first_bash = re.search(r"^```bash\n(.*?)^```", TEXT, flags=re.S | re.M).group(1).splitlines()
    assert 'pip install -e ".[dev]"' in first_bash[0] and "gpu-cnn train" in first_bash[0]
    assert first_bash[1].startswith("python -m pytest")


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path):
    code = BLOCKS[index]
    env = {k: v for k, v in os.environ.items() if k not in ("GPU_CNN_BACKEND", "NUMBA_ENABLE_CUDASIM")}
    env["MPLBACKEND"] = "Agg"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, f"README block {index} failed:\n{code}\n{proc.stderr}"
    assert "Warning" not in proc.stderr, proc.stderr
    found = re.search(r"test accuracy (\d\.\d+)", proc.stdout)
    if "trainer.evaluate" in code:
        assert found, proc.stdout
        got = float(found.group(1))
        assert got >= 0.95, f"the README's training example reached only {got} on digits"
        stated = re.search(r"test accuracy (\d\.\d+)\):", TEXT)  # "(… test accuracy 0.958):" above the block
        assert stated and abs(float(stated.group(1)) - got) <= 0.01, (stated and stated.group(0), got)
