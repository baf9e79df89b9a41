"""`minivit train` and `minivit eval`: outputs, exact resume, divergence, Ctrl-C, refusals, bad input.

Most tests train a tiny ViT for 2 epochs of 3 steps on a synthetic 16 x 16 data set (well under
a second per run); one trains on a thousand real CIFAR-10 images and must beat chance.
"""
import os
import signal

import numpy as np
import pytest

from minivit import ViT, ViTConfig
from minivit import train as train_mod
from minivit.checkpoint import load_checkpoint
from minivit.cli import main
from minivit.data import CIFAR10
from minivit.train import RECIPE, NonFiniteLossError, Recipe, read_metrics_csv, train

# Dropout and drop-path on, so that resuming must also restore the model's random generator.
TINY = ViTConfig(img_size=16, patch_size=4, num_classes=10, dim=16, depth=2, heads=2, mlp_dim=32,
                 dropout=0.1, drop_path=0.1)
TINY_ARGS = ["--preset", "cifar-lesson", "--set", "img_size=16", "--set", "dim=16", "--set", "depth=1",
             "--set", "heads=2", "--set", "mlp_dim=32"]
# 40 training images in batches of 16: 3 steps per epoch (16, 16, 8), 6 steps in all.
SMALL = Recipe(epochs=2, batch_size=16, lr=3e-3, warmup=0.5, seed=3)
SMALL_ARGS = ["--epochs", "2", "--batch-size", "16", "--lr", "3e-3", "--warmup", "0.5", "--log-every", "2"]


def synthetic_data(n_train=40, n_test=24, seed=0):
    """uint8 images whose mean brightness depends on the class, so there is something to learn."""
    rng = np.random.default_rng(seed)

    def split(n):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 100, (n, 3, 16, 16)) + 15 * labels[:, None, None, None]
        return images.astype(np.uint8), labels.astype(np.int64)
    return CIFAR10(*split(n_train), *split(n_test), classes=[f"class{k}" for k in range(10)])


@pytest.fixture
def fake_cifar(monkeypatch):
    """The CLI loads the synthetic data set instead of CIFAR-10."""
    data = synthetic_data()

    def load(path, limit=None):
        return CIFAR10(data.train_images[:limit], data.train_labels[:limit], data.test_images[:limit],
                       data.test_labels[:limit], data.classes)
    monkeypatch.setattr(train_mod, "find_cifar10", lambda path=None, download=True: "synthetic")
    monkeypatch.setattr(train_mod, "load_cifar10", load)
    return data


def at_training_forward(n, action):
    """A ViT whose n-th forward pass in training mode (counted over its lifetime, from 1)
    passes its logits through action(logits): raise, send a signal, or poison them."""
    calls = [0]

    class PatchedViT(ViT):
        def forward(self, x):
            logits = super().forward(x)
            if self.training:
                calls[0] += 1
                if calls[0] == n:
                    logits = action(logits)
            return logits
    return PatchedViT


def raise_keyboard_interrupt(logits):
    raise KeyboardInterrupt


def press_ctrl_c(logits):
    signal.raise_signal(signal.SIGINT)       # what the terminal sends; the handler runs right away
    return logits


def send_sigterm(logits):
    signal.raise_signal(signal.SIGTERM)      # what kill, docker stop, Slurm and systemd send
    return logits


def make_nan(logits):
    return logits * np.nan


def final_state(out_dir):
    state, optim_state, meta = load_checkpoint(out_dir / "checkpoint.npz")
    return state, optim_state, meta


def assert_same_run(dir_a, dir_b):
    """Bit-identical weights and optimiser state, and the same metrics (except timings)."""
    state_a, optim_a, meta_a = final_state(dir_a)
    state_b, optim_b, meta_b = final_state(dir_b)
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert np.array_equal(state_a[name], state_b[name]), f"{name} differs"
    assert optim_a.keys() == optim_b.keys()
    for key in optim_a:
        a, b = optim_a[key], optim_b[key]
        assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b, f"optimizer {key} differs"
    assert meta_a["rng"] == meta_b["rng"]
    untimed = [{k: v for k, v in row.items() if k not in ("epoch_seconds", "images_per_second")}
               for row in meta_a["metrics"]]
    assert untimed == [{k: v for k, v in row.items() if k not in ("epoch_seconds", "images_per_second")}
                       for row in meta_b["metrics"]]


# ----------------------------------------------------------------------------- resume

