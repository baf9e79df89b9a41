"""ViTConfig validation: every bad value is a clear error naming it."""
import dataclasses

import numpy as np
import pytest

from minivit import PRESETS, ViTConfig, get_preset


@pytest.mark.parametrize("overrides, message", [
    ({"img_size": 30, "patch_size": 4}, "img_size=30 is not divisible by patch_size=4"),
    ({"dim": 100, "heads": 12}, "dim=100 is not divisible by heads=12"),
    ({"depth": 0}, "depth must be a positive integer, got 0"),
    ({"heads": -1}, "heads must be a positive integer"),
    ({"patch_size": 2.5}, "patch_size must be a positive integer, got 2.5"),
    ({"dim": True}, "dim must be a positive integer"),
    ({"num_classes": -3}, "num_classes must be an integer >= 0"),
    ({"mlp_dim": 0}, "mlp_dim must be a positive integer or None"),
    ({"mlp_ratio": -1.0}, "mlp_ratio must be a positive number"),
    ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\), got 1.0"),
    ({"attn_dropout": -0.1}, "attn_dropout must be a number in"),
    ({"drop_path": "0.1"}, "drop_path must be a number in"),
    ({"pool": "max"}, "pool must be one of \\('cls', 'mean'\\), got 'max'"),
    ({"pos_embed": "rope"}, "pos_embed must be one of"),
    ({"gelu": "relu"}, "gelu must be one of"),
    ({"init": "xavier"}, "init must be one of \\('timm', 'mimetic'\\), got 'xavier'"),
    ({"ln_eps": 0.0}, "ln_eps must be a positive number"),
    ({"qkv_bias": 1}, "qkv_bias must be True or False"),
    ({"pos_embed": "sincos2d", "dim": 6, "heads": 2}, "sincos2d' needs dim divisible by 4"),
    # inf and NaN: an OverflowError deep inside, or a run that trains and then cannot save its config
    ({"mlp_ratio": float("inf")}, "mlp_ratio must be a finite number, got inf"),
    ({"mlp_ratio": float("nan")}, "mlp_ratio must be a finite number, got nan"),
    ({"mlp_ratio": np.float64("inf")}, "mlp_ratio must be a finite number, got inf"),
    ({"mlp_ratio": 1e308}, "mlp_ratio=1e\\+308 gives an MLP wider than 2147483647 for dim=768"),
    ({"ln_eps": float("inf")}, "ln_eps must be a finite number, got inf"),
    ({"ln_eps": float("nan")}, "ln_eps must be a finite number, got nan"),
    ({"ln_eps": 2.0}, "ln_eps must be a positive number at most 1, got 2.0"),
    ({"ln_eps": 1e-50}, "ln_eps=1e-50 rounds to 0 in float32"),
    ({"dropout": float("nan")}, "dropout must be a finite number, got nan"),
    ({"drop_path": float("-inf")}, "drop_path must be a finite number, got -inf"),
    ({"attn_dropout": float("inf")}, "attn_dropout must be a finite number, got inf"),
    # sizes no machine can hold, and that would overflow the float arithmetic
    ({"dim": 10**400}, "dim=1000+ is too large \\(at most 2147483647\\)"),
    ({"mlp_dim": 2**31}, "mlp_dim=2147483648 is too large"),
    ({"num_classes": 2**40}, "num_classes=1099511627776 is too large"),
])
def test_invalid_configs(overrides, message):
    with pytest.raises(ValueError, match=message):
        ViTConfig(**overrides)


HOSTILE_FLOATS = [float("inf"), float("-inf"), float("nan"), 1e308, -1e308, 5e-324, -0.0, 1e-50, 1e30]


@pytest.mark.parametrize("name", ["mlp_ratio", "dropout", "attn_dropout", "drop_path", "ln_eps"])
@pytest.mark.parametrize("value", HOSTILE_FLOATS)
def test_every_float_field_is_refused_by_name_or_usable(name, value):
    """Whatever a float field is given, the config either refuses it with a ValueError naming
    the field, or is a config a run can use: its sizes are integers and it saves as strict
    JSON (no inf or NaN, which json.dumps would only refuse when a trained run saves)."""
    import json

    try:
        cfg = ViTConfig(img_size=8, patch_size=4, dim=8, heads=2, depth=1, num_classes=3, **{name: value})
    except ValueError as exc:
        assert f"ViTConfig.{name}" in str(exc)
        return
    json.dumps(cfg.to_dict(), allow_nan=False)
    assert isinstance(cfg.hidden_dim, int) and 0 < cfg.hidden_dim <= 2**31 - 1
    assert np.float32(cfg.ln_eps) > 0


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match=r"unknown ViTConfig option\(s\) \['depht'\]"):
        ViTConfig().replace(depht=3)
    with pytest.raises(ValueError, match="unknown preset 'vit-x'; known presets: vit-ti16"):
        get_preset("vit-x")


def test_config_is_frozen_and_round_trips():
    cfg = get_preset("vit-b16")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dim = 5
    assert ViTConfig.from_dict(cfg.to_dict()) == cfg
    old = {k: v for k, v in cfg.to_dict().items() if k != "init"}   # saved before `init` existed
    assert ViTConfig.from_dict(old) == cfg and cfg.init == "timm"
    assert get_preset("vit-b16", num_classes=10).num_classes == 10 and cfg.num_classes == 1000


def test_derived_sizes_of_vit_b16():
    c = get_preset("vit-b16")
    assert (c.grid_size, c.num_patches, c.num_tokens, c.patch_dim, c.head_size, c.hidden_dim) == (14, 196, 197, 768, 64, 3072)


def test_presets_are_valid_and_cifar_presets_fit_32px():
    for name, cfg in PRESETS.items():
        assert isinstance(cfg, ViTConfig), name
        if name.startswith("cifar"):
            assert cfg.img_size == 32 and cfg.num_classes == 10
    assert (PRESETS["cifar-vit4"].patch_size, PRESETS["cifar-vit4"].dim, PRESETS["cifar-vit4"].depth,
            PRESETS["cifar-vit4"].heads) == (4, 192, 12, 6)
    assert (PRESETS["cifar-vit2"].patch_size, PRESETS["cifar-vit2"].dim, PRESETS["cifar-vit2"].depth,
            PRESETS["cifar-vit2"].heads) == (2, 96, 12, 6)


def test_numpy_scalars_are_stored_as_python_floats():
    """A np.float64 eps must not turn a float32 model into a float64 one."""
    import numpy as np

    from minivit import ViT

    cfg = ViTConfig(img_size=8, patch_size=4, dim=8, depth=1, heads=2, num_classes=3,
                    ln_eps=np.float64(1e-6), dropout=np.float64(0.0), mlp_ratio=np.float32(2.0))
    assert type(cfg.ln_eps) is float and type(cfg.dropout) is float and type(cfg.mlp_ratio) is float
    assert ViT(cfg)(np.zeros((1, 3, 8, 8), np.float32)).dtype == np.float32
