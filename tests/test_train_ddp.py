import copy
import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
from config import load_config
from conftest import assert_same_checkpoint_weights
from diffusion import Diffusion
from model import build_model
from train_ddp import make_optimizer, train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model.hidden_dim=32", "--model.depth=1", "--model.num_heads=2", "--model.num_kv_heads=1",
        "--sampling.steps=2", "--training.batch_size=4", "--training.warmup_steps=3", "--training.log_interval=1",
        "--training.precision=fp32",  # auto decides by timing matmuls, which could differ between runs compared here
        "--training.compile=false"]  # config.yaml's default is for GPUs; the test that compiles says so


def options(tmp_path, data, *extra):
    return TINY + [f"--data.data_dir={data}", f"--training.checkpoint_dir={tmp_path / 'model'}",
                   f"--training.output_dir={tmp_path / 'outputs'}", *extra]


# one thread per process: the tiny model gains nothing from more, and the runs stay quick on a busy machine
ENV = dict(os.environ, OMP_NUM_THREADS="1")
PYTHON = (sys.executable,)
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


def train(*args, launcher=PYTHON, script=os.path.join(ROOT, "train_ddp.py"), check=True, timeout=600):
    result = subprocess.run([*launcher, script, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                            env=ENV)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def patched(tmp_path, prelude):
    """A script that runs prelude (Python, with os imported) in each process, then train_ddp.py: how a test
    changes what one rank sees, or replaces the download."""
    script = tmp_path / "patched_train_ddp.py"
    train_ddp = os.path.join(ROOT, "train_ddp.py")
    script.write_text(f"import os, runpy, sys\nsys.path.insert(0, {ROOT!r})\n{prelude}\n"
                      f"runpy.run_path({train_ddp!r}, run_name='__main__')\n")
    return str(script)


def read_log(out_dir):
    with open(out_dir / "training_log.csv", newline="") as f:
        return {int(row["step"]): row for row in csv.DictReader(f)}


@pytest.mark.slow
def test_two_process_run_keeps_ranks_identical_and_writes_one_set_of_files(tmp_path, synthetic_data):
    result = train(*options(tmp_path, synthetic_data, "--training.num_epochs=2", "--training.checkpoint_epochs=[2]",
                            "--training.save_interval=5"),
                   launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    assert "ranks in sync: yes" in result.stdout + result.stderr
    assert "2 process(es)" in result.stdout + result.stderr
    assert sorted(os.listdir(tmp_path / "model")) == ["best_model.pth", "checkpoint.pth",
                                                      "checkpoint_epoch_2.pth"]
    assert sorted(os.listdir(tmp_path / "outputs")) == ["sample_grid.png", "timestep_grid_10x10.png",
                                                        "training_log.csv", "training_loss.png"]
    with open(tmp_path / "outputs" / "training_log.csv") as f:
        assert len(f.read().strip().splitlines()) == 1 + 2  # header and one row per save, not one per rank
    state = torch.load(tmp_path / "model" / "checkpoint.pth", weights_only=False)
    # 40 images, 2 ranks of 20, 5 steps of 4 per epoch
    assert state["epoch"] == 2 and state["step"] == 10 and len(state["rng_per_rank"]) == 2


@pytest.mark.slow
def test_ranks_leave_without_the_interpreters_shutdown_after_running_the_exit_handlers(tmp_path, synthetic_data):
    # gloo's threads outlive destroy_process_group (DDP holds the group) and can abort a finished run while the
    # interpreter shuts down; the abort is rare, so the test checks that the shutdown is skipped: an object
    # that only the shutdown destroys leaves no mark, while an exit handler does
    marks = tmp_path / "marks"
    marks.mkdir()
    prelude = (f"import atexit\nmarks = {str(marks)!r}\n"
               "class OnlyTheShutdownDestroysThis:\n"
               "    def __del__(self, open=open, path=os.path.join(marks, 'shutdown.' + os.environ['RANK'])):\n"
               "        open(path, 'w').close()\n"
               "kept = OnlyTheShutdownDestroysThis()\n"
               "atexit.register(lambda: open(os.path.join(marks, 'atexit.' + os.environ['RANK']), 'w').close())")
    result = train(*options(tmp_path, synthetic_data, "--training.max_steps=2"), launcher=TORCHRUN,
                   script=patched(tmp_path, prelude))
    assert "done: step 2" in result.stdout
    assert sorted(os.listdir(marks)) == ["atexit.0", "atexit.1"]
    assert not (tmp_path / "model" / ".lock").exists() and not (tmp_path / "outputs" / ".lock").exists()


@pytest.mark.slow
def test_one_process_trains_the_same_weights_as_train_cpu(tmp_path, synthetic_data):
    """The same configuration in both scripts: the same batches, flips, timesteps and noise, so the same
    weights bit for bit (one thread each, fp32, eager)."""
    settings = TINY + [f"--data.data_dir={synthetic_data}", "--training.max_steps=7", "--diffusion.prediction=v",
                       "--diffusion.loss_weighting=min_snr", "--diffusion.timestep_sampling=lognormal",
                       "--training.grad_clip=1.0"]  # named: train_cpu.py's own default is improved-diffusion's uniform
    train(*settings, f"--training.checkpoint_dir={tmp_path / 'model'}", f"--training.output_dir={tmp_path / 'outputs'}")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train_cpu.py"), "--model", "dit", "--threads", "1",
                             "--grid_per_class", "0", "--run", "cpu", "--output_dir", str(tmp_path), *settings],
                            capture_output=True, text=True, cwd=ROOT, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = torch.load(tmp_path / "model" / "checkpoint.pth", weights_only=False)
    cpu = torch.load(tmp_path / "cpu" / "checkpoint.pth", weights_only=False)
    assert ddp["step"] == cpu["step"] == 7
    for section in ("model", "diffusion"):
        assert ddp["config"][section] == cpu["config"][section], section
    assert_same_checkpoint_weights(ddp, cpu)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [PYTHON, TORCHRUN], ids=["one process", "two processes"])