@pytest.mark.parametrize("stop_at, action, saved_epoch, saved_step", [
    (4, raise_keyboard_interrupt, 1, None),  # at the first step of epoch 2: the epoch-1 checkpoint stands
    (2, press_ctrl_c, 0, 2),                 # Ctrl-C in epoch 1, step 2: saved after that step
    (6, press_ctrl_c, 1, 3),                 # Ctrl-C in the last step of the run, before its test
    (5, send_sigterm, 1, 2),                 # SIGTERM in epoch 2, step 2: saved after that step
])
def test_resume_after_interruption_is_bit_identical(tmp_path, monkeypatch, capsys, stop_at, action,
                                                    saved_epoch, saved_step):
    data = synthetic_data()
    straight = train(TINY, data, SMALL, tmp_path / "straight")
    assert straight.status == "finished" and len(straight.history) == 2

    with monkeypatch.context() as m:
        m.setattr(train_mod, "ViT", at_training_forward(stop_at, action))
        stopped = train(TINY, data, SMALL, tmp_path / "stopped")
    assert stopped.status == "interrupted"
    assert f"resume with: minivit train --resume --out {tmp_path / 'stopped'}" in capsys.readouterr().out
    meta = final_state(tmp_path / "stopped")[2]
    assert meta["epoch"] == saved_epoch
    assert (meta["progress"] or {}).get("step") == saved_step
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # the handlers were put back
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    resumed = train(TINY, data, SMALL, tmp_path / "stopped", resume=True)
    assert resumed.status == "finished"
    assert_same_run(tmp_path / "straight", tmp_path / "stopped")
    assert read_metrics_csv(tmp_path / "stopped" / "metrics.csv") == resumed.history


def test_resume_refuses_a_different_recipe_or_model(tmp_path):
    data = synthetic_data()
    train(TINY, data, SMALL.replace(epochs=1), tmp_path / "run")
    with pytest.raises(ValueError, match="recipe differs.*'lr'"):
        train(TINY, data, SMALL.replace(epochs=1, lr=0.5), tmp_path / "run", resume=True)
    with pytest.raises(ValueError, match="model config differs.*'depth'"):
        train(TINY.replace(depth=1), data, SMALL.replace(epochs=1), tmp_path / "run", resume=True)
    done = train(TINY, data, SMALL.replace(epochs=1), tmp_path / "run", resume=True)
    assert done.status == "already finished"


# ----------------------------------------------------------------------------- divergence

