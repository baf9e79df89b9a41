"""ViTConfig validation: every bad value is a clear error naming it."""
import dataclasses

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
])
def test_invalid_configs(overrides, message):
    with pytest.raises(ValueError, match=message):
        ViTConfig(**overrides)


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
