"""The Vision Transformer (Dosovitskiy et al., ICLR 2021), forward and backward by hand.

    images (B, C, S, S)
      -> patch_embed       (B, G*G, D)   cut into P x P patches, one linear map each
      -> [CLS] + pos_embed (B, N, D)     N = G*G + 1
      -> blocks x depth    (B, N, D)     pre-norm attention + MLP, with residuals
                                         (pos_every_block: the position table added again before
                                         each; pos_embed="relative": a bias in each attention)
      -> norm, pool        (B, D)        the [CLS] token, or the mean of the patch tokens
      -> head              (B, K)        logits

The hybrid (paper §3.1, HybridViT below) differs in its first step only: a ResNet turns the
images into a feature map (B, F, h, w), and the patches are cut from that map (1 x 1 in the paper).

build_model(config) makes the model a config describes: ViT, HybridViT or minivit.resnet.ResNet.

Shape legend: B batch, C channels, S image side, P patch side, G = S // P (the hybrid: h // P),
N tokens, D width, F feature-map channels, K classes.
"""
from __future__ import annotations

import numpy as np

from .backend import get_array_module, is_array
from .config import HybridConfig, ViTConfig, get_model_preset, model_kind
from .modules import Block, LayerNorm, Linear, Module, Parameter, PatchEmbed, get_ops
from .resnet import ModuleWithBuffers, ResNet


def trunc_normal(rng: np.random.Generator, shape, std=0.02, bound=2.0):
    """Normal(0, std) samples redrawn until all lie within +-bound standard deviations.

    (timm's trunc_normal_(std=.02) cuts at +-2 in absolute units, i.e. +-100 std, which
    truncates nothing; cutting at +-2 std as here is what the name promises. With
    std .02 the two differ only in the 4.6% of samples beyond 2 std.)
    """
    out = rng.standard_normal(shape, dtype=np.float32)   # float32 draws: ViT-H has 632M weights
    bad = np.abs(out) > bound
    while bad.any():
        out[bad] = rng.standard_normal(int(bad.sum()), dtype=np.float32)
        bad = np.abs(out) > bound
    return out * np.float32(std)


def _noisy_identity_factors(rng: np.random.Generator, D: int, alpha: float, beta: float):
    """Two (D, D) factors whose product is A = alpha * Z / sqrt(D) + beta * I (Z uniform with
    variance 1), split evenly by the SVD: A = U S V^T, left = U sqrt(S), right = sqrt(S) V^T.
    Keeping only the first k columns of left and rows of right gives the best rank-k
    approximation of A, which is how one head of size hs < D gets its share."""
    z = rng.uniform(-np.sqrt(3.0), np.sqrt(3.0), size=(D, D))   # (D, D), mean 0, variance 1
    a = alpha * z / np.sqrt(D) + beta * np.eye(D)                 # (D, D)
    u, s, vt = np.linalg.svd(a)                                   # s sorted, largest first
    return u * np.sqrt(s), np.sqrt(s)[:, None] * vt               # (D, D), (D, D)


# The learned absolute position parameters (pos_embed="learned" and "learned2d").
POS_PARAMETERS = ("pos_embed", "pos_embed_row", "pos_embed_col", "pos_embed_cls")


