# Every target works on a fresh clone: it sets up .venv first. Pass options through, e.g.
#   make train ARGS="--training.batch_size=64"      make sample CHECKPOINT=outputs/cpu_2h/checkpoint.pth
# With PyTorch already installed (a cluster's or a container's environment), name that interpreter and
# no .venv is made: make test PY=python3
PYTHON ?= python3
VENV_PY := .venv/bin/python
PY ?= $(VENV_PY)
ARGS ?=
CONFIG ?= configs/cpu_2h.yaml
# what make train wrote last: train_ddp.py's latest or best model, or the newest run of the CPU recipe
CHECKPOINT ?= $(or $(shell ls -t model/cifar10_dit_ckpt.pth model/best_model.pth outputs/*/checkpoint.pth 2>/dev/null \
                | head -n 1),model/best_model.pth)
NUM_SAMPLES ?= 5000
PYTEST_ARGS ?=
# torch guesses the CUDA toolkit from nvcc's location, which can be wrong; name it where it is standard
CUDA_HOME ?= $(wildcard /usr/local/cuda)
export CUDA_HOME
NUM_GPUS := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
NPROC ?= $(if $(filter-out 0,$(NUM_GPUS)),$(NUM_GPUS),1)

.PHONY: setup test train sample eval kernels kernels-cuda bench clean

setup: $(if $(filter $(VENV_PY),$(PY)),.venv/.installed)

.venv/.installed: requirements.txt
	$(PYTHON) -m venv .venv
	$(VENV_PY) -m pip install -q --upgrade pip
	$(VENV_PY) -m pip install -q -r requirements.txt
	touch $@

# the main job: torchrun on every GPU there is, else the CPU recipe
train: setup
ifneq ($(filter-out 0,$(NUM_GPUS)),)
	$(PY) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC) train_ddp.py $(ARGS)
else
	$(PY) train_cpu.py --config $(CONFIG) $(ARGS)
endif

sample: setup
	$(PY) sample.py --checkpoint $(CHECKPOINT) $(ARGS)

eval: setup
	$(PY) evaluate.py --checkpoint $(CHECKPOINT) --num-samples $(NUM_SAMPLES) --all-metrics $(ARGS)

# the C++ (and, with a CUDA toolkit, CUDA) extension, built in place; scripts fall back to PyTorch without it
kernels: setup
	$(PY) setup.py build_ext --inplace

# compile the CUDA sources for sm_80 and sm_90 without a GPU: catches build errors on CPU-only machines
# (-std=c++20: torch 2.14's headers need it; the objects go to build/ and are not linked)
TORCH_INCLUDE = $(shell $(PY) -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))" 2>/dev/null)
PYTHON_INCLUDE = $(shell $(PY) -c "import sysconfig; print(sysconfig.get_paths()['include'])" 2>/dev/null)
kernels-cuda: setup
	mkdir -p build/cuda-check
	for f in csrc/cuda/*.cu; do \
	  $(CUDA_HOME)/bin/nvcc -c $$f -o build/cuda-check/$$(basename $$f .cu).o -std=c++20 -O3 $(TORCH_INCLUDE) \
	    -I$(PYTHON_INCLUDE) -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
	    --expt-relaxed-constexpr -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
	    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ || exit 1; \
	done
	@echo "CUDA sources compile for sm_80 and sm_90"

test: setup kernels
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup kernels
	$(PY) -m bench $(ARGS)

clean:
	rm -rf build csrc/*.so csrc/__pycache__ __pycache__ tests/__pycache__
