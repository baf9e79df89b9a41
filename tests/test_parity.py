"""Parity with Hugging Face transformers on the same weights: logits and every gradient.

The reference is transformers.ViTForImageClassification (eager attention, eval mode, so no
dropout), with random weights of a sensible scale. Its weights reach minivit through a
file in each of the three formats load_pretrained reads:

    hf    transformers' own save_pretrained (and, at small size, its in-memory names)
    timm  a timm-layout safetensors file, converted here from the HF tensors
    npz   the paper's Flax layout, converted here from the HF tensors

The conversions in this file are written out independently of minivit/pretrained.py (they
never call its tables), so a mistake in either shows up as a mismatch.

Sizes: ViT-B/16 (224, P 16, 12 layers, D 768, 12 heads, F 3072, 1000 classes) with full
gradient parity for the hf format in float32 and float64, and logits for timm and npz;
every gradient for every format on small, unusual configurations.

Shape legend: B batch, C channels, S image side, P patch side, D width, H heads,
hs head size, F MLP width, K classes.

Run with -s to see the measured errors:  python -m pytest tests/test_parity.py -s -q
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from minivit import ops
from minivit.pretrained import load_pretrained

TOL = {np.float32: (1e-5, 1e-4), np.float64: (1e-9, 1e-9)}   # (logits, gradients)

# google/vit-base-patch16-224's config: exact GELU and HF's LayerNorm eps of 1e-12.
VIT_B16 = dict(image_size=224, patch_size=16, num_channels=3, hidden_size=768, num_hidden_layers=12,
               num_attention_heads=12, intermediate_size=3072, num_labels=1000, hidden_act="gelu",
               layer_norm_eps=1e-12, qkv_bias=True)
# Small and deliberately unlike the presets: 40 px images, 5 heads of 6, an MLP that is not 4 x D.
SMALL = dict(image_size=40, patch_size=8, num_channels=3, hidden_size=30, num_hidden_layers=2,
             num_attention_heads=5, intermediate_size=50, num_labels=7, hidden_act="gelu_new",
             layer_norm_eps=1e-5, qkv_bias=True)
# One channel, 3 heads, no qkv bias, exact GELU; LayerNorm eps 1e-6 as timm assumes for files
# that carry no config.
SMALL_NO_BIAS = dict(image_size=24, patch_size=4, num_channels=1, hidden_size=24, num_hidden_layers=3,
                     num_attention_heads=3, intermediate_size=96, num_labels=7, hidden_act="gelu",
                     layer_norm_eps=1e-6, qkv_bias=False)
# What the paper's Flax models compute: tanh GELU (flax nn.gelu's default) and eps 1e-6.
SMALL_FLAX = dict(SMALL, layer_norm_eps=1e-6, hidden_act="gelu_new")

FIGURES = {}   # what the tests measured, printed at the end of the module (pytest -s)


# ============================================================================= error measures

def rel_error(a, b):
    """max|a - b| / max(|a| + |b|): the error relative to the array's scale.

    The project's elementwise form, max(|a - b| / max(1e-8, |a| + |b|)), is ill-conditioned
    for gradients: some entries are nearly zero because large terms cancel (e.g. sums over
    the batch of LayerNorm-centred values), and there float32 rounding of the *large* terms
    leaves a residue that is tiny in absolute terms yet 100% of the entry. Dividing by the
    array's largest magnitude measures what matters: how far the two arrays are apart
    compared with the numbers they carry. elementwise_rel_error is reported next to it.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1e-8, float(np.max(np.abs(a) + np.abs(b)))))


def elementwise_rel_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(1e-8, np.abs(a) + np.abs(b))))


# ============================================================================= the reference model

