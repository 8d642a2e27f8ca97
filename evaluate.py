"""
Score a checkpoint, a samples file, or every checkpoint of a training run.

    python evaluate.py --checkpoint model/best_model.pth --num-samples 5000 --calculate-fid --calculate-is
    python evaluate.py --samples outputs/samples.npz --calculate-fid --calculate-is --calculate-kid
    python evaluate.py --checkpoints 'model/checkpoint_epoch_*.pth' --num-samples 5000 --calculate-fid
    python evaluate.py --train-classifier
    python evaluate.py --checkpoint outputs/cpu_2h/checkpoint.pth --all-metrics    # what make eval runs

FID, Inception Score (10 splits) and KID come from one pass of torch-fidelity's `inception-v3-compat`
network, which reproduces the original TensorFlow numbers (resize included). Its weights (the
2015-12-05 file, sha256 prefix 6726825d) come from --inception-weights or $FID_WEIGHTS, else the library
downloads them. Reference statistics of CIFAR-10 train or test are computed once from the data directory
and cached in --cache-dir (default model/). Published FIDs use 50,000 samples against the 50,000 training
images; fewer samples bias the FID upward.

Always reported, needing no external weights: accuracy of the generated images under the project's own
CIFAR-10 classifier (classifier.py) and the FID in that classifier's features against the test set.
These are the project's own metrics, for comparing our checkpoints only, not comparable with papers.

--config PATH and --section.key=value set the sampling, evaluation and data sections (--sampling.steps=10,
--evaluation.num_samples=1000); the sampling settings start from each checkpoint's own, and the flags win.
"""
import csv
import glob
import hashlib
import json
import os
import sys
import time

import numpy as np
import torch

from config import ArgumentParser, fail, load_config
from diffusion import SAMPLERS
from sample import parse_guidance_interval, sampling_options

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # also distributed as pt_inception-2015-12-05-6726825d.pth
EXTRACTOR = "inception-v3-compat"
KID_REFERENCE_SIZE = 10000  # reference features kept in the cache for KID (it compares 1000-image subsets)
PAPER_SAMPLES = 50000
SECTIONS = ("sampling", "evaluation", "data")  # what --config and the overrides may set: the rest is the checkpoint's
OWN_METRICS_NOTE = "project's own metrics (classifier.py): compare our checkpoints with each other only, not with papers"

# -----------------------------------------------------------------------------
# the metrics themselves: torch-fidelity's formulas, exposed as plain functions


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    first = {"mu": np.asarray(mu1, np.float64), "sigma": np.asarray(sigma1, np.float64)}
    second = {"mu": np.asarray(mu2, np.float64), "sigma": np.asarray(sigma2, np.float64)}
    return fid_statistics_to_metric(first, second, verbose=False)[KEY_METRIC_FID]


def inception_score(logits, splits=10):
    """(mean, std) over splits of exp(E_x KL(p(y|x) || p(y))), from logits (N, classes)."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
    score = isc_features_to_metric(torch.as_tensor(logits), splits=splits, shuffle=True, rng_seed=2020)
    return score[KEY_METRIC_ISC_MEAN], score[KEY_METRIC_ISC_STD]


def kernel_inception_distance(features, reference_features):
    """(mean, std) of the polynomial-kernel MMD over 100 random subsets of up to 1000 images each."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
    subset = min(1000, len(features), len(reference_features))
    kid = kid_features_to_metric(torch.as_tensor(features), torch.as_tensor(reference_features),
                                 kid_subset_size=subset, verbose=False)
    return kid[KEY_METRIC_KID_MEAN], kid[KEY_METRIC_KID_STD]


def statistics(features):
    features = np.asarray(features, np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


# -----------------------------------------------------------------------------
# Inception features through torch-fidelity


def inception_weights_at_hand(path):
    """Whether the Inception weights can be had: the given or $FID_WEIGHTS file, torch's cache, or a download."""
    path = path or os.environ.get("FID_WEIGHTS", "")
    if path:
        return os.path.isfile(path)
    from data import online
    return os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)) or online("github.com")


def inception_weights(path):
    """The weights file to load, or None to let torch-fidelity use its cached or downloaded copy."""
    path = path or os.environ.get("FID_WEIGHTS", "")
    if path:
        if not os.path.isfile(path):
            fail(f"Inception weights {path!r} do not exist (expected the file {INCEPTION_FILE})")
        return path
    if not inception_weights_at_hand(None):
        fail(f"FID/IS/KID need the Inception weights and this machine is offline: pass --inception-weights PATH "
             f"or set FID_WEIGHTS=PATH to the file {INCEPTION_FILE} (pt_inception-2015-12-05-6726825d.pth)")
    return None


