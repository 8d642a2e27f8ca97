"""
Draw images from a checkpoint (EMA weights by default) with the DDPM, DDIM or DPM-Solver++(2M) sampler,
respaced to any number of steps, with classifier-free guidance. Writes the class grid, the timestep grid,
and optionally a samples file for evaluate.py:

    python sample.py --checkpoint model/best_model.pth --sampler ddim --steps 50 --guidance_scale 2
    python sample.py --checkpoint model/best_model.pth --sampler dpm++2m --steps 20 --guidance_interval 0.3,5
    python sample.py --checkpoint model/best_model.pth --num_samples 50000 --out samples.npz
    python sample.py --checkpoint model/best_model.pth --num_samples 100 --out samples/
    python sample.py --checkpoint model/best_model.pth --config configs/cpu_2h.yaml --sampling.steps=10

The sampling settings are the checkpoint's own, then those of --config PATH's sampling section, then
--sampling.key=value overrides, then the flags, which win. The model and diffusion are the checkpoint's.
The training scripts import sample_images, save_class_grid and save_timestep_grid from here.
"""
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from checkpoint import model_from_checkpoint
from config import ArgumentParser, fail, load_config
from csrc import KERNELS_PATH
from data import save_grid, to_uint8
from diffusion import SAMPLERS, Diffusion
from model import autocast_dtype_for

# -----------------------------------------------------------------------------
# sampling


def unconditional(cfg):
    """A model trained with every label replaced by the null class (model.class_dropout = 1, as train_cpu.py's
    --class_cond False makes it): it draws from the whole data set, whatever class is asked for."""
    return cfg["model"]["class_dropout"] >= 1


SAMPLING_OPTIONS = ("sampler", "steps", "eta", "guidance_scale", "guidance_interval", "variance", "batch_size",
                    "precision", "compile")


def sampling_options(cfg, **given):
    """The sampling options in force, as a dict of SAMPLING_OPTIONS: each one given (and not None) wins over
    cfg["sampling"]'s. The one place they are resolved, for the grids, the sample files and evaluate.py."""
    unknown = sorted(set(given) - set(SAMPLING_OPTIONS))
    if unknown:
        raise TypeError(f"not sampling options: {', '.join(unknown)}")
    s = cfg["sampling"]
    return {name: s[name] if given.get(name) is None else given[name] for name in SAMPLING_OPTIONS}


def sample_images(model, cfg, labels, generator=None, callback=None, progress=False, **options):
    """Images in [-1, 1] for the given labels (N,), drawn in batches; options are sampling_options's, the unset
    ones from cfg["sampling"]. callback(i, x, batch_index) sees each reverse step of each batch. An
    unconditional model is given the null class, the only one it was trained on, and no guidance (there is
    nothing to guide to)."""
    o = sampling_options(cfg, **options)
    m = cfg["model"]
    if unconditional(cfg):
        labels, o["guidance_scale"] = torch.full_like(labels, m["num_classes"]), 1.0
    device = labels.device
    # autocast reaches only the model's matmuls and convolutions, whose outputs the sampler casts back to fp32
    autocast_dtype = autocast_dtype_for(o["precision"], device)
    if o["compile"]:
        model = torch.compile(model)
    diffusion = Diffusion.from_config(cfg["diffusion"]).for_sampler(o["sampler"], o["steps"])
    shape = (m["image_channels"], m["image_size"], m["image_size"])
    out = []
    batches = range(0, len(labels), o["batch_size"])
    for b, start in enumerate(tqdm(batches, desc="sampling", unit="batch", disable=not progress)):
        y = labels[start:start + o["batch_size"]]
        step_callback = None if callback is None else (lambda i, x, b=b: callback(i, x, b))
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            out.append(diffusion.sample(model, (len(y),) + shape, y, sampler=o["sampler"], eta=o["eta"],
                                        guidance_scale=o["guidance_scale"], clip_denoised=cfg["sampling"]["clip_denoised"],
                                        null_class=m["num_classes"], generator=generator, callback=step_callback,
                                        guidance_interval=o["guidance_interval"], variance=o["variance"]))
    return torch.cat(out) if out else torch.empty((0,) + shape)


def save_class_grid(model, cfg, class_names, path, classes=None, per_class=10, generator=None, progress=False,
                    **options):
    """One row per class (all classes unless given), per_class samples each, rows labelled by name (rows of
    plain samples for an unconditional model). options are sample_images's: sampler, steps, eta, guidance_scale,
    guidance_interval, variance, batch_size, precision, compile."""
    device = next(model.parameters()).device
    classes = list(range(len(class_names))) if classes is None else classes
    labels = torch.tensor(classes, device=device).repeat_interleave(per_class)
    images = sample_images(model, cfg, labels, generator=generator, progress=progress, **options)
    chosen = sampling_options(cfg, **options)
    eta = f", eta {chosen['eta']:g}" if chosen["sampler"] == "ddim" and chosen["eta"] else ""
    interval = chosen["guidance_interval"]
    interval = f" for sigma in ({interval[0]:g}, {interval[1]:g}]" if interval and chosen["guidance_scale"] != 1 else ""
    title = f"{chosen['sampler'].upper()}-{chosen['steps']}{eta}, guidance {chosen['guidance_scale']:g}{interval}"
    row_labels = [class_names[c] for c in classes]
    if unconditional(cfg):
        title, row_labels = f"{chosen['sampler'].upper()}-{chosen['steps']}{eta}, unconditional", None
    save_grid(to_uint8(images).cpu(), path, nrow=per_class, row_labels=row_labels, title=title)
    return images


