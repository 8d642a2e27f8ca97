"""
make gpu-check: what the first run on a GPU machine must prove, in one command, within 8 minutes on one
H100 or H200, with nothing from outside the machine (synthetic data; the Python and CUDA toolkit it has).

    python gpu_check.py             # make gpu-check, or make gpu-check PY=python3 for a machine's own torch
    python gpu_check.py --dry-run   # make gpu-check DRY_RUN=1: the same stages on a tiny model and the CPU

Five stages, each in a child process with a time budget, so that a crash, a CUDA error or a hang is written
into the report and the other stages still run:

  build       setup.py build_ext --inplace: the extension, with its CUDA kernels where nvcc fits torch
  cuda_tests  pytest -m cuda: the fused ops against the reference (fp32, bf16, odd shapes, forward and
              backward) and the samplers, on the GPU
  throughput  a measured bf16 matmul ceiling; training steps of config.yaml's DiT at batches 256 and 1024
              in bf16, eager and torch.compile, attention sdpa / fused / reference: ms/step, img/s, MFU
  resume      torchrun train_ddp.py for 200 steps (2 processes over NCCL when there are 2 GPUs), SIGTERM
              in the middle, --resume auto: the run must carry on from its checkpoint, loss included
  sampling    10,000 DDIM-50 samples with guidance, timed (extrapolated to 50,000)

Writes outputs/gpu_check/ (or --out): report.md to read, report.json with the same numbers, <stage>.log.
The dry run's numbers say nothing about speed; it exists so this script cannot rot before a GPU runs it.
"""
import argparse
import csv
import datetime
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
TINY = ["--model.hidden_dim=32", "--model.depth=1", "--model.num_heads=2", "--model.num_kv_heads=1"]
# what each mode runs: the dry run keeps every code path and shrinks the sizes. The GPU budgets (s) sum to 8.3 min,
# under a 10-minute command: each is the dry run's time for the stage's own code (seconds) plus what a GPU adds,
# the CUDA build of one architecture (ninja or not), CUDA's start-up in every process, the compiled throughput
# row's compile, and two torchrun launches that no longer compile
REAL = dict(budgets={"build": 150, "cuda_tests": 60, "throughput": 150, "resume": 90, "sampling": 45},
            model=[], model_name="config.yaml's DiT", batches=(256, 1024), matmul_n=8192, timed_steps=10,
            compile_backend="inductor", compile_guess_s=60, build=["build_ext", "--inplace"], train_batch=128,
            total_steps=200, steps_per_epoch=50, samples=10_000, sample_batch=1000)
# the dry run compiles nothing: make test builds the kernels, and rebuilding in place here could replace a
# library that running jobs have loaded. torch.compile traces with aot_eager: dynamo, the fake kernels and AOT
# autograd all run, without minutes of C++ code generation on a CPU. Its budgets are caps for a hang, wide
# because a CPU shared with training runs makes it several times slower
DRY = dict(budgets={"build": 120, "cuda_tests": 240, "throughput": 240, "resume": 300, "sampling": 180},
           model=TINY, model_name="a tiny DiT", batches=(4, 8), matmul_n=256, timed_steps=2,
           compile_backend="aot_eager", compile_guess_s=10, build=["--name"], train_batch=8,
           total_steps=100, steps_per_epoch=25, samples=20, sample_batch=10)
