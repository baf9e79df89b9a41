"""ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016), forward and
backward by hand, with torchvision's parameter names so weights load by name.

    images (B, C, S, S)
      -> stem          conv1, bn1, relu (+ maxpool)  "imagenet": 7x7 stride 2, then a 3x3 max-pool
                                                     stride 2 (S/4); "cifar": 3x3 stride 1 (S)
      -> layer1..      residual blocks; the first block of every stage after the first halves
                       the side (stride 2), every stage has its own width
      -> pool          global average                (B, F)   F = widths[-1] * expansion
      -> fc            (B, K)                        logits

A block is out = relu(main(x) + shortcut(x)):
    BasicBlock (expansion 1)  main = bn2(conv2(relu(bn1(conv1(x)))))  with two 3x3 convolutions
    Bottleneck (expansion 4)  1x1 (reduce) -> 3x3 (stride here, as torchvision's "v1.5")
                              -> 1x1 (expand to 4x the width), each followed by BN (+ ReLU)
The shortcut (§3.3 of the paper): option "A" is the identity, and where the shape changes it
keeps every stride-th pixel and pads the new channels with zeros (no parameters); "B" is the
identity except where the shape changes, where it is a 1x1 convolution + BN (the projection,
torchvision's `downsample`); "C" uses the projection in every block. "none" has no shortcut at
all: out = relu(main(x)), the paper's "plain" network (§4.1), the same layers without the
additions and no extra parameters, the baseline that shows the degradation problem.

Shape legend: B batch, C channels, S image side, H, W a feature map's height and width,
F pooled features, K classes.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import numpy as np

from . import cnn_fastops, cnn_ops
from .backend import get_array_module, is_array, to_device, device_of
from .modules import Linear, Module, Parameter, get_ops_kind

BLOCKS = ("basic", "bottleneck")
STEMS = ("cifar", "imagenet")
SHORTCUTS = ("A", "B", "C", "none")
EXPANSION = {"basic": 1, "bottleneck": 4}
MAX_SIZE = 2**31 - 1


@dataclass(frozen=True)
class ResNetConfig:
    kind = "resnet"                            # the model kind (a class attribute, not a field)

    block: str = "basic"                       # "basic" (two 3x3) | "bottleneck" (1x1, 3x3, 1x1, expansion 4)
    layers: tuple = (2, 2, 2, 2)               # blocks per stage
    widths: tuple = (64, 128, 256, 512)        # each stage's width (a bottleneck outputs 4x this);
                                               # the stem has widths[0] channels
    stem: str = "imagenet"                     # "imagenet": 7x7/2 conv + 3x3/2 max-pool; "cifar": 3x3/1 conv
    shortcut: str = "B"                        # "A" zero-pad | "B" projection where the shape changes |
                                               # "C" projection everywhere | "none" a plain network
    num_classes: int = 1000                    # K; 0 means no fc (the model returns pooled features)
    in_chans: int = 3                          # C
    img_size: int = 224                        # S: images are S x S
    bn_eps: float = 1e-5                       # torch's BatchNorm2d defaults
    bn_momentum: float = 0.1

    def __post_init__(self):
        # from_dict gets lists back from JSON; a frozen, hashable config keeps tuples
        for name in ("layers", "widths"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
            else:
                raise ValueError(f"ResNetConfig.{name} must be a tuple of positive integers, got {value!r}")
            if not value or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 < v <= MAX_SIZE
                                for v in value):
                raise ValueError(f"ResNetConfig.{name} must be a non-empty tuple of positive integers, got {value!r}")
            object.__setattr__(self, name, tuple(int(v) for v in value))
        if len(self.layers) != len(self.widths):
            raise ValueError(f"ResNetConfig: layers {self.layers} and widths {self.widths} must have one entry "
                             f"per stage, got {len(self.layers)} and {len(self.widths)}")
        for name, choices in (("block", BLOCKS), ("stem", STEMS), ("shortcut", SHORTCUTS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"ResNetConfig.{name} must be one of {choices}, got {getattr(self, name)!r}")
        for name in ("in_chans", "img_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 < value <= MAX_SIZE:
                raise ValueError(f"ResNetConfig.{name} must be a positive integer, got {value!r}")
        n = self.num_classes
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 0 <= n <= MAX_SIZE:
            raise ValueError(f"ResNetConfig.num_classes must be an integer >= 0, got {n!r}")
        for name, ok in (("bn_eps", lambda v: v > 0), ("bn_momentum", lambda v: 0 <= v <= 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not ok(value):
                raise ValueError(f"ResNetConfig.{name} must be a number {'> 0' if name == 'bn_eps' else 'in [0, 1]'}, "
                                 f"got {value!r}")
            object.__setattr__(self, name, float(value))   # a np.float64 would turn float32 maps to float64

    @property
    def expansion(self) -> int:
        return EXPANSION[self.block]

    @property
    def num_features(self) -> int:
        """F: the channels of the last stage, which the pooled features and fc see."""
        return self.widths[-1] * self.expansion

    @property
    def feature_size(self) -> int:
        """The side of the last stage's feature map: the stem and every later stage's first
        block each take ceil(side / 2) (3x3 windows, padding 1, stride 2)."""
        side = self.img_size
        halvings = (2 if self.stem == "imagenet" else 0) + len(self.layers) - 1
        for _ in range(halvings):
            side = (side + 1) // 2
        return side

    def replace(self, **overrides) -> "ResNetConfig":
        """A copy with some fields changed (validated again); unknown names are an error."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown ResNetConfig option(s) {unknown}; known options: {sorted(known)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ResNetConfig":
        if not isinstance(d, dict):
            raise TypeError(f"ResNetConfig.from_dict expects a dict, got {type(d).__name__}")
        return cls().replace(**d)


