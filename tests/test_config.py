import os
import subprocess
import sys

import pytest
import yaml

from config import DEFAULT_CONFIG, load_config
from conftest import ROOT


def defaults():
    with open(DEFAULT_CONFIG) as f:
        return yaml.safe_load(f)


def one_line_error(capsys, args, path=None):
    with pytest.raises(SystemExit) as exit_info:
        load_config(args, path)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def write_preset(tmp_path, text):
    path = tmp_path / "preset.yaml"
    path.write_text(text)
    return str(path)


def test_no_overrides_give_config_yaml():
    assert load_config([]) == defaults()


@pytest.mark.parametrize("arg, section, name, expected", [
    ("--training.batch_size=64", "training", "batch_size", 64),
    ("--training.learning_rate=3.0e-4", "training", "learning_rate", 3e-4),
    ("--training.learning_rate=3e-4", "training", "learning_rate", 3e-4),  # YAML 1.1 reads 3e-4 as a string
    ("--training.learning_rate=1", "training", "learning_rate", 1.0),  # an int is taken for a float
    ("--training.compile=true", "training", "compile", True),
    ("--model.name=unet", "model", "name", "unet"),
    ("--data.data_dir=2024", "data", "data_dir", "2024"),  # a string stays as written, not a number
    ("--model.channel_mult=[1, 2]", "model", "channel_mult", [1, 2]),
    ("--training.checkpoint_epochs=40", "training", "checkpoint_epochs", [40]),  # a number for a list
])
def test_each_override_type_is_parsed(arg, section, name, expected):
    cfg = load_config([arg])
    assert cfg[section][name] == expected and type(cfg[section][name]) is type(expected)
    untouched = defaults()
    untouched[section][name] = expected
    assert cfg == untouched  # nothing else changed


def test_later_overrides_win():
    assert load_config(["--training.batch_size=64", "--training.batch_size=32"])["training"]["batch_size"] == 32


@pytest.mark.parametrize("arg, named", [
    ("--training.no_such_key=1", "--training.no_such_key=1"),
    ("--nosection.batch_size=1", "--nosection.batch_size=1"),
    ("--training.batch_size", "--training.batch_size"),  # no value
    ("training.batch_size=64", "training.batch_size=64"),  # no leading --
    ("--batch_size=64", "--batch_size=64"),  # no section
])
def test_unknown_or_malformed_options_are_one_line_errors(capsys, arg, named):
    message = one_line_error(capsys, [arg])
    assert named in message and "unknown option" in message


@pytest.mark.parametrize("arg, named, expected", [
    ("--training.batch_size=abc", "'abc'", "expected int"),
    ("--training.batch_size=2.5", "2.5", "expected int"),
    ("--training.compile=maybe", "'maybe'", "expected bool"),
    ("--training.learning_rate=fast", "'fast'", "expected float"),
    ("--model.channel_mult=wide", "'wide'", "expected list"),
    ("--training.batch_size=[1,", "[1,", "not a valid value"),
])
def test_a_value_of_the_wrong_type_is_a_one_line_error(capsys, arg, named, expected):
    message = one_line_error(capsys, [arg])
    assert named in message and expected in message


@pytest.mark.parametrize("args, expected", [
    (["--model.hidden_dim=100"], "hidden_dim=100 is not divisible by num_heads=8"),
    (["--model.num_kv_heads=3"], "num_heads=8 is not a multiple of num_kv_heads=3"),
    (["--model.num_kv_heads=0"], "num_kv_heads=0"),
    (["--model.patch_size=5"], "image_size=32 is not divisible by patch_size=5"),
    (["--model.image_size=30", "--model.patch_size=4"], "image_size=30 is not divisible by patch_size=4"),
    (["--model.hidden_dim=24", "--model.num_heads=8", "--model.num_kv_heads=1"], "hidden_dim / num_heads = 3"),
    (["--model.class_dropout=1.5"], "class_dropout=1.5 must be in [0, 1]"),
    (["--model.class_dropout=-0.1"], "class_dropout=-0.1"),
    (["--diffusion.beta_start=0.1", "--diffusion.beta_end=0.01"], "beta_start=0.1, beta_end=0.01"),
    (["--training.batch_size=0"], "training.batch_size=0"),
    (["--sampling.steps=0"], "sampling.steps=0"),
    (["--diffusion.zero_terminal_snr=true", "--diffusion.prediction=eps"], "zero_terminal_snr=True with prediction=eps"),
    (["--diffusion.min_snr_gamma=0"], "min_snr_gamma=0.0 must be positive"),
    (["--sampling.guidance_interval=[5, 1]"], "guidance_interval=[5, 1]"),
    (["--sampling.guidance_interval=[1]"], "expected [] or [low, high]"),
    (["--training.batch_size=6", "--training.microbatch=4"],
     "training.batch_size=6 is not divisible by training.microbatch=4"),
])
def test_impossible_combinations_are_one_line_errors(capsys, args, expected):
    assert expected in one_line_error(capsys, args)


