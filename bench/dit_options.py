"""
make bench, DiT options: what each of the DiT's convolutional options (model.skip, final_conv, stem,
mlp_conv, downsample) and torch.compile cost the DiT recipe's training step (configs/cpu_dit_2h.yaml) on this CPU, one
optimiser step at the recipe's batch and objective, at the precision training.precision=auto picks, the
contenders taking turns round by round. The arms of RESULTS.md run at equal time, so a slower option has to
win back its lost steps; this is the table that says how many it loses.

    python -m bench dit_options
    OMP_NUM_THREADS=1 python bench/dit_options.py --rounds 5 --no-compile
"""
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import cpu_name, race  # noqa: E402
from bench.cpu_recipe import forward_flops  # noqa: E402
from config import ArgumentParser, fail, load_config  # noqa: E402
from diffusion import Diffusion  # noqa: E402
from model import autocast_dtype_for, build_model  # noqa: E402
from train_ddp import make_optimizer, train_step  # noqa: E402

RECIPE = ["--config", os.path.join(ROOT, "configs", "cpu_dit_2h.yaml")]
# the recipe trains with mlp_conv, so its row is the recipe without it; the others are added to the recipe
ADDED = ["--model.skip=true", "--model.final_conv=true", "--model.stem=conv", "--model.downsample=true"]
CONTENDERS = [("recipe", []), ("-mlp_conv", ["--model.mlp_conv=false"]), ("+skip", ADDED[:1]),
              ("+final_conv", ADDED[1:2]), ("+stem conv", ADDED[2:3]), ("+downsample", ADDED[3:]),
              ("+all four", ADDED)]


def timed_step(cfg_args, batch, dtype, compiled):
    """One train_ddp.train_step of the configured model on random data as a function to time, its forward
    FLOPs and parameters, and the seconds torch.compile took (its first steps)."""
    cfg = load_config(cfg_args)
    torch.manual_seed(0)
    model = build_model(cfg["model"])
    flops, params = forward_flops(model), sum(p.numel() for p in model.parameters())
    forward = torch.compile(model) if compiled else model
    diffusion = Diffusion.from_config(cfg["diffusion"])
    optimizer = make_optimizer(model, lr=1e-4)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    step = lambda: train_step(forward, diffusion, optimizer, x, y, 0, 1.0, dtype)  # noqa: E731
    started = time.perf_counter()
    if compiled:
        step()  # the first call compiles the forward and the backward
    return step, flops, params, time.perf_counter() - started


def main(argv):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed steps of each contender, taken in turn")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--no_compile", action="store_true", help="leave out the torch.compile rows")
    args, overrides = parser.parse(argv)
    for name in ("rounds", "batch_size"):
        if getattr(args, name) <= 0:
            fail(f"--{name}={getattr(args, name)}: expected a positive number")
    autocast_dtype = autocast_dtype_for("auto", torch.device("cpu"))
    print(f"DiT options on the DiT recipe | {cpu_name()} | {torch.get_num_threads()} threads | torch "
          f"{torch.__version__} | {'bf16 autocast' if autocast_dtype else 'fp32'} (precision auto) | batch "
          f"{args.batch_size}, median of {args.rounds} interleaved rounds")
    rows = []
    for compiled in (False,) if args.no_compile else (False, True):
        for name, options in CONTENDERS:
            if compiled and name not in ("recipe", "+all four"):
                continue
            try:
                step, flops, params, compile_s = timed_step(RECIPE + options + overrides, args.batch_size,
                                                            autocast_dtype, compiled)
            except Exception as e:  # a CPU or compiler toolchain torch.compile cannot use
                print(f"{name} + compile: failed ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
                continue
            rows.append((name + (" + compile" if compiled else ""), step, flops, params, compile_s))
    ms = race([row[1] for row in rows], repeats=args.rounds, summary=statistics.median)
    print(f"{'step':<24}{'params':>8}{'GFLOPs':>8}{'img/s':>8}{'vs recipe':>11}{'compile s':>11}")
    for (name, _, flops, params, compile_s), time_ms in zip(rows, ms):
        rate = args.batch_size * 1e3 / time_ms
        compile_text = f"{compile_s:.0f}" if name.endswith("compile") else ""
        print(f"{name:<24}{params / 1e6:>7.2f}M{flops / 1e9:>8.2f}{rate:>8.1f}{ms[0] / time_ms:>10.2f}x"
              f"{compile_text:>11}".rstrip())


if __name__ == "__main__":
    main(sys.argv[1:])
