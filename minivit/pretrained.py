"""Real ViT weights in minivit: load them from three published layouts, save them for two.

The same network is stored under three sets of names. Each gets one table below that
maps it onto minivit's parameter names (which are timm's):

    format  what is on disk                                  who writes it
    hf      a directory: config.json + model.safetensors     Hugging Face transformers (google/vit-base-patch16-224)
    timm    one .safetensors file with timm's names          timm, and save_pretrained(format="timm") here
    npz     one .npz file with Flax's names                  the paper's release (google-research/vision_transformer)

    model, meta = load_pretrained("vit-base-patch16-224/")          # format detected from the files
    model, meta = load_pretrained(path, num_classes=10, img_size=384)  # fine-tuning: new head, resampled positions
    model, meta = load_pretrained(path, img_size=48, pos_resample="pad")   # the naive baseline: no 2-D layout
    save_pretrained(model, "vit.safetensors")                        # timm names, config in the file's metadata

Nothing is unpickled: safetensors files are read with safetensors' NumPy API and .npz
files with np.load(..., allow_pickle=False). PyTorch .bin / .pth files are pickles
(loading one can run arbitrary code) and are refused.

Shape legend: B batch, C channels, S image side, P patch side, G = S // P patches per
side, N = 1 + G*G tokens, D width, H heads, hs head size (D // H), F MLP width, K classes.
"""
from __future__ import annotations

import json
import math
import os
import zipfile
from pathlib import Path

import numpy as np

from .backend import get_array_module, to_numpy
from .config import ViTConfig
from .model import ViT

FORMATS = ("hf", "timm", "npz")
SAVE_FORMATS = ("timm", "hf")
# How load_pretrained(..., img_size=...) brings a learned 1-D pos_embed to a new grid:
#   "bilinear"  by each row's place in the image (the paper, section 3.2): resample_pos_embed
#   "pad"       by its place in the sequence, ignoring the 2-D layout: the first rows kept, zeros
#               after them (cut for a smaller grid): pad_pos_embed. A baseline, not a method.
POS_RESAMPLES = ("bilinear", "pad")

# The paper's models (and google/vit-base-patch16-224's preprocessor) scale pixels to [-1, 1]:
# x = (x / 255 - 0.5) / 0.5. Used when a checkpoint does not say otherwise.
DEFAULT_MEAN = 0.5
DEFAULT_STD = 0.5

# The most tokens (N = 1 + G*G) a model read from a file may have. Beyond it one head's attention
# scores for a single image (N x N float32) take more than 16 GiB, so no such model could run
# here; a file asking for more is damaged or hostile. (ViT-H/14 at 518 x 518 has 1370 tokens.)
MAX_TOKENS = 2**16


# ============================================================================= converters
# Small functions that turn one layout's arrays into minivit's. Each raises ValueError on a
# wrong number of axes; the table code adds which checkpoint key it came from.

def _expect_ndim(a, ndim):
    if a.ndim != ndim:
        raise ValueError(f"expected {ndim} axes, got shape {tuple(a.shape)}")


def _same(a):
    return a


def _stack_rows(*weights):
    """q, k, v projections -> timm's fused qkv: rows of q, then of k, then of v.

    Each (D, D) weight (or (D,) bias) is already ordered head by head (head 0's hs rows,
    then head 1's, ...), which is exactly the order timm's reshape(B, N, 3, H, hs) expects.
    """
    return np.concatenate(weights, axis=0)                # (3D, D) or (3D,)


def _dense_to_linear(kernel):
    """Flax Dense kernel (Din, Dout), used as x @ kernel -> Linear weight (Dout, Din), used as x @ w^T."""
    _expect_ndim(kernel, 2)
    return kernel.T


def _conv_hwio_to_oihw(kernel):
    """Flax Conv kernel (P, P, C, D), height-width-in-out -> PyTorch's (D, C, P, P)."""
    _expect_ndim(kernel, 4)
    return kernel.transpose(3, 2, 0, 1)                   # (D, C, P, P)


def _heads_in_to_qkv(q, k, v):
    """Flax's per-head query/key/value kernels, each (D, H, hs) -> fused qkv weight (3D, D).

    Flax computes q[..., h, j] = sum_d x[..., d] * kernel[d, h, j]. Flattening (H, hs) to
    H*hs keeps heads in order, so kernel.reshape(D, H*hs).T is the Linear weight for q.
    """
    for w in (q, k, v):
        _expect_ndim(w, 3)
    return np.concatenate([w.reshape(w.shape[0], -1).T for w in (q, k, v)], axis=0)  # (3D, D)


def _head_biases_to_qkv(q, k, v):
    """Flax's per-head biases, each (H, hs) -> fused qkv bias (3D,)."""
    for b in (q, k, v):
        _expect_ndim(b, 2)
    return np.concatenate([b.reshape(-1) for b in (q, k, v)])                       # (3D,)


def _heads_out_to_linear(kernel):
    """Flax's output projection (H, hs, D): out = sum_{h,j} y[h, j] kernel[h, j, :] -> Linear weight (D, H*hs)."""
    _expect_ndim(kernel, 3)
    H, hs, D = kernel.shape
    return kernel.reshape(H * hs, D).T                    # (D, D)


# ============================================================================= the three tables
# Each row: (minivit name, checkpoint name(s), converter). A row with several checkpoint
# names feeds all of them to the converter (q, k and v become one fused qkv).

# ---- Hugging Face transformers. Keys of ViTForImageClassification start with "vit." (the
# classifier does not); a bare ViTModel file has no prefix. Both are accepted.
HF_TOP = [
    # minivit (timm) name          Hugging Face name
    ("cls_token",                  "embeddings.cls_token"),
    ("pos_embed",                  "embeddings.position_embeddings"),
    ("patch_embed.proj.weight",    "embeddings.patch_embeddings.projection.weight"),
    ("patch_embed.proj.bias",      "embeddings.patch_embeddings.projection.bias"),
    ("norm.weight",                "layernorm.weight"),
    ("norm.bias",                  "layernorm.bias"),
]
HF_HEAD = [
    ("head.weight",                "classifier.weight"),
    ("head.bias",                  "classifier.bias"),
]
# Block i lives under "encoder.layer.{i}." in published checkpoints (and in the files that
# transformers 5's save_pretrained writes: it renames on the way out), but under
# "layers.{i}." with new module names in transformers 5's memory (model.state_dict()).
HF_BLOCK_PREFIX = {"published": "encoder.layer.{i}.", "transformers5": "layers.{i}."}
HF_BLOCK = [
    # minivit name      published checkpoints                         transformers 5 in memory
    ("norm1.weight",    ("layernorm_before.weight",),                 ("layernorm_before.weight",)),
    ("norm1.bias",      ("layernorm_before.bias",),                   ("layernorm_before.bias",)),
    ("attn.qkv.weight", ("attention.attention.query.weight",
                         "attention.attention.key.weight",
                         "attention.attention.value.weight"),         ("attention.q_proj.weight",
                                                                       "attention.k_proj.weight",
                                                                       "attention.v_proj.weight")),
    ("attn.qkv.bias",   ("attention.attention.query.bias",
                         "attention.attention.key.bias",
                         "attention.attention.value.bias"),           ("attention.q_proj.bias",
                                                                       "attention.k_proj.bias",
                                                                       "attention.v_proj.bias")),
    ("attn.proj.weight", ("attention.output.dense.weight",),          ("attention.o_proj.weight",)),
    ("attn.proj.bias",  ("attention.output.dense.bias",),             ("attention.o_proj.bias",)),
    ("norm2.weight",    ("layernorm_after.weight",),                  ("layernorm_after.weight",)),
    ("norm2.bias",      ("layernorm_after.bias",),                    ("layernorm_after.bias",)),
    ("mlp.fc1.weight",  ("intermediate.dense.weight",),               ("mlp.fc1.weight",)),
    ("mlp.fc1.bias",    ("intermediate.dense.bias",),                 ("mlp.fc1.bias",)),
    ("mlp.fc2.weight",  ("output.dense.weight",),                     ("mlp.fc2.weight",)),
    ("mlp.fc2.bias",    ("output.dense.bias",),                       ("mlp.fc2.bias",)),
]
# ViTModel's pooler (dense + tanh on [CLS]) is not used by ViTForImageClassification.
HF_IGNORED_PREFIXES = ("pooler.",)
# Hugging Face's activation names -> minivit's GELU kinds. "gelu" is exact (erf); the others
# are all 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), written in different ways.
HF_GELU = {
    "gelu": "exact", "gelu_python": "exact",
    "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_python_tanh": "tanh",
    "gelu_fast": "tanh", "gelu_accurate": "tanh",
}
# What transformers' ViTConfig assumes for a key that config.json leaves out.
HF_CONFIG_DEFAULTS = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
    "hidden_act": "gelu", "layer_norm_eps": 1e-12, "image_size": 224, "patch_size": 16,
    "num_channels": 3, "qkv_bias": True,
}

