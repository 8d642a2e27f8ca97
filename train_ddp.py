"""
The main training script. The same file runs on one CPU, one GPU, many GPUs and many nodes:

    python train_ddp.py                                             # one process
    torchrun --nproc_per_node=4 train_ddp.py --training.batch_size=64
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train_ddp.py
    torchrun --nproc_per_node=8 --max-restarts=3 train_ddp.py --resume auto   # survives preemption

Every config value is an option (--section.key=value). Rank 0 alone writes: model/checkpoint.pth and a row of
outputs/training_log.csv every save_interval steps, model/best_model.pth (weights alone) when an epoch's loss
improves, model/checkpoint_epoch_{N}.pth at training.checkpoint_epochs, and at the end
outputs/training_loss.png, outputs/sample_grid.png and outputs/timestep_grid_10x10.png from the EMA weights.
--resume auto continues from whichever of those checkpoints holds the most steps and can be read (none: a
fresh start). train_cpu.py is this stage under improved-diffusion's command line.

Read top to bottom: the training step and its schedules (train_cpu.py and bench/ use them too), how a
distributed run leaves, then main in its stages (processes, run folder, resume, data, model, preemption, the
loop, the end), then the command line.
"""
import atexit
import contextlib
import copy
import csv
import glob
import os
import shutil
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from checkpoint import (RunFolderTaken, UnreadableCheckpoint, claim_run_folder, newest_checkpoint, read_checkpoint,
                        release_run_folder, rng_state, save_checkpoint, set_rng_state)
from config import fail, load_config
from csrc import KERNELS_PATH
from data import load_cifar10, plot_curves, random_batches, to_model_range
from diffusion import Diffusion
from model import autocast_dtype_for, build_model, model_summary, update_ema
from sample import save_class_grid, save_timestep_grid

# -----------------------------------------------------------------------------
# the training step and its schedules; train_cpu.py and bench/ use them too

QUARTERS = ["q0", "q1", "q2", "q3"]  # loss by quarter of the timestep range, q0 the least noisy


def lr_at(step, training_cfg, progress=0.0):
    """Linear warm-up to learning_rate over warmup_steps, then constant (as improved-diffusion and DiT). With
    lr_cooldown > 0 the rate then falls linearly to zero over that last fraction of the run, progress being the
    fraction done (warmup-stable-decay, Hagele et al. 2024): a run of a known length, in steps or minutes, ends
    on annealed weights, and the stable phase needs no length decided in advance."""
    rate = training_cfg["learning_rate"]
    if training_cfg["warmup_steps"] > 0:
        rate *= min(1.0, (step + 1) / training_cfg["warmup_steps"])
    cooldown = training_cfg["lr_cooldown"]
    if cooldown > 0:
        rate *= min(1.0, max(0.0, 1.0 - progress) / cooldown)
    return rate


def run_progress(step, max_steps, elapsed, max_minutes):
    """The fraction of the run done: of its steps, or of its minutes where those end it sooner."""
    done = step / max_steps
    if max_minutes > 0:
        done = max(done, elapsed / (60 * max_minutes))
    return min(1.0, done)


def train_step(model, diffusion, optimizer, x, y, microbatch=0, grad_clip=0.0, autocast_dtype=None, no_sync=None):
    """One optimiser step on the batch (x, y). With microbatch > 0 the batch is split into chunks whose
    gradients add up to exactly the full-batch mean gradient (each chunk's mean loss is weighted by its
    share of the batch). t and noise are drawn for the whole batch first, so splitting changes nothing.
    no_sync, when given (DDP), is a context for all chunks but the last, so gradients are reduced once.
    Returns (per-sample losses (B,), timesteps (B,), grad norm before clipping)."""
    B = x.shape[0]
    t = diffusion.sample_timesteps(B, x.device)
    noise = torch.randn_like(x)
    chunk = microbatch if 0 < microbatch < B else B
    losses = []
    optimizer.zero_grad(set_to_none=True)
    for start in range(0, B, chunk):
        part = slice(start, start + chunk)
        last = start + chunk >= B
        context = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with context, torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16,
                                     enabled=autocast_dtype is not None):
            loss, _ = diffusion.training_losses(model, x[part], y[part], t[part], noise[part])
            (loss.mean() * (loss.shape[0] / B)).backward()
        losses.append(loss.detach())
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    if optimizer.defaults.get("fused"):  # make_optimizer's
        # a non-finite gradient skips the step on the device, without the host waiting to look at it: the fused
        # AdamW leaves weights and state untouched where found_inf is 1 (GradScaler's mechanism)
        optimizer.found_inf = (~torch.isfinite(grad_norm)).float()
        optimizer.step()
        del optimizer.found_inf
    elif torch.isfinite(grad_norm):
        optimizer.step()
    return torch.cat(losses), t, grad_norm


