"""
The project's own CIFAR-10 classifier, used by evaluate.py to score generated images without external
weights: how often a sample is recognised as the class it was drawn for, and a Frechet distance in the
classifier's penultimate features. These are the project's own metrics: useful to compare our own
checkpoints, not comparable with any published number.

The recipe follows the CIFAR-10 speed-runs (David Page's ResNet-9, Keller Jordan's airbench): a small
VGG-like net of conv-pool-batchnorm blocks, a max-pooled head with scaled-down logits, SGD with Nesterov
momentum on a triangular one-cycle learning rate, label smoothing, flips and 2-pixel translations, and
flip test-time augmentation. Train it with

    python evaluate.py --train-classifier            # caches model/cifar10_classifier.pth
"""
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from config import fail

CLASSIFIER_PATH = "model/cifar10_classifier.pth"
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # per-channel statistics of the training set
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# widths of the stem and the three blocks and the number of epochs: on two CPU cores narrow enough to train
# in well under an hour to an accuracy that tells samples apart (RESULTS.md); on a GPU the speed-runs' widths
WIDTHS = {"cpu": (24, 48, 96, 192), "cuda": (64, 128, 256, 512)}
EPOCHS = {"cpu": 10, "cuda": 16}
RECIPE = {"batch_size": 256, "lr": 0.2, "momentum": 0.9, "weight_decay": 5e-4, "label_smoothing": 0.2,
          "warmup_fraction": 0.2, "translate": 2}

# -----------------------------------------------------------------------------
# the network


def conv_bn(in_channels, out_channels):
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.GELU()]