class ViT(Module):
    """A Vision Transformer with timm's parameter names.

    ViT(config_or_preset_name, seed=0). `model(images)` returns logits (B, K);
    `model.backward(dlogits)` adds every parameter's gradient into `.grad` and returns
    the gradient of the images.
    """

    config_class = ViTConfig

    def __init__(self, config: ViTConfig | str = "cifar-lesson", seed: int | np.random.Generator = 0):
        name = type(self).__name__
        if isinstance(config, str):
            config = get_model_preset(config)
        if type(config) is not self.config_class:     # a HybridConfig is a ViTConfig, but not a ViT's
            what = f"a {model_kind(config)} config" if type(config).__name__.endswith("Config") else \
                type(config).__name__
            raise TypeError(f"{name} expects a {self.config_class.__name__} or a preset name, got "
                            f"{what}; minivit.model.build_model(config) makes the model of any config")
        self.config = cfg = config
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        D = cfg.dim
        self.patch_embed = self._make_patch_embed()
        self.cls_token = Parameter(np.zeros((1, 1, D), np.float32))
        G = cfg.grid_size
        if cfg.pos_embed == "learned":
            self.pos_embed = Parameter(np.zeros((1, cfg.num_tokens, D), np.float32))
        elif cfg.pos_embed == "learned2d":  # the table is built from these by ops.pos2d_forward
            self.pos_embed_row = Parameter(np.zeros((G, D // 2), np.float32))     # (G, D/2), Y
            self.pos_embed_col = Parameter(np.zeros((G, D // 2), np.float32))     # (G, D/2), X
            self.pos_embed_cls = Parameter(np.zeros((1, 1, D), np.float32))       # [CLS]'s own position
        elif cfg.pos_embed == "sincos2d":   # fixed, not trained: a buffer, not a Parameter
            self.pos_table = get_ops().sincos_2d_pos_embed(D, G)
        # "relative": no table here; each block's attention gets its own bias table
        rel_pos_grid = G if cfg.pos_embed == "relative" else None
        rates = np.linspace(0.0, cfg.drop_path, cfg.depth) if cfg.depth > 1 else [cfg.drop_path]
        self.blocks = [
            Block(D, cfg.heads, cfg.hidden_dim, cfg.qkv_bias, cfg.dropout, cfg.attn_dropout, float(rate),
                  cfg.gelu, cfg.ln_eps, self.rng, rel_pos_grid)
            for rate in rates   # stochastic depth grows linearly with depth, as in timm
        ]
        self.norm = LayerNorm(D, cfg.ln_eps)
        self.head = Linear(D, cfg.num_classes) if cfg.num_classes > 0 else None
        self._cache = None
        self.init_weights(self.rng)

    def _make_patch_embed(self):
        """Images (B, C, S, S) -> patch embeddings (B, G*G, D)."""
        cfg = self.config
        return PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.dim)

    def init_weights(self, rng: np.random.Generator):
        """timm's scheme: truncated normal (std .02) for every weight matrix, the patch
        embedding and pos_embed (and the learned2d row, column and [CLS] positions); zero
        biases; LayerNorm scale 1 and shift 0; the [CLS] token normal with std 1e-6 (timm),
        i.e. it starts near zero; relative position bias tables zero, as BEiT and timm's beit.py
        start them (every offset equally likely at first; Swin draws them with std .02 instead).
        With config.init == "mimetic" the attention weights are then drawn again, see _mimetic_attention."""
        for name, p in self.named_parameters():
            xp = get_array_module(p.data)
            if name == "cls_token":
                value = (rng.standard_normal(p.shape) * 1e-6).astype(np.float32)
            elif name.endswith("relative_position_bias_table"):
                value = np.zeros(p.shape, np.float32)
            elif name in POS_PARAMETERS or (name.endswith(".weight") and p.data.ndim >= 2):
                value = trunc_normal(rng, p.shape, 0.02)
            elif name.endswith(".weight"):          # LayerNorm scale
                value = np.ones(p.shape, np.float32)
            else:                                   # biases and LayerNorm shift
                value = np.zeros(p.shape, np.float32)
            p.data = xp.asarray(value.astype(p.data.dtype))
            p.grad = None
        if self.config.init == "mimetic":
            for block in self.blocks:
                self._mimetic_attention(block.attn, rng)

    def _mimetic_attention(self, attn, rng: np.random.Generator):
        """Mimetic initialisation (Trockman & Kolter, "Mimetic Initialization of Self-Attention
        Layers", ICML 2023). In trained ViTs each head's W_q^T W_k looks like a noisy identity,
        so a token attends most to tokens like itself, and W_v^T W_proj^T like a noisy
        *negative* identity. Starting there costs nothing at run time; with position
        embeddings in every token, "like itself" means "near it", so attention starts local
        instead of uniform, which helps most when there is little data or few epochs.

        Each head: q.k = x W_qh^T W_kh x'^T is set to the best rank-hs approximation of
        0.7 Z/sqrt(D) + 0.7 I. Values and projection: x W_v^T W_proj^T = x (0.4 Z'/sqrt(D) - 0.4 I).
        Z, Z' have independent entries of variance 1 (uniform, as in the paper's code)."""
        D = attn.proj.weight.shape[0]
        hs = D // attn.heads
        w_qkv = np.empty((3 * D, D), np.float64)                # rows: q (head by head), k, v
        for h in range(attn.heads):
            left, right = _noisy_identity_factors(rng, D, alpha=0.7, beta=0.7)   # left @ right = A
            w_qkv[h * hs:(h + 1) * hs] = left[:, :hs].T          # (hs, D): W_qh^T = left[:, :hs]
            w_qkv[D + h * hs:D + (h + 1) * hs] = right[:hs]       # (hs, D): W_kh = right[:hs]
        left, right = _noisy_identity_factors(rng, D, alpha=0.4, beta=-0.4)
        w_qkv[2 * D:] = left.T                                   # (D, D): W_v^T = left
        xp = get_array_module(attn.qkv.weight.data)
        dtype = attn.qkv.weight.data.dtype
        attn.qkv.weight.data = xp.asarray(w_qkv.astype(dtype))
        attn.proj.weight.data = xp.asarray(right.T.astype(dtype))   # W_proj^T = right

    def seed(self, seed: int | np.random.Generator):
        """Give the model (and every block) a new random generator for dropout and drop-path."""
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        for m in self.modules():
            if hasattr(m, "rng"):
                m.rng = rng
        return self

    # ------------------------------------------------------------------ forward / backward
    def forward(self, x, keep_attention: bool = False):
        """Logits (B, K) for images (B, C, S, S). With keep_attention=True every block also keeps
        its attention probabilities, which attention_maps() then returns."""
        x = self.forward_features(x, keep_attention)                    # (B, D)
        if self.head is not None:
            x = self.head(x)                                            # (B, K)
            self._cache = self._cache[:3] + (x.shape, True)             # backward starts at the head
        return x

    def forward_features(self, x, keep_attention: bool = False):
        """The pooled features (B, D) that the head reads: everything but the head. A linear
        probe (minivit.analysis) fits its own head on these. backward() after this call takes
        the gradient of the features, (B, D)."""
        ops = get_ops()   # fastops, or ops.py after modules.set_ops("reference")
        self.check_images(x)
        if not isinstance(keep_attention, bool):
            raise TypeError(f"keep_attention must be True or False, got {keep_attention!r}")
        for block in self.blocks:
            block.attn.keep_attention = keep_attention
        x = self.patch_embed(x)                                         # (B, G*G, D)
        pos, table_cache = self.position_table()                        # (1, N, D) or None
        x, cls_pos_cache = ops.cls_pos_forward(x, self.cls_token.data, pos)  # (B, N, D)
        x, drop_cache = ops.dropout_forward(x, self._dropout_mask(x.shape, self.config.dropout, x))
        for i, block in enumerate(self.blocks):
            if i > 0 and self.config.pos_every_block:
                x = x + pos                                             # (B, N, D), the same table again
            x = block(x)                                                # (B, N, D)
        x = self.norm(x)                                                # (B, N, D)
        x, pool_cache = ops.pool_forward(x, self.config.pool)           # (B, D)
        self._cache = ((cls_pos_cache, table_cache), drop_cache, pool_cache, x.shape, False)
        return x

    def position_table(self):
        """The absolute position embeddings (1, N, D) added to the tokens, and the cache that
        backward needs to reach the parameters behind them; (None, None) for pos_embed "relative"
        and "none". With pos_every_block the same table is added before every block (block 0's
        addition is the usual one after the patch embedding): the paper's App. D.4 variant with
        the embedding shared between layers."""
        kind = self.config.pos_embed
        if kind == "learned":
            return self.pos_embed.data, None
        if kind == "learned2d":
            return get_ops().pos2d_forward(self.pos_embed_row.data, self.pos_embed_col.data,
                                           self.pos_embed_cls.data)      # (1, N, D)
        if kind == "sincos2d":
            return self.pos_table, None
        return None, None

    def backward(self, dout):
        pos_cache, drop_cache, pool_cache, out_shape, through_head = self._check_cache(self._cache)
        if not is_array(dout) or tuple(dout.shape) != tuple(out_shape):
            raise ValueError(
                f"backward expects the gradient of the last forward pass's output (logits, or features after "
                f"forward_features), shape {tuple(out_shape)}, "
                f"got {getattr(dout, 'shape', type(dout).__name__)}"
            )
        self._cache = None
        ops = get_ops()
        dx = self.head.backward(dout) if through_head else dout         # (B, D)
        dx = ops.pool_backward(dx, pool_cache)                          # (B, N, D)
        dx = self.norm.backward(dx)                                     # (B, N, D)
        cls_pos_cache, table_cache = pos_cache
        learned = self.config.pos_embed in ("learned", "learned2d")     # a table with parameters behind it
        dpos_blocks = None                                              # what the later additions add to dpos
        for i in reversed(range(len(self.blocks))):
            dx = self.blocks[i].backward(dx)                            # (B, N, D)
            if i > 0 and self.config.pos_every_block and learned:
                # forward: x = x + pos (broadcast over the batch)  =>  dx passes on, dpos gets the batch sum
                part = dx.sum(axis=0, keepdims=True)                    # (1, N, D)
                dpos_blocks = part if dpos_blocks is None else dpos_blocks + part
        dx = ops.dropout_backward(dx, drop_cache)
        dx, dcls, dpos = ops.cls_pos_backward(dx, cls_pos_cache)        # (B, G*G, D), (1, 1, D), (1, N, D)
        self.cls_token.accumulate(dcls)
        if dpos_blocks is not None:
            dpos = dpos + dpos_blocks   # one table used in several places: the sum of their gradients
        if self.config.pos_embed == "learned":
            self.pos_embed.accumulate(dpos)
        elif self.config.pos_embed == "learned2d":
            # forward: pos = pos2d(pos_embed_row, pos_embed_col, pos_embed_cls)
            drow, dcol, dcls_pos = ops.pos2d_backward(dpos, table_cache)
            self.pos_embed_row.accumulate(drow)
            self.pos_embed_col.accumulate(dcol)
            self.pos_embed_cls.accumulate(dcls_pos)
        return self.patch_embed.backward(dx)                            # (B, C, S, S)

    def attention_maps(self) -> list:
        """Every block's attention probabilities from the last forward pass that was run with
        keep_attention=True: a list of depth arrays (B, H, N, N), where [b, h, i, j] is how much
        token i attends to token j in head h (token 0 is [CLS]; rows sum to 1). They are the
        softmax outputs, before any attention dropout."""
        maps = [block.attn.attention for block in self.blocks]
        if any(m is None for m in maps):
            raise RuntimeError("no attention maps kept: run the model as model(x, keep_attention=True) first "
                               "(the last forward pass did not keep them)")
        return maps


# ============================================================================= the hybrid (paper §3.1)

class HybridEmbed(PatchEmbed):
    """The hybrid's patch embedding (timm's HybridEmbed): `backbone`, a ResNet without pooling
    and fc, turns the images into a feature map (B, F, h, w), and PatchEmbed cuts that map into
    P x P patches and projects each to D (`proj`, a (D, F, P, P) kernel, timm's 1x1 convolution
    when P = 1) exactly as it does with the pixels of an image."""

    def __init__(self, backbone_config, patch_size, dim, rng):
        self.backbone = ResNet(backbone_config, seed=rng)     # first: timm's order, backbone then proj
        super().__init__(backbone_config.feature_size, patch_size, backbone_config.num_features, dim)

    def forward(self, x):
        fmap = self.backbone.forward_features(x, pool=False)  # (B, F, h, w)
        return super().forward(fmap)                          # (B, G*G, D)

    def backward(self, dout):
        # forward: super().forward(fmap)  =>  the gradient of the feature map
        dfmap = super().backward(dout)                        # (B, F, h, w)
        # forward: fmap = backbone.forward_features(x, pool=False)
        return self.backbone.backward(dfmap)                  # (B, C, S, S)


class HybridViT(ModuleWithBuffers, ViT):
    """The hybrid architecture (Dosovitskiy et al. §3.1): ViT with HybridEmbed as its patch
    embedding. Everything after the patch embedding is ViT's own code (forward, backward,
    keep_attention and attention_maps); the ResNet is ResNet's. Parameter names are timm's:
    patch_embed.backbone.* for the ResNet (torchvision's names below that), patch_embed.proj for
    the projection. state_dict() holds the backbone's BatchNorm buffers too (ModuleWithBuffers).

    HybridViT(config_or_preset_name, seed=0), e.g. HybridViT("cifar-hybrid").
    """

    config_class = HybridConfig

    def __init__(self, config: HybridConfig | str = "cifar-hybrid", seed: int | np.random.Generator = 0):
        super().__init__(config, seed)

    def _make_patch_embed(self):
        cfg = self.config
        return HybridEmbed(cfg.backbone_config, cfg.patch_size, cfg.dim, self.rng)

    def init_weights(self, rng: np.random.Generator):
        """ViT's scheme for the transformer and the projection; the ResNet's own (He-normal
        convolutions, BatchNorm 1 and 0) for the backbone, as timm's hybrids keep their
        backbone's. (ViT.init_weights walks every parameter, the backbone's included; those
        are then drawn again.)"""
        super().init_weights(rng)
        self.patch_embed.backbone.init_weights(rng)


# kind -> model class (minivit.config.CONFIG_CLASSES maps the same kinds to the config classes)
MODEL_CLASSES = {"vit": ViT, "hybrid": HybridViT, "resnet": ResNet}


def build_model(config, seed: int | np.random.Generator = 0):
    """The model a config describes (ViTConfig -> ViT, HybridConfig -> HybridViT,
    ResNetConfig -> ResNet), or that a preset name of any kind names. All three have one
    interface: forward/backward, named_parameters, state_dict (buffers included) and
    load_state_dict, train/eval, astype/to, seed, check_images, config."""
    if isinstance(config, str):
        config = get_model_preset(config)
    return MODEL_CLASSES[model_kind(config)](config, seed=seed)
