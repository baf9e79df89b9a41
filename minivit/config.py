"""ViTConfig: every size and option of a Vision Transformer, validated, with named presets;
HybridConfig: the same for the hybrid of the paper's §3.1 (a ResNet's feature map cut into
patches); and the one namespace of every model's presets (ViT, hybrid, ResNet).

Every config class names its model kind (`kind`: "vit", "hybrid", "resnet"); checkpoints record
it, and config_from_dict / get_model_preset / minivit.model.build_model dispatch on it.

Shape legend used across minivit:
    B batch, C channels, S image side, P patch side, N tokens (patches + 1 [CLS]),
    D width, H heads, hs head size (D // H), F MLP hidden width, K classes.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import numpy as np

from .resnet import PRESETS as RESNET_PRESETS
from .resnet import ResNetConfig

POOLS = ("cls", "mean")
# "learned": one learned vector per token (1, N, D), the paper's default.
# "learned2d": a learned row and column embedding (D/2 each) concatenated per patch, plus the
#     [CLS] token's own learned position (the paper's App. D.4, "2-dimensional embedding").
# "sincos2d": fixed 2-D sine-cosine embeddings (MoCo v3, MAE; zero for [CLS]).
# "relative": no absolute position at all; every block's attention adds a learned per-head bias
#     for each 2-D offset between query and key patch (BEiT's relative position bias).
# "none": no position information (the patches are a set).
POS_EMBEDS = ("learned", "learned2d", "sincos2d", "relative", "none")
# The absolute ones: a table (1, N, D) added to the tokens (pos_every_block adds it again later).
ABSOLUTE_POS_EMBEDS = ("learned", "learned2d", "sincos2d")
GELUS = ("exact", "tanh")
INITS = ("timm", "mimetic")
# No size of a model can exceed this (2**31 - 1): far beyond any ViT, and it keeps absurd
# values such as dim=10**400 out of the float arithmetic below (int to float overflows).
MAX_SIZE = 2**31 - 1


@dataclass(frozen=True)
class ViTConfig:
    kind = "vit"                 # the model kind (a class attribute, not a field): see CONFIG_CLASSES

    img_size: int = 224          # S: images are S x S
    patch_size: int = 16         # P: each patch is P x P x C
    in_chans: int = 3            # C
    num_classes: int = 1000      # K; 0 means no head (the model returns pooled features)
    dim: int = 768               # D
    depth: int = 12              # number of Transformer blocks
    heads: int = 12              # H; head size hs = D // H
    mlp_dim: int | None = None   # F; None means int(mlp_ratio * D)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    pool: str = "cls"            # "cls": the [CLS] token's output; "mean": mean of the patch tokens
    pos_embed: str = "learned"   # "learned" | "learned2d" | "sincos2d" (fixed) | "relative" | "none"
    pos_every_block: bool = False  # True: the absolute table is added at the input of every block, not
                                 # only after the patch embedding (the paper's App. D.4, shared between layers)
    dropout: float = 0.0         # after position embedding, attn.proj and in the MLP
    attn_dropout: float = 0.0    # on the attention probabilities
    drop_path: float = 0.0       # stochastic depth rate of the last block (linear from 0)
    gelu: str = "exact"          # "exact" (erf) | "tanh" (the approximation)
    ln_eps: float = 1e-6         # LayerNorm epsilon (timm and Google's ViT use 1e-6; HF configs say 1e-12)
    init: str = "timm"           # "timm": trunc-normal .02 everywhere; "mimetic": attention weights shaped
                                 # like a trained ViT's (Trockman & Kolter, ICML 2023), see ViT.init_weights

    def __post_init__(self):
        # NumPy scalars pass isinstance(x, float); a np.float64 eps or rate would then
        # silently turn every float32 activation into float64. Store plain Python floats.
        for name in ("mlp_ratio", "dropout", "attn_dropout", "drop_path", "ln_eps"):
            value = getattr(self, name)
            if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
                object.__setattr__(self, name, float(value))
        for name in ("img_size", "patch_size", "in_chans", "dim", "depth", "heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ViTConfig.{name} must be a positive integer, got {value!r}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"ViTConfig.num_classes must be an integer >= 0, got {self.num_classes!r}")
        for name in ("img_size", "patch_size", "in_chans", "dim", "depth", "heads", "num_classes", "mlp_dim"):
            value = getattr(self, name)
            if isinstance(value, int) and value > MAX_SIZE:
                raise ValueError(f"ViTConfig.{name}={value} is too large (at most {MAX_SIZE})")
        self._check_patch_grid()
        if self.dim % self.heads:
            raise ValueError(
                f"ViTConfig.dim={self.dim} is not divisible by heads={self.heads}; "
                f"each head gets dim // heads channels"
            )
        if self.mlp_dim is not None and (
            isinstance(self.mlp_dim, bool) or not isinstance(self.mlp_dim, int) or self.mlp_dim <= 0
        ):
            raise ValueError(f"ViTConfig.mlp_dim must be a positive integer or None, got {self.mlp_dim!r}")
        # Every float field must be finite. inf passes `> 0`, NaN passes `not <= 0`; they then
        # turn into an OverflowError deep inside (int(inf * dim)), or a run that trains a whole
        # epoch and fails only when it saves its config (JSON has no inf or NaN).
        for name in ("mlp_ratio", "dropout", "attn_dropout", "drop_path", "ln_eps"):
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"ViTConfig.{name} must be a finite number, got {value!r}")
        if not isinstance(self.mlp_ratio, (int, float)) or isinstance(self.mlp_ratio, bool) or self.mlp_ratio <= 0:
            raise ValueError(f"ViTConfig.mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        hidden = self.mlp_ratio * self.dim                    # may overflow to inf: 1e308 * 768
        if not hidden < MAX_SIZE + 1:
            raise ValueError(f"ViTConfig.mlp_ratio={self.mlp_ratio} gives an MLP wider than {MAX_SIZE} "
                             f"for dim={self.dim}")
        if int(hidden) <= 0:
            raise ValueError(f"ViTConfig.mlp_ratio={self.mlp_ratio} gives an empty MLP for dim={self.dim}")
        for name in ("dropout", "attn_dropout", "drop_path"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"ViTConfig.{name} must be a number in [0, 1), got {value!r}")
        _check_choice("pool", self.pool, POOLS)
        _check_choice("pos_embed", self.pos_embed, POS_EMBEDS)
        _check_choice("gelu", self.gelu, GELUS)
        _check_choice("init", self.init, INITS)
        if self.pos_embed == "sincos2d" and self.dim % 4:
            raise ValueError(f"pos_embed='sincos2d' needs dim divisible by 4, got dim={self.dim}")
        if self.pos_embed == "learned2d" and self.dim % 2:
            raise ValueError(f"pos_embed='learned2d' needs an even dim (a row and a column embedding of "
                             f"dim/2 each), got dim={self.dim}")
        if not isinstance(self.pos_every_block, bool):
            raise ValueError(f"ViTConfig.pos_every_block must be True or False, got {self.pos_every_block!r}")
        if self.pos_every_block and self.pos_embed not in ABSOLUTE_POS_EMBEDS:
            raise ValueError(f"pos_every_block=True adds an absolute position table at every block, but "
                             f"pos_embed={self.pos_embed!r} has none; use one of {ABSOLUTE_POS_EMBEDS}")
        if not isinstance(self.qkv_bias, bool):
            raise ValueError(f"ViTConfig.qkv_bias must be True or False, got {self.qkv_bias!r}")
        if isinstance(self.ln_eps, bool) or not isinstance(self.ln_eps, (int, float)) or not 0 < self.ln_eps <= 1:
            raise ValueError(f"ViTConfig.ln_eps must be a positive number at most 1, got {self.ln_eps!r}")
        if np.float32(self.ln_eps) == 0:
            # var + eps is computed in float32: an eps that rounds to 0 there protects nothing,
            # and a token with zero variance would be divided by 0
            raise ValueError(f"ViTConfig.ln_eps={self.ln_eps!r} rounds to 0 in float32; use at least 1e-38")

    def _check_patch_grid(self):
        if self.img_size % self.patch_size:
            raise ValueError(
                f"ViTConfig.img_size={self.img_size} is not divisible by patch_size={self.patch_size}; "
                f"the image must tile exactly into patches"
            )

    # Derived sizes, named as in the shape legend.
    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size          # patches per side

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + 1                      # N = patches + [CLS]

    @property
    def patch_dim(self) -> int:
        return self.in_chans * self.patch_size**2        # C * P * P values per patch

    @property
    def head_size(self) -> int:
        return self.dim // self.heads                    # hs

    @property
    def hidden_dim(self) -> int:
        return self.mlp_dim if self.mlp_dim is not None else int(self.mlp_ratio * self.dim)

    def replace(self, **overrides) -> "ViTConfig":
        """A copy with some fields changed (validated again); unknown names are an error."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown {type(self).__name__} option(s) {unknown}; known options: {sorted(known)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        if not isinstance(d, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(d).__name__}")
        return cls().replace(**d)


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"ViTConfig.{name} must be one of {choices}, got {value!r}")


