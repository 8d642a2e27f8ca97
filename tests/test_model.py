import copy
import os

import pytest
import torch
import torch.nn.functional as F

import csrc
import model as model_module
from config import load_config
from diffusion import Diffusion, get_beta_schedule
from model import DiT, UNet, attention_reference, build_model, model_summary, patchify, unpatchify, update_ema

SHAPES = [(1, 1, 1, 1, 8), (2, 4, 4, 17, 16), (3, 8, 2, 65, 48), (2, 6, 3, 33, 80), (1, 8, 1, 7, 128),
          (2, 4, 2, 64, 24)]  # (B, H, KV, N, D), odd N included


@pytest.mark.parametrize("B,H,KV,N,D", SHAPES)
def test_gqa_equals_sdpa_with_grouped_kv_heads(B, H, KV, N, D):
    # PyTorch's own grouped attention (enable_gqa): query head h reads key/value head h // (H / KV); where
    # KV = H (two of the shapes) it is plain multi-head attention
    q, k, v = torch.randn(B, H, N, D), torch.randn(B, KV, N, D), torch.randn(B, KV, N, D)
    torch.testing.assert_close(attention_reference(q, k, v), F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("B,H,KV,N,D", SHAPES)
def test_gqa_equals_attention_on_repeated_kv(B, H, KV, N, D):
    q = torch.randn(B, H, N, D)
    k, v = torch.randn(B, KV, N, D), torch.randn(B, KV, N, D)
    repeated = F.scaled_dot_product_attention(q, k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1))
    torch.testing.assert_close(attention_reference(q, k, v), repeated, atol=1e-5, rtol=1e-5)


def tiny_dit(**kwargs):
    args = dict(hidden_dim=64, depth=2, num_heads=4, num_kv_heads=2, class_dropout=0.0)
    args.update(kwargs)
    return DiT(**args)


def tiny_unet(**kwargs):
    args = dict(num_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(16,), num_heads=2,
                class_dropout=0.0)
    args.update(kwargs)
    return UNet(**args)


EACH_TINY_MODEL = pytest.mark.parametrize(
    "make", [lambda: tiny_dit(conditioning="adaln", image_size=16), lambda: tiny_dit(conditioning="token", image_size=16),
             lambda: tiny_unet(image_size=16, num_channels=16, attention_resolutions=(8,))],
    ids=["dit-adaln", "dit-token", "unet"])


def inputs(B=4):
    return torch.randn(B, 3, 32, 32), torch.randint(0, 1000, (B,)), torch.randint(0, 10, (B,))


@pytest.mark.parametrize("conditioning", ["adaln", "token"])
@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
def test_dit_new_model_predicts_zeros_of_input_shape(conditioning, pos_embed):
    out = tiny_dit(conditioning=conditioning, pos_embed=pos_embed)(*inputs())
    assert out.shape == (4, 3, 32, 32)
    assert out.abs().max().item() == 0.0


def test_token_conditioning_has_65_positions_and_adaln_64():
    assert tiny_dit(conditioning="token", pos_embed="learned").pos_embed.shape == (1, 65, 64)
    assert tiny_dit(conditioning="adaln", pos_embed="learned").pos_embed.shape == (1, 64, 64)
    assert tiny_dit(conditioning="token").pos_embed.shape == (1, 65, 64)


PATCH_SHAPES = [(3, 32, 32, 4), (3, 16, 16, 2), (5, 8, 12, 2), (8, 12, 8, 4), (1, 4, 4, 4)]  # (C, H, W, p)


