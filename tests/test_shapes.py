"""The shape walk-through: `minivit shapes` and minivit.shapes.walk."""
import numpy as np
import pytest

from minivit import ViT, ViTConfig, get_model_preset, get_preset
from minivit.cli import main
from minivit.config import ABSOLUTE_POS_EMBEDS, POS_EMBEDS
from minivit.shapes import count_flops, count_parameters, parse_overrides, walk


def test_vit_b16_walk_has_the_papers_shapes():
    rows = {s.name: s for s in walk(get_preset("vit-b16"))}
    assert rows["image"].shape == "3 x 224 x 224"
    assert rows["patchify"].shape == "196 x 768"
    assert rows["pos_embed"].shape == "197 x 768"
    assert rows["blocks.0.attn.qkv"].shape == "197 x 2304"
    assert rows["  split heads"].shape == "3 x 12 x 197 x 64"
    assert rows["  q @ k^T / sqrt(hs)"].shape == "12 x 197 x 197"
    assert rows["blocks.0.mlp.fc1"].shape == "197 x 3072"
    assert rows["head"].shape == "1000"


def test_flops_match_a_hand_count():
    """ViT-B/16 forward: 2 x (patch embed + 12 x (qkv + 2 attention matmuls + proj + fc1 + fc2) + head)."""
    N, D, F, H, hs = 197, 768, 3072, 12, 64
    block = 2 * (N * D * 3 * D + 2 * H * N * N * hs + N * D * D + 2 * N * D * F)
    expected = 2 * 196 * 768 * 768 + 12 * block + 2 * 768 * 1000
    assert count_flops(get_preset("vit-b16")) == expected


def test_walk_shapes_match_the_real_model(rng):
    """The printed shapes are the shapes the model really produces."""
    cfg = ViTConfig(img_size=16, patch_size=4, num_classes=5, dim=12, depth=2, heads=3, mlp_dim=20)
    model = ViT(cfg)
    x = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
    tokens = model.patch_embed(x)
    rows = {s.name: s.shape for s in walk(cfg)}
    assert rows["patch_embed.proj"] == " x ".join(map(str, tokens.shape[1:]))
    assert rows["blocks.0.mlp.fc1"] == f"{cfg.num_tokens} x 20"
    assert rows["head"] == str(model(x).shape[1])


def test_cli_prints_the_table(capsys):
    assert main(["shapes", "--preset", "vit-b16"]) == 0
    out = capsys.readouterr().out
    for text in ("196 x 768", "197 x 768", "197 x 2304", "12 x 197 x 197", "197 x 3072", "86,567,656"):
        assert text in out


def test_cli_overrides(capsys):
    assert main(["shapes", "--preset", "cifar-lesson", "--set", "depth=2", "--set", "pool=mean",
                 "--set", "qkv_bias=false"]) == 0
    out = capsys.readouterr().out
    assert "blocks.1-1" in out and "mean of patch tokens" in out


