"""
Train a class-conditional DDPM on one CPU. The command line is improved-diffusion's image_train.py, so
its commands run verbatim:

    python train_cpu.py --image_size 32 --num_channels 64 --num_res_blocks 2 --diffusion_steps 1000 \
        --noise_schedule linear --lr 1e-4 --batch_size 8 --microbatch 4

plus --model dit (the DiT of config.yaml), --max_steps, --data_dir, --resume and any config override
--section.key=value. A run writes everything to outputs/<run>/: metrics.csv (a row every save_interval
steps), checkpoint.pth (atomic), loss.png and samples.png at the end or on Ctrl-C.

train_ddp.py imports lr_at and train_step from here: one definition of a training step.
"""
import argparse
import contextlib
import copy
import csv
import functools
import math
import os
import signal
import sys
import time

import torch
from tqdm import tqdm

from config import fail, load_config

# -----------------------------------------------------------------------------
# the training step, shared with train_ddp.py

QUARTERS = ["q0", "q1", "q2", "q3"]  # loss by quarter of the timestep range, q0 the least noisy


def lr_at(step, training_cfg):
    """Linear warm-up to learning_rate over warmup_steps, then constant (as improved-diffusion and DiT)."""
    warmup = training_cfg["warmup_steps"]
    return training_cfg["learning_rate"] * min(1.0, (step + 1) / warmup) if warmup > 0 else training_cfg["learning_rate"]


def train_step(model, diffusion, optimizer, x, y, microbatch=0, grad_clip=0.0, autocast_dtype=None, no_sync=None):
    """One optimiser step on the batch (x, y). With microbatch > 0 the batch is split into chunks whose
    gradients add up to exactly the full-batch mean gradient (each chunk's mean loss is weighted by its
    share of the batch). t and noise are drawn for the whole batch first, so splitting changes nothing.
    no_sync, when given (DDP), is a context for all chunks but the last, so gradients are reduced once.
    Returns (per-sample losses (B,), timesteps (B,), grad norm before clipping)."""
    B = x.shape[0]
    t = torch.randint(0, diffusion.num_steps, (B,), device=x.device)
    noise = torch.randn_like(x)
    chunk = microbatch if 0 < microbatch < B else B
    losses = []
    optimizer.zero_grad(set_to_none=True)
    for start in range(0, B, chunk):
        part = slice(start, start + chunk)
        last = start + chunk >= B
        context = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with context, torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16,
                                     enabled=autocast_dtype is not None):
            loss, _ = diffusion.training_losses(model, x[part], y[part], t[part], noise[part])
            (loss.mean() * (loss.shape[0] / B)).backward()
        losses.append(loss.detach())
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    if torch.isfinite(grad_norm):
        optimizer.step()
    return torch.cat(losses), t, grad_norm