def test_resume_continues_exactly(tmp_path, synthetic_data, launcher):
    straight, split = tmp_path / "straight", tmp_path / "split"
    every_epoch = "--training.checkpoint_epochs=[1]"
    per_epoch = 10 if launcher == PYTHON else 5  # 40 images in batches of 4, on one rank or shared by two
    stop, end = per_epoch - 3, per_epoch + 4  # stopped mid-epoch, resumed into the next one
    straight_run = train(*options(straight, synthetic_data, f"--training.max_steps={end}", every_epoch),
                         launcher=launcher)
    train(*options(split, synthetic_data, f"--training.max_steps={stop}", every_epoch), launcher=launcher)
    resumed = train(*options(split, synthetic_data, f"--training.max_steps={end}", every_epoch), "--resume", "auto",
                    launcher=launcher)
    assert f"resumed from {split / 'model' / 'checkpoint.pth'} at step {stop}" in resumed.stdout
    a = torch.load(straight / "model" / "checkpoint.pth", weights_only=False)
    b = torch.load(split / "model" / "checkpoint.pth", weights_only=False)
    assert a["step"] == b["step"] == end
    assert_same_checkpoint_weights(a, b)
    # a row at each save, the stop's among them; the first epoch's loss covers all its steps although two runs
    # trained it
    straight_log, split_log = read_log(straight / "outputs"), read_log(split / "outputs")
    assert sorted(straight_log) == [end] and sorted(split_log) == [stop, end]
    epoch_line = [line for line in straight_run.stdout.splitlines() if line.startswith("epoch 1 | loss ")]
    assert len(epoch_line) == 1 and epoch_line[0] in resumed.stdout
    assert a["best_loss"] == b["best_loss"] and f"loss {a['best_loss']:.4f} " in epoch_line[0]
    # the epoch the resumed run completed still gets its checkpoint_epoch_1.pth and best_model.pth
    for name in ("checkpoint_epoch_1.pth", "best_model.pth"):
        first, second = (torch.load(run / "model" / name, weights_only=False) for run in (straight, split))
        assert first["step"] == second["step"] == per_epoch
        assert all(torch.equal(value, second["model"][key]) for key, value in first["model"].items())


