"""What the benchmark scripts share: the measured matmul peak and a description of the machine."""
from __future__ import annotations

import os
import platform
import time

import torch


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Achieved FLOP/s of a float32 ``torch.mm`` of n^3 (best of ``repeats``), at the current
    ``torch.get_num_threads()``: the reference the benchmarks report their FLOP/s against."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times)


def machine_info() -> dict:
    """CPU count, torch threads and versions, for the results files."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "processor": _cpu_name(),
            "load_average_1min": load}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