def make_optimizer(model, lr, weight_decay=0.0):
    """AdamW with its fused kernel: one pass over all parameters instead of a dozen small ops on each,
    a third of the optimiser's time on CPU (where PyTorch would otherwise pick the per-parameter loop)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)


def autocast_dtype_for(precision, device):
    """training.precision as an autocast dtype, None for fp32. auto is bf16 on CUDA, and on a CPU only where
    bf16 matmuls outrun fp32 ones: whole training steps ran 2.4 to 2.9x faster in bf16 on a Xeon with AMX, and
    8 to 13x slower on a Zen 3 without native bf16 (BENCHMARKS.md), so a short matmul race decides. Its ratio
    depends on the size (on that Xeon, 2 threads: 1.5x at 256^3, 4x at 384^3, 1.8x at 512^3 and 768^3, against
    under 0.05x on the Zen 3), hence 512 and a threshold well inside the gap. A resumed run decides again."""
    if precision == "auto" and device.type == "cpu":
        return torch.bfloat16 if bf16_matmul_speedup() >= 1.2 else None
    return torch.bfloat16 if precision in ("auto", "bf16") else None


@functools.cache  # once a process: every grid and every evaluated cell asks again
def bf16_matmul_speedup(n=512, repeats=5):
    """fp32 time over bf16 time of an n^3 matmul on the CPU, each the best of interleaved runs (the slow first
    ones, where oneDNN compiles its kernels, lose to the later ones)."""
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0))  # not the global generator: resumes stay exact
    operands = [(a, a), (a.bfloat16(), a.bfloat16())]
    best = [float("inf")] * 2
    for _ in range(repeats):
        for i, (x, y) in enumerate(operands):
            start = time.perf_counter()
            x @ y
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0] / best[1]


def ema_rate_at(step, ema_rate):
    """EMA decay warmed up as min(rate, (1 + step) / (10 + step)), so short runs get a usable EMA instead
    of one still dominated by the random initialisation after thousands of steps."""
    return min(ema_rate, (1 + step) / (10 + step))


# -----------------------------------------------------------------------------
# command line: improved-diffusion's flags, mapped onto config.yaml


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Train a class-conditional DDPM on one CPU.",
                                     epilog="Any config value can also be set as --section.key=value.")
    parser.error = fail  # one line, exit status 2, instead of argparse's usage block
    parser.add_argument("--model", choices=["unet", "dit"], help="default unet (a resumed run keeps its own)")
    parser.add_argument("--config", help="a config file in place of config.yaml")
    parser.add_argument("--data_dir", help="CIFAR-10 folder (same as --data.data_dir)")
    for name in ("image_size", "num_channels", "num_res_blocks", "diffusion_steps", "batch_size", "max_steps",
                 "num_heads", "seed", "threads"):
        parser.add_argument(f"--{name}", type=int)
    parser.add_argument("--noise_schedule", choices=["linear", "cosine", "polynomial"])
    parser.add_argument("--attention_resolutions", help="comma-separated, e.g. 16,8")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--dropout", type=float)
    parser.add_argument("--weight_decay", type=float)
    parser.add_argument("--ema_rate", type=float)
    parser.add_argument("--microbatch", type=int, default=-1, help="-1: no micro-batching")
    parser.add_argument("--log_interval", type=int, default=10)
    parser.add_argument("--save_interval", type=int, help="steps between checkpoints (training.save_interval)")
    parser.add_argument("--max_minutes", type=float)
    parser.add_argument("--resume", "--resume_checkpoint", dest="resume", help="checkpoint.pth of a run to continue")
    parser.add_argument("--run", help="run name: outputs/<run>/ (default: model-schedule-time)")
    parser.add_argument("--output_dir", default="outputs")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 master weights): "
                        "--training.precision=bf16; the default, auto, takes bf16 where this CPU runs it faster")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--grid_per_class", type=int, default=4, help="samples per class in the final grid")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not (a.startswith("--") and "." in a.partition("=")[0] and "=" in a)]
    if bad:
        fail(f"unknown option {bad[0]!r}: expected an option of train_cpu.py or --section.key=value")
    return args, rest


def build_config(args, overrides, base=None):
    """config.yaml (or a resumed run's config, base) < the improved-diffusion flags given < --section.key=value
    overrides."""
    flags = {"model.name": args.model or (None if base else "unet"), "data.data_dir": args.data_dir, "model.image_size": args.image_size,
             "model.num_channels": args.num_channels, "model.num_res_blocks": args.num_res_blocks,
             "diffusion.num_steps": args.diffusion_steps, "diffusion.noise_schedule": args.noise_schedule,
             "training.learning_rate": args.lr, "training.batch_size": args.batch_size,
             "training.max_steps": args.max_steps, "model.unet_num_heads": args.num_heads,
             "model.dropout": args.dropout, "training.weight_decay": args.weight_decay,
             "training.ema_rate": args.ema_rate, "training.seed": args.seed, "training.max_minutes": args.max_minutes,
             "training.save_interval": args.save_interval, "training.precision": "bf16" if args.bf16 else None,
             "model.attention_resolutions": None if args.attention_resolutions is None
             else f"[{args.attention_resolutions}]"}
    given = [f"--{key}={value}" for key, value in flags.items() if value is not None]
    config_args = (["--config", args.config] if args.config else []) + given + overrides
    cfg = load_config(config_args, base=base)
    if cfg["model"]["image_size"] != 32:
        fail(f"image_size={cfg['model']['image_size']}: CIFAR-10 images are 32x32")
    if args.log_interval < 1:
        fail(f"--log_interval={args.log_interval} must be at least 1")
    if cfg["training"]["save_interval"] < 1:
        fail(f"--save_interval={cfg['training']['save_interval']} must be at least 1")
    B, mb = cfg["training"]["batch_size"], args.microbatch
    if mb == 0 or mb < -1:
        fail(f"--microbatch={mb}: expected -1 (off) or a positive size")
    if mb > 0 and B % mb:
        fail(f"--batch_size={B} is not divisible by --microbatch={mb}")
    if args.threads is not None and args.threads < 1:
        fail(f"--threads={args.threads} must be at least 1")
    return cfg


# -----------------------------------------------------------------------------
# the run


def main(argv):
    args, overrides = parse_args(argv)
    from checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
    from csrc import KERNELS_PATH
    from data import load_cifar10, plot_curves, random_batches
    from diffusion import Diffusion
    from model import build_model, model_summary, update_ema
    from sample import save_class_grid

    resumed = load_checkpoint(args.resume) if args.resume else None
    cfg = build_config(args, overrides, base=resumed["config"] if resumed else None)
    tc = cfg["training"]
    torch.set_num_threads(args.threads or os.cpu_count())
    run = os.path.basename(os.path.dirname(os.path.abspath(args.resume))) if args.resume else (
        args.run or f"{cfg['model']['name']}-{cfg['diffusion']['noise_schedule']}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = os.path.join(args.output_dir, run)
    os.makedirs(run_dir, exist_ok=True)

    # data: one uint8 tensor in memory; batches are cut from it in the training thread, so no loader
    # worker competes with the two cores that do the maths
    images, labels, class_names = load_cifar10(cfg["data"]["data_dir"], "train", image_size=cfg["model"]["image_size"])
    if len(class_names) > cfg["model"]["num_classes"]:
        fail(f"the data has {len(class_names)} classes but model.num_classes={cfg['model']['num_classes']}")

    torch.manual_seed(tc["seed"])
    model = build_model(cfg["model"])
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = make_optimizer(model, tc["learning_rate"], tc["weight_decay"])
    diffusion = Diffusion.from_config(cfg["diffusion"])
    step, elapsed = 0, 0.0
    if resumed is not None:
        try:
            model.load_state_dict(resumed["model"])
        except RuntimeError:
            fail(f"--resume {args.resume}: its weights do not fit the model the given flags describe; "
                 f"leave out flags that change the architecture")
        ema.load_state_dict(resumed["ema"])
        optimizer.load_state_dict(resumed["optimizer"])
        step, elapsed = resumed["step"], resumed.get("elapsed", 0.0)
        set_rng_state(resumed["rng"])
    forward = torch.compile(model) if args.compile else model
    autocast_dtype = autocast_dtype_for(tc["precision"], torch.device("cpu"))
    batch_size = tc["batch_size"]
    steps_per_epoch = len(images) // batch_size
    if steps_per_epoch == 0:
        fail(f"batch_size={batch_size} is larger than the {len(images)} training images")
    max_steps = tc["max_steps"] or tc["num_epochs"] * steps_per_epoch
    print(model_summary(model, cfg["model"]))
    print(f"run {run_dir} | {len(images)} images, {len(class_names)} classes | batch {batch_size}, microbatch "
          f"{args.microbatch} | {torch.get_num_threads()} threads | "
          f"{'bf16 autocast' if autocast_dtype else 'fp32'} (precision {tc['precision']}) | "
          f"kernels: {KERNELS_PATH} | steps {step} -> {max_steps}")

    # Ctrl-C or SIGTERM asks the loop to stop after the current step, which then saves before exiting,
    # so an interrupt can never land between a half-updated model and its checkpoint
    stop = {"requested": False}

    def request_stop(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        tqdm.write(f"signal {signum}: finishing this step, saving, then exiting (again to abort)")

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    metrics_path = os.path.join(run_dir, "metrics.csv")
    columns = ["step", "images", "loss", "mse", "grad_norm"] + QUARTERS + ["images_per_s", "elapsed_s"]
    if not os.path.exists(metrics_path):
        with open(metrics_path, "w", newline="") as f:
            csv.writer(f).writerow(columns)
    checkpoint_path = os.path.join(run_dir, "checkpoint.pth")

    def save():
        save_checkpoint({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                         "step": step, "epoch": step // steps_per_epoch, "elapsed": elapsed, "config": cfg,
                         "class_names": class_names, "rng": rng_state()}, checkpoint_path)

    def new_window():
        return {"loss": 0.0, "grad_norm": 0.0, "steps": 0, "images": 0, "seconds": 0.0,
                "quarter_sum": torch.zeros(4, dtype=torch.float64), "quarter_count": torch.zeros(4, dtype=torch.float64)}

    def summary(window):
        n = max(window["steps"], 1)
        quarters = (window["quarter_sum"] / window["quarter_count"].clamp(min=1)).tolist()
        return {"step": step, "images": step * batch_size, "loss": window["loss"] / n, "mse": window["loss"] / n,
                "grad_norm": window["grad_norm"] / n, **dict(zip(QUARTERS, quarters)),
                "images_per_s": window["images"] / max(window["seconds"], 1e-9), "elapsed_s": elapsed}

    log_window, save_window = new_window(), new_window()
    generator = torch.Generator()
    model.train()
    # a time-limited run has no meaningful step total; the bar then shows steps and their rate
    bar = tqdm(total=None if tc["max_minutes"] and not tc["max_steps"] else max_steps, initial=step, desc="training",
               unit="step", dynamic_ncols=True)
    while step < max_steps and not stop["requested"]:
        epoch, position = divmod(step, steps_per_epoch)
        generator.manual_seed(tc["seed"] * 100003 + epoch)  # each epoch's order depends on the epoch alone,
        batches = random_batches(images, labels, batch_size, generator, cfg["data"]["random_flip"])
        for _ in range(position):  # ... so a resumed run skips to the same batch it stopped before
            next(batches)
        for x, y in batches:
            started = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, tc)
            losses, t, grad_norm = train_step(forward, diffusion, optimizer, x, y, args.microbatch, tc["grad_clip"],
                                              autocast_dtype)
            loss = losses.mean().item()
            if not math.isfinite(loss) or not torch.isfinite(grad_norm):
                bar.close()  # so the error starts its own line
                fail(f"loss={loss}, grad_norm={grad_norm.item()} at step {step}: stopping; the last good "
                     f"checkpoint {checkpoint_path} is untouched (try a lower --lr)")
            update_ema(ema, model, ema_rate_at(step, tc["ema_rate"]))
            step += 1
            seconds = time.perf_counter() - started
            elapsed += seconds
            quarter = (t * 4 // diffusion.num_steps).clamp(max=3)
            for window in (log_window, save_window):
                window["loss"] += loss
                window["grad_norm"] += grad_norm.item()
                window["steps"] += 1
                window["images"] += batch_size
                window["seconds"] += seconds
                window["quarter_sum"].index_add_(0, quarter, losses.double())
                window["quarter_count"].index_add_(0, quarter, torch.ones_like(losses, dtype=torch.float64))
            bar.update(1)
            if step % args.log_interval == 0:
                row = summary(log_window)
                bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.1f}")
                tqdm.write(" | ".join([f"step {step}"] + [f"{k} {row[k]:.4f}" for k in ["loss", "mse", "grad_norm"]
                                                           + QUARTERS] + [f"{row['images_per_s']:.1f} img/s"]))
                log_window = new_window()
            out_of_time = tc["max_minutes"] > 0 and elapsed >= 60 * tc["max_minutes"]
            if step % tc["save_interval"] == 0 or step >= max_steps or out_of_time or stop["requested"]:
                if save_window["steps"]:
                    with open(metrics_path, "a", newline="") as f:
                        csv.writer(f).writerow([summary(save_window)[c] for c in columns])
                    save_window = new_window()
                save()
            if step >= max_steps or out_of_time or stop["requested"]:
                stop["requested"] = True
                break
    bar.close()
    signal.signal(signal.SIGINT, signal.SIG_DFL)

    plot_curves(metrics_path, os.path.join(run_dir, "loss.png"), "step", ["loss"] + QUARTERS,
                f"{run}: training loss ({elapsed / 60:.1f} min, {step * batch_size / max(elapsed, 1e-9):.1f} img/s)")
    save_class_grid(ema, cfg, class_names, os.path.join(run_dir, "samples.png"), per_class=args.grid_per_class,
                    progress=True)
    print(f"step {step} | {elapsed / 60:.1f} min of training | wrote {checkpoint_path}, {metrics_path}, "
          f"{os.path.join(run_dir, 'loss.png')}, {os.path.join(run_dir, 'samples.png')}")


if __name__ == "__main__":
    main(sys.argv[1:])
