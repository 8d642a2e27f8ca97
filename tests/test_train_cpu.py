import copy
import csv
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from config import load_config
from conftest import assert_same_checkpoint_weights
from data import write_synthetic_cifar
from diffusion import Diffusion, get_beta_schedule
from model import build_model
import train_cpu
import train_ddp
from train_cpu import main
from train_ddp import train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED_COMMAND = ("--image_size 32 --num_channels 64 --num_res_blocks 2 --diffusion_steps 1000 --noise_schedule {} "
                "--lr 1e-4 --batch_size 8 --microbatch 4").split()
# keep the seed's flags but shrink what they leave to config, so a few steps take seconds
SMALL = ["--model.channel_mult=[1]", "--model.attention_resolutions=[]", "--sampling.steps=2",
         "--grid_per_class=1", "--threads=1"]  # one thread: two spin-wait each other on busy shared cores


# improved-diffusion's README, "Models and Hyperparameters", the two CIFAR-10 models, verbatim
README_CIFAR10 = {
    "L_hybrid": ('--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3',
                 '--diffusion_steps 4000 --noise_schedule cosine', '--lr 1e-4 --batch_size 128'),
    "L_vlb": ('--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3',
              '--diffusion_steps 4000 --noise_schedule cosine --use_kl True',
              '--lr 1e-4 --batch_size 128 --schedule_sampler loss-second-moment'),
}
# every flag of its scripts/image_train.py at its default there (create_argparser, script_util.py's
# model_and_diffusion_defaults), image_size 32 instead of 64, written as a shell passes them
IMAGE_TRAIN_DEFAULTS = dict(
    data_dir="", schedule_sampler="uniform", lr=1e-4, weight_decay=0.0, lr_anneal_steps=0, batch_size=1,
    microbatch=-1, ema_rate="0.9999", log_interval=10, save_interval=10000, resume_checkpoint="", use_fp16=False,
    fp16_scale_growth=1e-3, image_size=32, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
    attention_resolutions="16,8", dropout=0.0, learn_sigma=False, sigma_small=False, class_cond=False,
    diffusion_steps=1000, noise_schedule="linear", timestep_respacing="", use_kl=False, predict_xstart=False,
    rescale_timesteps=True, rescale_learned_sigmas=True, use_checkpoint=False, use_scale_shift_norm=True)