@pytest.mark.parametrize("arg, expected", [
    ("--model.name=vit", "model.name='vit' is not one of dit, unet"),
    ("--model.conditioning=cross", "model.conditioning='cross'"),
    ("--model.pos_embed=rope", "model.pos_embed='rope'"),
    ("--diffusion.noise_schedule=sigmoid", "diffusion.noise_schedule='sigmoid'"),
    ("--sampling.sampler=euler", "sampling.sampler='euler' is not one of ddpm, ddim, dpm++2m"),
    ("--sampling.variance=learned", "sampling.variance='learned' is not one of small, large"),
    ("--diffusion.prediction=score", "diffusion.prediction='score' is not one of eps, v, x0"),
    ("--diffusion.loss_weighting=p2", "diffusion.loss_weighting='p2' is not one of none, min_snr"),
    ("--training.precision=fp16", "training.precision='fp16' is not one of auto, fp32, bf16"),
    ("--model.stem=resnet", "model.stem='resnet' is not one of patch, conv"),
    ("--model.downsample=true --model.image_size=24 --model.patch_size=8",
     "downsample=True halves the token grid, but image_size / patch_size = 3 is odd"),
    ("--diffusion.timestep_sampling=logit", "diffusion.timestep_sampling='logit' is not one of uniform, lognormal"),
    ("--diffusion.lognormal_std=0", "diffusion.lognormal_std=0.0 must be positive"),
    ("--training.adam_betas=[0.9]", "training.adam_betas=[0.9]: expected two numbers in [0, 1)"),
    ("--training.microbatch=-1", "training.microbatch=-1: expected a whole number of at least 0"),
    ("--training.threads=-2", "training.threads=-2: expected a whole number of at least 0"),
    ("--training.save_interval=0", "training.save_interval=0: expected a whole number of at least 1"),
    ("--training.grid_per_class=-1", "training.grid_per_class=-1: expected a whole number of at least 0"),
    ("--training.adam_betas=[0.9,1.0]", "training.adam_betas=[0.9, 1.0]: expected two numbers in [0, 1)"),
    ("--training.lr_cooldown=1.5", "training.lr_cooldown=1.5: expected a fraction of the run in [0, 1]"),
    ("--training.lr_cooldown=-0.1", "training.lr_cooldown=-0.1: expected a fraction of the run in [0, 1]"),
])
def test_a_bad_choice_is_a_one_line_error(capsys, arg, expected):
    assert expected in one_line_error(capsys, arg.split())


# -----------------------------------------------------------------------------
# --config preset files


@pytest.mark.parametrize("form", ["two args", "equals", "path argument"])
def test_a_preset_holds_only_its_changes_and_overrides_come_last(tmp_path, form):
    path = write_preset(tmp_path, "training:\n  batch_size: 16\n  learning_rate: 1\nmodel:\n  depth: 4\n")
    overrides = ["--model.depth=6"]
    if form == "two args":
        cfg = load_config(["--config", path] + overrides)
    elif form == "equals":
        cfg = load_config([f"--config={path}"] + overrides)
    else:
        cfg = load_config(overrides, path)
    expected = defaults()
    expected["training"].update(batch_size=16, learning_rate=1.0)
    expected["model"]["depth"] = 6
    assert cfg == expected and type(cfg["training"]["learning_rate"]) is float


@pytest.mark.parametrize("text, expected", [
    ("trainer:\n  batch_size: 16\n", "unknown section 'trainer'"),
    ("training:\n  batchsize: 16\n", "unknown key training.batchsize"),
    ("training:\n  batch_size: sixteen\n", "training.batch_size='sixteen': expected int"),
    ("model:\n  num_kv_heads: 3\n", "num_heads=8 is not a multiple of num_kv_heads=3"),
    ("training: [batch_size: 16\n", "is not valid YAML"),
])
def test_a_bad_preset_is_a_one_line_error_naming_it(tmp_path, capsys, text, expected):
    path = write_preset(tmp_path, text)
    message = one_line_error(capsys, ["--config", path])
    assert expected in message
    if "section" in expected or "key" in expected or "YAML" in expected:
        assert path in message