def save_timestep_grid(model, cfg, path, num_samples=10, num_snapshots=10, generator=None, **options):
    """num_samples rows, each showing num_snapshots evenly spaced states of its reverse process, ending at
    the final image. Labels cycle through the classes. options are sampling_options's."""
    device = next(model.parameters()).device
    labels = torch.arange(num_samples, device=device) % cfg["model"]["num_classes"]
    o = sampling_options(cfg, **options)
    o["batch_size"] = num_samples  # one batch, so the snapshots line up
    num_steps = Diffusion.from_config(cfg["diffusion"]).for_sampler(o["sampler"], o["steps"]).num_steps
    keep = set(np.linspace(0, num_steps - 1, num_snapshots).round().astype(int).tolist())
    snapshots = []

    def record(i, x, batch_index):
        if i in keep:
            snapshots.append(to_uint8(x).cpu())

    sample_images(model, cfg, labels, generator=generator, callback=record, **o)
    grid = torch.stack(snapshots, dim=1).flatten(0, 1)  # (samples * snapshots, C, H, W), row per sample
    save_grid(grid, path, nrow=len(snapshots), title="reverse process, noise (left) to image (right)")


# -----------------------------------------------------------------------------
# samples files: uint8 NHWC images with labels, as .npz or a folder of PNGs


def write_samples_npz(path, model, cfg, labels, progress=True, **kwargs):
    """Samples go batch by batch into a file-backed array, so 50,000 of them never sit twice in memory;
    the .npz is then written next to it and renamed into place. An unconditional model's samples have no labels."""
    m = cfg["model"]
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    scratch = os.path.join(folder, f".tmp-{os.getpid()}-images.npy")
    images = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.uint8,
                                       shape=(len(labels), m["image_size"], m["image_size"], m["image_channels"]))
    try:
        batch_size = kwargs.pop("batch_size", None) or cfg["sampling"]["batch_size"]
        for start in tqdm(range(0, len(labels), batch_size), desc="sampling", unit="batch", disable=not progress):
            y = labels[start:start + batch_size]
            x = sample_images(model, cfg, y, batch_size=batch_size, **kwargs)
            images[start:start + len(y)] = to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()
        images.flush()
        tmp = os.path.join(folder, f".tmp-{os.getpid()}.npz")
        classes = {} if unconditional(cfg) else {"labels": labels.cpu().numpy().astype(np.int64)}
        np.savez(tmp, images=images, **classes)
        os.replace(tmp, path)
    finally:
        del images
        os.unlink(scratch)


def write_samples_folder(folder, model, cfg, labels, class_names, progress=True, **kwargs):
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    batch_size = kwargs.pop("batch_size", None) or cfg["sampling"]["batch_size"]
    for start in tqdm(range(0, len(labels), batch_size), desc="sampling", unit="batch", disable=not progress):
        y = labels[start:start + batch_size]
        x = to_uint8(sample_images(model, cfg, y, batch_size=batch_size, **kwargs)).permute(0, 2, 3, 1).cpu().numpy()
        for j, (image, label) in enumerate(zip(x, y.tolist())):
            name = "sample" if unconditional(cfg) else class_names[label]
            Image.fromarray(image).save(os.path.join(folder, f"{name}_{start + j:05d}.png"))


def read_samples(path):
    """(uint8 images (N, H, W, C), int64 labels (N,) or None) from an .npz or a folder of PNGs."""
    if os.path.isdir(path):
        from PIL import Image
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(".png"))
        if not files:
            fail(f"sample folder {path!r} holds no .png files")
        return np.stack([np.asarray(Image.open(os.path.join(path, f)).convert("RGB")) for f in files]), None
    if not os.path.isfile(path):
        fail(f"samples {path!r} do not exist")
    try:
        with np.load(path) as f:
            return f["images"], (f["labels"] if "labels" in f else None)
    except Exception as e:
        fail(f"samples {path!r} cannot be read as an .npz with an 'images' array ({type(e).__name__})")


# -----------------------------------------------------------------------------
# command line