def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    saved_bytes = {}
    real_save = train_mod.save_checkpoint

    def recording_save(path, *args, **kwargs):
        real_save(path, *args, **kwargs)
        saved_bytes[path.name] = path.read_bytes()
    monkeypatch.setattr(train_mod, "save_checkpoint", recording_save)
    monkeypatch.setattr(train_mod, "ViT", at_training_forward(5, make_nan))   # epoch 2, step 2

    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 2, step 2 .*last good checkpoint is .*"
                                                 r"checkpoint.npz \(epoch 1\).*--lr"):
        train(TINY, synthetic_data(), SMALL, tmp_path)
    assert (tmp_path / "checkpoint.npz").read_bytes() == saved_bytes["checkpoint.npz"]  # the epoch-1 file
    state, _, meta = load_checkpoint(tmp_path / "checkpoint.npz")
    assert meta["epoch"] == 1 and all(np.isfinite(a).all() for a in state.values())
    assert len(read_metrics_csv(tmp_path / "metrics.csv")) == 1
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_cli_nan_exits_nonzero_with_one_line(tmp_path, monkeypatch, capsys, fake_cifar):
    monkeypatch.setattr(train_mod, "ViT", at_training_forward(2, make_nan))
    rc = main(["train", *TINY_ARGS, *SMALL_ARGS, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("minivit train: error: the loss is nan at epoch 1, step 2")
    assert "No checkpoint was written yet" in err[-1]


# ----------------------------------------------------------------------------- the command line

def test_cli_writes_outputs_and_eval_reproduces_the_test_accuracy(tmp_path, capsys, fake_cifar):
    out = tmp_path / "run"
    assert main(["train", *TINY_ARGS, *SMALL_ARGS, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "recipe  epochs=2 batch_size=16 lr=0.003" in printed                # the resolved settings
    assert "step 2/6 | loss " in printed and " img/s | lr " in printed         # step | loss | acc | img/s
    assert "epoch 2/2 | train loss" in printed

    assert sorted(os.listdir(out)) == ["best.npz", "checkpoint.npz", "curves.png", "metrics.csv"]
    rows = read_metrics_csv(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert list(rows[0]) == ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
                             "epoch_seconds", "images_per_second"]
    assert all(np.isfinite(list(r.values())).all() and r["images_per_second"] > 0 for r in rows)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = load_checkpoint(out / "checkpoint.npz")[2]
    assert meta["run"]["preset"] == "cifar-lesson" and "depth=1" in meta["run"]["overrides"]

    assert main(["eval", str(out / "checkpoint.npz")]) == 0
    assert f"test acc {rows[-1]['test_acc']:.4f}" in capsys.readouterr().out
    best = max(rows, key=lambda r: r["test_acc"])
    assert main(["eval", str(out / "best.npz")]) == 0
    assert f"epoch {best['epoch']}, 24 test images | test loss {best['test_loss']:.4f} | " \
           f"test acc {best['test_acc']:.4f}" in capsys.readouterr().out


def test_eval_flip_and_confusion_matrix(tmp_path, capsys, fake_cifar):
    out = tmp_path / "run"
    assert main(["train", *TINY_ARGS, *SMALL_ARGS, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out / "checkpoint.npz"), "--flip"]) == 0
    printed = capsys.readouterr().out
    assert "24 test images (and their mirror images) | test loss" in printed
    table = printed.splitlines()[-10:]                         # one row per class
    counts = np.array([[int(v) for v in row.split()[1:11]] for row in table])
    assert [row.split()[0] for row in table] == fake_cifar.classes
    assert (counts.sum(axis=1) == np.bincount(fake_cifar.test_labels, minlength=10)).all()
    correct = int(printed.split("(")[2].split("/")[0])         # "... test acc 0.xxxx (correct/24 correct)"
    assert np.trace(counts) == correct


def test_confusion_matrix_and_its_table_by_hand():
    labels = np.array([0, 0, 1, 2, 2, 2])
    guesses = np.array([0, 1, 1, 2, 0, 2])
    counts = train_mod.confusion_matrix(labels, guesses, 3)
    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    rows = train_mod.format_confusion(counts, ["ant", "bee", "cat"]).splitlines()
    assert rows[1].split() == ["ant", "1", "1", "0", "50.0%", "bee", "(50.0%)"]
    assert rows[2].split() == ["bee", "0", "1", "0", "100.0%", "-"]              # no mistakes
    assert rows[3].split() == ["cat", "1", "0", "2", "66.7%", "ant", "(33.3%)"]


def test_predict_flip_averages_the_logits_of_the_mirror_image():
    model = ViT(TINY, seed=1)
    images = synthetic_data().test_images
    plain = train_mod.predict(model, images, 7)
    mirrored = train_mod.predict(model, images[..., ::-1], 7)
    assert model.training                                      # predict puts the mode back
    assert plain.shape == (24, 10) and not np.allclose(plain, mirrored)
    np.testing.assert_allclose(train_mod.predict(model, images, 7, flip=True), (plain + mirrored) / 2,
                               rtol=1e-5, atol=1e-6)


def test_cli_ctrl_c_exits_130_and_resume_finishes(tmp_path, monkeypatch, capsys, fake_cifar):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(train_mod, "ViT", at_training_forward(5, raise_keyboard_interrupt))
        assert main(["train", *TINY_ARGS, *SMALL_ARGS, "--out", str(out)]) == 130
    printed = capsys.readouterr().out
    assert f"The last checkpoint is {out / 'checkpoint.npz'} (epoch 1)" in printed
    assert f"resume with: minivit train --resume --out {out}" in printed

    assert main(["train", "--resume", "--out", str(out)]) == 0
    assert "(resumed after epoch 1)" in capsys.readouterr().out
    assert [r["epoch"] for r in read_metrics_csv(out / "metrics.csv")] == [1, 2]


def test_cli_sigterm_saves_the_step_and_exits_143(tmp_path, monkeypatch, capsys, fake_cifar):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(train_mod, "ViT", at_training_forward(5, send_sigterm))
        assert main(["train", *TINY_ARGS, *SMALL_ARGS, "--out", str(out)]) == 143   # 128 + SIGTERM
    printed = capsys.readouterr().out
    assert "SIGTERM: stopping after this step" in printed
    assert f"saved {out / 'checkpoint.npz'}" in printed
    assert final_state(out)[2]["progress"]["step"] == 2

    assert main(["train", "--resume", "--out", str(out)]) == 0
    assert "(resumed in epoch 2, after step 2)" in capsys.readouterr().out
    assert [r["epoch"] for r in read_metrics_csv(out / "metrics.csv")] == [1, 2]


def test_cli_refuses_to_overwrite_a_run(tmp_path, capsys, fake_cifar):
    out = tmp_path / "run"
    assert main(["train", *TINY_ARGS, *SMALL_ARGS, "--epochs", "1", "--out", str(out)]) == 0
    before = (out / "checkpoint.npz").read_bytes()
    capsys.readouterr()
    assert main(["train", *TINY_ARGS, *SMALL_ARGS, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0] and f"--resume --out {out}" in err[0]
    assert (out / "checkpoint.npz").read_bytes() == before

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["train", *TINY_ARGS, "--out", str(other)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert os.listdir(other) == ["notes.txt"]


@pytest.mark.parametrize("args, message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--epochs", "-1"], "--epochs must be an integer >= 1, got -1"),
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--lr", "0"], "--lr must be > 0.0, got 0.0"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--warmup", "3", "--epochs", "2"], "--warmup (3.0 epochs) must not be longer than --epochs (2); "
                                        "for a short run pass a shorter --warmup, e.g. --warmup 0.2"),
    (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1)"),
    (["--limit-train", "0"], "--limit-train must be an integer >= 1, got 0"),
    (["--set", "depth=zero"], "'zero' is not a valid value for depth"),
    (["--set", "colour=red"], "unknown config option 'colour'"),
    (["--preset", "vit-b16"], "the model takes images of 3x224x224 but the train images are 3x16x16"),
    (["--resume"], "--resume needs --out DIR"),
    (["--resume", "--out", "{tmp}/nothing"], "checkpoint not found"),
    (["--log-every", "-1"], "--log-every must be >= 0"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, fake_cifar, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = [] if "--out" in args or "--resume" in args else ["--out", str(tmp_path / "run")]
    assert main(["train", *args, *out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minivit train: error: "), err
    assert message in err[0]


def test_cli_resume_refuses_changed_settings(tmp_path, capsys, fake_cifar):
    out = tmp_path / "run"
    assert main(["train", *TINY_ARGS, *SMALL_ARGS, "--epochs", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(out), "--lr", "0.1", "--set", "depth=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "remove --lr 0.1, --set ['depth=3']" in err[0]
    assert main(["train", "--resume", "--out", str(out), "--lr", "3e-3"]) == 0   # the same value is fine


def test_eval_errors(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing.npz")]) == 2
    assert capsys.readouterr().err.strip() == f"minivit eval: error: checkpoint not found: {tmp_path / 'missing.npz'}"


def test_recipe_defaults_are_the_documented_recipe():
    assert (RECIPE.epochs, RECIPE.batch_size, RECIPE.lr, RECIPE.weight_decay, RECIPE.label_smoothing) == \
           (20, 64, 1e-3, 0.1, 0.1)


# ----------------------------------------------------------------------------- fine-tuning

def test_init_from_pretrained_weights(tmp_path, capsys, fake_cifar):
    pretrained = pytest.importorskip("minivit.pretrained")
    # A "pretrained" model with another image size (8) and 5 classes: fine-tuning must build
    # a new 10-class head and resample its position embeddings from a 2x2 to a 4x4 grid.
    source = ViT(ViTConfig(img_size=8, patch_size=4, num_classes=5, dim=16, depth=1, heads=2, mlp_dim=32), seed=4)
    path = pretrained.save_pretrained(source, tmp_path / "tiny.safetensors", mean=0.5, std=0.5)
    out = tmp_path / "run"
    assert main(["train", "--init", str(path), "--set", "drop_path=0.1", *SMALL_ARGS, "--epochs", "1",
                 "--out", str(out)]) == 0
    assert "head new, zero-initialised" in capsys.readouterr().out
    state, _, meta = load_checkpoint(out / "checkpoint.npz")
    assert meta["config"]["img_size"] == 16 and meta["config"]["num_classes"] == 10
    assert meta["config"]["drop_path"] == 0.1 and meta["run"]["init"] == str(path)
    assert meta["normalize"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert state["pos_embed"].shape == (1, 17, 16) and state["head.weight"].shape == (10, 16)
    assert main(["eval", str(out / "checkpoint.npz")]) == 0
    assert f"test acc {meta['metrics'][-1]['test_acc']:.4f}" in capsys.readouterr().out


# ----------------------------------------------------------------------------- real data

def test_short_run_on_real_cifar10_beats_chance(cifar_archive, tmp_path, capsys):
    """1000 real training images, 3 epochs of a small, fast ViT (4x4 grid of 8x8 patches):
    well above chance (10%) on 500 held-out test images. About 10 s on 2 cores."""
    out = tmp_path / "run"
    args = ["--preset", "cifar-lesson", "--set", "patch_size=8", "--set", "dim=64", "--set", "depth=2",
            "--set", "mlp_dim=128", "--set", "pool=mean", "--epochs", "3", "--batch-size", "64", "--lr", "3e-3",
            "--warmup", "0.5", "--limit-train", "1000", "--limit-test", "500", "--data", str(cifar_archive)]
    assert main(["train", *args, "--out", str(out)]) == 0
    rows = read_metrics_csv(out / "metrics.csv")
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    # Chance is 0.10; with 500 test images its standard deviation is 0.013, so 0.17 is 5 of them.
    assert rows[-1]["test_acc"] >= 0.17, rows
    capsys.readouterr()
    assert main(["eval", str(out / "checkpoint.npz")]) == 0     # finds the data where training found it
    assert f"500 test images | test loss {rows[-1]['test_loss']:.4f} | test acc {rows[-1]['test_acc']:.4f}" \
           in capsys.readouterr().out
