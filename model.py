"""
The two noise predictors: a Diffusion Transformer (DiT) with grouped-query attention, and a small
improved-diffusion-style UNet for the CPU recipe. Both map (x_t, t, y) -> predicted noise, shaped like x_t,
and both reserve class index num_classes as the "null" class of classifier-free guidance.
"""
import functools
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import csrc

# -----------------------------------------------------------------------------
# precision: the one choice of autocast dtype, for training and sampling alike


def autocast_dtype_for(precision, device):
    """training.precision or sampling.precision as an autocast dtype, None for fp32. auto is bf16 on CUDA, and on
    a CPU only where bf16 matmuls outrun fp32 ones: on a CPU with AMX a bf16 step is several times faster, on one
    without native bf16 many times slower (BENCHMARKS.md), so a short matmul race decides. The race's ratio
    depends on the matmul's size, hence 512^3 and a threshold well inside the gap between the two kinds of CPU.
    A resumed run decides again."""
    if precision == "auto" and device.type == "cpu":
        return torch.bfloat16 if bf16_matmul_speedup() >= 1.2 else None
    return torch.bfloat16 if precision in ("auto", "bf16") else None


@functools.cache  # once a process: every grid and every evaluated cell asks again
def bf16_matmul_speedup(n=512, repeats=5):
    """fp32 time over bf16 time of an n^3 matmul on the CPU, each the best of interleaved runs (the slow first
    ones, where oneDNN compiles its kernels, lose to the later ones)."""
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0))  # not the global generator: resumes stay exact
    operands = [(a, a), (a.bfloat16(), a.bfloat16())]
    best = [float("inf")] * 2
    for _ in range(repeats):
        for i, (x, y) in enumerate(operands):
            start = time.perf_counter()
            x @ y
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0] / best[1]


# -----------------------------------------------------------------------------
# attention: the one call site of the fused kernel; csrc.attention_path chooses (DIT_ATTENTION)


def attention_reference(q, k, v):
    """Grouped-query attention in plain PyTorch. q (B, H, N, D); k, v (B, KV, N, D); H a multiple of KV.
    Query heads h*G .. h*G+G-1 share key/value head h, so K and V are broadcast, never repeated."""
    B, H, N, D = q.shape
    KV = k.shape[1]
    q = q.view(B, KV, H // KV, N, D)  # (B, KV, G, N, D)
    scores = (q * D ** -0.5) @ k.unsqueeze(2).transpose(-2, -1)  # (B, KV, G, N, N)
    out = scores.softmax(dim=-1) @ v.unsqueeze(2)  # (B, KV, G, N, D)
    return out.reshape(B, H, N, D)


def attention(q, k, v):
    path = csrc.attention_path(q)
    if path == "fused":
        return csrc.extension.attention(q, k, v)
    if path == "sdpa":  # flash / cuDNN / memory-efficient kernels where they apply, PyTorch's math elsewhere
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return attention_reference(q, k, v)


# -----------------------------------------------------------------------------
# embeddings shared by both models


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps t (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ConditionEmbedding(nn.Module):
    """Time through a sinusoid and an MLP, plus a class vector; index num_classes is the null class.
    During training, labels are replaced by the null class with probability class_dropout, which is what
    lets one model give both the conditional and the unconditional prediction for guidance."""

    def __init__(self, dim, num_classes, class_dropout, frequency_dim=256):
        super().__init__()
        self.num_classes, self.class_dropout, self.frequency_dim = num_classes, class_dropout, frequency_dim
        self.time_mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.class_embed = nn.Embedding(num_classes + 1, dim)

    def forward(self, t, y):
        if self.training and self.class_dropout > 0:
            drop = torch.rand(y.shape, device=y.device) < self.class_dropout
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.time_mlp(timestep_embedding(t, self.frequency_dim)) + self.class_embed(y)


def sincos_2d(dim, grid_size):
    """Fixed 2-D sin-cos position table (grid_size**2, dim): half the channels encode rows, half columns."""
    coords = torch.arange(grid_size, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    parts = []
    for pos in (rows.flatten(), cols.flatten()):
        args = pos[:, None] * omega[None]
        parts += [torch.sin(args), torch.cos(args)]
    return torch.cat(parts, dim=1)


# -----------------------------------------------------------------------------
# DiT


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def patchify(x, p):
    """(B, C, H, W) -> (B, H/p * W/p, p*p*C): patches row by row, each flattened as (row, column, channel).
    The strided convolution of DiT.patch_embed reads its patches in this order (tests/test_model.py)."""
    B, C, H, W = x.shape
    x = x.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, H/p, W/p, p, p, C)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(tokens, p, H, W):
    """The inverse of patchify: (B, H/p * W/p, p*p*C) -> (B, C, H, W)."""
    B, N, D = tokens.shape
    C = D // (p * p)
    x = tokens.view(B, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, H/p, p, W/p, p)
    return x.reshape(B, C, H, W)


class SelfAttention(nn.Module):
    def __init__(self, dim, num_heads, num_kv_heads):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, dim // num_heads
        self.qkv = nn.Linear(dim, (num_heads + 2 * num_kv_heads) * self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        H, KV, D = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * D, KV * D, KV * D], dim=-1)
        q = q.view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
        k = k.view(B, N, KV, D).transpose(1, 2)  # (B, KV, N, D)
        v = v.view(B, N, KV, D).transpose(1, 2)  # (B, KV, N, D)
        out = attention(q, k, v)  # (B, H, N, D)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class TokenConv(nn.Module):
    """A depthwise 3x3 convolution over the grid of patch tokens (B, N, C), leaving a leading condition token
    as it is: the locality a convolution has and attention lacks (LocalViT, U-DiT), at C * 9 weights.
    Initialised as the identity, so a block that gains it starts as the block without it."""

    def __init__(self, channels, grid):
        super().__init__()
        self.grid = grid
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        nn.init.dirac_(self.conv.weight, groups=channels)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x):
        B, N, C = x.shape
        extra = N - self.grid ** 2
        # (B, N, C) is the memory of a channels-last image, so neither permute copies
        image = x[:, extra:].reshape(B, self.grid, self.grid, C).permute(0, 3, 1, 2)
        out = self.conv(image).permute(0, 2, 3, 1).reshape(B, self.grid ** 2, C)
        return torch.cat([x[:, :extra], out], dim=1) if extra else out