def make_hf(torch, transformers, seed=0, **config):
    """A ViTForImageClassification with random weights of a reasonable scale.

    transformers' own initialiser is skipped (the model is built on the meta device), and
    every parameter is drawn here instead: weights N(0, 0.02^2) as in timm, biases
    N(0, 0.02^2) and LayerNorm scale 1 + N(0, 0.1^2), shift N(0, 0.05^2), so that every
    tensor is non-trivial and a swapped or transposed mapping cannot go unnoticed.
    """
    cfg = transformers.ViTConfig(attn_implementation="eager", **config)
    with torch.device("meta"):
        model = transformers.ViTForImageClassification(cfg)
    model = model.to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "layernorm" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return model


def eager_attention_float64(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' eager attention with the softmax computed in the input's dtype.

    transformers' eager_attention_forward calls softmax(..., dtype=torch.float32) and casts
    back, so a model converted with .double() still gets float32-accurate attention
    probabilities (errors ~1e-7 in logits), which would make float64 parity meaningless.
    This is the same computation with the softmax left in float64 (dropout is 0 in eval).
    """
    import torch
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling      # (B, H, N, N)
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1)                             # (B, H, N, N), float64 stays float64
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()     # (B, N, H, hs)
    return out, probs


def hf_run(torch, transformers, hf, x, labels, dtype, grads=True):
    """Logits and, if asked, the gradient of every parameter (HF's in-memory names)."""
    if dtype == np.float64:
        transformers.AttentionInterface.register("eager_float64", eager_attention_float64)
        hf = hf.double()
        hf.set_attn_implementation("eager_float64")
    assert not hf.training
    hf.zero_grad(set_to_none=True)
    pixels = torch.from_numpy(x.astype(dtype))
    try:
        with torch.set_grad_enabled(grads):
            logits = hf(pixel_values=pixels).logits                   # (B, K)
            if grads:
                torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)).backward()
        out = logits.detach().numpy().copy()
        g = {n: p.grad.numpy().copy() for n, p in hf.named_parameters()} if grads else None
    finally:
        if dtype == np.float64:   # float32 -> float64 -> float32 is exact: the shared model is unchanged
            hf.float()
            hf.set_attn_implementation("eager")
        hf.zero_grad(set_to_none=True)
    return out, g


def minivit_run(model, x, labels, dtype, grads=True):
    model = model.astype(dtype)
    model.zero_grad()
    logits = model(x.astype(dtype))                                   # (B, K)
    g = None
    if grads:
        _, cache = ops.cross_entropy_forward(logits, labels)
        model.backward(ops.cross_entropy_backward(cache))
        g = {n: p.grad for n, p in model.named_parameters()}
    return logits, g


# ============================================================================= the test's own conversions
# Written from the layouts' definitions, not from minivit/pretrained.py.

