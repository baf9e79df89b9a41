"""The ResNets of minivit/resnet.py: exact parameter counts (torchvision's and the paper's),
parity with minivit.bench's PyTorch twin (torch.nn, torchvision's names) on the same weights (logits, every parameter's
gradient, the input's gradient and the BatchNorm running averages, float64) for shortcut
options A, B and C, a float64 gradient check of whole tiny ResNets, the state dict with its
BatchNorm buffers, and clear errors for bad input.

Shape legend: B batch, C channels, S image side, K classes.
"""
import numpy as np
import pytest

from minivit.gradcheck import TOLERANCE, check_model
from minivit.resnet import PRESETS, BatchNorm2d, ResNet, ResNetConfig, get_preset, state_shapes

# Two stages of two tiny blocks on 6 x 6 images, 2 input channels: every kind of layer, small.
TINY = ResNetConfig(block="basic", layers=(2, 1), widths=(3, 4), stem="cifar", shortcut="A", num_classes=3,
                    in_chans=2, img_size=6)
# The ImageNet layout (7x7 stem, max-pool) with bottlenecks: 12 -> 6 -> 3 -> 2.
TINY_BOTTLENECK = ResNetConfig(block="bottleneck", layers=(1, 1), widths=(2, 3), stem="imagenet", shortcut="B",
                               num_classes=4, in_chans=1, img_size=12)


def images(cfg, batch, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, cfg.in_chans, cfg.img_size, cfg.img_size)).astype(dtype)


def randomise_buffers(model, seed=0):
    """Running averages unlike the initial 0 and 1, so that eval mode has something to use."""
    rng = np.random.default_rng(seed)
    for m in model.modules():
        if isinstance(m, BatchNorm2d):
            m.running_mean[...] = rng.standard_normal(m.running_mean.shape) * 0.2
            m.running_var[...] = rng.uniform(0.5, 1.5, m.running_var.shape)
            m.weight.data[...] = rng.uniform(0.5, 1.5, m.weight.shape)
            m.bias.data[...] = rng.standard_normal(m.bias.shape) * 0.2


# ============================================================================= parameter counts

def _uninitialised(monkeypatch):
    # A count depends on the shapes only: skip drawing 25M random weights (seconds on one core)
    monkeypatch.setattr(ResNet, "init_weights", lambda self, rng: None)


