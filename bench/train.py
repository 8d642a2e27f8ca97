"""
Training throughput of the default DiT (config.yaml) through train_ddp.py's step: on CPU with one process
against two gloo processes sharing the cores (the same global batch, so the ratio is DDP's scaling
efficiency), and on a GPU in bf16 with and without torch.compile, as model FLOPs utilisation against a
measured bf16 matmul ceiling.

    python -m bench train
"""
import importlib
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import cpu_name, matmul_gflops, race  # noqa: E402
from config import load_config  # noqa: E402
from diffusion import Diffusion  # noqa: E402
from model import build_model  # noqa: E402
from train_ddp import make_optimizer, train_step  # noqa: E402

GLOBAL_BATCH = 32  # CPU: small enough for a few timed steps of the 19M-parameter DiT in a minute or two
REPEATS = 3


def step_ms(model, batch, device, autocast_dtype=None, repeats=REPEATS):
    cfg = load_config([])
    diffusion = Diffusion.from_config(cfg["diffusion"])
    optimizer = make_optimizer(model, lr=1e-4)
    x, y = torch.randn(batch, 3, 32, 32, device=device), torch.randint(0, 10, (batch,), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return race([lambda: train_step(model, diffusion, optimizer, x, y, grad_clip=1.0, autocast_dtype=autocast_dtype)],
                repeats, sync=sync)[0]


def ddp_worker(rank, world_size, port, threads, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(build_model(load_config([])["model"]))
    ms = step_ms(model, GLOBAL_BATCH // world_size, torch.device("cpu"))
    if rank == 0:
        result.put(ms)
    dist.destroy_process_group()


def ddp_ms(world_size):
    with socket.socket() as s:  # a free port on loopback
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = max(1, (os.cpu_count() or 1) // world_size)
    result = mp.get_context("spawn").SimpleQueue()
    # by module name: under `python -m bench` this file runs as __main__, whose functions spawn cannot pickle
    worker = importlib.import_module("bench.train").ddp_worker
    mp.spawn(worker, args=(world_size, port, threads, result), nprocs=world_size)
    return result.get()


def forward_flops(model, device):
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, 3, 32, 32, device=device), torch.zeros(1, device=device),
                     torch.zeros(1, dtype=torch.long, device=device))
    model.train()
    return counter.get_total_flops()


def main():
    cfg = load_config([])
    print(f"default DiT training step | CPU: {cpu_name()}, {os.cpu_count()} cores | torch {torch.__version__}")
    one = ddp_ms(1)
    two = ddp_ms(2)
    print("| processes x threads | global batch | ms/step | img/s | scaling efficiency |\n|---|---|---|---|---|")
    threads = os.cpu_count() or 1
    print(f"| 1 x {threads} | {GLOBAL_BATCH} | {one:.0f} | {GLOBAL_BATCH / one * 1e3:.1f} | 1.00 |")
    print(f"| 2 x {max(1, threads // 2)} (gloo DDP) | {GLOBAL_BATCH} | {two:.0f} | {GLOBAL_BATCH / two * 1e3:.1f} "
          f"| {one / two:.2f} |")
    if not torch.cuda.is_available():
        print("(no CUDA: the GPU rows print on a machine with a GPU)")
        return
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    ceiling = matmul_gflops(torch.bfloat16, n=8192, device="cuda")
    print(f"\nGPU: {torch.cuda.get_device_name()} | bf16 matmul ceiling {ceiling / 1e3:.0f} TFLOP/s (8192^3)")
    print("| batch | mode | ms/step | img/s | MFU |\n|---|---|---|---|---|")
    for batch in (256, 1024):
        for compiled in (False, True):
            torch.manual_seed(0)
            model = build_model(cfg["model"]).to(device)
            flops = 3 * forward_flops(model, device) * batch  # backward is about twice the forward
            runnable = torch.compile(model) if compiled else model
            ms = step_ms(runnable, batch, device, torch.bfloat16, repeats=10)
            print(f"| {batch} | bf16{' + compile' if compiled else ''} | {ms:.1f} | {batch / ms * 1e3:.0f} "
                  f"| {flops / (ms / 1e3) / 1e9 / ceiling:.1%} |")


if __name__ == "__main__":
    main()
