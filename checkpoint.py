"""
Checkpoints: written atomically (a temporary file in the same folder, flushed to disk, then renamed over
the old one), so a crash or Ctrl-C mid-write leaves the last good checkpoint intact. Every script that
reads one goes through load_checkpoint / model_from_checkpoint, so a bad file is a one-line error.

A checkpoint is a dict: model, ema, optimizer, step, epoch, config (the full dict), class_names, rng
(CPU and CUDA generator states) and whatever else the writer adds (scaler, elapsed, ...).
"""
import os
import random
import tempfile

import numpy as np
import torch

from config import fail, load_config
from model import build_model


def save_checkpoint(state, path):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pth")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; a checkpoint is shared like any output
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half
    except BaseException:
        os.unlink(tmp)
        raise


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        fail(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated zip, pickle garbage, ...: all mean the same to the user
        fail(f"checkpoint {path!r} cannot be read ({type(e).__name__}): it is corrupt or not a checkpoint")
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        fail(f"checkpoint {path!r} is not a checkpoint of this project (no model weights and config)")
    return state


def model_from_checkpoint(path, use_ema=True, map_location="cpu"):
    """(model in eval mode, config, checkpoint state) with the EMA weights unless use_ema is False."""
    state = load_checkpoint(path, map_location)
    cfg = load_config(base=state["config"])  # keys added since the checkpoint was saved take their defaults
    model = build_model(cfg["model"])
    weights = state["ema"] if use_ema and state.get("ema") is not None else state["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        fail(f"checkpoint {path!r} does not match its own config's architecture: {str(e).splitlines()[0]}")
    return model.eval().to(map_location), cfg, state


def rng_state():
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
