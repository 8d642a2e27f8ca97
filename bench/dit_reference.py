"""
make bench, DiT section: one training step of our DiT against facebookresearch/DiT's own, at one
architecture and batch 64: DiT-S/4's adaLN-Zero, patch 4, hidden 384 and depth 12, with config.yaml's 8 heads
(DiT-S has 6) on both sides, on 32x32x3 images of 10 classes. Theirs is its models.py DiT and its diffusion
package's training_losses from create_diffusion, as its train.py builds them but with learn_sigma off (on in
train.py), so that both sides learn the same plain eps MSE; ours is train_ddp.train_step, with plain multi-head
attention and again at config.yaml's grouped-query attention. A step is forward, loss, backward and AdamW, all
at the precision training.precision=auto picks on this CPU; the contenders take turns round by round, and each
reports its median.

    DIT_REFERENCE_DIR=~/DiT python -m bench dit_reference
    python bench/dit_reference.py --rounds 3 --batch_size 32 --model.depth=6
"""
import importlib.util
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import cpu_name, race  # noqa: E402
from bench.cpu_recipe import our_step  # noqa: E402
from config import ArgumentParser, fail, load_config  # noqa: E402
from model import autocast_dtype_for  # noqa: E402

# what both sides run; a command line's overrides come after, so they may change it
SAME_ARCHITECTURE = ["--model.name=dit", "--model.conditioning=adaln", "--model.pos_embed=sincos",
                     "--diffusion.noise_schedule=linear", "--diffusion.prediction=eps",
                     "--diffusion.loss_weighting=none", "--diffusion.zero_terminal_snr=false"]
TIMM = "timm==1.0.29"  # the version this section was run with; its models.py takes Attention, Mlp, PatchEmbed from it


def load_reference(root):
    """Their models.py and diffusion package, imported under names of their own: their package `diffusion`
    would otherwise be taken for our diffusion.py (or shadow it)."""
    for stale in [name for name in sys.modules if name.startswith("dit_reference_")]:
        del sys.modules[stale]  # from another checkout: loading again must not mix the two
    modules = []
    for name, path, package in (("dit_reference_diffusion", "diffusion/__init__.py", True),
                                ("dit_reference_models", "models.py", False)):
        location = os.path.join(root, path)
        spec = importlib.util.spec_from_file_location(
            name, location, submodule_search_locations=[os.path.dirname(location)] if package else None)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # the package's relative imports find it here
        spec.loader.exec_module(module)
        modules.append(module)
    return modules


def reference_step(root, cfg, batch, autocast_dtype):
    """train.py's loop body on random data (its VAE left out: the images are the model's input), as a
    function to time."""
    reference_diffusion, reference_models = load_reference(root)
    m = cfg["model"]
    model = reference_models.DiT(input_size=m["image_size"], patch_size=m["patch_size"],
                                 in_channels=m["image_channels"], hidden_size=m["hidden_dim"], depth=m["depth"],
                                 num_heads=m["num_heads"], mlp_ratio=m["mlp_ratio"],
                                 class_dropout_prob=m["class_dropout"], num_classes=m["num_classes"],
                                 learn_sigma=False).train()
    diffusion = reference_diffusion.create_diffusion(timestep_respacing="", learn_sigma=False,
                                                     diffusion_steps=cfg["diffusion"]["num_steps"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)  # train.py's
    size = m["image_size"]
    x, y = torch.randn(batch, m["image_channels"], size, size), torch.randint(0, m["num_classes"], (batch,))

    def step():
        t = torch.randint(0, diffusion.num_timesteps, (batch,))
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return step


def main(argv):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed steps of each contender, taken in turn")
    parser.add_argument("--batch_size", type=int, default=64)
    args, overrides = parser.parse(argv)
    for name in ("rounds", "batch_size"):
        if getattr(args, name) < 1:
            fail(f"--{name}={getattr(args, name)}: expected a positive count")
    root = os.environ.get("DIT_REFERENCE_DIR")
    if not root:
        print("(set DIT_REFERENCE_DIR to a checkout of facebookresearch/DiT to time its training step beside ours)")
        return
    cfg_args = SAME_ARCHITECTURE + overrides
    cfg = load_config(cfg_args)
    m, batch = cfg["model"], args.batch_size
    autocast_dtype = autocast_dtype_for(cfg["training"]["precision"], torch.device("cpu"))
    try:
        theirs = reference_step(root, cfg, batch, autocast_dtype)
    except ModuleNotFoundError as error:
        if (error.name or "").partition(".")[0] != "timm":
            raise
        print(f"(facebookresearch/DiT's models.py needs timm, not installed here: pip install {TIMM})")
        return
    from csrc import KERNELS_PATH
    H, KV = m["num_heads"], m["num_kv_heads"]
    contenders = [("facebookresearch/DiT", theirs),
                  (f"ours, {H} heads (multi-head)", our_step(cfg_args + [f"--model.num_kv_heads={H}"], batch, -1,
                                                             autocast_dtype)[0])]
    if KV != H:
        contenders.append((f"ours, {H} heads / {KV} kv (GQA)", our_step(cfg_args, batch, -1, autocast_dtype)[0]))
    precision = "bf16 autocast" if autocast_dtype else "fp32"
    print(f"DiT training step, side by side | {cpu_name()} | {torch.get_num_threads()} threads | "
          f"torch {torch.__version__} | {precision} (precision {cfg['training']['precision']})")
    print(f"kernels: {KERNELS_PATH}")
    size = m["image_size"]
    print(f"adaLN-Zero, patch {m['patch_size']}, hidden {m['hidden_dim']}, depth {m['depth']}, {H} heads, "
          f"{size}x{size}x{m['image_channels']}, {m['num_classes']} classes, batch {batch}, AdamW | "
          f"median of {args.rounds} interleaved rounds")
    ms = race([step for _, step in contenders], repeats=args.rounds, summary=statistics.median)
    print(f"{'model':<32}{'step/s':>8}{'img/s':>8}{'ours / theirs':>15}")
    for i, ((name, _), time_ms) in enumerate(zip(contenders, ms)):
        ratio = f"{ms[0] / time_ms:.2f}x" if i else ""
        print(f"{name:<32}{1e3 / time_ms:>8.2f}{batch * 1e3 / time_ms:>8.1f}{ratio:>15}".rstrip())


if __name__ == "__main__":
    main(sys.argv[1:])
