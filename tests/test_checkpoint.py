"""Checkpoints: one .npz, written atomically, read back exactly, never unpickled."""
import io
import json
import os
import zipfile

import numpy as np
import pytest

from minivit import ViT, ViTConfig
from minivit import checkpoint as ckpt
from minivit.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
from minivit.ops import cross_entropy_backward, cross_entropy_forward
from minivit.optim import AdamW, param_groups

TINY = ViTConfig(img_size=8, patch_size=4, num_classes=3, dim=8, depth=1, heads=2, mlp_dim=16)


def trained_pair(seed=0, steps=2):
    """A tiny model and its AdamW after a few steps, so the optimiser has state to save."""
    model = ViT(TINY, seed=seed)
    opt = AdamW(param_groups(model, 0.05), lr=1e-2, weight_decay=0.05)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
        loss, cache = cross_entropy_forward(model(x), rng.integers(0, 3, 4))
        model.zero_grad()
        model.backward(cross_entropy_backward(cache))
        opt.step()
    return model, opt


def save(path, model, opt, epoch=1, **extra):
    rng_state = {"data": np.random.default_rng(7).bit_generator.state}
    return save_checkpoint(path, model, opt, epoch, rng_state, {"metrics": [{"epoch": 1, "acc": 0.5}], **extra})


def test_round_trip_restores_weights_optimizer_and_meta(tmp_path):
    model, opt = trained_pair()
    path = save(tmp_path / "c.npz", model, opt, epoch=3, note="hello")
    state, optim_state, meta = load_checkpoint(path)

    assert state.keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert np.array_equal(state[name], value) and state[name].dtype == value.dtype
    fresh_model = ViT(TINY, seed=1)
    fresh_model.load_state_dict(state)
    fresh_opt = AdamW(param_groups(fresh_model, 0.05), lr=1.0, weight_decay=0.05)
    fresh_opt.load_state_dict(optim_state)
    for key, value in opt.state_dict().items():
        saved = fresh_opt.state_dict()[key]
        assert np.array_equal(saved, value) if isinstance(value, np.ndarray) else saved == value

    assert meta["format"] == ckpt.FORMAT and meta["version"] == ckpt.VERSION
    assert meta["epoch"] == 3 and meta["note"] == "hello"
    assert ViTConfig.from_dict(meta["config"]) == TINY
    # The generator state survives JSON (its 128-bit integers included) and restarts the stream.
    rng = np.random.default_rng()
    rng.bit_generator.state = meta["rng"]["data"]
    assert np.array_equal(rng.random(5), np.random.default_rng(7).random(5))
    assert read_checkpoint_meta(path) == meta


def test_file_is_plain_npz_without_pickles(tmp_path):
    model, opt = trained_pair()
    path = save(tmp_path / "c.npz", model, opt)
    with np.load(path, allow_pickle=False) as npz:         # every entry loads without pickle
        entries = {k: npz[k] for k in npz.files}
    assert all(a.dtype != object for a in entries.values())
    assert "model/blocks.0.attn.qkv.weight" in entries and "optim/exp_avg.0" in entries
    assert json.loads(str(entries["meta.json"]))["format"] == "minivit-checkpoint"


def test_optimizer_none_saves_weights_only(tmp_path):
    model, _ = trained_pair()
    path = save_checkpoint(tmp_path / "best.npz", model, None, 1, {})
    state, optim_state, meta = load_checkpoint(path)
    assert optim_state is None and meta["optimizer"] is None
    assert not any(k.startswith("optim/") for k in np.load(path).files)


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_crash_mid_save_keeps_the_old_file_and_no_temp_file(tmp_path, monkeypatch, error):
    model, opt = trained_pair()
    path = save(tmp_path / "c.npz", model, opt, epoch=1)
    before = path.read_bytes()

    real_savez = np.savez

    def savez_then_crash(file, **arrays):
        real_savez(file, **arrays)           # a complete write into the temporary file...
        file.write(b"half of something")
        raise error                          # ...and then the process "dies"
    monkeypatch.setattr(np, "savez", savez_then_crash)
    model2, opt2 = trained_pair(seed=5, steps=3)
    with pytest.raises(type(error)):
        save(path, model2, opt2, epoch=2)

    assert path.read_bytes() == before                         # the old checkpoint, untouched
    assert sorted(os.listdir(tmp_path)) == ["c.npz"]           # and no temporary file left behind
    assert load_checkpoint(path)[2]["epoch"] == 1


