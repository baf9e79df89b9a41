"""Weight import/export, position-embedding resampling and `minivit predict`.

Parity of the imported weights with transformers (logits and every gradient) is in
test_parity.py; these tests cover round trips, fine-tuning changes (new head, new image
size), every error path, and the predict command, on tiny models so they run in seconds.

Shape legend: B batch, C channels, S image side, G patches per side, D width, K classes.
"""
from __future__ import annotations

import errno
import io
import json
import struct
import zipfile
import zlib

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from minivit import ViT, ViTConfig, cli, ops
from minivit import predict as predict_module
from minivit import pretrained
from minivit.pretrained import (
    _timm_rows,
    detect_format,
    load_pretrained,
    parameter_shapes,
    resample_pos_embed,
    save_pretrained,
)

TINY = ViTConfig(img_size=32, patch_size=8, num_classes=5, dim=24, depth=2, heads=3, mlp_dim=40,
                 gelu="tanh", ln_eps=1e-5)
NAMES = ["ant", "bee", "cat", "dog", "eel"]


def random_vit(config=TINY, seed=0, scale=0.1):
    """A ViT whose every parameter is random (the default init has zero biases and unit
    LayerNorm scales, which would hide a mapping that mixes them up)."""
    model = ViT(config, seed=seed)
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        p.data[...] = rng.standard_normal(p.shape) * scale
    return model


def images(config=TINY, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, config.in_chans, config.img_size, config.img_size)).astype(np.float32)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        np.testing.assert_array_equal(sa[name], sb[name], err_msg=name)


