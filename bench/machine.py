"""The machine side of the benchmark: what it is, its matmul ceiling, whether it is quiet, and peak memory.

Notable:
- Peak memory of a step: GPU max_memory_allocated; CPU the resident high-water mark (VmHWM), reset right before
  the step after malloc_trim so cached free pages cannot hide the step's allocations.
- Pitfall, shared small machines: two 2-thread jobs on 2 cores wait on each other at every barrier, so a step can take
  several times longer, in bursts. --threads 1 keeps the ratios steadier there; --quiet-wait S waits up to S s for an
  idle CPU before each measurement (QuietGate). Every measurement records how busy the CPU was.
"""

import ctypes
import gc
import os
import platform
import sys
import time
from pathlib import Path

import torch
import transformers
import trl


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def machine_info(device: str) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_matmul_flops(device: str, dtype: torch.dtype) -> dict:
    """The machine's own dense-matmul ceiling, timed here: the denominator of MFU."""
    n, reps = (8192, 20) if device.startswith("cuda") else (2048, 5)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "flops_per_s": 2 * n**3 / best}


class QuietGate:
    """Before each timed measurement, wait (bounded) until no other process keeps the CPU busy.

    On a small shared machine a neighbour's multi-threaded job does not slow a step by a constant factor: both sets of
    threads spin at barriers and a step can take several times longer. Ratios taken across such a period are noise,
    so measurements start on a quiet machine when one comes within `max_wait` seconds (`budget` in all); each records
    how busy the machine was just before it started.
    """

    def __init__(self, max_wait: float, budget: float, threshold: float = 0.3, enabled: bool = True):
        self.max_wait, self.budget, self.threshold, self.enabled = max_wait, budget, threshold, enabled
        self.waited, self.busy_starts = 0.0, 0

    def wait(self) -> float:
        """Block until the CPU is quiet or the wait limits run out; return the busy share seen last (0..1)."""
        if not self.enabled:  # a GPU's speed does not hang on the host's other jobs the same way
            return 0.0
        busy = cpu_busy()
        start = time.perf_counter()
        while busy > self.threshold and time.perf_counter() - start < min(self.max_wait, self.budget - self.waited):
            time.sleep(2)
            busy = cpu_busy()
        self.waited += time.perf_counter() - start
        self.busy_starts += busy > self.threshold
        return busy


def cpu_busy(interval: float = 0.3) -> float:
    """Share of all cores busy over `interval`, from /proc/stat (this process sleeps meanwhile); 0 where unknown."""

    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except OSError:
        return 0.0
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


class MemoryProbe:
    """Peak memory of one step. GPU: allocator peak. CPU: VmHWM, reset just before the step (Linux >= 4.0)."""

    _libc = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.method = "torch.cuda.max_memory_allocated" if self.cuda else "VmHWM after malloc_trim + clear_refs"

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        if self._libc is not None:
            self._libc.malloc_trim(0)  # freed heap pages back to the OS, so the step must fault its own in again
        Path("/proc/self/clear_refs").write_text("5")  # high-water mark := current resident set
        self.base = _status_bytes("VmRSS")

    def stop(self) -> tuple[float, float]:
        """(peak MB, peak minus memory before the step in MB)."""
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _status_bytes("VmHWM")
        return peak / 2**20, (peak - self.base) / 2**20


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")
