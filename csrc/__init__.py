"""
The optional C++/CUDA extension, and which path each op takes. Decided here, once:

  DIT_KERNELS=auto|on|off    auto loads the extension when it is built (make kernels), on insists on it,
                             off never loads it. `extension` is the loaded ops module, or None.
  DIT_ATTENTION=auto|fused|sdpa|reference
                             the attention of model.attention. auto takes the fused kernel where it is built
                             for the tensor's device and dtype and was measured to beat PyTorch's
                             F.scaled_dot_product_attention there (FUSED_ATTENTION_WINS), SDPA elsewhere;
                             reference is model.attention_reference, the plain formula the tests trust.

A built extension need not have a kernel for every tensor: a CPU-only build (a login node, a machine
without a matching CUDA toolkit) has none for CUDA tensors, and no kernel takes float16 or float64.
supports(op, x) says whether it has one; model.py and diffusion.py run their PyTorch versions when not.
"""
import os
import sys

import torch

KERNELS = os.environ.get("DIT_KERNELS", "auto")
ATTENTION = os.environ.get("DIT_ATTENTION", "auto")
# device kinds where the fused attention beat SDPA at the model's shapes (BENCHMARKS.md, python -m bench kernels):
# on CPU it does, forward and backward; on CUDA the hand-written kernel (scalar fp32 on 16x16
# tiles) has not been measured faster than SDPA's flash and cuDNN kernels, so auto leaves CUDA to SDPA
FUSED_ATTENTION_WINS = {"cpu"}
OPS = ("attention_forward", "attention_backward", "q_sample", "ddpm_step", "ddim_step")
DTYPES = (torch.float32, torch.bfloat16)  # what every kernel takes (the C++ checks name the same two)


def _fail(message):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _load():
    if KERNELS not in ("auto", "on", "off"):
        _fail(f"DIT_KERNELS={KERNELS!r} is not one of auto, on, off")
    if ATTENTION not in ("auto", "fused", "sdpa", "reference"):
        _fail(f"DIT_ATTENTION={ATTENTION!r} is not one of auto, fused, sdpa, reference")
    if KERNELS == "off":
        if ATTENTION == "fused":
            _fail("DIT_ATTENTION=fused needs the csrc extension, but DIT_KERNELS=off")
        return None, {}, "pure PyTorch (DIT_KERNELS=off)"
    try:
        from csrc import ops
    except (ImportError, OSError) as e:
        if KERNELS == "on" or ATTENTION == "fused":
            _fail(f"DIT_KERNELS={KERNELS} DIT_ATTENTION={ATTENTION} but the csrc extension is not built or does not "
                  f"load ({e}); run make kernels")
        return None, {}, "pure PyTorch (csrc extension not built: make kernels)"
    except ValueError as e:  # a bad DIT_CUDA for the JIT build
        _fail(str(e))
    # what the loaded library registered, asked of the dispatcher once (it does not change after loading)
    devices = {op: {device for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
                    if torch._C._dispatch_has_kernel_for_dispatch_key(f"dit_kernels::{op}", key)} for op in OPS}
    cuda = "CUDA kernels" if "cuda" in devices["attention_forward"] else "no CUDA kernels (built without CUDA)"
    return ops, devices, f"csrc extension (CPU kernels for {torch.backends.cpu.get_cpu_capability()}, {cuda})"


def supports(op, x):
    """True when the extension has a kernel of op (one of OPS) for x's device and dtype."""
    return extension is not None and x.device.type in _devices.get(op, ()) and x.dtype in DTYPES


def attention_path(q):
    """Which attention model.attention runs on q: fused, sdpa or reference."""
    if ATTENTION != "auto":
        return ATTENTION
    return "fused" if q.device.type in FUSED_ATTENTION_WINS and supports("attention_forward", q) else "sdpa"


extension, _devices, _path = _load()
_fused_on = sorted(FUSED_ATTENTION_WINS & _devices.get("attention_forward", set()))
KERNELS_PATH = f"{_path} | attention: " + (
    ATTENTION if ATTENTION != "auto" else "".join(f"fused on {d}, " for d in _fused_on) + "SDPA elsewhere")
