"""
make bench, CPU training section: images/s of one optimiser step for the seed command's UNet and the
384 x 12 token DiT (config.yaml's default DiT until the conditioning ablation of RESULTS.md), at the seed's
batch (8, micro-batch 4) and at 64, in fp32 and bf16, against this machine's
matmul ceiling. With IMPROVED_DIFFUSION_DIR pointing at a checkout of openai/improved-diffusion, its own
UNet and training loss run the seed command's step side by side.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import cpu_name, matmul_gflops, race  # noqa: E402
from config import load_config  # noqa: E402
from diffusion import Diffusion  # noqa: E402
from model import build_model  # noqa: E402
from train_ddp import make_optimizer, train_step  # noqa: E402

SEED_UNET = ["--model.name=unet", "--model.num_channels=64", "--model.num_res_blocks=2"]
TOKEN_DIT = ["--model.name=dit", "--model.conditioning=token"]  # 384 x 12, patch 4, 8/2 heads


def forward_flops(model, size=32):
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, 3, size, size), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    model.train()
    return counter.get_total_flops()


def our_step(cfg_args, batch, microbatch, dtype):
    """One train_ddp.train_step on random data, as a function to time, and the model's forward FLOPs."""
    cfg = load_config(cfg_args)
    model = build_model(cfg["model"])
    diffusion = Diffusion.from_config(cfg["diffusion"])
    optimizer = make_optimizer(model, lr=1e-4)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    return lambda: train_step(model, diffusion, optimizer, x, y, microbatch, 1.0, dtype), forward_flops(model)


def improved_diffusion_step(batch, microbatch):
    """improved-diffusion's image_train.py step for the seed command (its UNet, its loss, AdamW), as a
    function to time."""
    sys.path.insert(0, os.environ["IMPROVED_DIFFUSION_DIR"])
    from improved_diffusion.resample import UniformSampler
    from improved_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
    options = model_and_diffusion_defaults()
    options.update(image_size=32, num_channels=64, num_res_blocks=2, diffusion_steps=1000, noise_schedule="linear")
    model, diffusion = create_model_and_diffusion(**options)
    sampler = UniformSampler(diffusion)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, 32, 32)

    def step():
        optimizer.zero_grad()
        for start in range(0, batch, microbatch):
            part = x[start:start + microbatch]
            t, weights = sampler.sample(len(part), "cpu")
            (diffusion.training_losses(model, part, t)["loss"] * weights).mean().backward()
        optimizer.step()
    return step


def main():
    threads = torch.get_num_threads()
    print(f"CPU training step | {cpu_name()} | {threads} threads | torch {torch.__version__}")
    ceiling = matmul_gflops(torch.float32)
    ceiling_bf16 = matmul_gflops(torch.bfloat16, n=256)
    print(f"matmul ceiling: fp32 {ceiling:.0f} GFLOP/s (1024^3), bf16 {ceiling_bf16:.1f} GFLOP/s (256^3)")
    print(f"{'model':<22}{'batch':>6}{'micro':>6}{'dtype':>6}{'img/s':>9}{'GFLOP/s':>9}{'of fp32 matmul':>16}")
    results = {}
    for name, cfg_args in (("seed UNet (64 ch)", SEED_UNET), ("DiT 384x12 (token)", TOKEN_DIT)):
        for batch, micro in ((8, 4), (64, -1)):
            for dtype in (None, torch.bfloat16):
                if dtype is not None and batch == 64 and results[(name, 8, dtype)] < results[(name, 8, None)] / 3:
                    print(f"{name:<22}{batch:>6}{micro:>6}{'bf16':>6}  skipped: bf16 was over 3x slower than fp32 "
                          f"at batch 8 (no native bf16 on this CPU)")
                    continue
                step, flops = our_step(cfg_args, batch, micro, dtype)
                seconds = race([step], 3 if dtype is None else 1)[0] / 1e3
                rate = batch / seconds
                achieved = 3 * flops * rate / 1e9  # backward costs about twice the forward
                results[(name, batch, dtype)] = rate
                print(f"{name:<22}{batch:>6}{micro:>6}{'bf16' if dtype else 'fp32':>6}{rate:>9.1f}{achieved:>9.0f}"
                      f"{achieved / ceiling:>15.0%}", flush=True)
    if os.environ.get("IMPROVED_DIFFUSION_DIR"):
        # the two steps take turns, repeat by repeat, so the ratio holds even if the machine's load changes
        ours, theirs = race([our_step(SEED_UNET, 8, 4, None)[0], improved_diffusion_step(8, 4)], repeats=10)
        print(f"seed command, side by side: ours {8e3 / ours:.1f} img/s, improved-diffusion {8e3 / theirs:.1f} img/s"
              f" -> ours / theirs = {theirs / ours:.2f}x")
    else:
        print("(set IMPROVED_DIFFUSION_DIR to a checkout of openai/improved-diffusion to time its step beside ours)")


if __name__ == "__main__":
    main()
