"""
Train a class-conditional DDPM on one CPU. The command line is improved-diffusion's image_train.py, so
its commands run verbatim:

    python train_cpu.py --image_size 32 --num_channels 64 --num_res_blocks 2 --diffusion_steps 1000 \
        --noise_schedule linear --lr 1e-4 --batch_size 8 --microbatch 4

Every flag of image_train.py is taken, booleans spelled True/False as there. --class_cond False trains an
unconditional model, --use_fp16 True in bf16 autocast, --predict_xstart True on x0; of several --ema_rate
values the first is kept. A flag asking for what this project lacks (--learn_sigma True, --use_kl True, ...)
is a one-line error saying so. Unlike image_train.py, a run without --class_cond is class-conditional.

Besides: --model dit (the DiT of config.yaml), --max_steps, --resume and any config override
--section.key=value. The flags become a config, and train_ddp.main trains it: this file is a command line,
the training is train_ddp.py's. A run writes everything to outputs/<run>/: checkpoint.pth (atomic) and a
row of training_log.csv every save_interval steps, best_model.pth, and at the end training_loss.png,
sample_grid.png and timestep_grid_10x10.png (the grids not after Ctrl-C or SIGTERM, which save and leave).
"""
import argparse
import os
import sys
import time

import train_ddp
from checkpoint import load_checkpoint
from config import ArgumentParser, fail, load_config, read_yaml

# -----------------------------------------------------------------------------
# command line: every flag of improved-diffusion's scripts/image_train.py, mapped onto config.yaml

# its flags for features this project does not have: the value that means what the project does anyway
# (accepted silently), and what happens here instead (the error for any other value)
NOT_SUPPORTED = {
    "learn_sigma": (False, "the reverse variance is fixed (sampling.variance), not learned"),
    "use_kl": (False, "the loss is the MSE of the prediction target, not the variational bound"),
    "use_checkpoint": (False, "there is no gradient checkpointing"),
    "use_scale_shift_norm": (True, "the UNet's residual blocks always take the timestep as a scale and shift"),
    "schedule_sampler": ("uniform", "training timesteps are drawn uniformly"),
    "timestep_respacing": ("", "training uses every diffusion step (sampling's steps are --sampling.steps)"),
}


def boolean(text):
    """improved-diffusion's str2bool, so --class_cond True runs as written."""
    if text.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if text.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean: expected True or False")


