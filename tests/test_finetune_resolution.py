"""Fine-tuning at a higher resolution (paper section 3.2): resize_images, `minivit train --image-size`,
and `--init ... --pos-resample {bilinear,pad}`.

resize_images is checked against torch.nn.functional.interpolate (bilinear, align_corners=False,
antialias=False) in float64 and against a 2 x 2 -> 4 x 4 case worked by hand. The command line is
checked on a synthetic 16 x 16 data set resized to 24, 32 or 48 px, with tiny models: the images
the model sees are the resized ones (in training, testing, resuming and `minivit eval`), a stopped
run at 48 px resumes bit for bit, and --init builds exactly the model load_pretrained builds.

Shape legend: B images, C channels, S image side, S2 resized side, K classes, D width.
"""

import numpy as np
import pytest

from minivit import ViT, ViTConfig
from minivit import data as data_mod
from minivit import train as train_mod
from minivit.checkpoint import load_checkpoint
from minivit.cli import main
from minivit.data import CIFAR10, normalize, resize_images
from minivit.pretrained import load_pretrained, save_pretrained
from minivit.train import Recipe, train
from test_train import rewrite_meta

TINY_ARGS = ["--preset", "cifar-lesson", "--set", "dim=16", "--set", "depth=1", "--set", "heads=2",
             "--set", "mlp_dim=32"]
# 40 training images in batches of 16: 3 steps per epoch (16, 16, 8), 6 steps in all.
SMALL_ARGS = ["--epochs", "2", "--batch-size", "16", "--lr", "3e-3", "--warmup", "0.5", "--log-every", "0"]


def synthetic_data(n_train=40, n_test=24, seed=0, side=16):
    """uint8 images (n, 3, side, side) whose brightness depends on the class, as tests/test_train.py makes them."""
    rng = np.random.default_rng(seed)

    def split(n):
        labels = rng.integers(0, 10, n)                                                       # (n,)
        images = rng.integers(0, 100, (n, 3, side, side)) + 15 * labels[:, None, None, None]  # (n, 3, S, S)
        return images.astype(np.uint8), labels.astype(np.int64)
    return CIFAR10(*split(n_train), *split(n_test), classes=[f"class{k}" for k in range(10)])


@pytest.fixture
def fake_cifar(monkeypatch):
    """The CLI (train and eval) loads the synthetic 16 x 16 data set instead of CIFAR-10, and draws
    no curves.png (tests/test_train.py tests them; here they would only take time)."""
    data = synthetic_data()
    monkeypatch.setattr(train_mod, "plot_curves", lambda path, history, label_smoothing=0.0: None)

    def load(path, limit=None):
        return CIFAR10(data.train_images[:limit], data.train_labels[:limit], data.test_images[:limit],
                       data.test_labels[:limit], data.classes)
    monkeypatch.setattr(train_mod, "find_cifar10", lambda path=None, download=True: "synthetic")
    monkeypatch.setattr(train_mod, "load_cifar10", load)
    return data


def run_cli(capsys, *args):
    """(exit code, stdout, stderr lines) of `minivit ARGS`."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def assert_same_run(dir_a, dir_b):
    """Bit-identical weights, optimiser state and random generators, and the same metrics (but timings)."""
    state_a, optim_a, meta_a = load_checkpoint(dir_a / "checkpoint.npz")
    state_b, optim_b, meta_b = load_checkpoint(dir_b / "checkpoint.npz")
    assert state_a.keys() == state_b.keys() and optim_a.keys() == optim_b.keys()
    for name in state_a:
        assert np.array_equal(state_a[name], state_b[name]), f"{name} differs"
    for key in optim_a:
        a, b = optim_a[key], optim_b[key]
        assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b, f"optimizer {key} differs"
    assert meta_a["rng"] == meta_b["rng"]

    def untimed(meta):
        return [{k: v for k, v in row.items() if k not in ("epoch_seconds", "images_per_second")}
                for row in meta["metrics"]]
    assert untimed(meta_a) == untimed(meta_b)


def ctrl_c_at_training_forward(n):
    """A ViT that presses Ctrl-C during its n-th forward pass in training mode."""
    import signal
    calls = [0]

    class StoppedViT(ViT):
        def forward(self, x):
            if self.training:
                calls[0] += 1
                if calls[0] == n:
                    signal.raise_signal(signal.SIGINT)
            return super().forward(x)
    return StoppedViT


def bilinear_reference(torch, images, size):
    """torch's bilinear resize of uint8 images in float64 (not rounded): (B, C, S, S) -> (B, C, S2, S2)."""
    x = torch.from_numpy(images.astype(np.float64))
    y = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                        antialias=False)
    return y.numpy()