# dense bf16 tensor-core peaks of the data sheets (TFLOP/s), for MFU against the nominal figure; first match wins
NOMINAL_BF16_TFLOPS = [("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("A100", 312), ("L40S", 362)]


def save(out, stage, result):
    """A stage's results so far: written after every measurement, so a stage stopped at its budget keeps them."""
    with open(os.path.join(out, f"{stage}.json"), "w") as f:
        json.dump(result, f, indent=1)


STOP_GRACE_S = 40  # torchrun gives its workers 30 s after passing on a SIGTERM


def descendants(pid):
    """Every process below pid, read from ps: torchrun starts each worker in a process group of its own, so
    killing the stage's group alone would leave the workers holding the GPU and writing files."""
    try:
        out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    children = {}
    for line in out.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def run_logged(cmd, deadline, grace=STOP_GRACE_S, **kwargs):
    """Run cmd in its own process group, output into ours (the stage log). At the deadline: SIGTERM to the
    group, which torchrun passes on to its workers (they save and stop), then after the grace period SIGKILL
    to whatever is left of the group and of every process below it, so nothing of this stage outlives it.
    Returns the exit status, or None when it ran out of time."""
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, **kwargs)
    try:
        return proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        pass
    below = descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    for pid in below + descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    return None


# -----------------------------------------------------------------------------
# the stages, each run as `gpu_check.py --stage NAME` and returning (ok, result dict with summary and lines)


def stage_build(plan, out, deadline):
    started = time.time()
    # without ninja, setuptools compiles one file after another: the CUDA files take several times as long
    ninja = shutil.which("ninja") or next(iter(glob.glob(os.path.join(os.path.dirname(sys.executable), "ninja"))), None)
    result_ninja = f"found ({ninja}), files compiled in parallel" if ninja else "not found: files compiled one by one"
    cmd = [sys.executable, "setup.py", *plan["build"]]
    rc = run_logged(cmd, deadline)
    ok = rc == 0
    result = {"command": " ".join(cmd[1:]), "exit": rc, "seconds": round(time.time() - started, 1),
              "ninja": result_ninja}
    if ok:  # what the library that is now in place has registered, asked of a fresh process
        try:
            probe = subprocess.run([sys.executable, "-c", "import csrc; print(csrc.KERNELS_PATH)"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=max(1.0, deadline - time.time()))
            result["kernels"] = probe.stdout.strip() or probe.stderr.strip()[-300:]
        except subprocess.TimeoutExpired:
            ok, result["kernels"] = False, "(out of time before `import csrc` answered)"
    with open(os.path.join(out, "build.log")) as f:
        decision = [line.strip() for line in f if line.startswith("csrc:")]
    result["decision"] = decision[0] if decision else "(setup.py printed no decision line)"
    result["summary"] = (f"{result['decision']} ({result['seconds']} s)" if ok else
                         f"setup.py {'ran out of time' if rc is None else f'exited {rc}'}: see build.log")
    result["lines"] = [f"`python {result['command']}`: exit {rc}, {result['seconds']} s", "",
                       f"- {result['decision']}", f"- now loaded: {result.get('kernels', 'n/a')}",
                       f"- ninja: {result['ninja']}"]
    return ok, result


CUDA_TEST_FILES = [os.path.join("tests", "test_kernels.py")]


def stage_cuda_tests(plan, out, deadline):
    # the files that hold CUDA tests, not the whole suite: a package only another test file imports (a plotting
    # library, say) must not stop collection and hide what the kernels do
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rfEs", "-p", "no:cacheprovider"] + CUDA_TEST_FILES
    started = time.time()
    rc = run_logged(cmd, deadline)
    with open(os.path.join(out, "cuda_tests.log")) as f:
        text = f.read()
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", text)}
    reasons = sorted(set(re.findall(r"^SKIPPED \[\d+\] \S+: (.*)$", text, re.M)))
    failures = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
    summary = ", ".join(f"{n} {word}" for word, n in counts.items()) or "no pytest summary"
    result = {"command": "pytest -m cuda", "exit": rc, "counts": counts, "failures": failures, "skip_reasons": reasons,
              "seconds": round(time.time() - started, 1),
              "summary": summary if rc is not None else f"ran out of time ({summary})"}
    result["lines"] = [f"`pytest -m cuda`: {summary}, exit {rc}, {result['seconds']} s", ""] + \
        [f"- failed: `{name}`" for name in failures[:30]] + [f"- skipped: {reason}" for reason in reasons]
    # exit 5, nothing ran: every CUDA test skipped (no GPU in a dry run, or no extension), which the skip
    # reasons above say; a GPU run also has the build stage, which fails where the extension did not build
    return rc == 0 or (rc == 5 and counts.get("skipped", 0) > 0 and not failures), result


def stage_throughput(plan, out, deadline):
    import torch

    import csrc
    from bench.common import matmul_gflops
    from bench.train import forward_flops
    from config import load_config
    from model import build_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    ceiling = matmul_gflops(torch.bfloat16, n=plan["matmul_n"], device=device.type) / 1e3  # TFLOP/s
    nominal = next((peak for key, peak in NOMINAL_BF16_TFLOPS if key in name), None)
    cfg = load_config(plan["model"])
    torch.manual_seed(0)
    csrc.ATTENTION = "reference"  # plain matmuls, which the FLOP counter sees whatever path is timed
    flops_per_image = 3 * forward_flops(build_model(cfg["model"]).to(device), device)  # backward ~ 2x forward
    peak = f"{nominal} TFLOP/s nominal" if nominal else "no nominal peak known for this device"
    result = {"device": name, "matmul_tflops": round(ceiling, 1), "nominal_tflops": nominal,
              "gflops_per_image": round(flops_per_image / 1e9, 2), "rows": [], "summary": "nothing timed",
              "lines": [f"{name}: bf16 matmul {plan['matmul_n']}^3 {ceiling:.3g} TFLOP/s measured, {peak}; "
                        f"{plan['model_name']}: {flops_per_image / 3e9:.3g} GFLOPs/image forward, x3 for a training "
                        "step (AdamW, bf16 autocast)", "",
                        "| batch | torch.compile | attention | ms/step | img/s | TFLOP/s | MFU (measured) "
                        "| MFU (nominal) | warm-up s |", "|---|---|---|---|---|---|---|---|---|"]}
    fused_built = csrc.supports("attention_forward", torch.empty(1, device=device, dtype=torch.bfloat16))
    best, row_seconds = None, {False: 0.0, True: plan["compile_guess_s"]}  # the last row's time, eager and compiled
    # the two rows that decide the default first (compiled against eager, SDPA, the first batch), so a short
    # budget leaves out the others, never those
    deciding = [(True, plan["batches"][0], "sdpa"), (False, plan["batches"][0], "sdpa")]
    order = deciding + [(compiled, batch, attention) for compiled in (False, True) for batch in plan["batches"]
                        for attention in ("sdpa", "fused", "reference") if (compiled, batch, attention) not in deciding]
    for compiled, batch, attention in order:
        row = {"batch": batch, "compile": compiled, "attention": attention}
        result["rows"].append(row)
        if attention == "fused" and not fused_built:
            row["note"] = f"no fused kernel for {device.type} in this build"
        elif time.time() + 1.2 * row_seconds[compiled] > deadline:
            row["note"] = "skipped: out of the stage's time"
        else:
            started = time.time()
            row.update(time_training_step(plan, cfg, device, batch, compiled, attention))
            row_seconds[compiled] = time.time() - started
        if "ms" in row:
            achieved = flops_per_image * batch / (row["ms"] / 1e3) / 1e12
            row.update(tflops=float(f"{achieved:.3g}"), mfu_measured=round(achieved / ceiling, 3),
                       mfu_nominal=round(achieved / nominal, 3) if nominal else None)
            cells = [row["ms"], row["img_s"], row["tflops"], f"{row['mfu_measured']:.1%}",
                     f"{row['mfu_nominal']:.1%}" if nominal else "n/a", row["warmup_s"]]
            best = row if best is None or row["img_s"] > best["img_s"] else best
            result["summary"] = (f"best {best['img_s']} img/s (batch {best['batch']}, {best['attention']}"
                                 f"{', compiled' if best['compile'] else ''}, MFU {best['mfu_measured']:.0%} "
                                 "of the measured ceiling)")
        else:
            cells = [row["note"], "", "", "", "", ""]
        result["lines"].append(f"| {batch} | {'yes' if compiled else 'no'} | {attention} | "
                               + " | ".join(str(c) for c in cells) + " |")
        save(out, "throughput", result)  # after every row: a stage stopped at its budget keeps them
    return best is not None, result


def time_training_step(plan, cfg, device, batch, compiled, attention):
    """ms per training step (train_ddp.train_step) of a fresh model; or a note."""
    import torch

    import csrc
    from bench.train import step_ms
    from model import build_model

    csrc.ATTENTION = attention
    torch._dynamo.reset()  # each row compiles afresh, and no row meets dynamo's limit on recompilations
    torch.manual_seed(0)
    model = build_model(cfg["model"]).to(device)
    runnable = torch.compile(model, backend=plan["compile_backend"]) if compiled else model
    started = time.time()
    try:
        ms = step_ms(runnable, batch, device, torch.bfloat16, repeats=plan["timed_steps"])
    except Exception as e:  # e.g. out of memory: the row says so, the others still run
        return {"note": f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"}
    finally:
        del model, runnable
        if device.type == "cuda":
            torch.cuda.empty_cache()
    warmup = time.time() - started - ms * plan["timed_steps"] / 1e3  # the first step, compilation included
    return {"ms": round(ms, 2), "img_s": round(batch / ms * 1e3), "warmup_s": round(warmup, 1)}


def read_lines(path):
    with open(path) as f:
        return f.read().strip().splitlines()


def read_step(path):
    import torch
    return torch.load(path, map_location="cpu", weights_only=False)["step"] if os.path.exists(path) else None


def stage_resume(plan, out, deadline):
    import torch

    from data import write_synthetic_cifar

    nproc = 2 if torch.cuda.device_count() >= 2 else 1
    run = os.path.join(out, "resume")
    shutil.rmtree(run, ignore_errors=True)  # a previous check's checkpoint would be resumed, its log read
    # the first epoch's row in training_log.csv is the cue for the SIGTERM
    data = write_synthetic_cifar(os.path.join(run, "data"), num_train=plan["steps_per_epoch"] * plan["train_batch"]
                                 * nproc, num_test=10)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train_ddp.py",
           *plan["model"], f"--data.data_dir={data}", f"--training.checkpoint_dir={run}/model",
           f"--training.output_dir={run}/outputs", f"--training.batch_size={plan['train_batch']}",
           f"--training.max_steps={plan['total_steps']}", "--training.warmup_steps=20", "--training.log_interval=10",
           f"--training.save_interval={plan['steps_per_epoch']}",  # a checkpoint and a log row an epoch
           "--sampling.steps=5", "--training.compile=false"]  # preemption and resume, not speed: no compile twice
    checkpoint = os.path.join(run, "model", "checkpoint.pth")
    log_csv = os.path.join(run, "outputs", "training_log.csv")
    result = {"processes": nproc, "backend": "nccl" if nproc > 1 else "none (one process)"}
    print(f"$ {' '.join(cmd)}  # then SIGTERM to torchrun after the first epoch", flush=True)
    first = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    while first.poll() is None and time.time() < deadline:
        if os.path.exists(log_csv) and len(read_lines(log_csv)) > 1:
            first.send_signal(signal.SIGTERM)  # as a preempting scheduler does; torchrun passes it to its workers
            break
        time.sleep(0.1)
    try:
        first.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        os.killpg(first.pid, signal.SIGKILL)
    result["stopped_at"] = read_step(checkpoint)
    print(f"\n$ {' '.join(cmd)} --resume auto", flush=True)
    rc = run_logged(cmd + ["--resume", "auto"], deadline)
    result["finished_at"] = read_step(checkpoint)
    result["losses"] = {}
    if os.path.exists(log_csv):
        with open(log_csv) as f:
            result["losses"] = {int(row["step"]): round(float(row["loss"]), 4) for row in csv.DictReader(f)}
    with open(os.path.join(out, "resume.log")) as f:
        in_sync = nproc == 1 or "ranks in sync: yes" in f.read()
    losses, stopped, total = result["losses"], result["stopped_at"], plan["total_steps"]
    after = [loss for step, loss in losses.items() if stopped is not None and step > stopped]
    checks = {"SIGTERM stopped the run mid-way with a checkpoint": stopped is not None and 0 < stopped < total,
              f"the resumed run reached step {total}": rc == 0 and result["finished_at"] == total,
              "the loss carries on (every epoch after the resume below the first epoch's)":
                  bool(after) and all(loss < losses[min(losses)] for loss in after),
              "ranks in sync": in_sync}
    result["checks"] = checks
    ok = all(checks.values())
    failed = "; ".join(name for name, passed in checks.items() if not passed)
    result["summary"] = (f"{nproc} process(es): stopped at step {stopped}, resumed to {result['finished_at']}, loss "
                         + " -> ".join(str(v) for v in losses.values()) + (f"; FAILED: {failed}" if failed else ""))
    result["lines"] = [f"torchrun, {nproc} process(es), backend {result['backend']}, {plan['total_steps']} steps of "
                       f"{plan['train_batch']} per process, SIGTERM after the first epoch, then --resume auto", ""] + \
        [f"- [{'x' if passed else ' '}] {name}" for name, passed in checks.items()] + \
        ["", "| step | loss |", "|---|---|"] + [f"| {step}{' (SIGTERM)' if step == stopped else ''} | {loss} |"
                                                    for step, loss in losses.items()]
    return ok, result


def stage_sampling(plan, out, deadline):
    import torch

    from config import load_config
    from model import build_model
    from sample import sample_images

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = load_config(plan["model"])
    torch.manual_seed(0)
    model = build_model(cfg["model"]).to(device).eval()  # random weights: the speed does not depend on them
    options = dict(sampler="ddim", steps=50, guidance_scale=2.0)
    labels = torch.arange(plan["samples"], device=device) % cfg["model"]["num_classes"]
    sample_images(model, cfg, labels[:8], **dict(options, steps=2))  # warm-up: allocations, kernel choice
    drawn, seconds = 0, 0.0
    while drawn < len(labels):
        batch = labels[drawn:drawn + plan["sample_batch"]]
        if drawn and time.time() + 1.5 * seconds / drawn * len(batch) > deadline:
            break  # the next batch might not fit in the budget: extrapolate from the ones drawn
        started = time.time()
        sample_images(model, cfg, batch, batch_size=len(batch), **options)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds += time.time() - started
        drawn += len(batch)
    per_image = seconds / max(drawn, 1)
    result = {"device": device, "drawn": drawn, "seconds": round(seconds, 1), "batch": plan["sample_batch"],
              "images_per_s": round(drawn / max(seconds, 1e-9), 1),
              "seconds_for_target": round(per_image * len(labels), 1),
              "seconds_for_50000": round(per_image * 50_000, 1)}
    measured = "measured" if drawn == len(labels) else f"extrapolated from {drawn}"
    result["summary"] = (f"{len(labels):,} DDIM-50 guided samples: {result['seconds_for_target']} s ({measured}); "
                         f"50,000: {result['seconds_for_50000']} s extrapolated")
    result["lines"] = [f"DDIM-50, guidance 2.0 (a doubled batch per step), batches of {plan['sample_batch']}, "
                       f"sampling.precision {cfg['sampling']['precision']}, {plan['model_name']} with random weights",
                       "",
                       f"- {drawn:,} images in {result['seconds']} s: {result['images_per_s']} images/s",
                       f"- {len(labels):,} images: {result['seconds_for_target']} s ({measured})",
                       f"- 50,000 images: {result['seconds_for_50000']} s ({result['seconds_for_50000'] / 60:.1f} min, "
                       "extrapolated)"]
    return drawn > 0, result


STAGES = {"build": stage_build, "cuda_tests": stage_cuda_tests, "throughput": stage_throughput,
          "resume": stage_resume, "sampling": stage_sampling}

# -----------------------------------------------------------------------------
# the driver: every stage in a child process, then report.md and report.json


# what the stages import, by module name (package name where pip's differs): one look at the start, so a
# missing one is named at once instead of failing a stage minutes in
NEEDED = {"torch": "torch", "torchvision": "torchvision", "numpy": "numpy", "scipy": "scipy", "yaml": "PyYAML",
          "tqdm": "tqdm", "PIL": "pillow", "matplotlib": "matplotlib", "pytest": "pytest"}


def missing_packages():
    import importlib.util
    return [package for module, package in NEEDED.items() if importlib.util.find_spec(module) is None]


def environment():
    probe = ("import json, platform, torch; print(json.dumps({'python': platform.python_version(), "
             "'torch': torch.__version__, 'cuda': torch.version.cuda, 'gpus': [torch.cuda.get_device_name(i) "
             "for i in range(torch.cuda.device_count())], 'host': platform.node()}))")
    try:
        return json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                         timeout=300).stdout)
    except (ValueError, subprocess.SubprocessError) as e:
        return {"error": str(e)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny model, CPU only: checks the script itself")
    parser.add_argument("--out", default=os.path.join(ROOT, "outputs", "gpu_check"))
    parser.add_argument("--stages", default=",".join(STAGES), help="a comma-separated subset, in this order")
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="multiply every stage's time budget: a loaded machine runs the stages slower")
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    args = parser.parse_args()
    plan = DRY if args.dry_run else REAL
    plan = dict(plan, budgets={name: budget * args.budget_scale for name, budget in plan["budgets"].items()})
    if args.stage:  # a child: do the stage, leave its result in <out>/<stage>.json
        sys.path.insert(0, ROOT)
        budget = plan["budgets"][args.stage]
        ok, result = STAGES[args.stage](plan, args.out, time.time() + 0.9 * budget)  # time to save and exit
        save(args.out, args.stage, dict(result, ok=ok))
        return
    stages = args.stages.split(",")
    for name in stages:
        if name not in STAGES:
            print(f"error: --stages: {name!r} is not one of {', '.join(STAGES)}", file=sys.stderr)
            raise SystemExit(2)
    missing = missing_packages()
    if missing:
        print(f"error: {sys.executable} lacks {', '.join(missing)}: pip install {' '.join(missing)}, or run with "
              f"an interpreter that has them (make gpu-check PY=...)", file=sys.stderr)
        raise SystemExit(2)
    print(f"[gpu-check] python: {sys.executable}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, even on a GPU machine
        env.setdefault("OMP_NUM_THREADS", "1")  # a tiny model gains nothing from more, and shares the cores better
    started = time.time()
    report = {"mode": "dry run (tiny model, CPU)" if args.dry_run else "GPU", "started": datetime.datetime.now()
              .isoformat(timespec="seconds"), "environment": environment(), "stages": {}}
    for name in stages:
        budget = plan["budgets"][name]
        print(f"[gpu-check] {name} (budget {budget} s, log {os.path.join(args.out, name + '.log')})", flush=True)
        stage_started = time.time()
        if os.path.exists(os.path.join(args.out, f"{name}.json")):
            os.remove(os.path.join(args.out, f"{name}.json"))
        with open(os.path.join(args.out, f"{name}.log"), "w") as log:
            rc = run_logged([sys.executable, os.path.abspath(__file__), "--stage", name, "--out", args.out]
                            + (["--dry-run"] if args.dry_run else []) + ["--budget-scale", str(args.budget_scale)],
                            time.time() + budget,
                            stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            with open(os.path.join(args.out, f"{name}.json")) as f:
                result = json.load(f)
        except (OSError, ValueError):
            result = {}
        if rc is None:
            status = "timed out"
        elif rc != 0:
            status = f"crashed (exit {rc})"
        else:
            status = "passed" if result.get("ok") else "failed"
        result.update(status=status, seconds=round(time.time() - stage_started, 1), budget=budget)
        result.setdefault("summary", f"see {name}.log")
        report["stages"][name] = result
        print(f"[gpu-check] {name}: {status} in {result['seconds']} s: {result['summary']}", flush=True)
    report["seconds"] = round(time.time() - started, 1)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    e = report["environment"]
    md = [f"# GPU check: {', '.join(e.get('gpus') or ['no GPU'])}", "",
          f"{report['mode']} | {report['started']} | {report['seconds']} s in all | host {e.get('host')} | "
          f"Python {e.get('python')} | torch {e.get('torch')} (CUDA {e.get('cuda')})", ""]
    if args.dry_run:
        md += ["A dry run: a tiny model on the CPU. It shows that every stage runs; its numbers say nothing about "
               "speed.", ""]
    md += ["| stage | status | seconds (budget) | summary |", "|---|---|---|---|"]
    md += [f"| {name} | {r['status']} | {r['seconds']} ({r['budget']}) | {r['summary']} |"
           for name, r in report["stages"].items()]
    for name, r in report["stages"].items():
        md += ["", f"## {name}", ""] + r.get("lines", [f"(no results: {r['status']}; see {name}.log)"])
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print(f"[gpu-check] {report['seconds']} s; report: {os.path.join(args.out, 'report.md')}")
    if not all(r["status"] == "passed" for r in report["stages"].values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