def _cifar_resnet(n):
    """He et al. §4.2: 6n + 2 layers, three stages of n basic blocks at 16, 32, 64 channels on
    32 x 32 images, option A shortcuts (the paper's CIFAR choice), 10 classes."""
    return ResNetConfig(block="basic", layers=(n, n, n), widths=(16, 32, 64), stem="cifar", shortcut="A",
                        num_classes=10, img_size=32)


PRESETS: dict[str, ResNetConfig] = {
    "resnet20": _cifar_resnet(3),     # 0.27M parameters (the paper's Table 6)
    "resnet32": _cifar_resnet(5),     # 0.46M
    "resnet44": _cifar_resnet(7),     # 0.66M
    "resnet56": _cifar_resnet(9),     # 0.85M
    "resnet110": _cifar_resnet(18),   # 1.7M
    # torchvision's ImageNet models (projection shortcuts only where the shape changes: option B)
    "resnet18": ResNetConfig(block="basic", layers=(2, 2, 2, 2)),
    "resnet34": ResNetConfig(block="basic", layers=(3, 4, 6, 3)),
    "resnet50": ResNetConfig(block="bottleneck", layers=(3, 4, 6, 3)),
    # ResNet-18 as commonly trained on CIFAR-10: a 3x3 stride-1 stem and no max-pool, so the
    # 32 x 32 image is not cut to 8 x 8 before the first block
    "resnet18-cifar": ResNetConfig(block="basic", layers=(2, 2, 2, 2), stem="cifar", num_classes=10, img_size=32),
}