def make_optimizer(model, lr, weight_decay=0.0, betas=(0.9, 0.999)):
    """AdamW with its fused kernel: one pass over all parameters instead of a dozen small ops on each,
    much less of the optimiser's time on CPU (where PyTorch would otherwise pick the per-parameter loop)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=tuple(betas), fused=True)


def compile_or_eager(model, diffusion, x, y, autocast_dtype):
    """torch.compile(model), tried first on one forward and backward of a batch (x, y) shaped like the
    training's, so the compile happens here and not in the middle of the first step. Where compiling fails (no
    C++ compiler, an operator or CPU the compiler cannot handle) one line says so and the model runs eager. The
    trial's random draws are undone and its gradients dropped: a compiled run starts, and resumes, from the same
    random state as an eager one."""
    uncompiled, forward = model, torch.compile(model)
    model = getattr(model, "module", model)  # under DDP, the gradients to drop are the wrapped model's
    try:
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), \
                torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            loss, _ = diffusion.training_losses(forward, x, y)
            loss.mean().backward()
    except Exception as e:  # the compiler's errors have no common base class
        print(f"note: torch.compile failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:160]}): "
              f"training eager")
        forward = uncompiled
    model.zero_grad(set_to_none=True)
    return forward


def restart_metrics(path, columns, step=None):
    """The training log with its header and, for a run resumed at step, its rows up to that step: rows past the
    checkpoint (written before a crash that lost their checkpoint) are trained again, so they go. A new run
    (step None) starts an empty file. Replaced atomically, so an interrupt leaves the old file."""
    rows = []
    if step is not None and os.path.exists(path):
        with open(path, newline="") as f:
            rows = [row for row in csv.DictReader(f) if int(row["step"]) <= step]
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(path + ".tmp", path)


def ema_rate_at(step, ema_rate):
    """EMA decay warmed up as min(rate, (1 + step) / (10 + step)), so short runs get a usable EMA instead
    of one still dominated by the random initialisation after thousands of steps."""
    return min(ema_rate, (1 + step) / (10 + step))


# -----------------------------------------------------------------------------
# leaving a distributed run


def leave_process_group(status):
    """End a distributed process with exit status status. All ranks must call it.

    The barrier keeps any rank from tearing its connections down while a peer still uses them. The process then
    leaves without the interpreter's shutdown: DDP's reducer keeps the process group alive after
    destroy_process_group, so gloo's threads are still running while the interpreter shuts down, and one that
    drops a tensor then aborts the process (SIGABRT, "terminate called without an active exception") after a
    run that finished and saved. The exit handlers (the run folder locks among them) still run."""
    dist.barrier()
    dist.destroy_process_group()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def fail_together(message):
    """Stop with exit status 2, rank 0 saying why in one line. In a distributed run all ranks must call it."""
    if not dist.is_initialized():
        fail(message)
    if dist.get_rank() == 0:
        print(f"error: {message}", file=sys.stderr)
    leave_process_group(2)


# -----------------------------------------------------------------------------
# the training stage


def main(cfg, resume=None, overwrite=False, overrides=None, ways_on=None):
    """Train as cfg says, in this process and, under torchrun, with its peers. resume: a checkpoint path,
    "auto" (the readable one with the most steps in checkpoint_dir, or a fresh start) or None. overwrite: start
    afresh over a run's checkpoints. overrides (--section.key=value) are applied again on top of a resumed
    checkpoint's own config; without them the checkpoint's config is taken as cfg gives it. ways_on: what the
    refusal to start afresh over a run suggests (the caller's own flags)."""
    tc = cfg["training"]
    ckpt_dir, out_dir = tc["checkpoint_dir"], tc["output_dir"]
    latest_path = os.path.join(ckpt_dir, "checkpoint.pth")
    before_path = os.path.join(ckpt_dir, "cifar10_dit_ckpt.pth")  # the latest checkpoint's name until it had this one
    best_path = os.path.join(ckpt_dir, "best_model.pth")
    ways_on = ways_on or ("--resume auto continues it, another training.checkpoint_dir (and training.output_dir) "
                          "starts a new one, --overwrite trains over it")

    # -----------------------------------------------------------------------------
    # distributed setup from torchrun's environment; plain python is a world of one

    distributed = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        # bound to this rank's GPU, so barriers and the first collectives run there and not on GPU 0 of each node
        bound = {"device_id": torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))} \
            if torch.cuda.is_available() else {}
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun keeps one store for every restart of a job, so the addresses the ranks of a failed attempt
            # published there are still in it, and a restarted rank that reads one connects to a dead process
            # ("Connection refused"). A key prefix per attempt keeps the attempts apart. The restart count is
            # only the same on every node of a one-node job: with several nodes and --max-restarts, export
            # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, which gives each attempt a store of its own.
            if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and \
                    os.environ.get("GROUP_WORLD_SIZE", "1") != "1" and int(os.environ["RANK"]) == 0:
                print("warning: several nodes with --max-restarts share one store across restarts; export "
                      "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun so a restart cannot read stale addresses",
                      file=sys.stderr)
            agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            dist.init_process_group(backend, store=dist.PrefixStore(f"train_ddp/attempt_{attempt}/", agent_store),
                                    rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]), **bound)
        else:
            dist.init_process_group(backend, **bound)
    rank = dist.get_rank() if distributed else 0
    world_size = dist.get_world_size() if distributed else 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    master = rank == 0
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 master weights, TF32 tensor-core matmuls
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
        if tc["threads"]:
            torch.set_num_threads(tc["threads"])
        elif "OMP_NUM_THREADS" not in os.environ:  # an explicit thread count wins; else the cores are shared out
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))

    def log(message):
        if master:
            tqdm.write(message)

    # -----------------------------------------------------------------------------
    # one job per run: rank 0 locks the checkpoint and output folders for the group, and a fresh start stops
    # rather than replace the checkpoints of a run already there (a repeated command, a retried job)

    taken, locks = [""], []
    if master:
        held = [latest_path, before_path, best_path, *glob.glob(os.path.join(ckpt_dir, "checkpoint_epoch_*.pth"))]
        folders = [(ckpt_dir, held)] + ([(out_dir, [])] if os.path.abspath(out_dir) != os.path.abspath(ckpt_dir) else [])
        try:
            for folder, checkpoints in folders:
                locks.append(claim_run_folder(folder, checkpoints, resuming=resume is not None, overwrite=overwrite,
                                              ways_on=ways_on))
        except RunFolderTaken as e:
            taken[0] = str(e)
    if distributed:
        dist.broadcast_object_list(taken)
    if taken[0]:
        fail_together(taken[0])

    # -----------------------------------------------------------------------------
    # resume: rank 0 chooses the checkpoint and every rank reads that one. Each choosing from its own disk (nodes
    # without a shared filesystem) would start the ranks at different steps, and the first collective would hang.

    if resume == "auto":
        choice = [None, ""]  # the path, or why there is none
        if master:  # the file with the most steps that can be read, so a corrupt newest one costs only its steps
            epoch_paths = sorted(glob.glob(os.path.join(ckpt_dir, "checkpoint_epoch_*.pth")))
            try:
                choice[0] = newest_checkpoint([latest_path, before_path, best_path, *epoch_paths])[0]
            except UnreadableCheckpoint as e:
                choice[1] = f"--resume auto: {e}"
        if distributed:
            dist.broadcast_object_list(choice)
        resume, why = choice
        if why:
            fail_together(why)
        if resume is None:
            log(f"--resume auto: no checkpoint in {ckpt_dir}/, starting from step 0")
    resumed = None
    if resume:  # every rank reads it, and all stop with one line if one cannot or finds another step in its copy
        try:
            if not os.path.isfile(resume):
                raise UnreadableCheckpoint("does not exist")
            resumed = read_checkpoint(resume)
            report = ("", resumed.get("step"))
        except UnreadableCheckpoint as e:
            report = (f"checkpoint {resume!r} {e}", None)
        reports = [report] * world_size
        if distributed:
            dist.all_gather_object(reports, report)
        if reports[0][0]:
            fail_together(("rank 0: " if distributed else "") + reports[0][0])
        # nodes without a shared filesystem: only rank 0 saves, so another node's disk lacks the file or holds an
        # older copy. Rank 0 sends its copy to those ranks, which keep it on their own disk for the next restart.
        lacking = [r for r, (why, resumed_step) in enumerate(reports) if why or resumed_step != reports[0][1]]
        if lacking:
            payload = [None]
            if master:
                with open(resume, "rb") as f:
                    payload[0] = f.read()
            dist.broadcast_object_list(payload)
            if rank in lacking:
                os.makedirs(os.path.dirname(os.path.abspath(resume)), exist_ok=True)
                partial = f"{resume}.received{os.getpid()}"  # ranks of one node may share a disk: each its own name
                with open(partial, "wb") as f:
                    f.write(payload[0])
                os.replace(partial, resume)
                resumed = read_checkpoint(resume)
            del payload
            log(f"rank 0 sent {resume} to rank(s) {', '.join(map(str, lacking))}, whose disks lacked it or held "
                f"another step")
        if overrides is not None:  # the run's own config, with the given overrides on top
            cfg = load_config(overrides, base=resumed["config"])
        tc = cfg["training"]

    autocast_dtype = autocast_dtype_for(tc["precision"], device)  # the resumed run's precision, unless overridden
    if distributed and device.type == "cpu" and tc["precision"] == "auto":
        # each rank timed its own matmuls; bf16 only if every one of them chose it, so that all ranks agree
        chose_bf16 = torch.tensor([int(autocast_dtype is not None)])
        dist.all_reduce(chose_bf16, op=dist.ReduceOp.MIN)
        autocast_dtype = torch.bfloat16 if chose_bf16.item() else None

    # -----------------------------------------------------------------------------
    # data: the whole training set as one uint8 tensor on the device; shuffling, flips and scaling happen there

    data_started = time.time()
    if distributed and local_rank != 0:  # a fresh clone has no data: local rank 0 downloads it while the others wait
        dist.barrier()
    images, labels, class_names = load_cifar10(cfg["data"]["data_dir"], "train", image_size=cfg["model"]["image_size"])
    if distributed and local_rank == 0:
        dist.barrier()
    if len(class_names) > cfg["model"]["num_classes"]:
        fail_together(f"the data has {len(class_names)} classes but model.num_classes={cfg['model']['num_classes']}")
    images, labels = images.to(device), labels.to(device)
    batch_size = tc["batch_size"]
    steps_per_epoch = len(images) // (batch_size * world_size)
    if steps_per_epoch == 0:
        fail_together(f"batch_size={batch_size} x {world_size} processes is more than the {len(images)} training images")

    # -----------------------------------------------------------------------------
    # model, EMA, optimiser; the same seed on every rank for the weights, a rank-dependent one for the noise

    torch.manual_seed(tc["seed"])
    model = build_model(cfg["model"]).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = make_optimizer(model, tc["learning_rate"], tc["weight_decay"], tc["adam_betas"])
    diffusion = Diffusion.from_config(cfg["diffusion"])
    step, elapsed, best_loss = 0, 0.0, float("inf")
    if rank:  # rank 0 goes on from the weights' draws, as a one-process run does
        torch.manual_seed(tc["seed"] + 1000 * rank)
    if resumed is not None:
        try:
            model.load_state_dict(resumed["model"])
        except RuntimeError:
            fail_together(f"--resume {resume}: its weights do not fit the model the given options describe")
        ema.load_state_dict(resumed["ema"])
        optimizer.load_state_dict(resumed["optimizer"])
        step, elapsed, best_loss = resumed["step"], resumed.get("elapsed", 0.0), resumed.get("best_loss", float("inf"))
        rng_states = resumed.get("rng_per_rank") or [resumed["rng"]]
        if len(rng_states) == world_size:  # the exact continuation; another world size draws fresh noise
            set_rng_state(rng_states[rank], quiet=not master)
        log(f"resumed from {resume} at step {step}")
    if master:
        print(model_summary(model, cfg["model"]))
    # no buffer broadcast before every forward: the DiT's only buffer, the position table, never changes (the
    # UNet has none), and the broadcast is a collective each step that waits for rank 0
    forward = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None,
                                      broadcast_buffers=False) if distributed else model
    no_sync = forward.no_sync if distributed else None  # micro-batches reduce their gradients once, at the last
    chunk = tc["microbatch"] if 0 < tc["microbatch"] < batch_size else batch_size  # the shape the steps see
    if tc["compile"]:
        # DDP first, then compile, as PyTorch's DDP notes say: DDPOptimizer then splits the graph at DDP's gradient
        # buckets, so each bucket's all-reduce overlaps the rest of the backward pass (compiled inside DDP, the
        # backward is one graph, and every all-reduce waits for its end). Checkpoints save model, unwrapped. The
        # compile happens on a trial step whose random draws are undone; where it fails, one line and eager.
        forward = compile_or_eager(forward, diffusion, to_model_range(images[:chunk]), labels[:chunk], autocast_dtype)
    max_steps = tc["max_steps"] or tc["num_epochs"] * steps_per_epoch
    conditioning = "unconditional" if cfg["model"]["class_dropout"] >= 1 else f"{len(class_names)} classes"
    log(f"{world_size} process(es) on {device.type} | {len(images)} images, {conditioning} | batch {batch_size} per "
        f"process, {batch_size * world_size} in all, microbatch {tc['microbatch'] or 'off'} | {steps_per_epoch} "
        f"steps/epoch | {torch.get_num_threads() if device.type == 'cpu' else 'GPU'} threads | "
        f"{'bf16 autocast' if autocast_dtype else 'fp32'} (precision {tc['precision']}) | kernels: {KERNELS_PATH} | "
        f"data loaded in {time.time() - data_started:.1f} s | {ckpt_dir}/ | step {step} -> {max_steps}")

    # -----------------------------------------------------------------------------
    # preemption: SIGTERM or Ctrl-C finishes the step, saves, and exits cleanly; all ranks agree to stop. A non-finite
    # loss stops the run without saving. Both are looked at every check_every steps: a look waits for the device to
    # finish its queue, so on a GPU it happens every log_interval steps (a signal stops the run within that many),
    # on a CPU, where waiting costs nothing, every step.

    stop_requested = stopped_by_scheduler = False

    def request_stop(signum, frame):
        """A second Ctrl-C aborts at once (a person who will not wait); a second SIGTERM changes nothing, since
        schedulers send it again (SLURM signals every process, and torchrun passes its own on) while the save
        the first one asked for may be inside a collective."""
        nonlocal stop_requested, stopped_by_scheduler
        if stop_requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        stop_requested, stopped_by_scheduler = True, signum == signal.SIGTERM
        if master:
            tqdm.write(f"signal {signum}: finishing this step, saving, then exiting (Ctrl-C again to abort)")

    previous_handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}

    check_every = tc["log_interval"] if device.type == "cuda" else 1

    def check_together(stop, nonfinite, elapsed):
        """(whether any rank stops, the most non-finite steps any rank counted, the longest training time of any
        rank): decided together, or the ranks that carry on would wait forever for those that stopped, and a
        cooldown timed by minutes would give each rank its own learning rate. One all-reduce, one wait for the
        device."""
        flags = torch.tensor([float(stop), 0.0, elapsed], dtype=torch.float64, device=device)
        flags[1] = nonfinite
        if distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, nonfinite, elapsed = flags.tolist()
        return stop > 0, int(nonfinite), elapsed

    def save(path, epoch, weights_only=False):
        """Collective (every rank's RNG state is gathered); rank 0 writes atomically. weights_only: the model and EMA
        weights with their config, for the best model, which is written whenever the epoch loss improves; the
        optimiser's two moments and the RNG states, which only resuming needs, stay out."""
        if weights_only:
            if master:
                save_checkpoint({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": None, "step": step,
                                 "epoch": epoch, "best_loss": best_loss, "config": cfg, "class_names": class_names}, path)
            return
        states = [None] * world_size
        if distributed:
            dist.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        if master:
            save_checkpoint({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                             "step": step, "epoch": epoch, "elapsed": elapsed, "best_loss": best_loss, "config": cfg,
                             "class_names": class_names, "rng": states[0], "rng_per_rank": states,
                             "world_size": world_size, "epoch_loss": epoch_progress}, path)

    # -----------------------------------------------------------------------------
    # training loop: a line every log_interval steps; every save_interval steps a training_log.csv row (the means
    # over all ranks since the last) and the latest checkpoint; at each epoch's end its loss, which keeps the
    # best model, and the epoch checkpoints asked for

    log_path = os.path.join(out_dir, "training_log.csv")
    columns = ["step", "epoch", "images", "loss", "grad_norm", *QUARTERS, "lr", "images_per_s", "elapsed_s"]
    if master:
        os.makedirs(out_dir, exist_ok=True)
        before_log = os.path.join(out_dir, "metrics.csv")  # train_cpu.py's log before the loops were one
        if resumed is not None and not os.path.exists(log_path) and os.path.exists(before_log):
            shutil.copyfile(before_log, log_path)
        restart_metrics(log_path, columns, step if resumed is not None else None)  # rows past the checkpoint go

    def new_window():
        """Sums on the device since the last row (or line): loss, grad norm, steps, and the loss and sample count
        by quarter of the timesteps; the host reads them only when it writes."""
        return torch.zeros(3 + 2 * len(QUARTERS), dtype=torch.float64, device=device)

    def add_to(window, losses, t, grad_norm):
        quarter = (t * len(QUARTERS) // diffusion.num_steps).clamp(max=len(QUARTERS) - 1)
        window[0] += losses.mean()
        window[1] += grad_norm
        window[2] += 1
        window[3:3 + len(QUARTERS)].index_add_(0, quarter, losses.double())
        window[3 + len(QUARTERS):].index_add_(0, quarter, torch.ones_like(losses, dtype=torch.float64))

    def means(window):
        """{loss, grad_norm, q0..q3} of a window's sums; collective where distributed (the sums of every rank)."""
        if distributed:
            window = window.clone()
            dist.all_reduce(window)
        sums = window.tolist()
        steps = max(sums[2], 1)
        quarters = [total / max(count, 1) for total, count in zip(sums[3:3 + len(QUARTERS)], sums[3 + len(QUARTERS):])]
        return {"loss": sums[0] / steps, "grad_norm": sums[1] / steps, **dict(zip(QUARTERS, quarters))}

    def rank_loss_sums(loss_sum):
        """Every rank's loss sum for the epoch so far, as floats; collective where distributed."""
        sums = [loss_sum]
        if distributed:
            sums = [torch.zeros_like(loss_sum) for _ in range(world_size)]
            dist.all_gather(sums, loss_sum)
        return [value.item() for value in sums]

    model.train()
    generator = torch.Generator(device)
    nonfinite = torch.zeros((), device=device)  # steps whose loss or gradient was nan or inf, counted on the device
    log_window, row_window = new_window(), new_window()
    epoch_progress = None  # the current epoch's loss so far, per rank, for a checkpoint written mid-epoch
    log_seconds = row_seconds = 0.0
    run_started = time.time()
    finished = step >= max_steps
    agreed_elapsed = elapsed  # the training time all ranks agreed on at the last check, which times a cooldown
    # a time-limited run has no meaningful step total; the bar then shows steps and their rate
    bar = tqdm(total=None if tc["max_minutes"] and not tc["max_steps"] else max_steps, initial=step, desc="training",
               unit="step", dynamic_ncols=True, disable=not master)
    while not finished:
        epoch, position = divmod(step, steps_per_epoch)
        # the same order on every rank, each taking its share of every global batch; it depends on the epoch
        # alone, so a resumed run finds the batch it stopped before, and one process trains train_cpu.py's batches
        generator.manual_seed(tc["seed"] * 100003 + epoch)
        batches = random_batches(images, labels, batch_size, generator, cfg["data"]["random_flip"], rank, world_size)
        for _ in range(position):  # a resumed run skips to the batch it stopped before
            next(batches)
        loss_sum, loss_count = torch.zeros((), device=device), 0
        if position > 0 and resumed is not None and resumed.get("epoch_loss"):  # the stopped run's part of this epoch
            carried, loss_count = resumed["epoch_loss"]
            # this rank's own sum, so the epoch's loss comes out bit for bit as if no run had stopped; from another
            # number of ranks (or an older checkpoint, which kept their mean) each rank carries the mean sum
            if isinstance(carried, list):
                carried = carried[rank] if len(carried) == world_size else sum(carried) / len(carried)
            loss_sum += carried
        for x, y in batches:
            started = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, tc, run_progress(step, max_steps, agreed_elapsed, tc["max_minutes"]))
            losses, t, grad_norm = train_step(forward, diffusion, optimizer, x, y, tc["microbatch"], tc["grad_clip"],
                                              autocast_dtype, no_sync)
            nonfinite += ~(torch.isfinite(grad_norm) & torch.isfinite(losses).all())  # train_step skipped its update
            update_ema(ema, model, ema_rate_at(step, tc["ema_rate"]))
            step += 1
            loss_sum += losses.detach().mean()
            loss_count += 1
            for window in (log_window, row_window):
                add_to(window, losses.detach(), t, grad_norm.detach())
            if device.type == "cuda" and step % tc["log_interval"] == 0:
                torch.cuda.synchronize()  # so the timing below measures the work, not the queue
            seconds = time.perf_counter() - started
            elapsed += seconds
            log_seconds += seconds
            row_seconds += seconds
            bar.update(1)
            epoch_ended = step % steps_per_epoch == 0
            if step % check_every and not epoch_ended and step % tc["save_interval"] and step < max_steps:
                continue  # epoch ends, saves and the run's last step are checked too: nothing is saved unchecked
            out_of_time = tc["max_minutes"] > 0 and elapsed >= 60 * tc["max_minutes"]
            stop, bad_steps, agreed_elapsed = check_together(stop_requested or out_of_time, nonfinite, elapsed)
            if bad_steps:
                bar.close()  # so the error starts its own line
                fail_together(f"the loss became nan or inf at {bad_steps} step(s) up to step {step}, whose updates were "
                              f"skipped: stopping; the last good checkpoint in {ckpt_dir}/ is untouched "
                              f"(try a lower --training.learning_rate)")
            finished = stop or step >= max_steps
            if step % tc["log_interval"] == 0:
                if master:  # rank 0's own steps: a look, not a collective
                    sums = log_window.tolist()
                    shown = {"loss": sums[0] / max(sums[2], 1), "grad_norm": sums[1] / max(sums[2], 1)}
                    rate = sums[2] * batch_size * world_size / max(log_seconds, 1e-9)
                    bar.set_postfix(loss=f"{shown['loss']:.4f}", img_s=f"{rate:.1f}")
                    tqdm.write(f"step {step} | loss {shown['loss']:.4f} | grad_norm {shown['grad_norm']:.4f} | "
                               f"{rate:.1f} img/s")
                log_window, log_seconds = new_window(), 0.0
            if epoch_ended:
                epoch_loss = sum(rank_loss_sums(loss_sum)) / world_size / max(loss_count, 1)
                log(f"epoch {epoch + 1} | loss {epoch_loss:.4f} | step {step}")
                epoch_progress = None  # what the epoch checkpoints hold: nothing of a next epoch yet
                if epoch_loss < best_loss:
                    best_loss = epoch_loss
                    save(best_path, epoch + 1, weights_only=True)
                if epoch + 1 in tc["checkpoint_epochs"]:
                    save(os.path.join(ckpt_dir, f"checkpoint_epoch_{epoch + 1}.pth"), epoch + 1)
            if step % tc["save_interval"] == 0 or finished:
                if row_window[2] > 0:
                    row = {"step": step, "epoch": round(step / steps_per_epoch, 4),
                           "images": step * batch_size * world_size, **means(row_window),
                           "lr": optimizer.param_groups[0]["lr"],
                           "images_per_s": row_window[2].item() * batch_size * world_size / max(row_seconds, 1e-9),
                           "elapsed_s": elapsed}
                    if master:
                        with open(log_path, "a", newline="") as f:
                            csv.DictWriter(f, columns).writerow(row)
                row_window, row_seconds = new_window(), 0.0
                # the epoch so far, which a resumed run carries on (every rank takes the same branch)
                epoch_progress = None if epoch_ended else (rank_loss_sums(loss_sum), loss_count)
                save(latest_path, step // steps_per_epoch)
            if finished:
                break
    bar.close()

    # -----------------------------------------------------------------------------
    # the end: replicas must agree; the loss plot, and grids from the EMA weights

    if distributed:
        checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
        sums = [torch.zeros_like(checksum) for _ in range(world_size)]
        dist.all_gather(sums, checksum)
        in_sync = all(torch.equal(s, sums[0]) for s in sums)
        log(f"ranks in sync: {'yes' if in_sync else 'NO'} (parameter checksum {sums[0].item():.6f})")
    if master:
        total = time.time() - run_started
        plot_curves(log_path, os.path.join(out_dir, "training_loss.png"), "step", ["loss", *QUARTERS],
                    f"training loss | {step} steps, {elapsed / 60:.1f} min of training ({total / 60:.1f} min wall), "
                    f"{step * batch_size * world_size / max(elapsed, 1e-9):.0f} img/s, {world_size} x {device.type}")
        written = [latest_path, log_path, os.path.join(out_dir, "training_loss.png")]
        if tc["grid_per_class"] and not stopped_by_scheduler:  # a preempted job leaves at once; Ctrl-C draws them
            written += [os.path.join(out_dir, "sample_grid.png"), os.path.join(out_dir, "timestep_grid_10x10.png")]
            save_class_grid(ema, cfg, class_names, written[-2], per_class=tc["grid_per_class"], progress=True)
            save_timestep_grid(ema, cfg, written[-1])
        print(f"done: step {step}, {elapsed / 60:.1f} min of training | wrote {', '.join(written)}")
        for lock in locks:
            release_run_folder(lock)
    if distributed:
        leave_process_group(0)  # the other ranks wait here for rank 0's grids
    # only now the caller's handlers again (a test's, or the default): a repeated SIGTERM while the run plots and
    # draws its grids must not kill it halfway
    for sig, handler in previous_handlers.items():
        signal.signal(sig, handler)


if __name__ == "__main__":
    argv = sys.argv[1:]
    overwrite = "--overwrite" in argv  # start afresh over the checkpoints already in checkpoint_dir
    if overwrite:
        argv.remove("--overwrite")
    resume = None
    for i, arg in enumerate(argv):
        if arg == "--resume" or arg.startswith("--resume="):
            resume = arg.partition("=")[2] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            del argv[i:i + (1 if "=" in arg else 2)]
            if not resume:
                fail("--resume needs a checkpoint path or 'auto'")
            break
    main(load_config(argv), resume, overwrite, overrides=argv)