# The paper's models (Table 1 of Dosovitskiy et al.) at 224 x 224 with an ImageNet-1k head,
# and small models for 32 x 32 CIFAR-10 images.
PRESETS: dict[str, ViTConfig] = {
    "vit-ti16": ViTConfig(dim=192, depth=12, heads=3),
    "vit-s16": ViTConfig(dim=384, depth=12, heads=6),
    "vit-b16": ViTConfig(dim=768, depth=12, heads=12),
    "vit-b32": ViTConfig(patch_size=32, dim=768, depth=12, heads=12),
    "vit-l16": ViTConfig(dim=1024, depth=24, heads=16),
    "vit-h14": ViTConfig(patch_size=14, dim=1280, depth=32, heads=16),
    # A fast model for the lessons: ~1M parameters, 8 x 8 patches of 4 x 4 pixels.
    "cifar-lesson": ViTConfig(img_size=32, patch_size=4, num_classes=10, dim=128, depth=5, heads=4, mlp_dim=512),
    # The two small ViTs commonly trained from scratch on CIFAR-10.
    "cifar-vit4": ViTConfig(img_size=32, patch_size=4, num_classes=10, dim=192, depth=12, heads=6, mlp_dim=384),
    "cifar-vit2": ViTConfig(img_size=32, patch_size=2, num_classes=10, dim=96, depth=12, heads=6, mlp_dim=192),
    # The pure ViT of the 20-epoch CIFAR-10 recipe (`minivit train --preset cifar-recipe`; the default
    # model of `minivit train` is its hybrid twin, cifar-hybrid, below).
    # Short schedules favour the "simple ViT" choices of Beyer et al. (2022): mean-pooled tokens,
    # fixed 2-D sin-cos position embeddings and no stochastic depth; and attention that starts
    # out local, from the mimetic initialisation (Trockman & Kolter, 2023).
    "cifar-recipe": ViTConfig(img_size=32, patch_size=4, num_classes=10, dim=192, depth=6, heads=6, mlp_dim=384,
                              pool="mean", pos_embed="sincos2d", init="mimetic"),
}