@pytest.mark.parametrize("name, count", [
    ("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032),   # torchvision's
])
def test_imagenet_parameter_counts_are_torchvisions(monkeypatch, name, count):
    _uninitialised(monkeypatch)
    model = ResNet(name)
    assert model.config.num_classes == 1000
    assert model.num_parameters() == count


def cifar_resnet_count(n, widths=(16, 32, 64), in_chans=3, classes=10):
    """Counted from §4.2 of the paper: a 3x3 conv to 16 channels, then 3 stages of n blocks of two
    3x3 convs, each conv followed by BN (a scale and a shift per channel), option A shortcuts
    (no parameters), and the fc layer. Convolutions have no bias."""
    total = in_chans * widths[0] * 9 + 2 * widths[0]
    cin = widths[0]
    for w in widths:
        for _ in range(n):
            total += cin * w * 9 + 2 * w + w * w * 9 + 2 * w
            cin = w
    return total + cin * classes + classes


@pytest.mark.parametrize("name, n, paper", [
    ("resnet20", 3, "0.27M"), ("resnet32", 5, "0.46M"), ("resnet44", 7, "0.66M"), ("resnet56", 9, "0.85M"),
    ("resnet110", 18, "1.7M"),
])
def test_cifar_parameter_counts_are_the_papers(name, n, paper):
    """He et al., Table 6: 0.27M, 0.46M, 0.66M, 0.85M and 1.7M parameters."""
    count = ResNet(name).num_parameters()
    assert count == cifar_resnet_count(n)
    digits = len(paper.split(".")[1]) - 1
    assert f"{round(count / 1e6, digits)}M" == paper
    assert 6 * n + 2 == int(name[len("resnet"):])      # the name counts the weighted layers


def test_cifar_resnet18_count(monkeypatch):
    """The CIFAR ResNet-18: torchvision's 11,689,512 minus the 7x7x3 stem (64*3*49) plus a 3x3x3
    one (64*3*9), and a 10-class head instead of 1000 (512*990 + 990 fewer)."""
    _uninitialised(monkeypatch)
    expected = 11_689_512 - 64 * 3 * 49 + 64 * 3 * 9 - 990 * 512 - 990
    assert ResNet("resnet18-cifar").num_parameters() == expected


# ============================================================================= the PyTorch twin

def torch_resnet(torch, cfg):
    """minivit.bench's PyTorch twin of the ResNet (torchvision's layout and names), in float64."""
    from minivit.bench import build_torch_resnet

    torch.manual_seed(0)                        # the same twin every run
    return build_torch_resnet(cfg).double()


def _close(a, b, floor=1e-30):
    """Error relative to the array's scale: BN gradients hold sums that nearly cancel. `floor` is
    the smallest scale used: a gradient that is analytically zero (a BatchNorm shift whose effect
    the next BatchNorm in training mode removes, where no ReLU cuts in between) is rounding noise
    on both sides, and is compared against the model's gradient scale instead of its own."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / max(floor, float(np.max(np.abs(a) + np.abs(b)))))


def _assert_parity(torch, cfg, batch):
    twin = torch_resnet(torch, cfg)
    with torch.no_grad():
        rng = torch.Generator().manual_seed(0)
        for m in twin.modules():
            if isinstance(m, torch.nn.BatchNorm2d):      # nontrivial scale, shift and running averages
                m.weight.uniform_(0.5, 1.5, generator=rng)
                m.bias.normal_(0, 0.2, generator=rng)
                m.running_mean.normal_(0, 0.2, generator=rng)
                m.running_var.uniform_(0.5, 1.5, generator=rng)
                m.num_batches_tracked.fill_(3)
    twin_state = {k: v.detach().numpy().copy() for k, v in twin.state_dict().items()}
    model = ResNet(cfg, seed=1).astype(np.float64)
    assert list(model.state_dict()) == list(twin_state)           # the same names, in the same order
    model.load_state_dict(twin_state)

    x = images(cfg, batch)
    dlogits = np.random.default_rng(1).standard_normal((batch, cfg.num_classes))
    errors = {}
    for mode in ("train", "eval"):
        model.train(mode == "train")
        twin.train(mode == "train")
        model.zero_grad()
        twin.zero_grad()
        logits = model(x)
        dx = model.backward(dlogits)
        xt = torch.tensor(x, requires_grad=True)
        t_logits = twin(xt)
        t_logits.backward(torch.tensor(dlogits))
        errors[f"{mode} logits"] = _close(logits, t_logits.detach().numpy())
        errors[f"{mode} images"] = _close(dx, xt.grad.numpy())
        grads = dict(model.named_parameters())
        t_grads = dict(twin.named_parameters())
        assert set(grads) == set(t_grads)
        scale = 1e-3 * max(float(p.grad.abs().max()) for p in t_grads.values())   # 0.1% of the largest gradient
        for name, p in t_grads.items():
            errors[f"{mode} {name}"] = _close(grads[name].grad, p.grad.numpy(), floor=scale)
        for name, buf in twin.named_buffers():                    # running averages after the step
            errors[f"{mode} {name}"] = _close(model.state_dict()[name], buf.numpy())
    bad = {k: v for k, v in errors.items() if not v < 1e-10}
    assert not bad, f"minivit and the PyTorch twin differ: {bad}"
    assert int(model.bn1.num_batches_tracked) == 4                # 3 copied, 1 training step


@pytest.mark.parametrize("shortcut", ["A", "B", "C"])
def test_cifar_resnet20_matches_pytorch(torch, shortcut):
    """resnet20's layout (16/32/64 channels, 3 x 3 basic blocks) on 16 x 16 images."""
    _assert_parity(torch, get_preset("resnet20", shortcut=shortcut, img_size=16), batch=2)


@pytest.mark.parametrize("shortcut", ["A", "B", "C"])
def test_bottleneck_imagenet_layout_matches_pytorch(torch, shortcut):
    """7x7 stem, max-pool, bottlenecks (expansion 4), three stages, one input channel, 20 x 20."""
    cfg = ResNetConfig(block="bottleneck", layers=(1, 2, 1), widths=(4, 6, 8), stem="imagenet", shortcut=shortcut,
                       num_classes=5, in_chans=1, img_size=20)
    _assert_parity(torch, cfg, batch=3)


# ============================================================================= gradient checks

@pytest.mark.parametrize("cfg", [TINY, TINY.replace(shortcut="B"), TINY_BOTTLENECK, TINY_BOTTLENECK.replace(shortcut="C")],
                         ids=["basic-A", "basic-B", "bottleneck-B", "bottleneck-C"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_whole_resnet_gradient_check(cfg, mode):
    """Every parameter tensor (3 entries each) and the images. In training mode BatchNorm uses the
    batch's statistics, so the loss of each image depends on the whole batch: the check still
    holds, as the loss is one function of all the weights and all the images."""
    model = ResNet(cfg, seed=3).astype(np.float64)
    randomise_buffers(model)
    if cfg.stem == "imagenet":
        # Where every max-pool window of the stem has a positive winner, adding a constant to a
        # channel of bn1's output adds the same constant to everything that 1x1 convolutions
        # make of it, which training-mode BatchNorm then subtracts again: bn1.bias's gradient
        # is exactly 0 and its relative error only measures rounding noise. A negative shift
        # leaves some windows with nothing but ReLU's zeros, and the gradient is real.
        model.bn1.bias.data[...] = -1.0
    model.train(mode == "train")
    labels = np.array([0, 2, 1])
    errors = check_model(model, images(cfg, 3), labels, samples=3, seed=0)
    assert len(errors) == len(model.parameters()) + 1
    bad = {k: v for k, v in errors.items() if not v < TOLERANCE}
    assert not bad, f"gradient check failed: {bad}"


# ============================================================================= state, modes, interface

def test_state_dict_round_trip_keeps_the_batchnorm_buffers(tmp_path):
    model = ResNet(TINY, seed=0)
    for seed in range(2):                                        # two training steps move the averages
        model(images(TINY, 4, seed, np.float32))
    state = model.state_dict()
    assert "layer2.0.bn1.running_var" in state and "bn1.num_batches_tracked" in state
    assert len(state) == len(model.parameters()) + 3 * sum(isinstance(m, BatchNorm2d) for m in model.modules())
    assert int(state["bn1.num_batches_tracked"]) == 2
    assert not np.allclose(state["bn1.running_mean"], 0)
    np.savez(tmp_path / "w.npz", **state)
    loaded = dict(np.load(tmp_path / "w.npz"))
    other = ResNet(TINY, seed=5)
    other.load_state_dict(loaded)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(other.state_dict()[name], value, err_msg=name)
    x = images(TINY, 3, 9, np.float32)
    np.testing.assert_array_equal(model.eval()(x), other.eval()(x))   # eval uses the copied averages


def test_load_state_dict_checks_everything_before_changing_anything():
    model = ResNet(TINY, seed=0)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    state = ResNet(TINY, seed=1).state_dict()
    missing = {k: v for k, v in state.items() if k != "layer1.1.bn2.running_var"}
    with pytest.raises(KeyError, match="layer1.1.bn2.running_var"):
        model.load_state_dict(missing)
    with pytest.raises(ValueError, match="bn1.running_mean.*shape"):
        model.load_state_dict({**state, "bn1.running_mean": np.zeros(7)})
    with pytest.raises(TypeError, match="non-numeric"):
        model.load_state_dict({**state, "bn1.running_var": np.array(["a", "b", "c"])})
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    assert model.load_state_dict(missing, strict=False) == (["layer1.1.bn2.running_var"], [])


def test_eval_mode_leaves_the_running_averages_alone_and_train_mode_updates_them():
    model = ResNet(TINY, seed=0)
    x = images(TINY, 2, 0, np.float32)
    model.eval()
    assert not any(m.training for m in model.modules())
    model(x)
    assert np.all(model.bn1.running_mean == 0) and int(model.bn1.num_batches_tracked) == 0
    model.train()
    assert all(m.training for m in model.modules())
    model(x)
    assert not np.all(model.bn1.running_mean == 0) and int(model.bn1.num_batches_tracked) == 1


def test_astype_casts_parameters_and_running_averages_but_not_the_counter():
    model = ResNet(TINY, seed=0).astype(np.float64)
    assert model.dtype == np.float64
    assert model.layer2[0].bn2.running_var.dtype == np.float64
    assert model.layer2[0].bn2.num_batches_tracked.dtype == np.int64
    model(images(TINY, 2))
    assert model.layer2[0].bn2.running_var.dtype == np.float64


def test_initialisation_is_torchvisions_and_seeded():
    model = ResNet("resnet20", seed=0)
    w = model.layer3[1].conv2.weight.data                          # (64, 64, 3, 3): fan_out 576
    assert abs(w.std() / np.sqrt(2 / 576) - 1) < 0.03 and abs(w.mean()) < 0.002
    assert np.all(model.layer2[0].bn1.weight.data == 1) and np.all(model.layer2[0].bn1.bias.data == 0)
    bound = 1 / np.sqrt(64)
    assert np.abs(model.fc.weight.data).max() <= bound and np.abs(model.fc.bias.data).max() <= bound
    assert model.fc.weight.data.std() > 0.8 * bound / np.sqrt(3)  # uniform in +-bound, not all zeros
    again, other = ResNet("resnet20", seed=0), ResNet("resnet20", seed=1)
    np.testing.assert_array_equal(again.conv1.weight.data, model.conv1.weight.data)
    assert not np.array_equal(other.conv1.weight.data, model.conv1.weight.data)


def test_feature_map_and_headless_model():
    cfg = TINY_BOTTLENECK
    model = ResNet(cfg, seed=0).astype(np.float64)
    x = images(cfg, 2)
    fmap = model.forward_features(x, pool=False)
    assert fmap.shape == (2, cfg.num_features, cfg.feature_size, cfg.feature_size) == (2, 12, 2, 2)
    assert model.backward(np.ones_like(fmap)).shape == x.shape
    headless = ResNet(cfg.replace(num_classes=0), seed=0)
    assert headless.fc is None
    assert headless(x.astype(np.float32)).shape == (2, 12)
    assert get_preset("resnet50").feature_size == 7 and get_preset("resnet20").feature_size == 8


def test_torchvision_names():
    names = list(ResNet(TINY_BOTTLENECK.replace(shortcut="B")).state_dict())
    assert names[:6] == ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                         "bn1.num_batches_tracked"]
    for name in ("layer1.0.conv3.weight", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_var",
                 "layer2.0.downsample.1.bias", "fc.weight", "fc.bias"):
        assert name in names
    assert not any("downsample" in n for n in ResNet(TINY).state_dict())   # option A: no parameters


# ============================================================================= bad input

@pytest.mark.parametrize("x, error, message", [
    (np.zeros((2, 3, 6, 6), np.float32), ValueError, r"\(B, 2, 6, 6\)"),
    (np.zeros((2, 6, 6, 2), np.float32), ValueError, "channels-last"),
    (np.zeros((2, 6, 6), np.float32), ValueError, "single image"),
    (np.zeros((0, 2, 6, 6), np.float32), ValueError, "empty"),
    (np.zeros((2, 2, 6, 6), np.uint8), TypeError, "floating point"),
    (np.zeros((2, 2, 6, 6), np.float64), TypeError, "float32"),
    (np.full((2, 2, 6, 6), np.nan, np.float32), ValueError, "NaN"),
    ([[0.0]], TypeError, "NumPy or CuPy array"),
    (np.zeros((1, 2, 6, 6), np.float32), ValueError, "BatchNorm cannot train"),
])
def test_bad_images_are_clear_errors(x, error, message):
    model = ResNet(TINY.replace(img_size=6, layers=(1, 1, 1), widths=(2, 3, 4)))   # 6 -> 3 -> 2: 4 values
    if "BatchNorm" in message:
        model = ResNet(TINY.replace(layers=(1, 1, 1, 1), widths=(2, 3, 4, 5)))      # 6 -> 3 -> 2 -> 1
    with pytest.raises(error, match=message):
        model(x)


def test_backward_errors():
    model = ResNet(TINY)
    with pytest.raises(RuntimeError, match="without a matching forward"):
        model.backward(np.zeros((2, 3), np.float32))
    model(images(TINY, 2, 0, np.float32))
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        model.backward(np.zeros((2, 4), np.float32))


@pytest.mark.parametrize("overrides, message", [
    (dict(block="wide"), "block must be one of"),
    (dict(shortcut="D"), "shortcut must be one of"),
    (dict(stem="tiny"), "stem must be one of"),
    (dict(layers=(2, 2), widths=(4,)), "one entry per stage"),
    (dict(layers=(2, 0)), "positive integers"),
    (dict(layers=3), "tuple of positive integers"),
    (dict(num_classes=-1), "num_classes"),
    (dict(img_size=0), "img_size"),
    (dict(bn_momentum=2.0), "bn_momentum"),
    (dict(depth=3), "unknown ResNetConfig option"),
])
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        TINY.replace(**overrides)


def test_config_round_trip_and_presets():
    assert ResNetConfig.from_dict(TINY.to_dict()) == TINY
    import json
    assert ResNetConfig.from_dict(json.loads(json.dumps(TINY.to_dict()))) == TINY   # JSON lists back to tuples
    assert set(PRESETS) >= {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet18", "resnet34",
                            "resnet50", "resnet18-cifar"}
    assert get_preset("resnet20").shortcut == "A" and get_preset("resnet18-cifar").stem == "cifar"
    with pytest.raises(ValueError, match="unknown ResNet preset 'resnet21'"):
        get_preset("resnet21")
    with pytest.raises(TypeError, match="ResNetConfig or a preset name"):
        ResNet(42)


@pytest.mark.parametrize("cfg", [TINY, TINY.replace(shortcut="C"), TINY_BOTTLENECK, TINY_BOTTLENECK.replace(shortcut="A"),
                                 TINY_BOTTLENECK.replace(num_classes=0)], ids=["A", "C", "bottleneck-B", "bottleneck-A",
                                                                               "no-fc"])
def test_state_shapes_from_the_config_are_the_models(cfg):
    """What a checkpoint's entries are checked against before any model is built."""
    model = ResNet(cfg)
    assert state_shapes(cfg) == {name: tuple(a.shape) for name, a in model.state_dict().items()}
    assert list(state_shapes(cfg)) == list(model.state_dict())
    assert state_shapes(cfg, buffers=False) == {name: p.shape for name, p in model.named_parameters()}


# ============================================================================= plain networks (shortcut "none")

PLAIN = TINY.replace(shortcut="none")


@pytest.mark.parametrize("cfg", [PLAIN, TINY_BOTTLENECK.replace(shortcut="none")], ids=["basic", "bottleneck"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_whole_plain_network_gradient_check(cfg, mode):
    """A plain network (He et al. §4.1: the same layers, no shortcuts) in float64, every parameter
    and the images: the backward must not send anything through a shortcut that is not there."""
    model = ResNet(cfg, seed=3).astype(np.float64)
    randomise_buffers(model)
    if cfg.stem == "imagenet":
        model.bn1.bias.data[...] = -1.0          # as in test_whole_resnet_gradient_check
    model.train(mode == "train")
    errors = check_model(model, images(cfg, 3), np.array([0, 2, 1]), samples=3, seed=0)
    assert len(errors) == len(model.parameters()) + 1
    bad = {k: v for k, v in errors.items() if not v < TOLERANCE}
    assert not bad, f"gradient check failed: {bad}"


@pytest.mark.parametrize("cfg", [
    get_preset("resnet20", shortcut="none", img_size=16),
    ResNetConfig(block="bottleneck", layers=(1, 2), widths=(4, 6), stem="imagenet", shortcut="none", num_classes=5,
                 in_chans=1, img_size=16),
], ids=["resnet20", "bottleneck"])
def test_plain_network_matches_pytorch(torch, cfg):
    """The PyTorch twin's plain blocks compute relu(main(x)), written independently of minivit's."""
    twin = torch_resnet(torch, cfg)
    blocks = [m for m in twin.modules() if hasattr(m, "downsample")]
    assert len(blocks) == sum(cfg.layers) and all(b.downsample is None for b in blocks)   # truly plain
    _assert_parity(torch, cfg, batch=2)


def test_plain_block_is_relu_of_its_main_path():
    """By hand with cnn_ops, in eval mode on a stride-2 block (where option A would subsample and
    pad): the plain block's output is relu(bn2(conv2(relu(bn1(conv1(x)))))) and nothing else,
    while option A's block with the same weights adds its shortcut."""
    from minivit import cnn_ops
    model = ResNet(PLAIN, seed=4).astype(np.float64)
    randomise_buffers(model)
    model.eval()
    block = model.layer2[0]
    assert block.conv1.stride == 2 and block.downsample is None
    x = np.random.default_rng(2).standard_normal((2, 3, 6, 6))              # (B, 3, 6, 6)

    def bn(m, a):
        return cnn_ops.batchnorm2d_forward(a, m.weight.data, m.bias.data, m.running_mean.copy(),
                                           m.running_var.copy(), False)[0]

    h = np.maximum(bn(block.bn1, cnn_ops.conv2d_forward(x, block.conv1.weight.data, None, 2, 1)[0]), 0)
    main = bn(block.bn2, cnn_ops.conv2d_forward(h, block.conv2.weight.data, None, 1, 1)[0])   # (B, 4, 3, 3)
    np.testing.assert_allclose(block(x), np.maximum(main, 0), rtol=1e-12, atol=1e-12)
    residual = ResNet(TINY, seed=0).astype(np.float64)                     # option A, the same weights
    residual.load_state_dict(model.state_dict())
    identity = np.zeros_like(main)
    identity[:, 0:3] = x[:, :, ::2, ::2]                                   # 3 -> 4 channels: front pad 0
    np.testing.assert_allclose(residual.eval().layer2[0](x), np.maximum(main + identity, 0), rtol=1e-12, atol=1e-12)
    assert not np.allclose(block(x), residual.layer2[0](x))


def test_plain_state_shapes_and_parameters_are_option_as():
    """No shortcut has no parameters: the plain network's state is option A's, entry for entry."""
    for cfg in (PLAIN, TINY_BOTTLENECK.replace(shortcut="none"), get_preset("resnet56", shortcut="none")):
        model = ResNet(cfg)
        assert state_shapes(cfg) == {name: tuple(a.shape) for name, a in model.state_dict().items()}
        assert state_shapes(cfg) == state_shapes(cfg.replace(shortcut="A"))
        assert not any("downsample" in name for name in state_shapes(cfg))
    assert ResNet(get_preset("resnet20", shortcut="none")).num_parameters() == cifar_resnet_count(3)


def test_shortcut_validation_lists_none():
    with pytest.raises(ValueError, match=r"shortcut must be one of \('A', 'B', 'C', 'none'\), got 'plain'"):
        TINY.replace(shortcut="plain")
