"""The hybrid ViT of minivit/model.py (paper §3.1): a ResNet's feature map cut into patches and
fed to the ViT blocks. Parity with minivit.bench's PyTorch twin on the same weights (logits, the
images' and every parameter's gradient, BatchNorm running averages and attention maps, float64,
BatchNorm in training and eval mode), a float64 gradient check of the whole model, parameter and
FLOP counts of `minivit shapes` against the model and a hand count, the state dict with the
backbone's buffers, and clear errors.

Shape legend: B batch, C channels, S image side, F feature-map channels, h its side, P patch side
on the map, N tokens, D width, H heads, hs head size, K classes.
"""
import json

import numpy as np
import pytest
from test_resnet import _close, randomise_buffers

from minivit import cnn_fastops, cnn_ops
from minivit.cli import main
from minivit.config import HYBRID_PRESETS, HybridConfig, ViTConfig, get_model_preset
from minivit.gradcheck import TOLERANCE, check_model
from minivit.model import HybridViT, ViT, build_model
from minivit.resnet import BatchNorm2d, ResNet
from minivit.shapes import count_flops, count_parameters, walk

# A 12 x 12 image through two tiny stages (basic blocks, projection shortcuts) -> a 6 x 6 map
# of 4 channels, cut into 1 x 1 patches (36 tokens + [CLS]), then 2 blocks of D = 12, 3 heads.
TINY = HybridConfig(img_size=12, in_chans=2, num_classes=5, patch_size=1, dim=12, depth=2, heads=3, mlp_dim=20,
                    backbone_block="basic", backbone_layers=(1, 1), backbone_widths=(3, 4), backbone_stem="cifar",
                    backbone_shortcut="B", ln_eps=1e-6)
# The ImageNet stem, bottlenecks and 2 x 2 patches of the map: 16 -> 4 -> 4 -> 2 x 2 patches of 12 values.
TINY_BOTTLENECK = HybridConfig(img_size=16, in_chans=1, num_classes=3, patch_size=2, dim=8, depth=1, heads=2,
                               mlp_dim=16, backbone_block="bottleneck", backbone_layers=(1,), backbone_widths=(3,),
                               backbone_stem="imagenet", backbone_shortcut="B")


def images(cfg, batch, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, cfg.in_chans, cfg.img_size, cfg.img_size)).astype(dtype)


# ============================================================================= the PyTorch twin

def torch_hybrid(torch, cfg):
    """minivit.bench's PyTorch twin of the hybrid (timm's layout and names), in float64, each
    block keeping its attention probabilities as block.attn.probs (they enter attn_drop)."""
    from minivit.bench import build_torch_hybrid

    twin = build_torch_hybrid(cfg).double()
    for block in twin.blocks:
        block.attn.attn_drop.register_forward_hook(
            lambda module, inputs, output, attn=block.attn: setattr(attn, "probs", inputs[0]))
    return twin


