import os
import sys

import pytest

from bench import dit_options, dit_reference, dit_sizes

TINY = ["--rounds", "1", "--batch_size", "2", "--model.depth=1", "--model.hidden_dim=32", "--model.num_heads=4",
        "--model.num_kv_heads=2", "--training.precision=fp32"]

# the few names of facebookresearch/DiT the bench calls, with its package named `diffusion` like our diffusion.py
STUB_REFERENCE = {
    "models.py": """
import torch

class DiT(torch.nn.Module):
    def __init__(self, in_channels, **kwargs):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, in_channels, 1)

    def forward(self, x, t, y):
        return self.conv(x)
""",
    "diffusion/__init__.py": """
from .gaussian_diffusion import GaussianDiffusion

def create_diffusion(timestep_respacing, learn_sigma=True, diffusion_steps=1000):
    return GaussianDiffusion(diffusion_steps)
""",
    "diffusion/gaussian_diffusion.py": """
class GaussianDiffusion:
    def __init__(self, num_timesteps):
        self.num_timesteps = num_timesteps

    def training_losses(self, model, x, t, model_kwargs):
        return {"loss": ((model(x, t, **model_kwargs) - x) ** 2).mean(dim=(1, 2, 3))}
""",
}


def write_stub(root, models_header=""):
    for path, text in STUB_REFERENCE.items():
        os.makedirs(os.path.dirname(root / path), exist_ok=True)
        (root / path).write_text((models_header if path == "models.py" else "") + text)
    return str(root)


def table_rows(out):
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model"))
    return lines[header + 1:]


def test_dit_reference_without_a_checkout_says_how_to_enable_it(monkeypatch, capsys):
    monkeypatch.delenv("DIT_REFERENCE_DIR", raising=False)
    dit_reference.main(TINY)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "DIT_REFERENCE_DIR" in out and "facebookresearch/DiT" in out


def test_dit_reference_without_timm_says_what_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("DIT_REFERENCE_DIR", write_stub(tmp_path, "from timm.models.vision_transformer import Mlp\n"))
    monkeypatch.setitem(sys.modules, "timm", None)  # as if not installed
    dit_reference.main(TINY)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and f"pip install {dit_reference.TIMM}" in out


def test_dit_reference_times_a_stub_checkout_beside_ours_without_shadowing_our_diffusion(monkeypatch, capsys, tmp_path):
    import diffusion
    monkeypatch.setenv("DIT_REFERENCE_DIR", write_stub(tmp_path))
    dit_reference.main(TINY)
    rows = table_rows(capsys.readouterr().out)
    assert [row.split()[0] for row in rows] == ["facebookresearch/DiT", "ours,", "ours,"]
    assert "multi-head" in rows[1] and "4 heads / 2 kv (GQA)" in rows[2]
    assert all(row.endswith("x") for row in rows[1:]) and not rows[0].endswith("x")
    assert sys.modules["diffusion"] is diffusion and hasattr(diffusion, "Diffusion")


@pytest.mark.skipif(not os.environ.get("DIT_REFERENCE_DIR"), reason="DIT_REFERENCE_DIR names no facebookresearch/DiT")
def test_dit_reference_times_the_real_checkout_beside_ours(capsys):
    pytest.importorskip("timm")
    dit_reference.main(TINY)
    rows = table_rows(capsys.readouterr().out)
    assert len(rows) == 3 and rows[0].startswith("facebookresearch/DiT") and rows[2].endswith("x")


@pytest.mark.parametrize("section, argv", [(dit_reference, ["--rounds", "0"]), (dit_reference, ["--batch_size", "-3"]),
                                           (dit_sizes, ["--rounds", "0"]), (dit_sizes, ["--batch_size", "-3"]),
                                           (dit_sizes, ["--minutes", "0"]), (dit_options, ["--rounds", "0"]),
                                           (dit_options, ["--batch_size", "-3"])])
def test_bench_sections_refuse_a_count_below_one_in_one_line(section, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        section.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and argv[0] in err and argv[1] in err


def test_dit_sizes_lists_the_unet_recipe_and_each_candidate_with_its_parameters_and_steps(monkeypatch, capsys):
    from config import load_config
    from model import build_model
    shapes = [(4, 32, 1, 4, 2), (2, 48, 2, 4, 4)]
    monkeypatch.setattr(dit_sizes, "CANDIDATES", shapes)
    dit_sizes.main(["--rounds", "1", "--batch_size", "2", "--minutes", "10"])
    rows = table_rows(capsys.readouterr().out)
    assert len(rows) == 3 and rows[0].startswith("UNet recipe")
    for row, shape in zip(rows[1:], shapes):
        name, params, gflops, rate, _, steps = row.rsplit(None, 5)
        assert name == "DiT p{} {}x{} h{}/kv{}".format(*shape)
        model = build_model(load_config(dit_sizes.dit_args(*shape))["model"])
        assert params == f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M"
        # 10 minutes at `rate` images/s, 2 images a step; the rate is printed to 0.1 img/s, which alone moves
        # the steps by up to 600 * 0.05 / 2 = 15 (a slow, loaded machine's 2.46 img/s prints as 2.5)
        assert int(steps.replace(",", "")) == pytest.approx(600 * float(rate) / 2, abs=600 * 0.05 / 2 + 1)


def test_dit_options_times_the_recipe_and_each_option_with_its_own_parameters(capsys):
    from config import load_config
    from model import build_model
    tiny = ["--model.depth=2", "--model.hidden_dim=32", "--model.num_heads=4", "--model.num_kv_heads=2"]
    dit_options.main(["--rounds", "1", "--batch_size", "2", "--no_compile"] + tiny)
    lines = capsys.readouterr().out.splitlines()
    rows = lines[next(i for i, line in enumerate(lines) if line.startswith("step")) + 1:]
    assert [row.split("  ")[0].strip() for row in rows] == [name for name, _ in dit_options.CONTENDERS]
    assert rows[0].endswith("1.00x")
    for row, (name, options) in zip(rows, dit_options.CONTENDERS):
        model = build_model(load_config(dit_options.RECIPE + options + tiny)["model"])
        assert f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M" in row, (name, row)