def parse_guidance_interval(text):
    """--guidance_interval LOW,HIGH as [low, high]; all (or an empty value) is [], guidance everywhere."""
    if text.strip().lower() in ("", "all"):
        return []
    try:
        interval = [float(v) for v in text.split(",")]
    except ValueError:
        interval = None
    if not interval or len(interval) != 2 or not 0 <= interval[0] < interval[1]:
        fail(f"--guidance_interval={text!r}: expected LOW,HIGH with 0 <= LOW < HIGH (noise levels "
             f"sqrt((1 - alpha_bar) / alpha_bar), e.g. 0.3,5), or all")
    return interval


def parse_classes(text, num_classes):
    if text == "all":
        return list(range(num_classes))
    try:
        classes = [int(c) for c in text.split(",")]
    except ValueError:
        fail(f"--classes={text!r}: expected comma-separated class ids like 0,3,5 or 'all'")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        fail(f"--classes: class id {bad[0]} is out of range 0..{num_classes - 1}")
    return classes


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                            epilog="--sampling.key=value sets any sampling value; the flags above win over it.")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--config", help="a config file: its sampling section replaces the checkpoint's")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    parser.add_argument("--sampler", choices=SAMPLERS)
    parser.add_argument("--steps", type=int, help="respaced steps, e.g. 1000, 250, 50, 20")
    parser.add_argument("--eta", type=float)
    parser.add_argument("--variance", choices=["small", "large"], help="DDPM's noise: the posterior's or beta_t")
    parser.add_argument("--guidance_scale", type=float, help="classifier-free guidance; 1.0 is none")
    parser.add_argument("--guidance_interval", type=parse_guidance_interval, metavar="LOW,HIGH",
                        help="guide only at noise levels sqrt((1 - alpha_bar) / alpha_bar) in (LOW, HIGH]; 'all': everywhere")
    parser.add_argument("--classes", default="all", help="comma-separated class ids, or all")
    parser.add_argument("--per_class", type=int, default=10)
    parser.add_argument("--num_samples", type=int, default=0, help="with --out: this many samples, classes cycling")
    parser.add_argument("--out", help="samples.npz, or a folder/ for PNG files")
    parser.add_argument("--seed", type=int, help="default sampling.seed")
    parser.add_argument("--batch_size", type=int)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], help="the model's forward passes (sampling.precision)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model for sampling")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output_dir", default="outputs")
    parser.add_argument("--no-grids", action="store_true", help="skip the class and timestep grids")
    args, overrides = parser.parse(argv)
    for name in ("steps", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name}={getattr(args, name)} must be at least 1")
    if args.per_class < 1:
        fail(f"--per_class={args.per_class} must be at least 1")
    if args.num_samples < 0 or (args.num_samples and not args.out) or (args.out and args.num_samples < 1):
        fail(f"--num_samples={args.num_samples}: expected a positive count together with --out")

    model, cfg, state = model_from_checkpoint(args.checkpoint, use_ema=not args.no_ema, map_location=args.device)
    cfg = load_config(overrides, args.config, base=cfg, sections=("sampling",))
    seed = cfg["sampling"]["seed"] if args.seed is None else args.seed
    names = state.get("class_names") or [str(i) for i in range(cfg["model"]["num_classes"])]
    classes = parse_classes(args.classes, cfg["model"]["num_classes"])
    options = dict(sampler=args.sampler, steps=args.steps, eta=args.eta, guidance_scale=args.guidance_scale,
                   guidance_interval=args.guidance_interval, variance=args.variance, batch_size=args.batch_size,
                   precision=args.precision, compile=args.compile or None)
    print(f"{args.checkpoint}: step {state.get('step', '?')}, {'raw' if args.no_ema else 'EMA'} weights, "
          f"kernels: {KERNELS_PATH}, device {args.device}")
    generator = torch.Generator(args.device).manual_seed(seed)
    torch.manual_seed(seed)
    started = time.time()
    if not args.no_grids:
        grid_path = os.path.join(args.output_dir, "sample_grid.png")
        save_class_grid(model, cfg, names, grid_path, classes, args.per_class, generator, progress=True, **options)
        save_timestep_grid(model, cfg, os.path.join(args.output_dir, "timestep_grid_10x10.png"), generator=generator,
                           **options)
        print(f"wrote {grid_path} and {os.path.join(args.output_dir, 'timestep_grid_10x10.png')}")
    if args.out:
        labels = torch.tensor(classes, device=args.device).repeat(-(-args.num_samples // len(classes)))[:args.num_samples]
        writer_started = time.time()
        if args.out.endswith("/") or os.path.isdir(args.out):
            write_samples_folder(args.out, model, cfg, labels, names, generator=generator, **options)
        else:
            write_samples_npz(args.out, model, cfg, labels, generator=generator, **options)
        seconds = time.time() - writer_started
        print(f"wrote {args.num_samples} samples to {args.out} in {seconds:.1f} s "
              f"({args.num_samples / max(seconds, 1e-9):.1f} samples/s)")
    print(f"done in {time.time() - started:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
