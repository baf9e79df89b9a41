"""`minivit train` and `minivit eval`: outputs, exact resume, divergence, Ctrl-C, refusals, bad input.

Most tests train a tiny ViT for 2 epochs of 3 steps on a synthetic 16 x 16 data set (well under
a second per run); one trains on a thousand real CIFAR-10 images and must beat chance.
"""
import json
import os
import signal
import tempfile
from pathlib import Path

import numpy as np
import pytest

from minivit import ViT, ViTConfig
from minivit import train as train_mod
from minivit.checkpoint import load_checkpoint
from minivit.cli import main
from minivit.data import CIFAR10
from minivit.train import RECIPE, NonFiniteLossError, Recipe, data_fingerprint, read_metrics_csv, train

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


class Killed(BaseException):
    """Stands for kill -9: not an Exception, so nothing in train() catches it or saves anything after it."""


def scripted_test_accuracy(accuracies):
    """A replacement for train.evaluate: the test accuracy of each epoch in turn (loss 1 - acc),
    so that which epoch is the best is chosen by the test."""
    remaining = list(accuracies)

    def evaluate(*args, **kwargs):
        acc = remaining.pop(0)
        return 1.0 - acc, acc
    return evaluate


def stale_temp_file(directory, name):
    """What a save of `name` killed before its rename leaves behind: its hidden temporary
    file, named as save_checkpoint and _write_atomically name it (tempfile.mkstemp)."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    os.write(fd, b"half a file")
    os.close(fd)
    return Path(tmp)


def rewrite_meta(path, change):
    """Edit the meta.json of a checkpoint in place (an older minivit's file, a hostile one)."""
    with np.load(path) as npz:
        arrays = {key: npz[key] for key in npz.files}
    meta = json.loads(str(arrays["meta.json"][()]))
    change(meta)
    arrays["meta.json"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)


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


# ----------------------------------------------------------------------------- a kill between the files of an epoch

def test_resume_repairs_best_npz_after_a_kill_just_before_it(tmp_path, monkeypatch, capsys):
    # Test accuracies 0.2, 0.5, 0.3: epoch 2 is the best. The kill comes after epoch 2's
    # checkpoint.npz and before its best.npz, which still holds epoch 1.
    data, recipe = synthetic_data(), SMALL.replace(epochs=3)
    with monkeypatch.context() as m:
        m.setattr(train_mod, "evaluate", scripted_test_accuracy([0.2, 0.5, 0.3]))
        train(TINY, data, recipe, tmp_path / "straight")
    real_save = train_mod.save_checkpoint

    def killed_before_best_of_epoch_2(path, model, optimizer, epoch, *args, **kwargs):
        if path.name == "best.npz" and epoch == 2:
            raise Killed
        return real_save(path, model, optimizer, epoch, *args, **kwargs)
    run = tmp_path / "killed"
    with monkeypatch.context() as m:
        m.setattr(train_mod, "evaluate", scripted_test_accuracy([0.2, 0.5]))
        m.setattr(train_mod, "save_checkpoint", killed_before_best_of_epoch_2)
        with pytest.raises(Killed):
            train(TINY, data, recipe, run)
    assert final_state(run)[2]["epoch"] == 2 and load_checkpoint(run / "best.npz")[2]["epoch"] == 1
    capsys.readouterr()

    with monkeypatch.context() as m:
        m.setattr(train_mod, "evaluate", scripted_test_accuracy([0.3]))
        assert train(TINY, data, recipe, run, resume=True).status == "finished"
    assert f"repaired {run / 'best.npz'}: it holds epoch 1, but the best test accuracy is at epoch 2" \
        in capsys.readouterr().out
    best, _, meta = load_checkpoint(run / "best.npz")
    assert meta["epoch"] == 2
    straight_best = load_checkpoint(tmp_path / "straight" / "best.npz")[0]
    assert all(np.array_equal(best[name], straight_best[name]) for name in straight_best)
    assert [r["epoch"] for r in read_metrics_csv(run / "metrics.csv")] == [1, 2, 3]


@pytest.mark.parametrize("killed_in", ["write_metrics_csv", "plot_curves"])
def test_resume_of_a_complete_run_repairs_metrics_and_curves(tmp_path, monkeypatch, capsys, killed_in):
    # Killed after the last epoch's checkpoint.npz: the run is complete, but metrics.csv (or
    # curves.png) lacks its last epoch.
    real = getattr(train_mod, killed_in)

    def killed_at_epoch_2(path, history, *args):
        if len(history) == 2:
            raise Killed
        return real(path, history, *args)
    with monkeypatch.context() as m:
        m.setattr(train_mod, killed_in, killed_at_epoch_2)
        with pytest.raises(Killed):
            train(TINY, synthetic_data(), SMALL, tmp_path)
    history = final_state(tmp_path)[2]["metrics"]
    assert len(history) == 2
    stale_curves = (tmp_path / "curves.png").read_bytes()

    result = train(TINY, synthetic_data(), SMALL, tmp_path, resume=True)
    assert result.status == "already finished"
    assert read_metrics_csv(tmp_path / "metrics.csv") == history
    train_mod.plot_curves(tmp_path / "fresh.png", history, SMALL.label_smoothing)
    assert (tmp_path / "curves.png").read_bytes() == (tmp_path / "fresh.png").read_bytes() != stale_curves


# ----------------------------------------------------------------------------- temporary files of killed saves

def test_new_run_removes_the_temp_file_of_a_killed_first_save(tmp_path, capsys, fake_cifar):
    out = tmp_path / "run"
    out.mkdir()
    stale = stale_temp_file(out, "checkpoint.npz")       # `ls` shows nothing: the name starts with a dot
    assert main(["train", *TINY_ARGS, *SMALL_ARGS, "--epochs", "1", "--out", str(out)]) == 0
    assert f"removed 1 unfinished temporary file of an interrupted save from {out}: {stale.name}" \
        in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["best.npz", "checkpoint.npz", "curves.png", "metrics.csv"]


def test_resume_after_a_killed_first_save_says_what_happened(tmp_path, capsys, fake_cifar):
    out = tmp_path / "run"
    out.mkdir()
    stale_temp_file(out, "checkpoint.npz")
    assert main(["train", "--resume", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"nothing to resume in {out}: the run was stopped during its first save" in err[0]
    assert f"start the run again with --out {out} and without --resume" in err[0]
    assert os.listdir(out) == []
    assert main(["train", *TINY_ARGS, *SMALL_ARGS, "--epochs", "1", "--out", str(out)]) == 0


def test_resume_removes_stale_temp_files_and_only_those(tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as m:
        m.setattr(train_mod, "ViT", at_training_forward(4, raise_keyboard_interrupt))
        train(TINY, synthetic_data(), SMALL, tmp_path)
    stale = [stale_temp_file(tmp_path, name).name for name in ("checkpoint.npz", "best.npz", "metrics.csv",
                                                               "curves.png")]
    others = [".notes.abcdefgh.tmp", ".checkpoint.npz.tmp", "checkpoint.npz.abcdefgh.tmp"]   # not its names
    for name in others:
        (tmp_path / name).write_text("keep me")
    capsys.readouterr()
    assert train(TINY, synthetic_data(), SMALL, tmp_path, resume=True).status == "finished"
    assert f"removed 4 unfinished temporary files of an interrupted save from {tmp_path}: " \
           f"{', '.join(sorted(stale))}" in capsys.readouterr().out
    assert sorted(p for p in os.listdir(tmp_path) if p.endswith(".tmp")) == sorted(others)


# ----------------------------------------------------------------------------- the same data on resume

def test_data_fingerprint_tells_data_sets_apart():
    data = synthetic_data()
    splits = (data.train_images, data.train_labels, data.test_images, data.test_labels)
    fingerprint = data_fingerprint(*splits)
    assert data_fingerprint(*(a.copy() for a in splits)) == fingerprint
    other = synthetic_data(seed=1)        # the same sizes
    assert data_fingerprint(other.train_images, other.train_labels, other.test_images, other.test_labels) \
        != fingerprint
    relabelled = data.train_labels.copy()
    relabelled[7] = (relabelled[7] + 1) % 10
    assert data_fingerprint(data.train_images, relabelled, *splits[2:]) != fingerprint
    shuffled = np.random.default_rng(0).permutation(len(data.test_images))
    assert data_fingerprint(*splits[:2], data.test_images[shuffled], data.test_labels[shuffled]) != fingerprint
    one_pixel = data.test_images.copy()
    one_pixel[3, 0, 0, 0] += 1            # a pixel every image contributes to the hash
    assert data_fingerprint(*splits[:2], one_pixel, data.test_labels) != fingerprint


def test_resume_refuses_other_data_of_the_same_size_unless_allowed(tmp_path, monkeypatch, capsys):
    data, other = synthetic_data(), synthetic_data(seed=1)
    with monkeypatch.context() as m:
        m.setattr(train_mod, "ViT", at_training_forward(4, raise_keyboard_interrupt))   # stopped after epoch 1
        train(TINY, data, SMALL, tmp_path)
    before = (tmp_path / "checkpoint.npz").read_bytes()
    with pytest.raises(ValueError, match=r"cannot resume .*checkpoint.npz: data differs: the same numbers of "
                                         r"images, but not the images or labels the run started with .*"
                                         r"--allow-other-data to continue on this data on purpose"):
        train(TINY, other, SMALL, tmp_path, resume=True)
    assert (tmp_path / "checkpoint.npz").read_bytes() == before
    capsys.readouterr()

    assert train(TINY, other, SMALL, tmp_path, resume=True, allow_other_data=True).status == "finished"
    assert "note: continuing on other data than the run started with" in capsys.readouterr().out
    saved = final_state(tmp_path)[2]["data"]["fingerprint"]
    assert saved == data_fingerprint(other.train_images, other.train_labels, other.test_images, other.test_labels)


def test_resume_of_an_old_checkpoint_without_a_fingerprint_gives_a_note(tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as m:
        m.setattr(train_mod, "ViT", at_training_forward(4, raise_keyboard_interrupt))
        train(TINY, synthetic_data(), SMALL, tmp_path)
    rewrite_meta(tmp_path / "checkpoint.npz", lambda meta: meta["data"].pop("fingerprint"))
    capsys.readouterr()
    assert train(TINY, synthetic_data(seed=1), SMALL, tmp_path, resume=True).status == "finished"
    assert "has no fingerprint of its data (saved by an older minivit)" in capsys.readouterr().out
    assert final_state(tmp_path)[2]["data"]["fingerprint"] is not None     # recorded from now on


def test_cli_resume_on_other_data(tmp_path, monkeypatch, capsys, fake_cifar):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(train_mod, "ViT", at_training_forward(4, raise_keyboard_interrupt))
        assert main(["train", *TINY_ARGS, *SMALL_ARGS, "--out", str(out)]) == 130
    assert main(["train", *TINY_ARGS, "--allow-other-data", "--out", str(tmp_path / "new")]) == 2
    assert "--allow-other-data only applies with --resume" in capsys.readouterr().err
    other = synthetic_data(seed=1)
    monkeypatch.setattr(train_mod, "load_cifar10", lambda path, limit=None: other)
    assert main(["train", "--resume", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data differs: the same numbers of images" in err[0]
    assert main(["train", "--resume", "--out", str(out), "--allow-other-data"]) == 0


# ----------------------------------------------------------------------------- what the training step does

def test_training_decays_weight_matrices_only(tmp_path, monkeypatch):
    """AdamW in train() gets optim.param_groups' split: weight decay on the weight matrices and the
    patch kernel, none on biases, LayerNorm, pos_embed and cls_token."""
    built = {}

    def recording(cls, key):
        def make(*args, **kwargs):
            built[key] = cls(*args, **kwargs)
            return built[key]
        return make
    monkeypatch.setattr(train_mod, "ViT", recording(ViT, "model"))
    monkeypatch.setattr(train_mod, "AdamW", recording(train_mod.AdamW, "optimizer"))
    train(TINY, synthetic_data(), SMALL.replace(epochs=1, weight_decay=0.05), tmp_path)
    names = {id(p): name for name, p in built["model"].named_parameters()}
    optimizer = built["optimizer"]
    decay = {names[id(p)]: wd for p, wd in zip(optimizer.params, optimizer.weight_decays)}
    assert sorted(decay) == sorted(names.values())                 # every parameter of the model, once
    matrices = {"patch_embed.proj.weight", "head.weight"} | {
        f"blocks.{i}.{layer}.weight" for i in range(TINY.depth) for layer in ("attn.qkv", "attn.proj", "mlp.fc1",
                                                                              "mlp.fc2")}
    assert decay == {name: 0.05 if name in matrices else 0.0 for name in names.values()}


def test_training_step_feeds_the_model_normalised_augmented_images(tmp_path, monkeypatch):
    """The exact input of the model in each training step: the augmented batch of training images,
    (pixel / 255 - mean) / std per channel; and in testing, the test images the same way."""
    data = synthetic_data()
    mean, std = (0.1, 0.3, 0.6), (0.5, 0.25, 0.2)       # per channel, no mean equal to its std
    batches, inputs, test_inputs = [], [], []
    real_augment = train_mod.augment

    def recording_augment(images, rng, *args, **kwargs):
        out = real_augment(images, rng, *args, **kwargs)
        batches.append((images.copy(), out.copy()))
        return out

    class RecordingViT(ViT):
        def forward(self, x):
            (inputs if self.training else test_inputs).append(x.copy())
            return super().forward(x)
    monkeypatch.setattr(train_mod, "augment", recording_augment)
    monkeypatch.setattr(train_mod, "ViT", RecordingViT)
    train(TINY, data, SMALL.replace(epochs=1), tmp_path, mean=mean, std=std)

    def normalised(images):
        return (images / 255.0 - np.reshape(mean, (3, 1, 1))) / np.reshape(std, (3, 1, 1))
    assert len(batches) == len(inputs) == 3                       # 3 steps
    training_images = {image.tobytes() for image in data.train_images}
    for (batch, augmented), x in zip(batches, inputs):
        assert all(image.tobytes() in training_images for image in batch)
        assert x.dtype == np.float32 and x.shape == augmented.shape
        np.testing.assert_allclose(x, normalised(augmented), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.concatenate(test_inputs), normalised(data.test_images), rtol=1e-6, atol=1e-6)


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


@pytest.mark.parametrize("settings, hinted, not_hinted", [
    ({"clip_grad": 1.0}, ["a lower --lr (it was 0.003)", "a longer --warmup (it was 0.5 epochs)",
                          "(Gradients were already clipped to a norm of 1.)"], ["--clip-grad 1"]),
    ({"clip_grad": 0.5}, ["clipped to a norm of 0.5"], ["--clip-grad 1"]),
    ({"clip_grad": 0.0}, ["or --clip-grad 1 (clipping was off)"], ["already clipped"]),
    ({"clip_grad": 5.0}, ["or --clip-grad 1 (it was 5)"], ["already clipped"]),
    ({"warmup": 2.0}, ["Try a lower --lr (it was 0.003)."], ["--warmup", "--clip-grad 1"]),   # warmup = epochs
])
def test_divergence_hint_follows_the_settings(tmp_path, monkeypatch, settings, hinted, not_hinted):
    monkeypatch.setattr(train_mod, "ViT", at_training_forward(2, make_nan))
    with pytest.raises(NonFiniteLossError) as caught:
        train(TINY, synthetic_data(), SMALL.replace(**settings), tmp_path)
    message = str(caught.value)
    assert all(text in message for text in hinted), message
    assert not any(text in message for text in not_hinted), message


def test_cli_nan_exits_nonzero_with_one_line(tmp_path, monkeypatch, capsys, fake_cifar):
    monkeypatch.setattr(train_mod, "ViT", at_training_forward(2, make_nan))
    rc = main(["train", *TINY_ARGS, *SMALL_ARGS, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("minivit train: error: the loss is nan at epoch 1, step 2")
    assert "No checkpoint was written yet" in err[-1]


# ----------------------------------------------------------------------------- reading the loss every few steps

def test_reading_every_few_steps_changes_no_number(tmp_path, backend):
    """The loss, accuracy and gradient norm wait on the device and are read every read_every steps
    (and at the end of each epoch): every metric and every weight is the same, bit for bit, as when
    each step is read at once. On the "strict" backend the clipping norm stays on the device too."""
    runs = {}
    for read_every in (1, 2):            # 2: read after step 2 of 3, and at the end of each epoch
        out = tmp_path / f"read{read_every}"
        runs[read_every] = train(TINY, synthetic_data(), SMALL, out, device=backend.device, read_every=read_every)
        assert read_metrics_csv(out / "metrics.csv") == runs[read_every].history
    assert_same_run(tmp_path / "read1", tmp_path / "read2")


@pytest.mark.parametrize("read_every", [2, 8])
def test_a_nan_between_reads_is_caught_before_the_next_checkpoint(tmp_path, monkeypatch, read_every):
    """A NaN loss at epoch 2, step 2, read one step later (read_every 2) or at the end of the epoch
    (8): the error still names the step it came from, and the checkpoint on disk is epoch 1's."""
    saved_bytes = {}
    real_save = train_mod.save_checkpoint

    def recording_save(path, *args, **kwargs):
        real_save(path, *args, **kwargs)
        saved_bytes[path.name] = path.read_bytes()
    monkeypatch.setattr(train_mod, "save_checkpoint", recording_save)
    monkeypatch.setattr(train_mod, "ViT", at_training_forward(5, make_nan))
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 2, step 2 .*checkpoint.npz \(epoch 1\)"):
        train(TINY, synthetic_data(), SMALL, tmp_path, read_every=read_every)
    assert (tmp_path / "checkpoint.npz").read_bytes() == saved_bytes["checkpoint.npz"]
    state, _, meta = load_checkpoint(tmp_path / "checkpoint.npz")
    assert meta["epoch"] == 1 and all(np.isfinite(a).all() for a in state.values())
    assert len(read_metrics_csv(tmp_path / "metrics.csv")) == 1


def test_a_nan_not_yet_read_when_a_signal_stops_the_run_is_caught_instead_of_saved(tmp_path, monkeypatch):
    """SIGTERM in the step whose loss is NaN, with reads every 8 steps: the stop reads the pending
    steps before it saves, so the run fails on the NaN and writes no checkpoint."""
    monkeypatch.setattr(train_mod, "ViT", at_training_forward(2, lambda logits: send_sigterm(make_nan(logits))))
    with pytest.raises(NonFiniteLossError, match="loss is nan at epoch 1, step 2 .*No checkpoint was written yet"):
        train(TINY, synthetic_data(), SMALL, tmp_path, read_every=8)
    assert not (tmp_path / "checkpoint.npz").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_read_every_must_be_a_positive_integer(tmp_path):
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="read_every must be an integer >= 1"):
            train(TINY, synthetic_data(), SMALL, tmp_path / "run", read_every=bad)


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


def refuse_to_build(*args, **kwargs):
    raise AssertionError("ViT(config) was built before the file's weights were checked against its config")


@pytest.mark.parametrize("huge", [
    {"dim": 2048, "depth": 12},             # 2.4 GB to build
    {"dim": 2048},
    {"depth": 10**7},
    {"mlp_dim": 2**31 - 1},
])
def test_eval_and_resume_check_the_weights_against_the_config_before_building(tmp_path, monkeypatch, capsys,
                                                                               fake_cifar, huge):
    """A few kilobytes of weights beside a config that says "huge" must fail at once, not build the model."""
    with monkeypatch.context() as m:
        m.setattr(train_mod, "ViT", at_training_forward(4, raise_keyboard_interrupt))
        train(TINY, synthetic_data(), SMALL, tmp_path)                  # a resumable checkpoint of epoch 1
    rewrite_meta(tmp_path / "checkpoint.npz", lambda meta: meta["config"].update(huge))
    monkeypatch.setattr(train_mod, "ViT", refuse_to_build)
    capsys.readouterr()
    for command in (["eval", str(tmp_path / "checkpoint.npz")], ["train", "--resume", "--out", str(tmp_path)]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(tmp_path / "checkpoint.npz") in err[0], err
    with pytest.raises(ValueError, match="checkpoint.npz"):
        train(TINY.replace(**huge), synthetic_data(), SMALL, tmp_path, resume=True)


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