def get_preset(name: str, **overrides) -> ViTConfig:
    """The named preset, with any field overridden: get_preset("vit-b16", num_classes=10)."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


# ============================================================================= the hybrid

@dataclass(frozen=True)
class HybridConfig(ViTConfig):
    """The hybrid architecture of the paper (§3.1): the patches are cut from a ResNet's feature
    map instead of the image. The ResNet's stages (no pooling, no fc) turn images (C, S, S) into
    a map (F, h, w); its P x P patches (P = 1 in the paper: every position of the map is a
    token) are projected to D, and from there on it is the ViT of the ViTConfig fields:
    [CLS], positions, blocks, norm, pool, head.

    img_size and in_chans are the images' (the backbone's input); patch_size is a patch of the
    feature map. The backbone_* fields (and bn_eps, bn_momentum) are the ResNetConfig of the
    backbone (backbone_config), which has no fc (num_classes 0). The defaults are the paper's
    R50+ViT-B/16: ResNet-50 without its 4th stage and with 9 blocks in the 3rd (224 -> a 14 x 14
    map of 1024 channels), 1x1 patches, ViT-B (with BatchNorm where the paper's ResNet has
    GroupNorm and standardised weights).
    """

    kind = "hybrid"

    patch_size: int = 1                          # P on the feature map: 1 = every map position is a token
    backbone_block: str = "bottleneck"           # the ResNetConfig fields of the backbone (its block, ...)
    backbone_layers: tuple = (3, 4, 9)
    backbone_widths: tuple = (64, 128, 256)
    backbone_stem: str = "imagenet"
    backbone_shortcut: str = "B"
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1

    def __post_init__(self):
        # JSON gives lists back; the config is frozen and hashable, so the stages stay tuples
        for name in ("backbone_layers", "backbone_widths"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        try:
            backbone = self.backbone_config
        except ValueError as exc:      # name the field as the hybrid spells it
            message = str(exc)
            for field in ("block", "layers", "widths", "stem", "shortcut"):
                message = message.replace(f"ResNetConfig.{field} ", f"HybridConfig.backbone_{field} ")
            message = message.replace("ResNetConfig.bn_", "HybridConfig.bn_").replace("ResNetConfig.", "HybridConfig.")
            raise ValueError(message) from None
        for name in ("bn_eps", "bn_momentum"):     # as validated and converted by ResNetConfig
            object.__setattr__(self, name, getattr(backbone, name))
        super().__post_init__()

    def _check_patch_grid(self):
        side = self.feature_size
        if side % self.patch_size:
            raise ValueError(f"HybridConfig: the backbone makes a {side}x{side} feature map of {self.img_size}x"
                             f"{self.img_size} images, which patch_size={self.patch_size} does not tile exactly")

    @property
    def backbone_config(self) -> ResNetConfig:
        """The backbone: a ResNet on the images, without fc."""
        return ResNetConfig(block=self.backbone_block, layers=self.backbone_layers, widths=self.backbone_widths,
                            stem=self.backbone_stem, shortcut=self.backbone_shortcut, num_classes=0,
                            in_chans=self.in_chans, img_size=self.img_size, bn_eps=self.bn_eps,
                            bn_momentum=self.bn_momentum)

    @property
    def feature_size(self) -> int:
        """h = w: the side of the backbone's feature map."""
        return self.backbone_config.feature_size

    @property
    def num_features(self) -> int:
        """F: the channels of the backbone's feature map."""
        return self.backbone_config.num_features

    @property
    def grid_size(self) -> int:
        return self.feature_size // self.patch_size     # patches per side of the feature map

    @property
    def patch_dim(self) -> int:
        return self.num_features * self.patch_size**2   # F * P * P values per patch

    @property
    def vit_config(self) -> ViTConfig:
        """The ViT that reads the feature map as its image: (F, h, h) "images", the same patches,
        width, blocks and head. Its parameters are the hybrid's, less the backbone."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(ViTConfig)}
        return ViTConfig(**{**fields, "img_size": self.feature_size, "in_chans": self.num_features})


HYBRID_PRESETS: dict[str, HybridConfig] = {
    # The paper's R50+ViT-B/16 (Table 6 hybrids at 224 x 224, ImageNet head): 14 x 14 = 196 tokens.
    "r50-vit-b16": HybridConfig(),
    # The model of the 20-epoch CIFAR-10 recipe, `minivit train`'s default (README "Training on CIFAR-10").
    # The stem and three one-block stages of a CIFAR ResNet (ResNet-8's: 16, 32, 64
    # channels, option A shortcuts) take 32 x 32 images to an 8 x 8 map of 64 channels, whose 1x1
    # patches are 64 tokens, as many as cifar-recipe's 4 x 4 patches give; then the blocks of
    # cifar-recipe (D 192, 6 heads, MLP 384, mean pool, sin-cos positions, mimetic init), one fewer
    # of them to pay for the backbone: 1.57M parameters and 234M FLOPs against cifar-recipe's
    # 1.79M and 251M, and about its training time on a CPU (README "ResNet and the hybrid").
    "cifar-hybrid": HybridConfig(img_size=32, patch_size=1, num_classes=10, dim=192, depth=5, heads=6, mlp_dim=384,
                                 pool="mean", pos_embed="sincos2d", init="mimetic", backbone_block="basic",
                                 backbone_layers=(1, 1, 1), backbone_widths=(16, 32, 64), backbone_stem="cifar",
                                 backbone_shortcut="A"),
}


# ============================================================================= every kind of model

# kind -> config class. minivit.model.build_model maps the same kinds to the model classes.
CONFIG_CLASSES = {"vit": ViTConfig, "hybrid": HybridConfig, "resnet": ResNetConfig}
KINDS = tuple(CONFIG_CLASSES)
# Every preset of every kind, in one namespace (`minivit train --preset`, `minivit shapes --preset`).
PRESETS_BY_KIND = {"vit": PRESETS, "hybrid": HYBRID_PRESETS, "resnet": RESNET_PRESETS}
MODEL_PRESETS: dict = {}
for _kind, _presets in PRESETS_BY_KIND.items():
    _clash = sorted(set(_presets) & set(MODEL_PRESETS))
    if _clash:
        raise RuntimeError(f"preset names used by two kinds of model: {_clash}")
    MODEL_PRESETS.update(_presets)


def model_kind(config) -> str:
    """"vit", "hybrid" or "resnet": the kind of model a config describes."""
    for kind, cls in CONFIG_CLASSES.items():
        if type(config) is cls:      # exact type: a HybridConfig is a ViTConfig too
            return kind
    raise TypeError(f"expected a model config ({', '.join(c.__name__ for c in CONFIG_CLASSES.values())}), "
                    f"got {type(config).__name__}")


def config_from_dict(d: dict, kind: str = "vit"):
    """The config of a model of this kind from its to_dict() (a checkpoint's meta.json)."""
    if kind not in CONFIG_CLASSES:
        raise ValueError(f"unknown model kind {kind!r}; known kinds: {', '.join(KINDS)}")
    return CONFIG_CLASSES[kind].from_dict(d)


def list_presets() -> str:
    """Every preset name, grouped by kind, for messages and --help."""
    return "; ".join(f"{kind}: {', '.join(presets)}" for kind, presets in PRESETS_BY_KIND.items())


def get_model_preset(name: str, **overrides):
    """The named preset of any kind (ViTConfig, HybridConfig or ResNetConfig), with any field
    overridden: get_model_preset("resnet20", img_size=48). An unknown field names the kind."""
    if not isinstance(name, str) or name not in MODEL_PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {list_presets()}")
    config = MODEL_PRESETS[name]
    if not overrides:
        return config
    known = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown config option(s) {unknown} for {name!r}, a {model_kind(config)} model "
                         f"({type(config).__name__}); its options: {', '.join(sorted(known))}")
    return config.replace(**overrides)
