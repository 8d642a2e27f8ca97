"""
The csrc kernels against what they replace, side by side in one run: fused attention vs
F.scaled_dot_product_attention vs model.attention_reference, the fused noise steps vs eager PyTorch,
and a whole default-DiT training step with and without the extension. Prints markdown tables.

    .venv/bin/python -m bench kernels            # about 3 minutes on 2 cores

Times are the minimum over repeats, and the contenders of one table row take turns inside each repeat,
so a busy machine slows them alike and the ratios stay fair.
"""
import torch
import torch.nn.functional as F

import csrc
import diffusion
import model
from bench.common import cpu_name, matmul_gflops, race
from csrc import ops
from train_ddp import make_optimizer

torch.manual_seed(0)


# -----------------------------------------------------------------------------
# the machine

print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
peak_gflops = matmul_gflops(torch.float32)
print(f"fp32 matmul 1024^3: {peak_gflops:.0f} GFLOP/s (the machine's practical peak)\n")

# -----------------------------------------------------------------------------
# attention


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def forward_backward(fn, q, k, v, grad_out):
    return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out)


def forward_only(fn, q, k, v):
    def run():
        with torch.no_grad():
            fn(q, k, v)
    return run


def verdict(device, fused_wins):
    """The line that says whether csrc.FUSED_ATTENTION_WINS (what DIT_ATTENTION=auto does) agrees with the table."""
    listed = device in csrc.FUSED_ATTENTION_WINS
    agree = "agrees" if listed == fused_wins else "DISAGREES: update csrc.FUSED_ATTENTION_WINS and BENCHMARKS.md"
    return (f"{device}: the fused attention {'beats' if fused_wins else 'does not beat'} SDPA forward+backward at "
            f"the 384 x 12 DiT's shape; auto uses {'fused' if listed else 'SDPA'} there, which {agree}\n")


shapes = [(64, 8, 2, 65, 48, "DiT 384x12 (token conditioning)"),
          (16, 4, 4, 256, 32, "UNet 16x16 attention"),
          (8, 8, 2, 257, 128, "long, wide heads")]
contenders = [("fused", ops.attention), ("SDPA", sdpa), ("reference", model.attention_reference)]
print("| shape B,H,KV,N,D | pass | fused ms | SDPA ms | eager ref ms | fused vs SDPA | fused GFLOP/s |")
print("|---|---|---|---|---|---|---|")
for B, H, KV, N, D, label in shapes:
    q = torch.randn(B, H, N, D, requires_grad=True)
    k, v = (torch.randn(B, KV, N, D, requires_grad=True) for _ in range(2))
    grad_out = torch.randn(B, H, N, D)
    flops = 4 * B * H * N * N * D  # two matmuls of the forward; the backward counts twice that
    repeats = 10 if B * H * N * N * D < 3e8 else 5
    for pass_name, make, pass_flops in (("fwd", lambda fn: forward_only(fn, q, k, v), flops),
                                        ("fwd+bwd", lambda fn: forward_backward(fn, q, k, v, grad_out), 3 * flops)):
        times = race([make(fn) for _, fn in contenders], repeats)
        print(f"| {B},{H},{KV},{N},{D} ({label}) | {pass_name} | {times[0]:.2f} | {times[1]:.2f} | {times[2]:.2f} "
              f"| {times[1] / times[0]:.2f}x | {pass_flops / times[0] / 1e6:.0f} |")
        if (B, H, KV, N, D, label) == shapes[0] and pass_name == "fwd+bwd":
            default_fwd_bwd = times
print(f"\n(GFLOP/s: 4*B*H*N^2*D for the forward, 3x that for forward+backward; matmul peak {peak_gflops:.0f})\n")
print(verdict("cpu", default_fwd_bwd[0] < default_fwd_bwd[1]))

# -----------------------------------------------------------------------------
# noise steps on a batch of CIFAR-sized images

B = 128
x, eps, noise = (torch.randn(B, 3, 32, 32) for _ in range(3))
process = diffusion.Diffusion(diffusion.get_beta_schedule("linear", 1000))
t = torch.randint(0, 1000, (B,))
q_coefs = process.coef("sqrt_alpha_bar", t), process.coef("sqrt_one_minus_alpha_bar", t)
recip = [process.coef("sqrt_recip_alpha_bar", t), process.coef("sqrt_recipm1_alpha_bar", t)]
ddpm_coefs = recip + [process.coef("posterior_mean_coef_x0", t), process.coef("posterior_mean_coef_xt", t),
                      process.coef("posterior_variance", t).sqrt()]
