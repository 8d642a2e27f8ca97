"""
The csrc kernels against their references: model.attention_reference and diffusion's *_reference
formulas, and which path model.py and diffusion.py take for a tensor. Skipped as a whole when the extension
is not built (make kernels). Run from the repo root. The CUDA cases carry the cuda marker (pytest -m cuda,
which make gpu-check runs) and skip without a GPU or without CUDA kernels in the build.
"""
import functools
import itertools
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo root, for model, diffusion, csrc

# csrc.ops raises ImportError (not ModuleNotFoundError, which alone importorskip skips on by default) when
# the library is missing, and that must skip this file rather than stop the whole suite at collection
ops = pytest.importorskip("csrc.ops", reason="csrc extension not built (make kernels)", exc_type=ImportError)
import csrc  # noqa: E402
import diffusion  # noqa: E402
import model  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))
cuda_only = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
cuda_kernels = cuda_only + [pytest.mark.skipif(csrc.extension is None or "cuda" not in csrc._devices["q_sample"],
                                               reason="the extension was built without CUDA (make kernels)")]
devices = ["cpu", pytest.param("cuda", marks=cuda_kernels)]


def qkv(B, H, KV, N, D, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, heads, N, D, generator=g) for heads in (H, KV, KV))
    return [t.to(device, dtype).requires_grad_() for t in (q, k, v)]