def rates(text):
    """--ema_rate 0.9999,0.999: improved-diffusion's comma-separated EMA rates."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(0 <= v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated rates in [0, 1), like 0.9999,0.999")
    return values


def parse_args(argv):
    parser = ArgumentParser(description="Train a class-conditional DDPM on one CPU.",
                            epilog="Any config value can also be set as --section.key=value; those win over the "
                                   "flags above.")
    parser.add_argument("--model", choices=["unet", "dit"], help="default unet (a resumed run keeps its own)")
    parser.add_argument("--config", help="a config file in place of config.yaml")
    # improved-diffusion's flags; unset, config.yaml decides (a class-conditional model unless --class_cond False)
    parser.add_argument("--data_dir", help="CIFAR-10 folder (same as --data.data_dir)")
    for name in ("image_size", "num_channels", "num_res_blocks", "num_heads", "diffusion_steps", "batch_size"):
        parser.add_argument(f"--{name}", type=int)
    parser.add_argument("--num_heads_upsample", type=int, default=-1, help="-1 or --num_heads: the UNet has one count")
    parser.add_argument("--attention_resolutions", help="comma-separated, e.g. 16,8")
    parser.add_argument("--noise_schedule", choices=["linear", "cosine", "polynomial"])
    for name in ("lr", "dropout", "weight_decay"):
        parser.add_argument(f"--{name}", type=float)
    parser.add_argument("--lr_anneal_steps", type=int, default=0, help="N > 0: the learning rate falls linearly to "
                        "zero at step N, where training stops (--training.lr_cooldown=1 --training.max_steps=N)")
    parser.add_argument("--ema_rate", type=rates, help="one EMA is kept, at the first rate given")
    parser.add_argument("--class_cond", type=boolean, help="False: an unconditional model (model.class_dropout=1)")
    parser.add_argument("--use_fp16", type=boolean, help="True: this CPU's half precision, bf16 autocast with fp32 "
                        "weights (--training.precision=bf16)")
    parser.add_argument("--fp16_scale_growth", type=float, help="ignored: bf16 needs no loss scaling")
    parser.add_argument("--predict_xstart", type=boolean, help="True: the model predicts x0 (--diffusion.prediction=x0)")
    parser.add_argument("--sigma_small", type=boolean, help="DDPM sampling's variance, the posterior's (True) or "
                        "beta_t (False): --sampling.variance=small or large")
    parser.add_argument("--rescale_timesteps", type=boolean, help="True only at --diffusion_steps 1000, where it "
                        "changes nothing: the model sees the step index")
    parser.add_argument("--rescale_learned_sigmas", type=boolean, help="changes nothing without learned sigmas")
    for name, (value, why) in NOT_SUPPORTED.items():
        parser.add_argument(f"--{name}", type=boolean if isinstance(value, bool) else type(value),
                            help=f"only {value!r}: {why}")
    parser.add_argument("--microbatch", type=int, default=-1, help="-1: no micro-batching")
    parser.add_argument("--log_interval", type=int, default=10)
    parser.add_argument("--save_interval", type=int, help="steps between checkpoints (training.save_interval)")
    parser.add_argument("--resume", "--resume_checkpoint", dest="resume", help="checkpoint.pth of a run to continue")
    # this project's own
    parser.add_argument("--max_steps", type=int)
    parser.add_argument("--max_minutes", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--run", help="run name: outputs/<run>/ (default: model-schedule-time; a resumed run stays "
                        "in its checkpoint's folder)")
    parser.add_argument("--output_dir", default="outputs")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 master weights): "
                        "--training.precision=bf16; the default, auto, takes bf16 where this CPU runs it faster")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (--training.compile=true)")
    parser.add_argument("--overwrite", action="store_true", help="start afresh in a run folder that already holds a "
                        "checkpoint, replacing it (without this, such a run stops before training)")
    parser.add_argument("--grid_per_class", type=int, default=4, help="samples per class in the final grid (0: none)")
    return parser.parse(argv)


def build_config(args, overrides, base=None):
    """config.yaml (or a resumed run's config, base) < the improved-diffusion flags given < --section.key=value
    overrides."""
    refused = [f"--{name} {getattr(args, name)}" for name, (value, _) in NOT_SUPPORTED.items()
               if getattr(args, name) not in (None, value)]
    if refused:
        name = refused[0].split()[0].removeprefix("--")
        also = f" (nor {', '.join(refused[1:])})" if refused[1:] else ""
        fail(f"{refused[0]} is not supported: {NOT_SUPPORTED[name][1]}{also}")
    rate = args.ema_rate[0] if args.ema_rate else None
    if args.ema_rate and len(args.ema_rate) > 1:
        print(f"--ema_rate {','.join(f'{r:g}' for r in args.ema_rate)}: one EMA is kept, at {rate:g} (the first)")
    # image_train.py trains a UNet, so that is the default here, unless a --config preset names its own model
    preset = read_yaml(args.config) if args.config and base is None else None
    preset_model = preset.get("model") if isinstance(preset, dict) else None
    default_model = None if base or isinstance(preset_model, dict) and "name" in preset_model else "unet"
    # and it trains eps with plain MSE on uniform timesteps, whatever config.yaml's default objective, unless the
    # preset names its own
    preset_diffusion = preset.get("diffusion") if isinstance(preset, dict) else None
    named = lambda key: base or isinstance(preset_diffusion, dict) and key in preset_diffusion  # noqa: E731
    preset_training = preset.get("training") if isinstance(preset, dict) else None
    named_training = lambda key: base or isinstance(preset_training, dict) and key in preset_training  # noqa: E731
    flags = {"model.name": args.model or default_model, "data.data_dir": args.data_dir, "model.image_size": args.image_size,
             "model.num_channels": args.num_channels, "model.num_res_blocks": args.num_res_blocks,
             "diffusion.num_steps": args.diffusion_steps, "diffusion.noise_schedule": args.noise_schedule,
             "training.learning_rate": args.lr, "training.batch_size": args.batch_size,
             "training.max_steps": args.max_steps or args.lr_anneal_steps or None,
             "training.lr_cooldown": 1.0 if args.lr_anneal_steps > 0 else None, "model.unet_num_heads": args.num_heads,
             "model.dropout": args.dropout, "training.weight_decay": args.weight_decay,
             "training.ema_rate": rate, "training.seed": args.seed, "training.max_minutes": args.max_minutes,
             # improved-diffusion saves every 10,000 steps, unless told or the preset says otherwise
             "training.save_interval": args.save_interval or (None if named_training("save_interval") else 10000),
             "training.log_interval": args.log_interval, "training.grid_per_class": args.grid_per_class,
             "training.threads": args.threads, "training.microbatch": args.microbatch if args.microbatch > 0 else None,
             "training.precision": "bf16" if args.bf16 or args.use_fp16 else None,
             # image_train.py does not compile: config.yaml's default (for GPUs) applies only through a preset
             "training.compile": True if args.compile else (None if named_training("compile") else False),
             "model.class_dropout": 1.0 if args.class_cond is False else None,  # every label the null class
             "diffusion.prediction": "x0" if args.predict_xstart else (None if named("prediction") else "eps"),
             "diffusion.loss_weighting": None if named("loss_weighting") else "none",
             "diffusion.timestep_sampling": None if named("timestep_sampling") else "uniform",
             "sampling.variance": None if args.sigma_small is None else ("small" if args.sigma_small else "large"),
             "model.attention_resolutions": None if args.attention_resolutions is None
             else f"[{args.attention_resolutions}]"}
    # the flags' own checks first, so their errors name the flags
    if args.log_interval < 1:
        fail(f"--log_interval={args.log_interval} must be at least 1")
    if args.save_interval is not None and args.save_interval < 1:
        fail(f"--save_interval={args.save_interval} must be at least 1")
    if args.grid_per_class < 0:
        fail(f"--grid_per_class={args.grid_per_class}: expected 0 (no grid) or more samples per class")
    if args.microbatch == 0 or args.microbatch < -1:
        fail(f"--microbatch={args.microbatch}: expected -1 (off) or a positive size")
    if args.microbatch > 0 and args.batch_size and args.batch_size % args.microbatch:
        fail(f"--batch_size={args.batch_size} is not divisible by --microbatch={args.microbatch}")
    if args.lr_anneal_steps < 0:
        fail(f"--lr_anneal_steps={args.lr_anneal_steps}: expected 0 (a constant rate) or the step where it reaches zero")
    if args.lr_anneal_steps and args.max_steps not in (None, args.lr_anneal_steps):
        fail(f"--lr_anneal_steps={args.lr_anneal_steps} with --max_steps={args.max_steps}: the rate reaches zero "
             f"where the run stops; give one of them")
    if args.threads is not None and args.threads < 1:
        fail(f"--threads={args.threads} must be at least 1")
    given = [f"--{key}={value}" for key, value in flags.items() if value is not None]
    config_args = (["--config", args.config] if args.config else []) + given + overrides
    cfg = load_config(config_args, base=base)
    m, num_steps = cfg["model"], cfg["diffusion"]["num_steps"]
    if m["image_size"] != 32:
        fail(f"image_size={m['image_size']}: CIFAR-10 images are 32x32")
    if args.num_heads_upsample not in (-1, m["unet_num_heads"]):
        fail(f"--num_heads_upsample {args.num_heads_upsample} is not supported: the UNet's upsampling path has "
             f"--num_heads ({m['unet_num_heads']}) heads like the rest")
    if args.rescale_timesteps and num_steps != 1000:
        fail(f"--rescale_timesteps True is not supported at --diffusion_steps {num_steps}: the model sees the step "
             f"index 0..{num_steps - 1}, not rescaled to 0..1000")
    return cfg


# -----------------------------------------------------------------------------
# the run


IGNORED = {"fp16_scale_growth": "bf16 needs no loss scaling", "rescale_learned_sigmas": "there are no learned sigmas"}


def main(argv):
    args, overrides = parse_args(argv)
    for name, why in IGNORED.items():
        if getattr(args, name) is not None:
            print(f"note: --{name} is ignored: {why}")
    resumed = load_checkpoint(args.resume) if args.resume else None
    cfg = build_config(args, overrides, base=resumed["config"] if resumed else None)
    if args.resume:  # a resumed run goes on in its checkpoint's folder, beside its training_log.csv
        run_dir = os.path.dirname(os.path.abspath(args.resume))
    else:
        run_dir = os.path.join(args.output_dir, args.run or f"{cfg['model']['name']}-"
                               f"{cfg['diffusion']['noise_schedule']}-{time.strftime('%Y%m%d-%H%M%S')}")
    # one folder a run: its checkpoints, its log and its pictures
    cfg["training"]["checkpoint_dir"] = cfg["training"]["output_dir"] = run_dir
    train_ddp.main(cfg, resume=args.resume, overwrite=args.overwrite,
                   ways_on=f"--resume {os.path.join(run_dir, 'checkpoint.pth')} continues it, another --run (or "
                           f"--output_dir) starts a new one, --overwrite trains over it")


if __name__ == "__main__":
    main(sys.argv[1:])