def get_preset(name: str, **overrides) -> ResNetConfig:
    """The named ResNet preset, with any field overridden: get_preset("resnet18", num_classes=10)."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"unknown ResNet preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


def state_shapes(config: ResNetConfig, buffers: bool = True) -> dict:
    """{name: shape} of every entry of ResNet(config).state_dict() (buffers=False: parameters
    only), in its order, from the config alone: a checkpoint's entries are checked against it
    before any model is built. A test checks it against a built ResNet."""
    c = config
    shapes = {}

    def conv(prefix, cin, cout, k):
        shapes[prefix + "weight"] = (cout, cin, k, k)

    def bn(prefix, channels):
        shapes.update({prefix + "weight": (channels,), prefix + "bias": (channels,)})
        if buffers:
            shapes.update({prefix + "running_mean": (channels,), prefix + "running_var": (channels,),
                           prefix + "num_batches_tracked": ()})

    conv("conv1.", c.in_chans, c.widths[0], 7 if c.stem == "imagenet" else 3)
    bn("bn1.", c.widths[0])
    cin = c.widths[0]
    for i, (depth, width) in enumerate(zip(c.layers, c.widths)):
        for j in range(depth):
            stride = 2 if (i > 0 and j == 0) else 1
            cout = width * c.expansion
            prefix = f"layer{i + 1}.{j}."
            if c.block == "basic":
                conv(prefix + "conv1.", cin, width, 3), bn(prefix + "bn1.", width)
                conv(prefix + "conv2.", width, width, 3), bn(prefix + "bn2.", width)
            else:
                conv(prefix + "conv1.", cin, width, 1), bn(prefix + "bn1.", width)
                conv(prefix + "conv2.", width, width, 3), bn(prefix + "bn2.", width)
                conv(prefix + "conv3.", width, cout, 1), bn(prefix + "bn3.", cout)
            if c.shortcut == "C" or (c.shortcut == "B" and (stride != 1 or cin != cout)):
                conv(prefix + "downsample.0.", cin, cout, 1), bn(prefix + "downsample.1.", cout)
            cin = cout
    if c.num_classes > 0:
        shapes.update({"fc.weight": (c.num_classes, cin), "fc.bias": (c.num_classes,)})
    return shapes


# ============================================================================= layers

def _conv_ops():
    """The convolution and BatchNorm ops in use: cnn_fastops (the default) or, after
    minivit.modules.set_ops("reference"), the clear cnn_ops: the ViT's switch, for the CNN too."""
    return cnn_fastops if get_ops_kind() == "fast" else cnn_ops


class Conv2d(Module):
    """A 2-D convolution; weight (Cout, Cin, k, k) as torch. ResNets use no bias (BN follows)."""

    def __init__(self, in_chans, out_chans, kernel_size, stride=1, padding=0, bias=False):
        self.weight = Parameter(np.zeros((out_chans, in_chans, kernel_size, kernel_size), np.float32))
        self.bias = Parameter(np.zeros(out_chans, np.float32)) if bias else None
        self.stride = stride
        self.padding = padding
        self._cache = None

    def forward(self, x):
        b = None if self.bias is None else self.bias.data
        out, self._cache = _conv_ops().conv2d_forward(x, self.weight.data, b, self.stride, self.padding)
        self._cache_ops = get_ops_kind()                           # backward checks the same ops read it
        return out                                                 # (B, Cout, Hout, Wout)

    def backward(self, dout):
        dx, dw, db = _conv_ops().conv2d_backward(dout, self._check_cache(self._cache))
        self._cache = None
        self.weight.accumulate(dw)
        if self.bias is not None:
            self.bias.accumulate(db)
        return dx                                                  # (B, Cin, H, W)


class BatchNorm2d(Module):
    """Batch normalisation with a learned scale (weight) and shift (bias) per channel.

    The running averages are buffers, not Parameters: state the model keeps (and saves in its
    state_dict) but never trains. In training mode each forward pass normalises with the
    batch's statistics and updates them; in eval mode it normalises with them.

    `group` is None unless the batch is split over K processes (data-parallel training): then
    minivit.distributed sets it, and training takes the statistics of the whole batch over
    all ranks (SyncBatchNorm: cnn_ops.sync_batchnorm2d_forward), as one process would."""

    BUFFERS = ("running_mean", "running_var", "num_batches_tracked")

    def __init__(self, channels, eps=1e-5, momentum=0.1):
        self.weight = Parameter(np.ones(channels, np.float32))
        self.bias = Parameter(np.zeros(channels, np.float32))
        self.running_mean = np.zeros(channels, np.float32)
        self.running_var = np.ones(channels, np.float32)
        self.num_batches_tracked = np.zeros((), np.int64)   # torch keeps it; only momentum=None would use it
        self.eps = eps
        self.momentum = momentum
        self.group = None                                          # distributed.BatchGroup with K ranks
        self._cache = None

    def forward(self, x):
        ops = _conv_ops()
        # updates the running stats when training
        if self.group is None:
            out, self._cache = ops.batchnorm2d_forward(x, self.weight.data, self.bias.data, self.running_mean,
                                                       self.running_var, self.training, self.momentum, self.eps)
        else:
            out, self._cache = ops.sync_batchnorm2d_forward(x, self.weight.data, self.bias.data, self.running_mean,
                                                            self.running_var, self.training, self.group,
                                                            self.momentum, self.eps)
        self._cache_ops = get_ops_kind()
        self._synced = self.group is not None
        if self.training:
            self.num_batches_tracked += 1
        return out                                                 # (B, C, H, W)

    def backward(self, dout):
        cache = self._check_cache(self._cache)
        ops = _conv_ops()
        backward = ops.sync_batchnorm2d_backward if self._synced else ops.batchnorm2d_backward
        dx, dw, db = backward(dout, cache)
        self._cache = None
        self.weight.accumulate(dw)
        self.bias.accumulate(db)
        return dx


