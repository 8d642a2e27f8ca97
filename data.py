"""
CIFAR-10 as one in-memory uint8 tensor. The whole training set is 150 MB, so it is read once and batches
are cut from it with tensor indexing (on the GPU when training there): no loader workers, nothing to
stall a step. The data may come as the python batches or as the image folders people already have:
improved-diffusion's flat cifar_train/airplane_00012.png or torchvision's ImageFolder train/airplane/*.png;
both are decoded once into the same tensor, so the layout never changes training speed. Also the
image-grid writer every script uses, and `python data.py [DIR]`, which checks a data directory the way
you want before a long run.
"""
import os
import pickle
import socket
import sys

import numpy as np
import torch

from config import fail

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
BATCHES = "cifar-10-batches-py"
SPLIT_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
SEARCHED = ["data", os.path.join("..", "shared", "data")]  # relative to the working directory
# image folders: ImageFolder users have train/ and test/, improved-diffusion writes cifar_train/ and cifar_test/
SPLIT_FOLDERS = {"train": ["train", "cifar_train"], "test": ["test", "cifar_test"]}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
LAYOUTS = ("cifar-10-batches-py/, image files named CLASS_*.png (like airplane_00012.png), "
           "or one subfolder of images per class")

# -----------------------------------------------------------------------------
# finding the data and reading the python batches


def batches_dir(path):
    """The cifar-10-batches-py folder at or inside path, or None."""
    for candidate in (path, os.path.join(path, BATCHES)):
        if os.path.isfile(os.path.join(candidate, "data_batch_1")) or os.path.isfile(os.path.join(candidate, "test_batch")):
            return candidate
    return None


CIFAR10_HOST = "www.cs.toronto.edu"  # where torchvision downloads the batches from