def test_resume_auto_takes_the_readable_checkpoint_with_the_most_steps_even_of_an_older_config(tmp_path,
                                                                                              synthetic_data):
    # 10 steps per epoch: best_model.pth (weights alone) and checkpoint_epoch_1.pth at step 10, the latest at 12
    train(*options(tmp_path, synthetic_data, "--training.max_steps=12", "--training.checkpoint_epochs=[1]"))
    model = tmp_path / "model"
    latest, best, epoch_1 = model / "checkpoint.pth", model / "best_model.pth", model / "checkpoint_epoch_1.pth"
    latest.write_bytes(latest.read_bytes()[:-1000])  # the newest is cut short: a disk that filled up
    state = torch.load(epoch_1, weights_only=False)
    del state["config"]["training"]["log_interval"]  # and the one to resume lacks keys config.yaml gained since
    del state["config"]["diffusion"]["prediction"]
    torch.save(state, epoch_1)
    best_state = torch.load(best, weights_only=False)
    assert best_state["optimizer"] is None and best_state["step"] == 10  # the best model keeps weights alone
    torch.save(dict(best_state, step=11), best)  # so even at more steps it is not one a run can continue from
    result = train(*options(tmp_path, synthetic_data, "--training.max_steps=13"), "--resume", "auto")
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(latest) in warnings[0]
    assert f"resumed from {epoch_1} at step 10" in result.stdout
    resumed = torch.load(latest, weights_only=False)
    assert resumed["step"] == 13
    assert resumed["config"]["diffusion"]["prediction"] == "eps"  # the meaning the key had before it existed


@pytest.mark.slow
def test_a_run_saved_under_the_old_latest_name_resumes_and_keeps_its_log(tmp_path, synthetic_data):
    """Runs from before the one training loop: train_ddp.py's latest was model/cifar10_dit_ckpt.pth, and
    train_cpu.py's log was metrics.csv beside its checkpoint. --resume auto finds the first; a resumed run with
    no training_log.csv starts it from the second's rows up to the checkpoint."""
    train(*options(tmp_path, synthetic_data, "--training.max_steps=6", "--training.save_interval=3"))
    model, outputs = tmp_path / "model", tmp_path / "outputs"
    (model / "checkpoint.pth").rename(model / "cifar10_dit_ckpt.pth")
    (model / "best_model.pth").unlink(missing_ok=True)  # none yet: no epoch has ended
    (outputs / "training_log.csv").rename(outputs / "metrics.csv")
    result = train(*options(tmp_path, synthetic_data, "--training.max_steps=9", "--training.save_interval=3"),
                   "--resume", "auto")
    assert f"resumed from {model / 'cifar10_dit_ckpt.pth'} at step 6" in result.stdout
    assert torch.load(model / "checkpoint.pth", weights_only=False)["step"] == 9
    assert sorted(read_log(outputs)) == [3, 6, 9]


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    checkpoint.save_checkpoint({"model": {"w": torch.ones(3)}, "config": {}}, str(path))
    good = path.read_bytes()

    def dies_halfway(obj, f):
        f.write(b"partial bytes of a checkpoint")
        raise KeyboardInterrupt  # Ctrl-C, or the process being killed, in the middle of the write

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint({"model": {"w": torch.zeros(3)}, "config": {}}, str(path))
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["ckpt.pth"]  # no temporary file left behind


@pytest.mark.slow
@pytest.mark.parametrize("launcher, signals", [(PYTHON, 1), (TORCHRUN, 1), (PYTHON, 2), (TORCHRUN, 2)],
                         ids=["one process", "torchrun, two processes", "one process, SIGTERM twice",
                              "torchrun, every worker signalled twice"])
