"""
The one configuration loader every script imports: config.yaml (or --config PATH), then command-line
overrides --section.key=value, then checks that catch impossible combinations before a long run starts.
A bad value is a one-line error naming it, with exit status 2 and no traceback. ArgumentParser is argparse
as every script uses it for its own flags, written once here.
"""
import argparse
import copy
import os
import sys

import yaml

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.yaml")
# what a key meant before it existed, for configs saved in checkpoints older than the key: such a model was
# trained on eps with plain MSE, whatever config.yaml's default is now
LEGACY_VALUES = {"diffusion": {"prediction": "eps", "loss_weighting": "none", "zero_terminal_snr": False,
                               "timestep_sampling": "uniform", "lognormal_mean": -1.2, "lognormal_std": 1.2},
                 "model": {"skip": False, "final_conv": False, "stem": "patch", "mlp_conv": False,
                           "downsample": False}}


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def typed_like(default, value, key):
    """value, checked to have the type of the default (an int is accepted for a float)."""
    if isinstance(default, float) and isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string
        except ValueError:
            pass
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(default, list) and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if type(value) is not type(default):
        fail(f"{key}={value!r}: expected {type(default).__name__}, like {default!r}")
    return value


def cast_like(default, text, key):
    if isinstance(default, str):
        return text  # a string option is taken as written, e.g. --data.data_dir=2024
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        fail(f"--{key}={text!r} is not a valid value")
    return typed_like(default, value, key)


def apply_overrides(cfg, args, sections=None):
    for arg in args:  # "--training.batch_size=64", or --training.batch-size=64 as a flag would be spelled
        key, sep, text = arg.removeprefix("--").partition("=")
        section, _, name = key.partition(".")
        name = name.replace("-", "_")
        if not arg.startswith("--") or not sep or name not in cfg.get(section, {}):
            fail(f"unknown option {arg!r}: expected --section.key=value with a key of config.yaml")
        if sections is not None and section not in sections:
            fail(f"{arg!r} cannot be set here: expected a key of {', '.join(sections)} "
                 f"(the model and its diffusion are the checkpoint's)")
        cfg[section][name] = cast_like(cfg[section][name], text, f"{section}.{name}")
    return cfg