# ============================================================================= resize_images

@pytest.mark.parametrize("size", [48, 64, 32, 24, 12])
def test_resize_images_equals_torch_interpolate_rounded(torch, size):
    """32 -> 48, 64 (the experiment's), 32 (identity), 24 and 12 (downsampling, aliased like torch's)."""
    images = np.random.default_rng(size).integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)   # (B, C, S, S)
    ours = resize_images(images, size)                                                     # (B, C, S2, S2)
    assert ours.dtype == np.uint8 and ours.shape == (6, 3, size, size)
    reference = bilinear_reference(torch, images, size)                                    # (B, C, S2, S2)
    expected = np.clip(np.floor(reference + 0.5), 0, 255)
    # An exact half (x.5) may round either way, depending on the order in which the two
    # implementations add their four terms; nowhere else may they differ. (At 48 px the weights
    # are sixths, so about 1 pixel in 10 is such a half; most pixels are compared exactly.)
    tie = np.abs(reference - np.floor(reference) - 0.5) < 1e-9
    diff = np.abs(ours.astype(np.int64) - expected)
    assert diff[~tie].max() == 0 and tie.mean() < 0.2
    assert diff.max() <= 1
    if size == 32:
        assert np.array_equal(ours, images) and ours is not images


def test_resize_images_by_hand():
    """2 x 2 -> 4 x 4: output cell centres sit at input positions -0.25 (clamped to 0), 0.25, 0.75 and
    1.25 (clamped to the last pixel), so each axis mixes its two pixels with weights
    (1, 0), (3/4, 1/4), (1/4, 3/4), (0, 1)."""
    image = np.array([[[[0, 100], [200, 40]]]], dtype=np.uint8)                            # (1, 1, 2, 2)
    w = np.array([[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])                             # (4, 2)
    # By hand, row 1 (3/4 of row 0 + 1/4 of row 1) is [50, 85]; its column 1 is 3/4 * 50 + 1/4 * 85 = 58.75.
    expected = np.floor(w @ image[0, 0].astype(float) @ w.T + 0.5)                         # (4, 4)
    assert expected[1, 1] == 59 and expected[0, 0] == 0 and expected[3, 3] == 40
    assert np.array_equal(resize_images(image, 4)[0, 0], expected)
    assert np.array_equal(resize_images(np.full((2, 3, 5, 5), 255, np.uint8), 11), np.full((2, 3, 11, 11), 255))


def test_resize_images_in_chunks_of_one_image_gives_the_same(monkeypatch):
    images = np.random.default_rng(1).integers(0, 256, (7, 3, 16, 16), dtype=np.uint8)     # (B, C, S, S)
    whole = resize_images(images, 40)                                                      # one chunk
    monkeypatch.setattr(data_mod, "RESIZE_CHUNK_PIXELS", 1)                                # one image per chunk
    assert np.array_equal(resize_images(images, 40), whole)
    assert resize_images(images[:0], 40).shape == (0, 3, 40, 40)


@pytest.mark.parametrize("images, size, error, message", [
    (np.zeros((2, 3, 8, 8), np.float32), 16, TypeError, "resize_images expects uint8 images (0..255), got a float32"),
    ([[1, 2]], 16, TypeError, "resize_images expects uint8 images"),
    (np.zeros((3, 8, 8), np.uint8), 16, ValueError, "square images (B, C, S, S) with S >= 1, got shape (3, 8, 8)"),
    (np.zeros((2, 3, 8, 6), np.uint8), 16, ValueError, "got shape (2, 3, 8, 6)"),
    (np.zeros((2, 3, 0, 0), np.uint8), 16, ValueError, "got shape (2, 3, 0, 0)"),
    (np.zeros((2, 3, 8, 8), np.uint8), 0, ValueError, "size must be a positive integer (the new image side in "
                                                      "pixels), got 0"),
    (np.zeros((2, 3, 8, 8), np.uint8), -16, ValueError, "got -16"),
    (np.zeros((2, 3, 8, 8), np.uint8), 16.0, TypeError, "size must be an integer (the new image side in pixels), "
                                                        "got 16.0"),
    (np.zeros((2, 3, 8, 8), np.uint8), True, TypeError, "got True"),
    (np.zeros((2, 3, 8, 8), np.uint8), "48", TypeError, "got '48'"),
])
def test_resize_images_bad_input(images, size, error, message):
    with pytest.raises(error) as caught:
        resize_images(images, size)
    assert message in str(caught.value)


# ============================================================================= minivit train --image-size

def test_image_size_trains_and_tests_on_resized_images_and_eval_does_too(tmp_path, monkeypatch, capsys, fake_cifar):
    """16 px data, --image-size 24: every training batch holds resized images, cropped with padding
    4 * 24 // 16 = 6; testing sees the resized test images; `minivit eval` resizes them the same way."""
    batches, paddings, test_inputs = [], [], []
    real_augment = train_mod.augment

    def recording_augment(images, rng, padding):
        batches.append(images.copy())
        paddings.append(padding)
        return real_augment(images, rng, padding)

    class RecordingViT(ViT):
        def forward(self, x):
            if not self.training:
                test_inputs.append(x.copy())
            return super().forward(x)
    monkeypatch.setattr(train_mod, "augment", recording_augment)
    monkeypatch.setattr(train_mod, "ViT", RecordingViT)
    out = tmp_path / "run"
    code, printed, err = run_cli(capsys, "train", *TINY_ARGS, "--set", "img_size=24", "--image-size", 24,
                                 *SMALL_ARGS, "--out", out)
    assert code == 0, err
    assert "40 training and 24 test images of 3x24x24 (resized from 16x16, bilinear, in " in printed
    assert "random crop padding 6" in printed

    resized_train = {image.tobytes() for image in resize_images(fake_cifar.train_images, 24)}
    assert len(batches) == 6 and all(batch.shape[1:] == (3, 24, 24) for batch in batches)
    assert all(image.tobytes() in resized_train for batch in batches for image in batch)
    assert paddings == [6] * 6
    expected_test = normalize(resize_images(fake_cifar.test_images, 24), train_mod.CIFAR10_MEAN, train_mod.CIFAR10_STD)
    assert len(test_inputs) == 4                        # 2 epochs, 24 test images in batches of 16
    np.testing.assert_array_equal(np.concatenate(test_inputs[:2]), expected_test)

    meta = load_checkpoint(out / "checkpoint.npz")[2]
    assert meta["recipe"]["image_size"] == 24 and meta["config"]["img_size"] == 24
    monkeypatch.setattr(train_mod, "ViT", ViT)
    code, printed, err = run_cli(capsys, "eval", out / "checkpoint.npz")
    assert code == 0, err
    assert "resized the 24 test images from 16x16 to 24x24 (bilinear), as in training" in printed
    last = meta["metrics"][-1]
    assert f"24 test images | test loss {last['test_loss']:.4f} | test acc {last['test_acc']:.4f}" in printed


def test_resume_at_48_px_is_bit_identical(tmp_path, monkeypatch, capsys, fake_cifar):
    """A run at 48 px (16 px data resized, dropout and drop-path on) stopped by Ctrl-C in epoch 2 and
    resumed from the command line ends with exactly the weights of a run that never stopped: the
    resumed run resizes the data again from its saved recipe and checks its fingerprint."""
    args = [*TINY_ARGS, "--set", "img_size=48", "--set", "patch_size=8", "--set", "dropout=0.1",
            "--set", "drop_path=0.1", "--image-size", 48, *SMALL_ARGS]
    assert run_cli(capsys, "train", *args, "--out", tmp_path / "straight")[0] == 0
    with monkeypatch.context() as m:
        m.setattr(train_mod, "ViT", ctrl_c_at_training_forward(5))
        assert run_cli(capsys, "train", *args, "--out", tmp_path / "stopped")[0] == 130
    assert load_checkpoint(tmp_path / "stopped" / "checkpoint.npz")[2]["progress"]["step"] == 2
    code, printed, err = run_cli(capsys, "train", "--resume", "--out", tmp_path / "stopped")
    assert code == 0, err
    assert "resumed in epoch 2, after step 2" in printed and "3x48x48 (resized from 16x16" in printed
    assert_same_run(tmp_path / "straight", tmp_path / "stopped")


def test_a_checkpoint_from_before_image_size_resumes_and_evaluates(tmp_path, monkeypatch, capsys, fake_cifar):
    """Checkpoints saved before the recipe had image_size (runs in progress) resume bit for bit."""
    args = [*TINY_ARGS, "--set", "img_size=16", *SMALL_ARGS, "--epochs", "1"]
    assert run_cli(capsys, "train", *args, "--out", tmp_path / "straight")[0] == 0
    with monkeypatch.context() as m:
        m.setattr(train_mod, "ViT", ctrl_c_at_training_forward(2))
        assert run_cli(capsys, "train", *args, "--out", tmp_path / "old")[0] == 130
    rewrite_meta(tmp_path / "old" / "checkpoint.npz", lambda meta: meta["recipe"].pop("image_size"))
    assert "image_size" not in load_checkpoint(tmp_path / "old" / "checkpoint.npz")[2]["recipe"]
    code, _, err = run_cli(capsys, "train", "--resume", "--out", tmp_path / "old")
    assert code == 0, err
    assert_same_run(tmp_path / "straight", tmp_path / "old")
    rewrite_meta(tmp_path / "old" / "checkpoint.npz", lambda meta: meta["recipe"].pop("image_size"))
    code, printed, err = run_cli(capsys, "eval", tmp_path / "old" / "checkpoint.npz")
    assert code == 0 and "resized" not in printed, err


@pytest.mark.parametrize("args, message", [
    (["--image-size", "24"], "--image-size 24 resizes the images to 24x24, but the model takes 32x32 images; "
                             "add --set img_size=24"),
    (["--set", "img_size=24"], "the model takes images of 3x24x24 but the train images are 3x16x16; for CIFAR-10 "
                               "use a cifar-* preset (or --set img_size=32 --set num_classes=10), or --image-size "
                               "24 to resize the images to the model's size"),
    (["--set", "img_size=24", "--image-size", "0"], "--image-size must be an integer >= 1, got 0"),
    (["--set", "img_size=24", "--image-size", "-24"], "--image-size must be an integer >= 1, got -24"),
    (["--pos-resample", "pad"], "--pos-resample pad only applies with --init PATH"),
    (["--pos-resample", "nearest"], None),               # argparse's own refusal: exit 2, its usage message
])
def test_cli_refuses_image_size_and_pos_resample_misuse(tmp_path, capsys, fake_cifar, args, message):
    if message is None:
        with pytest.raises(SystemExit) as caught:
            main(["train", *TINY_ARGS, *args, "--out", str(tmp_path / "run")])
        assert caught.value.code == 2 and "invalid choice: 'nearest'" in capsys.readouterr().err
        return
    code, _, err = run_cli(capsys, "train", *TINY_ARGS, *args, "--out", tmp_path / "run")
    assert code == 2 and len(err) == 1 and err[0].startswith(f"minivit train: error: {message}"), err


def test_resume_refuses_pos_resample_and_a_new_image_size(tmp_path, capsys, fake_cifar):
    out = tmp_path / "run"
    args = [*TINY_ARGS, "--set", "img_size=24", "--image-size", 24, *SMALL_ARGS, "--epochs", "1", "--warmup", "0"]
    assert run_cli(capsys, "train", *args, "--out", out)[0] == 0
    for extra, removed in ((["--image-size", 32], "--image-size 32"),
                           (["--pos-resample", "pad"], "--pos-resample pad")):
        code, _, err = run_cli(capsys, "train", "--resume", "--out", out, *extra)
        assert code == 2 and len(err) == 1 and f"remove {removed}" in err[0], err
    assert run_cli(capsys, "train", "--resume", "--out", out, "--image-size", 24)[0] == 0   # the same value is fine


# ============================================================================= --init at a higher resolution

@pytest.fixture(scope="module")
def run_at_16px(tmp_path_factory):
    """A tiny model trained for one epoch at 16 px (learned 1-D position embeddings on a 4 x 4 grid,
    no dropout), its weights saved as a timm-format file for --init."""
    folder = tmp_path_factory.mktemp("run16")
    config = ViTConfig(img_size=16, patch_size=4, num_classes=10, dim=16, depth=1, heads=2, mlp_dim=32)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(train_mod, "plot_curves", lambda path, history, label_smoothing=0.0: None)
        train(config, synthetic_data(seed=5), Recipe(epochs=1, batch_size=16, lr=3e-3, warmup=0.5, seed=1),
              folder / "run", log_every=0)
    state, _, meta = load_checkpoint(folder / "run" / "best.npz")
    model = ViT(ViTConfig.from_dict(meta["config"]))
    model.load_state_dict(state)
    return save_pretrained(model, folder / "tiny16.safetensors", mean=meta["normalize"]["mean"],
                           std=meta["normalize"]["std"])


@pytest.mark.parametrize("mode", ["bilinear", "pad"])
def test_init_at_a_higher_resolution_starts_from_load_pretrained(tmp_path, monkeypatch, capsys, fake_cifar,
                                                                 run_at_16px, mode):
    """--init a 16 px model with --image-size 32 --pos-resample MODE: at its first training forward
    pass the model holds the weights of load_pretrained(img_size=32, pos_resample=MODE) and gives
    what that model gives on the same input, and not what the other mode gives; the checkpoint
    records how the run began."""
    seen = []

    class FirstForward(ViT):
        def forward(self, x):
            if self.training and not seen:
                state = {name: value.copy() for name, value in self.state_dict().items()}
            logits = super().forward(x)
            if self.training and not seen:
                seen.append((x.copy(), logits.copy(), state))
            return logits
    monkeypatch.setattr(train_mod, "ViT", FirstForward)
    out = tmp_path / "run"
    code, printed, err = run_cli(capsys, "train", "--init", run_at_16px, "--image-size", 32, "--pos-resample", mode,
                                 *SMALL_ARGS, "--epochs", "1", "--seed", 7, "--out", out)
    assert code == 0, err
    assert f"grid 4x4 -> 8x8, position embeddings resampled ({mode})" in printed
    x, logits, state = seen[0]                                               # (B, C, 32, 32), (B, K)
    assert x.shape == (16, 3, 32, 32) and np.abs(logits).max() > 0.1        # the 16 px head is kept

    by_hand = {m: load_pretrained(run_at_16px, num_classes=10, img_size=32, seed=7, pos_resample=m)[0]
               for m in ("bilinear", "pad")}
    for model in by_hand.values():
        model.train()                                                        # as in training; no dropout here
    expected = by_hand[mode].state_dict()
    assert state.keys() == expected.keys() and state["pos_embed"].shape == (1, 1 + 8 * 8, 16)
    for name in expected:
        assert np.array_equal(state[name], expected[name]), name
    np.testing.assert_allclose(by_hand[mode].forward(x), logits, rtol=1e-5, atol=1e-6)
    other = by_hand["pad" if mode == "bilinear" else "bilinear"].forward(x)
    assert np.abs(other - logits).max() > 1e-3                               # the mode makes a difference

    meta = load_checkpoint(out / "checkpoint.npz")[2]
    assert meta["run"]["pos_resample"] == mode and meta["run"]["init"] == str(run_at_16px)
    assert meta["config"]["img_size"] == 32 and meta["recipe"]["image_size"] == 32
    code, printed, err = run_cli(capsys, "eval", out / "checkpoint.npz")
    assert code == 0 and "resized the 24 test images from 16x16 to 32x32" in printed, err


def test_init_from_a_train_checkpoint_is_init_from_its_weights(tmp_path, monkeypatch, capsys, fake_cifar,
                                                              run_at_16px):
    """--init runs/x/best.npz (a `minivit train` checkpoint, not a load_pretrained format) starts from
    exactly what --init of the same weights saved with save_pretrained starts from."""
    starts = []

    class FirstState(ViT):
        def forward(self, x):
            if self.training and not getattr(self, "recorded", False):     # each run's model, once
                starts.append({name: value.copy() for name, value in self.state_dict().items()})
                self.recorded = True
            return super().forward(x)
    monkeypatch.setattr(train_mod, "ViT", FirstState)
    best = run_at_16px.parent / "run" / "best.npz"
    printed = []
    for init, out in ((best, "a"), (run_at_16px, "b")):
        code, text, err = run_cli(capsys, "train", "--init", init, "--image-size", 24, "--pos-resample", "pad",
                                  *SMALL_ARGS, "--epochs", "1", "--out", tmp_path / out)
        assert code == 0, err
        printed.append(text)
    assert f"init: {best} (minivit train checkpoint, epoch 1), head checkpoint, grid 4x4 -> 6x6, position " \
           f"embeddings resampled (pad)" in printed[0]
    from_npz, from_file = starts
    assert from_npz.keys() == from_file.keys()
    assert all(np.array_equal(from_npz[name], from_file[name]) for name in from_file)
    meta = load_checkpoint(tmp_path / "a" / "checkpoint.npz")[2]
    assert meta["run"]["init"] == str(best) and meta["normalize"] == load_checkpoint(best)[2]["normalize"]


def test_init_records_no_pos_resample_without_init_and_refuses_mismatches(tmp_path, capsys, fake_cifar,
                                                                          run_at_16px):
    # --init with --set img_size other than --image-size: the model would not take the images.
    code, _, err = run_cli(capsys, "train", "--init", run_at_16px, "--image-size", 32, "--set", "img_size=24",
                           *SMALL_ARGS, "--out", tmp_path / "a")
    assert code == 2 and "--image-size 32 resizes the images to 32x32, but the model takes 24x24 images" in err[0]
    # pad keeps a learned 1-D table's rows; a model with fixed sin-cos embeddings has none (pretrained.py's error).
    sincos = ViT(ViTConfig(img_size=16, patch_size=4, num_classes=10, dim=16, depth=1, heads=2, mlp_dim=32,
                           pos_embed="sincos2d"))
    path = save_pretrained(sincos, tmp_path / "sincos.safetensors")
    code, _, err = run_cli(capsys, "train", "--init", path, "--image-size", 32, "--pos-resample", "pad",
                           *SMALL_ARGS, "--out", tmp_path / "b")
    assert code == 2 and len(err) == 1 and "pos_resample='pad' pads a learned 1-D position table" in err[0], err
    assert "pos_embed='sincos2d'" in err[0]
    # Without --init there is nothing to resample: the run info says so.
    assert run_cli(capsys, "train", *TINY_ARGS, "--set", "img_size=16", *SMALL_ARGS, "--epochs", "1",
                   "--warmup", "0", "--out", tmp_path / "c")[0] == 0
    assert load_checkpoint(tmp_path / "c" / "checkpoint.npz")[2]["run"]["pos_resample"] is None
