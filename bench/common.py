"""Timing helpers shared by the benchmark sections."""
import subprocess
import time

import torch


def cpu_name():
    """lscpu's model name and the vector instructions PyTorch (and the csrc attention) use on it."""
    name = "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        out = ""
    for line in out.splitlines():
        if line.startswith("Model name"):
            name = line.split(":", 1)[1].strip()
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"


def race(fns, repeats, warmup=1, sync=lambda: None, summary=min):
    """Wall time in ms of each function, the minimum of its repeats (or another summary, such as
    statistics.median), the functions interleaved repeat by repeat, so a busy machine slows them alike and the
    ratios between them stay fair."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[i].append(time.perf_counter() - start)
    return [1e3 * summary(t) for t in times]


def matmul_gflops(dtype=torch.float32, n=1024, device="cpu"):
    """The machine's practical peak: GFLOP/s of one n x n x n matmul."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return 2 * n ** 3 / race([lambda: a @ b], repeats=10, sync=sync)[0] / 1e6
