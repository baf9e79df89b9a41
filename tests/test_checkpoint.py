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


# ---- hostile and damaged files: refused from their headers and meta.json, with the file named ----

def _entries(path):
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _write(path, entries):
    with open(path, "wb") as f:
        np.savez(f, **entries)


def _npy_header_only(shape, dtype="<f4"):
    """An .npy member whose header claims `shape` and that holds no data at all."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


@pytest.mark.parametrize("change,match", [
    ({"dim": 2048, "depth": 12, "heads": 8}, r"depth=12, but the weights hold 1 block"),
    ({"dim": 2048, "heads": 8},
     r"'model/cls_token' has shape \(1, 1, 8\), but the config \(dim=2048.*needs \(1, 1, 2048\)"),
    ({"img_size": 4 * 3000}, r"'model/pos_embed' has shape \(1, 5, 8\).*needs \(1, 9000001, 8\)"),
])
def test_a_config_its_entries_do_not_back_is_refused_before_any_model_is_built(tmp_path, change, match):
    # A 24 KB file whose meta.json says D=2048, depth 12 cost 2.5 GB and 25 s in `minivit eval`
    # (which builds ViT(config) before loading the weights) before "missing keys".
    model, opt = trained_pair()
    path = save(tmp_path / "c.npz", model, opt)
    _rewrite_meta(path, lambda m: m["config"].update(change))
    with pytest.raises(ValueError, match=match):
        read_checkpoint_meta(path)            # what `minivit train --resume` reads before building
    with pytest.raises(ValueError, match=match):
        load_checkpoint(path)                 # what `minivit eval` reads before building


def test_an_invalid_config_is_named(tmp_path):
    model, opt = trained_pair()
    path = save(tmp_path / "c.npz", model, opt)
    _rewrite_meta(path, lambda m: m["config"].update(heads=3))
    with pytest.raises(ValueError, match=rf"{path}: the config in its meta.json is not a valid ViTConfig.*heads=3"):
        load_checkpoint(path)


def test_bomb_entries_are_refused_from_their_headers(tmp_path, monkeypatch):
    # Each header below claims 2**44 floats (64 TiB) and no data follows: np.load would allocate
    # the whole array before anything looked at it (a compressed array of zeros does the same in
    # a few MB). Refused from the header alone now.
    model, opt = trained_pair()
    path = save(tmp_path / "c.npz", model, opt)
    entries = _entries(path)
    for name, match in (
            ("optim/exp_avg.0", r"'optim/exp_avg.0' of shape \(17592186044416,\) is not an optimiser state"),
            ("model/norm.bias", r"'model/norm.bias' has shape \(17592186044416,\), .*needs \(8,\)")):
        _write(path, {k: v for k, v in entries.items() if k != name})
        with zipfile.ZipFile(path, "a") as z:
            z.writestr(name + ".npy", _npy_header_only((2**44,)))
        with pytest.raises(ValueError, match=match):
            load_checkpoint(path)
    # An extra entry under optim/ that no optimiser has (`minivit eval` never reads optim/).
    _write(path, {**entries, "optim/anything.0": np.zeros(8, np.float32)})
    with pytest.raises(ValueError, match="'optim/anything.0' of shape"):
        load_checkpoint(path)
    # meta.json has a bound of its own.
    _write(path, entries)
    monkeypatch.setattr(ckpt, "MAX_META_BYTES", 100)
    with pytest.raises(ValueError, match=r"meta.json should be one JSON string of at most 100 bytes"):
        read_checkpoint_meta(path)


def test_non_finite_weights_are_refused_naming_the_entry(tmp_path):
    model, opt = trained_pair()
    model.blocks[0].attn.qkv.weight.data[1, 2] = np.nan
    path = save(tmp_path / "c.npz", model, opt)
    with pytest.raises(ValueError, match=r"'model/blocks.0.attn.qkv.weight' holds 1 non-finite value"):
        load_checkpoint(path)
    assert read_checkpoint_meta(path)["epoch"] == 1          # the metadata alone is still readable


def _eval(args, capsys):
    from minivit import cli
    code = cli.main(["eval", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


def test_eval_refuses_nan_weights_with_one_line(tmp_path, capsys):
    # Before the fix `minivit eval` printed "test loss nan" and exited 0. (--data names nothing:
    # the checkpoint must be refused before the data is looked for.)
    model, opt = trained_pair()
    model.head.bias.data[:] = np.inf
    path = save(tmp_path / "c.npz", model, opt)
    code, err = _eval([path, "--data", tmp_path / "no-data"], capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith("minivit eval: error:") and "'model/head.bias' holds 3 non-finite" in err[0]


@pytest.mark.parametrize("kind,match", [
    ("png", "it is a PNG image, not an .npz archive"),
    ("safetensors", "it is a safetensors file"),
])
def test_eval_on_a_file_of_another_kind_says_what_it_is(tmp_path, capsys, kind, match):
    path = tmp_path / f"thing.{kind}"
    if kind == "png":
        from PIL import Image
        Image.new("RGB", (4, 4)).save(path)
    else:
        from safetensors.numpy import save_file
        save_file({"w": np.zeros(3, np.float32)}, str(path))
    code, err = _eval([path, "--data", tmp_path / "no-data"], capsys)
    assert code == 2 and len(err) == 1
    assert f"{path} is not a readable minivit checkpoint: {match}" in err[0] and "pickled" not in err[0]


@pytest.mark.parametrize("change,match", [
    (lambda m: m["rng"].update(data={"bit_generator": "PCG64", "state": "nonsense"}),
     r"meta.json's rng\['data'\] is not a valid PCG64 state"),
    (lambda m: m["rng"].update(data=[1, 2, 3]), r"meta.json's rng\['data'\] is not a random generator state"),
    (lambda m: m.update(epoch=-2), r"meta.json gives epoch -2; expected the number of completed epochs"),
    (lambda m: m.update(epoch="3"), r"meta.json gives epoch '3'"),
])
def test_damaged_metadata_is_named(tmp_path, change, match):
    model, opt = trained_pair()
    path = save(tmp_path / "c.npz", model, opt)
    _rewrite_meta(path, change)
    with pytest.raises(ValueError, match=f"{path}: {match}"):
        read_checkpoint_meta(path)


def test_a_full_disk_names_the_checkpoint(tmp_path, monkeypatch):
    import errno
    model, opt = trained_pair()

    def disk_full(file, **arrays):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "savez", disk_full)
    path = tmp_path / "c.npz"
    with pytest.raises(OSError) as caught:
        save(path, model, opt)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert str(path) in str(caught.value) and list(tmp_path.iterdir()) == []