# ---- The paper's .npz release. Flax names a layer by its class and its position in the
# parent (LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3), and stores
# Dense kernels as (Din, Dout) and attention kernels per head.
NPZ_TOP = [
    # minivit name               npz name                                        converter
    ("cls_token",                ("cls",),                                       _same),
    ("pos_embed",                ("Transformer/posembed_input/pos_embedding",),  _same),
    ("patch_embed.proj.weight",  ("embedding/kernel",),                          _conv_hwio_to_oihw),
    ("patch_embed.proj.bias",    ("embedding/bias",),                            _same),
    ("norm.weight",              ("Transformer/encoder_norm/scale",),            _same),
    ("norm.bias",                ("Transformer/encoder_norm/bias",),             _same),
]
NPZ_HEAD = [
    ("head.weight",              ("head/kernel",),                               _dense_to_linear),
    ("head.bias",                ("head/bias",),                                 _same),
]
NPZ_BLOCK_PREFIX = "Transformer/encoderblock_{i}/"
_MHA = "MultiHeadDotProductAttention_1/"
NPZ_BLOCK = [
    ("norm1.weight",     ("LayerNorm_0/scale",),                                      _same),
    ("norm1.bias",       ("LayerNorm_0/bias",),                                       _same),
    ("attn.qkv.weight",  (_MHA + "query/kernel", _MHA + "key/kernel", _MHA + "value/kernel"), _heads_in_to_qkv),
    ("attn.qkv.bias",    (_MHA + "query/bias", _MHA + "key/bias", _MHA + "value/bias"),       _head_biases_to_qkv),
    ("attn.proj.weight", (_MHA + "out/kernel",),                                      _heads_out_to_linear),
    ("attn.proj.bias",   (_MHA + "out/bias",),                                        _same),
    ("norm2.weight",     ("LayerNorm_2/scale",),                                      _same),
    ("norm2.bias",       ("LayerNorm_2/bias",),                                       _same),
    ("mlp.fc1.weight",   ("MlpBlock_3/Dense_0/kernel",),                              _dense_to_linear),
    ("mlp.fc1.bias",     ("MlpBlock_3/Dense_0/bias",),                                _same),
    ("mlp.fc2.weight",   ("MlpBlock_3/Dense_1/kernel",),                              _dense_to_linear),
    ("mlp.fc2.bias",     ("MlpBlock_3/Dense_1/bias",),                                _same),
]

# ---- timm: minivit uses timm's names, so its table is the identity (every parameter of the
# model, under its own name). timm's files carry no config, so the number of heads, which
# no shape reveals, comes from the file's metadata, a config.json beside it, or the caller.
TIMM_HEADS_BY_ARCH = {"vit_tiny": 3, "vit_small": 6, "vit_base": 12, "vit_large": 16, "vit_huge": 16}


# ============================================================================= loading

def load_pretrained(path, num_classes: int | None = None, img_size: int | None = None, seed: int = 0,
                    heads: int | None = None, pos_resample: str = "bilinear"):
    """Build a ViT from a checkpoint in any of FORMATS (detected from the files).

    num_classes: when it differs from the checkpoint's, the head is replaced by a new one,
        zero-initialised as in the paper's fine-tuning (section 3.1: "we remove the
        pre-trained prediction head and attach a zero-initialized D x K feedforward
        layer"). Zero is safe for the last layer: all classes start equally likely and
        the head's gradient dlogits^T @ features is not zero, so it learns at once.
    img_size: when it differs, the grid of position embeddings is resampled (section 3.2): a
        learned table bilinearly by its 2-D layout (resample_pos_embed), learned2d's row and
        column embeddings each along its axis (resample_axis_embed), every relative position bias
        table as a (2G-1) x (2G-1) grid of offsets per head (resample_rel_pos_bias_table).
    pos_resample: "bilinear" (the above) or "pad", only for pos_embed="learned": the old table's
        rows kept in sequence order and zeros appended (cut for a smaller grid), what a loader that
        ignores the 2-D layout would do; a baseline for fine-tuning experiments (pad_pos_embed).
    seed: the model's random generator (dropout, drop-path).
    heads: the number of attention heads, for timm files that do not record it.

    Returns (model, meta). meta holds: format, config (the ViTConfig built), class_names
    (a list of K names, or None), mean and std (per channel, for pixels scaled to [0, 1]),
    the checkpoint's own num_classes and img_size, head ("checkpoint" or "new, zero-initialised"),
    and ignored_keys.
    """
    path = Path(path)
    fmt = detect_format(path)
    if heads is not None and (isinstance(heads, bool) or not isinstance(heads, int) or heads <= 0):
        raise ValueError(f"heads must be a positive integer, got {heads!r}")
    if not isinstance(pos_resample, str) or pos_resample not in POS_RESAMPLES:
        raise ValueError(f"pos_resample must be one of {POS_RESAMPLES}, got {pos_resample!r}")
    reader = {"hf": _read_hf, "timm": _read_timm, "npz": _read_npz}[fmt]
    config, state, origin, meta = reader(path, heads)
    if pos_resample == "pad" and config.pos_embed != "learned":
        raise ValueError(f"pos_resample='pad' pads a learned 1-D position table, but {str(path)!r} has "
                         f"pos_embed={config.pos_embed!r}; use pos_resample='bilinear'")
    model, meta = _build(config, state, origin, meta, num_classes, img_size, seed, str(path), pos_resample)
    meta["format"] = fmt
    meta["source"] = str(path)
    return model, meta