def online(host, port=443, timeout=3):
    """Whether host answers: a machine may reach its package index and nothing else."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def data_dir_at_hand(data_dir=""):
    """Where the data is, or None: the given folder, else $CIFAR10_DIR, else ./data or ../shared/data. A given
    folder may hold the python batches or images (see load_image_folder); the searched defaults are for the
    batches only, since ./data could hold anything."""
    chosen = data_dir or os.environ.get("CIFAR10_DIR", "")
    for candidate in [chosen] if chosen else SEARCHED:
        found = batches_dir(candidate)
        if found:
            return found
    return chosen if chosen and holds_images(chosen) else None


def find_data_dir(data_dir=""):
    """data_dir_at_hand's folder; when there is none and the machine is online, torchvision downloads the
    batches into ./data (or the given folder, or $CIFAR10_DIR's)."""
    found = data_dir_at_hand(data_dir)
    if found:
        return found
    target = data_dir or os.environ.get("CIFAR10_DIR", "") or "data"
    where = f"put there {LAYOUTS}; or pass --data.data_dir=DIR (or set CIFAR10_DIR)"
    if not online(CIFAR10_HOST):
        fail(f"no CIFAR-10 data in {target!r} and this machine is offline ({CIFAR10_HOST} does not answer): {where}")
    import shutil
    import tempfile
    import torchvision
    print(f"downloading CIFAR-10 into {target}/ ...")
    # into a folder of its own, then renamed into place whole: another process reading the data (a second
    # node on a shared disk, a run started meanwhile) sees no batches or all of them, never half-extracted ones
    os.makedirs(target, exist_ok=True)
    staging = tempfile.mkdtemp(dir=target, prefix=".download-")
    try:
        torchvision.datasets.CIFAR10(staging, train=True, download=True)
        os.rename(os.path.join(staging, BATCHES), os.path.join(target, BATCHES))
    except (OSError, RuntimeError) as e:  # a dropped connection, an HTTP error, a corrupt archive
        if batches_dir(target) is None:  # else another process's download got there first, which is as good
            first_line = str(e).partition("\n")[0][:200]  # may be empty; never an IndexError
            fail(f"downloading CIFAR-10 into {target!r} failed ({type(e).__name__}: {first_line}): {where}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the 170 MB archive too: the batches are all that is read
    return os.path.join(target, BATCHES)


def read_batch(path):
    """One pickle -> (uint8 images (N, 3, 32, 32), int64 labels (N,)). No md5 check, so re-packs load."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data, labels = batch[b"data"], batch[b"labels"]
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError) as e:
        fail(f"cannot read CIFAR-10 batch {path!r}: {type(e).__name__}: {e}")
    images = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32)  # planes R, G, B, each row-major
    return torch.from_numpy(images.copy()), torch.tensor(labels, dtype=torch.long)


def load_cifar10(data_dir="", split="train", image_size=32):
    """(images uint8 (N, 3, S, S), labels int64 (N,), class names) for split train or test, from the python
    batches or an image folder, whichever data_dir holds. image_size is the size the model expects."""
    if split not in SPLIT_FILES:
        fail(f"split={split!r} is not one of train, test")
    folder = find_data_dir(data_dir)
    if batches_dir(folder) is None:
        return load_image_folder(folder, split, image_size)
    if image_size != 32:
        fail(f"image_size={image_size}, but the CIFAR-10 python batches in {folder!r} are 32x32")
    parts = []
    for name in SPLIT_FILES[split]:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            fail(f"{path!r} is missing: a CIFAR-10 {split} split needs {', '.join(SPLIT_FILES[split])}")
        parts.append(read_batch(path))
    images = torch.cat([p[0] for p in parts])
    labels = torch.cat([p[1] for p in parts])
    return images, labels, class_names(folder)


def class_names(folder):
    meta = os.path.join(folder, "batches.meta")
    if os.path.isfile(meta):
        with open(meta, "rb") as f:
            return [n.decode() for n in pickle.load(f, encoding="bytes")[b"label_names"]]
    return list(CIFAR10_CLASSES)


# -----------------------------------------------------------------------------
# image folders: improved-diffusion's flat cifar_train/airplane_00012.png, torchvision's train/airplane/*.png


def visible(folder):
    return sorted(name for name in os.listdir(folder) if not name.startswith("."))  # no .DS_Store and such


def is_image(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def holds_images(folder):
    """True when folder looks like an image layout: image files, or subfolders (per class or per split)."""
    if not os.path.isdir(folder):
        return False
    return any(is_image(name) or os.path.isdir(os.path.join(folder, name)) for name in visible(folder))


def split_folder(folder, split):
    """The folder holding a split's images: a train/ or test/ subfolder (or cifar_train/, cifar_test/), else
    the folder itself as the train split, as improved-diffusion's --data_dir cifar_train reads it. None when
    the split is absent."""
    for name in SPLIT_FOLDERS[split]:
        if os.path.isdir(os.path.join(folder, name)):
            return os.path.join(folder, name)
    has_splits = any(os.path.isdir(os.path.join(folder, n)) for names in SPLIT_FOLDERS.values() for n in names)
    return folder if split == "train" and not has_splits else None


def image_files(folder):
    """Sorted [(path, class name)] and the layout's name. Image files directly in the folder are named for
    their class up to the first _ (airplane_00012.png, improved-diffusion's rule); otherwise each subfolder
    is one class, searched recursively (torchvision's ImageFolder rule)."""
    names = visible(folder)
    flat = [n for n in names if is_image(n) and os.path.isfile(os.path.join(folder, n))]
    if flat:
        files = []
        for name in flat:
            label, sep, _ = name.partition("_")
            if not sep or not label:
                fail(f"{os.path.join(folder, name)!r} has no class in its file name: expected CLASS_*.png "
                     f"like airplane_00012.png (or put each class in its own subfolder)")
            files.append((os.path.join(folder, name), label))
        return files, "class from the file name"
    classes = [n for n in names if os.path.isdir(os.path.join(folder, n))]
    if not classes:
        fail(f"{folder!r} is empty: expected {LAYOUTS}")
    files = []
    for label in classes:
        found = sorted(os.path.join(root, n) for root, _, ns in os.walk(os.path.join(folder, label))
                       for n in ns if is_image(n) and not n.startswith("."))
        if not found:
            fail(f"class folder {os.path.join(folder, label)!r} is empty: expected images "
                 f"({', '.join(IMAGE_EXTENSIONS)})")
        files += [(path, label) for path in found]
    return files, "one subfolder per class"


def decode_images(files, image_size):
    """Decode every file once into uint8 (N, 3, S, S). Nothing is resized or converted: an image of the
    wrong size or colour mode is a mistake in the data, better caught here than learned."""
    from PIL import Image
    from tqdm import tqdm
    images = np.empty((len(files), image_size, image_size, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(tqdm(files, desc="decoding", unit="image", disable=len(files) < 1000)):
        try:
            with Image.open(path) as image:
                image.load()
                mode, size = image.mode, image.size
                pixels = np.asarray(image)
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three for broken files
            fail(f"cannot read image {path!r}: {type(e).__name__}: {' '.join(str(e).split())}")
        if mode != "RGB":
            fail(f"{path!r} is a {mode} image, expected RGB: convert it first, e.g. with PIL's .convert('RGB')")
        if size != (image_size, image_size):
            fail(f"{path!r} is {size[0]}x{size[1]}, expected {image_size}x{image_size} (model.image_size)")
        images[i] = pixels
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # (N, H, W, 3) -> (N, 3, H, W)


def load_image_folder(folder, split, image_size=32):
    """load_cifar10 for an image folder. Class ids follow the sorted class names, as improved-diffusion and
    ImageFolder both number them; the names are gathered over both splits so train and test agree even when
    one split lacks a class."""
    source = split_folder(folder, split)
    if source is None:
        fail(f"no {split} split in {folder!r}: expected a subfolder {' or '.join(SPLIT_FOLDERS[split])}/")
    files, layout = image_files(source)
    splits = [split_folder(folder, s) for s in SPLIT_FOLDERS]
    names = sorted({label for s in splits if s for _, label in image_files(s)[0]})
    class_id = {name: i for i, name in enumerate(names)}
    print(f"reading {len(files)} images from {source} ({layout}) | classes: "
          + ", ".join(f"{i} {name}" for i, name in enumerate(names)))
    labels = torch.tensor([class_id[label] for _, label in files], dtype=torch.long)
    return decode_images(files, image_size), labels, names


# -----------------------------------------------------------------------------
# a synthetic CIFAR-10 for tests


def write_synthetic_cifar(folder, num_train=50, num_test=20, num_classes=10, seed=0):
    """A tiny CIFAR-format copy (same pickles, same layout) so tests need no real data. Each class gets its
    own colour plus noise, so a model can tell classes apart. Returns the cifar-10-batches-py path."""
    rng = np.random.default_rng(seed)
    out = os.path.join(folder, BATCHES)
    os.makedirs(out, exist_ok=True)
    palette = rng.integers(0, 256, size=(num_classes, 3))

    def make(n):
        labels = np.arange(n) % num_classes
        images = palette[labels][:, :, None, None] + rng.normal(0, 20, size=(n, 3, 32, 32))
        return np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072), labels.tolist()

    per_batch = -(-num_train // 5)
    train_data, train_labels = make(num_train)
    for i in range(5):
        rows = slice(i * per_batch, (i + 1) * per_batch)
        batch = {b"batch_label": f"training batch {i + 1} of 5".encode(), b"labels": train_labels[rows],
                 b"data": train_data[rows], b"filenames": [b"synthetic.png"] * len(train_labels[rows])}
        with open(os.path.join(out, f"data_batch_{i + 1}"), "wb") as f:
            pickle.dump(batch, f, protocol=2)
    test_data, test_labels = make(num_test)
    with open(os.path.join(out, "test_batch"), "wb") as f:
        pickle.dump({b"batch_label": b"testing batch 1 of 1", b"labels": test_labels, b"data": test_data,
                     b"filenames": [b"synthetic.png"] * num_test}, f, protocol=2)
    with open(os.path.join(out, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in CIFAR10_CLASSES[:num_classes]],
                     b"num_cases_per_batch": per_batch, b"num_vis": 3072}, f, protocol=2)
    return out


# -----------------------------------------------------------------------------
# batches for training


def to_model_range(images_uint8):
    return images_uint8.float().div_(127.5).sub_(1.0)  # [0, 255] -> [-1, 1]


def to_uint8(images):
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [-1, 1] -> [0, 255]


def random_batches(images, labels, batch_size, generator, random_flip=True, rank=0, world_size=1):
    """One epoch of (x in [-1, 1], y) batches, shuffled with `generator`, which must live on the images'
    device. Each of world_size processes, given the same generator state, takes its own batch_size images
    (rank's share) of every global batch of batch_size x world_size: the global batches are the same whatever
    the number of processes, and one process's are those of a plain one-process run. The last partial
    global batch is dropped so every step has the same shape (one compiled graph, comparable step times)."""
    device = images.device
    order = torch.randperm(len(images), device=device, generator=generator)
    global_batch = batch_size * world_size
    mine = slice(rank * batch_size, (rank + 1) * batch_size)
    for start in range(0, len(order) - global_batch + 1, global_batch):
        idx = order[start:start + global_batch][mine]
        x = to_model_range(images[idx])
        if random_flip:
            flip = (torch.rand(global_batch, device=device, generator=generator) < 0.5)[mine]
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        yield x, labels[idx]


# -----------------------------------------------------------------------------
# pictures


def save_grid(images, path, nrow, row_labels=None, title=None):
    """Save uint8 images (N, 3, H, W) as a PNG grid of nrow images per row, each row optionally labelled."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torchvision
    grid = torchvision.utils.make_grid(images, nrow=nrow, padding=2, pad_value=255).permute(1, 2, 0).numpy()
    rows = -(-len(images) // nrow)
    fig_w = 1.2 + grid.shape[1] / 40
    fig, ax = plt.subplots(figsize=(fig_w, 0.4 + grid.shape[0] / 40), dpi=100)
    ax.imshow(grid, interpolation="nearest")
    ax.set_xticks([])
    cell = grid.shape[0] / rows
    if row_labels:
        ax.set_yticks([cell * (i + 0.5) for i in range(len(row_labels))], row_labels, fontsize=8)
    else:
        ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    for side in ax.spines.values():
        side.set_visible(False)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def plot_curves(csv_path, png_path, x_key, y_keys, title, log_y=True):
    """Line plot of columns y_keys against x_key from a CSV with a header row; an empty cell (a row written before
    its column existed) is a gap."""
    import csv
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    xs = [float(r[x_key]) for r in rows]
    for key in y_keys:
        ax.plot(xs, [float(r[key]) if r.get(key) else float("nan") for r in rows], label=key,
                marker="." if len(rows) < 30 else None)
    ax.set_xlabel(x_key)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, bbox_inches="tight")
    plt.close(fig)


def class_grid(images, labels, names, per_class=10):
    """The first per_class images of each class, one class per row (for the real and sample grids)."""
    picks = [torch.nonzero(labels == c).flatten()[:per_class] for c in range(len(names))]
    keep = [c for c, p in enumerate(picks) if len(p) == per_class]
    if not keep:  # a small folder of images may have fewer than per_class of every class
        return images[:0], []
    return images[torch.cat([picks[c] for c in keep])], [names[c] for c in keep]


# -----------------------------------------------------------------------------
# python data.py [DIR]: check a data directory before a long run

if __name__ == "__main__":
    folder = find_data_dir(sys.argv[1] if len(sys.argv) > 1 else "")
    batches = batches_dir(folder) is not None
    print(f"CIFAR-10 python batches in {folder}" if batches else f"image folder {folder}")
    for split in ("train", "test"):
        if batches:
            present = all(os.path.isfile(os.path.join(folder, n)) for n in SPLIT_FILES[split])
        else:
            present = split_folder(folder, split) is not None
        if not present:
            print(f"{split}: missing")
            continue
        images, labels, names = load_cifar10(folder, split)
        counts = torch.bincount(labels, minlength=len(names)).tolist()
        x = images.float() / 255
        mean = x.mean(dim=(0, 2, 3)).tolist()
        std = x.std(dim=(0, 2, 3)).tolist()
        print(f"{split}: {len(images)} images, {tuple(images.shape[1:])} uint8")
        print("  per class: " + ", ".join(f"{n} {c}" for n, c in zip(names, counts)))
        print("  mean " + " ".join(f"{v:.4f}" for v in mean) + " | std " + " ".join(f"{v:.4f}" for v in std))
        if split == "train":
            grid, row_names = class_grid(images, labels, names)
            if not row_names:
                print("fewer than 10 images of every class: no outputs/real_grid.png")
                continue
            save_grid(grid, os.path.join("outputs", "real_grid.png"), nrow=10, row_labels=row_names,
                      title="real training images, 10 per class")
            print("wrote outputs/real_grid.png")