def test_save_replaces_atomically_and_uses_normal_permissions(tmp_path):
    model, opt = trained_pair()
    path = save(tmp_path / "c.npz", model, opt, epoch=1)
    save(path, model, opt, epoch=2)
    assert load_checkpoint(path)[2]["epoch"] == 2
    assert sorted(os.listdir(tmp_path)) == ["c.npz"]
    assert path.stat().st_mode & 0o777 == ckpt.DEFAULT_FILE_MODE


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.npz")


def test_truncated_file(tmp_path):
    model, opt = trained_pair()
    path = save(tmp_path / "c.npz", model, opt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable minivit checkpoint.*truncated"):
        load_checkpoint(path)


@pytest.mark.parametrize("kind", ["text", "npy", "npz"])
def test_not_a_checkpoint(tmp_path, kind):
    path = tmp_path / "thing"
    if kind == "text":
        path.write_text("hello, I am not a checkpoint\n")
        match = "not a readable minivit checkpoint"
    elif kind == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
        match = "single array"
    else:
        with open(path, "wb") as f:
            np.savez(f, weights=np.zeros(3))
        match = "no 'meta.json' entry"
    with pytest.raises(ValueError, match=match):
        load_checkpoint(path)


def test_pickled_entry_is_refused(tmp_path):
    """An .npz holding an object array (which only a pickle can rebuild) is rejected, not run."""
    path = tmp_path / "evil.npz"
    with open(path, "wb") as f:
        np.savez(f, **{"meta.json": np.array("{}"), "model/x": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(ValueError, match="not a readable minivit checkpoint"):
        load_checkpoint(path)


def _rewrite_meta(path, change):
    with np.load(path, allow_pickle=False) as npz:
        entries = {k: npz[k] for k in npz.files}
    meta = json.loads(str(entries["meta.json"]))
    change(meta)
    entries["meta.json"] = np.array(json.dumps(meta))
    with open(path, "wb") as f:
        np.savez(f, **entries)


def test_wrong_version_and_wrong_format(tmp_path):
    model, opt = trained_pair()
    path = save(tmp_path / "c.npz", model, opt)
    _rewrite_meta(path, lambda m: m.update(version=99))
    with pytest.raises(ValueError, match="version 99 checkpoint.*version 1 only"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="version 99"):
        read_checkpoint_meta(path)
    _rewrite_meta(path, lambda m: m.update(format="something-else", version=1))
    with pytest.raises(ValueError, match="not a minivit checkpoint"):
        load_checkpoint(path)


def test_unexpected_entry(tmp_path):
    model, opt = trained_pair()
    path = save(tmp_path / "c.npz", model, opt)
    npy = io.BytesIO()
    np.save(npy, np.zeros(2))
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("stray.npy", npy.getvalue())
    with pytest.raises(ValueError, match="unexpected entry 'stray'"):
        load_checkpoint(path)


def test_bad_metadata_is_refused_before_writing(tmp_path):
    model, opt = trained_pair()
    with pytest.raises(ValueError, match="NaN"):
        save(tmp_path / "c.npz", model, opt, loss=float("nan"))
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "c.npz", model, opt, 1, {}, {"epoch": 5})
    with pytest.raises(TypeError, match="cannot be stored as JSON"):
        save(tmp_path / "c.npz", model, opt, thing=object())
    with pytest.raises(ValueError, match="epoch"):
        save_checkpoint(tmp_path / "c.npz", model, opt, -1, {})
    assert list(tmp_path.iterdir()) == []