@pytest.mark.parametrize("args, message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--set", "depth"], "must look like name=value"),
    (["--set", "width=3"], "unknown config option 'width'"),
    (["--set", "depth=many"], "'many' is not a valid value for depth"),
    (["--set", "heads=5"], "not divisible by heads=5"),
    (["--set", "mlp_ratio=inf"], "ViTConfig.mlp_ratio must be a finite number, got inf"),
    (["--set", "mlp_ratio=nan"], "ViTConfig.mlp_ratio must be a finite number, got nan"),
    (["--set", "mlp_ratio=1e308"], "ViTConfig.mlp_ratio=1e+308 gives an MLP wider than"),
    (["--set", "ln_eps=inf"], "ViTConfig.ln_eps must be a finite number, got inf"),
    (["--set", "dim=" + "9" * 400], "ViTConfig.dim=999"),
])
def test_cli_bad_input_is_one_clear_line(capsys, args, message):
    assert main(["shapes", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.startswith("minivit shapes: error: ") and err.count("\n") == 1


@pytest.mark.parametrize("error, message", [
    (MemoryError("Unable to allocate 10.9 TiB for an array with shape (3000000, 1000000) and data type float32"),
     "minivit shapes: error: out of memory (Unable to allocate 10.9 TiB for an array with shape"),
    (MemoryError(), "minivit shapes: error: out of memory; the model, batch or input is too large"),
    (OverflowError("cannot convert float infinity to integer"),
     "minivit shapes: error: cannot convert float infinity to integer"),
])
def test_cli_turns_memory_and_overflow_errors_into_one_line(capsys, monkeypatch, error, message):
    """`--set dim=1000000 --set heads=1` runs out of memory building the model; any command
    that does must say so in one line and exit 2. (Raised by hand: nothing is allocated.)"""
    import minivit.shapes

    def run_out_of_memory(args):
        raise error

    monkeypatch.setattr(minivit.shapes, "_run", run_out_of_memory)
    assert main(["shapes", "--preset", "cifar-lesson"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err


def test_parse_overrides_types():
    assert parse_overrides(["depth=6", "mlp_dim=none", "dropout=0.1", "qkv_bias=False", "gelu=tanh"]) == {
        "depth": 6, "mlp_dim": None, "dropout": 0.1, "qkv_bias": False, "gelu": "tanh"}


@pytest.mark.parametrize("pos_embed, every_block", [(kind, False) for kind in POS_EMBEDS]
                         + [(kind, True) for kind in ABSOLUTE_POS_EMBEDS])
def test_parameter_count_of_every_position_embedding_matches_the_model(pos_embed, every_block):
    config = get_preset("cifar-lesson", pos_embed=pos_embed, pos_every_block=every_block, depth=2)
    assert count_parameters(config) == ViT(config).num_parameters()


def test_resnet_walk_counts_parameters_and_flops(monkeypatch):
    """ResNet-20 (He et al. §4.2) by hand: a 3x3 conv to 16 channels on 32 x 32, then per stage 2n = 6
    3x3 convolutions at 16, 32, 64 channels on 32, 16, 8 pixels (the first of stages 2 and 3 reads
    half the channels), fc 64 -> 10. A multiply-add is 2 FLOPs."""
    from minivit.resnet import ResNet
    from minivit.shapes import walk_resnet
    macs = 32 * 32 * 16 * 3 * 9 + 6 * 32 * 32 * 16 * 16 * 9
    for width, side in ((32, 16), (64, 8)):
        macs += side * side * width * (width // 2) * 9 + 5 * side * side * width * width * 9
    macs += 64 * 10
    assert count_flops(get_model_preset("resnet20")) == 2 * macs            # 40.6M multiply-adds
    monkeypatch.setattr(ResNet, "init_weights", lambda self, rng: None)     # counts need shapes only
    for name in ("resnet20", "resnet110", "resnet18-cifar", "resnet50"):
        config = get_model_preset(name)
        assert count_parameters(config) == ResNet(config).num_parameters(), name
    steps = [s.name for s in walk_resnet(get_model_preset("resnet50"))]
    assert steps[:4] == ["image", "conv1", "bn1", "maxpool"] and "layer1.0.downsample.0" in steps


def test_resnet_walk_says_which_blocks_add_a_shortcut():
    """A plain network (shortcut 'none') adds nothing, option A pads where the shape changes, and only
    the last BatchNorm of a block is not followed by its own ReLU (that ReLU comes after the addition)."""
    from minivit.shapes import walk_resnet
    plain = walk_resnet(get_model_preset("resnet20", shortcut="none"))
    residual = walk_resnet(get_model_preset("resnet20"))
    names = lambda steps: [s.name for s in steps]
    assert "+ residual, ReLU" not in names(plain) and "+ shortcut" not in names(plain)
    assert names(plain).count("ReLU") == 3 and names(residual).count("+ residual, ReLU") == 3   # one walked block a stage
    assert names(residual).count("+ shortcut") == 2                 # stages 2 and 3 halve the side: option A
    notes = {s.name: s.note for s in residual}
    assert notes["layer1.0.bn1"] == "BatchNorm (+ ReLU)" and notes["layer1.0.bn2"] == "BatchNorm"
    assert sum(s.params for s in plain) == sum(s.params for s in residual)