def test_a_missing_preset_or_path_is_a_one_line_error(tmp_path, capsys):
    missing = str(tmp_path / "nowhere.yaml")
    assert missing in one_line_error(capsys, ["--config", missing])
    assert "--config needs a path" in one_line_error(capsys, ["--config"])


def test_the_presets_in_configs_load():
    folder = os.path.join(ROOT, "configs")
    for name in sorted(os.listdir(folder)):
        if name.endswith(".yaml"):
            load_config(["--config", os.path.join(folder, name)])


def test_base_config_takes_overrides_without_being_changed():
    base = load_config(["--training.batch_size=16"])
    cfg = load_config(["--model.depth=2"], base=base)
    assert cfg["model"]["depth"] == 2 and cfg["training"]["batch_size"] == 16
    assert base["model"]["depth"] == defaults()["model"]["depth"]


def test_base_config_saved_before_a_key_existed_gets_its_default():
    old = load_config(["--training.batch_size=16"])
    del old["training"]["save_interval"]  # as in a checkpoint written before the key was added
    cfg = load_config(["--model.depth=2"], base=old)
    assert cfg["training"]["save_interval"] == defaults()["training"]["save_interval"]
    assert cfg["training"]["batch_size"] == 16 and "save_interval" not in old["training"]


def test_a_checkpoint_from_before_prediction_targets_stays_eps_whatever_the_default(tmp_path, monkeypatch):
    """A model trained before diffusion.prediction existed predicted eps with plain MSE; a newer config.yaml
    default (v, min_snr, zero terminal SNR) must not reinterpret it."""
    import config
    import yaml
    old = load_config([])
    for key in ("prediction", "loss_weighting", "min_snr_gamma", "zero_terminal_snr"):
        del old["diffusion"][key]
    del old["sampling"]["guidance_interval"], old["sampling"]["variance"]
    newer = defaults()
    newer["diffusion"].update(prediction="v", loss_weighting="min_snr", zero_terminal_snr=True)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(newer))
    monkeypatch.setattr(config, "DEFAULT_CONFIG", str(tmp_path / "config.yaml"))
    cfg = load_config([], base=old)
    assert (cfg["diffusion"]["prediction"], cfg["diffusion"]["loss_weighting"], cfg["diffusion"]["zero_terminal_snr"]) \
        == ("eps", "none", False)
    assert cfg["sampling"]["guidance_interval"] == [] and cfg["sampling"]["variance"] == "small"
    assert load_config([])["diffusion"]["prediction"] == "v"  # while a new run takes the new default


def test_a_checkpoint_from_before_the_dit_options_stays_a_plain_dit_whatever_the_default(tmp_path, monkeypatch):
    """A DiT saved before model.skip, final_conv, stem, mlp_conv and diffusion.timestep_sampling existed had none
    of them; a config.yaml that turns them on for new runs must not add them to it (its weights would not load)."""
    import config
    import yaml
    old = load_config(["--model.name=dit"])
    for key in ("skip", "final_conv", "stem", "mlp_conv", "downsample"):
        del old["model"][key]
    del old["diffusion"]["timestep_sampling"]
    newer = defaults()
    newer["model"].update(skip=True, final_conv=True, stem="conv", mlp_conv=True, downsample=True)
    newer["diffusion"].update(timestep_sampling="uniform", lognormal_mean=0.5, lognormal_std=2.0)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(newer))
    monkeypatch.setattr(config, "DEFAULT_CONFIG", str(tmp_path / "config.yaml"))
    cfg = load_config([], base=old)
    m = cfg["model"]
    assert (m["skip"], m["final_conv"], m["stem"], m["mlp_conv"], m["downsample"]) == (False, False, "patch", False,
                                                                                       False)
    assert cfg["diffusion"]["timestep_sampling"] == "uniform"
    assert load_config([])["model"]["skip"] is True  # while a new run takes the new default


