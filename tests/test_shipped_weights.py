"""Weights shipped for the lessons (lessons/weights/): how they are made, and what they score.

lessons/weights/ship.py turns a finished training run into a float16 safetensors file whose
metadata records the command, the recipe and what those float16 weights score on the test set
and on its first 1,000 images. Here it is run on a tiny run on synthetic images, and its file is
checked against a re-measurement. (The shipped recipe weights themselves get a test of their
recorded accuracy on real CIFAR-10 when they are added.)
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from minivit import get_preset
from minivit.data import synthetic_cifar10
from minivit.pretrained import load_pretrained
from minivit.train import Recipe, predict, train

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "lessons" / "weights"


def _ship_module(monkeypatch, data):
    spec = importlib.util.spec_from_file_location("ship", WEIGHTS / "ship.py")
    ship = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship)
    monkeypatch.setattr(ship, "find_cifar10", lambda *a, **k: "synthetic")
    monkeypatch.setattr(ship, "load_cifar10", lambda path, limit=None: data)
    return ship


def test_ship_writes_float16_weights_whose_notes_say_what_they_score(tmp_path, monkeypatch):
    data = synthetic_cifar10(n_train=384, n_test=1200, seed=3)
    config = get_preset("cifar-lesson", depth=1, dim=32, heads=2, mlp_dim=64)
    train(config, data, Recipe(epochs=2, batch_size=32, lr=3e-3, warmup=0.5), tmp_path / "run", log_every=0)
    ship = _ship_module(monkeypatch, data)
    out = tmp_path / "shipped"
    out.mkdir()
    ship.main([str(tmp_path / "run"), "tiny", "--command", "minivit train (tiny)", "--out-dir", str(out)])

    path = out / "tiny.safetensors"
    assert sorted(p.name for p in out.iterdir()) == ["tiny.metrics.csv", "tiny.safetensors"]   # no temp file
    with safe_open(str(path), framework="np") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {np.dtype(np.float16)}
    model, meta = load_pretrained(path)
    notes = meta["notes"]
    assert notes["command"] == "minivit train (tiny)" and notes["epochs"] == 2 and notes["recipe"]["epochs"] == 2
    assert meta["class_names"] == data.classes and model.config == config
    # what the notes record is what these float16 weights score, re-measured here
    correct = predict(model, data.test_images, 250, meta["mean"], meta["std"]).argmax(axis=1) == data.test_labels
    assert notes["float16_test_correct"] == int(correct.sum()) and notes["float16_test_images"] == 1200
    assert notes["float16_slice_correct"] == int(correct[:1000].sum())
    assert correct.mean() > 0.3                    # it learned the colours (chance 0.1): real weights were shipped
    run_csv = (tmp_path / "run" / "metrics.csv").read_text()
    assert (out / "tiny.metrics.csv").read_text() == run_csv
    assert notes["run_test_accuracy"] == pytest.approx(float(run_csv.strip().splitlines()[-1].split(",")[5]))
    json.dumps(notes, allow_nan=False)


def test_ship_refuses_an_unfinished_run(tmp_path, monkeypatch):
    data = synthetic_cifar10(n_train=64, n_test=64, seed=3)
    config = get_preset("cifar-lesson", depth=1, dim=32, heads=2, mlp_dim=64)
    train(config, data, Recipe(epochs=1, batch_size=32, warmup=0.5), tmp_path / "run", log_every=0)
    meta_path = tmp_path / "run"
    ship = _ship_module(monkeypatch, data)
    # the same run, claiming more epochs than it ran: as a run stopped early would look
    monkeypatch.setattr(ship, "load_checkpoint", lambda p: _claim_epochs(ship, p, 3))
    with pytest.raises(SystemExit, match="ship finished runs only"):
        ship.main([str(meta_path), "tiny", "--command", "x", "--out-dir", str(tmp_path)])
    assert not list(tmp_path.glob("*.safetensors"))


def _claim_epochs(ship, path, epochs):
    from minivit.checkpoint import load_checkpoint
    state, optim, meta = load_checkpoint(path)
    meta = dict(meta, recipe=dict(meta["recipe"], epochs=epochs))
    return state, optim, meta


def test_ship_writes_a_resnet_as_a_weights_only_checkpoint_with_its_batchnorm_averages(tmp_path, monkeypatch):
    from minivit.checkpoint import load_checkpoint, load_model_checkpoint
    from minivit.resnet import ResNetConfig
    data = synthetic_cifar10(n_train=256, n_test=1100, seed=4)
    config = ResNetConfig(block="basic", layers=(1, 1), widths=(4, 8), stem="cifar", shortcut="A", num_classes=10,
                          img_size=32)
    train(config, data, Recipe(epochs=2, batch_size=32, lr=0.05, optimizer="sgd", warmup=0.5, clip_grad=0.0),
          tmp_path / "run", log_every=0)
    ship = _ship_module(monkeypatch, data)
    out = tmp_path / "shipped"
    out.mkdir()
    ship.main([str(tmp_path / "run"), "cnn", "--command", "minivit train --model (tiny)", "--out-dir", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["cnn.metrics.csv", "cnn.npz"]          # no temp file
    state, optimizer_state, meta = load_checkpoint(out / "cnn.npz")
    assert optimizer_state is None                                  # weights only: no momentum buffers
    run_state, _, _ = load_checkpoint(tmp_path / "run" / "checkpoint.npz")
    assert state.keys() == run_state.keys() and "layer1.0.bn1.running_var" in state
    for name, value in run_state.items():                           # float32 as trained, buffers included
        np.testing.assert_array_equal(state[name], value)
    model, meta = load_model_checkpoint(out / "cnn.npz")
    notes = meta["notes"]
    assert model.config == config and meta["class_names"] == data.classes and notes["epochs"] == 2
    # what the notes record is what the file scores, re-measured here in eval mode (running averages)
    correct = predict(model, data.test_images, 250, meta["normalize"]["mean"],
                      meta["normalize"]["std"]).argmax(axis=1) == data.test_labels
    assert notes["shipped_test_correct"] == int(correct.sum()) and notes["shipped_test_images"] == 1100
    assert notes["shipped_slice_correct"] == int(correct[:1000].sum())


def test_ship_scores_a_run_of_some_classes_on_those_classes(tmp_path, monkeypatch):
    from minivit.experiments import class_subset
    data = synthetic_cifar10(n_train=384, n_test=1200, seed=3)
    classes = (7, 2, 5)
    config = get_preset("cifar-lesson", depth=1, dim=32, heads=2, mlp_dim=64, num_classes=3)
    subset = class_subset(data, classes)
    train(config, subset, Recipe(epochs=1, batch_size=32, lr=3e-3, warmup=0.5), tmp_path / "run", log_every=0)
    ship = _ship_module(monkeypatch, data)
    with pytest.raises(SystemExit, match="use --classes"):         # 3 outputs, 10 classes of data
        ship.main([str(tmp_path / "run"), "sub", "--command", "x", "--out-dir", str(tmp_path)])
    for bad in ("7,2,7", "7,x", "3", "2,10"):
        with pytest.raises(SystemExit):
            ship.main([str(tmp_path / "run"), "sub", "--command", "x", "--out-dir", str(tmp_path), "--classes", bad])
    ship.main([str(tmp_path / "run"), "sub", "--command", "x", "--out-dir", str(tmp_path), "--classes", "7,2,5"])
    model, meta = load_pretrained(tmp_path / "sub.safetensors")
    notes = meta["notes"]
    assert meta["class_names"] == [data.classes[c] for c in classes] and notes["classes"] == [7, 2, 5]
    correct = predict(model, subset.test_images, 250, meta["mean"], meta["std"]).argmax(axis=1) == subset.test_labels
    assert notes["float16_test_images"] == len(subset.test_labels) == int(np.isin(data.test_labels, classes).sum())
    assert notes["float16_test_correct"] == int(correct.sum())


def test_shipped_weights_stay_small():
    total = sum(p.stat().st_size for p in [*WEIGHTS.glob("*.safetensors"), *WEIGHTS.glob("*.npz")])
    assert total < 25e6, f"lessons/weights holds {total / 1e6:.1f} MB of weights; keep it under 25 MB"


def test_the_shipped_recipe_weights_score_what_they_record(cifar_archive):
    """lessons/weights/cifar-recipe.safetensors: the recipe's 20-epoch weights, re-scored on the
    first 1,000 real test images against the count recorded when they were shipped."""
    from minivit.data import load_cifar10
    from minivit.train import read_metrics_csv

    model, meta = load_pretrained(WEIGHTS / "cifar-recipe.safetensors")
    notes = meta["notes"]
    assert model.config == get_preset("cifar-recipe")
    assert Recipe(**notes["recipe"]) == Recipe() and notes["epochs"] == 20     # the recipe as minivit train runs it
    # (compared as Recipes: fields added since, such as optimizer, take their defaults)
    assert notes["command"].startswith("minivit train")
    history = read_metrics_csv(WEIGHTS / "cifar-recipe.metrics.csv")
    assert [r["epoch"] for r in history] == list(range(1, 21))
    assert history[-1]["test_acc"] == notes["run_test_accuracy"] > 0.7
    data = load_cifar10(cifar_archive)
    logits = predict(model, data.test_images[:1000], 250, meta["mean"], meta["std"])
    correct = int((logits.argmax(axis=1) == data.test_labels[:1000]).sum())
    # The same weights and batches as when shipped; only a BLAS thread count could move a near tie.
    assert abs(correct - notes["float16_slice_correct"]) <= 2, (correct, notes["float16_slice_correct"])
    # float16 storage costs (almost) nothing: the shipped weights score what the run's float32 ones did
    assert abs(notes["float16_test_correct"] / notes["float16_test_images"] - notes["run_test_accuracy"]) < 0.003


# The first-1,000 count of lessons/weights/exp-base.safetensors, measured once when it was shipped
# (ship.py's float16_slice_correct) and pinned here, so that a changed file or a changed forward
# pass shows up as a different number.
EXP_BASE_SLICE_CORRECT = 447


def test_the_shipped_experiment_base_weights_score_what_they_record(cifar_archive):
    """lessons/weights/exp-base.safetensors: the final weights of the experiments' base run
    (minivit.experiments.BASE_CONFIG and BASE_RECIPE, seed 0: run "seed=0", which every experiment
    shares), read by lesson 6; re-scored on the first 1,000 real test images."""
    from minivit.data import load_cifar10
    from minivit.experiments import BASE_CONFIG, BASE_RECIPE
    from minivit.train import read_metrics_csv

    model, meta = load_pretrained(WEIGHTS / "exp-base.safetensors")
    notes = meta["notes"]
    assert model.config == BASE_CONFIG
    # Recipe(**...): fields added to Recipe after the run take their defaults, which is what the run used
    assert Recipe(**notes["recipe"]) == BASE_RECIPE.replace(seed=0) and notes["epochs"] == BASE_RECIPE.epochs
    assert notes["command"].startswith("python -m minivit.experiments pool_lr --runs") and "seed=0" in notes["command"]
    history = read_metrics_csv(WEIGHTS / "exp-base.metrics.csv")
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5]
    assert history[-1]["test_acc"] == notes["run_test_accuracy"]
    assert notes["float16_slice_correct"] == EXP_BASE_SLICE_CORRECT
    data = load_cifar10(cifar_archive, limit=1000)
    logits = predict(model, data.test_images, 250, meta["mean"], meta["std"])
    correct = int((logits.argmax(axis=1) == data.test_labels).sum())
    # The same weights and batches as when shipped; only a BLAS thread count could move a near tie.
    assert abs(correct - EXP_BASE_SLICE_CORRECT) <= 2, (correct, EXP_BASE_SLICE_CORRECT)


EXP_TRANSFER_SLICE_CORRECT = 623   # first 1,000 test images of classes 0-4, measured when shipped


def test_the_shipped_transfer_weights_score_what_they_record(cifar_archive):
    """lessons/weights/exp-transfer-0-4.safetensors: the transfer experiment's seed-0 run, trained on
    CIFAR-10 classes 0-4 only (lesson 10); re-scored on the first 1,000 test images of those classes."""
    from minivit.data import load_cifar10
    from minivit.experiments import BASE_CONFIG, SOURCE_CLASSES, class_subset, transfer
    from minivit.train import read_metrics_csv
    model, meta = load_pretrained(WEIGHTS / "exp-transfer-0-4.safetensors")
    notes = meta["notes"]
    run = transfer((0,))[0]
    config, recipe = run.build()
    assert model.config == config == BASE_CONFIG.replace(num_classes=5)
    assert Recipe(**notes["recipe"]) == recipe and notes["epochs"] == recipe.epochs == 4
    assert meta["class_names"] == ["airplane", "automobile", "bird", "cat", "deer"]
    assert notes["command"].startswith("python -m minivit.experiments transfer --runs") and run.name in notes["command"]
    history = read_metrics_csv(WEIGHTS / "exp-transfer-0-4.metrics.csv")
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert history[-1]["test_acc"] == notes["run_test_accuracy"]
    assert notes["float16_test_images"] == 5000 and notes["float16_slice_correct"] == EXP_TRANSFER_SLICE_CORRECT
    data = class_subset(load_cifar10(cifar_archive), SOURCE_CLASSES)
    logits = predict(model, data.test_images[:1000], 250, meta["mean"], meta["std"])
    correct = int((logits.argmax(axis=1) == data.test_labels[:1000]).sum())
    assert abs(correct - EXP_TRANSFER_SLICE_CORRECT) <= 2, (correct, EXP_TRANSFER_SLICE_CORRECT)
    assert abs(notes["float16_test_correct"] / notes["float16_test_images"] - notes["run_test_accuracy"]) < 0.003


EXP_RESNET20_SLICE_CORRECT = 613   # first 1,000 test images, measured when shipped


def test_the_shipped_resnet20_weights_score_what_they_record(cifar_archive):
    """lessons/weights/exp-resnet20.npz: the data_scale_cnn experiment's ResNet-20 run on the first
    5,000 training images, seed 0 (lesson 11); a weights-only checkpoint with its BatchNorm running
    averages, re-scored in eval mode on the first 1,000 real test images."""
    from minivit.checkpoint import load_model_checkpoint
    from minivit.config import get_model_preset
    from minivit.data import load_cifar10
    from minivit.experiments import data_scale_cnn
    from minivit.train import read_metrics_csv

    model, meta = load_model_checkpoint(WEIGHTS / "exp-resnet20.npz")
    notes = meta["notes"]
    run = next(r for r in data_scale_cnn((0,)) if r.variant["model"] == "resnet20" and r.variant["train_images"] == 5000)
    config, recipe = run.build()
    assert model.config == config == get_model_preset("resnet20")
    assert Recipe(**notes["recipe"]) == recipe and notes["epochs"] == recipe.epochs == 20
    assert notes["command"].startswith("python -m minivit.experiments data_scale_cnn --runs") and run.name in notes["command"]
    history = read_metrics_csv(WEIGHTS / "exp-resnet20.metrics.csv")
    assert [r["epoch"] for r in history] == list(range(1, 21))
    assert history[-1]["test_acc"] == notes["run_test_accuracy"]
    assert notes["shipped_test_images"] == 10000 and notes["shipped_slice_correct"] == EXP_RESNET20_SLICE_CORRECT
    data = load_cifar10(cifar_archive, limit=1000)
    logits = predict(model, data.test_images, 250, meta["normalize"]["mean"], meta["normalize"]["std"])
    correct = int((logits.argmax(axis=1) == data.test_labels).sum())
    assert abs(correct - EXP_RESNET20_SLICE_CORRECT) <= 2, (correct, EXP_RESNET20_SLICE_CORRECT)
    # the run measured the first 5,000 test images, the notes all 10,000: close, not equal
    assert abs(notes["shipped_test_correct"] / notes["shipped_test_images"] - notes["run_test_accuracy"]) < 0.02