class _ResidualBlock(Module):
    """What BasicBlock and Bottleneck share: the shortcut and out = relu(main(x) + shortcut(x)),
    or out = relu(main(x)) in a plain network (shortcut "none")."""

    expansion = 1

    def _make_shortcut(self, in_chans, out_chans, stride, shortcut, eps, momentum):
        """`downsample` = [1x1 conv, BN] (torchvision's name: downsample.0, downsample.1) for a
        projection, None otherwise; `pad_shortcut` says whether option A must subsample/pad;
        `plain` whether there is no shortcut at all ("none")."""
        changes = stride != 1 or in_chans != out_chans
        self.downsample = None
        self.pad_shortcut = False
        self.plain = shortcut == "none"
        if shortcut == "C" or (shortcut == "B" and changes):
            self.downsample = [Conv2d(in_chans, out_chans, 1, stride), BatchNorm2d(out_chans, eps, momentum)]
        elif shortcut == "A" and changes:
            self.pad_shortcut = True
        self.out_chans = out_chans
        self.stride = stride

    def _shortcut_forward(self, x):
        """(shortcut(x), cache); (None, None) in a plain network: nothing is added."""
        if self.plain:
            return None, None
        if self.downsample is not None:
            conv, bn = self.downsample
            return bn(conv(x)), None                               # (B, Cout, Hout, Wout)
        if self.pad_shortcut:
            return cnn_ops.subsample_pad_forward(x, self.out_chans, self.stride)
        return x, None                                             # the identity

    def _shortcut_backward(self, dout, cache):
        """The gradient that reaches x through the shortcut; None in a plain network."""
        if self.plain:
            return None
        if self.downsample is not None:
            conv, bn = self.downsample
            return conv.backward(bn.backward(dout))                # (B, Cin, H, W)
        if self.pad_shortcut:
            return cnn_ops.subsample_pad_backward(dout, cache)
        return dout


class BasicBlock(_ResidualBlock):
    """out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), two 3x3 convolutions; the
    first has the stride."""

    expansion = 1

    def __init__(self, in_chans, planes, stride=1, shortcut="B", eps=1e-5, momentum=0.1):
        self.conv1 = Conv2d(in_chans, planes, 3, stride, 1)
        self.bn1 = BatchNorm2d(planes, eps, momentum)
        self.conv2 = Conv2d(planes, planes, 3, 1, 1)
        self.bn2 = BatchNorm2d(planes, eps, momentum)
        self._make_shortcut(in_chans, planes, stride, shortcut, eps, momentum)
        self._cache = None

    def forward(self, x):
        out, relu1 = cnn_ops.relu_forward(self.bn1(self.conv1(x)))    # (B, planes, Hout, Wout)
        out = self.bn2(self.conv2(out))                               # (B, planes, Hout, Wout)
        identity, shortcut_cache = self._shortcut_forward(x)          # (B, planes, Hout, Wout), None if plain
        out, relu2 = cnn_ops.relu_forward(out if identity is None else out + identity)
        self._cache = (relu1, relu2, shortcut_cache)
        return out

    def backward(self, dout):
        relu1, relu2, shortcut_cache = self._check_cache(self._cache)
        self._cache = None
        # forward: out = relu(out + identity)  =>  the sum hands the same gradient to both paths
        dsum = cnn_ops.relu_backward(dout, relu2)
        # forward: out = bn2(conv2(out))
        dmain = self.conv2.backward(self.bn2.backward(dsum))
        # forward: out = relu(bn1(conv1(x)))
        dx = self.conv1.backward(self.bn1.backward(cnn_ops.relu_backward(dmain, relu1)))
        # forward: identity = shortcut(x)  =>  x feeds both paths: add the two gradients
        # (a plain network has only the main path)
        dshortcut = self._shortcut_backward(dsum, shortcut_cache)
        return dx if dshortcut is None else dx + dshortcut