def test_a_log_normal_run_from_before_its_centre_was_a_key_resumes_at_edms_centre(tmp_path, monkeypatch):
    """diffusion.lognormal_mean and lognormal_std came after timestep_sampling: lognormal, which drew EDM's
    N(-1.2, 1.2^2) until then; such a run must resume on the levels it trained on, whatever the default now."""
    import config
    import yaml
    old = load_config(["--diffusion.timestep_sampling=lognormal"])
    del old["diffusion"]["lognormal_mean"], old["diffusion"]["lognormal_std"]
    newer = defaults()
    newer["diffusion"].update(lognormal_mean=0.5, lognormal_std=2.0)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(newer))
    monkeypatch.setattr(config, "DEFAULT_CONFIG", str(tmp_path / "config.yaml"))
    d = load_config([], base=old)["diffusion"]
    assert (d["timestep_sampling"], d["lognormal_mean"], d["lognormal_std"]) == ("lognormal", -1.2, 1.2)
    assert load_config([])["diffusion"]["lognormal_mean"] == 0.5  # while a new run takes the new default


def test_a_script_exits_with_status_two_and_no_traceback():
    code = "import sys; from config import load_config; load_config(sys.argv[1:])"
    result = subprocess.run([sys.executable, "-c", code, "--model.num_kv_heads=3"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: num_heads=8 is not a multiple of num_kv_heads=3"


def test_an_override_key_may_be_spelled_with_dashes():
    assert load_config(["--training.batch-size=64"])["training"]["batch_size"] == 64


def test_class_dropout_one_is_allowed_for_an_unconditional_model():
    assert load_config(["--model.class_dropout=1.0"])["model"]["class_dropout"] == 1.0


# -----------------------------------------------------------------------------
# a checkpoint's config with --config and overrides limited to some sections (sample.py, evaluate.py)


def test_a_preset_on_a_base_config_changes_only_its_keys_of_the_allowed_sections(tmp_path):
    base = load_config(["--model.depth=2", "--sampling.steps=7", "--sampling.eta=0.5"])
    path = write_preset(tmp_path, "model:\n  depth: 12\nsampling:\n  steps: 30\n")
    cfg = load_config(["--config", path, "--sampling.guidance_scale=2"], base=base, sections=("sampling",))
    assert cfg["model"]["depth"] == 2  # the checkpoint's, not the preset's
    assert (cfg["sampling"]["steps"], cfg["sampling"]["eta"], cfg["sampling"]["guidance_scale"]) == (30, 0.5, 2.0)
    everything = load_config(["--config", path], base=base)  # a resumed training run takes all of it
    assert everything["model"]["depth"] == 12 and everything["sampling"]["steps"] == 30


def test_an_override_outside_the_allowed_sections_is_a_one_line_error(capsys):
    import config
    with pytest.raises(SystemExit) as exit_info:
        config.load_config(["--model.depth=2"], base=load_config([]), sections=("sampling", "evaluation"))
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and "'--model.depth=2' cannot be set here" in message and "sampling, evaluation" in message


# -----------------------------------------------------------------------------
# the scripts' own flags


def parser_of_both_kinds():
    import config
    parser = config.ArgumentParser()
    parser.add_argument("--num_samples", type=int, default=0)
    parser.add_argument("--no-ema", action="store_true")
    parser.add_argument("--steps", type=int)
    parser.add_argument_group("a group").add_argument("--guidance_interval")
    return parser


@pytest.mark.parametrize("argv", [
    ["--num_samples", "3", "--no-ema", "--guidance_interval", "all"],
    ["--num-samples", "3", "--no_ema", "--guidance-interval", "all"],
    ["--num-samples=3", "--no_ema", "--guidance-interval=all"],
])
def test_every_multi_word_flag_takes_both_spellings(argv):
    flags, overrides = parser_of_both_kinds().parse(argv + ["--sampling.steps=2"])
    assert (flags.num_samples, flags.no_ema, flags.guidance_interval, flags.steps) == (3, True, "all", None)
    assert overrides == ["--sampling.steps=2"]


@pytest.mark.parametrize("argv, named", [
    (["--bogus", "1"], "--bogus"),
    (["--steps", "many"], "many"),
    (["sampling.steps=2"], "sampling.steps=2"),
])
def test_a_bad_flag_is_a_one_line_error(capsys, argv, named):
    with pytest.raises(SystemExit) as exit_info:
        parser_of_both_kinds().parse(argv)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and message.startswith("error: ") and named in message