def test_sigterm_saves_a_loadable_checkpoint_and_resume_auto_continues(tmp_path, synthetic_data, launcher, signals):
    args = options(tmp_path, synthetic_data, "--training.save_interval=1", "--training.num_epochs=1000")
    latest = tmp_path / "model" / "checkpoint.pth"
    process = subprocess.Popen([*launcher, os.path.join(ROOT, "train_ddp.py"), *args], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 300
    while not latest.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.5)
    assert latest.exists(), "no checkpoint after the first epoch"
    first = torch.load(latest, weights_only=False)["step"]
    time.sleep(1.0)
    if signals == 1:
        process.send_signal(signal.SIGTERM)  # torchrun passes it on to its workers
    else:  # as SLURM does: every process, and again at once, while the first one's save may be under way
        targets = [process.pid] if launcher == PYTHON else worker_pids(process.pid, 0) + worker_pids(process.pid, 1)
        for pid in targets:
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.3)  # the same signal sent twice at once arrives once: the second comes once the first is seen
        for pid in targets:
            os.kill(pid, signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    if launcher == PYTHON or signals == 2:  # torchrun signalled itself exits with an error, whatever its workers did
        assert process.returncode == 0, stderr[-2000:]
        assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    stopped = torch.load(latest, weights_only=False)
    assert f"done: step {stopped['step']}" in stdout  # rank 0 saved where it stopped, then finished in its time
    assert stopped["step"] >= first
    train(*options(tmp_path, synthetic_data, f"--training.max_steps={stopped['step'] + 3}"), "--resume", "auto")
    assert torch.load(latest, weights_only=False)["step"] == stopped["step"] + 3


def worker_pids(agent_pid, rank):
    """PIDs of torchrun's worker processes with the given RANK (read from each child's environment)."""
    children = subprocess.run(["pgrep", "-P", str(agent_pid)], capture_output=True, text=True).stdout.split()
    found = []
    for pid in children:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:  # exited meanwhile
            continue
        if f"RANK={rank}".encode() in environ:
            found.append(int(pid))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the workers through /proc")
# torchrun's shared store (the default), and a store per attempt (what the README says for several nodes)
@pytest.mark.parametrize("disable_shared_store", ["0", "1"])
def test_torchrun_max_restarts_survives_a_killed_worker(tmp_path, synthetic_data, disable_shared_store):
    # 40 images, 2 ranks, batch 4: 5 steps an epoch, a checkpoint every epoch
    max_steps = 1500
    args = options(tmp_path, synthetic_data, "--training.save_interval=1", "--training.num_epochs=100000",
                   f"--training.max_steps={max_steps}")
    latest = tmp_path / "model" / "checkpoint.pth"
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "--max-restarts=1", os.path.join(ROOT, "train_ddp.py"), *args, "--resume", "auto"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(ENV, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=disable_shared_store))
    deadline = time.time() + 300
    while not latest.exists() and time.time() < deadline and agent.poll() is None:
        time.sleep(0.2)
    assert latest.exists(), "no checkpoint after the first epoch"
    killed = worker_pids(agent.pid, rank=1)
    assert len(killed) == 1, killed
    os.kill(killed[0], signal.SIGKILL)  # no handler runs: the worker is simply gone, as on a lost machine
    before_kill = torch.load(latest, weights_only=False)["step"]
    assert before_kill < max_steps, "the run finished before a worker could be killed"
    stdout, stderr = agent.communicate(timeout=600)
    assert agent.returncode == 0, stderr[-3000:]
    output = stdout + stderr
    # the restarted group resumed from a checkpoint, not from step 0, and ran to the end
    starts = [int(line.rsplit("step ", 1)[1].split(" ->")[0]) for line in output.splitlines()
              if "process(es) on" in line]
    assert len(starts) == 2 and starts[0] == 0 and starts[1] > 0, starts
    final = torch.load(latest, weights_only=False)
    assert final["step"] == max_steps
    assert len(final["rng_per_rank"]) == 2


def node_disks(tmp_path):
    """Two folders that stand for the disks of two nodes, and a prelude that runs each rank in its own: the
    checkpoint folder given as a relative path is then a different one on each rank."""
    disks = [tmp_path / "node0", tmp_path / "node1"]
    for disk in disks:
        disk.mkdir()
    return disks, f"os.chdir([{str(disks[0])!r}, {str(disks[1])!r}][int(os.environ['RANK'])])"


ON_EACH_DISK = ["--training.checkpoint_dir=model", "--training.output_dir=outputs"]


@pytest.mark.slow
def test_resume_auto_on_disks_of_their_own_resumes_every_rank_from_rank_0s_choice(tmp_path, synthetic_data):
    (node0, node1), prelude = node_disks(tmp_path)
    train(*options(node0, synthetic_data, "--training.max_steps=4"))
    (node1 / "model").mkdir()
    state = torch.load(node0 / "model" / "checkpoint.pth", weights_only=False)
    torch.save(state, node1 / "model" / "checkpoint.pth")  # the copy rank 0 will choose
    torch.save(dict(state, step=9), node1 / "model" / "best_model.pth")  # newer, but on rank 1's disk alone
    result = train(*options(tmp_path, synthetic_data, "--training.max_steps=6"), *ON_EACH_DISK, "--resume", "auto",
                   launcher=TORCHRUN, script=patched(tmp_path, prelude))
    assert f"resumed from {os.path.join('model', 'checkpoint.pth')} at step 4" in result.stdout
    assert "ranks in sync: yes" in result.stdout
    assert torch.load(node0 / "model" / "checkpoint.pth", weights_only=False)["step"] == 6


