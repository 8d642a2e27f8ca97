# Every target works on a fresh clone: it sets up .venv first. Pass options through, e.g.
#   make train ARGS="--training.batch_size=64"      make sample CHECKPOINT=outputs/cpu_2h/checkpoint.pth
# With PyTorch already installed (a cluster's or a container's environment), name that interpreter and
# no .venv is made: make test PY=python3
PYTHON ?= python3
VENV_PY := .venv/bin/python
PY ?= $(VENV_PY)
# make gpu-check without PY: .venv where it exists, else an interpreter on PATH that already has torch (a GPU
# machine's or a container's own, often without internet for setup's pip), else .venv made by setup
ifneq ($(filter gpu-check,$(MAKECMDGOALS)),)
ifeq ($(origin PY)$(wildcard $(VENV_PY)),file)
TORCH_PY := $(shell $(PYTHON) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)" \
              2>/dev/null && command -v $(PYTHON))
PY := $(or $(TORCH_PY),$(VENV_PY))
endif
endif
ARGS ?=
# the CPU recipe's config; on a GPU machine train_ddp.py reads config.yaml unless CONFIG is given
CONFIG ?= configs/cpu_2h.yaml
# what make train wrote last: train_ddp.py's latest or best model, or the newest run of the CPU recipe
CHECKPOINT ?= $(or $(shell ls -t model/checkpoint.pth model/cifar10_dit_ckpt.pth model/best_model.pth outputs/*/checkpoint.pth 2>/dev/null \
                | head -n 1),model/best_model.pth)
NUM_SAMPLES ?= 5000
PYTEST_ARGS ?=
# torch guesses the CUDA toolkit from nvcc's location, which can be wrong; name it where it is standard
CUDA_HOME ?= $(wildcard /usr/local/cuda)
export CUDA_HOME
NUM_GPUS := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
NPROC ?= $(if $(filter-out 0,$(NUM_GPUS)),$(NUM_GPUS),1)

.PHONY: setup test train sample eval kernels try-kernels kernels-cuda bench gpu-check clean

setup: $(if $(filter $(VENV_PY),$(PY)),.venv/.installed)

.venv/.installed: requirements.txt
	$(PYTHON) -m venv .venv
	$(VENV_PY) -m pip install -q --upgrade pip
	$(VENV_PY) -m pip install -q -r requirements.txt
	touch $@

# the main job: torchrun on every GPU there is, else the CPU recipe
train: setup try-kernels
ifneq ($(filter-out 0,$(NUM_GPUS)),)
	$(PY) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC) train_ddp.py \
	  $(if $(filter command line environment,$(origin CONFIG)),--config $(CONFIG)) $(ARGS)
else
	$(PY) train_cpu.py --config $(CONFIG) $(ARGS)
endif

sample: setup
	$(PY) sample.py --checkpoint $(CHECKPOINT) $(ARGS)

eval: setup
	$(PY) evaluate.py --checkpoint $(CHECKPOINT) --num-samples $(NUM_SAMPLES) --all-metrics $(ARGS)

# the C++ extension, and its CUDA kernels where nvcc matches torch's CUDA (DIT_CUDA=1 forces, 0 disables), in
# place; scripts fall back to PyTorch without it
kernels: setup
	$(PY) setup.py build_ext --inplace

# what test and train build first: the kernels where the build succeeds; where it fails (no compiler, Apple
# clang, a broken toolkit) one line says so and everything runs on the PyTorch path
try-kernels: setup
	@mkdir -p build
	@echo "csrc: compiling the kernels where they build (log: build/kernels.log)"
	@if $(PY) setup.py build_ext --inplace > build/kernels.log 2>&1; then grep -h '^csrc:' build/kernels.log; \
	else echo "note: the csrc kernels did not build (build/kernels.log): running on the PyTorch path"; fi

# the real CUDA build of setup.py into build/cuda-ext, leaving the in-place library alone, and a check that it
# loads and registers the CUDA kernels: proves compiling and linking on a machine with nvcc and no GPU
kernels-cuda: setup
	DIT_CUDA=1 $(PY) setup.py build_ext --build-lib build/cuda-ext --build-temp build/cuda-temp
	$(PY) -c "import glob, torch; torch.ops.load_library(glob.glob('build/cuda-ext/csrc/_C*.so')[0]); \
	  assert torch._C._dispatch_has_kernel_for_dispatch_key('dit_kernels::attention_forward', 'CUDA'); \
	  print('build/cuda-ext: the CUDA build links, loads and registers its CUDA kernels')"

test: setup try-kernels
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup kernels
	$(PY) -m bench $(ARGS)

# one command for a GPU machine, at most 8.3 minutes: the CUDA build and tests, throughput, a preempted and resumed
# torchrun, sampling time; writes outputs/gpu_check/. DRY_RUN=1: the same on a tiny model and the CPU
gpu-check: setup
	@echo "gpu-check: $(PY)"
	$(PY) gpu_check.py $(if $(filter 1,$(DRY_RUN)),--dry-run) $(ARGS)

clean:
	rm -rf build csrc/*.so csrc/__pycache__ __pycache__ tests/__pycache__