class Bottleneck(_ResidualBlock):
    """out = relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x)):
    1x1 down to `planes`, 3x3 (with the stride, torchvision's "ResNet v1.5"), 1x1 up to 4 x planes."""

    expansion = 4

    def __init__(self, in_chans, planes, stride=1, shortcut="B", eps=1e-5, momentum=0.1):
        out_chans = planes * self.expansion
        self.conv1 = Conv2d(in_chans, planes, 1)
        self.bn1 = BatchNorm2d(planes, eps, momentum)
        self.conv2 = Conv2d(planes, planes, 3, stride, 1)
        self.bn2 = BatchNorm2d(planes, eps, momentum)
        self.conv3 = Conv2d(planes, out_chans, 1)
        self.bn3 = BatchNorm2d(out_chans, eps, momentum)
        self._make_shortcut(in_chans, out_chans, stride, shortcut, eps, momentum)
        self._cache = None

    def forward(self, x):
        out, relu1 = cnn_ops.relu_forward(self.bn1(self.conv1(x)))    # (B, planes, H, W)
        out, relu2 = cnn_ops.relu_forward(self.bn2(self.conv2(out)))  # (B, planes, Hout, Wout)
        out = self.bn3(self.conv3(out))                               # (B, 4 planes, Hout, Wout)
        identity, shortcut_cache = self._shortcut_forward(x)          # (B, 4 planes, Hout, Wout), None if plain
        out, relu3 = cnn_ops.relu_forward(out if identity is None else out + identity)
        self._cache = (relu1, relu2, relu3, shortcut_cache)
        return out

    def backward(self, dout):
        relu1, relu2, relu3, shortcut_cache = self._check_cache(self._cache)
        self._cache = None
        # forward: out = relu(out + identity)  =>  the sum hands the same gradient to both paths
        dsum = cnn_ops.relu_backward(dout, relu3)
        # forward: out = bn3(conv3(out))
        dmain = self.conv3.backward(self.bn3.backward(dsum))
        # forward: out = relu(bn2(conv2(out)))
        dmain = self.conv2.backward(self.bn2.backward(cnn_ops.relu_backward(dmain, relu2)))
        # forward: out = relu(bn1(conv1(x)))
        dx = self.conv1.backward(self.bn1.backward(cnn_ops.relu_backward(dmain, relu1)))
        # forward: identity = shortcut(x)  =>  x feeds both paths: add the two gradients
        # (a plain network has only the main path)
        dshortcut = self._shortcut_backward(dsum, shortcut_cache)
        return dx if dshortcut is None else dx + dshortcut


# ============================================================================= the network

def _named_modules(module, prefix):
    yield prefix, module
    for name, child in module.named_children():
        yield from _named_modules(child, f"{prefix}{name}.")


