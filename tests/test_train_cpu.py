import copy
import csv
import os
import subprocess
import sys

import pytest
import torch

from config import load_config
from conftest import assert_same_checkpoint_weights
from diffusion import Diffusion, get_beta_schedule
from model import build_model
import train_cpu
from train_cpu import main, train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED_COMMAND = ("--image_size 32 --num_channels 64 --num_res_blocks 2 --diffusion_steps 1000 --noise_schedule {} "
                "--lr 1e-4 --batch_size 8 --microbatch 4").split()
# keep the seed's flags but shrink what they leave to config, so a few steps take seconds
SMALL = ["--model.channel_mult=[1]", "--model.attention_resolutions=[]", "--sampling.steps=2",
         "--grid_per_class=1", "--threads=2"]


def run_script(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train_cpu.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("schedule", ["linear", "polynomial"])
def test_seed_command_runs_and_writes_metrics_csv(tmp_path, synthetic_data, schedule):
    args = [a.format(schedule) for a in SEED_COMMAND] + ["--data_dir", synthetic_data, "--max_steps", "2",
                                                          "--save_interval", "1", "--log_interval", "1",
                                                          "--run", "r", "--output_dir", str(tmp_path)] + SMALL
    main(args)
    with open(tmp_path / "r" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2]
    for column in ["loss", "mse", "grad_norm", "q0", "q1", "q2", "q3", "images_per_s"]:
        assert all(float(r[column]) >= 0 for r in rows), column
    for name in ("checkpoint.pth", "loss.png", "samples.png"):
        assert (tmp_path / "r" / name).stat().st_size > 0
    state = torch.load(tmp_path / "r" / "checkpoint.pth", weights_only=False)
    assert state["step"] == 2 and state["config"]["diffusion"]["noise_schedule"] == schedule
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
        optimizer = torch.optim.AdamW(m.parameters(), lr=1e-3)
        torch.manual_seed(1)  # the same t and noise for both
        results.append(train_step(m, diffusion, optimizer, x, y, microbatch=size, grad_clip=1.0))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][2], results[1][2], rtol=1e-5, atol=1e-6)
    for a, b in zip(model.parameters(), micro.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_resume_continues_exactly(tmp_path, synthetic_data):
    common = ["--model", "dit", "--model.hidden_dim=32", "--model.depth=1", "--model.num_heads=2",
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
    with open(tmp_path / "split" / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [3, 6]


def test_precision_auto_follows_the_bf16_matmul_race(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert train_cpu.autocast_dtype_for("fp32", cpu) is None
    assert train_cpu.autocast_dtype_for("fp32", cuda) is None
    assert train_cpu.autocast_dtype_for("bf16", cpu) is torch.bfloat16
    assert train_cpu.autocast_dtype_for("auto", cuda) is torch.bfloat16
    monkeypatch.setattr(train_cpu, "bf16_matmul_speedup", lambda: 2.5)  # a CPU with AMX
    assert train_cpu.autocast_dtype_for("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(train_cpu, "bf16_matmul_speedup", lambda: 0.08)  # one without native bf16
    assert train_cpu.autocast_dtype_for("auto", cpu) is None


def test_bf16_matmul_speedup_times_both_dtypes(monkeypatch):
    ratio = train_cpu.bf16_matmul_speedup(n=64, repeats=2)
    assert 0 < ratio < float("inf")
    seen = []
    real_perf_counter = train_cpu.time.perf_counter
    monkeypatch.setattr(train_cpu.time, "perf_counter", lambda: seen.append(1) or real_perf_counter())
    train_cpu.bf16_matmul_speedup(n=8, repeats=3)
    assert len(seen) == 2 * 2 * 3  # a start and an end for each dtype in each round


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
    with open(tmp_path / "eager" / "metrics.csv") as f, open(tmp_path / "compiled" / "metrics.csv") as g:
        eager_loss, compiled_loss = (float(list(csv.DictReader(h))[-1]["loss"]) for h in (f, g))
    assert abs(eager_loss - compiled_loss) < 1e-3 * eager_loss


@pytest.mark.parametrize("schedule", ["linear", "polynomial"])
def test_both_schedules_train_a_tiny_model(schedule):
    assert not (get_beta_schedule("polynomial", 1000) == get_beta_schedule("linear", 1000)).all()
    cfg = load_config(["--model.name=dit", "--model.hidden_dim=64", "--model.depth=2", "--model.num_heads=4",
                       "--model.num_kv_heads=2", "--model.class_dropout=0.0", f"--diffusion.noise_schedule={schedule}"])
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