def hf_to_timm(sd, depth):
    """HF in-memory state (transformers 5 names, 'vit.layers.i.attention.q_proj', ...) -> timm names."""
    out = {
        "cls_token": sd["vit.embeddings.cls_token"],
        "pos_embed": sd["vit.embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["vit.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["vit.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["vit.layernorm.weight"],
        "norm.bias": sd["vit.layernorm.bias"],
        "head.weight": sd["classifier.weight"],
        "head.bias": sd["classifier.bias"],
    }
    for i in range(depth):
        h, t = f"vit.layers.{i}.", f"blocks.{i}."
        out[t + "norm1.weight"] = sd[h + "layernorm_before.weight"]
        out[t + "norm1.bias"] = sd[h + "layernorm_before.bias"]
        out[t + "attn.qkv.weight"] = np.concatenate(
            [sd[h + f"attention.{c}_proj.weight"] for c in "qkv"], axis=0)        # (3D, D)
        if h + "attention.q_proj.bias" in sd:
            out[t + "attn.qkv.bias"] = np.concatenate([sd[h + f"attention.{c}_proj.bias"] for c in "qkv"])
        out[t + "attn.proj.weight"] = sd[h + "attention.o_proj.weight"]
        out[t + "attn.proj.bias"] = sd[h + "attention.o_proj.bias"]
        out[t + "norm2.weight"] = sd[h + "layernorm_after.weight"]
        out[t + "norm2.bias"] = sd[h + "layernorm_after.bias"]
        for fc in ("fc1", "fc2"):
            out[t + f"mlp.{fc}.weight"] = sd[h + f"mlp.{fc}.weight"]
            out[t + f"mlp.{fc}.bias"] = sd[h + f"mlp.{fc}.bias"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def hf_to_npz(sd, depth, heads):
    """HF in-memory state -> the paper's Flax names and layouts.

    Flax Dense kernels are (Din, Dout) (y = x @ kernel); attention kernels are per head:
    query/key/value (D, H, hs), out (H, hs, D); the patch conv kernel is (P, P, C, D).
    """
    def per_head_in(w):            # Linear weight (H*hs, D) -> Flax kernel (D, H, hs)
        return w.T.reshape(w.shape[1], heads, -1)

    out = {
        "cls": sd["vit.embeddings.cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["vit.embeddings.position_embeddings"],
        "embedding/kernel": sd["vit.embeddings.patch_embeddings.projection.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["vit.embeddings.patch_embeddings.projection.bias"],
        "Transformer/encoder_norm/scale": sd["vit.layernorm.weight"],
        "Transformer/encoder_norm/bias": sd["vit.layernorm.bias"],
        "head/kernel": sd["classifier.weight"].T,
        "head/bias": sd["classifier.bias"],
    }
    for i in range(depth):
        h, f = f"vit.layers.{i}.", f"Transformer/encoderblock_{i}/"
        mha = f + "MultiHeadDotProductAttention_1/"
        out[f + "LayerNorm_0/scale"] = sd[h + "layernorm_before.weight"]
        out[f + "LayerNorm_0/bias"] = sd[h + "layernorm_before.bias"]
        for c, name in zip("qkv", ("query", "key", "value")):
            out[mha + f"{name}/kernel"] = per_head_in(sd[h + f"attention.{c}_proj.weight"])
            out[mha + f"{name}/bias"] = sd[h + f"attention.{c}_proj.bias"].reshape(heads, -1)
        o = sd[h + "attention.o_proj.weight"]                                      # (D, H*hs)
        out[mha + "out/kernel"] = o.T.reshape(heads, -1, o.shape[0])               # (H, hs, D)
        out[mha + "out/bias"] = sd[h + "attention.o_proj.bias"]
        out[f + "LayerNorm_2/scale"] = sd[h + "layernorm_after.weight"]
        out[f + "LayerNorm_2/bias"] = sd[h + "layernorm_after.bias"]
        out[f + "MlpBlock_3/Dense_0/kernel"] = sd[h + "mlp.fc1.weight"].T
        out[f + "MlpBlock_3/Dense_0/bias"] = sd[h + "mlp.fc1.bias"]
        out[f + "MlpBlock_3/Dense_1/kernel"] = sd[h + "mlp.fc2.weight"].T
        out[f + "MlpBlock_3/Dense_1/bias"] = sd[h + "mlp.fc2.bias"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def numpy_state(hf):
    return {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}


def write_checkpoint(fmt, hf, cfg, folder):
    """Write hf's weights to `folder` in format `fmt`; returns (path, load_pretrained kwargs)."""
    sd, depth, heads = numpy_state(hf), cfg["num_hidden_layers"], cfg["num_attention_heads"]
    if fmt == "hf":                        # transformers' own writer: the published names
        hf.save_pretrained(folder)
        return folder, {}
    if fmt == "hf-memory-names":           # transformers 5's in-memory names, as model.state_dict() has them
        folder.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        hf.config.to_json_file(str(folder / "config.json"))
        return folder, {}
    if fmt == "timm":                      # config in the metadata, as minivit.save_pretrained writes it
        path = folder / "vit.safetensors"
        folder.mkdir(parents=True, exist_ok=True)
        gelu = "exact" if cfg["hidden_act"] == "gelu" else "tanh"
        meta = {"heads": heads, "ln_eps": cfg["layer_norm_eps"], "gelu": gelu}
        save_file(hf_to_timm(sd, depth), str(path), metadata={"minivit_config": json.dumps(meta)})
        return path, {}
    if fmt == "timm-no-config":            # a bare timm file: the caller says how many heads
        path = folder / "vit.safetensors"
        folder.mkdir(parents=True, exist_ok=True)
        save_file(hf_to_timm(sd, depth), str(path))
        return path, {"heads": heads}
    if fmt == "npz":
        path = folder / "vit.npz"
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(path, **hf_to_npz(sd, depth, heads))
        return path, {}
    raise ValueError(fmt)


def check(label, ref_logits, logits, ref_grads, grads, depth, dtype):
    """Assert parity of logits and (if given) every gradient; record the figures."""
    tol_logits, tol_grads = TOL[dtype]
    err = rel_error(ref_logits, logits)
    figures = {"logits": err, "logits (elementwise)": elementwise_rel_error(ref_logits, logits)}
    assert err < tol_logits, f"{label}: logits differ, rel error {err:.3g}"
    if ref_grads is not None:
        ref = hf_to_timm(ref_grads, depth)
        assert sorted(ref) == sorted(grads), f"{label}: parameter names differ"
        errs = {name: rel_error(ref[name], grads[name]) for name in ref}
        worst = max(errs, key=errs.get)
        figures.update({"worst gradient": errs[worst], "worst parameter": worst, "parameters": len(errs),
                        "gradients (elementwise, worst)": max(elementwise_rel_error(ref[n], grads[n]) for n in ref)})
        bad = {n: e for n, e in errs.items() if not e < tol_grads}
        assert not bad, f"{label}: gradients differ: {bad}"
    FIGURES[label] = figures


@pytest.fixture(scope="module", autouse=True)
def print_figures(transformers):
    transformers.utils.logging.disable_progress_bar()   # save_pretrained's "Writing model shards" bars
    yield
    if FIGURES:
        print("\n\nmeasured parity (max|a-b| / max(|a|+|b|); elementwise form in brackets)")
        for label, f in FIGURES.items():
            line = f"  {label:<34} logits {f['logits']:.1e} [{f['logits (elementwise)']:.1e}]"
            if "worst gradient" in f:
                line += (f"   all {f['parameters']} gradients <= {f['worst gradient']:.1e}"
                         f" [{f['gradients (elementwise, worst)']:.1e}] (worst: {f['worst parameter']})")
            print(line)


# ============================================================================= ViT-B/16

@pytest.fixture(scope="module")
def vit_b16(torch, transformers, tmp_path_factory):
    """One random ViT-B/16, saved with transformers' save_pretrained and loaded into minivit
    once (loading initialises 86M parameters before overwriting them: seconds on 2 cores)."""
    torch.set_num_threads(2)
    hf = make_hf(torch, transformers, seed=0, **VIT_B16)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 224, 224)).astype(np.float32)    # (B, C, S, S), like normalised pixels
    labels = np.array([3, 997])
    folder = tmp_path_factory.mktemp("vit-b16") / "hf"
    hf.save_pretrained(folder)
    model, meta = load_pretrained(folder)
    return {"hf": hf, "x": x, "labels": labels, "model": model, "meta": meta, "tmp": tmp_path_factory,
            "ref_logits32": None}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_vit_b16_hf_logits_and_every_gradient(vit_b16, torch, transformers, dtype):
    hf, x, labels, model, meta = (vit_b16[k] for k in ("hf", "x", "labels", "model", "meta"))
    assert meta["format"] == "hf" and meta["config"].gelu == "exact" and meta["config"].ln_eps == 1e-12
    ref_logits, ref_grads = hf_run(torch, transformers, hf, x, labels, dtype)
    if dtype == np.float32:
        vit_b16["ref_logits32"] = ref_logits
    logits, grads = minivit_run(model, x, labels, dtype)   # float64: the float32 weights, cast exactly
    check(f"ViT-B/16 hf {np.dtype(dtype).name}", ref_logits, logits, ref_grads, grads, 12, dtype)
    model.zero_grad()
    model.astype(np.float32)        # float32 -> float64 -> float32 is exact


@pytest.mark.slow
def test_vit_b16_timm_and_npz_logits(vit_b16, torch, transformers):
    """The same ViT-B/16 weights through a timm file and an npz file: float32 logits."""
    hf, x, labels = vit_b16["hf"], vit_b16["x"], vit_b16["labels"]
    ref_logits = vit_b16["ref_logits32"]
    if ref_logits is None:          # this test run on its own
        ref_logits, _ = hf_run(torch, transformers, hf, x, labels, np.float32, grads=False)
    path, kwargs = write_checkpoint("timm", hf, VIT_B16, vit_b16["tmp"].mktemp("timm"))
    model, _ = load_pretrained(path, **kwargs)
    logits, _ = minivit_run(model, x, labels, np.float32, grads=False)
    check("ViT-B/16 timm float32", ref_logits, logits, None, None, 12, np.float32)
    del model

    # The npz layout has no config: minivit runs it as the paper's Flax code did (tanh GELU,
    # eps 1e-6). The reference is the same HF model switched to those two settings.
    layer_norms = [m for m in hf.modules() if isinstance(m, torch.nn.LayerNorm)]
    activations = [layer.mlp.activation_fn for layer in hf.vit.layers]
    try:
        for m in layer_norms:
            m.eps = 1e-6
        for layer in hf.vit.layers:
            layer.mlp.activation_fn = transformers.activations.ACT2FN["gelu_new"]
        ref_logits, _ = hf_run(torch, transformers, hf, x, labels, np.float32, grads=False)
    finally:
        for m in layer_norms:
            m.eps = VIT_B16["layer_norm_eps"]
        for layer, act in zip(hf.vit.layers, activations):
            layer.mlp.activation_fn = act
    path, kwargs = write_checkpoint("npz", hf, VIT_B16, vit_b16["tmp"].mktemp("npz"))
    model, meta = load_pretrained(path, **kwargs)
    assert meta["format"] == "npz" and meta["config"].heads == 12 and meta["config"].gelu == "tanh"
    logits, _ = minivit_run(model, x, labels, np.float32, grads=False)
    check("ViT-B/16 npz float32", ref_logits, logits, None, None, 12, np.float32)


# ============================================================================= small configurations, every format

SMALL_CASES = [
    ("hf", SMALL),
    ("hf", SMALL_NO_BIAS),
    ("hf-memory-names", SMALL),
    ("timm", SMALL),
    ("timm-no-config", SMALL_NO_BIAS),
    ("npz", SMALL_FLAX),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("fmt,cfg", SMALL_CASES,
                         ids=[f"{f}-{'nobias' if not c['qkv_bias'] else c['hidden_act']}" for f, c in SMALL_CASES])
def test_small_logits_and_every_gradient(torch, transformers, tmp_path, fmt, cfg, dtype):
    hf = make_hf(torch, transformers, seed=1, **cfg)
    rng = np.random.default_rng(1)
    S, C = cfg["image_size"], cfg["num_channels"]
    x = rng.standard_normal((3, C, S, S)).astype(np.float32)
    labels = np.array([0, 6, 2])
    path, kwargs = write_checkpoint(fmt, hf, cfg, tmp_path / fmt)
    model, meta = load_pretrained(path, **kwargs)
    assert meta["config"].heads == cfg["num_attention_heads"]
    assert meta["config"].qkv_bias == cfg["qkv_bias"]
    ref_logits, ref_grads = hf_run(torch, transformers, hf, x, labels, dtype)
    logits, grads = minivit_run(model, x, labels, dtype)
    label = f"small {fmt} ({'no qkv bias' if not cfg['qkv_bias'] else cfg['hidden_act']}) {np.dtype(dtype).name}"
    check(label, ref_logits, logits, ref_grads, grads, cfg["num_hidden_layers"], dtype)
