"""`minivit bench` on tiny models of every kind (ViT, ResNet, hybrid): the PyTorch twin computes
minivit's function (logits, a training step's loss and gradients, BatchNorm's running averages),
check_same_function catches a twin that does not, and the command runs end to end (timing,
memory in subprocesses, profile, JSON) and rejects bad arguments clearly."""
import json

import numpy as np
import pytest

from minivit import ViT, get_preset, modules
from minivit.cli import main
from minivit.config import HybridConfig
from minivit.model import build_model
from minivit.resnet import ResNetConfig

TINY = ["--preset", "cifar-lesson", "--set", "img_size=8", "--set", "dim=16", "--set", "depth=1",
        "--set", "heads=2", "--set", "mlp_dim=24"]


@pytest.mark.parametrize("overrides", [
    {},
    dict(qkv_bias=False, gelu="tanh", pool="mean", pos_embed="sincos2d", ln_eps=1e-5),
    dict(pos_embed="none", dropout=0.1, drop_path=0.2),
])
def test_torch_twin_matches_minivit(torch, overrides):
    from minivit import bench

    config = get_preset("cifar-lesson", img_size=16, dim=24, depth=2, heads=3, mlp_dim=40, **overrides)
    model = ViT(config, seed=0)
    images, labels = bench.make_batch(config, 3)
    tmodel = bench.torch_twin(model)
    assert bench.check_same_function(model, tmodel, images) < 1e-5
    # and one training step gives the same loss and gradients (dropout off: eval-mode masks)
    model.eval()
    tmodel.eval()
    from minivit.ops import cross_entropy_backward, cross_entropy_forward

    logits = model(images)
    loss, cache = cross_entropy_forward(logits, labels)
    model.backward(cross_entropy_backward(cache))
    tloss = torch.nn.functional.cross_entropy(tmodel(torch.from_numpy(images)), torch.from_numpy(labels))
    tloss.backward()
    assert abs(float(loss) - tloss.item()) < 1e-5
    tgrads = dict(tmodel.named_parameters())
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, tgrads[name].grad.numpy(), rtol=1e-3, atol=1e-5, err_msg=name)


