"""
Sampling speed of the default DiT of config.yaml (random weights: speed does not depend on them).

    python -m bench sample        (or: python bench/sample.py [--batch_size 16] [--device cpu|cuda] [--full])

Every reverse step costs one model evaluation (two with classifier-free guidance, which runs the
conditional and unconditional halves as one doubled batch), so a few timed steps give the cost of a
1000-, 250- or 50-step run: images/s = batch / (steps x seconds per step). On a GPU it also reports the
time to draw 50,000 DDIM-50 samples: extrapolated from one batch, or measured with --full.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import cpu_name  # noqa: E402
from config import fail, load_config  # noqa: E402
from model import build_model, model_summary  # noqa: E402
from sample import sample_images  # noqa: E402

RUNS = [("ddpm", 1000), ("ddpm", 250), ("ddim", 50), ("dpm++2m", 20)]


def seconds_per_step(model, cfg, labels, sampler, guidance_scale, timed_steps, device):
    """Seconds per reverse step for one batch, from a timed run of timed_steps steps after a warm-up."""
    options = dict(sampler=sampler, guidance_scale=guidance_scale, batch_size=len(labels))
    sample_images(model, cfg, labels, steps=2, **options)  # warm-up: allocations, kernel selection
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    sample_images(model, cfg, labels, steps=timed_steps, **options)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / timed_steps


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.error = fail
    parser.add_argument("--batch_size", type=int, help="default 16 on CPU, 500 on a GPU")
    parser.add_argument("--timed_steps", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full", action="store_true", help="on a GPU, draw all 50,000 DDIM-50 samples")
    args = parser.parse_args(argv)
    batch_size = args.batch_size or (500 if args.device == "cuda" else 16)
    if batch_size < 1 or args.timed_steps < 1:
        fail("--batch_size and --timed_steps must be at least 1")
    from csrc import KERNELS_PATH
    cfg = load_config([])
    torch.manual_seed(0)
    model = build_model(cfg["model"]).to(args.device).eval()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"{cpu_name()}, {torch.get_num_threads()} threads"
    print(f"{model_summary(model, cfg['model'])}\ndevice: {device_name} | kernels: {KERNELS_PATH} | batch {batch_size}")
    labels = torch.arange(batch_size, device=args.device) % cfg["model"]["num_classes"]
    print(f"{'sampler':<11}{'guidance':>9}{'s/step':>10}{'images/s':>10}{'s/image':>10}")
    per_step = {}
    for guidance_scale in (1.0, 2.0):
        for sampler in ("ddpm", "ddim", "dpm++2m"):
            per_step[sampler, guidance_scale] = seconds_per_step(model, cfg, labels, sampler, guidance_scale,
                                                                 args.timed_steps, args.device)
        for sampler, steps in RUNS:
            seconds = per_step[sampler, guidance_scale] * steps
            print(f"{sampler.upper() + '-' + str(steps):<11}{guidance_scale:>9g}{per_step[sampler, guidance_scale]:>10.3f}"
                  f"{batch_size / seconds:>10.3f}{seconds / batch_size:>10.2f}")
    if args.device == "cuda":
        batches = -(-50000 // batch_size)
        if args.full:
            labels = torch.arange(50000, device=args.device) % cfg["model"]["num_classes"]
            torch.cuda.synchronize()
            started = time.perf_counter()
            sample_images(model, cfg, labels, sampler="ddim", steps=50, batch_size=batch_size, progress=True)
            torch.cuda.synchronize()
            print(f"50,000 DDIM-50 samples: {time.perf_counter() - started:.1f} s measured")
        else:
            two = seconds_per_step(model, cfg, labels, "ddim", 1.0, 50, args.device) * 50
            print(f"50,000 DDIM-50 samples: {two * batches:.1f} s extrapolated from one {batch_size}-image batch "
                  f"({two:.2f} s) x {batches} batches")


if __name__ == "__main__":
    main(sys.argv[1:])