def weights_tag(path):
    """Names the weights in cache files, so statistics of different weights never mix."""
    if path is None:
        return INCEPTION_FILE.split("-")[-1].removesuffix(".pth")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:8]


def build_inception(weights_path, device):
    from torch_fidelity.utils import create_feature_extractor
    try:
        return create_feature_extractor(EXTRACTOR, ["2048", "logits_unbiased"], cuda=device.startswith("cuda"),
                                        feature_extractor_weights_path=weights_path, verbose=False)
    except (RuntimeError, OSError, KeyError, ValueError) as e:  # a foreign or truncated file, a failed download
        first_line = str(e).partition("\n")[0][:200]  # may be empty; never an IndexError
        fail(f"cannot load the Inception weights {weights_path or INCEPTION_FILE!r}: {first_line}")


class UInt8Images(torch.utils.data.Dataset):
    """uint8 NHWC numpy images as the uint8 CHW tensors torch-fidelity's extractors take."""

    def __init__(self, images_nhwc):
        self.images = images_nhwc

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)


def inception_features(extractor, images_nhwc, batch_size, device):
    """{"2048": pool features (N, 2048), "logits_unbiased": (N, 1008)} in one pass, with a progress bar."""
    from torch_fidelity.utils import get_featuresdict_from_dataset
    return get_featuresdict_from_dataset(UInt8Images(images_nhwc), extractor, batch_size,
                                         cuda=device.startswith("cuda"), save_cpu_ram=True, verbose=True)


def reference_statistics(ref, extractor, weights_path, args):
    """{"mu", "sigma", "kid_features"} of CIFAR-10 train or test (cached in args.cache_dir), or of an .npz."""
    if ref not in ("train", "test"):
        try:
            with np.load(ref) as f:
                return {"mu": f["mu"], "sigma": f["sigma"], "kid_features": f["kid_features"] if "kid_features" in f else None}
        except (OSError, KeyError, ValueError) as e:
            fail(f"--ref {ref!r}: expected train, test or an .npz with mu and sigma ({type(e).__name__})")
    cache = os.path.join(args.cache_dir, f"fid_stats_cifar10_{ref}_{EXTRACTOR}_{weights_tag(weights_path)}.npz")
    if os.path.isfile(cache):
        with np.load(cache) as f:
            return {k: f[k] for k in ("mu", "sigma", "kid_features")}
    from data import load_cifar10
    images, _, _ = load_cifar10(args.data_dir, ref)
    print(f"computing Inception statistics of CIFAR-10 {ref} ({len(images)} images) once, for {cache}")
    features = inception_features(extractor, images.permute(0, 2, 3, 1).numpy(), args.batch_size, args.device)["2048"]
    mu, sigma = statistics(features.numpy())
    keep = np.random.default_rng(0).permutation(len(features))[:KID_REFERENCE_SIZE]
    os.makedirs(args.cache_dir, exist_ok=True)
    tmp = cache + ".tmp.npz"
    np.savez(tmp, mu=mu, sigma=sigma, kid_features=features.numpy()[np.sort(keep)])
    os.replace(tmp, cache)
    return {"mu": mu, "sigma": sigma, "kid_features": features.numpy()[np.sort(keep)]}


def colour_statistics(images_nhwc):
    """What the eye sees first in samples, on the 0-255 scale: the share of channel values at 0 or 255 (clipped),
    each channel's mean and std over the whole set, and the std of each channel within one image averaged over
    images and channels (low: flat images). CIFAR-10's test images: 1.2%, std about 64 and 51 within an image."""
    x = np.asarray(images_nhwc)
    values = x.reshape(len(x), -1, x.shape[-1]).astype(np.float64)
    return {"clipped_fraction": float(((x == 0) | (x == 255)).mean()),
            "channel_mean": values.mean(axis=(0, 1)).tolist(), "channel_std": values.std(axis=(0, 1)).tolist(),
            "within_image_std": float(values.std(axis=1).mean())}


# -----------------------------------------------------------------------------
# one evaluation: samples in, a dict of metrics out


