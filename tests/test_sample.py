import json
import os

import numpy as np
import pytest
import torch

import evaluate
import sample
from checkpoint import model_from_checkpoint, save_checkpoint
from data import to_uint8
from diffusion import Diffusion
from test_evaluate import common_args, expect_one_line_error, tiny_checkpoint, workspace  # noqa: F401 (fixture)


@pytest.fixture
def tiny(tmp_path):
    return tiny_checkpoint(tmp_path / "tiny.pth")


def test_samples_npz_round_trips_the_sampled_images_and_labels(tiny, tmp_path):
    model, cfg, _ = model_from_checkpoint(tiny)
    labels = torch.tensor([3, 1, 4, 1, 5, 9, 2])
    sample.write_samples_npz(str(tmp_path / "s.npz"), model, cfg, labels, progress=False, batch_size=3,
                             generator=torch.Generator().manual_seed(7))
    images, read_labels = sample.read_samples(str(tmp_path / "s.npz"))
    expected = sample.sample_images(model, cfg, labels, batch_size=3, generator=torch.Generator().manual_seed(7))
    assert images.dtype == np.uint8 and images.shape == (7, 32, 32, 3)
    np.testing.assert_array_equal(images, to_uint8(expected).permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(read_labels, labels.numpy())
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []  # no scratch file left behind


def test_samples_folder_round_trips_losslessly(tiny, tmp_path):
    model, cfg, _ = model_from_checkpoint(tiny)
    labels = torch.tensor([0, 1, 2])
    names = [f"class{i}" for i in range(10)]
    sample.write_samples_folder(str(tmp_path / "pngs"), model, cfg, labels, names, progress=False,
                                generator=torch.Generator().manual_seed(0))
    images, read_labels = sample.read_samples(str(tmp_path / "pngs"))
    expected = sample.sample_images(model, cfg, labels, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(images, to_uint8(expected).permute(0, 2, 3, 1).numpy())
    assert read_labels is None


def test_class_ids_out_of_range_are_a_one_line_error(tiny, tmp_path, capsys):
    run = lambda: sample.main(["--checkpoint", tiny, "--classes", "0,10", "--output_dir", str(tmp_path)])
    expect_one_line_error(capsys, run, "class id 10", "0..9")


def test_num_samples_zero_is_a_one_line_error(tiny, tmp_path, capsys):
    run = lambda: sample.main(["--checkpoint", tiny, "--num_samples", "0", "--out", str(tmp_path / "s.npz")])
    expect_one_line_error(capsys, run, "--num_samples=0")


def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    run = lambda: sample.main(["--checkpoint", str(tmp_path / "absent.pth")])
    expect_one_line_error(capsys, run, "absent.pth", "does not exist")


def test_checkpoint_of_another_architecture_is_a_one_line_error(tiny, tmp_path, capsys):
    state = torch.load(tiny, weights_only=False)
    state["config"]["model"]["name"] = "unet"  # DiT weights under a UNet config
    save_checkpoint(state, str(tmp_path / "other.pth"))
    run = lambda: sample.main(["--checkpoint", str(tmp_path / "other.pth"), "--output_dir", str(tmp_path)])
    expect_one_line_error(capsys, run, "other.pth", "architecture")


def test_sample_then_evaluate_end_to_end_on_cpu(tiny, workspace, tmp_path):  # noqa: F811
    out = tmp_path / "outputs"
    sample.main(["--checkpoint", tiny, "--classes", "0,3", "--per_class", "2", "--num_samples", "12", "--out",
                 str(out / "samples.npz"), "--output_dir", str(out), "--device", "cpu"])
    for name in ("sample_grid.png", "timestep_grid_10x10.png", "samples.npz"):
        assert (out / name).stat().st_size > 0, name
    images, labels = sample.read_samples(str(out / "samples.npz"))
    assert images.shape == (12, 32, 32, 3) and set(labels.tolist()) == {0, 3}

    evaluate.main(["--samples", str(out / "samples.npz")] + common_args(workspace, out))
    with open(out / "evaluation_results.json") as f:
        results = json.load(f)
    assert results["num_samples"] == 12 and results["fid_score"] is None  # no Inception weights asked for
    per_class = list(results["classifier_accuracy_per_class"].values())  # the classifier's class names
    assert per_class[1] is None and 0 <= per_class[0] <= 1
    assert results["classifier_accuracy"] == pytest.approx((per_class[0] + per_class[3]) / 2)
    assert np.isfinite(results["classifier_fid"]) and (out / "real_vs_fake.png").stat().st_size > 0


@pytest.mark.parametrize("precision, expected", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_sampling_precision_reaches_the_model_and_leaves_the_sampler_in_fp32(tiny, precision, expected):
    model, cfg, _ = model_from_checkpoint(tiny)
    seen = []
    hook = model.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    images = sample.sample_images(model, cfg, torch.tensor([0, 1, 2]), sampler="ddim", steps=3, guidance_scale=2.0,
                                  precision=precision, generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert seen and set(seen) == {expected}
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    reference = sample.sample_images(model, cfg, torch.tensor([0, 1, 2]), sampler="ddim", steps=3, guidance_scale=2.0,
                                     precision="fp32", generator=torch.Generator().manual_seed(0))
    if precision == "fp32":
        torch.testing.assert_close(images, reference, rtol=0, atol=0)
    else:  # the same images up to bf16 rounding, not others
        assert 0 < (images - reference).abs().max() < 0.25


def test_sampling_compile_option_compiles_the_model(tiny, monkeypatch):
    model, cfg, _ = model_from_checkpoint(tiny)
    compiled = []
    monkeypatch.setattr(sample.torch, "compile", lambda m: compiled.append(m) or m)
    sample.sample_images(model, cfg, torch.tensor([0]), sampler="ddim", steps=2, precision="fp32")
    assert compiled == []
    sample.sample_images(model, cfg, torch.tensor([0]), sampler="ddim", steps=2, precision="fp32", compile=True)
    assert compiled == [model]
    cfg["sampling"]["compile"] = True
    sample.sample_images(model, cfg, torch.tensor([0]), sampler="ddim", steps=2, precision="fp32")
    assert compiled == [model, model]


# -----------------------------------------------------------------------------
# the command line: --config, --section.key=value, both spellings


def steps_sampled(monkeypatch, argv):
    """The respaced step counts the sampler ran with, when sample.py is run with argv."""
    seen = []
    real_sample = Diffusion.sample

    def recording(self, *args, **kwargs):
        seen.append(len(self.timestep_map))
        return real_sample(self, *args, **kwargs)

    monkeypatch.setattr(Diffusion, "sample", recording)
    sample.main(argv)
    return seen


@pytest.mark.parametrize("extra, expected", [
    ([], 2),  # the checkpoint's own sampling.steps
    (["--sampling.steps=3"], 3),
    (["--sampling.steps=3", "--steps", "5"], 5),  # a flag wins over an override
    (["--config", "PRESET"], 4),
    (["--config", "PRESET", "--sampling.steps=3"], 3),  # overrides come after the preset
])
def test_config_and_overrides_set_the_sampling_steps(tiny, tmp_path, monkeypatch, extra, expected):
    preset = tmp_path / "preset.yaml"
    preset.write_text("model:\n  depth: 12\nsampling:\n  steps: 4\n")  # the model stays the checkpoint's
    extra = [str(preset) if a == "PRESET" else a for a in extra]
    argv = ["--checkpoint", tiny, "--no_grids", "--num-samples", "2", "--out", str(tmp_path / "s.npz"),
            "--output-dir", str(tmp_path)] + extra
    assert steps_sampled(monkeypatch, argv) == [expected]


def test_sampling_seed_override_is_the_default_seed(tiny, tmp_path):
    def images(*extra):
        path = str(tmp_path / f"{len(os.listdir(tmp_path))}.npz")
        sample.main(["--checkpoint", tiny, "--no-grids", "--num_samples", "2", "--out", path, *extra])
        return sample.read_samples(path)[0]
    by_override, by_flag, default = images("--sampling.seed=5"), images("--seed", "5"), images()
    np.testing.assert_array_equal(by_override, by_flag)
    assert not np.array_equal(by_override, default)


@pytest.mark.parametrize("arg, fragment", [
    ("--model.depth=2", "'--model.depth=2' cannot be set here"),
    ("--evaluation.num_samples=3", "expected a key of sampling"),
    ("--sampling.no_such_key=1", "unknown option '--sampling.no_such_key=1'"),
    ("--bogus", "unknown option '--bogus'"),
])
def test_settings_sample_py_cannot_use_are_one_line_errors(tiny, tmp_path, capsys, arg, fragment):
    run = lambda: sample.main(["--checkpoint", tiny, "--no-grids", "--output_dir", str(tmp_path), arg])
    expect_one_line_error(capsys, run, fragment)


# -----------------------------------------------------------------------------
# an unconditional model (train_cpu.py --class_cond False)


def test_unconditional_model_ignores_the_asked_class_and_writes_no_labels(tmp_path):
    path = tiny_checkpoint(tmp_path / "uncond.pth", overrides=["--model.class_dropout=1.0"])
    model, cfg, _ = model_from_checkpoint(path)
    seen = []
    model.cond_embed.class_embed.register_forward_hook(lambda mod, inputs, out: seen.append(inputs[0]))
    draw = lambda labels, scale: sample.sample_images(model, cfg, torch.tensor(labels), sampler="ddim", steps=2,  # noqa: E731
                                                      guidance_scale=scale, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(draw([0, 7], 3.0), draw([3, 3], 1.0), rtol=0, atol=0)
    assert all((y == 10).all() and len(y) == 2 for y in seen)  # the null class, one evaluation a step (no guidance)
    sample.save_class_grid(model, cfg, [f"class{i}" for i in range(10)], str(tmp_path / "grid.png"), per_class=2)
    assert (tmp_path / "grid.png").stat().st_size > 0
    sample.write_samples_npz(str(tmp_path / "s.npz"), model, cfg, torch.tensor([0, 1, 2]), progress=False)
    images, labels = sample.read_samples(str(tmp_path / "s.npz"))
    assert images.shape == (3, 32, 32, 3) and labels is None