def detect_format(path) -> str:
    """'hf', 'timm' or 'npz', from the file suffix and, for safetensors, the key names."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    if path.is_dir():
        weights = path / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(
                f"{str(path)!r} is a directory without model.safetensors: expected a Hugging Face ViT "
                f"directory (config.json + model.safetensors; sharded checkpoints are not supported)"
            )
        return _format_from_names(_safetensors_keys(weights), weights)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return "npz"
    if suffix == ".safetensors":
        return _format_from_names(_safetensors_keys(path), path)
    if suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
        raise ValueError(
            f"{str(path)!r} is a pickle-based PyTorch file; minivit does not unpickle (it can run "
            f"arbitrary code). Convert it to safetensors first."
        )
    raise ValueError(
        f"cannot tell the format of {str(path)!r}: expected a Hugging Face directory (config.json + "
        f"model.safetensors), a .safetensors file (timm or Hugging Face names) or an .npz file (the paper's release)"
    )


def _format_from_names(names, path) -> str:
    if "patch_embed.proj.weight" in names:
        return "timm"
    if any(n.startswith(("vit.embeddings.", "embeddings.")) for n in names):
        return "hf"
    raise ValueError(
        f"{str(path)!r} holds neither timm's names (patch_embed.proj.weight, blocks.0.attn.qkv.weight, ...) "
        f"nor Hugging Face's (vit.embeddings.*); its first keys are {sorted(names)[:5]}"
    )


# ----------------------------------------------------------------------------- file readers

def _safetensors_keys(path):
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="np") as f:
            return list(f.keys())
    except Exception as exc:   # safetensors raises its own error type for a corrupt header
        raise ValueError(f"cannot read {str(path)!r} as safetensors: {exc}") from None


def _read_safetensors(path):
    """(tensors, metadata) from a safetensors file, through the NumPy API (no torch, no pickle)."""
    from safetensors import safe_open
    tensors = {}
    try:
        with safe_open(str(path), framework="np") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except Exception as exc:   # e.g. bfloat16, which NumPy has no type for
        raise ValueError(f"cannot read {str(path)!r} as safetensors: {exc}") from None
    return tensors, metadata


def _read_json(path, what):
    """The JSON object ({...}) in a file; ValueError naming the file for anything else."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {str(path)!r} is not UTF-8 text, so not JSON (a binary file?): {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} {str(path)!r} must hold a JSON object ({{\"key\": value, ...}}), "
                         f"got a JSON {_json_type(value)}")
    return value


def _json_type(value):
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _dig(d, *keys):
    """d[k1][k2]... where every step is a dict that has the key; None otherwise."""
    for key in keys:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _block_indices(names, prefix):
    """The block numbers i of names that start with prefix + "{i}.", e.g. blocks.3.norm1.weight -> 3."""
    found = set()
    for name in names:
        if name.startswith(prefix):
            head = name[len(prefix):].split(".", 1)[0].split("/", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return found


def _check_depth(depth, blocks, what, where):
    """A depth the file's config states must be the number of blocks its weights hold, checked before
    anything loops over `depth` (a config.json saying 10**7 layers would otherwise cost minutes)."""
    if depth != len(blocks):
        held = f"blocks {min(blocks)}..{max(blocks)}" if blocks else "no blocks"
        raise ValueError(f"{where}: {what}={depth}, but the weights hold {len(blocks)} block(s) ({held}); "
                         f"the config and the weights do not belong together")


def _read_hf(path, heads):
    """A Hugging Face ViT: config.json for the sizes, model.safetensors for the weights."""
    folder = path if path.is_dir() else path.parent
    weights = path if path.is_file() else folder / "model.safetensors"
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"Hugging Face checkpoint {str(weights)!r} needs config.json beside it; "
                                f"none found at {str(config_path)!r}")
    hf = {**HF_CONFIG_DEFAULTS, **_read_json(config_path, "config")}
    if hf.get("model_type", "vit") != "vit":
        raise ValueError(f"{str(config_path)!r} describes model_type={hf['model_type']!r}; only 'vit' is supported")
    tensors, _ = _read_safetensors(weights)
    # Strip ViTForImageClassification's "vit." prefix (the classifier sits outside it);
    # `spelled` puts it back for messages, so they name keys as the file has them.
    prefixed = any(k.startswith("vit.") for k in tensors)
    tensors = {k[4:] if k.startswith("vit.") else k: v for k, v in tensors.items()}

    def spelled(k):
        return "vit." + k if prefixed and not k.startswith("classifier.") else k

    ignored = sorted(k for k in tensors if k.startswith(HF_IGNORED_PREFIXES))
    for k in ignored:
        del tensors[k]
    naming = "transformers5" if any(k.startswith("layers.") for k in tensors) else "published"

    act = hf["hidden_act"]
    if not isinstance(act, str) or act not in HF_GELU:
        raise ValueError(f"{str(config_path)!r}: hidden_act={act!r} is not supported; "
                         f"minivit has GELU in two forms, from {sorted(HF_GELU)}")
    if heads is not None and heads != hf["num_attention_heads"]:
        raise ValueError(f"heads={heads} disagrees with num_attention_heads={hf['num_attention_heads']} "
                         f"in {str(config_path)!r}")
    head_w = tensors.get("classifier.weight")
    try:
        config = ViTConfig(
            img_size=_square(hf["image_size"], "image_size", config_path),
            patch_size=_square(hf["patch_size"], "patch_size", config_path),
            in_chans=hf["num_channels"],
            num_classes=int(head_w.shape[0]) if head_w is not None and head_w.ndim == 2 else 0,
            dim=hf["hidden_size"],
            depth=hf["num_hidden_layers"],
            heads=hf["num_attention_heads"],
            mlp_dim=_mlp_dim(hf["intermediate_size"], hf["hidden_size"]),
            qkv_bias=bool(hf["qkv_bias"]),
            gelu=HF_GELU[act],
            ln_eps=float(hf["layer_norm_eps"]),
        )
    except (ValueError, TypeError, OverflowError) as exc:   # e.g. "hidden_size": "big", or 1e999 (inf)
        raise ValueError(f"{str(config_path)!r} does not describe a ViT minivit can build: {exc}") from None
    _check_depth(config.depth, _block_indices(tensors, HF_BLOCK_PREFIX[naming].split("{")[0]),
                 "num_hidden_layers", f"{str(config_path)!r} with {str(weights)!r}")

    rows = [(name, (hf_name,), _same) for name, hf_name in HF_TOP]
    if config.num_classes:
        rows += [(name, (hf_name,), _same) for name, hf_name in HF_HEAD]
    column = 1 if naming == "published" else 2
    for i in range(config.depth):
        prefix = HF_BLOCK_PREFIX[naming].format(i=i)
        for row in HF_BLOCK:
            if row[0] == "attn.qkv.bias" and not config.qkv_bias:
                continue
            names = tuple(prefix + n for n in row[column])
            rows.append((f"blocks.{i}.{row[0]}", names, _stack_rows if len(names) == 3 else _same))
    state, origin = _apply_table(tensors, rows, f"Hugging Face checkpoint {str(weights)!r}", rename=spelled)

    # Class names and the pixel normalisation the checkpoint was trained with.
    id2label = hf.get("id2label") or {}
    if not isinstance(id2label, dict):
        raise ValueError(f"{str(config_path)!r}: id2label must be a JSON object from class index to name "
                         f"({{\"0\": \"tench\", \"1\": \"goldfish\", ...}}), got a JSON {_json_type(id2label)}")
    names = None
    if config.num_classes and len(id2label) == config.num_classes:
        names = [str(id2label.get(str(i), f"class {i}")) for i in range(config.num_classes)]
    mean, std = DEFAULT_MEAN, DEFAULT_STD
    pre_path = folder / "preprocessor_config.json"
    if pre_path.is_file():
        pre = _read_json(pre_path, "preprocessor config")
        mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
    meta = {"class_names": names, "mean": mean, "std": std, "ignored_keys": [spelled(k) for k in ignored],
            "naming": naming}
    return config, state, origin, meta


