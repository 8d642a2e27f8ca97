import os
import pickle
import runpy
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from data import CIFAR10_CLASSES, batches_dir, data_dir_at_hand, load_cifar10, random_batches, write_synthetic_cifar


def one_line_error(capsys, call, *args, **kwargs):
    with pytest.raises(SystemExit) as exit_info:
        call(*args, **kwargs)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def read_pickles(folder, names):
    """The plain reference: the pickles' own bytes, reshaped as CIFAR-10 documents them."""
    data, labels = [], []
    for name in names:
        with open(os.path.join(folder, name), "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels += list(batch[b"labels"])
    return torch.from_numpy(np.concatenate(data)), torch.tensor(labels)


def save_png(image, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)  # (3, H, W) -> (H, W, 3)


def write_flat(folder, images, labels, names):
    """improved-diffusion's datasets/cifar10.py layout: CLASS_INDEX.png in one folder."""
    for i, (image, label) in enumerate(zip(images, labels.tolist())):
        save_png(image, os.path.join(folder, f"{names[label]}_{i:05d}.png"))


def write_class_folders(folder, images, labels, names):
    """torchvision's ImageFolder layout: one subfolder per class."""
    for i, (image, label) in enumerate(zip(images, labels.tolist())):
        save_png(image, os.path.join(folder, names[label], f"{i:05d}.png"))


def in_file_order(images, labels, names):
    """Both layouts list files by class name, then by index: the batches reordered the same way."""
    order = sorted(range(len(labels)), key=lambda i: (names[labels[i]], i))
    return images[order], labels[order]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    import data
    monkeypatch.setattr(data, "online", lambda host: False)
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # ./data and ../shared/data are searched relative to here


# -----------------------------------------------------------------------------
# the python batches


def test_batches_read_back_to_the_pickled_pixels_and_labels(synthetic_data):
    for split, files in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        images, labels, names = load_cifar10(synthetic_data, split)
        ref_images, ref_labels = read_pickles(synthetic_data, files)
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert torch.equal(images, ref_images) and torch.equal(labels, ref_labels)
        assert names == CIFAR10_CLASSES


def test_batches_have_the_written_train_and_test_counts(tmp_path):
    folder = write_synthetic_cifar(str(tmp_path), num_train=33, num_test=7, num_classes=4)
    train, train_labels, names = load_cifar10(str(tmp_path), "train")  # the parent folder is found too
    test, test_labels, _ = load_cifar10(folder, "test")
    assert train.shape == (33, 3, 32, 32) and test.shape == (7, 3, 32, 32)
    assert names == CIFAR10_CLASSES[:4]
    assert torch.bincount(train_labels).tolist() == [9, 8, 8, 8]


@pytest.mark.parametrize("world_size, batch_size", [(2, 4), (3, 3), (4, 1), (5, 2)])
def test_the_ranks_batches_make_up_the_one_process_batches(synthetic_data, world_size, batch_size):
    """Given one generator state, ranks 0..world_size-1 each take their share of every global batch: side by
    side they are the batches of one process at world_size times the batch, flips included, and no image
    appears twice in an epoch. The last partial global batch is dropped on every rank alike."""
    images, labels, _ = load_cifar10(synthetic_data)  # 40 images: odd sizes leave a partial global batch
    one = list(random_batches(images, labels, batch_size * world_size, torch.Generator().manual_seed(3)))
    ranks = [list(random_batches(images, labels, batch_size, torch.Generator().manual_seed(3), True, rank, world_size))
             for rank in range(world_size)]
    assert len(one) == len(images) // (batch_size * world_size) and all(len(r) == len(one) for r in ranks)
    for step, (x, y) in enumerate(one):
        assert torch.equal(torch.cat([r[step][0] for r in ranks]), x)
        assert torch.equal(torch.cat([r[step][1] for r in ranks]), y)
    seen = torch.cat([x for r in ranks for x, _ in r]).flatten(1)
    assert len(torch.unique(seen, dim=0)) == len(seen)  # the synthetic images are all different


def test_random_flip_mirrors_horizontally_and_keeps_labels(synthetic_data):
    images, labels, _ = load_cifar10(synthetic_data)
    plain = list(random_batches(images, labels, 8, torch.Generator().manual_seed(1), random_flip=False))
    flipped = list(random_batches(images, labels, 8, torch.Generator().manual_seed(1), random_flip=True))
    # the shuffle is drawn before any flip, so the first batch holds the same images in both
    (x, y), (x_flip, y_flip) = plain[0], flipped[0]
    assert torch.equal(y, y_flip)
    same = (x_flip == x).flatten(1).all(1)
    mirrored = (x_flip == x.flip(3)).flatten(1).all(1)
    assert (same | mirrored).all() and (~same).any() and (~mirrored).any()
    assert x.min() >= -1 and x.max() <= 1
    for x, y in plain:  # every batch image is one of the data set's images with its own label
        for image, label in zip(x, y):
            match = (images.float() / 127.5 - 1 == image).flatten(1).all(1)
            assert labels[match.nonzero()[0, 0]] == label


def test_missing_data_offline_is_a_one_line_error(offline, capsys):
    message = one_line_error(capsys, load_cifar10, "")
    assert "'data'" in message and "offline" in message
    message = one_line_error(capsys, load_cifar10, "no/such/folder")
    assert "no/such/folder" in message and "offline" in message


def test_a_failed_download_is_a_one_line_error(offline, monkeypatch, capsys):
    """Online by the probe, but the download fails (a firewall that lets only the package index through)."""
    import urllib.error

    import data
    import torchvision

    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(data, "online", lambda host: host == data.CIFAR10_HOST)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", unreachable)
    message = one_line_error(capsys, load_cifar10, "")
    assert "'data'" in message and "URLError" in message and "--data.data_dir" in message


# -----------------------------------------------------------------------------
# image folders


@pytest.mark.parametrize("layout", ["flat", "flat with splits", "class folders", "class folders with splits"])
def test_image_folders_read_back_to_the_batches_they_came_from(synthetic_data, tmp_path, layout):
    write = write_flat if layout.startswith("flat") else write_class_folders
    prefix = "cifar_" if layout.startswith("flat") else ""  # improved-diffusion's or ImageFolder's split names
    splits = {split: prefix + split for split in ("train", "test")}
    root = str(tmp_path / "images")
    for split in ("train", "test") if "splits" in layout else ("train",):
        images, labels, names = load_cifar10(synthetic_data, split)
        write(os.path.join(root, splits[split]) if "splits" in layout else root, images, labels, names)
    for split in ("train", "test") if "splits" in layout else ("train",):
        images, labels, names = load_cifar10(synthetic_data, split)
        read, read_labels, read_names = load_cifar10(root, split)
        expected, expected_labels = in_file_order(images, labels, names)
        assert read.dtype == torch.uint8 and read_labels.dtype == torch.int64
        assert torch.equal(read, expected) and torch.equal(read_labels, expected_labels)
        assert read_names == names


def test_class_ids_follow_sorted_class_names(tmp_path, capsys):
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    write_flat(str(tmp_path / "train"), images, labels, ["zebra", "ant", "moth"])
    write_class_folders(str(tmp_path / "test"), images[:2], labels[:2], ["zebra", "ant", "moth"])
    read, read_labels, names = load_cifar10(str(tmp_path), "train")
    assert names == ["ant", "moth", "zebra"]
    assert "classes: 0 ant, 1 moth, 2 zebra" in capsys.readouterr().out
    expected = {0: 2, 1: 0, 2: 1}  # zebra -> 2, ant -> 0, moth -> 1
    for image, label in zip(read, read_labels):
        source = (images == image).flatten(1).all(1).nonzero()[0, 0]
        assert label == expected[labels[source].item()]
    # the test split lacks moth, yet numbers its classes the way the train split does
    _, test_labels, test_names = load_cifar10(str(tmp_path), "test")
    assert test_names == names and sorted(test_labels.tolist()) == [0, 2]


def test_data_py_reports_every_layout_the_same_way(synthetic_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    roots = {"batches": synthetic_data, "flat": str(tmp_path / "flat"), "class folders": str(tmp_path / "classes")}
    for split in ("train", "test"):
        images, labels, names = load_cifar10(synthetic_data, split)
        write_flat(os.path.join(roots["flat"], f"cifar_{split}"), images, labels, names)
        write_class_folders(os.path.join(roots["class folders"], split), images, labels, names)
    reports = {}
    for layout, root in roots.items():
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["data.py", root])
        runpy.run_path(os.path.join(ROOT, "data.py"), run_name="__main__")
        lines = capsys.readouterr().out.splitlines()
        reports[layout] = [l for l in lines if l.startswith(("train:", "test:", "  per class", "  mean"))]
    assert len(reports["batches"]) == 6 and "train: 40 images" in reports["batches"][0]
    assert reports["flat"] == reports["batches"] and reports["class folders"] == reports["batches"]


def test_a_flat_folder_is_the_train_split_only(tmp_path, capsys):
    write_flat(str(tmp_path / "cifar_train"), torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.tensor([0, 1]),
               ["cat", "dog"])
    images, labels, names = load_cifar10(str(tmp_path / "cifar_train"), "train")
    assert len(images) == 2 and names == ["cat", "dog"]
    message = one_line_error(capsys, load_cifar10, str(tmp_path / "cifar_train"), "test")
    assert "no test split" in message and "cifar_train" in message


# -----------------------------------------------------------------------------
# image folder errors, each one line naming the file or folder


def write_one(path, size=(32, 32), mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size).save(path)


@pytest.mark.parametrize("size", [(16, 16), (32, 40)])
def test_an_image_of_another_size_is_named(tmp_path, capsys, size):
    write_one(str(tmp_path / "cat_00000.png"))
    write_one(str(tmp_path / "dog_00001.png"), size=size)
    message = one_line_error(capsys, load_cifar10, str(tmp_path))
    assert "dog_00001.png" in message and f"{size[0]}x{size[1]}" in message and "32x32" in message


def test_the_expected_size_follows_image_size(tmp_path, capsys):
    write_one(str(tmp_path / "cat" / "a.png"), size=(64, 64))
    images, _, _ = load_cifar10(str(tmp_path), image_size=64)
    assert images.shape == (1, 3, 64, 64)
    assert "expected 32x32" in one_line_error(capsys, load_cifar10, str(tmp_path))


def test_batches_refuse_another_image_size(synthetic_data, capsys):
    assert "image_size=64" in one_line_error(capsys, load_cifar10, synthetic_data, image_size=64)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_a_non_rgb_image_is_named(tmp_path, capsys, mode):
    write_one(str(tmp_path / "train" / "cat" / "a.png"), mode=mode)
    message = one_line_error(capsys, load_cifar10, str(tmp_path))
    assert os.path.join("cat", "a.png") in message and f"a {mode} image" in message and "RGB" in message


def test_an_empty_split_folder_is_named(tmp_path, capsys):
    os.makedirs(tmp_path / "train")
    message = one_line_error(capsys, load_cifar10, str(tmp_path))
    assert os.path.join(str(tmp_path), "train") in message and "is empty" in message


def test_an_empty_class_folder_is_named(tmp_path, capsys):
    write_one(str(tmp_path / "cat" / "a.png"))
    os.makedirs(tmp_path / "dog")
    message = one_line_error(capsys, load_cifar10, str(tmp_path))
    assert os.path.join(str(tmp_path), "dog") in message and "is empty" in message


def test_an_empty_data_folder_offline_is_named(offline, tmp_path, capsys):
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    message = one_line_error(capsys, load_cifar10, str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in message and "offline" in message


@pytest.mark.parametrize("name", ["00012.png", "_00012.png"])
def test_a_file_name_without_a_class_is_named(tmp_path, capsys, name):
    write_one(str(tmp_path / "cat_00000.png"))
    write_one(str(tmp_path / name))
    message = one_line_error(capsys, load_cifar10, str(tmp_path))
    assert name in message and "no class" in message


@pytest.mark.parametrize("content", [b"not a png at all", "truncated"])
def test_an_unreadable_image_is_named(tmp_path, capsys, content):
    write_one(str(tmp_path / "cat_00000.png"))
    if content == "truncated":
        content = (tmp_path / "cat_00000.png").read_bytes()[:-30]
    (tmp_path / "dog_00001.png").write_bytes(content)
    message = one_line_error(capsys, load_cifar10, str(tmp_path))
    assert "dog_00001.png" in message and "cannot read image" in message


def test_the_data_folder_at_hand_is_found_without_downloading(tmp_path, synthetic_data, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so ./data and ../shared/data are this test's own
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    assert data_dir_at_hand(str(empty)) is None  # a given folder without data: nothing, and no download
    assert data_dir_at_hand(synthetic_data) == batches_dir(synthetic_data)
    assert os.path.abspath(data_dir_at_hand("")) == batches_dir(synthetic_data)  # ./data, where the fixture wrote it
    monkeypatch.setenv("CIFAR10_DIR", str(empty))
    assert data_dir_at_hand("") is None  # $CIFAR10_DIR is the one place looked at when set


def test_loss_plot_takes_rows_written_before_a_column_existed(tmp_path):
    from data import plot_curves
    log = tmp_path / "training_log.csv"
    log.write_text("step,loss,q0\n10,0.5,\n20,0.4,0.3\n")  # the first row from a log without q0
    plot_curves(str(log), str(tmp_path / "loss.png"), "step", ["loss", "q0"], "title")
    assert (tmp_path / "loss.png").stat().st_size > 0