def halve_token_grid(x, grid):
    """(B, g*g, C) -> (B, g*g/4, 4C): each 2x2 square of tokens becomes one token (pixel unshuffle)."""
    B, N, C = x.shape
    image = x.reshape(B, grid, grid, C).permute(0, 3, 1, 2)
    return F.pixel_unshuffle(image, 2).flatten(2).transpose(1, 2)


def double_token_grid(x, grid):
    """The inverse of halve_token_grid: (B, g*g/4, 4C) -> (B, g*g, C), grid being the full grid g."""
    B, N, C4 = x.shape
    image = x.transpose(1, 2).reshape(B, C4, grid // 2, grid // 2)
    return F.pixel_shuffle(image, 2).flatten(2).transpose(1, 2)


class Block(nn.Module):
    """Pre-norm transformer block. With adaLN the conditioning vector c sets a shift, scale and gate for
    each half; without it (token conditioning) c has already been prepended as a token and is ignored.
    skip_in: a long skip arrives here (U-ViT); the block first merges it, concatenated, back to the width.
    mlp_conv_grid: with mlp_conv, the token grid the MLP's depthwise convolution runs over (0: none)."""

    def __init__(self, dim, num_heads, num_kv_heads, mlp_ratio, dropout, adaln, skip_in=False, mlp_conv_grid=0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=not adaln, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads, num_kv_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=not adaln, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        local = [TokenConv(hidden, mlp_conv_grid)] if mlp_conv_grid else []
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), *local, nn.GELU(approximate="tanh"), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim))
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim)) if adaln else None
        self.skip_linear = nn.Linear(2 * dim, dim) if skip_in else None

    def forward(self, x, c, skip=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        if self.adaln is None:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(c).unsqueeze(1).chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


STEM_CHANNELS = 32  # the conv stem's width: two 3x3 convolutions at full resolution cost about a tenth of a small DiT


class DiT(nn.Module):
    """The options after pos_embed add the locality of a convolution network, each off by default:
    skip: U-ViT's long skips, block i feeding block depth-1-i (an odd depth leaves a middle block unpaired);
    final_conv: a 3x3 convolution on the unpatchified output, which sees across the patch borders (U-ViT);
    stem: "patch", the DiT paper's strided patch embedding, or "conv", two 3x3 convolutions at full
    resolution before it (Xiao et al. 2021, "Early convolutions help transformers see better");
    mlp_conv: a depthwise 3x3 convolution over the token grid inside each MLP (LocalViT, U-DiT);
    downsample: U-DiT's U shape, where the middle third of the blocks works on the token grid halved each way
    (each 2x2 square of tokens merged into one), at a quarter of their cost, and adds its result back to the
    full grid it started from.
    Each starts as the identity, so a new model is still the identity through its blocks and predicts zeros."""

    def __init__(self, image_size=32, image_channels=3, num_classes=10, patch_size=4, hidden_dim=384, depth=12,
                 num_heads=8, num_kv_heads=2, mlp_ratio=4.0, conditioning="adaln", pos_embed="sincos",
                 class_dropout=0.1, dropout=0.0, skip=False, final_conv=False, stem="patch", mlp_conv=False,
                 downsample=False):
        super().__init__()
        self.image_channels, self.patch_size, self.num_classes = image_channels, patch_size, num_classes
        self.grid = image_size // patch_size
        self.adaln = conditioning == "adaln"
        self.extra_tokens = 0 if self.adaln else 1  # token mode: one extra condition token first
        num_tokens = self.grid ** 2 + self.extra_tokens
        if stem == "conv":
            self.stem = nn.Sequential(nn.Conv2d(image_channels, STEM_CHANNELS, 3, padding=1), nn.GELU(approximate="tanh"),
                                      nn.Conv2d(STEM_CHANNELS, STEM_CHANNELS, 3, padding=1), nn.GELU(approximate="tanh"))
        else:
            self.stem = None
        patch_in = STEM_CHANNELS if stem == "conv" else image_channels
        self.patch_embed = nn.Conv2d(patch_in, hidden_dim, patch_size, stride=patch_size)
        self.cond_embed = ConditionEmbedding(hidden_dim, num_classes, class_dropout)
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, hidden_dim))
        else:
            table = sincos_2d(hidden_dim, self.grid)
            if not self.adaln:
                table = torch.cat([torch.zeros(1, hidden_dim), table])  # the condition token is told apart by content
            self.register_buffer("pos_embed", table[None], persistent=False)
        # with skips, block i's output also feeds block depth-1-i: the out half is the blocks past the middle
        self.num_skips = depth // 2 if skip else 0
        # with downsample, blocks [down_from, down_to) see the halved grid; the range is symmetric about the
        # middle, so a long skip always joins two blocks on the same grid
        self.down_from, self.down_to = (depth // 3, depth - depth // 3) if downsample else (depth, depth)
        self.down = nn.Linear(4 * hidden_dim, hidden_dim) if downsample else None
        self.up = nn.Linear(hidden_dim, 4 * hidden_dim) if downsample else None
        grids = [self.grid // 2 if self.down_from <= i < self.down_to else self.grid for i in range(depth)]
        self.blocks = nn.ModuleList(Block(hidden_dim, num_heads, num_kv_heads, mlp_ratio, dropout, self.adaln,
                                          skip_in=i >= depth - self.num_skips,
                                          mlp_conv_grid=grids[i] if mlp_conv else 0)
                                    for i in range(depth))
        self.final_norm = nn.LayerNorm(hidden_dim, elementwise_affine=not self.adaln, eps=1e-6)
        self.final_adaln = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, 2 * hidden_dim)) if self.adaln else None
        self.final_linear = nn.Linear(hidden_dim, patch_size * patch_size * image_channels)
        self.final_conv = nn.Conv2d(image_channels, image_channels, 3, padding=1) if final_conv else None
        self.initialize_weights()

    def initialize_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like a linear layer over the flattened patch
        nn.init.zeros_(self.patch_embed.bias)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cond_embed.class_embed.weight, std=0.02)
        for layer in (self.cond_embed.time_mlp[0], self.cond_embed.time_mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        # adaLN-Zero: zero modulation makes every block start as the identity, and a zero output layer
        # makes a new model predict zeros, which the DiT paper found trains best
        for module in [block.adaln for block in self.blocks] + [self.final_adaln]:
            if module is not None:
                nn.init.zeros_(module[-1].weight)
                nn.init.zeros_(module[-1].bias)
        nn.init.zeros_(self.final_linear.weight)
        nn.init.zeros_(self.final_linear.bias)
        # the options start as the identity: a skip merge passes its block's own input on and ignores the
        # skip, the output convolution passes each pixel through; neither starts at zero, which would leave it
        # and the zero layer before it without a gradient
        for block in self.blocks:
            if block.skip_linear is not None:
                weight = block.skip_linear.weight.data
                weight.zero_()
                weight[:, :weight.shape[0]] = torch.eye(weight.shape[0])
        if self.final_conv is not None:
            nn.init.dirac_(self.final_conv.weight)
            nn.init.zeros_(self.final_conv.bias)
        if self.up is not None:  # the halved grid's result is added to the full grid: zero adds nothing
            nn.init.zeros_(self.up.weight)

    def forward(self, x, t, y):
        H, W = x.shape[-2:]
        if self.stem is not None:
            x = self.stem(x)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, g*g, hidden)
        c = self.cond_embed(t, y)  # (B, hidden)
        if not self.adaln:
            tokens = torch.cat([c[:, None], tokens], dim=1)  # (B, 1 + g*g, hidden)
        tokens = tokens + self.pos_embed
        skips = []
        e = self.extra_tokens
        for i, block in enumerate(self.blocks):
            if i == self.down_from:
                full = tokens
                tokens = torch.cat([tokens[:, :e], self.down(halve_token_grid(tokens[:, e:], self.grid))], dim=1)
            skip = skips.pop() if block.skip_linear is not None else None
            tokens = block(tokens, c, skip)
            if i < self.num_skips:
                skips.append(tokens)
            if i == self.down_to - 1 and self.down is not None:
                tokens = torch.cat([tokens[:, :e], full[:, e:] + double_token_grid(self.up(tokens[:, e:]), self.grid)],
                                   dim=1)
        if self.adaln:
            shift, scale = self.final_adaln(c).unsqueeze(1).chunk(2, dim=-1)
            tokens = modulate(self.final_norm(tokens), shift, scale)
        else:
            tokens = self.final_norm(tokens[:, 1:])
        out = unpatchify(self.final_linear(tokens), self.patch_size, H, W)  # (B, g*g, p*p*C) -> (B, C, H, W)
        return out if self.final_conv is None else self.final_conv(out)