def _read_timm(path, heads):
    """A timm-layout safetensors file. The config comes from, in order of precedence: the
    `heads` argument; the file's metadata ("minivit_config", a JSON dict of ViTConfig fields,
    as save_pretrained writes); a config.json beside the file (timm's hub format); the
    tensor shapes; timm's defaults (LayerNorm eps 1e-6, exact GELU)."""
    tensors, metadata = _read_safetensors(path)
    where = f"timm checkpoint {str(path)!r}"
    fields = _timm_shapes(tensors, where)
    beside = path.parent / "config.json"
    side = _read_json(beside, "config") if beside.is_file() else {}
    try:
        side_heads = _timm_heads_from_config(side)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ValueError(f"config {str(beside)!r}: the number of heads is not an integer ({exc})") from None
    if side_heads is not None:
        fields["heads"] = side_heads
    if "minivit_config" in metadata:
        try:
            saved = json.loads(metadata["minivit_config"])
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: metadata 'minivit_config' is not valid JSON: {exc}") from None
        if not isinstance(saved, dict):
            raise ValueError(f"{where}: metadata 'minivit_config' must be a JSON object, got {saved!r}")
        fields.update(saved)
    if heads is not None:
        if "heads" in fields and fields["heads"] != heads:
            raise ValueError(f"heads={heads} disagrees with heads={fields['heads']} recorded for {where}")
        fields["heads"] = heads
    if "heads" not in fields:
        raise ValueError(
            f"{where}: the number of attention heads cannot be read from tensor shapes (qkv is (3D, D) "
            f"for any H). Pass heads=... to load_pretrained, or put it in the file's metadata "
            f"(minivit_config) or in a config.json beside the file"
        )
    try:
        config = ViTConfig().replace(**fields)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ValueError(f"{where}: its recorded config does not describe a ViT minivit can build: {exc}") from None
    _check_depth(config.depth, _block_indices(tensors, "blocks."), "depth", where)
    # minivit's names are timm's: one identity row per parameter of the model this config builds.
    state, origin = _apply_table(tensors, _timm_rows(config), where)

    mean = _json_meta(metadata, "mean", where) or _dig(side, "pretrained_cfg", "mean") or DEFAULT_MEAN
    std = _json_meta(metadata, "std", where) or _dig(side, "pretrained_cfg", "std") or DEFAULT_STD
    names = _json_meta(metadata, "class_names", where) or _dig(side, "label_names") \
        or _dig(side, "pretrained_cfg", "label_names")
    if not isinstance(names, list) or len(names) != config.num_classes:
        names = None
    notes = _json_meta(metadata, "minivit_notes", where)
    meta = {"class_names": None if names is None else [str(n) for n in names], "mean": mean, "std": std,
            "ignored_keys": [], "notes": notes if isinstance(notes, dict) else None}
    return config, state, origin, meta


def _timm_rows(config):
    """The identity table: every parameter name of ViT(config), in model order."""
    return [(n, (n,), _same) for n in parameter_shapes(config)]


