import csv
import json
import os
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import torch

import evaluate
from checkpoint import save_checkpoint
from classifier import CifarNet, augment, classifier_state, per_class_accuracy, train_classifier
from config import load_config
from data import load_cifar10, write_synthetic_cifar
from diffusion import Diffusion
from model import build_model
from train_ddp import train_step

TINY_DIT = ["--model.name=dit", "--model.hidden_dim=32", "--model.depth=1", "--model.num_heads=2",
            "--model.num_kv_heads=1", "--sampling.steps=2", "--sampling.batch_size=10"]


def tiny_checkpoint(path, epoch=1, steps=2, overrides=(), seed=0):
    """A checkpoint as the training scripts write it, from a few real training steps of a tiny DiT."""
    torch.manual_seed(seed)
    cfg = load_config(TINY_DIT + list(overrides))
    model = build_model(cfg["model"])
    diffusion = Diffusion.from_config(cfg["diffusion"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        train_step(model, diffusion, optimizer, torch.rand(4, 3, 32, 32) * 2 - 1, torch.randint(0, 10, (4,)))
    save_checkpoint({"model": model.state_dict(), "ema": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "step": epoch * steps, "epoch": epoch, "elapsed": 60.0 * epoch, "config": cfg,
                     "class_names": [f"class{i}" for i in range(10)]}, str(path))
    return str(path)


def expect_one_line_error(capsys, run, *fragments):
    capsys.readouterr()  # drop what earlier steps printed
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Synthetic data, a tiny trained classifier and random-weight Inception weights, shared by the tests."""
    root = tmp_path_factory.mktemp("evaluate")
    data_dir = write_synthetic_cifar(str(root / "data"), num_train=60, num_test=40)
    train, train_labels, names = load_cifar10(data_dir, "train")
    test, test_labels, _ = load_cifar10(data_dir, "test")
    net, accuracy, seconds = train_classifier(train, train_labels, test, test_labels, epochs=2, widths=(8, 8, 8, 8),
                                              batch_size=20, progress=False)
    save_checkpoint(classifier_state(net, accuracy, seconds, 1, names, test), str(root / "classifier.pth"))
    return {"root": root, "data": data_dir, "classifier": str(root / "classifier.pth")}


def random_inception_weights(path):
    """A state dict in the layout of the 2015-12-05 Inception file, with random values: the real weights are
    not on these machines, so only the wiring can be tested."""
    from torch_fidelity import feature_extractor_inceptionv3 as inception
    with mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None):
        net = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), path)
    return str(path)


# -----------------------------------------------------------------------------
# the metric functions against plain references


def random_covariance(rng, dim):
    a = rng.normal(size=(dim, dim + 3))
    return a @ a.T / dim


def test_frechet_distance_matches_scipy_on_random_gaussians():
    rng = np.random.default_rng(0)
    for dim in (1, 5, 16):
        mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
        sigma1, sigma2 = random_covariance(rng, dim), random_covariance(rng, dim)
        expected = (np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
                    - 2 * np.trace(scipy.linalg.sqrtm(sigma1 @ sigma2).real))
        got = evaluate.frechet_distance(mu1, sigma1, mu2, sigma2)
        assert isinstance(got, float)
        assert got == pytest.approx(expected, rel=1e-8, abs=1e-9)


def test_frechet_distance_is_zero_for_identical_statistics():
    rng = np.random.default_rng(1)
    mu, sigma = rng.normal(size=12), random_covariance(rng, 12)
    assert abs(evaluate.frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    assert evaluate.frechet_distance(mu, sigma, mu + 1, sigma) == pytest.approx(12.0)


def test_inception_score_is_one_for_identical_predictions():
    logits = torch.randn(1, 1008, generator=torch.Generator().manual_seed(0)).repeat(100, 1)
    mean, std = evaluate.inception_score(logits)
    assert mean == pytest.approx(1.0, abs=1e-9) and std == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("num_classes", [2, 10])
def test_inception_score_equals_number_of_classes_for_uniform_one_hot(num_classes):
    one_hot = torch.eye(num_classes).repeat(30, 1)  # every class equally often, each prediction certain
    mean, _ = evaluate.inception_score(100.0 * one_hot, splits=1)
    assert mean == pytest.approx(num_classes, rel=1e-6)


def test_kernel_inception_distance_is_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(0)
    same = evaluate.kernel_inception_distance(rng.normal(size=(100, 8)), rng.normal(size=(100, 8)))[0]
    shifted = evaluate.kernel_inception_distance(rng.normal(size=(100, 8)), rng.normal(1, 1, size=(100, 8)))[0]
    assert abs(same) < 0.05 < shifted


# -----------------------------------------------------------------------------
# the Inception wiring, on random weights


def test_inception_feature_path_gives_pool_features_and_logits(tmp_path):
    weights = random_inception_weights(tmp_path / "inception.pth")
    extractor = evaluate.build_inception(weights, "cpu")
    images = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    features = evaluate.inception_features(extractor, images, batch_size=2, device="cpu")
    assert features["2048"].shape == (3, 2048) and features["logits_unbiased"].shape == (3, 1008)
    assert torch.isfinite(features["2048"]).all()


def test_inception_weights_of_another_layout_are_a_one_line_error(tmp_path, capsys):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "foreign.pth")
    expect_one_line_error(capsys, lambda: evaluate.build_inception(str(tmp_path / "foreign.pth"), "cpu"),
                          "foreign.pth")


def test_missing_inception_weights_offline_say_how_to_provide_them(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FID_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached copy either
    with mock.patch("data.online", return_value=False):
        expect_one_line_error(capsys, lambda: evaluate.inception_weights(None), "--inception-weights", "FID_WEIGHTS",
                              "6726825d")
    monkeypatch.setenv("FID_WEIGHTS", str(tmp_path / "absent.pth"))
    expect_one_line_error(capsys, lambda: evaluate.inception_weights(None), "absent.pth")


# -----------------------------------------------------------------------------
# the project's classifier


def test_classifier_learns_synthetic_classes(tmp_path):
    data_dir = write_synthetic_cifar(str(tmp_path), num_train=300, num_test=100)
    train, train_labels, _ = load_cifar10(data_dir, "train")
    test, test_labels, _ = load_cifar10(data_dir, "test")
    untrained = (CifarNet((8, 8, 16, 16)).eval()(test).argmax(1) == test_labels).float().mean().item()
    net, accuracy, _ = train_classifier(train, train_labels, test, test_labels, epochs=4, widths=(8, 8, 16, 16),
                                        batch_size=16, progress=False)
    assert accuracy >= 0.5 > untrained + 0.2  # chance is 0.1


def test_augment_only_flips_and_shifts_by_at_most_two_pixels():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    out = augment(images, torch.Generator().manual_seed(0))
    centre = out[:, :, 2:-2, 2:-2]  # the part no 2-pixel shift can move out of the picture
    for image, result in zip(images.float(), centre):
        candidates = [source[:, 2 + dy:30 + dy, 2 + dx:30 + dx] for source in (image, image.flip(2))
                      for dy in range(-2, 3) for dx in range(-2, 3)]
        assert any(torch.equal(result, c) for c in candidates)


def test_per_class_accuracy_matches_a_plain_count(workspace):
    from classifier import load_classifier, predict_logits
    net, _ = load_classifier(workspace["classifier"])
    images = torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(30) % 3
    overall, per_class = per_class_accuracy(net, images, labels, 10)
    predicted = predict_logits(net, images).argmax(1)
    assert overall == pytest.approx(sum(int(p == l) for p, l in zip(predicted, labels)) / 30)
    for c in range(3):
        picked = [int(p == c) for p, l in zip(predicted, labels) if l == c]
        assert per_class[c] == pytest.approx(sum(picked) / len(picked))
    assert per_class[3:] == [None] * 7


# -----------------------------------------------------------------------------
# the command line


def common_args(workspace, out, cache=None):
    return ["--data-dir", workspace["data"], "--classifier", workspace["classifier"], "--output-dir", str(out),
            "--cache-dir", str(cache or out / "cache"), "--batch-size", "10"]


def random_reference(path, rng):
    """Reference statistics in the --ref PATH format, so the test need not push a data set through Inception."""
    features = rng.normal(size=(64, 2048))
    np.savez(path, mu=features.mean(0), sigma=np.cov(features, rowvar=False), kid_features=features)
    return str(path)


@pytest.mark.slow  # ~24 s on two busy cores: ten images through a 299x299 Inception network
def test_checkpoint_to_results_json_with_inception_and_classifier_metrics(workspace, tmp_path, capsys):
    checkpoint = tiny_checkpoint(tmp_path / "best_model.pth")
    weights = random_inception_weights(tmp_path / "inception.pth")
    reference = random_reference(tmp_path / "ref.npz", np.random.default_rng(0))
    evaluate.main(["--checkpoint", checkpoint, "--num-samples", "10", "--calculate-fid", "--calculate-is",
                   "--calculate-kid", "--inception-weights", weights, "--ref", reference]
                  + common_args(workspace, tmp_path))
    assert "NOT comparable" in capsys.readouterr().err  # 10 < 50,000 samples
    with open(tmp_path / "evaluation_results.json") as f:
        results = json.load(f)
    assert results["num_samples"] == 10 and results["checkpoint"] == checkpoint
    for key in ("fid_score", "inception_score_mean", "inception_score_std", "kid_mean", "classifier_fid",
                "classifier_accuracy"):
        assert np.isfinite(results[key]), key
    # an inception score is at least 1; a model that draws one class scores 1 to within rounding
    assert results["fid_score"] > 0 and results["inception_score_mean"] >= 1 - 1e-9
    assert results["sampler"] == "dpm++2m" and results["steps"] == 2 and results["reference"] == reference
    assert len(results["classifier_accuracy_per_class"]) == 10 and results["timing"]["samples_per_s"] > 0
    assert (tmp_path / "real_vs_fake.png").stat().st_size > 0

    # the kept samples file scores the same on its own (sampling and scoring as separate jobs)
    again = tmp_path / "again"
    evaluate.main(["--samples", str(tmp_path / "samples.npz")] + common_args(workspace, again))
    with open(again / "evaluation_results.json") as f:
        rescored = json.load(f)
    assert rescored["classifier_fid"] == pytest.approx(results["classifier_fid"], rel=1e-9)
    assert rescored["classifier_accuracy"] == pytest.approx(results["classifier_accuracy"])


def test_all_metrics_offline_trains_the_classifier_then_scores_with_it(workspace, tmp_path, capsys, monkeypatch):
    """make eval on a machine with no Inception weights and no classifier yet: the classifier metrics only."""
    monkeypatch.delenv("FID_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached weights
    monkeypatch.setattr("data.online", lambda host: False)
    checkpoint = tiny_checkpoint(tmp_path / "best_model.pth")
    classifier = tmp_path / "model" / "classifier.pth"
    args = common_args(workspace, tmp_path)
    args[args.index("--classifier") + 1] = str(classifier)
    evaluate.main(["--checkpoint", checkpoint, "--num-samples", "10", "--all-metrics", "--classifier-epochs", "1"]
                  + args)
    assert "no FID, IS or KID" in capsys.readouterr().out
    assert classifier.is_file()
    with open(tmp_path / "evaluation_results.json") as f:
        results = json.load(f)
    assert results["fid_score"] is None and results["inception_score_mean"] is None
    assert np.isfinite(results["classifier_accuracy"]) and np.isfinite(results["classifier_fid"])


def test_all_metrics_asks_for_inception_metrics_when_the_weights_are_at_hand(workspace, tmp_path, monkeypatch):
    monkeypatch.delenv("FID_WEIGHTS", raising=False)
    checkpoint = tiny_checkpoint(tmp_path / "best_model.pth")
    (tmp_path / "weights.pth").write_bytes(b"")
    args = evaluate.parse_args(["--checkpoint", checkpoint, "--all-metrics", "--inception-weights",
                                str(tmp_path / "weights.pth")] + common_args(workspace, tmp_path))
    assert args.calculate_fid and args.calculate_is and args.calculate_kid
    assert not args.train_classifier  # the workspace's classifier exists
    args = evaluate.parse_args(["--checkpoint", checkpoint] + common_args(workspace, tmp_path))
    assert not (args.calculate_fid or args.calculate_is or args.calculate_kid or args.train_classifier)


@pytest.mark.slow
def test_reference_statistics_are_computed_once_and_cached(tmp_path):
    data_dir = write_synthetic_cifar(str(tmp_path / "data"), num_train=10, num_test=5)
    weights = random_inception_weights(tmp_path / "inception.pth")
    extractor = evaluate.build_inception(weights, "cpu")
    (tmp_path / "unused.npz").touch()  # parse_args wants an existing samples path; it is never read here
    args = evaluate.parse_args(["--samples", str(tmp_path / "unused.npz"), "--data-dir", data_dir, "--cache-dir",
                                str(tmp_path / "cache"), "--batch-size", "5"])
    first = evaluate.reference_statistics("test", extractor, weights, args)
    images, _, _ = load_cifar10(data_dir, "test")
    features = evaluate.inception_features(extractor, images.permute(0, 2, 3, 1).numpy(), 5, "cpu")["2048"].numpy()
    np.testing.assert_allclose(first["mu"], features.mean(0), rtol=1e-5, atol=1e-6)
    (cache,) = (tmp_path / "cache").glob("fid_stats_cifar10_test_inception-v3-compat_*.npz")
    with mock.patch.object(evaluate, "inception_features", side_effect=AssertionError("recomputed")):
        second = evaluate.reference_statistics("test", extractor, weights, args)
    np.testing.assert_array_equal(second["sigma"], first["sigma"])


def test_num_samples_zero_is_a_one_line_error(workspace, tmp_path, capsys):
    expect_one_line_error(capsys, lambda: evaluate.main(["--checkpoint", "x.pth", "--num-samples", "0"]),
                          "--num-samples=0")


def test_missing_checkpoint_is_a_one_line_error(workspace, tmp_path, capsys):
    run = lambda: evaluate.main(["--checkpoint", str(tmp_path / "none.pth")] + common_args(workspace, tmp_path))
    expect_one_line_error(capsys, run, "none.pth")


def test_checkpoint_of_another_architecture_is_a_one_line_error(workspace, tmp_path, capsys):
    path = tiny_checkpoint(tmp_path / "dit.pth")
    state = torch.load(path, weights_only=False)
    state["config"]["model"]["hidden_dim"] = 64  # weights of a 32-wide model under a 64-wide config
    save_checkpoint(state, path)
    run = lambda: evaluate.main(["--checkpoint", path, "--num-samples", "2"] + common_args(workspace, tmp_path))
    expect_one_line_error(capsys, run, "dit.pth", "architecture")


def test_sample_labels_out_of_range_are_a_one_line_error(workspace, tmp_path, capsys):
    images = np.zeros((4, 32, 32, 3), np.uint8)
    np.savez(tmp_path / "bad.npz", images=images, labels=np.array([0, 1, 2, 12]))
    run = lambda: evaluate.main(["--samples", str(tmp_path / "bad.npz")] + common_args(workspace, tmp_path))
    expect_one_line_error(capsys, run, "12", "0..9")


# -----------------------------------------------------------------------------
# the ablation over a run's checkpoints


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_ablation_writes_one_row_per_checkpoint_in_epoch_order_and_resumes(workspace, tmp_path, capsys):
    run_dir = tmp_path / "model"
    for epoch in (10, 2, 5):  # lexical order 10, 2, 5 is not epoch order
        tiny_checkpoint(run_dir / f"checkpoint_epoch_{epoch}.pth", epoch=epoch, steps=1, seed=epoch)
    args = ["--checkpoints", str(run_dir / "checkpoint_epoch_*.pth"), "--num-samples", "10"] + common_args(
        workspace, tmp_path)
    evaluate.main(args)
    rows = read_rows(tmp_path / "ablation.csv")
    assert [int(r["epoch"]) for r in rows] == [2, 5, 10]
    assert all(0 <= float(r["classifier_accuracy"]) <= 1 and float(r["samples_per_s"]) > 0 for r in rows)
    table = (tmp_path / "ablation.md").read_text()
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:5]] == ["2", "5", "10"]
    assert (tmp_path / "ablation.png").stat().st_size > 0

    evaluate.main(args)  # a re-run has nothing left to do
    assert read_rows(tmp_path / "ablation.csv") == rows

    (run_dir / "checkpoint_epoch_7.pth").write_bytes(b"not a checkpoint")
    expect_one_line_error(capsys, lambda: evaluate.main(args), "checkpoint_epoch_7.pth")
    assert read_rows(tmp_path / "ablation.csv") == rows  # nothing already written is lost

    tiny_checkpoint(run_dir / "checkpoint_epoch_7.pth", epoch=7, steps=1, overrides=["--model.hidden_dim=64"])
    expect_one_line_error(capsys, lambda: evaluate.main(args), "checkpoint_epoch_7.pth", "hidden_dim")
    assert read_rows(tmp_path / "ablation.csv") == rows


def test_ablation_glob_matching_nothing_is_a_one_line_error(workspace, tmp_path, capsys):
    run = lambda: evaluate.main(["--checkpoints", str(tmp_path / "none_*.pth")] + common_args(workspace, tmp_path))
    expect_one_line_error(capsys, run, "none_*.pth", "matches no file")


def test_colour_statistics_against_a_plain_count():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 5, 6, 3), dtype=np.uint8)
    images[0, 0, 0] = [0, 255, 17]
    stats = evaluate.colour_statistics(images)
    values = images.astype(np.float64)
    assert stats["clipped_fraction"] == pytest.approx(np.mean([(v == 0) or (v == 255) for v in images.ravel()]))
    for c in range(3):
        assert stats["channel_mean"][c] == pytest.approx(values[..., c].mean())
        assert stats["channel_std"][c] == pytest.approx(values[..., c].std())
    within = np.mean([values[i, :, :, c].std() for i in range(7) for c in range(3)])
    assert stats["within_image_std"] == pytest.approx(within)
    flat = np.full((4, 5, 6, 3), 128, dtype=np.uint8)  # flat images: no spread within, nothing clipped
    assert evaluate.colour_statistics(flat)["within_image_std"] == 0 == evaluate.colour_statistics(flat)["clipped_fraction"]


def test_compare_scores_every_checkpoint_at_every_cell_and_resumes(workspace, tmp_path, capsys):
    first = tiny_checkpoint(tmp_path / "eps" / "checkpoint.pth",
                            overrides=["--diffusion.prediction=eps", "--diffusion.loss_weighting=none"])
    second = tiny_checkpoint(tmp_path / "v" / "checkpoint.pth", overrides=["--diffusion.prediction=v"], seed=1)
    cells = "ddim-2-eta1-g3,dpm++2m-3-g2-i0.5:20,ddpm-2-large"
    args = ["--compare", first, second, "--cells", cells, "--num-samples", "20"] + common_args(workspace, tmp_path)
    evaluate.main(args)
    rows = read_rows(tmp_path / "compare.csv")
    assert [(r["run"], r["cell"]) for r in rows] == [(run, cell) for run in ("eps", "v") for cell in cells.split(",")]
    for r in rows:
        assert 0 <= float(r["classifier_accuracy"]) <= 1 and float(r["classifier_fid"]) > 0
        assert 0 <= float(r["clipped_fraction"]) <= 1 and float(r["channel_std"]) > 0
    assert len((tmp_path / "compare.md").read_text().splitlines()) >= 2 + len(rows)
    assert len(os.listdir(tmp_path / "grids")) == len(rows)
    with np.load(tmp_path / "samples" / "v_dpmpp2m-3-g2-i0.5_20.npz") as f:
        assert f["images"].shape == (20, 32, 32, 3)
    evaluate.main(args)  # a re-run has nothing left to do
    assert read_rows(tmp_path / "compare.csv") == rows
    expect_one_line_error(capsys, lambda: evaluate.main(args[:3] + ["--cells", "euler-20"] + args[5:]),
                          "euler-20", "ddpm, ddim, dpm++2m")
    expect_one_line_error(capsys, lambda: evaluate.main(args[:3] + ["--cells", "ddim-x"] + args[5:]), "ddim-x")


# -----------------------------------------------------------------------------
# the command line: --config, --section.key=value, both spellings


def evaluated(workspace, out, checkpoint, *extra):
    evaluate.main(["--checkpoint", checkpoint, *extra] + common_args(workspace, out))
    with open(out / "evaluation_results.json") as f:
        return json.load(f)


def test_config_and_overrides_set_what_evaluate_samples(workspace, tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "tiny.pth")  # sampling.steps=2 of its own
    results = evaluated(workspace, tmp_path / "a", checkpoint, "--evaluation.num_samples=3", "--sampling.steps=3")
    assert (results["num_samples"], results["steps"], results["seed"]) == (3, 3, 0)
    preset = tmp_path / "preset.yaml"
    preset.write_text("evaluation:\n  num_samples: 5\nsampling:\n  steps: 4\n  seed: 7\n")
    results = evaluated(workspace, tmp_path / "b", checkpoint, "--config", str(preset))
    assert (results["num_samples"], results["steps"], results["seed"]) == (5, 4, 7)
    # the flags win, in either spelling
    results = evaluated(workspace, tmp_path / "c", checkpoint, "--config", str(preset), "--num_samples", "2",
                        "--steps", "1", "--guidance_scale", "2")
    assert (results["num_samples"], results["steps"], results["guidance_scale"]) == (2, 1, 2.0)


def test_evaluate_takes_the_data_dir_from_the_config(workspace, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(evaluate, "real_test_images", lambda args: seen.append(args.data_dir))
    out = tmp_path / "out"
    args = common_args(workspace, out)
    del args[:2]  # no --data-dir flag
    evaluate.main(["--checkpoint", tiny_checkpoint(tmp_path / "tiny.pth"), "--num-samples", "2",
                   f"--data.data_dir={workspace['data']}"] + args)
    assert seen == [workspace["data"]]


@pytest.mark.parametrize("arg, fragment", [
    ("--model.depth=2", "'--model.depth=2' cannot be set here"),
    ("--evaluation.num_samples=0", "--num-samples=0 must be at least 1"),
    ("--evaluation.no_such_key=1", "unknown option '--evaluation.no_such_key=1'"),
])
def test_settings_evaluate_cannot_use_are_one_line_errors(workspace, tmp_path, capsys, arg, fragment):
    run = lambda: evaluate.main(["--checkpoint", tiny_checkpoint(tmp_path / "tiny.pth"), arg]  # noqa: E731
                                + common_args(workspace, tmp_path))
    expect_one_line_error(capsys, run, fragment)


def test_a_second_comparison_into_a_folder_in_use_stops_naming_the_holder(workspace, tmp_path, capsys):
    """Two comparisons into one folder would each append the rows they find missing to compare.csv."""
    import subprocess
    import sys
    checkpoint = tiny_checkpoint(tmp_path / "a" / "checkpoint.pth")
    out = tmp_path / "compare"
    out.mkdir()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from checkpoint import claim_run_folder; claim_run_folder(sys.argv[2], [], True); "
                               "print('locked', flush=True); time.sleep(600)", root, str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = ["--compare", checkpoint, "--cells", "ddim-2", "--num-samples", "4"] + common_args(workspace, out)
        expect_one_line_error(capsys, lambda: evaluate.main(args), f"in use by process {holder.pid}")
        assert not (out / "compare.csv").exists()
    finally:
        holder.kill()
        holder.wait()
    evaluate.main(args)  # once that job is gone, its lock is taken over and the comparison runs
    assert len(read_rows(out / "compare.csv")) == 1