def reference_with_grads(q, k, v, grad_out):
    """The reference output and gradients in float64, the ground truth for both dtypes."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = model.attention_reference(q64, k64, v64)
    return (out, *torch.autograd.grad(out, (q64, k64, v64), grad_out.double()))


def kernel_with_grads(q, k, v, grad_out):
    out = ops.attention(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


# -----------------------------------------------------------------------------
# attention values and gradients

# head sizes off the 8-float vector width (20, 33) take the padded paths of the CPU kernel; sequence
# lengths leave every kind of remainder of 8 columns (0 to 4), which the CPU kernel treats differently
shapes = list(itertools.product([1, 2, 11, 17, 64, 65, 100, 257], [16, 20, 33, 48, 64, 80, 128],
                                [(8, 2), (8, 8), (8, 1), (6, 3), (4, 4)]))


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("N, D, heads", shapes)
def test_attention_fp32_matches_reference(device, N, D, heads):
    H, KV = heads
    q, k, v = qkv(2, H, KV, N, D, device=device)
    grad_out = torch.randn_like(q)
    for got, want in zip(kernel_with_grads(q, k, v, grad_out), reference_with_grads(q, k, v, grad_out)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("N, D, heads", [(17, 48, (8, 2)), (65, 64, (6, 3)), (257, 128, (4, 4)), (1, 16, (8, 1))])
def test_attention_bf16_matches_reference(device, N, D, heads):
    H, KV = heads
    q, k, v = qkv(2, H, KV, N, D, dtype=torch.bfloat16, device=device)
    grad_out = torch.randn_like(q)
    got = kernel_with_grads(q, k, v, grad_out)
    assert all(t.dtype == torch.bfloat16 for t in got)
    # the reference sees the same bf16-rounded inputs; what is left is bf16 rounding of results
    for g, want in zip(got, reference_with_grads(q, k, v, grad_out)):
        torch.testing.assert_close(g.double(), want, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("device", devices)
def test_attention_accepts_non_contiguous_inputs(device):
    B, H, KV, N, D = 2, 8, 2, 33, 48
    qkv_flat = torch.randn(B, N, (H + 2 * KV) * D, device=device)  # as the model's qkv projection
    q, k, v = qkv_flat.split([H * D, KV * D, KV * D], dim=-1)
    q = q.view(B, N, H, D).transpose(1, 2)
    k = k.view(B, N, KV, D).transpose(1, 2)
    v = v.view(B, N, KV, D).transpose(1, 2)[..., ::1]
    assert not q.is_contiguous()
    torch.testing.assert_close(ops.attention(q, k, v), model.attention_reference(q, k, v), atol=1e-5, rtol=1e-5)
    strided = [t[:, :, ::2] for t in qkv(B, H, KV, 2 * N, D, device=device)]  # every other token
    torch.testing.assert_close(ops.attention(*strided), model.attention_reference(*strided), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("D", [20, 48])
def test_attention_gradients_with_non_contiguous_inputs_and_grad_out(device, D):
    # as in the DiT: q, k, v are views into one projection, and the gradient arrives through a transpose
    B, H, KV, N = 2, 8, 2, 33
    qkv_flat = torch.randn(B, N, (H + 2 * KV) * D, device=device, requires_grad=True)
    q, k, v = qkv_flat.split([H * D, KV * D, KV * D], dim=-1)
    q, k, v = (t.view(B, N, -1, D).transpose(1, 2) for t in (q, k, v))
    grad_out = torch.randn(B, N, H, D, device=device).transpose(1, 2)
    assert not grad_out.is_contiguous() and not q.is_contiguous()
    for got, want in zip(kernel_with_grads(q, k, v, grad_out), reference_with_grads(q, k, v, grad_out)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    strided_grad = torch.randn(B, H, N, 2 * D, device=device)[..., ::2]  # a column stride of 2
    for got, want in zip(kernel_with_grads(q, k, v, strided_grad), reference_with_grads(q, k, v, strided_grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_attention_gradient_matches_finite_differences():
    # fp32 only, so a directional derivative with a central difference; float64 is not supported
    q, k, v = qkv(1, 4, 2, 9, 16)
    directions = [torch.randn_like(t) for t in (q, k, v)]
    weight = torch.randn(1, 4, 9, 16)
    loss = (ops.attention(q, k, v) * weight).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    analytic = sum((g * d).sum() for g, d in zip(grads, directions))
    eps = 1e-2
    with torch.no_grad():
        plus = (ops.attention(*(t + eps * d for t, d in zip((q, k, v), directions))) * weight).sum()
        minus = (ops.attention(*(t - eps * d for t, d in zip((q, k, v), directions))) * weight).sum()
    torch.testing.assert_close(analytic, (plus - minus) / (2 * eps), atol=2e-2, rtol=2e-2)


def test_attention_returns_log_sum_exp():
    q, k, v = qkv(2, 8, 2, 17, 48)
    _, lse = torch.ops.dit_kernels.attention_forward(q, k, v)
    scores = (q * 48 ** -0.5).view(2, 2, 4, 17, 48) @ k.unsqueeze(2).transpose(-2, -1)
    torch.testing.assert_close(lse, scores.logsumexp(-1).reshape(2, 8, 17))


# -----------------------------------------------------------------------------
# the two CPU builds of the kernels: AVX2 (attention.cpp, noise_steps.cpp) and AVX-512 (kernels_avx512.cpp), chosen at run time
# by PyTorch's CPU capability, which ATEN_CPU_CAPABILITY overrides


def run_with_capability(capability, *pytest_args):
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


avx512_only = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                                 reason="this CPU runs only the AVX2 build, which every other test here covers")


@avx512_only
def test_avx2_build_passes_too():
    """The tests ran the AVX-512 build on this CPU; the AVX2 build runs them in a child process."""
    selected = "(attention or q_sample or sampler or noise) and not build"
    result = run_with_capability("avx2", __file__, "-x", "-k", selected)
    assert result.returncode == 0, result.stdout[-3000:]
    assert re.search(r"\b[1-9]\d* passed", result.stdout), result.stdout[-3000:]


@avx512_only
def test_the_two_builds_are_both_run(tmp_path):
    """Sums in 8- and 16-float vectors round differently: equal outputs would mean one build ran twice."""
    script = ("import sys, torch; sys.path.insert(0, '.'); from csrc import ops; g = torch.Generator().manual_seed(0);"
              "q, k, v = (torch.randn(2, h, 65, 48, generator=g) for h in (8, 2, 2));"
              "torch.save(ops.attention(q, k, v), sys.argv[1])")
    outs = []
    for capability in ("avx2", "avx512"):
        path = tmp_path / f"{capability}.pt"
        subprocess.run([sys.executable, "-c", script, str(path)], cwd=ROOT, check=True, timeout=300,
                       env={**os.environ, "ATEN_CPU_CAPABILITY": capability})
        outs.append(torch.load(path))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    assert not torch.equal(outs[0], outs[1])


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("objdump") is None,
                    reason="needs x86-64 and objdump")
def test_avx512_instructions_only_in_the_avx512_build():
    """An AVX-512 instruction anywhere else (an inline function from a header, kept by the linker from the
    AVX-512 file) would crash the library on AVX2 machines."""
    library = getattr(sys.modules.get("csrc._C"), "__file__", None)
    if library is None:
        pytest.skip("the extension was loaded by the JIT path, not built as csrc/_C")
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", library], capture_output=True,
                             text=True, check=True).stdout
    avx512 = re.compile(r"%zmm|%[xy]mm(1[6-9]|2\d|3[01])\b|%k[1-7]\b|\{1to\d+\}|vpternlog|vperm[it]2")
    function, offenders, avx512_functions = None, set(), set()
    for line in listing.splitlines():
        if m := re.match(r"^[0-9a-f]+ <(.*)>:$", line):
            function = m.group(1)
        elif function and avx512.search(line):
            (avx512_functions if "AVX512" in function else offenders).add(function)
    for kernel in ("forward_kernel", "backward_kernel", "q_sample_loop", "sampler_loop"):
        assert any(kernel in f for f in avx512_functions), f"no AVX-512 {kernel}: is kernels_avx512.cpp built?"
    assert not offenders, sorted(offenders)[:10]


# -----------------------------------------------------------------------------
# noise steps


# images per sample: a whole number of 16-float vectors, and odd counts that leave a remainder after the
# vectorised loop (a single element, 35, 3 x 17 x 17 = 867)
image_shapes = [(3, 8, 8), (1,), (1, 5, 7), (3, 17, 17)]


def noise_inputs(num_images, dtype=torch.float32, device="cpu", B=4, seed=0, shape=(3, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(B, *shape, generator=g).to(device, dtype) for _ in range(num_images)]
    process = diffusion.Diffusion(diffusion.get_beta_schedule("linear", 1000))
    t = torch.tensor([0, 10, 500, 999, 250][:B], device=device)
    return images, process, t


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("shape", image_shapes)
@pytest.mark.parametrize("B", [1, 5])
def test_q_sample_equals_reference(device, shape, B):
    (x0, noise), process, t = noise_inputs(2, device=device, B=B, shape=shape)
    coefs = process.coef("sqrt_alpha_bar", t), process.coef("sqrt_one_minus_alpha_bar", t)
    assert torch.equal(ops.q_sample(x0, noise, *coefs), diffusion.q_sample_reference(x0, noise, *coefs))


def sampler_coefs(name, process, t):
    recip = [process.coef("sqrt_recip_alpha_bar", t), process.coef("sqrt_recipm1_alpha_bar", t)]
    if name == "ddpm":
        sigma = process.coef("posterior_variance", t).sqrt() * (t > 0)
        return recip + [process.coef("posterior_mean_coef_x0", t), process.coef("posterior_mean_coef_xt", t), sigma]
    ab, ab_prev = process.coef("alpha_bar", t), process.coef("alpha_bar_prev", t)
    sigma = 0.5 * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()  # eta = 0.5, so every term counts
    return recip + [ab_prev.sqrt(), (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt(), sigma]


samplers = {"ddpm": (ops.ddpm_step, diffusion.ddpm_step_reference),
            "ddim": (ops.ddim_step, diffusion.ddim_step_reference)}


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("name", ["ddpm", "ddim"])
@pytest.mark.parametrize("shape", image_shapes)
def test_sampler_step_equals_reference(device, clip, name, shape):
    # same operations in the same order, no fused multiply-adds: bitwise equal in fp32
    images, process, t = noise_inputs(3, device=device, shape=shape)
    images[0] = images[0] * 3  # x_t: some predicted x0 fall outside [-1, 1], so clipping matters
    kernel, reference = samplers[name]
    coefs = sampler_coefs(name, process, t)
    got, want = kernel(*images, *coefs, clip), reference(*images, *coefs, clip)
    assert torch.equal(got, want), (got - want).abs().max()
    if clip:
        assert not torch.equal(got, reference(*images, *coefs, False))


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("name", ["q_sample", "ddpm", "ddim"])
@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 5, 7)])
def test_noise_steps_bf16_close_to_reference(device, name, shape):
    images, process, t = noise_inputs(3, dtype=torch.bfloat16, device=device, shape=shape)
    if name == "q_sample":
        args = images[:2] + [process.coef("sqrt_alpha_bar", t), process.coef("sqrt_one_minus_alpha_bar", t)]
        got, want = ops.q_sample(*args), diffusion.q_sample_reference(*(a.float() for a in args))
    else:
        kernel, reference = samplers[name]
        coefs = sampler_coefs(name, process, t)
        got, want = kernel(*images, *coefs, True), reference(*(x.float() for x in images), *coefs, True)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=1e-2)


def test_noise_steps_accept_non_contiguous_images():
    (x0, noise), process, t = noise_inputs(2)
    x0 = x0.transpose(2, 3)  # same shape class, other strides
    coefs = process.coef("sqrt_alpha_bar", t), process.coef("sqrt_one_minus_alpha_bar", t)
    assert torch.equal(ops.q_sample(x0, noise, *coefs), diffusion.q_sample_reference(x0, noise, *coefs))


# -----------------------------------------------------------------------------
# every input check fires with a message naming the argument

q, k, v = (torch.randn(2, h, 5, 16) for h in (4, 2, 2))
attention_errors = [
    ((q[0], k, v), r"q must be \(B, H, N, D\), got 3 dims"),
    ((q, k[0], v), r"k must be \(B, KV, N, D\), got 3 dims"),
    ((q, k, v[0]), r"v must be \(B, KV, N, D\), got 3 dims"),
    ((q.double(), k, v), r"q must be float32 or bfloat16, got Double"),
    ((q, k.bfloat16(), v), r"k must have q's dtype Float, got BFloat16"),
    ((q, k, v.half()), r"v must have q's dtype Float, got Half"),
    ((q, k[:, :, :4], v), r"k must be \(B, KV, N, D\) with q's B, N, D"),
    ((q, k[:1], v), r"k must be \(B, KV, N, D\) with q's B, N, D"),
    ((q, k, v[..., :8]), r"v must have k's shape"),
    ((q, torch.randn(2, 3, 5, 16), torch.randn(2, 3, 5, 16)), r"q's heads H=4 must be a multiple of k's heads KV=3"),
]


@pytest.mark.parametrize("args, message", attention_errors)
def test_attention_checks_inputs(args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.dit_kernels.attention_forward(*args)


def test_attention_backward_checks_inputs():
    out, lse = torch.ops.dit_kernels.attention_forward(q, k, v)
    backward = torch.ops.dit_kernels.attention_backward
    cases = [((out[:, :2], q, k, v, out, lse), r"grad_out must have q's shape"),
             ((out, q, k, v, out[..., :8], lse), r"out must have q's shape"),
             ((out.bfloat16(), q, k, v, out, lse), r"grad_out must have q's dtype Float, got BFloat16"),
             ((out, q, k, v, out, lse[..., :3]), r"lse must be \(B, H, N\)"),
             ((out, q, k, v, out, lse.double()), r"lse must be float32, got Double"),
             ((out, q, k[0], v, out, lse), r"k must be \(B, KV, N, D\), got 3 dims")]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            backward(*args)


x, c = torch.randn(2, 3, 4, 4), torch.rand(2)
noise_errors = [
    (ops.q_sample, (x[0, 0, 0, 0], x, c, c), r"x0 must be \(B, C, H, W\), got 0 dims"),
    (ops.q_sample, (x.double(), x.double(), c, c), r"x0 must be float32 or bfloat16, got Double"),
    (ops.q_sample, (x, x[:1], c, c), r"noise must have x0's shape"),
    (ops.q_sample, (x, x.bfloat16(), c, c), r"noise must have x0's dtype Float, got BFloat16"),
    (ops.q_sample, (x, x, c.double(), c), r"coef_x0 must be float32, got Double"),
    (ops.q_sample, (x, x, c, c[:1]), r"coef_noise must be \(B,\) with B=2"),
    (ops.ddpm_step, (x, x, x[..., :2], c, c, c, c, c, True), r"noise must have x_t's shape"),
    (ops.ddpm_step, (x, x.bfloat16(), x, c, c, c, c, c, True), r"eps must have x_t's dtype"),
    (ops.ddpm_step, (x, x, x, c[:, None], c, c, c, c, True), r"sqrt_recip_alpha_bar must be \(B,\)"),
    (ops.ddpm_step, (x, x, x, c, c.half(), c, c, c, True), r"sqrt_recipm1_alpha_bar must be float32"),
    (ops.ddpm_step, (x, x, x, c, c, c[:1], c, c, True), r"mean_coef_x0 must be \(B,\)"),
    (ops.ddpm_step, (x, x, x, c, c, c, c.double(), c, True), r"mean_coef_xt must be float32"),
    (ops.ddpm_step, (x, x, x, c, c, c, c, c[:1], True), r"sigma must be \(B,\)"),
    (ops.ddim_step, (x[0, 0, 0, 0], x, x, c, c, c, c, c, True), r"x_t must be \(B, C, H, W\), got 0 dims"),
    (ops.ddim_step, (x, x, x, c, c, c[:1], c, c, True), r"sqrt_alpha_bar_prev must be \(B,\)"),
    (ops.ddim_step, (x, x, x, c, c, c, c.double(), c, False), r"coef_eps must be float32"),
    (ops.ddim_step, (x, x, x, c, c, c, c, c.half(), False), r"sigma must be float32"),
]


@pytest.mark.parametrize("op, args, message", noise_errors)
def test_noise_steps_check_inputs(op, args, message):
    with pytest.raises(RuntimeError, match=message):
        op(*args)


@functools.partial(functools.reduce, lambda test, mark: mark(test), cuda_kernels)  # built with CUDA, on a GPU
def test_checks_name_the_device():
    qc, kc = q.cuda(), k.cuda()
    with pytest.raises(RuntimeError, match=r"k must be on q's device cuda:0, got cpu"):
        torch.ops.dit_kernels.attention_forward(qc, k, kc)
    with pytest.raises(RuntimeError, match=r"coef_x0 must be on the images' device"):
        ops.q_sample(x.cuda(), x.cuda(), c, c.cuda())


# -----------------------------------------------------------------------------
# registration: schemas, fake tensors, autograd, torch.compile tracing


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_attention(device, dtype):
    q, k, v = qkv(2, 4, 2, 9, 16, dtype=dtype, device=device)
    torch.library.opcheck(torch.ops.dit_kernels.attention_forward.default, (q, k, v))
    out, lse = torch.ops.dit_kernels.attention_forward(q, k, v)
    torch.library.opcheck(torch.ops.dit_kernels.attention_backward.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach()))


@pytest.mark.parametrize("device", devices)
def test_opcheck_noise_steps(device):
    (x0, noise, eps), process, t = noise_inputs(3, device=device)
    c5 = sampler_coefs("ddpm", process, t)
    torch.library.opcheck(torch.ops.dit_kernels.q_sample.default, (x0, noise, c5[0], c5[1]))
    for clip in (True, False):
        torch.library.opcheck(torch.ops.dit_kernels.ddpm_step.default, (x0, eps, noise, *c5, clip))
        torch.library.opcheck(torch.ops.dit_kernels.ddim_step.default, (x0, eps, noise, *c5, clip))


# -----------------------------------------------------------------------------
# a whole training step of a tiny DiT, with the kernels and with the reference


def dit_loss_and_grads(net, x0, y, t, noise):
    process = diffusion.Diffusion(diffusion.get_beta_schedule("linear", 1000))
    loss = process.training_losses(net, x0, y, t, noise)[0].mean()
    net.zero_grad()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("device", devices)
def test_dit_training_step_same_with_kernels(monkeypatch, device):
    torch.manual_seed(0)
    net = model.DiT(hidden_dim=96, depth=2, num_heads=4, num_kv_heads=2, conditioning="token", class_dropout=0.0)
    for p in net.parameters():  # adaLN-Zero and the zero output layer would leave most gradients zero
        torch.nn.init.normal_(p, std=0.05)
    net.to(device)
    x0, y = torch.randn(2, 3, 32, 32, device=device), torch.tensor([1, 7], device=device)
    t, noise = torch.tensor([10, 900], device=device), torch.randn(2, 3, 32, 32, device=device)
    monkeypatch.setattr(csrc, "ATTENTION", "fused")
    loss, grads = dit_loss_and_grads(net, x0, y, t, noise)
    monkeypatch.setattr(csrc, "ATTENTION", "reference")
    monkeypatch.setattr(csrc, "extension", None)  # the noise steps too
    ref_loss, ref_grads = dit_loss_and_grads(net, x0, y, t, noise)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


# -----------------------------------------------------------------------------
# which path a tensor takes: the fused op only where the build has a kernel for its device and dtype


def test_supports_follows_the_dispatcher():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():  # a CUDA tensor's device and dtype, without a GPU
        tensors = {device: torch.empty(2, 3, device=device) for device in ("cpu", "cuda")}
    for op in csrc.OPS:
        for device, key in (("cpu", "CPU"), ("cuda", "CUDA")):
            registered = torch._C._dispatch_has_kernel_for_dispatch_key(f"dit_kernels::{op}", key)
            assert csrc.supports(op, tensors[device]) == registered, (op, device)
        assert csrc.supports(op, tensors["cpu"].bfloat16())
        assert not csrc.supports(op, tensors["cpu"].half()) and not csrc.supports(op, tensors["cpu"].double())
        assert not csrc.supports(op, torch.empty(2, device="meta"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_noise_steps_fall_back_for_dtypes_the_kernels_do_not_take(dtype):
    images, process, t = noise_inputs(3, dtype=dtype)
    coefs = sampler_coefs("ddim", process, t)
    q_args = images[:2] + coefs[:2]
    assert torch.equal(diffusion.q_sample_op(*q_args), diffusion.q_sample_reference(*q_args))
    assert torch.equal(diffusion.ddpm_step(*images, *coefs, True), diffusion.ddpm_step_reference(*images, *coefs, True))
    assert torch.equal(diffusion.ddim_step(*images, *coefs, True), diffusion.ddim_step_reference(*images, *coefs, True))
    q, k, v = (t.detach().to(dtype) for t in qkv(2, 4, 2, 9, 16))
    torch.testing.assert_close(model.attention(q, k, v), model.attention_reference(q, k, v), atol=1e-3, rtol=1e-3)


def test_meta_tensors_take_the_pytorch_path():
    x, c = torch.empty(2, 3, 4, 4, device="meta"), torch.empty(2, device="meta")
    assert diffusion.ddim_step(x, x, x, c, c, c, c, c, True).device.type == "meta"
    q, k = torch.empty(2, 4, 9, 16, device="meta"), torch.empty(2, 2, 9, 16, device="meta")
    assert model.attention(q, k, k).shape == q.shape


def test_cuda_tensors_skip_a_build_without_cuda_kernels(monkeypatch):
    """DIT_KERNELS=auto on a GPU machine with an extension built without CUDA (a login node's build, or no
    matching toolkit): CUDA tensors must take the PyTorch path, not reach the dispatcher, which has no
    kernel for them. Fake CUDA tensors stand in for real ones; the stub raises as the dispatcher would."""
    if "cuda" in csrc._devices["q_sample"]:
        pytest.skip("this build has CUDA kernels")
    from torch._subclasses.fake_tensor import FakeTensorMode

    def no_cuda_kernel(*args):
        raise NotImplementedError("Could not run this op with arguments from the 'CUDA' backend")

    stub = SimpleNamespace(attention=no_cuda_kernel, q_sample=no_cuda_kernel, ddpm_step=no_cuda_kernel,
                           ddim_step=no_cuda_kernel)
    monkeypatch.setattr(csrc, "extension", stub)
    monkeypatch.setattr(diffusion, "_C", stub)
    with FakeTensorMode():
        x, c = torch.empty(2, 3, 4, 4, device="cuda"), torch.empty(2, device="cuda")
        assert diffusion.q_sample_op(x, x, c, c).device.type == "cuda"
        assert diffusion.ddpm_step(x, x, x, c, c, c, c, c, True).device.type == "cuda"
        assert diffusion.ddim_step(x, x, x, c, c, c, c, c, True).device.type == "cuda"
        q, k = torch.empty(2, 4, 9, 16, device="cuda"), torch.empty(2, 2, 9, 16, device="cuda")
        assert model.attention(q, k, k).device.type == "cuda"


def test_attention_auto_is_fused_on_cpu_and_sdpa_on_cuda():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        cpu, cuda = torch.empty(1, 2, 3, 8), torch.empty(1, 2, 3, 8, device="cuda")
    assert csrc.attention_path(cpu) == "fused"  # measured faster than SDPA on CPU (BENCHMARKS.md)
    assert csrc.attention_path(cuda) == "sdpa"  # not (yet) on CUDA, so SDPA's flash / cuDNN kernels
    assert csrc.attention_path(cpu.half()) == "sdpa"


@pytest.mark.parametrize("choice", ["fused", "sdpa", "reference"])
def test_dit_attention_chooses_the_path(choice):
    """DIT_ATTENTION overrides auto; every path gives the reference's numbers."""
    script = ("import sys, torch; sys.path.insert(0, '.'); import csrc, model; q, k, v = (torch.randn(2, h, 9, 16) "
              "for h in (4, 2, 2)); print(csrc.attention_path(q), csrc.KERNELS_PATH); "
              "torch.testing.assert_close(model.attention(q, k, v), model.attention_reference(q, k, v))")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "DIT_ATTENTION": choice})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"{choice} ") and f"attention: {choice}" in result.stdout


