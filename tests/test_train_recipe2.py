"""The training features of the recipe, part 2 (issue 22) inside `minivit train`: RandAugment,
random erasing, mixup / cutmix with soft targets, and the EMA of the weights (minivit.ema).

Each is off by default; on, a run stays reproducible and resumes bit for bit (weights, optimiser,
EMA, generators and metrics), the EMA follows its formula, and a tiny run still learns.
"""
from __future__ import annotations

import numpy as np
import pytest

from minivit import ViT, ViTConfig
from minivit import train as train_mod
from minivit.checkpoint import load_checkpoint, load_checkpoint_ema, save_checkpoint
from minivit.cli import main
from minivit.data import synthetic_cifar10
from minivit.ema import ModelEma, ema_decay_at
from minivit.optim import AdamW
from minivit.train import RECIPE, RECIPE_FIELDS_ADDED, Recipe, evaluate, read_metrics_csv, train
from test_train import (SMALL, TINY, TINY_ARGS, assert_same_run, at_training_forward, fake_cifar,  # noqa: F401
                        press_ctrl_c, raise_keyboard_interrupt, synthetic_data)

NEW_FIELDS = ("randaug_n", "randaug_m", "reprob", "mixup_alpha", "cutmix_alpha", "mix_prob", "switch_prob",
              "ema_decay", "ema_warmup")
# Every feature on at once (mix_prob < 1 so that some batches are not mixed, both alphas so that
# switch_prob chooses, the EMA with its warmup).
ALL_ON = dict(randaug_n=2, randaug_m=7.0, reprob=0.5, mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=0.8,
              switch_prob=0.5, ema_decay=0.9, ema_warmup=True)


# ----------------------------------------------------------------------------- settings

def test_new_options_are_off_by_default_and_old_checkpoints_resume_with_them_off():
    off = {"randaug_n": 0, "reprob": 0.0, "mixup_alpha": 0.0, "cutmix_alpha": 0.0, "ema_decay": 0.0,
           "ema_warmup": False}
    assert {k: getattr(RECIPE, k) for k in off} == off
    assert not RECIPE.mixup.enabled
    assert {k: RECIPE_FIELDS_ADDED[k] for k in NEW_FIELDS} == {k: getattr(RECIPE, k) for k in NEW_FIELDS}