@pytest.mark.parametrize("C,H,W,p", PATCH_SHAPES)
def test_unpatchify_inverts_patchify(C, H, W, p):
    x = torch.randn(2, C, H, W)
    tokens = patchify(x, p)
    assert tokens.shape == (2, (H // p) * (W // p), p * p * C)
    assert torch.equal(unpatchify(tokens, p, H, W), x)
    assert torch.equal(patchify(unpatchify(tokens, p, H, W), p), tokens)


@pytest.mark.parametrize("C,H,W,p", PATCH_SHAPES)
def test_pixel_lands_in_the_token_covering_it_and_comes_back(C, H, W, p):
    # a reshape without the permute would also invert exactly, but would cut the image into strips, not patches
    corners = [(0, 0, 0), (C - 1, H - 1, W - 1), (0, 0, W - 1), (C - 1, H - 1, 0)]
    inside = [(int(torch.randint(C, ())), int(torch.randint(H, ())), int(torch.randint(W, ()))) for _ in range(4)]
    for c, y, x in corners + inside:
        image = torch.zeros(1, C, H, W)
        image[0, c, y, x] = 1.0
        tokens = patchify(image, p)
        token, offset = (y // p) * (W // p) + x // p, ((y % p) * p + x % p) * C + c
        assert tokens.nonzero().tolist() == [[0, token, offset]], (c, y, x)
        assert torch.equal(unpatchify(tokens, p, H, W), image)


def test_patch_embedding_reads_patches_in_patchify_order():
    model = tiny_dit(patch_size=4)
    x = torch.randn(2, 3, 32, 32)
    w = model.patch_embed.weight  # (hidden, C, p, p)
    as_linear = patchify(x, 4) @ w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).T + model.patch_embed.bias
    torch.testing.assert_close(model.patch_embed(x).flatten(2).transpose(1, 2), as_linear, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("conditioning", ["adaln", "token"])
@pytest.mark.parametrize("patch_size", [2, 4])
def test_without_attention_an_output_pixel_depends_only_on_its_input_patch(conditioning, patch_size):
    """With every attention output projection zeroed, tokens never mix: the output at a pixel is a function of
    the input patch covering it alone. Random weights elsewhere, since a new DiT predicts zeros whatever its
    input. Patches in the wrong place on the way in or out move the gradient to another patch."""
    size, p = 16, patch_size
    model = tiny_dit(conditioning=conditioning, image_size=size, patch_size=p)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".attn.proj." in name:
                torch.nn.init.zeros_(param)
            else:
                torch.nn.init.normal_(param, std=0.2)
    images = torch.randn(2, 3, size, size, requires_grad=True)
    out = model(images, torch.tensor([10, 500]), torch.tensor([1, 7]))
    for c, y, x in [(0, 0, size - 1), (1, size - 1, 0), (2, p + 1, size - p - 1), (1, size // 2, 1)]:
        grad, = torch.autograd.grad(out[1, c, y, x], images, retain_graph=True)
        covering = (1, slice(None), slice(y // p * p, (y // p + 1) * p), slice(x // p * p, (x // p + 1) * p))
        assert grad[covering].abs().sum() > 0, (c, y, x)
        grad[covering] = 0
        assert grad.abs().max().item() == 0.0, (c, y, x)  # nothing from another patch or another image


@pytest.mark.parametrize("conditioning", ["adaln", "token"])
@pytest.mark.parametrize("options", [{}, dict(skip=True, final_conv=True, stem="conv", mlp_conv=True, downsample=True)],
                         ids=["plain", "every option"])
def test_dit_fits_four_images_at_fixed_t_and_noise(conditioning, options):
    """With t, noise and label fixed the target is a fixed tensor, which either conditioning memorises to well
    under 1% of its first loss, with or without the convolutional options. At t = 50 the noise is a small part
    of x_t, so it cannot simply be read off it: without its blocks the model stays above 1%."""
    model = tiny_dit(conditioning=conditioning, image_size=16, depth=3 if options else 2, **options)
    diffusion = Diffusion(get_beta_schedule("linear", 1000))
    x0, y = torch.rand(4, 3, 16, 16) * 2 - 1, torch.tensor([0, 3, 5, 9])
    t, noise = torch.full((4,), 50), torch.randn(4, 3, 16, 16)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):
        loss = diffusion.training_losses(model, x0, y, t, noise)[0].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.01 * losses[0], (losses[0], losses[-1])


def test_unet_new_model_predicts_zeros_of_input_shape():
    out = tiny_unet()(*inputs())
    assert out.shape == (4, 3, 32, 32) and out.abs().max().item() == 0.0


def test_label_dropout_uses_null_class_only_in_training():
    m = tiny_dit(class_dropout=0.999)
    seen = []
    m.cond_embed.class_embed.register_forward_hook(lambda mod, args, out: seen.append(args[0].clone()))
    x, t, y = inputs(64)
    m.train()(x, t, y)
    m.eval()(x, t, y)
    assert (seen[0] == 10).float().mean() > 0.9
    assert torch.equal(seen[1], y)


def overfit(model, steps, lr=2e-3, size=32):
    """Train on 8 fixed images; return the loss on a fixed (t, noise) draw before and after."""
    diffusion = Diffusion(get_beta_schedule("linear", 1000))
    x0 = torch.rand(8, 3, size, size) * 2 - 1
    y = torch.arange(8) % 10
    probe_t, probe_noise = torch.randint(0, 1000, (8,)), torch.randn_like(x0)
    probe = lambda: diffusion.training_losses(model, x0, y, probe_t, probe_noise)[0].mean().item()  # noqa: E731
    start = probe()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss, _ = diffusion.training_losses(model, x0, y)
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
    return start, probe()


@EACH_TINY_MODEL
def test_tiny_model_overfits_eight_images(make):
    start, end = overfit(make(), steps=60, lr=3e-3, size=16)
    assert end < 0.5 * start, (start, end)


@EACH_TINY_MODEL
def test_class_changes_output_once_trained(make):
    """Class 0's images are bright (+0.6), class 1's dark (-0.6). At middle to high noise x_t hardly shows
    which, so a model that reads its class predicts x0 near +0.6 or -0.6 for the same x_t, and one that
    ignores it (or lets it through a hundredth as strong) predicts about the same for both."""
    torch.manual_seed(0)
    model = make()
    diffusion = Diffusion(get_beta_schedule("linear", 1000), prediction="x0")
    y = torch.arange(16) % 2
    x0 = torch.where(y == 0, 0.6, -0.6).view(-1, 1, 1, 1).expand(16, 3, 16, 16)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss, _ = diffusion.training_losses(model, x0, y, torch.randint(200, 800, (16,)))
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
    x_t, t = torch.randn(4, 3, 16, 16), torch.full((4,), 600)
    with torch.no_grad():
        bright, dark = (model.eval()(x_t, t, torch.full((4,), c)).mean().item() for c in (0, 1))
    assert bright - dark > 0.6, (bright, dark)  # half the true gap of 1.2


def test_attention_falls_back_to_sdpa_without_extension(monkeypatch):
    monkeypatch.setattr(csrc, "extension", None)
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    assert csrc.attention_path(q) == "sdpa"
    torch.testing.assert_close(model_module.attention(q, k, v), attention_reference(q, k, v))


@pytest.mark.parametrize("name", ["dit", "unet"])
def test_build_model_from_config_and_summary(name):
    cfg = load_config([f"--model.name={name}", "--model.hidden_dim=64", "--model.depth=1", "--model.num_heads=2",
                       "--model.num_kv_heads=1", "--model.num_channels=32", "--model.channel_mult=[1,2]"])
    model = build_model(cfg["model"])
    assert isinstance(model, DiT if name == "dit" else UNet)
    line = model_summary(model, cfg["model"])
    params = sum(p.numel() for p in model.parameters())
    assert f"{params / 1e6:.2f}M parameters" in line and "GFLOPs/image" in line
    assert float(line.split("|")[-1].split()[0]) > 0


def test_update_ema_moves_toward_model():
    model = tiny_dit()
    ema = copy.deepcopy(model)
    for p in model.parameters():
        p.data.add_(1.0)
    before = [p.clone() for p in ema.parameters()]
    update_ema(ema, model, 0.9)
    for e, b, p in zip(ema.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p)


def test_update_ema_equals_a_lerp_per_parameter():
    model, ema = tiny_dit(), tiny_dit()
    for p in list(model.parameters()) + list(ema.parameters()):
        torch.nn.init.normal_(p)
    expected = [e.detach().clone().lerp_(p.detach(), 1 - 0.999) for e, p in zip(ema.parameters(), model.parameters())]
    update_ema(ema, model, 0.999)
    for e, want in zip(ema.parameters(), expected):
        assert torch.equal(e, want)


# -----------------------------------------------------------------------------
# the DiT's convolutional options (model.skip, final_conv, stem, mlp_conv, downsample)

OPTIONS = {"skip": dict(skip=True), "final_conv": dict(final_conv=True), "stem": dict(stem="conv"),
           "mlp_conv": dict(mlp_conv=True), "downsample": dict(downsample=True),
           "all": dict(skip=True, final_conv=True, stem="conv", mlp_conv=True, downsample=True)}
EACH_OPTION = pytest.mark.parametrize("option", list(OPTIONS))


def randomised(model, seed=1):
    """model with every parameter drawn at random, so no zero initialisation hides a wiring mistake."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model


@EACH_OPTION
@pytest.mark.parametrize("conditioning", ["adaln", "token"])
@pytest.mark.parametrize("depth", [2, 3, 5])
def test_dit_option_starts_as_identity_through_its_blocks_and_predicts_zeros(option, conditioning, depth):
    model = tiny_dit(conditioning=conditioning, depth=depth, **OPTIONS[option])
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
    out = model(*inputs())
    assert out.shape == (4, 3, 32, 32) and out.abs().max().item() == 0.0
    if conditioning == "adaln":  # with token conditioning only the skip merges start as the identity
        for block_input, block_output in seen:
            assert torch.equal(block_input, block_output)
    for block in model.blocks:
        if block.skip_linear is not None:  # the merge passes the block's own input and ignores the skip
            x, skip = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
            assert torch.equal(block.skip_linear(torch.cat([x, skip], dim=-1)), x)


@pytest.mark.parametrize("option", ["skip", "final_conv", "mlp_conv"])
@pytest.mark.parametrize("conditioning", ["adaln", "token"])
def test_an_option_that_starts_as_the_identity_leaves_a_trained_model_unchanged(option, conditioning):
    """The same weights with the option added at its initial value give the same output: skip, the output
    convolution and the MLP convolution change a model only once they are trained."""
    plain = randomised(tiny_dit(conditioning=conditioning, depth=4))
    torch.manual_seed(0)
    extended = tiny_dit(conditioning=conditioning, depth=4, **OPTIONS[option])
    weights = plain.state_dict()
    if option == "mlp_conv":  # the convolution sits after the MLP's first layer, so its second moves up one
        weights = {k.replace("mlp.3.", "mlp.4."): v for k, v in weights.items()}
    missing, unexpected = extended.load_state_dict(weights, strict=False)
    assert not unexpected and missing
    x, t, y = inputs()
    torch.testing.assert_close(extended(x, t, y), plain(x, t, y), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("depth", [2, 5, 6])
def test_each_out_block_merges_the_output_of_its_matching_in_block(depth):
    """Block depth-1-i receives block i's output as its skip, and a gradient through that skip reaches block i
    alone: the loss's gradient with respect to block i's output changes when the out block's skip half of the
    merge is cut, and the other in blocks' gradients change only through block i."""
    model = randomised(tiny_dit(depth=depth, skip=True))
    outputs, skips = {}, {}
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda mod, args, out, i=i: outputs.__setitem__(i, out))
        block.register_forward_pre_hook(lambda mod, args, i=i: skips.__setitem__(i, args[2]))
    x, t, y = inputs(2)
    model(x, t, y)
    pairs = {depth - 1 - i: i for i in range(depth // 2)}
    for j in range(depth):
        if j in pairs:
            assert skips[j] is outputs[pairs[j]], (j, pairs[j])
        else:
            assert skips[j] is None
            assert model.blocks[j].skip_linear is None
    # the gradient check: cutting out block j's skip half changes d loss / d (block i's output) for its i
    for j, i in pairs.items():
        def grad_at_in_block(cut):
            captured = {}

            def keep(mod, args, out):
                out.retain_grad()
                captured["out"] = out
            handle = model.blocks[i].register_forward_hook(keep)
            saved = model.blocks[j].skip_linear.weight.data.clone()
            if cut:
                model.blocks[j].skip_linear.weight.data[:, 64:] = 0
            model(x, t, y).square().sum().backward()
            model.blocks[j].skip_linear.weight.data.copy_(saved)
            handle.remove()
            model.zero_grad()
            return captured["out"].grad
        assert not torch.allclose(grad_at_in_block(False), grad_at_in_block(True)), (j, i)


def test_skip_merges_learn_from_their_identity_start():
    model = tiny_dit(depth=4, skip=True)
    randomised(model.blocks[0])  # a block that does something, so the skip carries information
    diffusion = Diffusion(get_beta_schedule("linear", 1000))
    loss, _ = diffusion.training_losses(model, torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    loss.mean().backward()
    model.final_linear.weight.data.normal_()  # a second pass, now that the output layer is not zero
    model.zero_grad()
    diffusion.training_losses(model, torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))[0].mean().backward()
    for block in model.blocks:
        if block.skip_linear is not None:
            assert block.skip_linear.weight.grad[:, 64:].abs().max() > 0


def token_conv_reference(x, weight, bias, grid):
    """A depthwise 3x3 convolution over the grid of the last grid**2 tokens, by explicit neighbours."""
    B, N, C = x.shape
    extra = N - grid * grid
    image = x[:, extra:].reshape(B, grid, grid, C)
    padded = F.pad(image, (0, 0, 1, 1, 1, 1))
    out = torch.zeros_like(image)
    for dy in range(3):
        for dx in range(3):
            out += padded[:, dy:dy + grid, dx:dx + grid] * weight[:, 0, dy, dx]
    out = (out + bias).reshape(B, grid * grid, C)
    return torch.cat([x[:, :extra], out], dim=1)


@pytest.mark.parametrize("B,grid,C,extra", [(1, 1, 1, 0), (2, 3, 5, 0), (3, 4, 8, 1), (2, 8, 17, 1), (1, 7, 12, 0)])
def test_token_conv_is_a_depthwise_3x3_convolution_over_the_token_grid(B, grid, C, extra):
    conv = model_module.TokenConv(C, grid)
    x = torch.randn(B, extra + grid * grid, C)
    assert torch.equal(conv(x), x)  # the identity at the start
    randomised(conv)
    expected = token_conv_reference(x, conv.conv.weight, conv.conv.bias, grid)
    torch.testing.assert_close(conv(x), expected, atol=1e-5, rtol=1e-5)
    if extra:
        assert torch.equal(conv(x)[:, :extra], x[:, :extra])  # the condition token is no pixel


def test_mlp_conv_reaches_only_the_3x3_neighbours_of_a_token():
    block = randomised(model_module.Block(16, 2, 1, 2.0, 0.0, adaln=True, mlp_conv_grid=5)).mlp
    x = torch.randn(1, 25, 16, requires_grad=True)
    block(x)[0, 12].sum().backward()  # token 12 is the centre (2, 2) of the 5 x 5 grid
    reached = (x.grad[0].abs().sum(dim=1) > 0).view(5, 5)
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[1:4, 1:4] = True
    assert torch.equal(reached, expected)


def test_final_conv_lets_an_output_pixel_see_across_its_patch_border():
    """Without the output convolution a pixel's prediction comes from its own token alone (patchify's test
    above); with it, from the neighbouring pixels of the next patch too."""
    model = randomised(tiny_dit(final_conv=True, patch_size=4))
    captured = {}

    def keep(mod, args, out):
        out.retain_grad()
        captured["t"] = out
    model.final_linear.register_forward_hook(keep)
    model(*inputs(1))[0, :, 3, 3].sum().backward()  # the bottom-right pixel of token 0 borders tokens 1, 8, 9
    touched = captured["t"].grad[0].abs().sum(dim=1) > 0
    assert touched.nonzero().flatten().tolist() == [0, 1, 8, 9]


@pytest.mark.parametrize("B,grid,C", [(1, 2, 1), (2, 4, 3), (3, 8, 16), (2, 6, 5)])
def test_halving_the_token_grid_merges_each_2x2_square_and_doubling_undoes_it(B, grid, C):
    x = torch.randn(B, grid * grid, C)
    halved = model_module.halve_token_grid(x, grid)
    assert halved.shape == (B, grid * grid // 4, 4 * C)
    half = grid // 2
    for r in range(half):
        for c in range(half):
            square = [x[:, (2 * r + dy) * grid + 2 * c + dx] for dy in range(2) for dx in range(2)]  # 4 x (B, C)
            assert torch.equal(halved[:, r * half + c], torch.stack(square, dim=-1).reshape(B, 4 * C))
    assert torch.equal(model_module.double_token_grid(halved, grid), x)


@pytest.mark.parametrize("depth,halved", [(1, [0]), (2, [0, 1]), (3, [1]), (5, [1, 2, 3]), (6, [2, 3])])
@pytest.mark.parametrize("conditioning", ["adaln", "token"])
def test_downsample_runs_the_middle_third_of_the_blocks_on_a_quarter_of_the_tokens(depth, halved, conditioning):
    """The middle blocks see the 8 x 8 grid as 4 x 4 (plus the condition token with token conditioning), the
    others the full grid; a trained model's output still depends on every block, and on each block's input
    through the halved grid's way back (the up projection) as well as past it."""
    model = randomised(tiny_dit(depth=depth, conditioning=conditioning, downsample=True, skip=True, mlp_conv=True))
    extra = 0 if conditioning == "adaln" else 1
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda mod, args, out: seen.append(out.shape[1]))
    x, t, y = inputs(2)
    out = model(x, t, y)
    assert out.shape == x.shape
    assert seen == [extra + (16 if i in halved else 64) for i in range(depth)]
    out.square().sum().backward()
    for i, block in enumerate(model.blocks):
        assert block.attn.qkv.weight.grad.abs().max() > 0, i
    assert model.down.weight.grad.abs().max() > 0 and model.up.weight.grad.abs().max() > 0


def test_downsample_costs_about_three_quarters_of_the_plain_dit():
    """A third of the blocks at a quarter of the tokens: the recipe's DiT costs 3/4 of itself, plus the two
    projections between the grids."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg = load_config(["--config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                                                 "cpu_dit_2h.yaml")])

    def flops(**options):
        model = build_model({**cfg["model"], **options})
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.eval()(torch.zeros(1, 3, 32, 32), torch.zeros(1), torch.zeros(1, dtype=torch.long))
        return counter.get_total_flops()
    plain = flops()
    assert 0.7 * plain < flops(downsample=True) < 0.85 * plain


@pytest.mark.parametrize("image_size,patch_size", [(32, 4), (16, 2), (12, 4)])
def test_conv_stem_keeps_the_token_grid_and_costs_under_15_percent(image_size, patch_size):
    cfg = load_config(["--model.name=dit", "--model.hidden_dim=192", "--model.depth=6", "--model.num_heads=6",
                       f"--model.image_size={image_size}", f"--model.patch_size={patch_size}"])
    from torch.utils.flop_counter import FlopCounterMode

    def flops(**options):
        model = build_model({**cfg["model"], **options})
        x = torch.zeros(1, 3, image_size, image_size)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            out = model.eval()(x, torch.zeros(1), torch.zeros(1, dtype=torch.long))
        assert out.shape == x.shape and out.abs().max().item() == 0.0
        return counter.get_total_flops()
    plain = flops()
    assert plain < flops(stem="conv") < 1.15 * plain


def test_options_off_keep_the_parameter_names_of_a_dit_without_them():
    """Every key of the plain DiT's state dict is there under the same name and shape, and no other, so a
    checkpoint saved before the options existed loads strictly."""
    names = {k: v.shape for k, v in tiny_dit().state_dict().items()}
    assert "blocks.0.mlp.3.weight" in names and "final_conv.weight" not in names
    assert not any("skip" in k or "stem" in k or k.startswith(("down.", "up.")) for k in names)


def test_a_dit_checkpoint_saved_before_the_options_loads_and_samples_as_it_did():
    """tests/fixtures/dit_before_options.pth was written, with the samples it drew, by the code before the
    options existed (make_dit_before_options.py says how). Today's code loads it strictly and draws the same
    images: bit for bit on a CPU like the one that wrote it, to float rounding on one whose kernels add up in
    another order."""
    from checkpoint import model_from_checkpoint
    from sample import sample_images
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "dit_before_options.pth")
    model, cfg, state = model_from_checkpoint(path)
    assert not any(key in state["config"]["model"] for key in ("skip", "final_conv", "stem", "mlp_conv"))
    assert not cfg["model"]["skip"] and cfg["model"]["stem"] == "patch"
    samples = sample_images(model, cfg, state["test_labels"], generator=torch.Generator().manual_seed(1),
                            **state["test_sampling"])
    torch.testing.assert_close(samples, state["test_samples"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("B,C,H,W,heads", [(1, 32, 8, 8, 4), (2, 64, 16, 16, 2), (3, 48, 5, 7, 3)])
def test_unet_attention_hands_attention_the_head_dimension_innermost_and_computes_the_conv_form(B, C, H, W, heads,
                                                                                                 monkeypatch):
    """Fused SDPA kernels need q, k, v with a contiguous last dimension; the block's output is still that of
    its 1x1 convolutions, computed as written: qkv conv, heads split by channel, attention, proj conv."""
    block = randomised(model_module.AttentionBlock(C, heads))
    seen = []
    real = model_module.attention
    monkeypatch.setattr(model_module, "attention", lambda q, k, v: seen.append((q, k, v)) or real(q, k, v))
    x = torch.randn(B, C, H, W)
    out = block(x)
    assert all(t.stride(-1) == 1 and t.shape == (B, heads, H * W, C // heads) for t in seen[0])
    qkv = block.qkv(block.norm(x).view(B, C, H * W))  # (B, 3C, N), channel = part * C + head * D + d
    q, k, v = qkv.view(B, 3, heads, C // heads, H * W).transpose(-2, -1).unbind(1)
    expected = x + block.proj(attention_reference(q, k, v).transpose(-2, -1).reshape(B, C, H * W)).view(B, C, H, W)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_precision_auto_follows_the_bf16_matmul_race(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert model_module.autocast_dtype_for("fp32", cpu) is None
    assert model_module.autocast_dtype_for("fp32", cuda) is None
    assert model_module.autocast_dtype_for("bf16", cpu) is torch.bfloat16
    assert model_module.autocast_dtype_for("auto", cuda) is torch.bfloat16
    monkeypatch.setattr(model_module, "bf16_matmul_speedup", lambda: 2.5)  # a CPU with AMX
    assert model_module.autocast_dtype_for("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(model_module, "bf16_matmul_speedup", lambda: 0.08)  # one without native bf16
    assert model_module.autocast_dtype_for("auto", cpu) is None


def test_bf16_matmul_speedup_is_the_best_fp32_time_over_the_best_bf16_time(monkeypatch):
    ratio = model_module.bf16_matmul_speedup.__wrapped__(n=64, repeats=2)  # the real race (not the cached one)
    assert 0 < ratio < float("inf")
    # a fake clock that a fake matmul moves on by a known time for each dtype, the first run of each slow
    # (oneDNN compiling its kernels): best 2.0 s in fp32 and 0.5 s in bf16, a speedup of 4
    clock = [0.0]
    seconds = {torch.float32: [5.0, 2.0, 3.0], torch.bfloat16: [4.0, 0.5, 0.8]}

    def matmul(x, y):
        clock[0] += seconds[x.dtype].pop(0)
        return x

    monkeypatch.setattr(torch.Tensor, "__matmul__", matmul)
    monkeypatch.setattr(model_module.time, "perf_counter", lambda: clock[0])
    assert model_module.bf16_matmul_speedup.__wrapped__(n=8, repeats=3) == 4.0
    assert seconds == {torch.float32: [], torch.bfloat16: []}  # three runs of each