@pytest.mark.slow
def test_a_rank_whose_disk_lacks_the_chosen_checkpoint_gets_rank_0s_copy_and_keeps_it(tmp_path, synthetic_data):
    """Two nodes without a shared filesystem: only rank 0's disk has the checkpoint, as only rank 0 saves.
    --resume auto must resume both from it, and leave rank 1's disk holding it for the next restart."""
    (node0, node1), prelude = node_disks(tmp_path)
    train(*options(node0, synthetic_data, "--training.max_steps=2"))  # rank 1's disk has no checkpoint
    result = train(*options(tmp_path, synthetic_data, "--training.max_steps=4"), *ON_EACH_DISK, "--resume", "auto",
                   launcher=TORCHRUN, script=patched(tmp_path, prelude), timeout=300)  # or a hang
    assert "rank 0 sent" in result.stdout and "rank(s) 1" in result.stdout, result.stdout[-3000:]
    assert f"resumed from {os.path.join('model', 'checkpoint.pth')} at step 2" in result.stdout
    assert "ranks in sync: yes" in result.stdout
    received = torch.load(node1 / "model" / "checkpoint.pth", weights_only=False)
    assert received["step"] == 2  # kept on rank 1's own disk, for the next restart
    assert torch.load(node0 / "model" / "checkpoint.pth", weights_only=False)["step"] == 4


@pytest.mark.slow
def test_on_a_fresh_clone_only_local_rank_0_downloads_the_data(tmp_path):
    fresh = tmp_path / "fresh"  # no data yet
    prelude = f"""
import time
import torchvision
import data
data.online = lambda host: True

def download(root, train=True, download=False):  # slow, as a real one is, so that a second rank would start one
    open(os.path.join({str(tmp_path)!r}, "downloaded by rank " + os.environ["RANK"]), "w").close()
    time.sleep(2)
    data.write_synthetic_cifar(root, num_train=40, num_test=20)

torchvision.datasets.CIFAR10 = download
"""
    result = train(*options(tmp_path, fresh, "--training.max_steps=1"), launcher=TORCHRUN,
                   script=patched(tmp_path, prelude))
    assert sorted(p.name for p in tmp_path.glob("downloaded by rank *")) == ["downloaded by rank 0"]
    assert "ranks in sync: yes" in result.stdout
    assert sorted(os.listdir(fresh)) == ["cifar-10-batches-py"]  # the staging folder is gone


@pytest.mark.slow
def test_compile_wraps_ddp_and_checkpoints_keep_the_models_own_names(tmp_path, synthetic_data):
    # the eager backend: Dynamo, its DDPOptimizer and the wrappers as with inductor, without minutes of compiling
    prelude = f"""
import torch
compile = torch.compile

def recording_compile(module, **kwargs):
    with open(os.path.join({str(tmp_path)!r}, "compiled"), "a") as f:
        f.write(type(module).__name__ + "\\n")
    return compile(module, backend="eager")

torch.compile = recording_compile
"""
    train(*options(tmp_path, synthetic_data, "--training.max_steps=2", "--training.compile=true"), launcher=TORCHRUN,
          script=patched(tmp_path, prelude))
    assert (tmp_path / "compiled").read_text().split() == ["DistributedDataParallel"] * 2  # one per rank
    plain = build_model(load_config(TINY)["model"]).state_dict().keys()
    latest = str(tmp_path / "model" / "checkpoint.pth")
    state = torch.load(latest, weights_only=False)
    assert state["model"].keys() == state["ema"].keys() == plain  # no _orig_mod. or module. prefixes
    for use_ema in (True, False):  # and an uncompiled model loads them
        checkpoint.model_from_checkpoint(latest, use_ema=use_ema)


def test_nan_loss_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, synthetic_data):
    train(*options(tmp_path, synthetic_data, "--training.max_steps=2"))
    latest = tmp_path / "model" / "checkpoint.pth"
    good = latest.read_bytes()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train_ddp.py"),
                             *options(tmp_path, synthetic_data, "--training.max_steps=30",
                                      "--training.learning_rate=1e30", "--training.grad_clip=0.0"),
                             "--resume", "auto"], capture_output=True, text=True, cwd=ROOT, timeout=300, env=ENV)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "loss became" in errors[0] and "untouched" in errors[0]
    assert latest.read_bytes() == good