# -----------------------------------------------------------------------------
# UNet (improved-diffusion's layout: residual blocks with scale-shift conditioning, attention at low
# resolutions, skip connections by concatenation; zero-initialised output convolutions)


def zero_module(module):
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def group_norm(channels):
    return nn.GroupNorm(32 if channels % 32 == 0 else math.gcd(channels, 32), channels)


class ResBlock(nn.Module):
    def __init__(self, in_channels, out_channels, emb_dim, dropout):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels))
        self.out_norm = group_norm(out_channels)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        scale, shift = self.emb_layers(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.out_norm(h) * (1 + scale) + shift  # improved-diffusion's use_scale_shift_norm
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    def __init__(self, channels, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x):
        B, C, H, W = x.shape
        # the 1x1 convolutions as linear layers over tokens (B, N, C), so q, k and v come out with the head
        # dimension innermost and contiguous, the layout every fused SDPA kernel needs (a strided one sends
        # CUDA to the math kernel); the weights are the convolutions', so checkpoints load as before
        tokens = self.norm(x).view(B, C, H * W).transpose(1, 2)  # (B, N, C)
        qkv = F.linear(tokens, self.qkv.weight.squeeze(-1), self.qkv.bias)  # (B, N, 3C)
        q, k, v = qkv.view(B, H * W, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = attention(q, k, v).transpose(1, 2).reshape(B, H * W, C)  # (B, heads, N, C/heads) -> (B, N, C)
        out = F.linear(out, self.proj.weight.squeeze(-1), self.proj.bias)
        return x + out.transpose(1, 2).reshape(B, C, H, W)


class UNet(nn.Module):
    def __init__(self, image_size=32, image_channels=3, num_classes=10, num_channels=64, num_res_blocks=2,
                 channel_mult=(1, 2, 2, 2), attention_resolutions=(16, 8), num_heads=4, dropout=0.0,
                 class_dropout=0.1):
        super().__init__()
        self.num_classes = num_classes
        emb_dim = 4 * num_channels
        self.cond_embed = ConditionEmbedding(emb_dim, num_classes, class_dropout, frequency_dim=num_channels)
        self.input_conv = nn.Conv2d(image_channels, num_channels, 3, padding=1)
        self.down, skip_channels, channels, resolution = nn.ModuleList(), [num_channels], num_channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(channels, mult * num_channels, emb_dim, dropout)]
                channels = mult * num_channels
                if resolution in attention_resolutions:
                    layers.append(AttentionBlock(channels, num_heads))
                self.down.append(nn.ModuleList(layers))
                skip_channels.append(channels)
            if level != len(channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(channels, channels, 3, stride=2, padding=1)]))
                skip_channels.append(channels)
                resolution //= 2
        self.middle = nn.ModuleList([ResBlock(channels, channels, emb_dim, dropout), AttentionBlock(channels, num_heads),
                                     ResBlock(channels, channels, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(channels + skip_channels.pop(), mult * num_channels, emb_dim, dropout)]
                channels = mult * num_channels
                if resolution in attention_resolutions:
                    layers.append(AttentionBlock(channels, num_heads))
                if level and i == num_res_blocks:
                    layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
                    layers.append(nn.Conv2d(channels, channels, 3, padding=1))
                    resolution *= 2
                self.up.append(nn.ModuleList(layers))
        self.out = nn.Sequential(group_norm(channels), nn.SiLU(),
                                 zero_module(nn.Conv2d(channels, image_channels, 3, padding=1)))

    @staticmethod
    def _run(layers, h, emb):
        for layer in layers:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def forward(self, x, t, y):
        emb = self.cond_embed(t, y)
        h = self.input_conv(x)
        skips = [h]
        for layers in self.down:
            h = self._run(layers, h, emb)
            skips.append(h)
        h = self._run(self.middle, h, emb)
        for layers in self.up:
            h = self._run(layers, torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


# -----------------------------------------------------------------------------
# building from config, EMA


def build_model(model_cfg):
    c = model_cfg
    common = dict(image_size=c["image_size"], image_channels=c["image_channels"], num_classes=c["num_classes"],
                  class_dropout=c["class_dropout"], dropout=c["dropout"])
    if c["name"] == "dit":
        return DiT(patch_size=c["patch_size"], hidden_dim=c["hidden_dim"], depth=c["depth"], num_heads=c["num_heads"],
                   num_kv_heads=c["num_kv_heads"], mlp_ratio=c["mlp_ratio"], conditioning=c["conditioning"],
                   pos_embed=c["pos_embed"], skip=c["skip"], final_conv=c["final_conv"], stem=c["stem"],
                   mlp_conv=c["mlp_conv"], downsample=c["downsample"], **common)
    return UNet(num_channels=c["num_channels"], num_res_blocks=c["num_res_blocks"], channel_mult=c["channel_mult"],
                attention_resolutions=c["attention_resolutions"], num_heads=c["unet_num_heads"], **common)


def model_summary(model, model_cfg):
    """One line: the architecture, its parameters and the FLOPs of one forward pass per image."""
    from torch.utils.flop_counter import FlopCounterMode
    c = model_cfg
    size = c["image_size"]
    x = torch.zeros(1, c["image_channels"], size, size)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no label dropout: counting FLOPs must not consume random numbers (exact resume)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x.to(device), torch.zeros(1, device=device), torch.zeros(1, dtype=torch.long, device=device))
    model.train(was_training)
    params = sum(p.numel() for p in model.parameters())
    if c["name"] == "dit":
        options = [name for name, on in (("skip", c["skip"]), ("final_conv", c["final_conv"]),
                                         ("conv stem", c["stem"] == "conv"), ("mlp_conv", c["mlp_conv"]),
                                         ("downsample", c["downsample"])) if on]
        arch = (f"DiT {c['conditioning']} patch {c['patch_size']} dim {c['hidden_dim']} depth {c['depth']} "
                f"heads {c['num_heads']}/{c['num_kv_heads']} kv" + "".join(f" +{o}" for o in options))
    else:
        arch = f"UNet channels {c['num_channels']} x {tuple(c['channel_mult'])} res_blocks {c['num_res_blocks']}"
    return f"{arch} | {params / 1e6:.2f}M parameters | {counter.get_total_flops() / 1e9:.2f} GFLOPs/image forward"


@torch.no_grad()
def update_ema(ema_model, model, rate):
    """ema = rate * ema + (1 - rate) * model, for every parameter in one multi-tensor kernel launch (per device
    and dtype) instead of one small lerp_ each: on a GPU, hundreds of launches a step for the DiT."""
    ema_params, params = list(ema_model.parameters()), [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1 - rate)