class ConvBlock(nn.Module):
    """conv, 2x max-pool, conv: halves the resolution; batchnorm keeps the large learning rate stable."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.layers = nn.Sequential(conv1, nn.MaxPool2d(2), nn.BatchNorm2d(out_channels), nn.GELU(),
                                    *conv_bn(out_channels, out_channels))

    def forward(self, x):
        return self.layers(x)


class CifarNet(nn.Module):
    def __init__(self, widths=WIDTHS["cpu"], num_classes=10):
        super().__init__()
        self.widths = tuple(widths)
        self.register_buffer("mean", torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(CIFAR10_STD).view(1, 3, 1, 1) * 255)
        self.stem = nn.Sequential(*conv_bn(3, widths[0]))
        self.blocks = nn.Sequential(*[ConvBlock(a, b) for a, b in zip(widths[:-1], widths[1:])])  # 32 -> 16 -> 8 -> 4
        self.head = nn.Linear(widths[-1], num_classes, bias=False)

    def features(self, images):
        """Penultimate features (B, widths[-1]) of uint8 or [0, 255] float images (B, 3, 32, 32)."""
        x = (images.float() - self.mean) / self.std
        x = self.blocks(self.stem(x))
        return F.adaptive_max_pool2d(x, 1).flatten(1)

    def forward(self, images):
        # small logits at initialisation (the speed-runs' 1/9 scale) make the first steps at a high
        # learning rate safe
        return self.head(self.features(images)) / 9


# -----------------------------------------------------------------------------
# training


def augment(images, generator):
    """Random horizontal flips and translations by up to RECIPE["translate"] pixels (reflect-padded)."""
    B, device = images.shape[0], images.device
    flip = torch.rand(B, generator=generator, device=device) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(3), images)
    pad = RECIPE["translate"]
    padded = F.pad(images.float(), (pad, pad, pad, pad), mode="reflect")
    dx, dy = torch.randint(0, 2 * pad + 1, (2, B), generator=generator, device=device)
    span = torch.arange(32, device=device)[None, :]
    rows = (span + dy[:, None])[:, None, :, None].expand(B, 3, 32, 32 + 2 * pad)
    shifted = padded.gather(2, rows)  # (B, 3, 32, 32 + 2 pad): each image's own vertical shift
    cols = (span + dx[:, None])[:, None, None, :].expand(B, 3, 32, 32)
    return shifted.gather(3, cols)  # (B, 3, 32, 32)


def lr_at(step, total_steps):
    """Triangular one-cycle: linear up to RECIPE["lr"] over the warm-up fraction, then linearly to zero."""
    warmup = max(1, int(RECIPE["warmup_fraction"] * total_steps))
    if step < warmup:
        return RECIPE["lr"] * (step + 1) / warmup
    return RECIPE["lr"] * max(0.0, (total_steps - step) / max(1, total_steps - warmup))


@torch.no_grad()
def predict_logits(net, images, batch_size=1000):
    """Logits averaged over the image and its mirror image (flip test-time augmentation)."""
    net.eval()
    device = net.head.weight.device
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)
        out.append(((net(x) + net(x.flip(3))) / 2).float().cpu())
    return torch.cat(out) if out else torch.empty(0, len(net.head.weight))


@torch.no_grad()
def extract_features(net, images, batch_size=1000):
    """Penultimate features (N, widths[-1]) as float64 numpy, for Frechet distances."""
    net.eval()
    device = net.head.weight.device
    return torch.cat([net.features(images[s:s + batch_size].to(device)).cpu() for s in range(0, len(images), batch_size)]
                     ).double().numpy()


def train_classifier(train_images, train_labels, test_images, test_labels, epochs=None, seed=0, widths=None,
                     device="cpu", batch_size=RECIPE["batch_size"], progress=True):
    """Train CifarNet on uint8 images (N, 3, 32, 32); returns (net in eval mode, test accuracy,
    seconds). The images move to the device once; batches are cut there."""
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    epochs = EPOCHS[kind] if epochs is None else epochs
    widths = widths or WIDTHS[kind]
    if epochs < 1:
        fail(f"--classifier-epochs={epochs} must be at least 1")
    torch.manual_seed(seed)
    generator = torch.Generator(device).manual_seed(seed)
    train_images, train_labels = train_images.to(device), train_labels.to(device)
    net = CifarNet(widths, 10).to(device, memory_format=torch.channels_last)
    decay = [p for p in net.parameters() if p.dim() > 1]  # no weight decay on batchnorm scales and shifts
    rest = [p for p in net.parameters() if p.dim() <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": RECIPE["weight_decay"]},
                                 {"params": rest, "weight_decay": 0.0}], lr=RECIPE["lr"],
                                momentum=RECIPE["momentum"], nesterov=True)
    batch_size = min(batch_size, len(train_images))
    steps_per_epoch = len(train_images) // batch_size
    total_steps = epochs * steps_per_epoch
    step, started = 0, time.time()
    bar = tqdm(total=total_steps, desc="classifier", unit="step", disable=not progress)
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(train_images), generator=generator, device=device)
        for start in range(0, steps_per_epoch * batch_size, batch_size):
            idx = order[start:start + batch_size]
            x = augment(train_images[idx], generator).contiguous(memory_format=torch.channels_last)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps)
            loss = F.cross_entropy(net(x), train_labels[idx], label_smoothing=RECIPE["label_smoothing"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if not math.isfinite(loss.item()):
                fail(f"classifier loss became {loss.item()} at step {step}; lower RECIPE['lr'] in classifier.py")
            step += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    bar.close()
    seconds = time.time() - started
    accuracy = accuracy_of(net, test_images, test_labels)
    return net.eval(), accuracy, seconds


def accuracy_of(net, images, labels):
    if len(images) == 0:
        return float("nan")
    return (predict_logits(net, images).argmax(1) == labels.cpu()).double().mean().item()


def per_class_accuracy(net, images, labels, num_classes):
    """(overall accuracy, list of accuracies of class 0..num_classes-1; None for a class with no images)."""
    correct = (predict_logits(net, images).argmax(1) == labels.cpu()).double()
    per_class = [correct[labels == c].mean().item() if (labels == c).any() else None for c in range(num_classes)]
    return correct.mean().item(), per_class


# -----------------------------------------------------------------------------
# the cached classifier: weights plus the test set's feature statistics, which the Frechet distance needs


def classifier_state(net, accuracy, seconds, epochs, class_names, test_images):
    features = extract_features(net, test_images)
    return {"model": {k: v.cpu() for k, v in net.state_dict().items()}, "config": {"widths": list(net.widths), "epochs": epochs, **RECIPE},
            "num_classes": net.head.out_features, "class_names": class_names, "test_accuracy": accuracy,
            "train_seconds": seconds, "test_mu": features.mean(0), "test_sigma": np.cov(features, rowvar=False)}


def load_classifier(path):
    """(net in eval mode, cached state) from a file written by evaluate.py --train-classifier."""
    from checkpoint import load_checkpoint
    state = load_checkpoint(path)
    if "test_mu" not in state or "widths" not in state["config"]:
        fail(f"{path!r} is not a classifier written by evaluate.py --train-classifier")
    net = CifarNet(state["config"]["widths"], state["num_classes"])
    net.load_state_dict(state["model"])
    return net.eval(), state