class ModuleWithBuffers(Module):
    """A Module whose state_dict also holds its submodules' buffers: arrays a module lists in
    BUFFERS (BatchNorm2d's running averages and batch counter), kept and saved but not trained.
    ResNet is one; so is the hybrid ViT (minivit.model.HybridViT), whose patch embedding holds
    a ResNet: a checkpoint of either must restore the running averages, or a resumed run would
    normalise with other statistics than the run that never stopped."""

    def named_modules(self):
        """(name prefix, module) for this module ("") and every module below it ("layer1.0."),
        parents before children, as torch walks them."""
        return _named_modules(self, "")

    def named_buffers(self):
        """(name, array) for every buffer (BatchNorm running average and batch counter)."""
        for prefix, m in self.named_modules():
            for name in getattr(m, "BUFFERS", ()):
                yield prefix + name, getattr(m, name)

    def state_dict(self) -> dict:
        """{name: array} for every parameter and buffer, in torch's order (each module's
        parameters, then its buffers, then its children's); the arrays are the live ones."""
        state = {}
        for prefix, m in self.named_modules():
            for name, value in vars(m).items():
                if isinstance(value, Parameter):
                    state[prefix + name] = value.data
            for name in getattr(m, "BUFFERS", ()):
                state[prefix + name] = getattr(m, name)
        return state

    def load_state_dict(self, state: dict, strict: bool = True):
        """Copy arrays into the parameters and buffers (a torchvision state dict converted to
        NumPy loads as is), checking every name and shape first: nothing changes unless all
        pass. strict=False allows missing and unexpected keys and returns them."""
        if not isinstance(state, dict):
            raise TypeError(f"load_state_dict expects a dict of arrays, got {type(state).__name__}")
        targets = self.state_dict()                                    # name -> the live array
        missing = [k for k in targets if k not in state]
        unexpected = [k for k in state if k not in targets]
        if strict and (missing or unexpected):
            raise KeyError(f"state dict does not match the model: missing keys {missing}, unexpected keys {unexpected}")
        staged = {}
        for name, value in state.items():
            if name not in targets:
                continue
            target = targets[name]
            if not (is_array(value) or isinstance(value, (list, tuple, numbers.Number))):
                raise TypeError(f"state dict entry {name!r} must be an array, got {type(value).__name__}")
            arr = value if is_array(value) else np.asarray(value)
            if tuple(arr.shape) != tuple(target.shape):
                raise ValueError(f"state dict entry {name!r} has shape {tuple(arr.shape)}, "
                                 f"the model expects {tuple(target.shape)}")
            if arr.dtype.kind not in "fiu":
                raise TypeError(f"state dict entry {name!r} has non-numeric dtype {arr.dtype}")
            staged[name] = to_device(arr, device_of(target))
        for name, arr in staged.items():
            targets[name][...] = arr.astype(targets[name].dtype, copy=False)
        return missing, unexpected


