"""The GPU path against the CPU path: cnn_ops, a ResNet and a hybrid training step, checkpoints
that cross devices, runs resumed on the other device, and the dropout masks' generator.

Each test runs once per backend (the `backend` fixture: "cpu", "strict" = tests/strict_cupy.py in
CuPy's place, and "gpu" where CuPy runs) or on the strict stand-in alone, and compares with the
CPU (NumPy) result of the same call on the same inputs.

Tolerances. float32 ops: rtol 1e-5 of each array's largest value (a float32 epsilon is 1.2e-7; a
GPU sums in other orders, tens of terms per output here). A whole training step is compared in
float64 (1e-12 of each array's largest value): one AdamW step divides each gradient entry by its
own magnitude, so an entry whose true gradient is ~0 (an exactly cancelling one) may take a step
of +lr or -lr depending on its rounding, and no float32 tolerance both holds and means anything.
On the stand-in the arrays are NumPy's, so it agrees exactly; the tolerances are for a real GPU.
"""
import sys

import numpy as np
import pytest

import strict_cupy
from minivit import cnn_ops, ops
from minivit import backend as mb          # `backend` is the fixture's name
from minivit.checkpoint import load_checkpoint, save_checkpoint
from minivit.config import HybridConfig
from minivit.model import build_model
from minivit.optim import AdamW
from minivit.resnet import ResNetConfig

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_train import SMALL, TINY, at_training_forward, assert_same_run, final_state, press_ctrl_c, synthetic_data  # noqa: E402,I001

RESNET = ResNetConfig(block="basic", layers=(1, 1), widths=(3, 4), stem="cifar", shortcut="A", num_classes=3,
                      img_size=8, in_chans=2)
BOTTLENECK = ResNetConfig(block="bottleneck", layers=(1, 1), widths=(2, 3), stem="imagenet", shortcut="B",
                          num_classes=3, img_size=16, in_chans=1)
HYBRID = HybridConfig(img_size=12, in_chans=2, num_classes=5, patch_size=1, dim=12, depth=1, heads=3, mlp_dim=20,
                      backbone_block="basic", backbone_layers=(1, 1), backbone_widths=(3, 4), backbone_stem="cifar",
                      backbone_shortcut="B")
NO_MASKS = TINY.replace(dropout=0.0, drop_path=0.0)


def close(got, want, rtol, what=""):
    """got (any device) equals want (NumPy) to rtol of want's largest |value|."""
    got = mb.to_numpy(got)
    assert type(got) is np.ndarray and got.shape == want.shape and got.dtype == want.dtype, what
    scale = max(float(np.abs(want).max()), 1e-30) if want.size else 1.0
    assert float(np.abs(got.astype(np.float64) - want).max(initial=0.0)) <= rtol * scale, what


def flat(result):
    """The arrays of an op's result (an array, or a tuple with arrays and other things), in order."""
    items = result if isinstance(result, tuple) else (result,)
    return [x for x in items if mb.is_array(x)]


# ----------------------------------------------------------------------------- cnn_ops