@pytest.mark.skipif(os.environ.get("DIT_CUDA") != "1", reason="only for a build made with DIT_CUDA=1 (CI)")
def test_cuda_build_registers_the_cuda_kernels():
    """CI builds with DIT_CUDA=1 on a machine without a GPU: the library must have linked, loaded and
    registered a CUDA kernel of every op."""
    assert all("cuda" in csrc._devices[op] for op in csrc.OPS), csrc._devices


# -----------------------------------------------------------------------------
# the samplers on CUDA, with the CUDA kernels against the PyTorch path


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", devices)
def test_samplers_same_with_kernels(monkeypatch, device, dtype, sampler):
    torch.manual_seed(0)
    net = model.DiT(hidden_dim=64, depth=2, num_heads=4, num_kv_heads=2, class_dropout=0.0).to(device).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    process = diffusion.Diffusion(diffusion.get_beta_schedule("linear", 1000)).respace(10)
    y = torch.tensor([0, 3, 9], device=device)

    def draw():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            return process.sample(net, (3, 3, 32, 32), y, sampler=sampler, guidance_scale=2.0, null_class=10,
                                  generator=torch.Generator(device).manual_seed(0))

    monkeypatch.setattr(csrc, "ATTENTION", "fused")
    fused = draw()
    monkeypatch.setattr(csrc, "ATTENTION", "reference")
    monkeypatch.setattr(csrc, "extension", None)
    reference = draw()
    assert fused.shape == (3, 3, 32, 32) and torch.isfinite(fused).all()
    if dtype == torch.float32:
        torch.testing.assert_close(fused, reference, atol=1e-4, rtol=1e-4)
    else:  # the two attentions round differently in bf16, and ten steps carry a rare pixel further apart
        assert (fused - reference).abs().mean() < 1e-2, (fused - reference).abs().mean()
