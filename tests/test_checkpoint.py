import os
import stat
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
from config import load_config


def write(path, step, **extra):
    """A checkpoint a run can continue from (it has optimiser state), unless extra says otherwise."""
    checkpoint.save_checkpoint({"model": {"w": torch.full((3,), float(step))}, "optimizer": {"state": {}},
                                "config": {}, "step": step, **extra}, str(path))


def test_newest_checkpoint_passes_over_weights_alone_which_cannot_continue_a_run(tmp_path):
    latest, best = tmp_path / "latest.pth", tmp_path / "best.pth"
    write(latest, 4)
    write(best, 6, optimizer=None)  # train_ddp's best model: model and EMA weights only
    assert checkpoint.newest_checkpoint([str(latest), str(best)]) == (str(latest), 4)
    assert checkpoint.newest_checkpoint([str(best)]) == (None, 0)


def test_newest_checkpoint_goes_by_the_step_stored_in_it_not_the_file_time(tmp_path):
    latest, best, epoch = tmp_path / "latest.pth", tmp_path / "best.pth", tmp_path / "checkpoint_epoch_2.pth"
    write(epoch, 8)
    write(best, 5)
    write(latest, 3)  # written last, e.g. by a run resumed from an old checkpoint_epoch file
    os.utime(epoch, (time.time() - 3600, time.time() - 3600))
    assert checkpoint.newest_checkpoint([str(latest), str(best), str(epoch)]) == (str(epoch), 8)
    write(latest, 8)  # a tie goes to the first path given
    assert checkpoint.newest_checkpoint([str(latest), str(best), str(epoch)]) == (str(latest), 8)
    assert checkpoint.newest_checkpoint([str(tmp_path / "missing.pth")]) == (None, 0)


def test_a_corrupt_newest_checkpoint_is_passed_over_with_one_warning(tmp_path, capsys):
    latest, best = tmp_path / "latest.pth", tmp_path / "best.pth"
    write(best, 5)
    write(latest, 9)
    latest.write_bytes(latest.read_bytes()[:-100])  # truncated: a copy killed halfway, a full disk
    assert checkpoint.newest_checkpoint([str(latest), str(best)]) == (str(best), 5)
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("warning:") and str(latest) in warnings[0]


def test_when_no_checkpoint_can_be_read_resuming_is_refused_not_started_afresh(tmp_path, capsys):
    latest = tmp_path / "latest.pth"
    latest.write_bytes(b"not a checkpoint")  # a fresh start would overwrite it at its first save
    with pytest.raises(checkpoint.UnreadableCheckpoint, match="move them away"):
        checkpoint.newest_checkpoint([str(latest), str(tmp_path / "missing.pth")])


def test_a_checkpoint_that_cannot_be_memory_mapped_is_read_the_slow_way(tmp_path):
    old_format = tmp_path / "old.pth"  # torch.save's format before zip files, which torch.load cannot mmap
    torch.save({"model": {}, "optimizer": {}, "config": {}, "step": 4}, old_format, _use_new_zipfile_serialization=False)
    assert checkpoint.newest_checkpoint([str(old_format)]) == (str(old_format), 4)


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_save_removes_what_a_killed_save_of_the_same_checkpoint_left_and_nothing_else(tmp_path):
    path = tmp_path / "ckpt.pth"
    prefix = checkpoint.temporary_prefix("ckpt.pth")
    dead, alive = dead_pid(), os.getpid()
    files = {"stale": f"{prefix}{dead}-a1b2c3d4", "writer alive": f"{prefix}{alive}-e5f6g7h8",
             "written since this process started": f"{prefix}{dead}-i9j0k1l2",
             "another checkpoint's": f"{checkpoint.temporary_prefix('other.pth')}{dead}-m3n4o5p6",
             "not a temporary": "ckpt.pth.notes"}
    an_hour_ago = checkpoint.STARTED - 3600
    for reason, name in files.items():
        (tmp_path / name).write_bytes(b"partial")
        if reason != "written since this process started":
            os.utime(tmp_path / name, (an_hour_ago, an_hour_ago))
    write(path, 1)
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt.pth"] + [n for r, n in files.items() if r != "stale"])


@pytest.mark.skipif(os.name != "posix", reason="a folder is fsynced on POSIX only")
def test_save_flushes_the_folder_after_the_rename(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode)
                                                             else "fsync file") or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("rename") or replace(a, b))
    write(tmp_path / "ckpt.pth", 1)
    assert events == ["fsync file", "rename", "fsync folder"]


def test_random_states_of_more_gpus_than_this_machine_has_restore_what_fits(monkeypatch, capsys):
    restored = []

    def set_cuda_state(state, device):  # as torch.cuda's: an index past the last GPU is an IndexError
        if device >= 1:
            raise IndexError("tuple index out of range")
        restored.append((state, device))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_cuda_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_cuda_state)  # what set_rng_state_all calls
    state = checkpoint.rng_state() | {"cuda": ["state of GPU 0", "state of GPU 1"]}  # saved on two GPUs
    torch.rand(3)
    checkpoint.set_rng_state(state)
    assert restored == [("state of GPU 0", 0)]
    assert torch.equal(torch.get_rng_state(), state["torch"])  # the CPU generator is restored as ever
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and "2 GPUs" in warnings[0] and "has 1" in warnings[0]
    checkpoint.set_rng_state(state, quiet=True)  # the ranks but the first stay quiet
    assert capsys.readouterr().err == ""


def test_a_checkpoint_of_an_older_config_loads_with_todays_defaults_and_the_keys_old_meaning(tmp_path):
    from model import build_model
    cfg = load_config(["--model.hidden_dim=32", "--model.depth=1", "--model.num_heads=2", "--model.num_kv_heads=1"])
    model = build_model(cfg["model"])
    old = {section: dict(values) for section, values in cfg.items()}
    del old["training"]["log_interval"]  # keys config.yaml gained after the checkpoint was saved
    del old["diffusion"]["prediction"]
    del old["evaluation"]
    path = tmp_path / "old.pth"
    checkpoint.save_checkpoint({"model": model.state_dict(), "ema": None, "config": old, "step": 3}, str(path))
    _, loaded, _ = checkpoint.model_from_checkpoint(str(path))
    assert loaded["training"]["log_interval"] == load_config()["training"]["log_interval"]
    assert loaded["evaluation"] == load_config()["evaluation"]
    assert loaded["diffusion"]["prediction"] == "eps"  # what a model saved before the key existed was trained on