def draw_samples(checkpoint, args, samples_path):
    """Sample args.num_samples images (classes cycling) from a checkpoint into samples_path (kept, so the
    scores can be recomputed elsewhere); returns (images NHWC uint8, labels, info)."""
    from checkpoint import model_from_checkpoint
    from sample import read_samples, write_samples_npz
    model, cfg, state = model_from_checkpoint(checkpoint, use_ema=not args.no_ema, map_location=args.device)
    cfg = load_config(args.overrides, args.config, base=cfg, sections=SECTIONS)
    labels = torch.arange(args.num_samples, device=args.device) % cfg["model"]["num_classes"]
    s = cfg["sampling"]
    seed = s["seed"] if args.seed is None else args.seed
    options = sampling_options(cfg, sampler=args.sampler, steps=args.steps, eta=args.eta, variance=args.variance,
                               guidance_scale=args.guidance_scale, guidance_interval=args.guidance_interval,
                               precision=args.precision, compile=args.compile or None, batch_size=args.batch_size)
    generator = torch.Generator(args.device).manual_seed(seed)
    torch.manual_seed(seed)
    started = time.time()
    write_samples_npz(samples_path, model, cfg, labels, generator=generator, **options)
    seconds = time.time() - started
    images, labels = read_samples(samples_path)
    info = {"checkpoint": checkpoint, "samples": samples_path, "epoch": state.get("epoch"), "step": state.get("step"),
            "training_hours": state.get("elapsed", 0.0) / 3600, "weights": "raw" if args.no_ema else "EMA",
            **options, "seed": seed, "sampling_s": seconds, "samples_per_s": len(images) / max(seconds, 1e-9)}
    return images, labels, info


def score(images, labels, metrics, class_names):
    """All requested metrics of uint8 NHWC images; labels (or None) are the classes they were drawn for."""
    out, timing = {"colour": colour_statistics(images)}, {}
    if metrics["inception"] is not None:
        started = time.time()
        extractor, reference, args = metrics["inception"]
        features = inception_features(extractor, images, args.batch_size, args.device)
        if args.calculate_fid:
            out["fid_score"] = frechet_distance(*statistics(features["2048"].numpy()), reference["mu"], reference["sigma"])
        if args.calculate_is:
            out["inception_score_mean"], out["inception_score_std"] = inception_score(features["logits_unbiased"])
        if args.calculate_kid:
            if reference["kid_features"] is None:
                fail(f"--ref {args.ref!r} holds no kid_features, so KID cannot be computed against it")
            out["kid_mean"], out["kid_std"] = kernel_inception_distance(features["2048"], reference["kid_features"])
        timing["inception_s"] = time.time() - started
    if metrics["classifier"] is not None:
        from classifier import extract_features, per_class_accuracy
        started = time.time()
        net, state = metrics["classifier"]
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        out["classifier_fid"] = frechet_distance(*statistics(extract_features(net, x)), state["test_mu"], state["test_sigma"])
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long)
            if labels.min() < 0 or labels.max() >= state["num_classes"]:
                fail(f"sample labels span {labels.min().item()}..{labels.max().item()}: expected class ids "
                     f"0..{state['num_classes'] - 1}")
            out["classifier_accuracy"], per_class = per_class_accuracy(net, x, labels, state["num_classes"])
            out["classifier_accuracy_per_class"] = dict(zip(class_names, per_class))
        timing["classifier_s"] = time.time() - started
    return out, timing


def real_test_images(args):
    """CIFAR-10's test images and labels, or None where no data directory is found (a samples file scored
    on another machine)."""
    from data import data_dir_at_hand, load_cifar10
    found = data_dir_at_hand(args.data_dir)
    return None if found is None else load_cifar10(found, "test")[:2]


def real_vs_fake(images, labels, real_test, path, class_names, per_class=5):
    """Real test images beside generated ones, one row per class (plain rows when labels are unknown)."""
    from data import save_grid
    if real_test is None:
        print("no CIFAR-10 data directory found: skipping real_vs_fake.png")
        return
    real, real_labels = real_test
    fake = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if labels is None:  # unknown classes: rows of arbitrary samples beside real images of classes 0, 1, ...
        fake_labels = torch.arange(len(fake)) // per_class
    else:
        fake_labels = torch.as_tensor(labels, dtype=torch.long)
    classes = [c for c in range(len(class_names)) if (fake_labels == c).any() and (real_labels == c).any()]
    if not classes:
        return
    per_class = min([per_class] + [int(min((fake_labels == c).sum(), (real_labels == c).sum())) for c in classes])
    rows = [torch.cat([real[real_labels == c][:per_class], fake[fake_labels == c][:per_class]]) for c in classes]
    save_grid(torch.cat(rows), path, nrow=2 * per_class,
              row_labels=[class_names[c] for c in classes] if labels is not None else None,
              title=f"real CIFAR-10 test images (left {per_class}) vs generated (right {per_class})")