def _conv(rng):
    x, w, b = rng.standard_normal((2, 3, 7, 6)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    return cnn_ops.conv2d_forward, cnn_ops.conv2d_backward, (x, w, b), dict(stride=2, padding=1)


def _batchnorm(training):
    def case(rng):
        x = rng.standard_normal((3, 4, 5, 5)) * 2 + 1
        w, b = rng.standard_normal(4), rng.standard_normal(4)
        mean, var = rng.standard_normal(4), rng.random(4) + 0.5          # running averages, updated in place
        return (cnn_ops.batchnorm2d_forward, cnn_ops.batchnorm2d_backward, (x, w, b, mean, var),
                dict(training=training, momentum=0.1, eps=1e-5))
    return case


OPS = {
    "conv2d": _conv,
    "batchnorm2d train": _batchnorm(True),
    "batchnorm2d eval": _batchnorm(False),
    "relu": lambda rng: (cnn_ops.relu_forward, cnn_ops.relu_backward, (rng.standard_normal((2, 3, 4, 4)),), {}),
    "maxpool2d": lambda rng: (cnn_ops.maxpool2d_forward, cnn_ops.maxpool2d_backward,
                              (rng.standard_normal((2, 3, 7, 7)),), dict(kernel=3, stride=2, padding=1)),
    "global_avg_pool": lambda rng: (cnn_ops.global_avg_pool_forward, cnn_ops.global_avg_pool_backward,
                                    (rng.standard_normal((2, 3, 4, 5)),), {}),
    "subsample_pad": lambda rng: (cnn_ops.subsample_pad_forward, cnn_ops.subsample_pad_backward,
                                  (rng.standard_normal((2, 3, 6, 6)),), dict(out_channels=8, stride=2)),
}


@pytest.mark.parametrize("name", OPS)
def test_cnn_ops_agree_with_the_cpu(backend, name):
    """Forward, backward and the in-place running averages, float32, on the backend vs NumPy."""
    forward, backward, inputs, kwargs = OPS[name](np.random.default_rng(0))
    inputs = [a.astype(np.float32) for a in inputs]
    results = {}
    for where in ("cpu", backend.name):
        args = [a.copy() for a in inputs] if where == "cpu" else backend.to(inputs)
        out, cache = forward(*args, **kwargs)
        dout = np.random.default_rng(1).standard_normal(out.shape).astype(np.float32)
        grads = backward(dout if where == "cpu" else backend.to(dout), cache)
        if where != "cpu":
            assert all(mb.device_of(a) == backend.device for a in [out, *flat(grads), *args])
        results[where] = [out, *flat(grads), *args[3:]]        # args[3:]: batchnorm's running averages
    for i, (got, want) in enumerate(zip(results[backend.name], results["cpu"])):
        close(got, want, 1e-5, f"{name}: array {i}")


# ----------------------------------------------------------------------------- a training step

def _step(model, images, labels):
    """zero_grad, forward, cross-entropy, backward, AdamW step; returns (loss, logits)."""
    opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    model.zero_grad()
    logits = model(images)                                           # (B, K)
    loss, cache = ops.cross_entropy_forward(logits, labels, 0.1)
    model.backward(ops.cross_entropy_backward(cache))
    grads = {name: mb.to_numpy(p.grad).copy() for name, p in model.named_parameters()}
    opt.step()
    return float(loss), mb.to_numpy(logits), grads, opt


@pytest.mark.parametrize("config", [RESNET, BOTTLENECK, HYBRID], ids=["resnet basic A", "resnet bottleneck B",
                                                                        "hybrid"])
def test_cnn_training_step_agrees_with_the_cpu(backend, config):
    """BatchNorm in training mode (batch statistics, running averages updated), the loss, every
    gradient, the weights after one AdamW step and the optimiser's state, float64 (see the top)."""
    rng = np.random.default_rng(2)
    images = rng.standard_normal((3, config.in_chans, config.img_size, config.img_size))
    labels = rng.integers(0, config.num_classes, 3)
    runs = {}
    for where in ("cpu", backend.name):
        model = build_model(config, seed=0).astype(np.float64).train()
        if where != "cpu":
            model.to(backend.device)
        x, y = (images, labels) if where == "cpu" else backend.to((images, labels))
        loss, logits, grads, opt = _step(model, x, y)
        runs[where] = (loss, logits, grads, model.state_dict(), opt.state_dict())
    loss, logits, grads, state, opt_state = runs[backend.name]
    want_loss, want_logits, want_grads, want_state, want_opt = runs["cpu"]
    assert abs(loss - want_loss) <= 1e-12 * abs(want_loss)
    close(logits, want_logits, 1e-12, "logits")
    for name in want_grads:
        close(grads[name], want_grads[name], 1e-12, f"grad {name}")
    assert state.keys() == want_state.keys() and any("running_mean" in k for k in state)
    for name in want_state:                                          # weights and BatchNorm buffers
        assert mb.device_of(state[name]) == backend.device
        close(state[name], want_state[name], 1e-12, name)
    for key, value in want_opt.items():
        if mb.is_array(value):
            close(opt_state[key], value, 1e-12, f"optimizer {key}")


# ----------------------------------------------------------------------------- checkpoints across devices

@pytest.fixture
def stand_in():
    with mb.use_array_module_for_gpu(strict_cupy):
        yield strict_cupy


@pytest.mark.parametrize("config", [RESNET, HYBRID], ids=["resnet", "hybrid"])
@pytest.mark.parametrize("saved_on, loaded_on", [("gpu", "cpu"), ("cpu", "gpu")])
def test_checkpoint_saved_on_one_device_loads_on_the_other(stand_in, tmp_path, config, saved_on, loaded_on):
    """Weights, BatchNorm buffers and AdamW's state after a step on `saved_on`, written to disk
    and loaded into a fresh model and optimiser on `loaded_on`: the same numbers, on loaded_on,
    and the next step from there is the step the saving model takes."""
    rng = np.random.default_rng(3)
    images = rng.standard_normal((2, config.in_chans, config.img_size, config.img_size))
    labels = rng.integers(0, config.num_classes, 2)
    model = build_model(config, seed=0).astype(np.float64).to(saved_on)
    _, _, _, opt = _step(model, mb.to_device(images, saved_on), mb.to_device(labels, saved_on))
    model_rng = np.random.default_rng(9)
    save_checkpoint(tmp_path / "c.npz", model, opt, 1, {"model": model_rng.bit_generator.state})
    state, optim_state, meta = load_checkpoint(tmp_path / "c.npz")
    assert all(type(v) is np.ndarray for v in state.values())       # the file holds host arrays only

    loaded = build_model(config, seed=5).astype(np.float64).to(loaded_on)             # other initial weights: all overwritten
    loaded.load_state_dict(state)
    loaded_opt = AdamW(loaded.parameters(), lr=1e-2, weight_decay=0.05)
    loaded_opt.load_state_dict(optim_state)
    saved_state = model.state_dict()
    for name, value in loaded.state_dict().items():
        assert mb.device_of(value) == loaded_on, name
        assert np.array_equal(mb.to_numpy(value), mb.to_numpy(saved_state[name])), name
    arrays = [v for st in loaded_opt.state for v in st.values() if mb.is_array(v)]
    assert arrays and all(mb.device_of(v) == loaded_on for v in arrays)     # state_dict() gives host copies
    assert meta["rng"]["model"] == np.random.default_rng(9).bit_generator.state

    # one more step on each: the same weights (float64: see the top)
    for m, o, device in ((model, opt, saved_on), (loaded, loaded_opt, loaded_on)):
        m.zero_grad()
        loss, cache = ops.cross_entropy_forward(m(mb.to_device(images, device)),
                                                mb.to_device(labels, device))
        m.backward(ops.cross_entropy_backward(cache))
        o.step()
    after = model.state_dict()
    for name, value in loaded.state_dict().items():
        close(value, mb.to_numpy(after[name]), 1e-12, name)


# ----------------------------------------------------------------------------- train resumed on the other device

@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The uninterrupted float64 run on the CPU (once for the module)."""
    from minivit.train import train

    out = tmp_path_factory.mktemp("straight")
    assert train(NO_MASKS, synthetic_data(), SMALL, out, device="cpu", dtype=np.float64).status == "finished"
    return final_state(out)


@pytest.mark.parametrize("first, then", [("gpu", "cpu"), ("cpu", "gpu")])
def test_train_resumed_on_the_other_device_matches_an_uninterrupted_run(straight_run, stand_in, tmp_path,
                                                                         monkeypatch, first, then):
    """Stopped by Ctrl-C after step 2 on one device, resumed on the other: the weights, optimiser
    state and metrics of a run that never stopped, to 1e-12 of each array's largest value in float64
    (exactly on the stand-in). The model draws no dropout masks: the two devices draw them with
    different generators (test_device_masks_... below), so with dropout on, a run resumed on the
    other device is a different run."""
    from minivit import train as train_mod
    from minivit.train import train

    data = synthetic_data()
    with monkeypatch.context() as m:
        m.setattr(train_mod, "ViT", at_training_forward(2, press_ctrl_c))
        stopped = train(NO_MASKS, data, SMALL, tmp_path / "moved", device=first, dtype=np.float64)
    assert stopped.status == "interrupted"
    assert train(NO_MASKS, data, SMALL, tmp_path / "moved", device=then, dtype=np.float64,
                 resume=True).status == "finished"
    want, want_opt, want_meta = straight_run
    got, got_opt, got_meta = final_state(tmp_path / "moved")
    for name in want:
        close(got[name], want[name], 1e-12, name)
    for key, value in want_opt.items():
        if isinstance(value, np.ndarray):
            close(got_opt[key], value, 1e-12, key)
    assert got_meta["rng"] == want_meta["rng"]
    for a, b in zip(got_meta["metrics"], want_meta["metrics"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-12)
        assert a["test_acc"] == b["test_acc"]


# ----------------------------------------------------------------------------- dropout masks on the device

def test_cpu_masks_are_the_numpy_generators_own_draws():
    """The CPU path is what it always was: rng.random in float32, kept where >= p, scaled by 1/(1-p)."""
    mask = ops.dropout_mask((4, 5), 0.3, np.random.default_rng(7))
    u = np.random.default_rng(7).random((4, 5), dtype=np.float32)
    assert np.array_equal(mask, (u >= 0.3).astype(np.float32) / np.float32(0.7))


def test_device_masks_are_philox_keyed_by_64_bits_from_the_numpy_generator(stand_in, monkeypatch):
    """Each device mask: 64 bits drawn from the NumPy Generator key the device's Philox generator
    (as cuRAND's host API takes a 64-bit seed), whose uniforms are compared with p. Computed here
    by hand from a copy of the Generator."""
    keys = []
    real_seed = strict_cupy.RandomState.seed
    monkeypatch.setattr(strict_cupy.RandomState, "seed", lambda self, s: keys.append(s) or real_seed(self, s))
    rng, copy = np.random.default_rng(11), np.random.default_rng(11)
    masks = [ops.dropout_mask((3, 4), 0.25, rng, strict_cupy), ops.drop_path_mask(6, 3, 0.5, rng, strict_cupy)]
    for mask, (shape, p) in zip(masks, [((3, 4), 0.25), ((6, 1, 1), 0.5)]):
        key = copy.integers(0, 2**64, dtype=np.uint64)
        u = np.random.Generator(np.random.Philox(key=int(key))).random(shape, dtype=np.float32)
        assert type(mask) is strict_cupy.ndarray
        assert np.array_equal(mask.get(), (u >= p).astype(np.float32) / np.float32(1 - p))
    assert [int(k) for k in keys[-2:]] == [int(k) for k in np.random.default_rng(11).integers(0, 2**64, 2, np.uint64)]
    assert any(int(k) >= 2**32 for k in keys[-2:])                   # not cut to 32 bits on the way
    assert rng.bit_generator.state == copy.bit_generator.state       # one draw from the stream per mask


def test_device_masks_are_reproducible_from_the_seed(stand_in):
    from minivit import ViT

    model = ViT(TINY, seed=0).to("gpu").train()
    x = mb.to_device(np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32), "gpu")
    a = model.seed(5)(x).get()
    b = model.seed(5)(x).get()
    c = model.seed(6)(x).get()
    assert np.array_equal(a, b) and not np.allclose(a, c)


def test_a_device_run_makes_one_mask_generator_and_resumes_with_the_same_masks(stand_in, tmp_path, monkeypatch):
    """Dropout and drop-path on, on the device: the run never makes a generator per mask (the one
    made by the availability check serves every mask), and a run stopped mid-epoch and resumed
    draws the same masks as one that never stopped: bit-identical weights, optimiser state,
    generator states and metrics."""
    from minivit import train as train_mod
    from minivit.train import train

    assert mb.gpu_available()                   # the smoke test has made the device's mask generator
    made = strict_cupy.RandomState.created, strict_cupy.Generator.created
    draws = []
    real_draw = mb._draw_uniform
    monkeypatch.setattr(mb, "_draw_uniform", lambda *a: draws.append(a[1]) or real_draw(*a))
    data = synthetic_data()
    assert train(TINY, data, SMALL, tmp_path / "straight", device="gpu").status == "finished"
    assert len(draws) >= 6 * 2 * 4 and len(set(draws)) == len(draws)   # 6 steps, 2 blocks, several masks each
    assert (strict_cupy.RandomState.created, strict_cupy.Generator.created) == made
    with monkeypatch.context() as m:
        m.setattr(train_mod, "ViT", at_training_forward(5, press_ctrl_c))
        assert train(TINY, data, SMALL, tmp_path / "stopped", device="gpu").status == "interrupted"
    assert final_state(tmp_path / "stopped")[2]["progress"]["step"] == 2
    assert train(TINY, data, SMALL, tmp_path / "stopped", device="gpu", resume=True).status == "finished"
    assert_same_run(tmp_path / "straight", tmp_path / "stopped")
    assert (strict_cupy.RandomState.created, strict_cupy.Generator.created) == made
