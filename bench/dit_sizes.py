"""
make bench, DiT sizes: the training step of candidate DiTs for a two-hour CPU recipe beside the UNet recipe
(configs/cpu_2h.yaml), one optimiser step at batch 64 with the recipe's objective, at the precision
training.precision=auto picks on this CPU, the contenders taking turns round by round. It prints each one's
parameters, forward GFLOPs per image, images/s, and the steps 100 minutes would give at that rate, which is
the first measurement for sizing a DiT recipe (RESULTS.md has the short training runs that choose among them).

    python -m bench dit_sizes
    OMP_NUM_THREADS=1 python bench/dit_sizes.py --rounds 5
"""
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import cpu_name, race  # noqa: E402
from bench.cpu_recipe import our_step  # noqa: E402
from config import ArgumentParser, fail, load_config  # noqa: E402
from model import autocast_dtype_for, build_model  # noqa: E402

UNET_RECIPE = ["--config", os.path.join(ROOT, "configs", "cpu_2h.yaml")]
# the recipe's objective and training keys, with the model swapped for a DiT of the given shape
DIT = UNET_RECIPE + ["--model.name=dit", "--model.conditioning=adaln"]
CANDIDATES = [  # (patch, hidden, depth, heads, kv heads)
    (4, 192, 6, 6, 2), (4, 256, 6, 4, 2), (4, 256, 8, 4, 2), (4, 384, 6, 6, 2), (4, 384, 8, 6, 2),
    (4, 384, 12, 8, 2), (2, 128, 6, 4, 2), (2, 128, 8, 4, 2), (2, 192, 6, 6, 2), (2, 256, 6, 4, 2),
]


def dit_args(patch, hidden, depth, heads, kv_heads):
    return DIT + [f"--model.patch_size={patch}", f"--model.hidden_dim={hidden}", f"--model.depth={depth}",
                  f"--model.num_heads={heads}", f"--model.num_kv_heads={kv_heads}"]


def main(argv):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed steps of each contender, taken in turn")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--minutes", type=float, default=100.0, help="training time the steps column assumes")
    args, _ = parser.parse(argv)
    for name in ("rounds", "batch_size", "minutes"):
        if getattr(args, name) <= 0:
            fail(f"--{name}={getattr(args, name)}: expected a positive number")
    autocast_dtype = autocast_dtype_for("auto", torch.device("cpu"))
    print(f"DiT sizes for the CPU recipe | {cpu_name()} | {torch.get_num_threads()} threads | torch "
          f"{torch.__version__} | {'bf16 autocast' if autocast_dtype else 'fp32'} (precision auto) | batch "
          f"{args.batch_size}, median of {args.rounds} interleaved rounds")
    names, steps, flops, params = [], [], [], []
    for shape in [None] + CANDIDATES:
        cfg_args = UNET_RECIPE if shape is None else dit_args(*shape)
        step, forward_flops = our_step(cfg_args, args.batch_size, -1, autocast_dtype)
        names.append("UNet recipe (32 ch)" if shape is None else "DiT p{} {}x{} h{}/kv{}".format(*shape))
        steps.append(step)
        flops.append(forward_flops)
        params.append(sum(p.numel() for p in build_model(load_config(cfg_args)["model"]).parameters()))
    ms = race(steps, repeats=args.rounds, summary=statistics.median)
    print(f"{'model':<26}{'params':>8}{'GFLOPs':>8}{'img/s':>8}{'GFLOP/s':>9}{f'steps in {args.minutes:g} min':>18}")
    for name, n, f, time_ms in zip(names, params, flops, ms):
        rate = args.batch_size * 1e3 / time_ms
        achieved = 3 * f * rate / 1e9  # backward costs about twice the forward
        print(f"{name:<26}{n / 1e6:>7.2f}M{f / 1e9:>8.2f}{rate:>8.1f}{achieved:>9.0f}"
              f"{args.minutes * 60e3 / time_ms:>18,.0f}")


if __name__ == "__main__":
    main(sys.argv[1:])
