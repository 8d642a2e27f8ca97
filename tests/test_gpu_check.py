"""
make gpu-check's dry run (its stages on a tiny model and the CPU), so the script cannot rot before a GPU
runs it; and the build decisions the GPU path relies on: when setup.py builds the CUDA kernels, its flags on
macOS, and what make train and make test do with the kernels.
"""
import json
import os
import shutil
import stat
import subprocess
import sys
import time

import pytest

import csrc
from csrc import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")

# -----------------------------------------------------------------------------
# setup.py: CUDA where the toolkit fits torch, no OpenMP on macOS


def test_cuda_kernels_are_built_only_where_the_toolkit_fits_torch():
    assert flags.cuda_build(None, "13.0", "13.0")[0]
    assert flags.cuda_build(None, "12.4", "12.8")[0]  # torch accepts another minor version
    assert flags.cuda_build(None, "12.4", "13.0") == (False, "nvcc 13.0 does not match torch's CUDA 12.4")
    assert not flags.cuda_build(None, None, "13.0")[0]  # a CPU build of torch
    assert not flags.cuda_build(None, "13.0", None)[0]  # no toolkit: a GPU alone is not enough
    assert flags.cuda_build("1", None, None)[0] and not flags.cuda_build("0", "13.0", "13.0")[0]
    with pytest.raises(ValueError, match="DIT_CUDA='yes' is not one of 0, 1"):
        flags.cuda_build("yes", "13.0", "13.0")


def fake_toolkit(folder, release):
    nvcc = folder / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    return str(folder)


def test_nvcc_version_is_read_from_cuda_home(tmp_path):
    assert flags.nvcc_version(fake_toolkit(tmp_path, "12.4")) == "12.4"
    assert flags.nvcc_version(str(tmp_path / "nowhere")) is None and flags.nvcc_version(None) is None


