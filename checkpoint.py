"""
Checkpoints: written atomically (a temporary file in the same folder, flushed to disk, renamed over the old
one, the folder flushed too), so a crash or Ctrl-C mid-write leaves the last good checkpoint intact; what a
killed write left behind is removed by the next save of that checkpoint. Every script that reads one goes
through load_checkpoint / model_from_checkpoint, so a bad file is a one-line error; newest_checkpoint picks
the one to resume from. claim_run_folder keeps two jobs, or a repeated command, from writing one run's
folder: a lock while a job runs, and a refusal to start afresh over a run's checkpoints.

A checkpoint is a dict: model, ema, optimizer, step, epoch, config (the full dict), class_names, rng
(CPU and CUDA generator states) and whatever else the writer adds (scaler, elapsed, ...).
"""
import atexit
import os
import random
import socket
import sys
import tempfile
import time

import numpy as np
import torch

from config import fail, load_config
from model import build_model


def save_checkpoint(state, path):
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(folder, name)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{temporary_prefix(name)}{os.getpid()}-")
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
    if os.name == "posix":  # the rename is only durable once the folder is on disk too (Windows cannot open one)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temporary_prefix(name):
    return f".{name}.tmp-"  # then the writer's pid: .checkpoint.pth.tmp-4242-k3j9x2a1


STARTED = time.time()  # no file this process writes is older


def remove_stale_temporaries(folder, name):
    """Delete what saves of this checkpoint killed mid-write (SIGKILL, a lost node) left behind: the files of
    its temporary naming last written before this process started, whose writer is not running here. A file
    another process is writing now is young or has a live pid, and stays."""
    prefix = temporary_prefix(name)
    for entry in os.listdir(folder):
        pid = entry[len(prefix):].partition("-")[0] if entry.startswith(prefix) else ""
        if not pid.isdigit():
            continue
        path = os.path.join(folder, entry)
        try:
            if os.path.getmtime(path) < STARTED and not running(int(pid)):
                os.unlink(path)
        except OSError:  # gone meanwhile, or not ours to delete: it costs disk space, nothing else
            pass


def running(pid):
    if os.name != "posix":  # os.kill(pid, 0) would terminate it on Windows; the age test alone decides there
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class UnreadableCheckpoint(Exception):
    pass


def read_checkpoint(path, map_location="cpu", mmap=False):
    """The checkpoint's dict, or UnreadableCheckpoint saying why not. mmap=True reads only the small pickle
    (the tensors stay on disk until used): a cheap way to look at the step of a large file."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as e:  # truncated zip, pickle garbage, ...: all mean the same to the user
        if mmap:  # but a file or filesystem that cannot be mapped may still be read the slow way
            return read_checkpoint(path, map_location)
        raise UnreadableCheckpoint(f"cannot be read ({type(e).__name__}): it is corrupt or not a checkpoint")
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UnreadableCheckpoint("is not a checkpoint of this project (no model weights and config)")
    return state


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        fail(f"checkpoint {path!r} does not exist")
    try:
        return read_checkpoint(path, map_location)
    except UnreadableCheckpoint as e:
        fail(f"checkpoint {path!r} {e}")


def newest_checkpoint(paths):
    """(path, step) of the checkpoint among paths with the highest step stored in it (the first of paths on a
    tie), or (None, 0) when none exists. A file of weights alone (no optimiser state: train_ddp's best model)
    cannot continue a run and is not chosen. One that cannot be read is passed over with a warning: a disk that
    filled up or a copy killed halfway must not cost the run its previous checkpoints. When none of them can be
    read, UnreadableCheckpoint: starting afresh would overwrite them, and the fault may pass (a network disk)."""
    found, unreadable = [], []
    for path in paths:
        if not os.path.isfile(path):
            continue
        try:
            state = read_checkpoint(path, mmap=True)
            if state.get("optimizer") is not None:
                found.append((state.get("step", 0), path))
        except UnreadableCheckpoint as e:
            print(f"warning: passing over checkpoint {path!r}: it {e}", file=sys.stderr)
            unreadable.append(path)
    if unreadable and not found:
        raise UnreadableCheckpoint(f"none of {', '.join(map(repr, unreadable))} can be read: move them away to "
                                   f"start afresh")
    step, path = max(found, key=lambda pair: pair[0], default=(0, None))
    return path, step


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


def set_rng_state(state, quiet=False):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        # one state per GPU of the saving machine: restore those this machine has, and say so when it has fewer
        saved, here = len(state["cuda"]), torch.cuda.device_count()
        for device, cuda_state in enumerate(state["cuda"][:here]):
            torch.cuda.set_rng_state(cuda_state, device)
        if saved > here and not quiet:
            print(f"warning: the checkpoint holds the random states of {saved} GPUs and this machine has {here}: "
                  f"the first {here} are restored, the others' noise is not the saved run's", file=sys.stderr)


# -----------------------------------------------------------------------------
# one job per run folder

LOCK_NAME = ".lock"


class RunFolderTaken(Exception):
    """The run folder is another job's, or holds a run that a fresh start would overwrite; the message is the
    one line to print."""


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def claim_run_folder(folder, checkpoints, resuming, overwrite=False, ways_on=""):
    """Take folder for this job, or raise RunFolderTaken with the line to stop on. A fresh run (not resuming) whose folder already holds
    one of the checkpoints stops unless overwrite, naming ways_on (how to continue it or start elsewhere): a
    repeated command must not replace hours of training with its first save. The lock is a file created
    atomically, naming this process and host; a second job on the folder stops naming the holder, and a lock
    whose process is gone from this host (a job killed with kill -9) is taken over with a warning. The lock
    goes when this process exits; under torchrun, rank 0 holds it for the group."""
    os.makedirs(folder, exist_ok=True)
    lock = os.path.join(folder, LOCK_NAME)
    mine = f"{os.getpid()} {socket.gethostname()}"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(lock) as f:
                    pid, _, host = f.read().strip().partition(" ")
            except FileNotFoundError:  # released between our two looks
                continue
            if f"{pid} {host}" == mine:  # this process's own, from a run it made before (main called twice)
                break
            if host == socket.gethostname() and pid.isdigit() and not process_alive(int(pid)):
                print(f"warning: {folder} was locked by process {pid}, which is gone: taking the lock over",
                      file=sys.stderr)
                try:
                    os.unlink(lock)
                except FileNotFoundError:  # another job took it over first; the next look sees which
                    pass
                continue
            raise RunFolderTaken(f"{folder} is in use by process {pid} on {host or 'an unknown host'} (its lock: "
                                 f"{lock}); wait for that job, or give this one another folder")
        with os.fdopen(fd, "w") as f:
            f.write(mine + "\n")
        atexit.register(release_run_folder, lock, mine)
        break
    held = [path for path in checkpoints if os.path.isfile(path)]
    if held and not resuming and not overwrite:
        release_run_folder(lock, mine)
        raise RunFolderTaken(f"{folder} already holds a run ({os.path.basename(held[0])}): {ways_on}")
    return lock


def release_run_folder(lock, owner=None):
    """Remove the lock if it is still this process's."""
    owner = owner or f"{os.getpid()} {socket.gethostname()}"
    try:
        with open(lock) as f:
            if f.read().strip() == owner:
                os.unlink(lock)
    except FileNotFoundError:
        pass