class ResNet(ModuleWithBuffers):
    """A ResNet with torchvision's parameter names (conv1, bn1, layer1.0.conv1,
    layer2.0.downsample.0, fc, ...) and the interface of minivit.ViT, so one training loop
    drives both.

    ResNet(config_or_preset_name, seed=0). `model(images)` returns logits (B, K);
    `model.backward(dlogits)` adds every parameter's gradient into `.grad` and returns the
    gradient of the images. state_dict() holds the BatchNorm running averages too.
    """

    def __init__(self, config: ResNetConfig | str = "resnet20", seed: int | np.random.Generator = 0):
        if isinstance(config, str):
            config = get_preset(config)
        if not isinstance(config, ResNetConfig):
            raise TypeError(f"ResNet expects a ResNetConfig or a preset name, got {type(config).__name__}")
        self.config = cfg = config
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        eps, momentum = cfg.bn_eps, cfg.bn_momentum
        stem_width = cfg.widths[0]
        if cfg.stem == "imagenet":
            self.conv1 = Conv2d(cfg.in_chans, stem_width, 7, stride=2, padding=3)
        else:
            self.conv1 = Conv2d(cfg.in_chans, stem_width, 3, stride=1, padding=1)
        self.bn1 = BatchNorm2d(stem_width, eps, momentum)
        self.maxpool = cfg.stem == "imagenet"          # 3x3, stride 2, padding 1; no parameters
        block = BasicBlock if cfg.block == "basic" else Bottleneck
        in_chans = stem_width
        self.stage_names = []
        for i, (depth, width) in enumerate(zip(cfg.layers, cfg.widths)):
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1   # each later stage halves the side once
                blocks.append(block(in_chans, width, stride, cfg.shortcut, eps, momentum))
                in_chans = width * block.expansion
            setattr(self, f"layer{i + 1}", blocks)        # torchvision's names: layer1.0.conv1, ...
            self.stage_names.append(f"layer{i + 1}")
        self.fc = Linear(in_chans, cfg.num_classes) if cfg.num_classes > 0 else None
        self._cache = None
        self.init_weights(self.rng)

    def residual_blocks(self):
        """Every residual block, stage by stage."""
        return [b for name in self.stage_names for b in getattr(self, name)]

    def init_weights(self, rng: np.random.Generator):
        """torchvision's scheme: convolutions He-normal with fan_out (std sqrt(2 / (Cout k k))),
        BN scale 1 and shift 0, fc as torch.nn.Linear's default, uniform in +-1/sqrt(fan_in)
        for both the weight and the bias."""
        for m in self.modules():
            if isinstance(m, Conv2d):
                cout, _, kh, kw = m.weight.shape
                std = np.float32(math.sqrt(2.0 / (cout * kh * kw)))
                # float32 draws: twice as fast as float64 ones, and ResNet-50 has 23M conv weights
                values = {"weight": rng.standard_normal(m.weight.shape, dtype=np.float32) * std}
                if m.bias is not None:
                    values["bias"] = np.zeros(m.bias.shape)
            elif isinstance(m, BatchNorm2d):
                values = {"weight": np.ones(m.weight.shape), "bias": np.zeros(m.bias.shape)}
            elif isinstance(m, Linear):
                bound = 1.0 / math.sqrt(m.weight.shape[1])
                values = {"weight": rng.uniform(-bound, bound, m.weight.shape),
                          "bias": rng.uniform(-bound, bound, m.bias.shape)}
            else:
                continue
            for name, value in values.items():
                p = getattr(m, name)
                p.data = get_array_module(p.data).asarray(value.astype(p.data.dtype, copy=False))
                p.grad = None

    def seed(self, seed: int | np.random.Generator):
        """A new random generator (the ResNet draws nothing after initialisation; kept so that a
        training loop can treat it like a ViT, whose dropout draws from it)."""
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        return self

    # ------------------------------------------------------------------ forward / backward
    def forward(self, x):
        """Logits (B, K) for images (B, C, S, S)."""
        x = self.forward_features(x)                                   # (B, F)
        if self.fc is not None:
            x = self.fc(x)                                             # (B, K)
            self._cache = self._cache[:-2] + (x.shape, True)           # backward starts at fc
        return x

    def forward_features(self, x, pool: bool = True):
        """Everything but fc: the pooled features (B, F), or with pool=False the last stage's
        feature map (B, F, h, w) (h = w = config.feature_size; what a hybrid ViT would cut into
        tokens). backward() after this call takes the gradient of what it returned."""
        self.check_images(x)
        if not isinstance(pool, bool):
            raise TypeError(f"pool must be True or False, got {pool!r}")
        x = self.bn1(self.conv1(x))                                    # (B, C0, S/2, S/2) imagenet, (B, C0, S, S) cifar
        x, relu_cache = cnn_ops.relu_forward(x)
        maxpool_cache = None
        if self.maxpool:
            x, maxpool_cache = cnn_ops.maxpool2d_forward(x, 3, 2, 1)  # (B, C0, S/4, S/4)
        for block in self.residual_blocks():
            x = block(x)                                               # (B, width * expansion, H, W)
        pool_cache = None
        if pool:
            x, pool_cache = cnn_ops.global_avg_pool_forward(x)         # (B, F)
        self._cache = (relu_cache, maxpool_cache, pool_cache, x.shape, False)
        return x

    def backward(self, dout):
        relu_cache, maxpool_cache, pool_cache, out_shape, through_fc = self._check_cache(self._cache)
        if not is_array(dout) or tuple(dout.shape) != tuple(out_shape):
            raise ValueError(
                f"backward expects the gradient of the last forward pass's output (logits, or features after "
                f"forward_features), shape {tuple(out_shape)}, got {getattr(dout, 'shape', type(dout).__name__)}")
        self._cache = None
        dx = self.fc.backward(dout) if through_fc else dout            # (B, F)
        if pool_cache is not None:
            dx = cnn_ops.global_avg_pool_backward(dx, pool_cache)      # (B, F, h, w)
        for block in reversed(self.residual_blocks()):
            dx = block.backward(dx)                                    # (B, block input channels, H, W)
        if maxpool_cache is not None:
            dx = cnn_ops.maxpool2d_backward(dx, maxpool_cache)         # (B, C0, S/2, S/2)
        dx = cnn_ops.relu_backward(dx, relu_cache)
        return self.conv1.backward(self.bn1.backward(dx))              # (B, C, S, S)

    # ------------------------------------------------------------------ input checks
    def check_images(self, x):
        """Module.check_images, and a batch large enough for BatchNorm's training statistics."""
        super().check_images(x)
        cfg = self.config
        if self.training and x.shape[0] * (cfg.feature_size ** 2) < 2:
            raise ValueError(f"a batch of {x.shape[0]} image(s) of {cfg.img_size}x{cfg.img_size} leaves 1 value per "
                             f"channel at the last stage: BatchNorm cannot train on it (use a larger batch, or eval())")