def run_script(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train_cpu.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("schedule", ["linear", "polynomial"])
def test_seed_command_runs_and_writes_metrics_csv(tmp_path, synthetic_data, capsys, schedule):
    args = [a.format(schedule) for a in SEED_COMMAND] + ["--data_dir", synthetic_data, "--max_steps", "4",
                                                          "--save_interval", "2", "--log_interval", "1",
                                                          "--run", "r", "--output_dir", str(tmp_path)] + SMALL
    main(args)
    # each step's printed line: the step, then name-value pairs split by " | ", the rate last
    logged = [dict(part.rsplit(" ", 1) for part in line.split(" | ")[:-1])
              for line in capsys.readouterr().out.splitlines() if line.startswith("step ") and " | loss " in line]
    assert [int(entry["step"]) for entry in logged] == [1, 2, 3, 4]
    with open(tmp_path / "r" / "training_log.csv") as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    assert [r["step"] for r in rows] == [2, 4]  # steps / save_interval rows
    assert [r["images"] for r in rows] == [16, 32]  # steps x batch 8
    for r, window in zip(rows, (logged[:2], logged[2:])):  # each row averages the steps since the last
        for column in ("loss", "grad_norm"):
            assert r[column] == pytest.approx(sum(float(e[column]) for e in window) / 2, abs=1e-4), column
        assert 0 < r["loss"] < 10 and r["grad_norm"] > 0 and "mse" not in r
        quarters = [r[q] for q in ("q0", "q1", "q2", "q3") if r[q] > 0]  # a quarter no sample fell in shows 0
        assert quarters and min(quarters) <= r["loss"] <= max(quarters)  # the loss is their weighted mean
        assert r["images_per_s"] > 0
    assert 0 < rows[0]["elapsed_s"] < rows[1]["elapsed_s"]
    for name in ("checkpoint.pth", "training_loss.png", "sample_grid.png"):
        assert (tmp_path / "r" / name).stat().st_size > 0
    state = torch.load(tmp_path / "r" / "checkpoint.pth", weights_only=False)
    assert state["step"] == 4 and state["config"]["diffusion"]["noise_schedule"] == schedule
    assert state["config"]["model"]["num_channels"] == 64 and state["config"]["training"]["batch_size"] == 8


def tiny_setup(class_dropout=0.0):
    cfg = load_config(["--model.name=dit", "--model.hidden_dim=32", "--model.depth=1", "--model.num_heads=2",
                       "--model.num_kv_heads=1", f"--model.class_dropout={class_dropout}"])
    model = build_model(cfg["model"])
    for p in model.parameters():  # leave the zero init so every parameter gets a gradient
        torch.nn.init.normal_(p, std=0.05)
    return model, Diffusion.from_config(cfg["diffusion"])


@pytest.mark.parametrize("microbatch", [1, 2, 4])
def test_microbatching_equals_one_full_batch_step(microbatch):
    model, diffusion = tiny_setup()
    micro = copy.deepcopy(model)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    results = []
    for m, size in ((model, 0), (micro, microbatch)):
        # plain SGD, whose step is the gradient's: Adam's first step divides each gradient by its own size,
        # so an element whose gradient is near zero would turn summation rounding into a visible difference
        optimizer = torch.optim.SGD(m.parameters(), lr=1e-3)
        torch.manual_seed(1)  # the same t and noise for both
        results.append(train_step(m, diffusion, optimizer, x, y, microbatch=size, grad_clip=1.0))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][2], results[1][2], rtol=1e-5, atol=1e-6)
    for a, b in zip(model.parameters(), micro.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_resume_continues_exactly(tmp_path, synthetic_data, compiled):
    common = [f"--training.compile={compiled}", "--model", "dit", "--model.hidden_dim=32", "--model.depth=1", "--model.num_heads=2",
              "--model.num_kv_heads=1", "--batch_size", "4", "--data_dir", synthetic_data, "--save_interval", "3",
              "--log_interval", "3", "--output_dir", str(tmp_path), "--sampling.steps=2", "--grid_per_class=1",
              "--training.warmup_steps=4", "--training.precision=fp32"]  # auto could choose differently per run
    main(common + ["--max_steps", "6", "--run", "straight"])
    main(common + ["--max_steps", "3", "--run", "split"])
    # the resumed run takes its config from the checkpoint, so only the step limit changes
    main(["--resume", str(tmp_path / "split" / "checkpoint.pth"), "--max_steps", "6", "--output_dir", str(tmp_path),
          "--grid_per_class=1", "--sampling.steps=2", "--save_interval", "3"])
    straight = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=False)
    split = torch.load(tmp_path / "split" / "checkpoint.pth", weights_only=False)
    assert straight["step"] == split["step"] == 6
    assert_same_checkpoint_weights(straight, split)
    with open(tmp_path / "split" / "training_log.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [3, 6]


def test_a_failed_compile_says_so_in_one_line_and_trains_as_eager_would(tmp_path, synthetic_data, monkeypatch, capsys):
    def broken_compile(model, **kwargs):
        def compiled(*args, **kw):
            raise RuntimeError("no C++ compiler found\nsecond line of the compiler's error")
        return compiled
    common = ["--model", "dit", "--model.hidden_dim=32", "--model.depth=1", "--model.num_heads=2",
              "--model.num_kv_heads=1", "--batch_size", "4", "--data_dir", synthetic_data, "--max_steps", "3",
              "--output_dir", str(tmp_path), "--grid_per_class=0", "--training.precision=fp32"]
    main(common + ["--run", "eager"])
    monkeypatch.setattr(torch, "compile", broken_compile)
    capsys.readouterr()
    main(common + ["--run", "fallback", "--training.compile=true"])
    notes = [line for line in capsys.readouterr().out.splitlines() if "torch.compile" in line]
    assert notes == ["note: torch.compile failed (RuntimeError: no C++ compiler found): training eager"]
    # the trial step drew no random numbers and left no gradient behind
    assert_same_checkpoint_weights(torch.load(tmp_path / "eager" / "checkpoint.pth", weights_only=False),
                                   torch.load(tmp_path / "fallback" / "checkpoint.pth", weights_only=False))


def test_bf16_flag_trains_in_bf16(tmp_path, synthetic_data, capsys):
    main(["--model", "dit", "--model.hidden_dim=32", "--model.depth=1", "--model.num_heads=2",
          "--model.num_kv_heads=1", "--batch_size", "4", "--data_dir", synthetic_data, "--max_steps", "2",
          "--output_dir", str(tmp_path), "--sampling.steps=2", "--grid_per_class=1", "--run", "bf16", "--bf16"])
    assert "bf16 autocast (precision bf16)" in capsys.readouterr().out
    checkpoint = torch.load(tmp_path / "bf16" / "checkpoint.pth", weights_only=False)
    assert checkpoint["config"]["training"]["precision"] == "bf16"  # a resumed run keeps it
    assert all(v.dtype == torch.float32 for v in checkpoint["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_compile_trains_like_eager(tmp_path, synthetic_data):
    # attention at 32x32 so the compiled graph goes through model.attention (the csrc op when built);
    # no label dropout, whose random draws inside a compiled graph come from a different generator
    common = ["--model.class_dropout=0.0", "--num_channels", "8", "--num_res_blocks", "1", "--model.channel_mult=[1]",
              "--model.attention_resolutions=[32]", "--model.unet_num_heads=1", "--batch_size", "4",
              "--data_dir", synthetic_data, "--max_steps", "3", "--save_interval", "3", "--log_interval", "1",
              "--output_dir", str(tmp_path), "--sampling.steps=2", "--grid_per_class=1", "--threads=2",
              "--training.precision=fp32"]  # auto may pick bf16, whose roundings would swamp the comparison
    main(common + ["--run", "eager"])
    main(common + ["--run", "compiled", "--compile"])
    eager = torch.load(tmp_path / "eager" / "checkpoint.pth", weights_only=False)
    compiled = torch.load(tmp_path / "compiled" / "checkpoint.pth", weights_only=False)
    # saved under the model's own names, not the compiled wrapper's _orig_mod.*, so either loads anywhere
    assert compiled["model"].keys() == eager["model"].keys()
    for name, value in eager["model"].items():  # fused code rounds differently: close, not equal
        torch.testing.assert_close(compiled["model"][name], value, rtol=1e-3, atol=1e-4, msg=name)
    with open(tmp_path / "eager" / "training_log.csv") as f, open(tmp_path / "compiled" / "training_log.csv") as g:
        eager_loss, compiled_loss = (float(list(csv.DictReader(h))[-1]["loss"]) for h in (f, g))
    assert abs(eager_loss - compiled_loss) < 1e-3 * eager_loss


@pytest.mark.parametrize("schedule", ["linear", "polynomial"])
def test_both_schedules_train_a_tiny_model(schedule):
    assert not (get_beta_schedule("polynomial", 1000) == get_beta_schedule("linear", 1000)).all()
    cfg = load_config(["--model.name=dit", "--model.hidden_dim=64", "--model.depth=2", "--model.num_heads=4",
                       "--model.num_kv_heads=2", "--model.class_dropout=0.0", f"--diffusion.noise_schedule={schedule}",
                       "--diffusion.prediction=eps", "--diffusion.loss_weighting=none"])
    model, diffusion = build_model(cfg["model"]), Diffusion.from_config(cfg["diffusion"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    x, y = torch.rand(8, 3, 32, 32) * 2 - 1, torch.arange(8)
    probe_t, probe_noise = torch.randint(0, 1000, (8,)), torch.randn_like(x)
    before = diffusion.training_losses(model, x, y, probe_t, probe_noise)[0].mean().item()
    for _ in range(120):
        train_step(model, diffusion, optimizer, x, y, grad_clip=1.0)
    after = diffusion.training_losses(model, x, y, probe_t, probe_noise)[0].mean().item()
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("args,message", [
    (["--batch_size", "8", "--microbatch", "3"], "--batch_size=8 is not divisible by --microbatch=3"),
    (["--microbatch", "0"], "--microbatch=0"),
    (["--save_interval", "0"], "--save_interval=0"),
    (["--noise_schedule", "sigmoid"], "sigmoid"),
    (["--lr", "fast"], "fast"),
    (["--model.num_kv_heads=3"], "num_heads=8 is not a multiple of num_kv_heads=3"),
    (["--unknown_flag", "1"], "--unknown_flag"),
    (["--image_size", "64"], "image_size=64"),
    (["--resume", "no/such/checkpoint.pth"], "no/such/checkpoint.pth"),
])
def test_bad_flags_give_one_line_errors(args, message):
    result = run_script(*args, "--data_dir", "no-such-dir")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


# -----------------------------------------------------------------------------
# improved-diffusion's command line


def config_of(argv, capsys=None):
    return train_cpu.build_config(*train_cpu.parse_args(argv))


def expect_one_line_error(capsys, argv, *fragments):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        config_of(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "unknown option" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_every_image_train_flag_at_its_default_is_taken(capsys):
    argv = [a for name, value in IMAGE_TRAIN_DEFAULTS.items() for a in (f"--{name}", str(value))]
    cfg = config_of(argv)
    m, d, tc, s = cfg["model"], cfg["diffusion"], cfg["training"], cfg["sampling"]
    assert (m["num_channels"], m["num_res_blocks"], m["unet_num_heads"], m["attention_resolutions"], m["dropout"]) \
        == (128, 2, 4, [16, 8], 0.0)
    assert (d["num_steps"], d["noise_schedule"], d["prediction"], d["loss_weighting"]) == (1000, "linear", "eps", "none")
    assert (tc["learning_rate"], tc["batch_size"], tc["weight_decay"], tc["ema_rate"], tc["save_interval"]) \
        == (1e-4, 1, 0.0, 0.9999, 10000)
    assert m["class_dropout"] == 1.0  # class_cond False: unconditional, as image_train.py trains by default
    assert tc["precision"] == "auto" and s["variance"] == "large"  # sigma_small False: beta_t
    assert capsys.readouterr().out == ""  # nothing to say about any of them


@pytest.mark.parametrize("argv, key, expected", [
    (["--class_cond", "False"], ("model", "class_dropout"), 1.0),
    (["--class-cond", "f"], ("model", "class_dropout"), 1.0),  # both spellings, str2bool's words
    (["--class_cond", "True"], ("model", "class_dropout"), 0.1),  # config.yaml's: conditional with guidance dropout
    ([], ("model", "class_dropout"), 0.1),
    (["--use_fp16", "True"], ("training", "precision"), "bf16"),
    (["--use_fp16", "False"], ("training", "precision"), "auto"),
    (["--predict_xstart", "True"], ("diffusion", "prediction"), "x0"),
    (["--predict_xstart", "False"], ("diffusion", "prediction"), "eps"),
    ([], ("diffusion", "prediction"), "eps"),  # image_train.py's objective, whatever config.yaml's default
    ([], ("diffusion", "loss_weighting"), "none"),
    ([], ("diffusion", "timestep_sampling"), "uniform"),  # improved-diffusion's uniform schedule sampler
    # unless the preset names its own
    (["--config", os.path.join(ROOT, "configs", "cpu_2h.yaml")], ("diffusion", "prediction"), "v"),
    (["--config", os.path.join(ROOT, "configs", "cpu_2h.yaml")], ("diffusion", "loss_weighting"), "min_snr"),
    (["--config", os.path.join(ROOT, "configs", "cpu_dit_2h.yaml")], ("diffusion", "timestep_sampling"), "lognormal"),
    (["--config", os.path.join(ROOT, "configs", "cpu_dit_2h.yaml")], ("diffusion", "loss_weighting"), "none"),
    (["--diffusion.prediction=v"], ("diffusion", "prediction"), "v"),
    ([], ("training", "compile"), False),  # image_train.py does not compile, whatever config.yaml's GPU default
    (["--compile"], ("training", "compile"), True),
    (["--config", os.path.join(ROOT, "configs", "cpu_dit_2h.yaml")], ("training", "compile"), True),
    (["--config", os.path.join(ROOT, "configs", "cpu_2h.yaml")], ("training", "compile"), False),
    (["--sigma_small", "True"], ("sampling", "variance"), "small"),
    (["--sigma_small", "False"], ("sampling", "variance"), "large"),
    (["--ema_rate", "0.999"], ("training", "ema_rate"), 0.999),
    (["--num_heads", "2", "--num_heads_upsample", "2"], ("model", "unet_num_heads"), 2),
    (["--rescale_timesteps", "True"], ("diffusion", "num_steps"), 1000),  # the identity at 1000 steps
    (["--rescale_learned_sigmas", "False", "--fp16_scale_growth", "0.01"], ("model", "num_channels"), 64),
    (["--class_cond", "False", "--model.class_dropout=0.2"], ("model", "class_dropout"), 0.2),  # overrides win
    # improved-diffusion anneals the rate linearly to zero at lr_anneal_steps and stops there
    (["--lr_anneal_steps", "5000"], ("training", "lr_cooldown"), 1.0),
    (["--lr_anneal_steps", "5000"], ("training", "max_steps"), 5000),
    (["--lr_anneal_steps", "5000", "--max_steps", "5000"], ("training", "max_steps"), 5000),
    ([], ("training", "lr_cooldown"), 0.0),
])
def test_image_train_flags_map_onto_config(argv, key, expected):
    assert config_of(argv)[key[0]][key[1]] == expected


@pytest.mark.parametrize("preset, argv, expected", [
    ("model:\n  name: dit\n", [], "dit"),  # a preset that names its model gets it (configs/cpu_dit_2h.yaml)
    ("model:\n  num_channels: 32\n", [], "unet"),  # one that does not gets image_train.py's UNet
    ("training:\n  batch_size: 8\n", [], "unet"),
    ("", [], "unet"),  # an empty file
    ("model:\n  name: dit\n", ["--model", "unet"], "unet"),  # the flag wins over the preset
    ("model:\n  name: unet\n", ["--model.name=dit"], "dit"),  # and so does an override
])
def test_a_preset_that_names_its_model_trains_that_model(tmp_path, preset, argv, expected):
    path = tmp_path / "preset.yaml"
    path.write_text(preset)
    assert config_of(["--config", str(path)] + argv)["model"]["name"] == expected


def test_every_preset_in_configs_trains_the_model_it_names():
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        path = os.path.join(ROOT, "configs", name)
        named = load_config(["--config", path])["model"]["name"]
        assert config_of(["--config", path])["model"]["name"] == named, name


def test_several_ema_rates_keep_the_first_and_say_so(capsys):
    assert config_of(["--ema_rate", "0.9999,0.999"])["training"]["ema_rate"] == 0.9999
    assert "--ema_rate 0.9999,0.999: one EMA is kept, at 0.9999 (the first)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, fragments", [
    (["--learn_sigma", "True"], ["--learn_sigma True is not supported", "variance is fixed"]),
    (["--use_kl", "True"], ["--use_kl True is not supported", "MSE"]),
    (["--use_checkpoint", "True"], ["--use_checkpoint True is not supported", "gradient checkpointing"]),
    (["--use_scale_shift_norm", "False"], ["--use_scale_shift_norm False is not supported", "scale and shift"]),
    (["--schedule_sampler", "loss-second-moment"], ["--schedule_sampler loss-second-moment is not supported"]),
    (["--timestep_respacing", "250"], ["--timestep_respacing 250 is not supported", "--sampling.steps"]),
    (["--lr_anneal_steps", "-1"], ["--lr_anneal_steps=-1", "expected 0"]),
    (["--lr_anneal_steps", "5000", "--max_steps", "4000"], ["--lr_anneal_steps=5000 with --max_steps=4000"]),
    (["--num_heads", "4", "--num_heads_upsample", "2"], ["--num_heads_upsample 2 is not supported"]),
    (["--diffusion_steps", "4000", "--rescale_timesteps", "True"], ["--rescale_timesteps True is not supported"]),
    (["--learn_sigma", "True", "--use_kl", "True"], ["--learn_sigma True is not supported", "nor --use_kl True"]),
    (["--class_cond", "maybe"], ["--class_cond", "'maybe' is not a boolean"]),
    (["--ema_rate", "0.9999,fast"], ["--ema_rate", "0.9999,fast"]),
    (["--grid_per_class", "-1"], ["--grid_per_class=-1"]),
])
def test_image_train_features_this_project_lacks_are_one_line_errors(capsys, argv, fragments):
    expect_one_line_error(capsys, argv, *fragments)


def test_adam_betas_and_weight_decay_reach_the_optimizer(tmp_path, synthetic_data):
    main([a.format("linear") for a in SEED_COMMAND] + SMALL + [
        "--data_dir", synthetic_data, "--max_steps", "1", "--run", "r", "--output_dir", str(tmp_path),
        "--training.adam_betas=[0.99,0.999]", "--training.weight_decay=0.03", "--grid_per_class=0"])
    group = torch.load(tmp_path / "r" / "checkpoint.pth", weights_only=False)["optimizer"]["param_groups"][0]
    assert tuple(group["betas"]) == (0.99, 0.999) and group["weight_decay"] == 0.03


@pytest.mark.slow
def test_the_cpu_recipes_train_the_same_losses_as_before(tmp_path):
    """tests/fixtures/train_cpu_losses.json holds each recipe's first steps as train_cpu.py's own loop trained
    them: the same command must give the same losses and gradient norms, whatever shape the loop takes. The
    tolerance allows another CPU's rounding (and the PyTorch path where the kernels are not built), which
    Adam's first, nearly sign-sized updates can carry into the third digit; another batch order or noise
    draw moves the loss by far more."""
    sys.path.insert(0, os.path.join(ROOT, "tests", "fixtures"))
    try:
        import make_train_cpu_losses as fixture
    finally:
        sys.path.pop(0)
    with open(os.path.join(ROOT, "tests", "fixtures", "train_cpu_losses.json")) as f:
        expected = json.load(f)["losses"]
    data = write_synthetic_cifar(str(tmp_path / "data"), num_train=40, num_test=10)
    for preset in fixture.SHRINK:
        main(fixture.command(preset, data, str(tmp_path / "outputs")))
        got = fixture.losses(str(tmp_path / "outputs"), preset)
        assert [row["step"] for row in got] == [row["step"] for row in expected[preset]] == list(range(1, 7))
        for row, want in zip(got, expected[preset]):
            assert row["loss"] == pytest.approx(want["loss"], rel=5e-3), (preset, row["step"])
            assert row["grad_norm"] == pytest.approx(want["grad_norm"], rel=5e-3), (preset, row["step"])


def test_flags_taken_only_to_be_ignored_say_so_in_one_line_each(capsys):
    # a bad override after them stops the run before any training, once the flags have been read
    with pytest.raises(SystemExit):
        main(["--fp16_scale_growth", "0.01", "--rescale_learned_sigmas", "True", "--diffusion.lognormal_std=0"])
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert notes == ["note: --fp16_scale_growth is ignored: bf16 needs no loss scaling",
                     "note: --rescale_learned_sigmas is ignored: there are no learned sigmas"]
    main_without = ["--diffusion.lognormal_std=0"]
    with pytest.raises(SystemExit):
        main(main_without)
    assert "note: " not in capsys.readouterr().out


@pytest.mark.parametrize("name", list(README_CIFAR10))
def test_improved_diffusion_readme_cifar10_commands_verbatim(tmp_path, synthetic_data, capsys, name):
    """Both of its CIFAR-10 models learn sigmas, which this project does not: verbatim, the command is refused
    in one line saying so. Without the flags it refuses, the same command trains, its other flags kept as
    written and only the model and batch shrunk by overrides so a step takes seconds."""
    command = " ".join(README_CIFAR10[name])
    expect_one_line_error(capsys, command.split() + ["--data_dir", synthetic_data], "--learn_sigma True is not supported")
    for refused in ("--learn_sigma True", "--use_kl True", "--schedule_sampler loss-second-moment"):
        command = command.replace(" " + refused, "")
    assert command.count("--") == 8  # image_size num_channels num_res_blocks dropout diffusion_steps noise_schedule lr batch_size
    main(command.split() + ["--data_dir", synthetic_data, "--max_steps", "2", "--save_interval", "1", "--run", "r",
                            "--output_dir", str(tmp_path), "--model.num_channels=8", "--model.num_res_blocks=1",
                            "--model.channel_mult=[1]", "--model.attention_resolutions=[]", "--training.batch_size=4",
                            "--sampling.steps=2", "--grid_per_class=1", "--threads=1"])
    state = torch.load(tmp_path / "r" / "checkpoint.pth", weights_only=False)
    d, m, tc = state["config"]["diffusion"], state["config"]["model"], state["config"]["training"]
    assert (d["num_steps"], d["noise_schedule"], m["dropout"], tc["learning_rate"]) == (4000, "cosine", 0.3, 1e-4)
    assert state["step"] == 2 and (tmp_path / "r" / "sample_grid.png").stat().st_size > 0
    with open(tmp_path / "r" / "training_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2] and all(0 < float(r["loss"]) < 10 for r in rows)
    torch.manual_seed(tc["seed"])  # the initial weights, as train_cpu.py draws them
    initial = build_model(m).state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in state["model"].items())  # it trained


def test_class_cond_false_trains_on_the_null_class_and_draws_an_unlabelled_grid(tmp_path, synthetic_data, monkeypatch,
                                                                              capsys):
    seen = []
    real_forward = train_ddp.train_step

    def recording_step(model, diffusion, optimizer, x, y, *args, **kwargs):
        hook = model.cond_embed.class_embed.register_forward_hook(lambda mod, inputs, out: seen.append(inputs[0]))
        try:
            return real_forward(model, diffusion, optimizer, x, y, *args, **kwargs)
        finally:
            hook.remove()

    monkeypatch.setattr(train_ddp, "train_step", recording_step)
    main(["--class_cond", "False", "--model", "dit", "--model.hidden_dim=32", "--model.depth=1", "--model.num_heads=2",
          "--model.num_kv_heads=1", "--batch_size", "4", "--data_dir", synthetic_data, "--max_steps", "2",
          "--output_dir", str(tmp_path), "--sampling.steps=2", "--grid_per_class=2", "--run", "uncond", "--threads=1"])
    assert len(seen) == 2 and all((y == 10).all() for y in seen)  # every label the null class
    assert "unconditional" in capsys.readouterr().out
    assert (tmp_path / "uncond" / "sample_grid.png").stat().st_size > 0


def test_grid_per_class_zero_skips_the_grid(tmp_path, synthetic_data):
    import signal
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    main(["--model", "dit", "--model.hidden_dim=32", "--model.depth=1", "--model.num_heads=2", "--model.num_kv_heads=1",
          "--batch_size", "4", "--data_dir", synthetic_data, "--max_steps", "1", "--output_dir", str(tmp_path),
          "--grid_per_class", "0", "--run", "nogrid", "--threads=1"])
    assert (tmp_path / "nogrid" / "checkpoint.pth").exists() and not (tmp_path / "nogrid" / "sample_grid.png").exists()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # the run's own are gone


# -----------------------------------------------------------------------------
# schedules and the metrics file


def test_lr_at_warms_up_linearly_then_stays_constant():
    tc = {"learning_rate": 1e-3, "warmup_steps": 4, "lr_cooldown": 0.0}
    assert [train_ddp.lr_at(step, tc) for step in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert train_ddp.lr_at(0, {"learning_rate": 1e-3, "warmup_steps": 0, "lr_cooldown": 0.0}) == 1e-3
    assert train_ddp.lr_at(5, tc, progress=0.99) == 1e-3  # no cooldown: constant to the end


def test_lr_at_cools_down_linearly_to_zero_over_the_runs_last_fraction():
    tc = {"learning_rate": 1e-3, "warmup_steps": 0, "lr_cooldown": 0.25}
    progress = [0.0, 0.5, 0.75, 0.8, 0.875, 0.95, 1.0, 1.2]
    assert [train_ddp.lr_at(100, tc, p) for p in progress] == pytest.approx([1e-3, 1e-3, 1e-3, 8e-4, 5e-4, 2e-4, 0, 0])
    # improved-diffusion's lr_anneal_steps: the whole run is the cooldown, lr (1 - step / N), times the warm-up
    tc = {"learning_rate": 1e-3, "warmup_steps": 2, "lr_cooldown": 1.0}
    assert [train_ddp.lr_at(s, tc, s / 10) for s in (0, 1, 5, 9)] == pytest.approx([5e-4, 9e-4, 5e-4, 1e-4])


def test_run_progress_counts_steps_or_minutes_whichever_ends_the_run_first():
    assert train_ddp.run_progress(25, 100, elapsed=0.0, max_minutes=0) == 0.25
    assert train_ddp.run_progress(25, 100, elapsed=9999.0, max_minutes=0) == 0.25  # no time limit
    assert train_ddp.run_progress(25, 100, elapsed=45.0, max_minutes=1.0) == 0.75  # minutes end it first
    assert train_ddp.run_progress(90, 100, elapsed=6.0, max_minutes=1.0) == 0.9  # steps end it first
    assert train_ddp.run_progress(10, 100, elapsed=120.0, max_minutes=1.0) == 1.0


def test_a_cooldown_ends_the_run_at_a_rate_near_zero_and_resumes_exactly(tmp_path, synthetic_data):
    common = ["--model", "dit", "--model.hidden_dim=32", "--model.depth=1", "--model.num_heads=2",
              "--model.num_kv_heads=1", "--batch_size", "4", "--data_dir", synthetic_data, "--save_interval", "4",
              "--output_dir", str(tmp_path), "--grid_per_class=0", "--training.warmup_steps=0",
              "--training.precision=fp32", "--training.learning_rate=1e-3", "--training.lr_cooldown=0.5",
              "--max_steps", "16", "--training.checkpoint_epochs=[1]"]  # 40 images: epoch 1 ends at step 10
    main(common + ["--run", "straight"])
    with open(tmp_path / "straight" / "training_log.csv") as f:
        rates = [float(r["lr"]) for r in csv.DictReader(f)]
    # each row holds the rate of its last step, the one from step - 1 to step: constant over the first half,
    # then (1 - (step - 1) / 16) / 0.5 of it
    assert rates == pytest.approx([1e-3, 1e-3, 6.25e-4, 1.25e-4])
    # a run resumed inside the cooldown (from step 10) goes on down the same slope
    os.makedirs(tmp_path / "split")
    shutil.copy(tmp_path / "straight" / "checkpoint_epoch_1.pth", tmp_path / "split" / "checkpoint.pth")
    main(["--resume", str(tmp_path / "split" / "checkpoint.pth"), "--output_dir", str(tmp_path),
          "--grid_per_class=0", "--save_interval", "4"])
    split = torch.load(tmp_path / "split" / "checkpoint.pth", weights_only=False)
    assert split["step"] == 16 and split["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1.25e-4)
    assert_same_checkpoint_weights(torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=False), split)


def test_ema_rate_at_warms_up_to_the_configured_rate():
    assert train_ddp.ema_rate_at(0, 0.9999) == pytest.approx(0.1)  # 1 / 10
    assert train_ddp.ema_rate_at(10, 0.9999) == pytest.approx(11 / 20)
    assert train_ddp.ema_rate_at(1000, 0.9999) == pytest.approx(1001 / 1010)
    assert train_ddp.ema_rate_at(10 ** 6, 0.9999) == 0.9999  # the warm-up passes the rate near step 90,000
    assert train_ddp.ema_rate_at(8, 0.5) == 0.5 and train_ddp.ema_rate_at(7, 0.5) == pytest.approx(8 / 17)


def test_resume_drops_metrics_rows_past_its_checkpoint(tmp_path, synthetic_data):
    common = ["--model", "dit", "--model.hidden_dim=32", "--model.depth=1", "--model.num_heads=2",
              "--model.num_kv_heads=1", "--batch_size", "4", "--data_dir", synthetic_data, "--save_interval", "1",
              "--output_dir", str(tmp_path), "--grid_per_class", "0", "--threads=1"]
    main(common + ["--max_steps", "2", "--run", "crashed"])
    path = tmp_path / "crashed" / "training_log.csv"
    with open(path) as f:
        header = f.readline()
    with open(path, "a") as f:  # rows a crash left behind without their checkpoint
        for step in (3, 4):
            f.write(",".join(str(step) if c == "step" else "999" for c in header.strip().split(",")) + "\n")
    main(["--resume", str(tmp_path / "crashed" / "checkpoint.pth"), "--max_steps", "3", "--grid_per_class", "0",
          "--threads=1"])
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["loss"]) != 999 and float(rows[-1]["loss"]) < 10


# -----------------------------------------------------------------------------
# one job per run folder: a repeated command or a second job never loses a run


def tiny_run(synthetic_data, tmp_path, *extra):
    return ["--model", "dit", "--model.hidden_dim=32", "--model.depth=1", "--model.num_heads=2",
            "--model.num_kv_heads=1", "--batch_size", "4", "--data_dir", synthetic_data, "--output_dir", str(tmp_path),
            "--grid_per_class=0", "--training.precision=fp32", "--save_interval", "2", "--run", "seq", *extra]


def metrics_steps(path):
    with open(path) as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


def test_the_same_command_again_stops_before_training_and_keeps_the_run(tmp_path, synthetic_data, capsys):
    main(tiny_run(synthetic_data, tmp_path, "--max_steps", "6"))
    folder = tmp_path / "seq"
    before = torch.load(folder / "checkpoint.pth", weights_only=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_run(synthetic_data, tmp_path, "--max_steps", "2"))  # a shell history slip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(folder) in err
    assert f"--resume {folder / 'checkpoint.pth'}" in err and "--run" in err and "--overwrite" in err
    after = torch.load(folder / "checkpoint.pth", weights_only=False)
    assert after["step"] == before["step"] == 6
    assert_same_checkpoint_weights(before, after)
    assert metrics_steps(folder / "training_log.csv") == [2, 4, 6]
    assert not (folder / ".lock").exists()
    # on purpose, it trains over it; resumed, it goes on appending
    main(tiny_run(synthetic_data, tmp_path, "--max_steps", "2", "--overwrite"))
    assert torch.load(folder / "checkpoint.pth", weights_only=False)["step"] == 2
    main(["--resume", str(folder / "checkpoint.pth"), "--max_steps", "4", "--grid_per_class=0"])
    assert metrics_steps(folder / "training_log.csv") == [2, 4]


def hold_lock(folder):
    """A live process of another job holding folder's lock, as a running training would."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from checkpoint import claim_run_folder; claim_run_folder(sys.argv[2], [], False); "
                               "print('locked', flush=True); time.sleep(600)", ROOT, str(folder)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_job_on_a_folder_in_use_stops_naming_the_holder(tmp_path, synthetic_data, capsys):
    import socket
    main(tiny_run(synthetic_data, tmp_path, "--max_steps", "2"))
    holder = hold_lock(tmp_path / "seq")
    try:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:  # even resuming: the folder is another job's
            main(["--resume", str(tmp_path / "seq" / "checkpoint.pth"), "--max_steps", "4", "--grid_per_class=0"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"in use by process {holder.pid} on {socket.gethostname()}" in err
        assert torch.load(tmp_path / "seq" / "checkpoint.pth", weights_only=False)["step"] == 2
        assert metrics_steps(tmp_path / "seq" / "training_log.csv") == [2]
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_job_is_taken_over_with_a_warning(tmp_path, synthetic_data, capsys):
    main(tiny_run(synthetic_data, tmp_path, "--max_steps", "2"))
    holder = hold_lock(tmp_path / "seq")
    holder.send_signal(signal.SIGKILL)  # kill -9: no chance to remove its lock
    holder.wait()
    assert (tmp_path / "seq" / ".lock").exists()
    capsys.readouterr()
    main(["--resume", str(tmp_path / "seq" / "checkpoint.pth"), "--max_steps", "4", "--grid_per_class=0"])
    err = capsys.readouterr().err
    assert f"locked by process {holder.pid}, which is gone: taking the lock over" in err
    assert torch.load(tmp_path / "seq" / "checkpoint.pth", weights_only=False)["step"] == 4
    assert not (tmp_path / "seq" / ".lock").exists()


def signalled_run(tmp_path, synthetic_data, *signals):
    """A long tiny run, sent the signals once its first checkpoint is written; (stdout, the checkpoint)."""
    import time
    args = tiny_run(synthetic_data, tmp_path, "--max_steps", "100000", "--grid_per_class=1", "--sampling.steps=2")
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_cpu.py"), *args], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    checkpoint = tmp_path / "seq" / "checkpoint.pth"
    deadline = time.time() + 300
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    for i, signum in enumerate(signals):
        if i:
            time.sleep(0.3)  # the same signal sent twice at once arrives once: the second comes once the first is seen
        process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0 and "Traceback" not in stderr, stderr[-2000:]
    state = torch.load(checkpoint, weights_only=False)
    assert f"done: step {state['step']}," in stdout
    return stdout, state


def test_ctrl_c_saves_and_still_draws_the_grids(tmp_path, synthetic_data):
    """A person who stops a run with Ctrl-C gets its pictures; a scheduler's SIGTERM (below) does not wait for them."""
    signalled_run(tmp_path, synthetic_data, signal.SIGINT)
    assert (tmp_path / "seq" / "sample_grid.png").exists() and (tmp_path / "seq" / "timestep_grid_10x10.png").exists()


def test_a_second_sigterm_does_not_break_the_save_the_first_asked_for(tmp_path, synthetic_data):
    # the second is a scheduler's repeat, while the run saves; saved, the run leaves without the grids
    signalled_run(tmp_path, synthetic_data, signal.SIGTERM, signal.SIGTERM)
    assert not (tmp_path / "seq" / "sample_grid.png").exists()