@pytest.mark.parametrize("field, value, message", [
    ("randaug_n", -1, "--randaug-n must be an integer >= 0"),
    ("randaug_n", 1.5, "--randaug-n must be an integer"),
    ("randaug_m", 11, r"--randaug-m must be in \[0, 10\]"),
    ("reprob", 1.5, r"--reprob must be in \[0, 1\]"),
    ("mix_prob", -0.1, "--mix-prob must be >= 0"),
    ("switch_prob", 2, r"--switch-prob must be in \[0, 1\]"),
    ("mixup_alpha", -1, "--mixup-alpha must be >= 0"),
    ("cutmix_alpha", float("nan"), "--cutmix-alpha must be a finite number"),
    ("ema_decay", 1.0, r"--ema-decay must be in \[0, 1\)"),
    ("ema_warmup", True, "--ema-warmup needs an --ema-decay above 0"),
])
def test_recipe_refuses_bad_values_naming_the_option(field, value, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Recipe(**{field: value})


def test_help_shows_the_new_flags(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--randaug-n", "--randaug-m", "--reprob", "--mixup-alpha", "--cutmix-alpha", "--mix-prob",
                 "--switch-prob", "--ema-decay", "--ema-warmup"):
        assert flag in text


@pytest.mark.parametrize("args, message", [
    (["--randaug-m", "5"], "--randaug-m applies with --randaug-n"),
    (["--mix-prob", "0.5"], "--mix-prob applies with --mixup-alpha or --cutmix-alpha"),
    (["--mixup-alpha", "0.8", "--switch-prob", "0.3"], "--switch-prob applies with both"),
    (["--ema-warmup"], "--ema-warmup needs an --ema-decay"),
])
def test_cli_refuses_options_whose_feature_is_off(tmp_path, capsys, fake_cifar, args, message):
    assert main(["train", *TINY_ARGS, "--epochs", "1", "--warmup", "0.5", "--out", str(tmp_path / "run"),
                 *args]) == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- EMA

def test_ema_decay_follows_timm_model_ema_v3():
    assert ema_decay_at(1, 0.999) == 0.0 and ema_decay_at(1, 0.999, warmup=True) == 0.0   # step 1: a copy
    assert ema_decay_at(2, 0.999) == 0.999
    assert ema_decay_at(2, 0.999, warmup=True) == pytest.approx(1 - 2 ** (-2 / 3))        # t = 1: 0.370
    assert ema_decay_at(1001, 0.999, warmup=True) == pytest.approx(1 - 1001 ** (-2 / 3))  # 0.990
    assert ema_decay_at(10 ** 7, 0.999, warmup=True) == 0.999


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("warmup", [False, True])
def test_ema_matches_its_formula_over_a_few_steps(packed, warmup):
    """With the optimiser's flat buffers (one pass) or without (one array at a time): after steps
    1..4 the EMA is w1, then d_t * ema + (1 - d_t) * w_t, computed here in float64 by hand."""
    model = ViT(TINY.replace(dropout=0.0, drop_path=0.0), seed=0).astype(np.float64)
    rng = np.random.default_rng(0)
    optimizer = AdamW(model.parameters(), lr=0.05) if packed else None
    decay = 0.8
    ema = ModelEma(model, decay, warmup)
    assert bool(ema._flats) == packed
    expected = None
    for step in range(1, 5):
        for p in model.parameters():                     # a step: the weights move
            p.grad = rng.standard_normal(p.data.shape)
            if optimizer is None:
                p.data -= 0.05 * p.grad
        if optimizer is not None:
            optimizer.step()
        ema.update(model, step)
        weights = {k: v.copy() for k, v in model.state_dict().items()}
        if step == 1:
            expected = weights
        else:
            d = decay if not warmup else min(decay, 1 - (1 + (step - 1)) ** (-2 / 3))
            expected = {k: d * expected[k] + (1 - d) * weights[k] for k in weights}
    state = ema.state_dict()
    for name in expected:
        np.testing.assert_allclose(state[name], expected[name], rtol=1e-12, atol=1e-14)
    # Evaluating with the averages puts them in and the weights back exactly.
    with ema.applied_to(model):
        assert all(np.array_equal(model.state_dict()[k], state[k]) for k in state)
    assert all(np.array_equal(model.state_dict()[k], weights[k]) for k in weights)


def test_checkpoint_keeps_the_ema_and_refuses_a_misshapen_one(tmp_path):
    model = ViT(TINY, seed=0)
    ema = ModelEma(model, 0.99)
    for p in model.parameters():
        p.data += 1.0                                   # weights and average now differ
    save_checkpoint(tmp_path / "a.npz", model, None, 1, {}, ema=ema.state_dict())
    loaded = load_checkpoint_ema(tmp_path / "a.npz")
    assert loaded.keys() == ema.state_dict().keys()
    assert all(np.array_equal(loaded[k], v) for k, v in ema.state_dict().items())
    state, _, _ = load_checkpoint(tmp_path / "a.npz")          # the weights load as before
    assert all(np.array_equal(state[k], v) for k, v in model.state_dict().items())
    save_checkpoint(tmp_path / "b.npz", model, None, 1, {})
    assert load_checkpoint_ema(tmp_path / "b.npz") is None
    bad = ema.state_dict()
    bad["head.weight"] = bad["head.weight"][:1]
    save_checkpoint(tmp_path / "c.npz", model, None, 1, {}, ema=bad)
    with pytest.raises(ValueError, match="ema/head.weight"):
        load_checkpoint(tmp_path / "c.npz")


# ----------------------------------------------------------------------------- training with all of it

@pytest.mark.parametrize("stop_at, action", [
    (4, raise_keyboard_interrupt),   # in epoch 2's first step: resumes from the epoch-1 checkpoint
    (2, press_ctrl_c),               # Ctrl-C in epoch 1, step 2: resumes mid-epoch
])
def test_resume_with_every_feature_on_is_bit_identical(tmp_path, monkeypatch, stop_at, action):
    data = synthetic_data()
    recipe = SMALL.replace(**ALL_ON)
    straight = train(TINY, data, recipe, tmp_path / "straight")
    with monkeypatch.context() as m:
        m.setattr(train_mod, "ViT", at_training_forward(stop_at, action))
        assert train(TINY, data, recipe, tmp_path / "stopped").status == "interrupted"
    resumed = train(TINY, data, recipe, tmp_path / "stopped", resume=True)
    assert resumed.status == "finished"
    assert_same_run(tmp_path / "straight", tmp_path / "stopped")          # weights, optimiser, rng, metrics
    ema_a, ema_b = (load_checkpoint_ema(tmp_path / d / "checkpoint.npz") for d in ("straight", "stopped"))
    assert ema_a.keys() == ema_b.keys()
    assert all(np.array_equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert [r["ema_test_acc"] for r in straight.history] == [r["ema_test_acc"] for r in resumed.history]
    # The features changed the run: it is not the same as the plain recipe's.
    plain = train(TINY, data, SMALL, tmp_path / "plain")
    assert plain.history[0]["train_loss"] != straight.history[0]["train_loss"]


def test_ema_outputs_metrics_and_ema_npz(tmp_path):
    data = synthetic_data()
    result = train(TINY, data, SMALL.replace(ema_decay=0.5), tmp_path)
    rows = read_metrics_csv(tmp_path / "metrics.csv")
    assert rows == result.history and {"ema_test_loss", "ema_test_acc"} <= rows[0].keys()
    ema_weights, _, meta = load_checkpoint(tmp_path / "ema.npz")
    assert meta["epoch"] == 2 and meta["optimizer"] is None
    saved = load_checkpoint_ema(tmp_path / "checkpoint.npz")
    assert all(np.array_equal(ema_weights[k], saved[k]) for k in saved)
    raw, _, _ = load_checkpoint(tmp_path / "checkpoint.npz")
    assert any(not np.array_equal(raw[k], saved[k]) for k in saved)      # the average is not the weights
    model = ViT(TINY)
    model.load_state_dict(ema_weights)
    loss, acc = evaluate(model, data.test_images, data.test_labels, 16)
    assert (loss, acc) == pytest.approx((rows[-1]["ema_test_loss"], rows[-1]["ema_test_acc"]), rel=1e-6)
    # Without --ema-decay: no EMA columns, no ema.npz, no ema/ entries.
    train(TINY, data, SMALL.replace(epochs=1), tmp_path / "plain")
    assert "ema_test_acc" not in read_metrics_csv(tmp_path / "plain" / "metrics.csv")[0]
    assert not (tmp_path / "plain" / "ema.npz").exists()
    assert load_checkpoint_ema(tmp_path / "plain" / "checkpoint.npz") is None


def test_a_tiny_run_with_every_feature_on_still_learns(tmp_path):
    data = synthetic_cifar10(n_train=512, n_test=200, seed=1)
    config = ViTConfig(img_size=32, patch_size=8, num_classes=10, dim=32, depth=1, heads=2, mlp_dim=64)
    recipe = Recipe(epochs=4, batch_size=32, lr=3e-3, warmup=0.5, seed=0, **ALL_ON)
    result = train(config, data, recipe.replace(ema_decay=0.95), tmp_path, log_every=0)
    last = result.history[-1]
    assert last["test_acc"] > 0.5 and last["ema_test_acc"] > 0.5, result.history     # chance is 0.1
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_ema_of_a_resnet_averages_batchnorm_statistics_and_copies_its_counter(tmp_path):
    """timm's default: every floating entry of the state (BatchNorm running averages too) is
    averaged; the integer batch counter is copied. And a ResNet run with the EMA resumes bit for bit."""
    from minivit.resnet import ResNet, ResNetConfig
    config = ResNetConfig(layers=(1, 1), widths=(4, 8), stem="cifar", shortcut="A", num_classes=10, img_size=16)
    model = ResNet(config, seed=0)
    rng = np.random.default_rng(0)
    ema = ModelEma(model, 0.5)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    model(rng.standard_normal((4, 3, 16, 16)).astype(np.float32))       # training mode: running stats move
    ema.update(model, 2)                                                 # d = 0.5
    after = model.state_dict()
    for name, value in ema.state_dict().items():
        if "num_batches_tracked" in name:
            assert value == after[name] == 1
        else:
            np.testing.assert_allclose(value, 0.5 * before[name] + 0.5 * after[name], rtol=1e-6)
    assert any("running_mean" in k and not np.array_equal(before[k], after[k]) for k in after)
    data = synthetic_data()
    recipe = SMALL.replace(ema_decay=0.9, mixup_alpha=1.0)
    train(config, data, recipe, tmp_path / "straight")
    real_evaluate, calls = train_mod.evaluate, []

    def ctrl_c_in_the_first_test(*args, **kwargs):      # the run stops after epoch 1, saved
        calls.append(1)
        if len(calls) == 1:
            press_ctrl_c(None)
        return real_evaluate(*args, **kwargs)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(train_mod, "evaluate", ctrl_c_in_the_first_test)
        assert train(config, data, recipe, tmp_path / "stopped").status == "interrupted"
    assert train(config, data, recipe, tmp_path / "stopped", resume=True).status == "finished"
    assert_same_run(tmp_path / "straight", tmp_path / "stopped")
    ema_a, ema_b = (load_checkpoint_ema(tmp_path / d / "checkpoint.npz") for d in ("straight", "stopped"))
    assert all(np.array_equal(ema_a[k], ema_b[k]) for k in ema_a)