def test_bad_option_is_a_one_line_error(tmp_path, synthetic_data):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train_ddp.py"), "--training.batch_size=many"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "batch_size" in result.stderr


def test_a_non_finite_gradient_skips_the_fused_step_and_leaves_weights_and_state_untouched():
    cfg = load_config(TINY)
    model, diffusion = build_model(cfg["model"]), Diffusion.from_config(cfg["diffusion"])
    optimizer = make_optimizer(model, 1e-3, weight_decay=0.1)  # decay would move the weights even with zero grads
    x, y = torch.rand(4, 3, 32, 32) * 2 - 1, torch.arange(4)
    train_step(model, diffusion, optimizer, x, y, grad_clip=1.0)  # a good step first, so the state is not empty
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = copy.deepcopy(optimizer.state_dict())
    x[0, 0, 0, 0] = float("nan")
    _, _, grad_norm = train_step(model, diffusion, optimizer, x, y, grad_clip=1.0)
    assert not torch.isfinite(grad_norm)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    after = optimizer.state_dict()["state"]
    for i, values in state["state"].items():
        assert all(torch.equal(v, after[i][name]) for name, v in values.items()), i  # step count included
    x[0, 0, 0, 0] = 0.0
    train_step(model, diffusion, optimizer, x, y, grad_clip=1.0)  # and a good step after it still moves them
    assert not all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())


@pytest.mark.slow
def test_the_same_command_again_under_torchrun_stops_before_training_and_keeps_the_run(tmp_path, synthetic_data):
    train(*options(tmp_path, synthetic_data, "--training.max_steps=3"), launcher=TORCHRUN)
    model_dir = tmp_path / "model"
    before = torch.load(model_dir / "checkpoint.pth", weights_only=False)
    log_before = (tmp_path / "outputs" / "training_log.csv").read_text()
    again = train(*options(tmp_path, synthetic_data, "--training.max_steps=1"), launcher=TORCHRUN, check=False)
    assert again.returncode != 0
    refusal = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert len(refusal) == 1 and str(model_dir) in refusal[0] and "already holds a run" in refusal[0]
    assert "--resume auto" in refusal[0] and "--overwrite" in refusal[0]
    after = torch.load(model_dir / "checkpoint.pth", weights_only=False)
    assert after["step"] == before["step"] == 3
    assert_same_checkpoint_weights(before, after)
    assert (tmp_path / "outputs" / "training_log.csv").read_text() == log_before
    assert not (model_dir / ".lock").exists() and not (tmp_path / "outputs" / ".lock").exists()


def test_a_second_job_on_a_locked_checkpoint_folder_stops_naming_the_holder(tmp_path, synthetic_data):
    (tmp_path / "model").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from checkpoint import claim_run_folder; claim_run_folder(sys.argv[2], [], False); "
                               "print('locked', flush=True); time.sleep(600)", ROOT, str(tmp_path / "model")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = train(*options(tmp_path, synthetic_data, "--training.max_steps=1"), check=False)
        assert result.returncode == 2
        assert f"in use by process {holder.pid}" in result.stderr and "Traceback" not in result.stderr
        assert os.listdir(tmp_path / "model") == [".lock"]
    finally:
        holder.kill()
        holder.wait()


def test_ddp_does_not_broadcast_the_fixed_buffers_before_every_forward(tmp_path, synthetic_data):
    record = tmp_path / "ddp_kwargs"
    script = patched(tmp_path, "import torch.nn.parallel as parallel\n"
                               "init = parallel.DistributedDataParallel.__init__\n"
                               "def recording(self, *args, **kwargs):\n"
                               f"    open({str(record)!r}, 'a').write(repr(kwargs.get('broadcast_buffers', True)) + '\\n')\n"
                               "    init(self, *args, **kwargs)\n"
                               "parallel.DistributedDataParallel.__init__ = recording\n")
    train(*options(tmp_path, synthetic_data, "--training.max_steps=1"), launcher=TORCHRUN, script=script)
    assert record.read_text().split() == ["False", "False"]  # each rank's wrapper