def run_setup(env, *args):
    return subprocess.run([sys.executable, "setup.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_setup_says_in_one_line_what_it_builds(tmp_path):
    """A toolkit of another major version than torch's: CPU kernels only, and the line says why."""
    import torch
    env = {"CUDA_HOME": fake_toolkit(tmp_path, "9.2"), "DIT_CUDA": ""}
    result = run_setup(env, "--name")
    assert result.returncode == 0, result.stderr[-2000:]
    line = [line for line in result.stderr.splitlines() if line.startswith("csrc:")]
    assert len(line) == 1
    why = "nvcc 9.2 does not match" if torch.version.cuda else "this torch is built without CUDA"
    assert "no CUDA kernels" in line[0] and why in line[0], line


def test_setup_refuses_a_bad_dit_cuda_in_one_line():
    result = run_setup({"DIT_CUDA": "yes"}, "--name")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: DIT_CUDA='yes' is not one of 0, 1" in result.stderr


def test_no_openmp_flag_on_macos():
    assert "-fopenmp" not in flags.cxx_flags("arm64", "Darwin") and flags.openmp_flags("Darwin") == []
    assert "-DCPU_CAPABILITY=DEFAULT" in flags.cxx_flags("arm64", "Darwin")
    assert {"-fopenmp", "-mavx2"} <= set(flags.cxx_flags("x86_64", "Linux")) and flags.openmp_flags("Linux")


def test_kernels_use_openmp_only_through_at_parallel_for_and_simd_hints():
    """Built without OpenMP (macOS), at::parallel_for runs its body once on one thread, and the kernels stay
    correct because their bodies take tasks from an atomic counter; `#pragma omp simd` is a vectorisation hint
    the compiler then ignores. An OpenMP call, or a parallel pragma, would not link or would change the result."""
    for folder in ("csrc", os.path.join("csrc", "cuda")):
        for name in os.listdir(os.path.join(ROOT, folder)):
            if name.endswith((".cpp", ".h", ".cu")):
                with open(os.path.join(ROOT, folder, name)) as f:
                    text = f.read()
                assert "omp_" not in text and "<omp.h>" not in text, name
                pragmas = [line.strip() for line in text.splitlines() if "pragma omp" in line]
                assert all(pragma == "#pragma omp simd" for pragma in pragmas), name


# -----------------------------------------------------------------------------
# the Makefile: make train passes CONFIG on a GPU machine; a failed kernel build does not stop test or train


@needs_make
def test_make_train_passes_config_to_torchrun():
    def dry(*args):
        return subprocess.run(["make", "-n", "train", "NUM_GPUS=1", "PY=python3", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=60).stdout

    assert "train_ddp.py" in dry("CONFIG=configs/cpu_2h.yaml") and "--config configs/cpu_2h.yaml" in dry(
        "CONFIG=configs/cpu_2h.yaml")
    assert "--config" not in dry()  # config.yaml, and a resumed run keeps its checkpoint's config
    assert "setup.py build_ext --inplace" in dry()  # the kernels are built first


@needs_make
def test_a_failed_kernel_build_leaves_test_and_train_running(tmp_path):
    shutil.copy(os.path.join(ROOT, "Makefile"), tmp_path)
    failing_python = tmp_path / "python"
    failing_python.write_text("#!/bin/sh\necho 'error: no compiler' >&2\nexit 1\n")
    failing_python.chmod(0o755)
    result = subprocess.run(["make", "try-kernels", f"PY={failing_python}"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "note: the csrc kernels did not build (build/kernels.log): running on the PyTorch path" in result.stdout
    assert "no compiler" in (tmp_path / "build" / "kernels.log").read_text()


# -----------------------------------------------------------------------------
# gpu_check.py --dry-run: every stage, the report


@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_stage_and_writes_the_report(tmp_path):
    out = tmp_path / "gpu_check"
    # budgets four times the script's: they are caps for a hang, and this test is about the code paths, not speed
    # (a dry run takes about a minute on 2 idle cores, several times that on cores shared with training)
    result = subprocess.run([sys.executable, "gpu_check.py", "--dry-run", "--budget-scale", "4", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=2400,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    report = json.loads((out / "report.json").read_text())
    statuses = {name: stage["status"] for name, stage in report["stages"].items()}
    assert statuses == dict.fromkeys(["build", "cuda_tests", "throughput", "resume", "sampling"], "passed"), \
        result.stdout[-3000:]
    assert result.returncode == 0
    markdown = (out / "report.md").read_text()
    for heading in ("## build", "## cuda_tests", "## throughput", "## resume", "## sampling"):
        assert heading in markdown
    throughput = report["stages"]["throughput"]["rows"]
    paths = ("sdpa", "reference") + (("fused",) if csrc.extension is not None else ())  # a row where it is built
    assert {(r["compile"], r["attention"]) for r in throughput if "ms" in r} == {
        (compiled, attention) for compiled in (False, True) for attention in paths}
    # the rows that decide the default come first, so a short budget never leaves them out
    assert [(r["compile"], r["attention"]) for r in throughput[:2]] == [(True, "sdpa"), (False, "sdpa")]
    assert report["stages"]["build"]["ninja"].startswith(("found", "not found"))  # whether the build runs parallel
    assert all(report["stages"]["resume"]["checks"].values())
    assert (out / "resume.log").exists() and report["stages"]["sampling"]["drawn"] > 0


def test_a_checkout_without_the_extension_skips_the_kernel_tests_and_passes_the_cuda_stage(tmp_path):
    """A fresh clone before make kernels, or a machine where the build failed: csrc.ops cannot import _C, and
    the kernel tests must skip rather than stop the suite at collection, in make test and in gpu_check's
    dry run (which builds nothing)."""
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT, checkout, ignore=shutil.ignore_patterns(
        "*.so", "__pycache__", ".git", ".venv", "build", "outputs", "model", "data", "results", ".pytest_cache"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIT_KERNELS_JIT": "0"}
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                            "tests/test_kernels.py"], cwd=checkout, capture_output=True, text=True, timeout=300, env=env)
    # 5: every test skipped, so none ran; a collection error would be 2 (or 1)
    assert tests.returncode == 5 and "1 skipped" in tests.stdout and "csrc extension not built" in tests.stdout, \
        tests.stdout[-2000:]
    out = checkout / "gpu_check"
    check = subprocess.run([sys.executable, "gpu_check.py", "--dry-run", "--stages", "cuda_tests", "--out", str(out)],
                           cwd=checkout, capture_output=True, text=True, timeout=600, env=env)
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["cuda_tests"]["status"] == "passed", check.stdout[-2000:]
    assert check.returncode == 0


def test_the_cuda_build_targets_the_gpus_found_with_ptx_for_the_newest():
    assert flags.cuda_arch_list(None, ["9.0"]) == "9.0+PTX"
    assert flags.cuda_arch_list("", ["9.0", "10.0", "8.0", "9.0"]) == "8.0;9.0;10.0+PTX"  # 10.0 is newer than 9.0
    assert flags.cuda_arch_list(None, []) == "8.0;9.0+PTX"  # no GPU visible: a login node builds for A100 and H100
    assert flags.cuda_arch_list("8.6", ["9.0"]) == "8.6"  # what the user asked for, as asked


def test_a_stage_out_of_time_leaves_no_process_behind_even_in_a_session_of_its_own(tmp_path):
    """As torchrun's workers are: each in a process group of its own, which killing the stage's group alone
    does not reach. The stage is asked to stop first (SIGTERM), then everything below it is killed."""
    import gpu_check
    pids = tmp_path / "pids"
    script = ("import os, subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
              f"open({str(pids)!r}, 'w').write(str(child.pid))\n"
              "time.sleep(600)\n")
    started = time.time()
    assert gpu_check.run_logged([sys.executable, "-c", script], time.time() + 3, grace=2) is None
    assert time.time() - started < 60
    worker = int(pids.read_text())
    time.sleep(0.5)
    try:
        os.kill(worker, 0)
        alive = not open(f"/proc/{worker}/stat").read().split()[2] == "Z"
    except ProcessLookupError:
        alive = False
    assert not alive


@needs_make
def test_gpu_check_without_py_uses_an_interpreter_that_has_torch_and_never_pip(tmp_path):
    shutil.copy(os.path.join(ROOT, "Makefile"), tmp_path)  # a checkout without .venv, as on a fresh GPU machine
    dry = subprocess.run(["make", "-n", "gpu-check", f"PYTHON={sys.executable}"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60).stdout
    assert f"{sys.executable} gpu_check.py" in dry and f"gpu-check: {sys.executable}" in dry
    assert "pip install" not in dry
    without_torch = subprocess.run(["make", "-n", "gpu-check", "PYTHON=false"], cwd=tmp_path, capture_output=True,
                                   text=True, timeout=60)
    assert "pip install" in without_torch.stdout + without_torch.stderr or "requirements.txt" in without_torch.stderr


def test_gpu_check_names_every_missing_package_in_one_line(monkeypatch, capsys):
    import gpu_check
    monkeypatch.setattr(gpu_check, "NEEDED", {**gpu_check.NEEDED, "no_such_module_a": "plotting-a",
                                              "no_such_module_b": "plotting-b"})
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--dry-run"])
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lacks plotting-a, plotting-b" in err and sys.executable in err