def test_bench_command_runs(torch, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", *TINY, "--batch-size", "2", "--steps", "2", "--warmup", "1", "--threads", "1",
                 "--profile", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for expected in ("train step", "inference", "peak memory", "RSS growth", "traced peak", "attn.qkv", "optimizer"):
        assert expected in text
    result = json.loads(out.read_text())
    assert result["ops"] == "fast" and result["threads"] == 1
    for key in ("train", "infer"):
        assert result[key]["minivit_img_s"] > 0 and result[key]["torch_img_s"] > 0 and result[key]["ratio"] > 0
    for framework in ("minivit", "torch"):
        assert result["memory"][framework]["rss_growth"] > 0
    assert modules.get_ops_kind() == "fast"          # the command leaves the switch as it found it


def test_bench_reference_ops_without_memory(torch, capsys):
    assert main(["bench", *TINY, "--batch-size", "2", "--steps", "1", "--warmup", "0", "--ops", "reference",
                 "--no-memory", "--no-infer"]) == 0
    text = capsys.readouterr().out
    assert "ops=reference" in text and "peak memory" not in text and "inference" not in text
    assert modules.get_ops_kind() == "fast"


def test_bench_rejects_bad_arguments(torch, capsys):
    assert main(["bench", *TINY, "--batch-size", "0"]) == 2
    assert "--batch-size" in capsys.readouterr().err
    assert main(["bench", *TINY, "--set", "num_classes=0", "--no-memory"]) == 2
    assert "num_classes" in capsys.readouterr().err


# ============================================================================= ResNets and the hybrid

# Tiny CNNs covering every block, stem and shortcut the twin builds (8 x 8 images, 2 stages).
TINY_RESNETS = {
    "basic-A": ResNetConfig(block="basic", layers=(1, 2), widths=(3, 4), stem="cifar", shortcut="A", num_classes=3,
                            img_size=8),
    "basic-none": ResNetConfig(block="basic", layers=(1, 1), widths=(3, 4), stem="cifar", shortcut="none",
                               num_classes=3, img_size=8),
    "bottleneck-B": ResNetConfig(block="bottleneck", layers=(1, 1), widths=(2, 3), stem="imagenet", shortcut="B",
                                 num_classes=4, in_chans=1, img_size=12, bn_eps=1e-3, bn_momentum=0.3),
    "basic-C": ResNetConfig(block="basic", layers=(1, 1), widths=(3, 4), stem="cifar", shortcut="C", num_classes=3,
                            img_size=8),
}
# cifar-hybrid's choices (option A backbone, 1x1 patches, sin-cos positions, mean pool, mimetic
# init) on 8 x 8 images: the backbone makes a 2 x 2 map of 6 channels, 4 tokens of D = 12.
TINY_HYBRID = HybridConfig(img_size=8, patch_size=1, num_classes=3, dim=12, depth=1, heads=2, mlp_dim=16,
                           pool="mean", pos_embed="sincos2d", init="mimetic", backbone_block="basic",
                           backbone_layers=(1, 1, 1), backbone_widths=(3, 4, 6), backbone_stem="cifar",
                           backbone_shortcut="A")
CNN_CONFIGS = {**TINY_RESNETS, "hybrid-sincos-mean": TINY_HYBRID}


def _randomise_batchnorm(model, seed=0):
    """BatchNorm scale, shift and running averages unlike 1 and 0, so that every mode uses them."""
    rng = np.random.default_rng(seed)
    for name, value in model.state_dict().items():
        if name.endswith(("running_mean", "bias")) and ("bn" in name or "downsample.1" in name):
            value[...] = rng.normal(0, 0.2, value.shape)
        elif name.endswith(("running_var", "weight")) and ("bn" in name or "downsample.1" in name):
            value[...] = rng.uniform(0.5, 1.5, value.shape)


@pytest.mark.parametrize("name", list(CNN_CONFIGS))
def test_cnn_twins_match_minivit(torch, name):
    """bench.torch_twin of a ResNet or hybrid: the same logits in both BatchNorm modes, then one
    training step (BatchNorm on batch statistics) with the same loss, every parameter's gradient
    and the same running averages after it, in float32."""
    from minivit import bench
    from minivit.ops import cross_entropy_backward, cross_entropy_forward

    config = CNN_CONFIGS[name]
    model = build_model(config, seed=0)
    _randomise_batchnorm(model)
    images, labels = bench.make_batch(config, 4)
    tmodel = bench.torch_twin(model)
    assert bench.check_same_function(model, tmodel, images) < 1e-5
    assert list(model.state_dict()) == list(tmodel.state_dict())      # the same names, in the same order

    model.train()
    tmodel.train()
    loss, cache = cross_entropy_forward(model(images), labels)
    model.backward(cross_entropy_backward(cache))
    tloss = torch.nn.functional.cross_entropy(tmodel(torch.from_numpy(images)), torch.from_numpy(labels))
    tloss.backward()
    assert abs(float(loss) - tloss.item()) < 1e-5
    tparams = dict(tmodel.named_parameters())
    assert set(tparams) == {n for n, _ in model.named_parameters()}
    for pname, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, tparams[pname].grad.numpy(), rtol=1e-3, atol=1e-5, err_msg=pname)
    ours = model.state_dict()
    for bname, buf in tmodel.named_buffers():
        if bname in ours:                                                # BatchNorm's (not the sin-cos table)
            np.testing.assert_allclose(ours[bname], buf.numpy(), rtol=1e-5, atol=1e-6, err_msg=bname)