def timm_to_npz(state, config):
    """minivit/timm names -> the paper's Flax npz layout (written for these tests only)."""
    D, H = config.dim, config.heads
    out = {
        "cls": state["cls_token"],
        "Transformer/posembed_input/pos_embedding": state["pos_embed"],
        "embedding/kernel": state["patch_embed.proj.weight"].transpose(2, 3, 1, 0),   # (P, P, C, D)
        "embedding/bias": state["patch_embed.proj.bias"],
        "Transformer/encoder_norm/scale": state["norm.weight"],
        "Transformer/encoder_norm/bias": state["norm.bias"],
        "head/kernel": state["head.weight"].T,
        "head/bias": state["head.bias"],
    }
    for i in range(config.depth):
        t, f = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        mha = f + "MultiHeadDotProductAttention_1/"
        q, k, v = np.split(state[t + "attn.qkv.weight"], 3)
        qb, kb, vb = np.split(state[t + "attn.qkv.bias"], 3)
        for name, w, b in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
            out[mha + name + "/kernel"] = w.T.reshape(D, H, D // H)
            out[mha + name + "/bias"] = b.reshape(H, D // H)
        out[mha + "out/kernel"] = state[t + "attn.proj.weight"].T.reshape(H, D // H, D)
        out[mha + "out/bias"] = state[t + "attn.proj.bias"]
        out[f + "LayerNorm_0/scale"], out[f + "LayerNorm_0/bias"] = state[t + "norm1.weight"], state[t + "norm1.bias"]
        out[f + "LayerNorm_2/scale"], out[f + "LayerNorm_2/bias"] = state[t + "norm2.weight"], state[t + "norm2.bias"]
        for j, fc in enumerate(("fc1", "fc2")):
            out[f + f"MlpBlock_3/Dense_{j}/kernel"] = state[t + f"mlp.{fc}.weight"].T
            out[f + f"MlpBlock_3/Dense_{j}/bias"] = state[t + f"mlp.{fc}.bias"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# ============================================================================= the timm table

@pytest.mark.parametrize("config", [
    TINY,
    TINY.replace(qkv_bias=False, num_classes=0),
    TINY.replace(pos_embed="sincos2d"),
    TINY.replace(pos_embed="none", pool="mean"),
], ids=["default", "no-bias-no-head", "sincos2d", "no-pos"])
def test_timm_table_lists_exactly_the_model_parameters(config):
    assert [row[0] for row in _timm_rows(config)] == [n for n, _ in ViT(config).named_parameters()]
    assert parameter_shapes(config) == {n: p.shape for n, p in ViT(config).named_parameters()}


# ============================================================================= round trips

def test_timm_round_trip_is_exact(tmp_path):
    model = random_vit()
    path = save_pretrained(model, tmp_path / "tiny.safetensors", class_names=NAMES, mean=0.4, std=[0.2, 0.3, 0.25])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.safetensors"]    # no temporary file left behind
    loaded, meta = load_pretrained(path)
    assert_same_weights(model, loaded)
    assert loaded.config == model.config
    assert meta["format"] == "timm" and detect_format(path) == "timm"
    assert meta["class_names"] == NAMES
    assert meta["mean"] == (0.4, 0.4, 0.4) and meta["std"] == (0.2, 0.3, 0.25)
    assert meta["head"] == "checkpoint"
    x = images()
    np.testing.assert_array_equal(model(x), loaded(x))


def test_float16_file_with_notes_is_half_the_size_and_loads_as_float32(tmp_path):
    model = random_vit()
    full = save_pretrained(model, tmp_path / "full.safetensors")
    notes = {"command": "minivit train ...", "test_accuracy": 0.75, "epochs": [1, 2]}
    half = save_pretrained(model, tmp_path / "half.safetensors", dtype="float16", notes=notes)
    assert half.stat().st_size < 0.55 * full.stat().st_size
    loaded, meta = load_pretrained(half)
    assert meta["notes"] == notes and load_pretrained(full)[1]["notes"] is None
    assert loaded.dtype == np.float32
    for name, p in loaded.named_parameters():
        expected = model.state_dict()[name].astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(p.data, expected, err_msg=name)
    with pytest.raises(ValueError, match="dtype"):
        save_pretrained(model, tmp_path / "x.safetensors", dtype="int8")
    with pytest.raises(ValueError):
        save_pretrained(model, tmp_path / "x.safetensors", notes={"acc": float("nan")})
    with pytest.raises(ValueError, match="notes"):
        save_pretrained(model, tmp_path / "hf", format="hf", notes={"a": 1})
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "hf").exists()


def test_save_overwrites_atomically(tmp_path):
    path = tmp_path / "m.safetensors"
    save_pretrained(random_vit(seed=0), path)
    save_pretrained(random_vit(seed=1), path)
    loaded, _ = load_pretrained(path)
    assert_same_weights(random_vit(seed=1), loaded)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_hf_round_trip_without_transformers(tmp_path):
    """format='hf' writes the published names; load_pretrained reads them back exactly."""
    model = random_vit(TINY.replace(qkv_bias=False, gelu="exact"))
    save_pretrained(model, tmp_path / "hf", format="hf", class_names=NAMES, mean=[0.1, 0.2, 0.3], std=0.5)
    keys = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert "vit.encoder.layer.1.attention.attention.query.weight" in keys
    assert "vit.encoder.layer.0.attention.attention.query.bias" not in keys       # qkv_bias=False
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["hidden_act"] == "gelu" and config["layer_norm_eps"] == 1e-5 and config["qkv_bias"] is False
    loaded, meta = load_pretrained(tmp_path / "hf")
    assert_same_weights(model, loaded)
    assert loaded.config == model.config
    assert meta["format"] == "hf" and meta["naming"] == "published"
    assert meta["class_names"] == NAMES and meta["mean"] == (0.1, 0.2, 0.3)


def test_hf_save_loads_in_transformers(tmp_path, torch, transformers):
    model = random_vit(TINY)     # tanh GELU, eps 1e-5, MLP width 40: nothing at its default
    save_pretrained(model, tmp_path / "hf", format="hf", class_names=NAMES)
    transformers.utils.logging.disable_progress_bar()
    hf = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert hf.config.id2label[2] == "cat"
    x = images()
    with torch.no_grad():
        ref = hf(pixel_values=torch.from_numpy(x)).logits.numpy()
    out = model(x)
    assert np.max(np.abs(ref - out)) / np.max(np.abs(ref) + np.abs(out)) < 1e-5


def test_sincos_model_saves_as_learned_positions(tmp_path):
    model = random_vit(TINY.replace(pos_embed="sincos2d"))
    save_pretrained(model, tmp_path / "hf", format="hf")
    loaded, _ = load_pretrained(tmp_path / "hf")
    assert loaded.config.pos_embed == "learned"
    x = images()
    np.testing.assert_allclose(model(x), loaded(x), rtol=0, atol=1e-6)


def test_npz_layout_loads(tmp_path):
    model = random_vit(TINY.replace(mlp_dim=None))
    np.savez(tmp_path / "vit.npz", **timm_to_npz(model.state_dict(), TINY))
    loaded, meta = load_pretrained(tmp_path / "vit.npz")
    assert_same_weights(model, loaded)
    assert meta["format"] == "npz" and meta["config"].gelu == "tanh" and meta["config"].ln_eps == 1e-6
    assert meta["mean"] == (0.5, 0.5, 0.5)
    # Training checkpoints nest everything under opt/target/.
    np.savez(tmp_path / "opt.npz", **{"opt/target/" + k: v for k, v in timm_to_npz(model.state_dict(), TINY).items()})
    assert_same_weights(model, load_pretrained(tmp_path / "opt.npz")[0])


# ============================================================================= fine-tuning: new head, new size

def test_new_num_classes_gives_a_zero_head(tmp_path):
    model = random_vit()
    path = save_pretrained(model, tmp_path / "m.safetensors", class_names=NAMES)
    loaded, meta = load_pretrained(path, num_classes=10, seed=3)
    assert loaded.config.num_classes == 10 and loaded.head.weight.shape == (10, TINY.dim)
    assert not loaded.head.weight.data.any() and not loaded.head.bias.data.any()
    assert meta["head"] == "new, zero-initialised" and meta["class_names"] is None
    assert meta["checkpoint_num_classes"] == 5
    for name, value in model.state_dict().items():
        if not name.startswith("head."):
            np.testing.assert_array_equal(loaded.state_dict()[name], value, err_msg=name)
    # All classes equally likely, and the head still gets a gradient.
    logits = loaded(images())
    np.testing.assert_array_equal(logits, 0.0)
    _, cache = ops.cross_entropy_forward(logits, np.array([1, 7]))
    loaded.backward(ops.cross_entropy_backward(cache))
    assert np.abs(loaded.head.weight.grad).max() > 0
    # num_classes=0: features only.
    features, _ = load_pretrained(path, num_classes=0)
    assert features.head is None and features(images()).shape == (2, TINY.dim)


@pytest.mark.parametrize("img_size", [384, 32])
def test_224_checkpoint_runs_at_another_resolution(tmp_path, img_size):
    """A 224 x 224 checkpoint (14 x 14 patches of 16) fine-tuned at 384 (24 x 24) or 32 (2 x 2)."""
    config = ViTConfig(img_size=224, patch_size=16, num_classes=4, dim=16, depth=1, heads=2)
    model = random_vit(config)
    path = save_pretrained(model, tmp_path / "m.safetensors")
    loaded, meta = load_pretrained(path, img_size=img_size)
    G = img_size // 16
    assert loaded.config.img_size == img_size and loaded.pos_embed.shape == (1, 1 + G * G, 16)
    assert meta["checkpoint_img_size"] == 224
    np.testing.assert_array_equal(loaded.pos_embed.data, resample_pos_embed(model.pos_embed.data, G))
    np.testing.assert_array_equal(loaded.pos_embed.data[:, 0], model.pos_embed.data[:, 0])   # [CLS] kept
    logits = loaded(images(loaded.config, batch=1))
    assert logits.shape == (1, 4) and np.isfinite(logits).all()


def test_img_size_must_tile_into_patches(tmp_path):
    path = save_pretrained(random_vit(), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        load_pretrained(path, img_size=36)


# ============================================================================= resampling

@pytest.mark.parametrize("old,new", [(14, 24), (14, 5), (7, 7), (3, 8), (5, 2), (2, 1)])
def test_resample_matches_torch_bilinear(torch, old, new):
    rng = np.random.default_rng(old * 100 + new)
    D = 6
    pos = rng.standard_normal((1, 1 + old * old, D))
    ours = resample_pos_embed(pos, new)
    grid = torch.from_numpy(pos[0, 1:]).reshape(1, old, old, D).permute(0, 3, 1, 2)          # (1, D, G, G)
    ref = torch.nn.functional.interpolate(grid, size=(new, new), mode="bilinear", align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(1, new * new, D).numpy()                          # (1, G2*G2, D)
    assert ours.shape == (1, 1 + new * new, D) and ours.dtype == pos.dtype
    np.testing.assert_array_equal(ours[:, :1], pos[:, :1])
    np.testing.assert_allclose(ours[:, 1:], ref, rtol=0, atol=1e-12)
    ours32 = resample_pos_embed(pos.astype(np.float32), new)
    assert ours32.dtype == np.float32
    np.testing.assert_allclose(ours32[:, 1:], ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("pos,grid,match", [
    (np.zeros((1, 11, 4)), 3, r"1 \+ G\*G"),                 # 10 patch positions: not a square grid
    (np.zeros((2, 10, 4)), 3, r"\(1, 1 \+ G\*G, D\)"),
    (np.zeros((10, 4)), 3, r"\(1, 1 \+ G\*G, D\)"),
    (np.zeros((1, 10, 4)), 0, "positive integer"),
    (np.zeros((1, 10, 4)), True, "positive integer"),
    (np.zeros((1, 10, 4)), 2.5, "positive integer"),
], ids=["not-square", "batch", "2d", "zero", "bool", "float"])
def test_resample_rejects_bad_input(pos, grid, match):
    with pytest.raises(ValueError, match=match):
        resample_pos_embed(pos, grid)


# ============================================================================= clear errors

@pytest.fixture
def timm_file(tmp_path):
    model = random_vit()
    return save_pretrained(model, tmp_path / "m.safetensors"), model


def rewrite(path, change, metadata=True):
    """Load a safetensors file, let `change` edit its dict, write it back."""
    from safetensors import safe_open
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata()
    state = load_file(str(path))
    change(state)
    save_file(state, str(path), metadata=meta if metadata else None)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_pretrained(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(tmp_path / "empty")


@pytest.mark.parametrize("name,match", [("w.txt", "cannot tell the format"), ("w.bin", "pickle"), ("w.pth", "pickle")])
def test_unknown_or_pickled_format(tmp_path, name, match):
    (tmp_path / name).write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ValueError, match=match):
        load_pretrained(tmp_path / name)


def test_not_a_safetensors_file(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match="cannot read"):
        load_pretrained(tmp_path / "w.safetensors")


def test_unrelated_safetensors_file(tmp_path):
    save_file({"encoder.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="neither timm's names"):
        load_pretrained(tmp_path / "w.safetensors")


def test_missing_key_is_named(timm_file):
    path, _ = timm_file
    rewrite(path, lambda s: s.pop("blocks.1.mlp.fc2.bias"))
    with pytest.raises(KeyError, match="blocks.1.mlp.fc2.bias"):
        load_pretrained(path)


def test_unexpected_key_is_named(timm_file):
    path, _ = timm_file
    rewrite(path, lambda s: s.update({"fc_norm.weight": np.ones(TINY.dim, np.float32)}))
    with pytest.raises(KeyError, match="fc_norm.weight"):
        load_pretrained(path)


def test_misshaped_key_is_named(timm_file):
    path, _ = timm_file
    rewrite(path, lambda s: s.update({"blocks.0.attn.proj.weight": np.zeros((TINY.dim, TINY.dim + 1), np.float32)}))
    with pytest.raises(ValueError, match=r"blocks.0.attn.proj.weight.*\(24, 25\).*\(24, 24\)"):
        load_pretrained(path)


def test_non_numeric_tensor(timm_file):
    path, _ = timm_file
    rewrite(path, lambda s: s.update({"norm.bias": np.zeros(TINY.dim, bool)}))
    with pytest.raises(TypeError, match="norm.bias"):
        load_pretrained(path)


def test_timm_heads_come_from_somewhere(timm_file, tmp_path):
    path, model = timm_file
    rewrite(path, lambda s: None, metadata=False)          # a bare timm file: shapes only
    with pytest.raises(ValueError, match="heads"):
        load_pretrained(path)
    loaded, meta = load_pretrained(path, heads=3)
    assert loaded.config.heads == 3
    assert loaded.config.ln_eps == 1e-6 and loaded.config.gelu == "exact"    # timm's defaults
    assert loaded.config.mlp_dim == 40 and loaded.config.img_size == 32
    # ... or from timm's hub config.json beside the file, with its normalisation and labels.
    (tmp_path / "config.json").write_text(json.dumps({
        "architecture": "vit_tiny_patch8_32", "label_names": NAMES,
        "pretrained_cfg": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}))
    loaded, meta = load_pretrained(path)
    assert loaded.config.heads == 3 and meta["class_names"] == NAMES and meta["mean"][0] == 0.485
    with pytest.raises(ValueError, match="disagrees"):
        load_pretrained(path, heads=4)


def test_bad_metadata(timm_file):
    path, _ = timm_file
    state = load_file(str(path))
    save_file(state, str(path), metadata={"minivit_config": "{not json"})
    with pytest.raises(ValueError, match="minivit_config"):
        load_pretrained(path)
    save_file(state, str(path), metadata={"minivit_config": json.dumps({"heads": 3, "colour": "red"})})
    with pytest.raises(ValueError, match="colour"):
        load_pretrained(path)


@pytest.fixture
def hf_dir(tmp_path):
    model = random_vit()
    return save_pretrained(model, tmp_path / "hf", format="hf", class_names=NAMES)


def test_hf_missing_key_names_the_published_name(hf_dir):
    rewrite(hf_dir / "model.safetensors", lambda s: s.pop("vit.encoder.layer.1.attention.attention.key.weight"))
    with pytest.raises(KeyError, match=r"vit.encoder.layer.1.attention.attention.key.weight"):
        load_pretrained(hf_dir)


def test_hf_unexpected_key(hf_dir):
    rewrite(hf_dir / "model.safetensors", lambda s: s.update({"vit.embeddings.mask_token": np.zeros((1, 1, 24), np.float32)}))
    with pytest.raises(KeyError, match="vit.embeddings.mask_token"):
        load_pretrained(hf_dir)


def test_hf_pooler_is_ignored(hf_dir):
    rewrite(hf_dir / "model.safetensors", lambda s: s.update({"vit.pooler.dense.weight": np.zeros((24, 24), np.float32),
                                                              "vit.pooler.dense.bias": np.zeros(24, np.float32)}))
    _, meta = load_pretrained(hf_dir)
    assert meta["ignored_keys"] == ["vit.pooler.dense.bias", "vit.pooler.dense.weight"]


def test_hf_base_model_without_prefix_or_head(hf_dir):
    """transformers' ViTModel (e.g. the ImageNet-21k checkpoints) has no "vit." prefix, no
    classifier and a pooler: it loads as a feature extractor, or with a new head."""
    def to_base_model(s):
        for k in list(s):
            value = s.pop(k)
            if k.startswith("vit."):
                s[k[4:]] = value
        s["pooler.dense.weight"], s["pooler.dense.bias"] = np.zeros((24, 24), np.float32), np.zeros(24, np.float32)
    rewrite(hf_dir / "model.safetensors", to_base_model)
    model, meta = load_pretrained(hf_dir)
    assert model.head is None and meta["class_names"] is None and meta["ignored_keys"] == ["pooler.dense.bias", "pooler.dense.weight"]
    model, meta = load_pretrained(hf_dir, num_classes=3)
    assert model.config.num_classes == 3 and meta["head"] == "new, zero-initialised"
    rewrite(hf_dir / "model.safetensors", lambda s: s.pop("encoder.layer.0.layernorm_after.bias"))
    with pytest.raises(KeyError, match="'encoder.layer.0.layernorm_after.bias'"):
        load_pretrained(hf_dir)


def test_hf_needs_a_config_and_a_known_activation(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "hidden_act": "quick_gelu"}))
    with pytest.raises(ValueError, match="quick_gelu"):
        load_pretrained(hf_dir)
    (hf_dir / "config.json").write_text(json.dumps({**config, "model_type": "deit"}))
    with pytest.raises(ValueError, match="deit"):
        load_pretrained(hf_dir)
    (hf_dir / "config.json").write_text(json.dumps({**config, "num_attention_heads": 5}))
    with pytest.raises(ValueError, match="not divisible by heads=5"):
        load_pretrained(hf_dir)
    (hf_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(hf_dir)


def test_npz_errors(tmp_path):
    model = random_vit(TINY.replace(mlp_dim=None))
    arrays = timm_to_npz(model.state_dict(), TINY)
    # An object array would need unpickling: refused, never executed.
    np.savez(tmp_path / "obj.npz", **arrays, extra=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_pretrained(tmp_path / "obj.npz")
    np.savez(tmp_path / "pre.npz", **arrays, **{"pre_logits/kernel": np.zeros((24, 24), np.float32)})
    with pytest.raises(ValueError, match="pre_logits"):
        load_pretrained(tmp_path / "pre.npz")
    bad = dict(arrays)
    bad["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/out/kernel"] = np.zeros((24, 24), np.float32)
    np.savez(tmp_path / "shape.npz", **bad)
    with pytest.raises(ValueError, match="encoderblock_1/MultiHeadDotProductAttention_1/out/kernel"):
        load_pretrained(tmp_path / "shape.npz")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="cannot read"):
        load_pretrained(tmp_path / "broken.npz")
    np.savez(tmp_path / "ok.npz", **arrays)
    with pytest.raises(ValueError, match="heads=4 disagrees"):
        load_pretrained(tmp_path / "ok.npz", heads=4)


def test_save_errors(tmp_path):
    with pytest.raises(TypeError, match="minivit ViT"):
        save_pretrained({"cls_token": np.zeros(3)}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="format"):
        save_pretrained(random_vit(), tmp_path / "x.onnx", format="onnx")
    with pytest.raises(ValueError, match="class_names"):
        save_pretrained(random_vit(), tmp_path / "x.safetensors", class_names=["a"])
    with pytest.raises(ValueError, match="pool='cls'"):
        save_pretrained(random_vit(TINY.replace(pool="mean")), tmp_path / "hf", format="hf")
    (tmp_path / "dir").mkdir()
    with pytest.raises(ValueError, match="directory"):
        save_pretrained(random_vit(), tmp_path / "dir")


def test_load_rejects_bad_heads_argument(timm_file):
    path, _ = timm_file
    with pytest.raises(ValueError, match="heads must be a positive integer"):
        load_pretrained(path, heads=0)


# ============================================================================= hostile files, refused before building

@pytest.fixture
def no_model_built(monkeypatch):
    """Fail the test if load_pretrained builds a ViT: the files below must be refused from their
    names and shapes alone (before the fix each built a model of GBs)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a ViT was built from a file that should have been refused first")
    monkeypatch.setattr(pretrained, "ViT", refuse)


def test_zero_size_pos_embed_is_refused_before_building(timm_file, no_model_built):
    # 9000001 = 1 + 3000 x 3000 positions of width 0: no data at all, yet img_size would become
    # 24000 and ViT(config) would allocate a (1, 9000001, 24) position table.
    path, _ = timm_file
    rewrite(path, lambda s: s.update({"pos_embed": np.zeros((1, 9000001, 0), np.float32)}), metadata=False)
    with pytest.raises(ValueError, match=r"'pos_embed'.*shape \(1, 9000001, 0\).*needs \(1, 9000001, 24\)"):
        load_pretrained(path, heads=3)


@pytest.mark.parametrize("change,match", [
    ({"hidden_size": 99_999_999}, r"cls_token'.*shape \(1, 1, 24\).*dim=99999999.*needs \(1, 1, 99999999\)"),
    ({"num_hidden_layers": 10_000}, r"num_hidden_layers=10000, but the weights hold 2 block\(s\)"),
    ({"image_size": 8 * 10_000}, r"position_embeddings'.*\(1, 17, 24\).*needs \(1, 100000001, 24\)"),
])
def test_absurd_hf_config_sizes_are_refused_before_building(hf_dir, no_model_built, change, match):
    # A config.json of a few hundred bytes said how big a model to build; the weights beside it
    # did not back it. (10**7 layers cost 41 s and 3.8 GB before the fix; 10**4 shows the same
    # refusal without that cost should the fix ever go.)
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=match):
        load_pretrained(hf_dir)


def test_a_recorded_config_must_match_the_timm_tensors(timm_file, no_model_built):
    path, _ = timm_file
    state = load_file(str(path))
    save_file(state, str(path), metadata={"minivit_config": json.dumps({"heads": 3, "depth": 10**6})})
    with pytest.raises(ValueError, match=r"depth=1000000, but the weights hold 2 block"):
        load_pretrained(path)
    # With no pos_embed tensor, img_size is backed by nothing: a bound on the tokens applies.
    del state["pos_embed"]
    save_file(state, str(path), metadata={"minivit_config": json.dumps(
        {"heads": 3, "pos_embed": "sincos2d", "img_size": 8 * 300})})
    with pytest.raises(ValueError, match=r"90001 tokens, more than the 65536"):
        load_pretrained(path)


def _npy_member(shape, dtype="<f4", data=b""):
    """The bytes of an .npy file whose header claims `shape`, followed by `data` (maybe none)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue() + data


def test_npz_bomb_entries_are_refused_from_their_headers(tmp_path):
    # An entry whose header claims 2**44 floats (64 TiB): np.load would allocate it whole before
    # anything checked it (MemoryError, or GBs for a compressed array of zeros). The headers are
    # read first now, so it is refused without reading a byte of it.
    model = random_vit(TINY.replace(mlp_dim=None))
    arrays = timm_to_npz(model.state_dict(), TINY)
    path = tmp_path / "bomb.npz"
    np.savez(path, **arrays)
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("extra/kernel.npy", _npy_member((2**44,)))
    with zipfile.ZipFile(path) as z, z.open("extra/kernel.npy") as f:       # the lie is in place
        np.lib.format.read_magic(f)
        assert np.lib.format.read_array_header_1_0(f)[0] == (2**44,)
    with pytest.raises(KeyError, match="unexpected key.*extra/kernel"):
        load_pretrained(path)
    # The same lie in a key the model needs: its size disagrees with the config.
    del arrays["head/bias"]
    np.savez(path, **arrays)
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("head/bias.npy", _npy_member((2**44,)))
    with pytest.raises(ValueError, match=r"'head/bias' \(17592186044416,\) hold 17592186044416 numbers.*\(5,\)"):
        load_pretrained(path)


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path):
    model = random_vit()
    model.blocks[1].mlp.fc1.bias.data[3] = np.nan
    path = save_pretrained(model, tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match=r"'blocks.1.mlp.fc1.bias'.* holds 1 non-finite value"):
        load_pretrained(path)
    model = random_vit(TINY.replace(mlp_dim=None))
    arrays = timm_to_npz(model.state_dict(), TINY)
    arrays["embedding/bias"][0] = np.inf
    np.savez(tmp_path / "inf.npz", **arrays)
    with pytest.raises(ValueError, match=r"'embedding/bias'.*non-finite"):
        load_pretrained(tmp_path / "inf.npz")


@pytest.mark.parametrize("content,match", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe binary", r"config.json' is not UTF-8 text"),
    (b"[1, 2, 3]", r"config.json' must hold a JSON object.*got a JSON array"),
    (None, r"config.json': id2label must be a JSON object from class index to name.*got a JSON array"),
    (b'{"hidden_size": "big"}', r"config.json' does not describe a ViT minivit can build: .*'big'"),
])
def test_bad_config_json_is_a_clear_error_naming_the_file(hf_dir, content, match):
    if content is None:         # id2label as a list (transformers refuses it too)
        config = json.loads((hf_dir / "config.json").read_text())
        content = json.dumps({**config, "id2label": NAMES}).encode()
    (hf_dir / "config.json").write_bytes(content)
    with pytest.raises(ValueError, match=match):
        load_pretrained(hf_dir)


def test_a_full_disk_names_the_file_being_written(tmp_path, monkeypatch):
    import safetensors.numpy

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(safetensors.numpy, "save_file", disk_full)
    path = tmp_path / "m.safetensors"
    with pytest.raises(OSError, match="No space left on device") as caught:
        save_pretrained(random_vit(), path)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert list(tmp_path.iterdir()) == []


# ============================================================================= minivit predict

@pytest.fixture
def predict_cli(monkeypatch):
    """cli.main with only the predict command registered, so these tests do not depend on
    the other subcommands' modules."""
    assert "minivit.predict" in cli.COMMAND_MODULES
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["minivit.predict"])
    return cli.main


@pytest.fixture
def picture(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)        # not square, not 32 x 32
    path = tmp_path / "picture.png"
    Image.fromarray(pixels).convert("RGBA").save(path)                  # RGBA: predict must convert to RGB
    return path


def test_predict_prints_top_classes(tmp_path, picture, predict_cli, capsys):
    from PIL import Image
    model = random_vit(scale=0.3)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    weights = save_pretrained(model, tmp_path / "m.safetensors", class_names=NAMES, mean=mean, std=std)
    assert predict_cli(["predict", "--weights", str(weights), str(picture), "--top", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == str(picture) and len(lines) == 4
    # The same prediction computed by hand: RGB, bilinear resize to 32 x 32, [0, 1], normalise.
    img = Image.open(picture).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)
    x = (np.asarray(img, np.float32) / 255 - np.array(mean, np.float32)) / np.array(std, np.float32)
    logits = model(np.ascontiguousarray(x.transpose(2, 0, 1))[None]).astype(np.float64)[0]
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    order = np.argsort(-probs)[:3]
    for line, i in zip(lines[1:], order):
        assert line.split() == [f"{probs[i]:.2%}", NAMES[i]]


def test_predict_several_images_and_top_larger_than_k(tmp_path, picture, predict_cli, capsys):
    weights = save_pretrained(random_vit(), tmp_path / "m.safetensors")     # no class names
    assert predict_cli(["predict", "--weights", str(weights), str(picture), str(picture), "--top", "50"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 * (1 + 5) and lines[1].split()[1:] in (["class", str(i)] for i in range(5))


@pytest.mark.parametrize("content,match", [(b"this is not an image", "cannot read image"), (None, "image not found")])
def test_predict_bad_image_exits_2_with_one_line(tmp_path, predict_cli, capsys, content, match):
    weights = save_pretrained(random_vit(), tmp_path / "m.safetensors")
    bad = tmp_path / "bad.png"
    if content is not None:
        bad.write_bytes(content)
    assert predict_cli(["predict", "--weights", str(weights), str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and match in err[0] and str(bad) in err[0]


def test_predict_bad_weights_and_top(tmp_path, picture, predict_cli, capsys):
    assert predict_cli(["predict", "--weights", str(tmp_path / "none.safetensors"), str(picture)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    weights = save_pretrained(random_vit(), tmp_path / "m.safetensors")
    assert predict_cli(["predict", "--weights", str(weights), str(picture), "--top", "0"]) == 2
    assert "--top" in capsys.readouterr().err


def _png_header_only(width, height):
    """A 1-bit greyscale PNG of width x height whose pixels are all zero: a few KB that claims
    width x height pixels (a decompression bomb when both are large)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    row = b"\x00" * (1 + (width + 7) // 8)                     # filter byte, then the row's bits
    pixels = zlib.compressobj(9)
    body = b"".join(pixels.compress(row) for _ in range(height)) + pixels.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def test_predict_refuses_a_200_megapixel_png_with_one_line(tmp_path, predict_cli, capsys):
    weights = save_pretrained(random_vit(), tmp_path / "m.safetensors")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(20_000, 10_000))
    assert bomb.stat().st_size < 100_000
    assert predict_cli(["predict", "--weights", str(weights), str(bomb)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot read image {str(bomb)!r}" in err[0] and "too large" in err[0]


def test_predict_pixel_limits_are_checked_before_decoding(tmp_path, picture, predict_cli, capsys, monkeypatch):
    from PIL import Image
    weights = save_pretrained(random_vit(), tmp_path / "m.safetensors")
    monkeypatch.setattr(predict_module, "MAX_IMAGE_PIXELS", 3000)          # the picture is 70 x 50
    assert predict_cli(["predict", "--weights", str(weights), str(picture)]) == 2
    assert "70 x 50 = 0.0 megapixels, more than the 0.003 megapixels" in capsys.readouterr().err
    # Between Pillow's limit and twice it, Pillow only warns, then decodes anyway: refused too.
    monkeypatch.setattr(predict_module, "MAX_IMAGE_PIXELS", 10**8)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    assert predict_cli(["predict", "--weights", str(weights), str(picture)]) == 2
    assert "too large to decode safely" in capsys.readouterr().err


def test_predict_with_nan_weights_exits_2_naming_the_tensor(tmp_path, picture, predict_cli, capsys):
    model = random_vit()
    model.head.weight.data[...] = np.nan
    weights = save_pretrained(model, tmp_path / "nan.safetensors", class_names=NAMES)
    assert predict_cli(["predict", "--weights", str(weights), str(picture)]) == 2
    captured = capsys.readouterr()
    assert "%" not in captured.out
    assert "'head.weight'" in captured.err and "non-finite" in captured.err
    # Finite weights whose outputs overflow float32 are refused too (softmax would print nan%).
    model.head.weight.data[...] = 3e38
    model.head.bias.data[...] = 3e38
    weights = save_pretrained(model, tmp_path / "huge.safetensors", class_names=NAMES)
    assert predict_cli(["predict", "--weights", str(weights), str(picture)]) == 2
    captured = capsys.readouterr()
    assert "%" not in captured.out and "outputs (logits)" in captured.err and "not finite" in captured.err