def warn_if_biased(num_samples, args):
    if args.calculate_fid and num_samples < PAPER_SAMPLES:
        bar = "!" * 78
        print(f"{bar}\nWARNING: FID from {num_samples} samples is biased upward and NOT comparable with published "
              f"figures,\nwhich use {PAPER_SAMPLES} samples. Compare it only with FIDs of the same sample count.\n{bar}",
              file=sys.stderr)


# -----------------------------------------------------------------------------
# an ablation over a run's checkpoints: one row per checkpoint, in epoch order

ABLATION_COLUMNS = ["epoch", "step", "training_hours", "fid_score", "inception_score_mean", "inception_score_std",
                    "kid_mean", "kid_std", "classifier_accuracy", "classifier_fid", "samples_per_s", "checkpoint"]


def ablation_checkpoints(pattern):
    """The files matching pattern in epoch order, checked before anything is evaluated: each must load and
    all must share one architecture."""
    from checkpoint import load_checkpoint
    paths = sorted(glob.glob(pattern))
    if not paths:
        fail(f"--checkpoints {pattern!r} matches no file")
    found, first = [], None
    for path in paths:
        state = load_checkpoint(path)
        architecture = state["config"]["model"]
        if first is None:
            first = (path, architecture)
        elif architecture != first[1]:
            differs = sorted(k for k in architecture if architecture.get(k) != first[1].get(k))
            fail(f"checkpoint {path!r} has another architecture than {first[0]!r} ({', '.join(differs)} differ): "
                 f"an ablation compares checkpoints of one model")
        found.append((state.get("epoch", -1), state.get("step", -1), os.path.normpath(path)))
        del state
    return [path for _, _, path in sorted(found)]


