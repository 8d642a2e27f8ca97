"""
The optional C++/CUDA extension. `extension` is the loaded ops module, or None when the pure-PyTorch
versions in model.py and diffusion.py should run. Chosen once, here, by DIT_KERNELS=auto|on|off:
auto takes the extension when it is built (make kernels), on insists on it, off never loads it.
"""
import os
import sys

KERNELS = os.environ.get("DIT_KERNELS", "auto")


def _fail(message):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _load():
    if KERNELS not in ("auto", "on", "off"):
        _fail(f"DIT_KERNELS={KERNELS!r} is not one of auto, on, off")
    if KERNELS == "off":
        return None, "pure PyTorch (DIT_KERNELS=off)"
    try:
        from csrc import ops
    except (ImportError, OSError) as e:
        if KERNELS == "on":
            _fail(f"DIT_KERNELS=on but the csrc extension is not built or does not load ({e}); run make kernels")
        return None, "pure PyTorch (csrc extension not built: make kernels)"
    import torch  # loaded by ops already
    return ops, f"csrc extension (CPU kernels for {torch.backends.cpu.get_cpu_capability()})"


extension, KERNELS_PATH = _load()
