"""ViTConfig: every size and option of a Vision Transformer, validated, with named presets.

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
        if self.img_size % self.patch_size:
            raise ValueError(
                f"ViTConfig.img_size={self.img_size} is not divisible by patch_size={self.patch_size}; "
                f"the image must tile exactly into patches"
            )
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
            raise ValueError(f"unknown ViTConfig option(s) {unknown}; known options: {sorted(known)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        if not isinstance(d, dict):
            raise TypeError(f"ViTConfig.from_dict expects a dict, got {type(d).__name__}")
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
    # The model of the 20-epoch CIFAR-10 recipe (`minivit train --preset cifar-recipe`).
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