def write_ablation_table(csv_path):
    """ablation.md and ablation.png from the CSV, sorted by epoch: rewritten after every row."""
    with open(csv_path) as f:
        rows = sorted(csv.DictReader(f), key=lambda r: (float(r["epoch"]), float(r["step"])))
    shown = [c for c in ABLATION_COLUMNS if c == "checkpoint" or any(r[c] != "" for r in rows)]
    md_path = csv_path.removesuffix(".csv") + ".md"
    with open(md_path, "w") as f:
        f.write("| " + " | ".join(shown) + " |\n|" + "---|" * len(shown) + "\n")
        for r in rows:
            f.write("| " + " | ".join(r[c] if c in ("checkpoint", "epoch", "step") or r[c] == ""
                                      else f"{float(r[c]):.4g}" for c in shown) + " |\n")
        f.write(f"\nclassifier_accuracy and classifier_fid are the {OWN_METRICS_NOTE}.\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = [c for c in shown if c not in ("epoch", "step", "training_hours", "checkpoint", "samples_per_s")
               and not c.endswith("_std")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3), dpi=100, squeeze=False)
    epochs = [float(r["epoch"]) for r in rows]
    for ax, metric in zip(axes[0], metrics):
        ax.plot(epochs, [float(r[metric]) if r[metric] else np.nan for r in rows], marker="o")
        ax.set_xlabel("epoch")
        ax.set_title(metric, fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(csv_path.removesuffix(".csv") + ".png")
    plt.close(fig)


def run_ablation(args, metrics, class_names):
    paths = ablation_checkpoints(args.checkpoints)
    csv_path = os.path.join(args.output_dir, "ablation.csv")
    rows = []
    if os.path.isfile(csv_path):
        with open(csv_path) as f:
            rows = list(csv.DictReader(f))
    if args.force:  # the forced checkpoints' old rows go; the file is replaced atomically
        rows = [r for r in rows if r["checkpoint"] not in paths]
    if args.force or not os.path.isfile(csv_path):
        os.makedirs(args.output_dir, exist_ok=True)
        with open(csv_path + ".tmp", "w", newline="") as f:
            writer = csv.DictWriter(f, ABLATION_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(csv_path + ".tmp", csv_path)
    done = {r["checkpoint"] for r in rows}
    todo = [p for p in paths if p not in done]
    print(f"ablation over {len(paths)} checkpoints: {len(paths) - len(todo)} already in {csv_path}, {len(todo)} to evaluate")
    for path in todo:
        epoch_name = os.path.splitext(os.path.basename(path))[0]
        images, labels, info = draw_samples(path, args, os.path.join(args.output_dir, "ablation_samples", f"{epoch_name}.npz"))
        results, _ = score(images, labels, metrics, class_names)
        row = {**info, **results, "checkpoint": path}
        with open(csv_path, "a", newline="") as f:  # appended row by row: an interrupted ablation keeps its rows
            csv.DictWriter(f, ABLATION_COLUMNS, extrasaction="ignore").writerow(
                {c: "" if row.get(c) is None else row[c] for c in ABLATION_COLUMNS})
        print(f"epoch {info['epoch']}: " + ", ".join(f"{k} {v:.4g}" for k, v in results.items() if isinstance(v, float)))
        write_ablation_table(csv_path)
    if rows or todo:
        write_ablation_table(csv_path)
        print(f"wrote {csv_path} and its .md and .png")


# -----------------------------------------------------------------------------
# a comparison: several checkpoints, each at several sampler settings ("cells"), one table

COMPARE_COLUMNS = ["run", "step", "cell", "num_samples", "classifier_accuracy", "classifier_fid", "clipped_fraction",
                   "channel_mean", "channel_std", "within_image_std", "samples_per_s", "checkpoint"]


def parse_cell(text):
    """A sampler setting written as SAMPLER-STEPS[-etaE][-gG][-iLOW:HIGH][-large], e.g. ddim-50-eta1-g3 or
    dpm++2m-20-g3-i0.3:5, as the options of draw_samples."""
    sampler, _, rest = text.partition("-")
    parts = rest.split("-")
    try:
        cell = {"sampler": sampler, "steps": int(parts[0]), "eta": 0.0, "guidance_scale": 1.0, "guidance_interval": [],
                "variance": "small"}
        for part in parts[1:]:
            if part.startswith("eta"):
                cell["eta"] = float(part[3:])
            elif part.startswith("g"):
                cell["guidance_scale"] = float(part[1:])
            elif part.startswith("i"):
                cell["guidance_interval"] = parse_guidance_interval(part[1:].replace(":", ","))
            elif part in ("small", "large"):
                cell["variance"] = part
            else:
                raise ValueError(part)
    except (ValueError, IndexError):
        fail(f"--cells: {text!r} is not SAMPLER-STEPS[-etaE][-gG][-iLOW:HIGH][-large], like ddim-50-eta1-g3")
    if sampler not in SAMPLERS or cell["steps"] < 1:
        fail(f"--cells: {text!r}: expected a sampler of {', '.join(SAMPLERS)} and at least 1 step")
    return cell


def write_compare_table(csv_path):
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    with open(csv_path.removesuffix(".csv") + ".md", "w") as f:
        f.write("| run | step | cell | samples | accuracy | classifier FID | clipped | channel mean | channel std "
                "| std within an image | samples/s |\n|" + "---|" * 11 + "\n")
        for r in rows:
            f.write(f"| {r['run']} | {r['step']} | {r['cell']} | {r['num_samples']} | "
                    f"{100 * float(r['classifier_accuracy']):.1f}% | {float(r['classifier_fid']):.1f} | "
                    f"{100 * float(r['clipped_fraction']):.1f}% | {r['channel_mean']} | {float(r['channel_std']):.1f} | "
                    f"{float(r['within_image_std']):.1f} | {float(r['samples_per_s']):.2f} |\n")
        f.write(f"\naccuracy and classifier FID are the {OWN_METRICS_NOTE}; colour statistics on the 0-255 scale.\n")


def run_compare(args, metrics, class_names):
    """Every checkpoint at every cell, appended row by row to compare.csv (an interrupted comparison keeps
    its rows and resumes), with compare.md and a class grid per row (10 of each class, from the same samples)."""
    from data import save_grid
    if metrics["classifier"] is None:
        fail("--compare needs the project's classifier: python evaluate.py --train-classifier")
    from checkpoint import RunFolderTaken, claim_run_folder
    cells = [(text, parse_cell(text)) for text in args.cells.split(",")]
    csv_path = os.path.join(args.output_dir, "compare.csv")
    try:  # one comparison at a time in a folder: two would each append the rows they find missing
        claim_run_folder(args.output_dir, [], resuming=True)
    except RunFolderTaken as e:
        fail(str(e))
    if not os.path.isfile(csv_path):
        with open(csv_path, "w", newline="") as f:
            csv.writer(f).writerow(COMPARE_COLUMNS)
    with open(csv_path) as f:
        done = {(r["checkpoint"], r["cell"], r["num_samples"]) for r in csv.DictReader(f)}
    for checkpoint in args.compare:
        run = os.path.basename(os.path.dirname(os.path.abspath(checkpoint)))
        for text, cell in cells:
            if (checkpoint, text, str(args.num_samples)) in done:
                continue
            for key, value in cell.items():
                setattr(args, key, value)
            name = f"{run}_{text}".replace("+", "p").replace(":", "_")
            images, labels, info = draw_samples(checkpoint, args, os.path.join(args.output_dir, "samples", f"{name}.npz"))
            results, _ = score(images, labels, metrics, class_names)
            colour = results["colour"]
            row = {"run": run, "step": info["step"], "cell": text, "num_samples": len(images),
                   "classifier_accuracy": results["classifier_accuracy"], "classifier_fid": results["classifier_fid"],
                   "clipped_fraction": colour["clipped_fraction"],
                   "channel_mean": "/".join(f"{v:.0f}" for v in colour["channel_mean"]),
                   "channel_std": float(np.mean(colour["channel_std"])), "within_image_std": colour["within_image_std"],
                   "samples_per_s": info["samples_per_s"], "checkpoint": checkpoint}
            with open(csv_path, "a", newline="") as f:
                csv.DictWriter(f, COMPARE_COLUMNS).writerow(row)
            write_compare_table(csv_path)
            per_class = [np.flatnonzero(labels == c)[:10] for c in range(len(class_names))]
            grid = torch.from_numpy(np.ascontiguousarray(images[np.concatenate(per_class)])).permute(0, 3, 1, 2)
            save_grid(grid, os.path.join(args.output_dir, "grids", f"{name}.png"), nrow=10, row_labels=class_names,
                      title=f"{run} (step {info['step']}), {text}")
            print(f"{run} {text}: accuracy {row['classifier_accuracy']:.4f}, classifier FID "
                  f"{row['classifier_fid']:.1f}, {100 * row['clipped_fraction']:.1f}% clipped, channel std "
                  f"{row['channel_std']:.1f}, within an image {row['within_image_std']:.1f}")
    print(f"wrote {csv_path} and {csv_path.removesuffix('.csv')}.md")


# -----------------------------------------------------------------------------
# command line


def train_and_cache_classifier(args):
    from checkpoint import save_checkpoint
    from classifier import classifier_state, train_classifier
    from data import load_cifar10
    train_images, train_labels, names = load_cifar10(args.data_dir, "train")
    test_images, test_labels, _ = load_cifar10(args.data_dir, "test")
    print(f"training the CIFAR-10 classifier on {len(train_images)} images ({args.device})")
    net, accuracy, seconds = train_classifier(train_images, train_labels, test_images, test_labels,
                                              epochs=args.classifier_epochs, seed=args.seed or 0, device=args.device)
    save_checkpoint(classifier_state(net.cpu(), accuracy, seconds, args.classifier_epochs, names, test_images),
                    args.classifier)
    print(f"classifier: test accuracy {accuracy:.4f} (flip TTA) after {seconds / 60:.1f} min; wrote {args.classifier}")


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                            epilog="--section.key=value sets any sampling, evaluation or data value; the flags "
                                   "above win over it.")
    parser.add_argument("--config", help="a config file: its sampling, evaluation and data sections apply")
    source = parser.add_argument_group("what to score (one of)")
    source.add_argument("--checkpoint", help="sample from this checkpoint, then score the samples")
    source.add_argument("--checkpoints", help="a glob of a run's checkpoints: the epoch-by-epoch ablation")
    source.add_argument("--samples", help="an existing samples .npz or folder of PNGs")
    source.add_argument("--compare", nargs="+", metavar="CHECKPOINT",
                        help="several checkpoints, each sampled at every --cells setting: one table, compare.md")
    parser.add_argument("--cells", default="ddim-50-eta1-g3,dpm++2m-20-g3",
                        help="with --compare: comma-separated SAMPLER-STEPS[-etaE][-gG][-iLOW:HIGH][-large]")
    parser.add_argument("--num-samples", type=int)
    parser.add_argument("--calculate-fid", action="store_true")
    parser.add_argument("--calculate-is", action="store_true")
    parser.add_argument("--calculate-kid", action="store_true")
    parser.add_argument("--all-metrics", action="store_true",
                        help="every metric this machine can compute: FID, IS and KID when the Inception weights are "
                             "at hand, and the classifier metrics, training the classifier first if it is not cached")
    parser.add_argument("--ref", default=None, help="train | test | an .npz with mu, sigma (default train)")
    parser.add_argument("--inception-weights", help=f"{INCEPTION_FILE} (or set FID_WEIGHTS)")
    parser.add_argument("--train-classifier", action="store_true", help="train and cache the project's classifier")
    parser.add_argument("--classifier", default=os.path.join("model", "cifar10_classifier.pth"))
    parser.add_argument("--classifier-epochs", type=int, help="default: 10 on CPU, 16 on a GPU")
    parser.add_argument("--sampler", choices=SAMPLERS)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--eta", type=float)
    parser.add_argument("--variance", choices=["small", "large"], help="DDPM's noise: the posterior's or beta_t")
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--guidance-interval", type=parse_guidance_interval, metavar="LOW,HIGH",
                        help="guide only at noise levels sqrt((1 - alpha_bar) / alpha_bar) in (LOW, HIGH]; 'all': everywhere")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], help="the model's forward passes (sampling.precision)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model for sampling")
    parser.add_argument("--seed", type=int, help="default sampling.seed (0 for the classifier)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-ema", action="store_true")
    parser.add_argument("--force", action="store_true", help="re-evaluate checkpoints already in ablation.csv")
    parser.add_argument("--data-dir", default="", help="default data.data_dir")
    parser.add_argument("--output-dir", default="outputs")
    parser.add_argument("--cache-dir", default="model", help="where reference statistics are cached")
    args, overrides = parser.parse(argv)
    args.overrides = overrides
    sources = [name for name in ("checkpoint", "checkpoints", "samples", "compare") if getattr(args, name)]
    if len(sources) > 1:
        fail(f"--{sources[0]} and --{sources[1]} both given: expected one thing to score")
    if not sources and not args.train_classifier:
        fail("nothing to do: expected --checkpoint, --checkpoints, --samples, --compare or --train-classifier")
    cfg = load_config(args.overrides, args.config, sections=SECTIONS)  # checked before any long pass
    evaluation = cfg["evaluation"]
    args.num_samples = evaluation["num_samples"] if args.num_samples is None else args.num_samples
    args.batch_size = args.batch_size or evaluation["batch_size"]
    args.ref = args.ref or evaluation["reference"]
    args.data_dir = args.data_dir or cfg["data"]["data_dir"]
    if args.num_samples < 1:
        fail(f"--num-samples={args.num_samples} must be at least 1")
    for name in ("steps", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")
    if args.classifier_epochs is not None and args.classifier_epochs < 1:
        fail(f"--classifier-epochs={args.classifier_epochs} must be at least 1")
    if args.checkpoint and not os.path.isfile(args.checkpoint):  # before any long reference pass
        fail(f"checkpoint {args.checkpoint!r} does not exist")
    if args.all_metrics:
        if inception_weights_at_hand(args.inception_weights):
            args.calculate_fid = args.calculate_is = args.calculate_kid = True
        else:
            print(f"--all-metrics: no Inception weights here (--inception-weights or FID_WEIGHTS={INCEPTION_FILE}), "
                  "so no FID, IS or KID")
        if not os.path.isfile(args.classifier) and not args.train_classifier:
            print(f"--all-metrics: no classifier at {args.classifier}, training it first")
            args.train_classifier = True
    if args.samples and not os.path.exists(args.samples):
        fail(f"samples {args.samples!r} do not exist")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device={args.device} but CUDA is not available")
    return args


def main(argv):
    args = parse_args(argv)
    started = time.time()
    from csrc import KERNELS_PATH
    print(f"kernels: {KERNELS_PATH}, device {args.device}")
    if args.train_classifier:
        train_and_cache_classifier(args)
        if not (args.checkpoint or args.checkpoints or args.samples or args.compare):
            return

    # everything that can fail is checked before any sampling: weights, reference statistics, classifier
    metrics = {"inception": None, "classifier": None}
    if args.calculate_fid or args.calculate_is or args.calculate_kid:
        weights_path = inception_weights(args.inception_weights)
        extractor = build_inception(weights_path, args.device)
        reference = reference_statistics(args.ref, extractor, weights_path, args) if (
            args.calculate_fid or args.calculate_kid) else None
        metrics["inception"] = (extractor, reference, args)
    if os.path.isfile(args.classifier):
        from classifier import load_classifier
        net, state = load_classifier(args.classifier)
        metrics["classifier"] = (net.to(args.device), state)
    else:
        print(f"no classifier at {args.classifier}: the project's own metrics are skipped "
              f"(python evaluate.py --train-classifier makes it)")
    if metrics["inception"] is None and metrics["classifier"] is None:
        fail("no metric to compute: pass --calculate-fid/--calculate-is/--calculate-kid with Inception weights, "
             "or train the classifier with --train-classifier")
    from data import CIFAR10_CLASSES
    class_names = metrics["classifier"][1]["class_names"] if metrics["classifier"] else list(CIFAR10_CLASSES)

    if args.checkpoints:
        warn_if_biased(args.num_samples, args)
        return run_ablation(args, metrics, class_names)
    if args.compare:
        from checkpoint import load_checkpoint
        for path in args.compare:
            load_checkpoint(path)  # every checkpoint readable before the first long sampling run
        return run_compare(args, metrics, class_names)
    if args.samples:
        from sample import read_samples
        images, labels = read_samples(args.samples)
        info = {"checkpoint": None, "samples": args.samples}
    else:
        images, labels, info = draw_samples(args.checkpoint, args, os.path.join(args.output_dir, "samples.npz"))
    if images.ndim != 4 or images.shape[3] != 3:
        fail(f"samples have shape {tuple(images.shape)}: expected uint8 images (N, H, W, 3)")
    warn_if_biased(len(images), args)
    results, timing = score(images, labels, metrics, class_names)
    real_test = real_test_images(args)  # loaded once, for the colour reference and real_vs_fake.png
    report = {"num_samples": len(images), "checkpoint": info["checkpoint"], "fid_score": results.get("fid_score"),
              "inception_score_mean": results.get("inception_score_mean"),
              "inception_score_std": results.get("inception_score_std"),
              "kid_mean": results.get("kid_mean"), "kid_std": results.get("kid_std"),
              "reference": args.ref if args.calculate_fid or args.calculate_kid else None,
              "inception_weights": (args.inception_weights or os.environ.get("FID_WEIGHTS") or INCEPTION_FILE)
              if metrics["inception"] else None,
              **{k: v for k, v in info.items() if k != "checkpoint"},
              "project_metrics_note": OWN_METRICS_NOTE if metrics["classifier"] else None,
              "classifier_accuracy": results.get("classifier_accuracy"),
              "classifier_accuracy_per_class": results.get("classifier_accuracy_per_class"),
              "classifier_fid": results.get("classifier_fid"),
              "classifier_test_accuracy": metrics["classifier"][1]["test_accuracy"] if metrics["classifier"] else None,
              "colour": results["colour"],
              "colour_real_test": None if real_test is None else colour_statistics(real_test[0].permute(0, 2, 3, 1).numpy()),
              "timing": {**{k: info[k] for k in ("sampling_s", "samples_per_s") if k in info}, **timing,
                         "total_s": time.time() - started}}
    os.makedirs(args.output_dir, exist_ok=True)
    json_path = os.path.join(args.output_dir, "evaluation_results.json")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    real_vs_fake(images, labels, real_test, os.path.join(args.output_dir, "real_vs_fake.png"), class_names)
    for key in ("fid_score", "inception_score_mean", "kid_mean"):
        if report[key] is not None:
            print(f"{key}: {report[key]:.4f}")
    if report["classifier_fid"] is not None:
        accuracy = report["classifier_accuracy"]
        print(f"classifier FID (test set): {report['classifier_fid']:.4f}" + (
            f", classifier accuracy {accuracy:.4f}" if accuracy is not None else "") + f"  [{OWN_METRICS_NOTE}]")
    colour, real = report["colour"], report["colour_real_test"]
    print(f"colour: {100 * colour['clipped_fraction']:.1f}% clipped, channel std "
          f"{np.mean(colour['channel_std']):.1f}, within an image {colour['within_image_std']:.1f}" + (
              f" (real test images: {100 * real['clipped_fraction']:.1f}%, {np.mean(real['channel_std']):.1f}, "
              f"{real['within_image_std']:.1f})" if real else ""))
    print(f"wrote {json_path}")


if __name__ == "__main__":
    main(sys.argv[1:])