@pytest.mark.parametrize("cfg", [TINY, TINY_BOTTLENECK.replace(pool="mean")], ids=["basic-P1-cls", "bottleneck-P2-mean"])
def test_hybrid_matches_pytorch(torch, cfg):
    """Every parameter drawn at a scale where nothing is trivial; BatchNorm with running averages
    unlike 0 and 1. Training mode (batch statistics, running averages updated) and eval mode."""
    twin = torch_hybrid(torch, cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")) or ".bn" in name or "downsample.1" in name:
                p.uniform_(0.5, 1.5, generator=gen) if name.endswith("weight") else p.normal_(0, 0.2, generator=gen)
            else:
                p.normal_(0, 0.3 if p.ndim > 1 and "backbone" in name else 0.2, generator=gen)
        for m in twin.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                m.num_batches_tracked.fill_(3)
    twin_state = {k: v.detach().numpy().copy() for k, v in twin.state_dict().items()}
    model = HybridViT(cfg, seed=1).astype(np.float64)
    assert list(model.state_dict()) == list(twin_state)          # timm's names, in timm's order
    model.load_state_dict(twin_state)

    batch = 3
    x = images(cfg, batch)
    dlogits = np.random.default_rng(1).standard_normal((batch, cfg.num_classes))
    errors = {}
    for mode in ("train", "eval"):
        model.train(mode == "train")
        twin.train(mode == "train")
        model.zero_grad()
        twin.zero_grad()
        logits = model(x, keep_attention=True)
        dx = model.backward(dlogits)
        xt = torch.tensor(x, requires_grad=True)
        t_logits = twin(xt)
        t_logits.backward(torch.tensor(dlogits))
        errors[f"{mode} logits"] = _close(logits, t_logits.detach().numpy())
        errors[f"{mode} images"] = _close(dx, xt.grad.numpy())
        for i, (ours, block) in enumerate(zip(model.attention_maps(), twin.blocks)):
            errors[f"{mode} attention {i}"] = _close(ours, block.attn.probs.detach().numpy())
        grads = dict(model.named_parameters())
        t_params = dict(twin.named_parameters())
        assert set(grads) == set(t_params)
        for name, p in t_params.items():
            errors[f"{mode} {name}"] = _close(grads[name].grad, p.grad.numpy())
        for name, buf in twin.named_buffers():
            errors[f"{mode} {name}"] = _close(model.state_dict()[name], buf.numpy())
    bad = {k: v for k, v in errors.items() if not v < 1e-10}
    assert not bad, f"minivit and the PyTorch twin differ: {bad}"
    assert len(errors) > 2 * len(twin_state)


# ============================================================================= gradient check

@pytest.mark.parametrize("mode", ["train", "eval"])
def test_whole_hybrid_gradient_check(mode):
    """Every parameter tensor (3 entries each, backbone included) and the images, in float64,
    with learned positions and the [CLS] token so that every kind of parameter is there."""
    model = HybridViT(TINY, seed=3).astype(np.float64)
    rng = np.random.default_rng(4)
    for name, p in model.named_parameters():
        if not name.startswith("patch_embed.backbone."):
            # as test_model.py's randomise: ViT's initial weights (std .02) make gradients nearly
            # vanish; a larger scale and non-trivial LayerNorm scales test every path
            p.data[...] = rng.standard_normal(p.shape) * 0.3 + name.endswith(("norm1.weight", "norm2.weight"))
    randomise_buffers(model)                  # BatchNorm: scale, shift and running averages
    model.train(mode == "train")
    errors = check_model(model, images(TINY, 3), np.array([0, 4, 2]), samples=3, seed=0)
    assert len(errors) == len(model.parameters()) + 1
    assert any(name.startswith("patch_embed.backbone.") for name in errors)
    bad = {k: v for k, v in errors.items() if not v < TOLERANCE}
    assert not bad, f"gradient check failed: {bad}"


# ============================================================================= counts: minivit shapes

def hand_flops(cfg, conv_flops):
    """Forward FLOPs of one image: the backbone's convolutions (measured), then the ViT's matrix
    products counted by hand from the paper's formulas."""
    N, D, F, G, K = cfg.num_tokens, cfg.dim, cfg.hidden_dim, cfg.grid_size, cfg.num_classes
    proj = 2 * G * G * cfg.num_features * cfg.patch_size ** 2 * D
    block = 2 * N * D * 3 * D + 2 * 2 * N * N * D + 2 * N * D * D + 2 * 2 * N * D * F   # qkv, q k^T and a v, proj, MLP
    return conv_flops + proj + cfg.depth * block + 2 * D * K


@pytest.mark.parametrize("cfg", [TINY, TINY_BOTTLENECK, HYBRID_PRESETS["cifar-hybrid"]],
                         ids=["tiny", "bottleneck", "cifar-hybrid"])
def test_shapes_walk_counts_the_models_parameters_and_flops(cfg, monkeypatch):
    measured = []

    def counting(real_conv):
        def counting_conv(x, w, b=None, stride=1, padding=0):
            out, cache = real_conv(x, w, b, stride, padding)
            measured.append(2 * out[0].size * w[0].size)      # (Cout Hout Wout) x (Cin k k) multiply-adds
            return out, cache
        return counting_conv
    for ops in (cnn_ops, cnn_fastops):                        # whichever modules.set_ops chose
        monkeypatch.setattr(ops, "conv2d_forward", counting(ops.conv2d_forward))
    model = HybridViT(cfg).eval()
    model(images(cfg, 1, dtype=np.float32))
    assert count_parameters(cfg) == model.num_parameters() == sum(p.data.size for p in model.parameters())
    assert count_flops(cfg) == hand_flops(cfg, sum(measured))
    names = [s.name for s in walk(cfg)]
    assert names[0] == "image" and "patch_embed.backbone.conv1" in names and "patch_embed.proj" in names


def test_minivit_shapes_walks_the_hybrid_preset(capsys):
    assert main(["shapes", "--preset", "cifar-hybrid"]) == 0
    out = capsys.readouterr().out
    total = [line for line in out.splitlines() if line.startswith("total")]
    assert total and f"{build_model('cifar-hybrid').num_parameters():,}" in total[0]
    assert "patch_embed.backbone.layer3.0.conv1" in out and "64 x 8 x 8" in out
    assert main(["shapes", "--preset", "cifar-hybrid", "--set", "backbone_layers=2,1,1", "--set", "depth=2"]) == 0
    changed = capsys.readouterr().out
    assert "blocks.1-1 " in changed and "patch_embed.backbone.layer1.1 " in changed and "layer2.1" not in changed


def test_cifar_hybrid_preset_sizes():
    """An 8 x 8 map of 64 channels from 32 x 32 images: 64 tokens + [CLS], like cifar-recipe's
    4 x 4 patches, and about as many parameters and FLOPs as cifar-recipe."""
    cfg = get_model_preset("cifar-hybrid")
    recipe = get_model_preset("cifar-recipe")
    assert (cfg.feature_size, cfg.num_features, cfg.num_tokens) == (8, 64, recipe.num_tokens)
    assert 0.8 < count_parameters(cfg) / count_parameters(recipe) < 1.2
    assert 0.8 < count_flops(cfg) / count_flops(recipe) < 1.2
    # the paper's R50+ViT-B/16: 224 -> a 14 x 14 map of 1024 channels -> 196 tokens, as ViT-B/16
    paper = get_model_preset("r50-vit-b16")
    assert (paper.grid_size, paper.num_features, paper.num_tokens) == (14, 1024, get_model_preset("vit-b16").num_tokens)


# ============================================================================= the model's interface

def test_state_dict_holds_the_backbones_buffers_and_round_trips(tmp_path):
    model = HybridViT(TINY, seed=0)
    model(images(TINY, 4, dtype=np.float32))                     # a training step moves the averages
    state = model.state_dict()
    n_bn = sum(isinstance(m, BatchNorm2d) for m in model.modules())
    assert len(state) == len(model.parameters()) + 3 * n_bn
    assert "patch_embed.backbone.layer2.0.downsample.1.running_var" in state
    assert not np.allclose(state["patch_embed.backbone.bn1.running_mean"], 0)
    np.savez(tmp_path / "w.npz", **state)
    other = HybridViT(TINY, seed=5)
    other.load_state_dict(dict(np.load(tmp_path / "w.npz")))
    x = images(TINY, 2, 7, np.float32)
    np.testing.assert_array_equal(model.eval()(x), other.eval()(x))


def test_backbone_keeps_the_resnet_initialisation():
    """The ViT part is drawn as ViT draws it (trunc-normal .02); the backbone as ResNet (He)."""
    model = HybridViT(HYBRID_PRESETS["cifar-hybrid"], seed=0)
    w = model.patch_embed.backbone.layer3[0].conv2.weight.data               # (64, 64, 3, 3)
    assert abs(w.std() / np.sqrt(2 / (64 * 9)) - 1) < 0.05                   # He-normal, fan_out
    proj = model.patch_embed.proj.weight.data                                # (192, 64, 1, 1)
    # trunc-normal .02, cut at 2 std: std 0.02 * 0.8796 (sqrt(1 - 4 phi(2) / (2 Phi(2) - 1)))
    assert abs(proj.std() / (0.02 * 0.8796) - 1) < 0.05 and np.abs(proj).max() <= 0.04
    assert np.all(model.patch_embed.backbone.bn1.weight.data == 1)


def test_build_model_dispatches_on_the_config():
    assert type(build_model(TINY)) is HybridViT
    assert type(build_model(TINY.backbone_config.replace(num_classes=3))) is ResNet
    assert type(build_model(TINY.vit_config)) is ViT
    assert type(build_model("resnet20")) is ResNet
    with pytest.raises(TypeError, match="ViT expects a ViTConfig.*a hybrid config.*build_model"):
        ViT(TINY)
    with pytest.raises(TypeError, match="HybridViT expects a HybridConfig.*a vit config"):
        HybridViT(TINY.vit_config)
    with pytest.raises(TypeError, match="expected a model config"):
        build_model({"dim": 3})


def test_hybrid_config_json_round_trip_and_derived_sizes():
    cfg = HYBRID_PRESETS["cifar-hybrid"]
    again = HybridConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))   # lists come back
    assert again == cfg and isinstance(again.backbone_layers, tuple)
    assert cfg.vit_config == ViTConfig(img_size=8, patch_size=1, in_chans=64, num_classes=10, dim=192, depth=5,
                                       heads=6, mlp_dim=384, pool="mean", pos_embed="sincos2d", init="mimetic")
    assert cfg.backbone_config.num_classes == 0 and cfg.backbone_config.img_size == 32


