"""benchmarks.host: the probe counts exactly what a step asks of the device, and the benchmark writes its
results. Both run in a fresh process: the probe needs the simulator, whatever backend this suite runs on."""
import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code, *args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "GPU_CNN_BACKEND"}
    return subprocess.run([sys.executable, *(["-c", code] if code else []), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


PLANTED = textwrap.dedent("""
    import json, os
    os.environ["GPU_CNN_BACKEND"] = "sim"
    import numpy as np
    import gpu_cnn
    from numba import cuda
    from benchmarks.host import HostProbe

    @cuda.jit
    def poison(a):  # the body must not run under the probe
        a[0] = 123.0

    @cuda.jit(device=True)
    def twice(v):
        return 2 * v

    @cuda.jit
    def uses_device_function(a):
        a[0] = twice(a[0])

    host = np.ones(4, np.float32)
    with HostProbe() as p:
        d = cuda.to_device(host)                 # 1 h2d, 1 device allocation
        e = cuda.device_array(4, np.float32)     # 1 device allocation, zero-filled
        poison[1, 1](d)                          # 2 launches of poison
        poison[2, 32](e)
        e.copy_to_device(d)                      # 1 d2d
        e.copy_to_device(host)                   # 1 h2d
        s = cuda.stream()
        back = d.copy_to_host()                  # 1 d2h, blocking
        d.copy_to_host(stream=s)                 # 1 d2h, not blocking
        s.synchronize()                          # 1 sync
        cuda.synchronize()                       # 1 sync
        pin = cuda.pinned_array(3, np.float32)   # 1 pinned allocation
    uses_device_function[1, 1](d)                # after the probe: runs for real, counted nowhere
    print(json.dumps({"counts": dict(p.counts), "kernels": dict(p.kernels), "back": back.tolist(),
                      "after": d.copy_to_host().tolist()}))
""")


def test_probe_counts_planted_events_and_skips_kernel_bodies():
    r = _python(PLANTED)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["counts"] == {"h2d": 2, "alloc_device": 2, "launch": 2, "d2d": 1, "d2h": 2, "blocking_d2h": 1,
                             "sync": 2, "alloc_pinned": 1}
    assert out["kernels"] == {"poison": 2}
    assert out["back"] == [1.0, 1.0, 1.0, 1.0]  # poison's body never ran
    assert out["after"] == [2.0, 1.0, 1.0, 1.0]  # outside the probe, kernels and device functions run again


def test_host_benchmark_writes_results(tmp_path):
    r = _python(None, "-m", "benchmarks.host", "--batch-size", "8", "--steps", "4", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "host-lenet5-sgd-b8.json").read_text())
    assert rec["kind"] == "host" and rec["command"].startswith("python -m benchmarks.host")
    assert set(rec["results"]) == {"host batch", "device batch", "fit, eager", "inside fit"}
    assert rec["settings"]["defaults"] == "cuda"  # counted with the kernels a GPU runs (fusion on)
    assert any("fused" in k for k in rec["results"]["inside fit"]["kernels_per_step"])
    for mode, res in rec["results"].items():
        per = res["per_step"]
        # LeNet-5 has 10 parameter tensors, so a step launches at least one kernel per layer op plus the
        # optimizer's; the probe's per-kernel counts add up to its total
        assert per["launch"] >= 10, mode
        assert abs(sum(res["kernels_per_step"].values()) - per["launch"]) < 1e-9, mode
        assert res["host_ms"] > 0, mode
    assert rec["results"]["device batch"]["per_step"]["h2d"] == 0  # images and labels already on the device
    for mode in ("fit, eager", "inside fit"):
        fit = rec["results"][mode]["per_step"]
        # inside fit the host never waits: labels were checked up front, metrics stay on the device
        assert (fit["d2h"], fit["sync"], fit["alloc_device"], fit["alloc_pinned"]) == (0, 0, 0, 0), mode
    # the replayed step launches exactly what the eager one does, kernel for kernel
    assert rec["results"]["inside fit"]["kernels_per_step"] == rec["results"]["fit, eager"]["kernels_per_step"]
    assert "not planned" not in r.stderr, r.stderr
    assert rec["results"]["host batch"]["per_step"]["h2d"] >= 2  # images and labels staged
    md = (tmp_path / "host-lenet5-sgd-b8.md").read_text()
    assert "| host batch |" in md and "| inside fit |" in md and "`sgd_" in md


def test_gpu_cnn_bench_host_runs_the_benchmark(tmp_path):
    r = subprocess.run([sys.executable, "-m", "gpu_cnn", "bench", "host", "--batch-size", "4", "--steps", "2",
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "host-lenet5-sgd-b4.json").exists() and "inside fit" in r.stdout
    h = subprocess.run([sys.executable, "-m", "gpu_cnn", "bench", "host", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert h.returncode == 0 and h.stdout.startswith("usage: gpu-cnn bench host")