def check(cfg):
    m, d = cfg["model"], cfg["diffusion"]
    choices = {("model", "name"): ("dit", "unet"), ("model", "conditioning"): ("adaln", "token"),
               ("model", "pos_embed"): ("sincos", "learned"), ("model", "stem"): ("patch", "conv"),
               ("diffusion", "timestep_sampling"): ("uniform", "lognormal"),
               ("diffusion", "noise_schedule"): ("linear", "cosine", "polynomial"),
               ("diffusion", "prediction"): ("eps", "v", "x0"), ("diffusion", "loss_weighting"): ("none", "min_snr"),
               ("sampling", "sampler"): ("ddpm", "ddim", "dpm++2m"), ("sampling", "variance"): ("small", "large"),
               ("training", "precision"): ("auto", "fp32", "bf16"), ("sampling", "precision"): ("auto", "fp32", "bf16")}
    for (section, name), allowed in choices.items():
        if cfg[section][name] not in allowed:
            fail(f"{section}.{name}={cfg[section][name]!r} is not one of {', '.join(allowed)}")
    if m["hidden_dim"] % m["num_heads"]:
        fail(f"hidden_dim={m['hidden_dim']} is not divisible by num_heads={m['num_heads']}")
    if m["num_kv_heads"] < 1 or m["num_heads"] % m["num_kv_heads"]:
        fail(f"num_heads={m['num_heads']} is not a multiple of num_kv_heads={m['num_kv_heads']}")
    if m["image_size"] % m["patch_size"]:
        fail(f"image_size={m['image_size']} is not divisible by patch_size={m['patch_size']}")
    if m["name"] == "dit" and m["downsample"] and (m["image_size"] // m["patch_size"]) % 2:
        fail(f"downsample=True halves the token grid, but image_size / patch_size = "
             f"{m['image_size'] // m['patch_size']} is odd")
    if m["name"] == "dit" and (m["hidden_dim"] // m["num_heads"]) % 2:
        fail(f"hidden_dim / num_heads = {m['hidden_dim'] // m['num_heads']} must be even")
    if m["name"] == "dit" and m["pos_embed"] == "sincos" and m["hidden_dim"] % 4:
        fail(f"hidden_dim={m['hidden_dim']} must be a multiple of 4 for sincos position embeddings")
    if m["name"] == "unet" and m["image_size"] % 2 ** (len(m["channel_mult"]) - 1):
        fail(f"image_size={m['image_size']} cannot be halved {len(m['channel_mult']) - 1} times "
             f"for channel_mult={m['channel_mult']}")
    if m["name"] == "unet" and (m["num_channels"] * min(m["channel_mult"])) % m["unet_num_heads"]:
        fail(f"num_channels={m['num_channels']} is not divisible by unet_num_heads={m['unet_num_heads']}")
    if not 0 <= m["class_dropout"] <= 1:  # 1: every label is the null class, an unconditional model
        fail(f"class_dropout={m['class_dropout']} must be in [0, 1]")
    if d["num_steps"] < 1:
        fail(f"num_steps={d['num_steps']} must be at least 1")
    if not 0 < d["beta_start"] <= d["beta_end"] < 1:
        fail(f"beta_start={d['beta_start']}, beta_end={d['beta_end']}: expected 0 < beta_start <= beta_end < 1")
    if d["power"] <= 0:
        fail(f"power={d['power']} must be positive")
    if d["zero_terminal_snr"] and d["prediction"] == "eps":
        fail("zero_terminal_snr=True with prediction=eps: the noise says nothing of the image at alpha_bar_T = 0; "
             "expected prediction v or x0")
    if d["min_snr_gamma"] <= 0:
        fail(f"min_snr_gamma={d['min_snr_gamma']} must be positive")
    t = cfg["training"]
    for name, least in (("log_interval", 1), ("save_interval", 1), ("microbatch", 0), ("threads", 0),
                        ("grid_per_class", 0)):
        if not isinstance(t[name], int) or t[name] < least:
            fail(f"training.{name}={t[name]!r}: expected a whole number of at least {least}")
    if t["microbatch"] and t["batch_size"] % t["microbatch"]:
        fail(f"training.batch_size={t['batch_size']} is not divisible by training.microbatch={t['microbatch']}")
    betas = cfg["training"]["adam_betas"]
    if not (isinstance(betas, list) and len(betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1
                                                                for b in betas)):
        fail(f"training.adam_betas={betas!r}: expected two numbers in [0, 1), like [0.9, 0.999]")
    if not 0 <= t["lr_cooldown"] <= 1:
        fail(f"training.lr_cooldown={t['lr_cooldown']}: expected a fraction of the run in [0, 1]")
    if d["lognormal_std"] <= 0:
        fail(f"diffusion.lognormal_std={d['lognormal_std']} must be positive")
    interval = cfg["sampling"]["guidance_interval"]
    if interval and not (len(interval) == 2 and 0 <= interval[0] < interval[1]):
        fail(f"sampling.guidance_interval={interval}: expected [] or [low, high] with 0 <= low < high")
    for section, name in (("training", "batch_size"), ("sampling", "batch_size"), ("sampling", "steps")):
        if cfg[section][name] < 1:
            fail(f"{section}.{name}={cfg[section][name]} must be at least 1")
    return cfg


def read_yaml(path):
    """The YAML file at path (None when it is empty), or a one-line error."""
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except OSError as e:
        fail(f"cannot read config {path!r}: {e.strerror}")
    except yaml.YAMLError as e:
        fail(f"config {path!r} is not valid YAML: {str(e).splitlines()[0]}")


def read_preset(path, cfg, sections=None):
    """cfg with the values of the YAML file at path; a preset may hold only the keys it changes. Keys of
    sections other than the given ones are checked but not taken."""
    preset = read_yaml(path)
    for section, values in (preset or {}).items():
        if section not in cfg or not isinstance(values, dict):
            fail(f"config {path!r}: unknown section {section!r}")
        for name, value in values.items():
            if name not in cfg[section]:
                fail(f"config {path!r}: unknown key {section}.{name}")
            value = typed_like(cfg[section][name], value, f"{section}.{name}")
            if sections is None or section in sections:
                cfg[section][name] = value
    return cfg


def load_config(args=(), path=None, base=None, sections=None):
    """The configuration as a dict of sections: config.yaml, or base when given (a checkpoint's own config),
    then the keys of a --config PATH (or --config=PATH) among args, or of path, then the --section.key=value
    overrides in args. sections, when given, are the only ones --config and the overrides may set: a script
    that reads a checkpoint takes its model and diffusion from it."""
    args = list(args)
    if "--config" in args:
        i = args.index("--config")
        if i + 1 >= len(args):
            fail("--config needs a path")
        path = args.pop(i + 1)
        args.pop(i)
    for arg in list(args):
        if arg.startswith("--config="):
            path = arg.partition("=")[2]
            args.remove(arg)
    with open(DEFAULT_CONFIG) as f:
        cfg = yaml.safe_load(f)
    if base is not None:
        # keys added to config.yaml after base was saved take their defaults, so older checkpoints resume
        for section, values in LEGACY_VALUES.items():
            cfg[section].update({k: v for k, v in values.items() if k not in base.get(section, {})})
        for section, values in base.items():
            cfg.setdefault(section, {}).update(copy.deepcopy(values))
    if path is not None:
        cfg = read_preset(path, cfg, sections)
    return check(apply_overrides(cfg, args, sections))


class ArgumentParser(argparse.ArgumentParser):
    """A script's own flags, with two conventions of the project: a bad one is a one-line error (fail), and
    every multi-word option takes both spellings, --num_samples and --num-samples, so a command copied from
    one script's help runs in another. parse() returns (flags, the --section.key=value overrides)."""

    def add_argument(self, *names, **kwargs):
        return super().add_argument(*both_spellings(names), **kwargs)

    def add_argument_group(self, *args, **kwargs):
        group = super().add_argument_group(*args, **kwargs)
        add = group.add_argument
        group.add_argument = lambda *names, **kw: add(*both_spellings(names), **kw)
        return group

    def error(self, message):
        fail(message)

    def parse(self, argv):
        flags, rest = self.parse_known_args(argv)
        for arg in rest:
            key, sep, _ = arg.partition("=")
            if not (arg.startswith("--") and "." in key and sep):
                fail(f"unknown option {arg!r}: expected an option of this script (--help) or --section.key=value")
        return flags, rest


def both_spellings(names):
    """--num_samples -> --num_samples, --num-samples (and the other way round); the first stays first, so
    argparse's dest is the same whichever is written."""
    out = []
    for name in names:
        out.append(name)
        if name.startswith("--"):
            other = "--" + (name[2:].replace("_", "-") if "_" in name else name[2:].replace("-", "_"))
            if other not in out and other not in names:
                out.append(other)
    return out