def test_check_same_function_compares_the_batchnorm_buffers(torch):
    """A twin whose logits agree in both modes but whose BatchNorm updates its running averages
    differently (another momentum), or counts batches differently, is caught, by name."""
    from minivit import bench

    config = TINY_RESNETS["basic-A"]
    model = build_model(config, seed=0)
    images, _ = bench.make_batch(config, 4)
    tmodel = bench.torch_twin(model)
    tmodel.layer2[0].bn2.momentum = 0.2
    with pytest.raises(RuntimeError, match=r"layer2\.0\.bn2\.running_mean"):
        bench.check_same_function(model, tmodel, images)
    tmodel = bench.torch_twin(model)
    tmodel.bn1.num_batches_tracked.fill_(7)
    with pytest.raises(RuntimeError, match="bn1.num_batches_tracked"):
        bench.check_same_function(model, tmodel, images)
    tmodel = bench.torch_twin(model)
    with torch.no_grad():
        tmodel.layer1[0].conv1.weight[0, 0, 1, 1] += 0.5               # another function altogether
    with pytest.raises(RuntimeError, match="logits"):
        bench.check_same_function(model, tmodel, images)


RESNET_ARGS = ["--preset", "resnet20", "--set", "img_size=8", "--set", "layers=1,1,1", "--set", "widths=3,4,6"]
HYBRID_ARGS = ["--preset", "cifar-hybrid", "--set", "img_size=8", "--set", "dim=12", "--set", "depth=1",
               "--set", "heads=2", "--set", "mlp_dim=16", "--set", "backbone_widths=3,4,6"]


@pytest.mark.parametrize("args, kind", [(RESNET_ARGS, "resnet"), (HYBRID_ARGS, "hybrid")], ids=["resnet", "hybrid"])
def test_bench_command_runs_for_cnns(torch, tmp_path, capsys, args, kind):
    out = tmp_path / "bench.json"
    assert main(["bench", *args, "--batch-size", "4", "--steps", "2", "--warmup", "1", "--threads", "1",
                 "--no-memory", "--profile", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for expected in (f"({kind})", "train step", "inference", "optimizer: AdamW", "not minivit train's recipe",
                     "BatchNorm: training mode", "same function as the PyTorch twin", "conv2d: im2col / col2im",
                     "batchnorm", "shortcut A"):
        assert expected in text, expected
    result = json.loads(out.read_text())
    assert result["model"] == kind and result["logits_max_diff"] < 1e-4
    for key in ("train", "infer"):
        r = result[key]
        assert r["minivit_img_s"] > 0 and r["torch_img_s"] > 0
        assert r["ratio"] == pytest.approx(r["minivit_img_s"] / r["torch_img_s"])
        assert r["ratio_min"] <= r["ratio_max"]
    assert modules.get_ops_kind() == "fast"


@pytest.mark.parametrize("kind", ["resnet", "hybrid"])
def test_memory_worker_builds_every_kind(torch, kind):
    """The memory subprocess gets the kind with the config (run here in-process: no second torch import)."""
    from minivit import bench

    config = TINY_RESNETS["basic-A"] if kind == "resnet" else TINY_HYBRID
    for framework in ("minivit", "torch"):
        mem = bench.memory_worker(framework, config.to_dict(), 2, 1, "fast", kind)
        assert mem["rss_growth"] >= 0 and set(mem) == {"rss_growth", "traced_peak"}
    assert mem["traced_peak"] is None or mem["traced_peak"] > 0


def test_bench_rejects_bad_model_names_and_fields(torch, capsys):
    assert main(["bench", "--preset", "resnet21", "--no-memory"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'resnet21'" in err and "resnet: resnet20" in err and "hybrid: " in err
    assert main(["bench", *RESNET_ARGS, "--set", "depth=2", "--no-memory"]) == 2
    err = capsys.readouterr().err
    assert "'depth'" in err and "resnet model" in err
    assert main(["bench", *RESNET_ARGS, "--set", "shortcut=D", "--no-memory"]) == 2
    assert "shortcut" in capsys.readouterr().err