def parameter_shapes(config: ViTConfig) -> dict:
    """{name: shape} of every parameter of ViT(config), in model order, from the config alone.

    Listed here rather than read from a ViT built for the purpose, which would allocate (and
    initialise) every weight: a file's config is checked against its tensors with this before
    anything is built. A test checks it against ViT(config).named_parameters(). Loops over
    config.depth: check the depth against the blocks a file holds first.
    """
    C, P, N, D, F, K = config.in_chans, config.patch_size, config.num_tokens, config.dim, config.hidden_dim, \
        config.num_classes
    G, H = config.grid_size, config.heads
    shapes = {"cls_token": (1, 1, D)}
    if config.pos_embed == "learned":
        shapes["pos_embed"] = (1, N, D)
    elif config.pos_embed == "learned2d":
        shapes.update({"pos_embed_row": (G, D // 2), "pos_embed_col": (G, D // 2), "pos_embed_cls": (1, 1, D)})
    shapes.update({"patch_embed.proj.weight": (D, C, P, P), "patch_embed.proj.bias": (D,)})
    block = {"norm1.weight": (D,), "norm1.bias": (D,)}
    if config.pos_embed == "relative":
        block["attn.relative_position_bias_table"] = ((2 * G - 1) ** 2 + 3, H)
    block["attn.qkv.weight"] = (3 * D, D)
    if config.qkv_bias:
        block["attn.qkv.bias"] = (3 * D,)
    block.update({"attn.proj.weight": (D, D), "attn.proj.bias": (D,), "norm2.weight": (D,), "norm2.bias": (D,),
                  "mlp.fc1.weight": (F, D), "mlp.fc1.bias": (F,), "mlp.fc2.weight": (D, F), "mlp.fc2.bias": (D,)})
    for i in range(config.depth):
        shapes.update({f"blocks.{i}.{n}": shape for n, shape in block.items()})
    shapes.update({"norm.weight": (D,), "norm.bias": (D,)})
    if K:
        shapes.update({"head.weight": (K, D), "head.bias": (K,)})
    return shapes


def check_parameter_shapes(config: ViTConfig, shapes: dict, where: str, spell=repr) -> dict:
    """ValueError unless `shapes` ({parameter name: shape}) are exactly the parameters of ViT(config).

    Checks names and shapes only, so it runs before any weight is read or any model is built: a
    file is never trusted to size an allocation its own tensors do not back (a 24 KB file whose
    config says D=2048 would otherwise cost GBs before "missing keys"; a zero-size tensor such as
    a (1, 9000001, 0) pos_embed holds no data but would size the model). Also refuses a config
    with more than MAX_TOKENS tokens. spell(name) names a parameter as the file does.
    Returns parameter_shapes(config).
    """
    _check_depth(config.depth, _block_indices(shapes, "blocks."), "depth", where)
    expected = parameter_shapes(config)
    missing = [n for n in expected if n not in shapes]
    unexpected = [n for n in shapes if n not in expected]
    if missing or unexpected:
        raise ValueError(f"{where}: the weights do not match the config: missing "
                         f"{[spell(n) for n in missing[:6]]}{' ...' * (len(missing) > 6)}, unexpected "
                         f"{[spell(n) for n in unexpected[:6]]}{' ...' * (len(unexpected) > 6)}")
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise ValueError(
                f"{where}: {spell(name)} has shape {tuple(shapes[name])}, but the config (dim={config.dim}, "
                f"heads={config.heads}, depth={config.depth}, mlp={config.hidden_dim}, img_size={config.img_size}, "
                f"patch_size={config.patch_size}, classes={config.num_classes}) needs {shape}")
    check_tokens(config, where)
    return expected


def check_tokens(config: ViTConfig, where: str):
    """ValueError when the config has more than MAX_TOKENS tokens (img_size is not backed by any
    tensor when the position embedding is fixed or absent)."""
    if config.num_tokens > MAX_TOKENS:
        raise ValueError(f"{where}: img_size={config.img_size} with patch_size={config.patch_size} gives "
                         f"{config.num_tokens} tokens, more than the {MAX_TOKENS} any model here can run "
                         f"(one head's attention scores for one image would take "
                         f"{4 * config.num_tokens ** 2 / 2**30:.0f} GiB)")


def _timm_shapes(tensors, where):
    """Every ViTConfig field that the tensor shapes reveal (everything but heads)."""
    w = _need(tensors, "patch_embed.proj.weight", 4, where)            # (D, C, P, P)
    D, C, P, P2 = w.shape
    if P != P2:
        raise ValueError(f"{where}: 'patch_embed.proj.weight' has non-square patches {tuple(w.shape)}")
    fields = {"dim": int(D), "in_chans": int(C), "patch_size": int(P)}
    table = "blocks.0.attn.relative_position_bias_table"
    if "pos_embed" in tensors:
        fields["img_size"] = _grid_side(_need(tensors, "pos_embed", 3, where), "pos_embed", where) * P
    elif "pos_embed_row" in tensors:
        fields["pos_embed"] = "learned2d"
        fields["img_size"] = int(_need(tensors, "pos_embed_row", 2, where).shape[0]) * P
    elif table in tensors:
        fields["pos_embed"] = "relative"
        fields["img_size"] = _rel_table_grid(_need(tensors, table, 2, where), table, where) * P
    else:
        fields["pos_embed"] = "none"   # unless the metadata says sincos2d
    blocks = {int(k.split(".")[1]) for k in tensors if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if not blocks:
        raise KeyError(f"{where}: no 'blocks.0.*' keys: a ViT needs at least one block")
    fields["depth"] = max(blocks) + 1
    fields["mlp_dim"] = _mlp_dim(int(_need(tensors, "blocks.0.mlp.fc1.weight", 2, where).shape[0]), D)
    fields["qkv_bias"] = "blocks.0.attn.qkv.bias" in tensors
    fields["num_classes"] = int(_need(tensors, "head.weight", 2, where).shape[0]) if "head.weight" in tensors else 0
    return fields


def _timm_heads_from_config(side):
    """Heads from a timm hub config.json: model_args.num_heads, num_heads, or the architecture name."""
    for value in (_dig(side, "model_args", "num_heads"), side.get("num_heads"), side.get("heads")):
        if value is not None:
            return int(value)
    arch = str(side.get("architecture", ""))
    for stem, h in TIMM_HEADS_BY_ARCH.items():
        if arch.startswith(stem + "_"):
            return h
    return None


def _read_npz(path, heads):
    """The paper's release: Flax parameter names, '/'-separated, in an .npz archive."""
    where = f"npz checkpoint {str(path)!r}"
    # An .npz is compressed: a 1 MB file can hold a 1 GiB array of zeros. So the config is read
    # from the arrays' .npy headers first, checked, and only then are the arrays it needs read.
    try:
        headers = read_npz_headers(path)
    except ValueError as exc:
        raise ValueError(f"cannot read {where}: {exc}") from None
    # Checkpoints saved from a training state nest everything under opt/target/ (the optimiser's
    # state beside it is never read).
    stored = {k: k for k in headers}                     # our name -> the file's entry name
    if any(k.startswith("opt/target/") for k in headers):
        stored = {k[len("opt/target/"):]: k for k in headers if k.startswith("opt/target/")}
    tensors = {k: headers[v] for k, v in stored.items()}   # headers now, arrays further down
    if any(k.startswith("pre_logits/") for k in tensors):
        raise ValueError(
            f"{where} has a 'pre_logits' layer (a dense + tanh before the head, used in ImageNet-21k "
            f"pre-training); minivit's ViT has none. Use a fine-tuned checkpoint, which drops it"
        )
    kernel = _need(tensors, "embedding/kernel", 4, where)                 # (P, P, C, D)
    P, P2, C, D = kernel.shape
    if P != P2:
        raise ValueError(f"{where}: 'embedding/kernel' has non-square patches {tuple(kernel.shape)}")
    pos = _need(tensors, "Transformer/posembed_input/pos_embedding", 3, where)
    G = _grid_side(pos, "Transformer/posembed_input/pos_embedding", where)
    blocks = {k.split("/")[1] for k in tensors if k.startswith("Transformer/encoderblock_")}
    depth = len(blocks)
    if depth == 0:
        raise KeyError(f"{where}: no 'Transformer/encoderblock_0/*' keys: a ViT needs at least one block")
    first = NPZ_BLOCK_PREFIX.format(i=0)
    q = _need(tensors, first + _MHA + "query/kernel", 3, where)             # (D, H, hs)
    if heads is not None and heads != q.shape[1]:
        raise ValueError(f"heads={heads} disagrees with the {q.shape[1]} heads of {where}")
    mlp = _need(tensors, first + "MlpBlock_3/Dense_0/kernel", 2, where)    # (D, F)
    head = tensors.get("head/kernel")
    try:
        config = ViTConfig(
            img_size=G * P, patch_size=int(P), in_chans=int(C), dim=int(D), depth=depth, heads=int(q.shape[1]),
            mlp_dim=_mlp_dim(int(mlp.shape[1]), D),
            num_classes=int(head.shape[1]) if head is not None and head.ndim == 2 else 0,
            qkv_bias=True,
            # The release was trained with Flax's nn.gelu, whose default is the tanh approximation
            # (jax.nn.gelu(approximate=True)). timm and transformers run the same weights with exact
            # GELU; the two differ by less than 1e-3 per activation.
            gelu="tanh",
            ln_eps=1e-6,          # Flax's LayerNorm default
        )
    except ValueError as exc:     # e.g. a zero-size kernel gives dim=0
        raise ValueError(f"{where}: its array shapes do not describe a ViT minivit can build: {exc}") from None
    rows = [(name, names, conv) for name, names, conv in NPZ_TOP]
    if config.num_classes:
        rows += [(name, names, conv) for name, names, conv in NPZ_HEAD]
    for i in range(depth):
        prefix = NPZ_BLOCK_PREFIX.format(i=i)
        rows += [(f"blocks.{i}.{name}", tuple(prefix + n for n in names), conv) for name, names, conv in NPZ_BLOCK]
    # Before reading: every key used, none left over, and each row holding exactly as many numbers
    # as the parameter it becomes (the converters only transpose, reshape and concatenate).
    _check_table(tensors, rows, where)
    expected = parameter_shapes(config)
    for name, sources, _ in rows:
        held = sum(tensors[s].size for s in sources)
        if held != math.prod(expected[name]):
            shapes = ", ".join(f"{s!r} {tensors[s].shape}" for s in sources)
            raise ValueError(f"{where}: {shapes} hold {held} numbers, but minivit's {name!r} needs "
                             f"{expected[name]} ({math.prod(expected[name])} numbers) for the config "
                             f"read from the file (dim={config.dim}, depth={config.depth}, heads={config.heads})")
    try:
        with np.load(path, allow_pickle=False) as archive:
            tensors = {k: archive[stored[k]] for k in tensors}
    except Exception as exc:   # a damaged member: BadZipFile (CRC), EOFError, ValueError (short data) ...
        raise ValueError(f"cannot read {where} as an .npz archive: {exc}") from None
    state, origin = _apply_table(tensors, rows, where)
    meta = {"class_names": None, "mean": DEFAULT_MEAN, "std": DEFAULT_STD, "ignored_keys": []}
    return config, state, origin, meta


# ----------------------------------------------------------------------------- shared helpers

def _apply_table(tensors, rows, where, rename=lambda k: k):
    """Build minivit's state dict from a checkpoint's tensors, one table row at a time.

    rows: (minivit name, checkpoint names, converter). Returns (state, origin): origin names
    the checkpoint key(s) behind each entry, for error messages. Every checkpoint key must
    be used by some row; leftovers are an error rather than silently dropped weights.
    rename turns a key back into the spelling the file uses, for messages.
    """
    _check_table(tensors, rows, where, rename)
    state, origin = {}, {}
    for name, sources, convert in rows:
        arrays = [tensors[s] for s in sources]
        try:
            state[name] = np.ascontiguousarray(convert(*arrays))
        except ValueError as exc:
            shapes = ", ".join(f"{rename(s)!r} {tuple(a.shape)}" for s, a in zip(sources, arrays))
            raise ValueError(f"{where}: cannot convert {shapes} into minivit's {name!r}: {exc}") from None
        origin[name] = " + ".join(repr(rename(s)) for s in sources)
    return state, origin


def _check_table(tensors, rows, where, rename=lambda k: k):
    """KeyError / TypeError unless the rows use every key of `tensors` (arrays, or _NpyHeaders
    before the arrays are read), each of which exists and is numeric."""
    used = set()
    for name, sources, _ in rows:
        for s in sources:
            if s not in tensors:
                raise KeyError(f"{where}: missing key {rename(s)!r} (needed for minivit's {name!r})")
            if tensors[s].dtype.kind not in "fiu":
                raise TypeError(f"{where}: {rename(s)!r} has non-numeric dtype {tensors[s].dtype}")
        used.update(sources)
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        shown = [rename(k) for k in unexpected[:6]] + (["..."] if len(unexpected) > 6 else [])
        raise KeyError(f"{where}: unexpected key(s) {shown}: minivit's ViT has no matching parameter "
                       f"(a different architecture, or a layer minivit does not implement)")


class _NpyHeader:
    """What the .npy header of an array says (shape and dtype): enough to check the array before
    reading it. Has the attributes the config code reads from arrays."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(int(n) for n in shape), np.dtype(dtype)

    ndim = property(lambda self: len(self.shape))
    size = property(lambda self: math.prod(self.shape))
    nbytes = property(lambda self: self.size * self.dtype.itemsize)


_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def read_npz_headers(path) -> dict:
    """{entry name: _NpyHeader} for every array of an .npz, read from the .npy headers alone:
    nothing is decompressed beyond the first few hundred bytes of each member, so a compressed
    bomb costs nothing here. Names as np.load gives them (without ".npy"). ValueError for a
    file that is not an .npz of plain numeric arrays; the message says what is wrong."""
    headers = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                with archive.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version not in _NPY_HEADER_READERS:
                        raise ValueError(f"entry {key!r} is a version {version} .npy array; expected 1.0 or 2.0")
                    shape, _, dtype = _NPY_HEADER_READERS[version](f)
                if dtype.hasobject:
                    raise ValueError(f"entry {key!r} holds Python objects (dtype {dtype}), which only unpickling "
                                     f"could rebuild; minivit never unpickles (allow_pickle=False)")
                headers[key] = _NpyHeader(shape, dtype)
    except ValueError:
        raise
    except Exception as exc:   # BadZipFile, EOFError, OSError, zlib.error, ... for a damaged archive
        raise ValueError(f"not a readable .npz archive ({type(exc).__name__}: {exc})") from None
    return headers


def _need(tensors, key, ndim, where):
    if key not in tensors:
        raise KeyError(f"{where}: missing key {key!r}")
    a = tensors[key]
    if a.ndim != ndim:
        raise ValueError(f"{where}: {key!r} should have {ndim} axes, got shape {tuple(a.shape)}")
    return a


def _grid_side(pos, key, where):
    """G from position embeddings (1, 1 + G*G, D)."""
    n = pos.shape[1] - 1
    G = math.isqrt(max(n, 0))
    if pos.shape[0] != 1 or n < 1 or G * G != n:
        raise ValueError(f"{where}: {key!r} has shape {tuple(pos.shape)}; expected (1, 1 + G*G, D): "
                         f"one [CLS] position plus a square grid of patch positions")
    return G


def _square(value, name, where):
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{str(where)!r}: {name}={value!r}; minivit supports square images and patches only")
        value = value[0]
    return int(value)


def _mlp_dim(hidden, dim):
    """None when the MLP has the usual 4 x D width (so the config matches the presets)."""
    return None if int(hidden) == 4 * int(dim) else int(hidden)


def _json_meta(metadata, key, where):
    if key not in metadata:
        return None
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: metadata {key!r} is not valid JSON: {exc}") from None


def _channel_stats(value, channels, name):
    """mean/std as a tuple with one float per channel (a single number is repeated)."""
    values = [float(value)] * channels if np.isscalar(value) else [float(v) for v in value]
    if len(values) != channels:
        raise ValueError(f"{name} has {len(values)} values for {channels} channels")
    return tuple(values)


def _build(config, state, origin, meta, num_classes, img_size, seed, source, pos_resample="bilinear"):
    """A ViT for `config` (with a new head / image size if asked), filled from `state`.

    Everything about the file is checked before the model is built: its tensors must be exactly
    the parameters its config describes (so the file's own data backs every allocation) and hold
    finite numbers only (NaN weights would give NaN for every prediction)."""
    def spell(name):       # the file's key(s), and minivit's name where it differs
        return origin[name] if origin[name] == repr(name) else f"{origin[name]} (minivit's {name!r})"

    check_parameter_shapes(config, {name: value.shape for name, value in state.items()}, repr(source), spell)
    for name, value in state.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            bad = int(value.size - np.isfinite(value).sum())
            raise ValueError(f"{source!r}: {spell(name)} holds {bad} non-finite value(s) (NaN or infinity) of "
                             f"{value.size}; refused, as NaN weights make every prediction NaN")
    try:
        mean = _channel_stats(meta["mean"], config.in_chans, "mean")
        std = _channel_stats(meta["std"], config.in_chans, "std")
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{source!r}: the normalisation it records is not usable: {exc}") from None
    overrides = {}
    if num_classes is not None and num_classes != config.num_classes:
        overrides["num_classes"] = num_classes
    if img_size is not None and img_size != config.img_size:
        overrides["img_size"] = img_size
    target = config.replace(**overrides)     # validates: e.g. img_size must be a multiple of patch_size
    model = ViT(target, seed=seed)
    params = dict(model.named_parameters())

    if "num_classes" in overrides:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        if model.head is not None:           # the paper's fine-tuning head: all zeros
            model.head.weight.data[...] = 0.0
            model.head.bias.data[...] = 0.0
    if "img_size" in overrides:
        _resample_positions(state, origin, config.grid_size, target.grid_size, pos_resample)
    model.load_state_dict(state, strict=False)    # names and shapes were checked above
    missing = [n for n in params if n not in state and not n.startswith("head.")]
    if missing:   # cannot happen for a table built from the config; kept as a guard
        raise KeyError(f"checkpoint gives no value for {missing}")

    meta = dict(meta)
    meta.update(
        config=target,
        checkpoint_num_classes=config.num_classes,
        checkpoint_img_size=config.img_size,
        head="new, zero-initialised" if "num_classes" in overrides else "checkpoint",
        mean=mean,
        std=std,
    )
    if "num_classes" in overrides:
        meta["class_names"] = None
    return model, meta


# ============================================================================= position embeddings

def _linear_taps(n_in, n_out):
    """For each of n_out output positions: the two input positions it reads and the weight of
    the second, as torch.nn.functional.interpolate(mode="bilinear", align_corners=False) does.

    align_corners=False treats positions as the centres of n equal cells covering [0, n):
    output cell j has its centre at (j + 0.5) * n_in / n_out in input units, i.e. at input
    position (j + 0.5) * n_in / n_out - 0.5. Positions left of the first centre are clamped
    to it (torch clamps negatives to 0); right of the last, both taps are the last cell.
    """
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0                                        # weight of i1; 1 - frac is that of i0
    return i0, i1, frac


def resample_pos_embed(pos_embed, new_grid: int):
    """Position embeddings (1, 1 + G*G, D) for a G x G grid -> (1, 1 + G2*G2, D) for G2 x G2.

    The paper (section 3.2) fine-tunes at a higher resolution than it pre-trains: the patches
    stay P x P, so there are more of them, and the pre-trained position embeddings are
    interpolated in 2D according to their place in the image. The [CLS] embedding has no
    place in the image and is kept as is. Bilinear, with the same sampling positions as
    torch's interpolate(mode="bilinear", align_corners=False), which timm uses (with bicubic
    by default). Bilinear is separable: interpolate along rows, then along columns.
    """
    xp = get_array_module(pos_embed)
    if not hasattr(pos_embed, "ndim") or pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, 1 + G*G, D), got {getattr(pos_embed, 'shape', pos_embed)!r}")
    if isinstance(new_grid, bool) or not isinstance(new_grid, (int, np.integer)) or new_grid <= 0:
        raise ValueError(f"new_grid must be a positive integer (patches per side), got {new_grid!r}")
    G = _grid_side(pos_embed, "pos_embed", "resample_pos_embed")
    D = pos_embed.shape[2]
    cls_pos = pos_embed[:, :1]                                     # (1, 1, D)
    grid = pos_embed[0, 1:].reshape(G, G, D).astype(xp.float64)   # (G, G, D), row-major like the patches
    r0, r1, rf = (xp.asarray(a) for a in _linear_taps(G, new_grid))
    grid = grid[r0] * (1 - rf)[:, None, None] + grid[r1] * rf[:, None, None]              # (G2, G, D)
    grid = grid[:, r0] * (1 - rf)[None, :, None] + grid[:, r1] * rf[None, :, None]        # (G2, G2, D)
    grid = grid.reshape(1, new_grid * new_grid, D).astype(pos_embed.dtype)               # (1, G2*G2, D)
    return xp.concatenate([cls_pos, grid], axis=1)                                        # (1, 1 + G2*G2, D)


def resample_axis_embed(table, new_grid: int):
    """One axis's learned embeddings (G, d), a vector per patch row (or column), -> (G2, d):
    linear interpolation at the sampling positions resample_pos_embed uses along that axis
    (torch's align_corners=False). For pos_embed="learned2d" this is the whole resampling:
    bilinear interpolation of a table whose rows depend on one axis only is this 1-D one."""
    xp = get_array_module(table)
    if not hasattr(table, "ndim") or table.ndim != 2 or table.shape[0] < 1:
        raise ValueError(f"an axis embedding must have shape (G, D/2), got {getattr(table, 'shape', table)!r}")
    if isinstance(new_grid, bool) or not isinstance(new_grid, (int, np.integer)) or new_grid <= 0:
        raise ValueError(f"new_grid must be a positive integer (patches per side), got {new_grid!r}")
    i0, i1, frac = (xp.asarray(a) for a in _linear_taps(table.shape[0], new_grid))
    t = table.astype(xp.float64)
    out = t[i0] * (1 - frac)[:, None] + t[i1] * frac[:, None]                   # (G2, d)
    return out.astype(table.dtype)


def _rel_table_grid(table, key, where):
    """G from a relative position bias table ((2G-1)^2 + 3, H)."""
    side = math.isqrt(max(table.shape[0] - 3, 0))
    if side * side != table.shape[0] - 3 or side % 2 == 0:
        raise ValueError(f"{where}: {key!r} has shape {tuple(table.shape)}; expected ((2G-1)^2 + 3, H): one row "
                         f"per 2-D offset between two patches of a G x G grid, plus 3 for [CLS]")
    return (side + 1) // 2


def resample_rel_pos_bias_table(table, new_grid: int):
    """A relative position bias table ((2G-1)^2 + 3, H) -> ((2G2-1)^2 + 3, H) for a G2 x G2 grid.

    Each head's first (2G-1)^2 rows are a (2G-1) x (2G-1) image of biases, one pixel per 2-D
    offset (dy, dx) in row-major order (see ops.relative_position_index); it is resized
    bilinearly to (2G2-1) x (2G2-1) with the sampling positions of resample_pos_embed (torch's
    align_corners=False), as timm's resize_rel_pos_bias_table_simple does. Offset (0, 0) stays
    at the centre. The 3 [CLS] rows have no offset and are kept as they are.
    """
    xp = get_array_module(table)
    if not hasattr(table, "ndim") or table.ndim != 2:
        raise ValueError(f"a relative position bias table must have shape ((2G-1)^2 + 3, H), "
                         f"got {getattr(table, 'shape', table)!r}")
    if isinstance(new_grid, bool) or not isinstance(new_grid, (int, np.integer)) or new_grid <= 0:
        raise ValueError(f"new_grid must be a positive integer (patches per side), got {new_grid!r}")
    G = _rel_table_grid(table, "table", "resample_rel_pos_bias_table")
    width, new_width, H = 2 * G - 1, 2 * new_grid - 1, table.shape[1]
    grid = table[:-3].reshape(width, width, H).astype(xp.float64)               # (2G-1, 2G-1, H): [dy, dx, h]
    r0, r1, rf = (xp.asarray(a) for a in _linear_taps(width, new_width))
    grid = grid[r0] * (1 - rf)[:, None, None] + grid[r1] * rf[:, None, None]    # (2G2-1, 2G-1, H)
    grid = grid[:, r0] * (1 - rf)[None, :, None] + grid[:, r1] * rf[None, :, None]   # (2G2-1, 2G2-1, H)
    grid = grid.reshape(new_width * new_width, H).astype(table.dtype)
    return xp.concatenate([grid, table[-3:]], axis=0)                           # ((2G2-1)^2 + 3, H)


def pad_pos_embed(pos_embed, new_grid: int):
    """A learned 1-D table (1, 1 + G*G, D) -> (1, 1 + G2*G2, D) by sequence position alone: the
    first min(1 + G*G, 1 + G2*G2) rows kept in raster order, zeros after them.

    What a loader that ignores the 2-D layout does: for G2 > G the old rows of patch row 1 land
    in the new grid's row 0 (and so on), and the new patches get no position at all. A baseline
    for the fine-tuning experiment of the paper's section 3.2, not a way to fine-tune."""
    xp = get_array_module(pos_embed)
    if not hasattr(pos_embed, "ndim") or pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, 1 + G*G, D), got {getattr(pos_embed, 'shape', pos_embed)!r}")
    if isinstance(new_grid, bool) or not isinstance(new_grid, (int, np.integer)) or new_grid <= 0:
        raise ValueError(f"new_grid must be a positive integer (patches per side), got {new_grid!r}")
    _grid_side(pos_embed, "pos_embed", "pad_pos_embed")
    n = 1 + int(new_grid) ** 2
    out = xp.zeros((1, n, pos_embed.shape[2]), pos_embed.dtype)                 # (1, 1 + G2*G2, D)
    keep = min(n, pos_embed.shape[1])
    out[:, :keep] = pos_embed[:, :keep]
    return out


def _resample_positions(state, origin, old, new, pos_resample):
    """Bring every position parameter in `state` from a G x G grid (old) to new x new, in place."""
    note = f" (resampled from {old}x{old} to {new}x{new})"
    if "pos_embed" in state:
        if pos_resample == "pad":
            state["pos_embed"] = pad_pos_embed(state["pos_embed"], new)
            origin["pos_embed"] += f" (padded by sequence position from {old}x{old} to {new}x{new})"
        else:
            state["pos_embed"] = resample_pos_embed(state["pos_embed"], new)
            origin["pos_embed"] += note
    for name in ("pos_embed_row", "pos_embed_col"):
        if name in state:
            state[name] = resample_axis_embed(state[name], new)
            origin[name] += note
    for name in [n for n in state if n.endswith(".attn.relative_position_bias_table")]:
        state[name] = resample_rel_pos_bias_table(state[name], new)
        origin[name] += note


# ============================================================================= saving

def save_pretrained(model, path, format: str = "timm", class_names=None, mean=None, std=None,
                    dtype=None, notes: dict | None = None):
    """Write a ViT's weights so that minivit, timm or transformers can read them back.

    format="timm": one safetensors file at `path` with minivit's (timm's) names; the config,
        class names and normalisation go into the file's metadata as JSON.
    format="hf": a directory at `path` with config.json, model.safetensors (the published
        checkpoints' names) and preprocessor_config.json, which
        transformers.ViTForImageClassification.from_pretrained loads. Needs a [CLS]-pooled
        model with a head; sin-cos position embeddings are written as learned ones.
    dtype: "float16" stores the weights at half size (as the lessons' shipped weights are);
        loading casts them back to float32. Default: the model's own dtype.
    notes: a JSON-able dict kept in the file's metadata (timm format), e.g. how the weights
        were made and what they scored; load_pretrained returns it as meta["notes"].

    Each file is written to a temporary name and renamed into place (os.replace), so a
    crash never leaves a half-written file behind under the real name. Returns the path.
    """
    if not isinstance(model, ViT):
        raise TypeError(f"save_pretrained expects a minivit ViT, got {type(model).__name__}")
    if format not in SAVE_FORMATS:
        raise ValueError(f"format must be one of {SAVE_FORMATS}, got {format!r}")
    cfg = model.config
    mean = _channel_stats(DEFAULT_MEAN if mean is None else mean, cfg.in_chans, "mean")
    std = _channel_stats(DEFAULT_STD if std is None else std, cfg.in_chans, "std")
    if class_names is not None:
        class_names = [str(n) for n in class_names]
        if len(class_names) != cfg.num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for {cfg.num_classes} classes")
    if dtype is not None and np.dtype(dtype) not in (np.float16, np.float32, np.float64):
        raise ValueError(f"dtype must be float16, float32 or float64, got {dtype!r}")
    if notes is not None:
        if format != "timm":
            raise ValueError("notes are kept only in format='timm' files")
        if not isinstance(notes, dict):
            raise TypeError(f"notes must be a dict, got {type(notes).__name__}")
        notes = json.dumps(notes, allow_nan=False)        # fails here, before anything is written
    state = {k: np.ascontiguousarray(to_numpy(v)) for k, v in model.state_dict().items()}
    if dtype is not None:
        state = {k: v.astype(dtype) for k, v in state.items()}
    path = Path(path)
    if format == "timm":
        metadata = {"format": "pt", "minivit_config": json.dumps(cfg.to_dict()),
                    "mean": json.dumps(list(mean)), "std": json.dumps(list(std))}
        if class_names is not None:
            metadata["class_names"] = json.dumps(class_names)
        if notes is not None:
            metadata["minivit_notes"] = notes
        _write_safetensors(state, path, metadata)
        return path
    return _save_hf(model, state, path, class_names, mean, std)


def _save_hf(model, state, path, class_names, mean, std):
    cfg = model.config
    if cfg.pool != "cls":
        raise ValueError(f"format='hf' needs pool='cls' (ViTForImageClassification classifies the [CLS] token), "
                         f"got pool={cfg.pool!r}")
    if cfg.num_classes == 0:
        raise ValueError("format='hf' needs a model with a head (num_classes > 0)")
    if cfg.pos_embed == "relative" or cfg.pos_every_block:
        raise ValueError(f"format='hf' cannot hold pos_embed={cfg.pos_embed!r} with pos_every_block="
                         f"{cfg.pos_every_block}: transformers' ViT adds one absolute table, once; "
                         f"use format='timm'")
    if cfg.pos_embed in ("sincos2d", "learned2d"):   # the same table, stored as a learned one
        table, _ = model.position_table()
        state = {k: v for k, v in state.items() if k not in ("pos_embed_row", "pos_embed_col", "pos_embed_cls")}
        state["pos_embed"] = np.ascontiguousarray(to_numpy(table)).astype(state["cls_token"].dtype)
    elif cfg.pos_embed == "none":      # adding zeros is adding nothing
        state["pos_embed"] = np.zeros((1, cfg.num_tokens, cfg.dim), state["cls_token"].dtype)

    # The HF tables read backwards: a fused qkv splits into query, key and value again.
    hf_state = {}
    for name, hf_name in HF_TOP:
        hf_state["vit." + hf_name] = state[name]
    for name, hf_name in HF_HEAD:
        hf_state[hf_name] = state[name]
    for i in range(cfg.depth):
        prefix = "vit." + HF_BLOCK_PREFIX["published"].format(i=i)
        for row in HF_BLOCK:
            key = f"blocks.{i}.{row[0]}"
            if key not in state:       # qkv bias of a qkv_bias=False model
                continue
            parts = np.split(state[key], 3, axis=0) if len(row[1]) == 3 else [state[key]]
            for hf_name, part in zip(row[1], parts):
                hf_state[prefix + hf_name] = np.ascontiguousarray(part)

    names = class_names or [f"LABEL_{i}" for i in range(cfg.num_classes)]
    hf_config = {
        "architectures": ["ViTForImageClassification"],
        "model_type": "vit",
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.heads,
        "intermediate_size": cfg.hidden_dim,
        "hidden_act": "gelu" if cfg.gelu == "exact" else "gelu_new",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "layer_norm_eps": cfg.ln_eps,
        "image_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans,
        "qkv_bias": cfg.qkv_bias,
        "id2label": {str(i): n for i, n in enumerate(names)},
        "label2id": {n: i for i, n in enumerate(names)},
        "dtype": str(next(iter(hf_state.values())).dtype),
    }
    preprocessor = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True, "size": {"height": cfg.img_size, "width": cfg.img_size}, "resample": 2,  # bilinear
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(mean), "image_std": list(std),
    }
    path.mkdir(parents=True, exist_ok=True)
    _write_safetensors(hf_state, path / "model.safetensors", {"format": "pt"})
    _write_text(path / "config.json", json.dumps(hf_config, indent=2) + "\n")
    _write_text(path / "preprocessor_config.json", json.dumps(preprocessor, indent=2) + "\n")
    return path


def _atomic(path, write):
    """Call write(tmp) on a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory; give a file name such as model.safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        # Some writers create private (0600) files; give the file the permissions a plain
        # open() would have given it under this process's umask.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)      # atomic on POSIX and Windows: readers see the old or the new file
    except OSError as exc:
        # A full disk says "[Errno 28] No space left on device" without naming the file.
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask():
    mask = os.umask(0)      # the only way to read the umask is to set it; put it straight back
    os.umask(mask)
    return mask


def _write_safetensors(state, path, metadata):
    from safetensors.numpy import save_file
    _atomic(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def _write_text(path, text):
    _atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