@pytest.mark.parametrize("change, message", [
    ({"backbone_layers": (0, 1)}, r"HybridConfig.backbone_layers must be a non-empty tuple"),
    ({"backbone_stem": "tiny"}, r"HybridConfig.backbone_stem must be one of"),
    ({"bn_momentum": 2.0}, r"HybridConfig.bn_momentum must be a number in \[0, 1\]"),
    ({"patch_size": 4}, r"6x6 feature map of 12x12 images, which patch_size=4 does not tile"),
    ({"dim": 13}, r"dim=13 is not divisible by heads=3"),
    ({"backbone_depth": 3}, r"unknown HybridConfig option\(s\) \['backbone_depth'\]"),
])
def test_hybrid_config_errors_name_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        TINY.replace(**change)


def test_images_are_checked_before_the_backbone_runs():
    model = HybridViT(TINY)
    with pytest.raises(ValueError, match=r"images must have shape \(B, 2, 12, 12\)"):
        model(np.zeros((1, 2, 8, 8), np.float32))
    # 8 -> 4 -> 2 (max-pool) -> 1: one image leaves one value per channel for BatchNorm
    one_pixel = TINY_BOTTLENECK.replace(img_size=8, backbone_layers=(1, 1), backbone_widths=(3, 3), patch_size=1)
    with pytest.raises(ValueError, match="BatchNorm cannot train on it"):
        HybridViT(one_pixel)(np.zeros((1, 1, 8, 8), np.float32))