ab, ab_prev = process.coef("alpha_bar", t), process.coef("alpha_bar_prev", t)
ddim_coefs = recip + [ab_prev.sqrt(), (1 - ab_prev).sqrt(), torch.zeros(B)]
# the ceiling on the speedup: a one-op PyTorch kernel that reads as many images and writes one, as the fused
# step does. On a memory-bound pass no fused kernel beats it, so eager / that op is the most fusion can give
steps = [("q_sample", ops.q_sample, diffusion.q_sample_reference, (x, noise, *q_coefs), lambda: torch.add(x, noise)),
         ("ddpm_step (clip)", ops.ddpm_step, diffusion.ddpm_step_reference, (x, eps, noise, *ddpm_coefs, True),
          lambda: torch.addcmul(x, eps, noise)),
         ("ddim_step (clip)", ops.ddim_step, diffusion.ddim_step_reference, (x, eps, noise, *ddim_coefs, True),
          lambda: torch.addcmul(x, eps, noise))]
# also on one thread: these are ~0.1 ms passes over memory, where waking a second OpenMP thread on a
# busy machine can cost more than the work
threads = torch.get_num_threads()
print(f"| noise step on ({B}, 3, 32, 32) fp32 | threads | fused ms | eager ms | speedup "
      "| same-traffic op ms (add / addcmul) | speedup ceiling |")
print("|---|---|---|---|---|---|---|")
for num_threads in sorted({1, threads}):
    torch.set_num_threads(num_threads)
    for name, fused, eager, args, same_traffic in steps:
        fused_ms, eager_ms, bound_ms = race([lambda: fused(*args), lambda: eager(*args), same_traffic],
                                            repeats=50, warmup=3)
        print(f"| {name} | {num_threads} | {fused_ms:.3f} | {eager_ms:.3f} | {eager_ms / fused_ms:.1f}x "
              f"| {bound_ms:.3f} | {eager_ms / bound_ms:.1f}x |")
torch.set_num_threads(threads)
print()

# -----------------------------------------------------------------------------
# a whole training step of the 384 x 12 token DiT: forward, backward, AdamW


def training_step(net, optimizer, use_kernels):
    csrc.extension, csrc.ATTENTION = (ops, "fused") if use_kernels else (None, "reference")
    x0, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    loss = process.training_losses(net, x0, y)[0].mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


saved = csrc.extension, csrc.ATTENTION
net = model.DiT(conditioning="token")
optimizer = make_optimizer(net, lr=1e-4)
with_ms, without_ms = race([lambda: training_step(net, optimizer, True), lambda: training_step(net, optimizer, False)],
                           repeats=3)
csrc.extension, csrc.ATTENTION = saved
params = sum(p.numel() for p in net.parameters()) / 1e6
print(f"| DiT training step (token, 384 x 12, 8/2 heads, {params:.1f}M params, batch 64, AdamW) | ms |")
print("|---|---|")
print(f"| with the extension | {with_ms:.0f} |")
print(f"| pure PyTorch (model.attention_reference, eager noise) | {without_ms:.0f} |")
print(f"| speedup | {without_ms / with_ms:.2f}x |\n")

# -----------------------------------------------------------------------------
# CUDA, when there is a GPU: the measurement behind csrc.FUSED_ATTENTION_WINS, at the model's shapes in bf16


if torch.cuda.is_available() and csrc.supports("attention_forward", torch.empty(1, device="cuda")):
    print(f"GPU: {torch.cuda.get_device_name()}")
    print("| shape B,H,KV,N,D bf16 | pass | fused ms | SDPA ms | fused vs SDPA |")
    print("|---|---|---|---|---|")
    gpu_shapes = [(256, *shapes[0][1:])] + shapes  # first the 384 x 12 DiT at a GPU's batch of 256
    for B, H, KV, N, D, label in gpu_shapes:
        q = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(B, KV, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        grad_out = torch.randn_like(q)
        for pass_name, make in (("fwd", lambda fn: forward_only(fn, q, k, v)),
                                ("fwd+bwd", lambda fn: forward_backward(fn, q, k, v, grad_out))):
            times = race([make(ops.attention), make(sdpa)], repeats=20, warmup=3, sync=torch.cuda.synchronize)
            print(f"| {B},{H},{KV},{N},{D} ({label}) | {pass_name} | {times[0]:.3f} | {times[1]:.3f} "
                  f"| {times[1] / times[0]:.2f}x |")
            if (B, H, KV, N, D, label) == gpu_shapes[0] and pass_name == "fwd+bwd":
                default_fwd_bwd = times
    print()
    print(verdict("cuda", default_fwd_bwd[0] < default_fwd_bwd[1]))
elif torch.cuda.is_available():
    print("(a GPU but no CUDA kernels in this build: make kernels with a CUDA toolkit matching torch's)\n")
