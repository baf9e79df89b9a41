"""Walk one image through a model and list every step: its tensor shape, its parameters and
its forward FLOPs (a multiply-add counts as 2 FLOPs; only matrix products are counted -
linear layers, attention's two products, convolutions - which are >99% of the work at the
paper's sizes; normalisation, activations and additions are not).

    minivit shapes --preset vit-b16
    minivit shapes --preset cifar-lesson --set depth=6 --set pool=mean
    minivit shapes --preset resnet20                  # a ResNet, block by block
    minivit shapes --preset cifar-hybrid              # the hybrid: the ResNet stages, then the ViT

The counts come from the config alone, so even ViT-H/14 is walked without allocating it.
Shape legend: C channels, S image side, P patch side, G = S // P, N tokens, D width,
H heads, hs head size, F MLP width (a ResNet's or hybrid's: feature-map channels), K classes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .cnn_ops import output_size
from .config import HybridConfig, ViTConfig, get_model_preset, list_presets, model_kind
from .resnet import ResNetConfig


@dataclass(frozen=True)
class Step:
    name: str        # timm's name of the module, or what happens
    shape: str       # the tensor after this step, for one image
    params: int      # parameters this step owns
    flops: int       # forward FLOPs for one image
    note: str = ""


def _dims(*sizes):
    return " x ".join(str(s) for s in sizes)


def walk(config) -> list[Step]:
    """Every step of the forward pass for one image, in order (any kind of model)."""
    kind = model_kind(config)
    if kind == "resnet":
        return walk_resnet(config)
    if kind == "hybrid":
        return walk_hybrid(config)
    return walk_vit(config)


def walk_vit(config: ViTConfig) -> list[Step]:
    c = config
    S, P, C, G, N, D, H, hs, F, K = (c.img_size, c.patch_size, c.in_chans, c.grid_size, c.num_tokens,
                                     c.dim, c.heads, c.head_size, c.hidden_dim, c.num_classes)
    Np = G * G
    steps = [
        Step("image", _dims(C, S, S), 0, 0, "C x S x S"),
        Step("patchify", _dims(Np, C * P * P), 0, 0, f"{G}x{G} patches of {C}x{P}x{P} values"),
        Step("patch_embed.proj", _dims(Np, D), D * C * P * P + D, 2 * Np * C * P * P * D, "linear C*P*P -> D"),
        Step("cls_token", _dims(N, D), D, 0, "prepend [CLS]"),
    ]
    if c.pos_embed == "learned":
        steps.append(Step("pos_embed", _dims(N, D), N * D, 0, "add learned positions"))
    elif c.pos_embed == "learned2d":
        steps.append(Step("pos_embed_row/col/cls", _dims(N, D), 2 * G * (D // 2) + D, 0,
                          "add learned 2D positions (X | Y halves)"))
    elif c.pos_embed == "sincos2d":
        steps.append(Step("pos_embed (fixed)", _dims(N, D), 0, 0, "add 2D sine-cosine positions"))
    if c.pos_every_block and c.pos_embed != "none":
        steps[-1] = dataclasses.replace(steps[-1], note=steps[-1].note + ", again before every block")
    qkv_params = 3 * D * D + (3 * D if c.qkv_bias else 0)
    block = [
        Step("norm1", _dims(N, D), 2 * D, 0, "LayerNorm"),
        Step("attn.qkv", _dims(N, 3 * D), qkv_params, 2 * N * D * 3 * D, "fused q, k, v projection"),
        Step("  split heads", f"3 x {_dims(H, N, hs)}", 0, 0, "q, k, v: H heads x N x hs"),
        Step("  q @ k^T / sqrt(hs)", _dims(H, N, N), 0, 2 * H * N * N * hs, "attention scores"),
    ]
    if c.pos_embed == "relative":
        block.append(Step("  + relative_position_bias_table", _dims(H, N, N), ((2 * G - 1) ** 2 + 3) * H, 0,
                          "a learned bias per head and 2D offset"))
    block += [
        Step("  softmax", _dims(H, N, N), 0, 0, "each row sums to 1"),
        Step("  attn @ v", _dims(H, N, hs), 0, 2 * H * N * N * hs, "weighted sum of values"),
        Step("  merge heads", _dims(N, D), 0, 0, "heads side by side"),
        Step("attn.proj", _dims(N, D), D * D + D, 2 * N * D * D, "output projection"),
        Step("+ residual", _dims(N, D), 0, 0, "x + attn(norm1(x))"),
        Step("norm2", _dims(N, D), 2 * D, 0, "LayerNorm"),
        Step("mlp.fc1", _dims(N, F), D * F + F, 2 * N * D * F, f"GELU ({c.gelu})"),
        Step("mlp.fc2", _dims(N, D), F * D + D, 2 * N * F * D, ""),
        Step("+ residual", _dims(N, D), 0, 0, "x + mlp(norm2(x))"),
    ]
    steps += [dataclasses.replace(s, name=f"blocks.0.{s.name}" if not s.name.startswith(("  ", "+")) else s.name)
              for s in block]
    if c.depth > 1:
        per_block = sum(s.params for s in block), sum(s.flops for s in block)
        steps.append(Step(f"blocks.1-{c.depth - 1}", _dims(N, D), per_block[0] * (c.depth - 1),
                          per_block[1] * (c.depth - 1), f"{c.depth - 1} more blocks like blocks.0"))
    steps.append(Step("norm", _dims(N, D), 2 * D, 0, "final LayerNorm"))
    steps.append(Step("pool", str(D), 0, 0, "[CLS] token" if c.pool == "cls" else "mean of patch tokens"))
    if K > 0:
        steps.append(Step("head", str(K), D * K + K, 2 * D * K, "logits"))
    return steps


def walk_resnet(config: ResNetConfig, prefix: str = "", head: bool = True) -> list[Step]:
    """A ResNet: the stem, the first block of each stage step by step, the stage's other blocks
    (all alike) as one row, then pool and fc. head=False stops at the last feature map (the
    hybrid's backbone); prefix goes before every module name."""
    c = config
    steps = [] if prefix else [Step("image", _dims(c.in_chans, c.img_size, c.img_size), 0, 0, "C x S x S")]

    def conv(name, cin, cout, k, stride, padding, side, note=""):
        out = output_size(side, k, stride, padding)
        flops = 2 * cout * out * out * cin * k * k
        return Step(prefix + name, _dims(cout, out, out), cout * cin * k * k, flops,
                    note or f"{k}x{k} conv" + (f", stride {stride}" if stride > 1 else "")), out

    def bn(name, channels, side, note="BatchNorm (+ ReLU)"):
        return Step(prefix + name, _dims(channels, side, side), 2 * channels, 0, note)

    side, w0 = c.img_size, c.widths[0]
    if c.stem == "imagenet":
        step, side = conv("conv1", c.in_chans, w0, 7, 2, 3, side)
        steps += [step, bn("bn1", w0, side)]
        side = output_size(side, 3, 2, 1)
        steps.append(Step(prefix + "maxpool", _dims(w0, side, side), 0, 0, "3x3 max-pool, stride 2"))
    else:
        step, side = conv("conv1", c.in_chans, w0, 3, 1, 1, side)
        steps += [step, bn("bn1", w0, side)]
    cin = w0
    for i, (depth, width) in enumerate(zip(c.layers, c.widths)):
        cout = width * c.expansion
        block_steps = []                                 # (steps of block j) for every block
        for j in range(depth):
            stride = 2 if (i > 0 and j == 0) else 1
            name = f"layer{i + 1}.{j}."
            rows, s_in = [], side
            if c.block == "basic":
                kernels = [("conv1", cin, width, 3, stride, 1), ("conv2", width, width, 3, 1, 1)]
            else:
                kernels = [("conv1", cin, width, 1, 1, 0), ("conv2", width, width, 3, stride, 1),
                           ("conv3", width, cout, 1, 1, 0)]
            for k, (conv_name, a, b, kernel, st, pad) in enumerate(kernels):
                step, side = conv(name + conv_name, a, b, kernel, st, pad, side)
                last = k == len(kernels) - 1             # its ReLU comes after the addition
                rows += [step, bn(f"{name}bn{k + 1}", b, side, "BatchNorm" if last else "BatchNorm (+ ReLU)")]
            if c.shortcut == "C" or (c.shortcut == "B" and (stride != 1 or cin != cout)):
                step, _ = conv(name + "downsample.0", cin, cout, 1, stride, 0, s_in, "1x1 conv: the projection shortcut")
                rows += [step, Step(prefix + name + "downsample.1", _dims(cout, side, side), 2 * cout, 0, "BatchNorm")]
            elif c.shortcut == "A" and (stride != 1 or cin != cout):
                rows.append(Step("+ shortcut", _dims(cout, side, side), 0, 0,
                                 "every 2nd pixel, zero channels added (option A)"))
            if c.shortcut == "none":                     # the paper's plain network: no addition
                rows.append(Step("ReLU", _dims(cout, side, side), 0, 0, "relu(main): plain, no shortcut"))
            else:
                rows.append(Step("+ residual, ReLU", _dims(cout, side, side), 0, 0, "relu(main + shortcut)"))
            block_steps.append(rows)
            cin = cout
        steps += block_steps[0]
        if depth > 1:
            rest = [s for rows in block_steps[1:] for s in rows]
            steps.append(Step(f"{prefix}layer{i + 1}.1-{depth - 1}" if depth > 2 else f"{prefix}layer{i + 1}.1",
                              _dims(cout, side, side), sum(s.params for s in rest), sum(s.flops for s in rest),
                              f"{depth - 1} more block{'s' * (depth > 2)} like layer{i + 1}.0, stride 1"))
    if head:
        steps.append(Step(prefix + "pool", str(cin), 0, 0, "global average"))
        if c.num_classes > 0:
            steps.append(Step(prefix + "fc", str(c.num_classes), cin * c.num_classes + c.num_classes,
                              2 * cin * c.num_classes, "logits"))
    return steps


def walk_hybrid(config: HybridConfig) -> list[Step]:
    """The hybrid: the backbone's stages on the image, then the ViT of config.vit_config on
    the feature map (its patches, [CLS], positions, blocks, head)."""
    c = config
    steps = [Step("image", _dims(c.in_chans, c.img_size, c.img_size), 0, 0, "C x S x S")]
    steps += walk_resnet(c.backbone_config, prefix="patch_embed.backbone.", head=False)
    steps.append(Step("feature map", _dims(c.num_features, c.feature_size, c.feature_size), 0, 0,
                      "F x h x w: the ViT's \"image\""))
    return steps + walk_vit(c.vit_config)[1:]


def count_parameters(config: ViTConfig) -> int:
    """The number of trainable parameters, from the config alone."""
    return sum(s.params for s in walk(config))


def count_flops(config: ViTConfig) -> int:
    """Forward FLOPs for one image (matrix products only)."""
    return sum(s.flops for s in walk(config))


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def format_table(config: ViTConfig) -> str:
    steps = walk(config)
    rows = [("step", "shape (one image)", "params", "FLOPs", "")]
    rows += [(s.name, s.shape, f"{s.params:,}" if s.params else "", _human(s.flops) if s.flops else "", s.note)
             for s in steps]
    rows.append(("total", "", f"{count_parameters(config):,}", _human(count_flops(config)), "forward, one image"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for i, r in enumerate(rows):
        lines.append(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}  {r[4]}".rstrip())
        if i == 0 or i == len(rows) - 2:
            lines.append("-" * (sum(widths) + 6 + 20))
    return "\n".join(lines)


def parse_overrides(pairs: list[str], config_class=ViTConfig) -> dict:
    """["depth=6", "pool=mean", "qkv_bias=false"] -> {"depth": 6, "pool": "mean", "qkv_bias": False},
    each value converted to the type of the field of config_class (ViTConfig, HybridConfig,
    ResNetConfig) it sets; tuples are written with commas: "layers=2,2,2"."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    kind = f" of a {config_class.kind} model ({config_class.__name__})" if config_class is not ViTConfig else ""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"override {pair!r} must look like name=value, e.g. depth=6")
        key, raw = pair.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in fields:
            raise ValueError(f"unknown config option {key!r}{kind}; known options: {', '.join(fields)}")
        default = getattr(config_class(), key)
        try:
            if isinstance(default, tuple):
                value = tuple(int(v) for v in raw.split(","))
            elif isinstance(default, bool):
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                value = raw.lower() in ("true", "1")
            elif isinstance(default, int) or key == "mlp_dim":
                value = None if raw.lower() == "none" else int(raw)
            elif isinstance(default, float):
                value = float(raw)
            else:
                value = raw
        except ValueError:
            expected = "integers separated by commas" if isinstance(default, tuple) else type(default).__name__
            raise ValueError(f"override {pair!r}: {raw!r} is not a valid value for {key} "
                             f"(expected {expected})") from None
        out[key] = value
    return out


def preset_with_overrides(name: str, pairs: list[str]):
    """The preset `name` (any kind) with `--set NAME=VALUE` pairs applied, each parsed as the
    type of that kind's field; a field the kind does not have is an error that names the kind."""
    config = get_model_preset(name)
    return get_model_preset(name, **parse_overrides(pairs, type(config))) if pairs else config


def register(subparsers):
    p = subparsers.add_parser("shapes", help="print every step of a model (ViT, hybrid, ResNet) with its shape, "
                                             "parameters and FLOPs")
    p.add_argument("--preset", default="vit-b16", help=f"one of: {list_presets()} (default vit-b16)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                   help="override a config field, e.g. --set depth=6 or --set layers=2,2,2 (repeatable)")
    p.set_defaults(func=_run)


def _run(args):
    config = preset_with_overrides(args.preset, args.overrides)
    print(f"{args.preset}: {config}")
    print(format_table(config))
    return 0
