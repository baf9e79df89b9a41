"""What a trained ViT has learned: the measurements of the paper's Section 4.5 and Figure 7.

    attention_maps(model, images)            every block's attention, (B, H, N, N) each
    attention_rollout(maps)                  how much each output token draws on each input token
      -> rollout_to_grid(rollout, G)         ... as a G x G map over the image (what the pool sees)
    mean_attention_distance(maps, G, P)      how far each head looks, in pixels (Fig. 7 right)
    uniform_attention_distance(G, P)         ... the same for attention spread evenly
    pos_embed_similarity(pos_embed, G)       cosine of each position embedding with every other (Fig. 7 centre)
    patch_embed_pcs(weight)                  principal components of the patch filters (Fig. 7 left)
    features(model, images)                  the frozen features the head reads
      -> fit_linear_probe / probe_accuracy   closed-form ridge regression onto {-1, +1}^K (Section 4.1)
      -> few_shot(...)                       its accuracy from 1, 5, 10, 25 images per class
    plot_*                                   the figures, as matplotlib Figures

and `minivit analyze CHECKPOINT --out DIR`, which writes all the figures and an analysis.json.

The array functions work on NumPy or CuPy arrays (they ask the input which module made it);
they compute in float64 and return arrays on the input's device. The plotting functions copy
to the host first.

Shape legend: B images, C channels, S image side, P patch side, G = S // P patches per side,
N tokens (a prefix of T tokens such as [CLS], then the G*G patches, row by row), D width,
H heads, L depth (blocks), K classes, n components.
"""
from __future__ import annotations

import io
import json
import math
import numbers
from pathlib import Path

import numpy as np

from .backend import get_array_module, is_array, to_numpy

DEFAULT_L2 = 64.0           # fit_linear_probe's ridge strength; why 64: see fit_linear_probe
FEW_SHOTS = (1, 5, 10, 25)  # the paper's Section 4.1 / Figure 2 use 1, 5, 10 and 25 shots


# ============================================================================= input checks

def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_array(name, x, ndim=None, what=""):
    if not is_array(x):
        raise TypeError(f"{name} must be a NumPy or CuPy array{what}, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions{what}, got shape {tuple(x.shape)}")
    if x.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold numbers, got dtype {x.dtype}")
    return x


def _check_finite(name, x):
    if not bool(get_array_module(x).isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def _check_maps(maps):
    """A list of L arrays (B, H, N, N) of one shape, as float64 on their own device."""
    if is_array(maps) and maps.ndim == 5:
        maps = list(maps)                                   # a stacked (L, B, H, N, N) array
    if is_array(maps) or not isinstance(maps, (list, tuple)):
        raise TypeError(f"maps must be a list of per-block arrays (B, H, N, N), as attention_maps returns "
                        f"(for one block, pass [maps]); got {type(maps).__name__}"
                        f"{' of shape ' + str(tuple(maps.shape)) if is_array(maps) else ''}")
    if not maps:
        raise ValueError("maps is empty: it needs one array (B, H, N, N) per block")
    shape = None
    out = []
    for i, m in enumerate(maps):
        _check_array(f"maps[{i}]", m, 4, " (B, H, N, N)")
        if m.shape[-1] != m.shape[-2]:
            raise ValueError(f"maps[{i}] must be square in its last two axes (queries x keys), got {tuple(m.shape)}")
        if shape is not None and tuple(m.shape) != shape:
            raise ValueError(f"every block's map must have one shape; maps[0] is {shape}, maps[{i}] is {tuple(m.shape)}")
        shape = tuple(m.shape)
        m = m.astype(np.float64)
        _check_finite(f"maps[{i}]", m)
        if bool((m < 0).any()):
            raise ValueError(f"maps[{i}] has negative values; attention weights are probabilities")
        out.append(m)
    return out


def _check_grid(grid_size, tokens, prefix_tokens, what):
    """The number of prefix tokens, checked against N = prefix_tokens + G*G."""
    G = _check_positive_int("grid_size", grid_size)
    if isinstance(prefix_tokens, bool) or not isinstance(prefix_tokens, numbers.Integral) or prefix_tokens < 0:
        raise ValueError(f"prefix_tokens must be an integer >= 0, got {prefix_tokens!r}")
    if tokens != prefix_tokens + G * G:
        raise ValueError(f"{what} has {tokens} tokens, but prefix_tokens={prefix_tokens} plus a {G} x {G} grid of "
                         f"patches makes {prefix_tokens + G * G} (is grid_size or prefix_tokens wrong?)")
    return G, int(prefix_tokens)


# ============================================================================= running the model

def _batched(model, images, batch_size, step):
    """Run step(x) on each batch of images in eval mode, restoring the model's mode after."""
    from .model import ViT
    if not isinstance(model, ViT):
        raise TypeError(f"model must be a minivit ViT, got {type(model).__name__}")
    batch_size = _check_positive_int("batch_size", batch_size)
    _check_array("images", images, 4, " (B, C, S, S) of normalised model inputs")
    if images.shape[0] == 0:
        raise ValueError("images: the batch is empty (B = 0)")
    was_training = model.training
    model.eval()                    # no dropout, no drop-path: the model as it is used
    try:
        for start in range(0, images.shape[0], batch_size):
            step(images[start:start + batch_size])
    finally:
        model.clear_cache()         # forward keeps activations for a backward that will not come
        for block in model.blocks:
            block.attn.attention = None
        model.train(was_training)


def attention_maps(model, images, batch_size=100):
    """Every block's attention probabilities for a batch of images, a list of L arrays (B, H, N, N).

    images: normalised float model inputs (B, C, S, S), on the model's device. [b, h, i, j] is
    how much token i attends to token j in head h of that block (token 0 is [CLS]; rows sum
    to 1). Runs model(x, keep_attention=True) batch_size images at a time in eval mode; the
    model's train/eval mode is restored after."""
    chunks = []

    def step(x):
        model(x, keep_attention=True)
        chunks.append(model.attention_maps())                          # L arrays (b, H, N, N)

    _batched(model, images, batch_size, step)
    xp = get_array_module(images)
    return [xp.concatenate([c[layer] for c in chunks]) for layer in range(len(chunks[0]))]   # L x (B, H, N, N)


def features(model, images, batch_size=100):
    """The pooled features (B, D) the head reads (model.forward_features), batch by batch in eval
    mode; the model's mode is restored after. The linear probe is fitted on these."""
    chunks = []
    _batched(model, images, batch_size, lambda x: chunks.append(model.forward_features(x)))
    return get_array_module(images).concatenate(chunks)                  # (B, D)


# ============================================================================= attention rollout

def attention_rollout(maps, residual=True):
    """Attention rollout (Abnar & Zuidema, 2020; the paper's Appendix D.8), (B, N, N).

    Each block's attention is averaged over its heads; with residual=True the identity is added
    for the residual connection around attention (x + attn(x): each token also keeps itself)
    and every row divided by its sum again, i.e. (A + I) / 2. The blocks are then multiplied
    from the first to the last:

        rollout = A_L @ ... @ A_2 @ A_1

    so rollout[b, i, j] is how much token i after the last block draws on token j of the input
    (the embedded patches), following attention through every block. A product of matrices
    whose rows sum to 1 has rows summing to 1. The MLPs, the values and the projections are
    ignored: that is the method's approximation."""
    maps = _check_maps(maps)
    xp = get_array_module(maps[0])
    N = maps[0].shape[-1]
    eye = xp.eye(N)                                                      # (N, N)
    rollout = None
    for layer, m in enumerate(maps):
        a = m.mean(axis=1)                                               # (B, N, N): heads averaged
        if residual:
            a = a + eye
        rows = a.sum(axis=-1, keepdims=True)                             # (B, N, 1)
        if bool((rows <= 0).any()):
            raise ValueError(f"maps[{layer}] has a query whose attention sums to 0 over every key; "
                             f"its row cannot be renormalised")
        a = a / rows
        rollout = a if rollout is None else a @ rollout                  # (B, N, N): later blocks on the left
    return rollout


def rollout_to_grid(rollout, grid_size, pool="cls"):
    """What the pooled output attends to, as a map over the patch grid (B, G, G) summing to 1.

    pool="cls": the [CLS] token's row (token 0) of the rollout, its patch columns only.
    pool="mean": the mean of the patch tokens' rows, patch columns only (the features are the
    mean of the patch tokens). The prefix tokens (N - G*G of them, [CLS] first) are dropped
    from the columns, so the map is renormalised to sum 1 over the grid."""
    _check_array("rollout", rollout, 3, " (B, N, N)")
    if rollout.shape[1] != rollout.shape[2]:
        raise ValueError(f"rollout must be (B, N, N), got {tuple(rollout.shape)}")
    G = _check_positive_int("grid_size", grid_size)
    N = rollout.shape[-1]
    prefix = N - G * G
    if prefix < 0:
        raise ValueError(f"rollout has {N} tokens, fewer than the {G * G} patches of a {G} x {G} grid "
                         f"(is grid_size wrong?)")
    if pool == "cls":
        if prefix < 1:
            raise ValueError(f"pool='cls' needs a [CLS] token, but rollout has exactly {G * G} tokens, "
                             f"the patches of a {G} x {G} grid")
        grid = rollout[:, 0, prefix:]                                    # (B, G*G)
    elif pool == "mean":
        grid = rollout[:, prefix:, prefix:].mean(axis=1)                 # (B, G*G)
    else:
        raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
    grid = grid.astype(np.float64)
    total = grid.sum(axis=1, keepdims=True)                              # (B, 1)
    if bool((total <= 0).any()):
        raise ValueError("the rollout puts no weight on any patch for some image; it cannot be normalised")
    return (grid / total).reshape(-1, G, G)                              # (B, G, G)


# ============================================================================= mean attention distance

def _patch_distances(xp, G, P):
    """Pixel distance between the centres of every pair of patches, (G*G, G*G), row-major patches."""
    index = xp.arange(G * G)                                             # (G*G,)
    row, col = index // G, index % G                                     # (G*G,) each
    return P * xp.hypot(row[:, None] - row[None, :], col[:, None] - col[None, :]).astype(np.float64)


def mean_attention_distance(maps, grid_size, patch_size, prefix_tokens=1):
    """How far each head looks, in pixels (the paper's Appendix D.7 and Figure 7 right), (L, H).

    For each query patch: the distance in pixels between its centre and each key patch's
    centre, weighted by the attention, summed over the keys. Only patches count: the prefix
    tokens ([CLS]) are dropped as queries and as keys, and each query's weights over the key
    patches are renormalised to sum to 1 (so the value is a weighted mean distance whatever
    share went to [CLS]). Averaged over query patches and images."""
    maps = _check_maps(maps)
    xp = get_array_module(maps[0])
    G, T = _check_grid(grid_size, maps[0].shape[-1], prefix_tokens, "each map")
    P = _check_positive_int("patch_size", patch_size)
    dist = _patch_distances(xp, G, P)                                    # (G*G, G*G)
    out = []
    for layer, m in enumerate(maps):
        a = m[:, :, T:, T:]                                              # (B, H, G*G, G*G): patches only
        total = a.sum(axis=-1, keepdims=True)                            # (B, H, G*G, 1)
        if bool((total <= 0).any()):
            raise ValueError(f"maps[{layer}] has a query patch that puts no attention on any patch")
        per_query = ((a / total) * dist).sum(axis=-1)                    # (B, H, G*G)
        out.append(per_query.mean(axis=(0, 2)))                          # (H,)
    return xp.stack(out)                                                 # (L, H)


def uniform_attention_distance(grid_size, patch_size) -> float:
    """The mean attention distance of a head that spreads its attention evenly over all G*G
    patches: the mean pixel distance between the centres of all (G*G)^2 ordered pairs of
    patches, the G*G pairs of a patch with itself (distance 0) included."""
    G = _check_positive_int("grid_size", grid_size)
    P = _check_positive_int("patch_size", patch_size)
    return float(_patch_distances(np, G, P).mean())


# ============================================================================= position embeddings

def pos_embed_similarity(pos_embed, grid_size, prefix_tokens=1):
    """Cosine similarity of each patch's position embedding with every other's, (G, G, G, G).

    pos_embed: (1, N, D) as the model holds it, (N, D), or (G*G, D) with the prefix already
    removed; N = prefix_tokens + G*G, the prefix ([CLS]) rows are dropped. [a, b, c, d] is the
    cosine of patch (row a, column b) with patch (row c, column d), so [a, b] is the G x G map
    one small square of the paper's Figure 7 (centre) shows."""
    _check_array("pos_embed", pos_embed, what=" (1, N, D), (N, D) or (G*G, D)")
    if pos_embed.ndim == 3 and pos_embed.shape[0] == 1:
        pos_embed = pos_embed[0]                                         # (N, D)
    if pos_embed.ndim != 2:
        raise ValueError(f"pos_embed must be (1, N, D), (N, D) or (G*G, D), got shape {tuple(pos_embed.shape)}")
    G = _check_positive_int("grid_size", grid_size)
    rows = pos_embed.shape[0]
    if rows != G * G:
        _, T = _check_grid(G, rows, prefix_tokens, "pos_embed")
        pos_embed = pos_embed[T:]                                        # (G*G, D)
    e = pos_embed.astype(np.float64)
    _check_finite("pos_embed", e)
    xp = get_array_module(e)
    norm = xp.sqrt((e * e).sum(axis=1, keepdims=True))                   # (G*G, 1)
    if bool((norm == 0).any()):
        raise ValueError("pos_embed has a patch whose embedding is all zeros; its cosine similarity is undefined")
    e = e / norm
    return (e @ e.T).reshape(G, G, G, G)                                 # (G*G, G*G) -> (G, G, G, G)


# ============================================================================= patch-embedding filters

def patch_embed_pcs(weight, n=28):
    """Principal components of the patch-embedding filters (the paper's Figure 7 left, which shows 28).

    weight: (D, C, P, P), the D filters of patch_embed.proj (model.patch_embed.proj.weight.data
    reshaped, or any conv weight). Each filter is one sample of C*P*P numbers; their mean is
    removed and the right singular vectors of the centred (D, C*P*P) matrix are the principal
    components, largest variance first. Returns (components (n, C, P, P), explained_ratio (n,)):
    each component has unit norm and the sign that makes its largest entry positive;
    explained_ratio is each one's share of the filters' total variance."""
    _check_array("weight", weight, 4, " (D, C, P, P)")
    if weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight must be (D, C, P, P) with square patches, got {tuple(weight.shape)}")
    D, C, P, _ = weight.shape
    n = _check_positive_int("n", n)
    most = min(D, C * P * P)
    if n > most:
        raise ValueError(f"n={n} components asked for, but {D} filters of {C * P * P} numbers have at most {most}")
    x = weight.reshape(D, C * P * P).astype(np.float64)                  # (D, C*P*P)
    _check_finite("weight", x)
    xp = get_array_module(x)
    x = x - x.mean(axis=0, keepdims=True)
    _, s, vt = xp.linalg.svd(x, full_matrices=False)                     # s (most,), vt (most, C*P*P)
    variance = s * s
    if float(variance.sum()) == 0:
        raise ValueError("every filter in weight is the same; they have no principal components")
    comps = vt[:n]                                                       # (n, C*P*P)
    biggest = xp.abs(comps).argmax(axis=1)                               # (n,)
    sign = xp.sign(comps[xp.arange(n), biggest])                         # (n,)
    return (comps * sign[:, None]).reshape(n, C, P, P), variance[:n] / variance.sum()


# ============================================================================= linear few-shot probe

def _check_features_labels(features, labels, what="features"):
    _check_array(what, features, 2, " (B, D)")
    if features.shape[0] == 0:
        raise ValueError(f"{what} is empty (B = 0)")
    if not is_array(labels) and not isinstance(labels, (list, tuple)):
        raise TypeError(f"labels must be an array of integer class indices, got {type(labels).__name__}")
    labels = to_numpy(labels) if is_array(labels) else np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(f"labels must be ({features.shape[0]},), one per row of {what}, got shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")
    return labels.astype(np.int64)                                       # (B,) on the host


def _check_l2(l2):
    if isinstance(l2, bool) or not isinstance(l2, numbers.Real) or not math.isfinite(l2) or l2 < 0:
        raise ValueError(f"l2 must be a finite number >= 0, got {l2!r}")
    return float(l2)


def fit_linear_probe(features, labels, num_classes, l2=DEFAULT_L2):
    """Closed-form ridge regression from frozen features onto {-1, +1}^K targets (Section 4.1).

    Minimises ||features @ W + b - T||^2 + l2 ||W||^2, where T[i] is -1 everywhere but +1 at
    labels[i]; the bias b is not regularised. Setting the gradient in b to zero gives
    b = mean(T) - mean(features) @ W, and putting that back leaves plain ridge regression on
    the centred features Xc and targets Tc:

        W = (Xc^T Xc + l2 I)^-1 Xc^T Tc        (D x D system, when B >= D)
          = Xc^T (Xc Xc^T + l2 I)^-1 Tc        (B x B system, the same W, cheaper when B < D)

    With l2 = 0 it is least squares (the smallest W when there are fewer images than features).
    The default l2 = 64 (the paper does not give its value) was chosen on the shipped
    cifar-recipe model (features of norm about 10, D = 192), sweeping l2 = 2^-10 ... 2^10 with
    few_shot on 1,000 training images and scoring on 1,000 other training images (never the
    test set): 2^4 to 2^8 were best, within 0.01 of each other at 5, 10 and 25 shots. Small l2
    is worst at 25 shots, where 250 images meet 192 features and least squares just fits the
    noise (accuracy 0.61 at l2 = 2^-10 against 0.80 at 2^6). Features of another scale want
    another l2: scaling the features by c is the same as scaling l2 by 1 / c^2.

    Returns (W (D, K), b (K,)) in float64 on the features' device."""
    labels = _check_features_labels(features, labels)
    K = _check_positive_int("num_classes", num_classes)
    if labels.min() < 0 or labels.max() >= K:
        raise ValueError(f"labels must lie in 0..{K - 1} for num_classes={K}, got values "
                         f"{int(labels.min())}..{int(labels.max())}")
    l2 = _check_l2(l2)
    x = features.astype(np.float64)                                      # (B, D)
    _check_finite("features", x)
    xp = get_array_module(x)
    B, D = x.shape
    t = -xp.ones((B, K))                                                 # (B, K)
    t[xp.arange(B), xp.asarray(labels)] = 1.0
    x_mean, t_mean = x.mean(axis=0), t.mean(axis=0)                      # (D,), (K,)
    xc, tc = x - x_mean, t - t_mean
    if l2 == 0:
        w = xp.linalg.lstsq(xc, tc, rcond=None)[0]                       # (D, K)
    elif B >= D:
        w = xp.linalg.solve(xc.T @ xc + l2 * xp.eye(D), xc.T @ tc)       # (D, K)
    else:
        w = xc.T @ xp.linalg.solve(xc @ xc.T + l2 * xp.eye(B), tc)       # (D, B) @ (B, K) -> (D, K)
    return w, t_mean - x_mean @ w


def probe_accuracy(W, b, features, labels) -> float:
    """The fraction of images whose largest score features @ W + b is at their label."""
    labels = _check_features_labels(features, labels)
    _check_array("W", W, 2, " (D, K)")
    _check_array("b", b, 1, " (K,)")
    if W.shape[0] != features.shape[1] or b.shape[0] != W.shape[1]:
        raise ValueError(f"W must be (D, K) and b (K,) for features (B, D={features.shape[1]}), "
                         f"got W {tuple(W.shape)} and b {tuple(b.shape)}")
    scores = features.astype(np.float64) @ W + b                         # (B, K)
    predicted = to_numpy(scores.argmax(axis=1))                          # (B,)
    return float((predicted == labels).mean())


def few_shot(train_features, train_labels, test_features, test_labels, shots=FEW_SHOTS, draws=5, l2=DEFAULT_L2,
             seed=0):
    """Linear few-shot accuracy (the paper's Section 4.1): for each draw and each number of shots,
    pick `shots` random training images PER CLASS, fit_linear_probe on their features and
    measure probe_accuracy on all the test features.

    Classes are 0..K-1 with K = 1 + the largest label seen; every class needs at least max(shots)
    training images. Within one draw the sets are nested (the 5 images of a class include its
    1, as in big_vision's few-shot evaluator); the draws are independent and reproducible
    from seed. Returns {shots: NumPy array of `draws` accuracies}."""
    train_labels = _check_features_labels(train_features, train_labels, "train_features")
    test_labels = _check_features_labels(test_features, test_labels, "test_features")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train_features and test_features must have the same width D, got "
                         f"{train_features.shape[1]} and {test_features.shape[1]}")
    if isinstance(shots, numbers.Integral):
        shots = (shots,)
    shots = tuple(_check_positive_int("each value of shots", s) for s in shots)
    if not shots:
        raise ValueError("shots is empty; give at least one number of images per class")
    draws = _check_positive_int("draws", draws)
    l2 = _check_l2(l2)
    if train_labels.min() < 0 or test_labels.min() < 0:
        raise ValueError("labels must be class indices >= 0")
    K = int(max(train_labels.max(), test_labels.max())) + 1
    counts = np.bincount(train_labels, minlength=K)                      # (K,)
    short = [k for k in range(K) if counts[k] < max(shots)]
    if short:
        raise ValueError(f"shots={max(shots)} images per class are needed, but class {short[0]} has only "
                         f"{counts[short[0]]} training image(s) (classes with too few: {short[:10]})")
    by_class = [np.flatnonzero(train_labels == k) for k in range(K)]
    rng = np.random.default_rng(seed)
    xp = get_array_module(train_features)
    results = {s: np.empty(draws) for s in shots}
    for d in range(draws):
        order = [rng.permutation(idx) for idx in by_class]               # one shuffle per class and draw
        for s in shots:
            pick = np.concatenate([o[:s] for o in order])                # (K * s,)
            W, b = fit_linear_probe(train_features[xp.asarray(pick)], train_labels[pick], K, l2)
            results[s][d] = probe_accuracy(W, b, test_features, test_labels)
    return results


# ============================================================================= figures

def _figure(**kwargs):
    # matplotlib.figure.Figure draws off-screen without pyplot: no global backend is switched, no
    # window opens, and a notebook shows the returned figure once (pyplot would show it twice).
    from matplotlib.figure import Figure
    return Figure(**kwargs)


def _mosaic(tiles, cols, gap=1, fill=np.nan):
    """Tiles (n, h, w, ...) laid out cols to a row with gap pixels of fill between them: one
    array for one imshow (an axes per tile would take seconds to draw for 64 tiles)."""
    n, h, w = tiles.shape[:3]
    rows = -(-n // cols)
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap) + tiles.shape[3:], fill)
    for i in range(n):
        r, c = divmod(i, cols)
        out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = tiles[i]
    return out


def plot_filter_pcs(components, explained_ratio=None):
    """The principal components of the patch filters as small RGB patches (the paper's Figure 7
    left), seven a row, each labelled with its share of the variance. Each component is min-max
    scaled on its own to 0..1 over all its channels, so its colours show which channels it
    weighs against which (grey: a component that weighs all channels alike)."""
    comps = to_numpy(_check_array("components", components, 4, " (n, C, P, P)")).astype(np.float64)
    n, C, P = comps.shape[:3]
    if C not in (1, 3):
        raise ValueError(f"components must have 1 or 3 channels to draw, got {C}")
    if explained_ratio is not None:
        explained_ratio = to_numpy(_check_array("explained_ratio", explained_ratio, 1))
        if explained_ratio.shape[0] != n:
            raise ValueError(f"explained_ratio has {explained_ratio.shape[0]} values for {n} components")
    low = comps.min(axis=(1, 2, 3), keepdims=True)
    span = comps.max(axis=(1, 2, 3), keepdims=True) - low
    tiles = np.where(span > 0, (comps - low) / np.where(span > 0, span, 1), 0.5)   # (n, C, P, P) in 0..1
    tiles = np.repeat(tiles.transpose(0, 2, 3, 1), 3 // C, axis=-1)              # (n, P, P, 3)
    cols = min(n, 7)
    rows = -(-n // cols)
    gap = max(1, P // 3)
    label_room = P // 2 + 1 if explained_ratio is not None else 0                 # pixels under each tile
    tiles = np.concatenate([tiles, np.ones((n, label_room, P, 3))], axis=1)        # (n, P + room, P, 3)
    mosaic = _mosaic(tiles, cols, gap, fill=1.0)                                  # (height, width, 3)
    inch = 1.1 / (P + gap)                                                        # inches per mosaic pixel
    width, height = mosaic.shape[1] * inch, mosaic.shape[0] * inch
    fig = _figure(figsize=(width + 0.4, height + 0.6))
    ax = fig.add_axes((0.2 / (width + 0.4), 0.1 / (height + 0.6), width / (width + 0.4), height / (height + 0.6)))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    if explained_ratio is not None:
        for i in range(n):
            r, c = divmod(i, cols)
            ax.text(c * (P + gap) + (P - 1) / 2, r * (P + label_room + gap) + P - 0.5 + label_room / 2,
                    f"{i + 1}: {explained_ratio[i]:.1%}", ha="center", va="center", fontsize=7)
    fig.suptitle("principal components of the patch-embedding filters"
                 + ("" if explained_ratio is None else " (share of variance)"), fontsize=10, y=1 - 0.12 / (height + 0.6))
    return fig


def plot_pos_similarity(similarity):
    """The paper's Figure 7 (centre): for each patch (row a, column b) of the G x G grid, a small
    G x G map of the cosine similarity of its position embedding with every patch's, placed at
    (a, b), all on one colour scale from -1 to 1."""
    sim = to_numpy(_check_array("similarity", similarity, 4, " (G, G, G, G)")).astype(np.float64)
    G = sim.shape[0]
    if sim.shape != (G, G, G, G):
        raise ValueError(f"similarity must be (G, G, G, G), got {sim.shape}")
    import matplotlib
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")             # the gaps (NaN) white
    size = min(9.0, 0.7 * G + 2.0)
    fig = _figure(figsize=(size + 1.2, size))
    ax = fig.add_axes((0.1, 0.08, 0.72, 0.82))
    image = ax.imshow(_mosaic(sim.reshape(G * G, G, G), G), cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    centres = np.arange(G) * (G + 1) + (G - 1) / 2                                 # the middle of each small map
    ax.set_xticks(centres, [str(b + 1) for b in range(G)])
    ax.set_yticks(centres, [str(a + 1) for a in range(G)])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set(xlabel="input patch column", ylabel="input patch row")
    fig.colorbar(image, cax=fig.add_axes((0.86, 0.2, 0.03, 0.6)), label="cosine similarity")
    fig.suptitle("position embedding similarity", fontsize=10)
    return fig


def plot_attention_distance(distance, uniform=None):
    """The paper's Figure 7 (right): mean attention distance (pixels) against the block, one
    marker per head, and uniform attention's distance as a dotted line."""
    dist = to_numpy(_check_array("distance", distance, 2, " (L, H)")).astype(np.float64)
    L, H = dist.shape
    fig = _figure(figsize=(6.4, 3.8))
    ax = fig.add_axes((0.1, 0.13, 0.86, 0.78))
    blocks = np.arange(1, L + 1)
    for h in range(H):
        ax.scatter(blocks, dist[:, h], s=20, label=f"head {h + 1}" if H <= 16 else None)
    top = dist.max()
    if uniform is not None:
        ax.axhline(float(uniform), color="gray", linestyle=":", label=f"uniform attention ({float(uniform):.1f} px)")
        top = max(top, float(uniform))
    ax.set(xlabel="block (network depth)", ylabel="mean attention distance (pixels)", ylim=(0, 1.15 * top + 1e-9),
           xticks=blocks, title="how far each head looks")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    return fig


def _displayable(images):
    """Images (B, C, S, S) as floats in 0..1, channels last: uint8 / 255; floats in 0..1 as they
    are; other floats (normalised model inputs) min-max scaled image by image."""
    x = to_numpy(images)
    if x.dtype == np.uint8:
        x = x / 255.0
    else:
        x = x.astype(np.float64)
        if x.min() < 0 or x.max() > 1:
            low = x.min(axis=(1, 2, 3), keepdims=True)
            span = x.max(axis=(1, 2, 3), keepdims=True) - low
            x = (x - low) / np.where(span > 0, span, 1)
    return x.transpose(0, 2, 3, 1)                                       # (B, S, S, C)


def plot_rollout(images, grids):
    """Each image above the same image with its rollout map (rollout_to_grid) laid over it, the
    map's cell (a, b) covering the pixels of patch (a, b), each map scaled to its own maximum.

    images: (B, C, S, S), uint8 0..255 or float 0..1 (other floats, e.g. normalised model
    inputs, are min-max scaled per image); grids: (B, G, G)."""
    _check_array("images", images, 4, " (B, C, S, S)")
    _check_array("grids", grids, 3, " (B, G, G)")
    if images.shape[0] != grids.shape[0] or grids.shape[1] != grids.shape[2]:
        raise ValueError(f"images (B, C, S, S) and grids (B, G, G) must hold the same B, got "
                         f"{tuple(images.shape)} and {tuple(grids.shape)}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {images.shape[1]}")
    import matplotlib
    x = _displayable(images)                                             # (B, S, S, C)
    x = np.repeat(x, 3 // x.shape[-1], axis=-1)                          # (B, S, S, 3)
    B, S, G = x.shape[0], x.shape[1], grids.shape[1]
    g = to_numpy(grids).astype(np.float64)
    g = g / np.maximum(g.max(axis=(1, 2), keepdims=True), 1e-12)          # (B, G, G), largest cell 1
    cell = np.arange(S) * G // S                                         # (S,): the patch each pixel lies in
    heat = matplotlib.colormaps["inferno"](g[:, cell][:, :, cell])[..., :3]   # (B, S, S, 3)
    overlay = 0.4 * x + 0.6 * heat
    tiles = np.concatenate([x, overlay])                                 # (2B, S, S, 3): images, then overlays
    gap = max(1, S // 16)
    fig = _figure(figsize=(min(16.0, 1.3 * B + 0.8), 3.0))
    ax = fig.add_axes((0.08, 0.02, 0.9, 0.9))
    ax.imshow(_mosaic(tiles, B, gap, fill=1.0), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([(S - 1) / 2, S + gap + (S - 1) / 2], ["image", "rollout"])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title("attention rollout: where the pooled output draws from", fontsize=10)
    return fig


def plot_few_shot(results, chance=None):
    """Few-shot accuracy against the number of images per class: each draw as a dot, the mean as a line."""
    shots = sorted(results)
    fig = _figure(figsize=(5.6, 3.8))
    ax = fig.add_axes((0.12, 0.13, 0.84, 0.78))
    for s in shots:
        acc = np.asarray(results[s], dtype=np.float64)
        ax.scatter(np.full(acc.shape, s), acc, s=14, color="tab:blue", alpha=0.5)
    ax.plot(shots, [float(np.mean(results[s])) for s in shots], "o-", color="tab:blue",
            label="mean over draws")
    if chance is not None:
        ax.axhline(chance, color="gray", linestyle=":", label=f"chance ({chance:.0%})")
    ax.set_xscale("log")
    ax.set_xticks(shots, [str(s) for s in shots])
    ax.minorticks_off()
    ax.set(xlabel="training images per class (shots)", ylabel="test accuracy", ylim=(0, 1),
           title="linear few-shot probe on frozen features")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


# ============================================================================= `minivit analyze`

FILTERS_PNG = "filters_pca.png"
POSITIONS_PNG = "pos_similarity.png"
DISTANCE_PNG = "attention_distance.png"
ROLLOUT_PNG = "rollout.png"
FEW_SHOT_PNG = "few_shot.png"
ANALYSIS_JSON = "analysis.json"
ROLLOUT_IMAGES = 8          # images drawn in rollout.png
FEW_SHOT_TRAIN = 1000       # the probe draws its shots from the first 1,000 training images ...
FEW_SHOT_TEST = 1000        # ... and is scored on the first 1,000 test images
FEW_SHOT_DRAWS = 5


def register(subparsers):
    p = subparsers.add_parser(
        "analyze", help="draw what a trained ViT has learned (the paper's Figure 7, rollout, few-shot probe)",
        description="Analyse a trained ViT as the paper's Section 4.5 does: principal components of the patch "
                    "filters, position-embedding similarity, mean attention distance per head, attention rollout, "
                    "and the linear few-shot probe of Section 4.1. Writes PNGs and analysis.json to --out.")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a .npz written by minivit train, or weights load_pretrained reads (.safetensors, ...)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the figures and analysis.json")
    p.add_argument("--num-images", type=int, default=200, metavar="N",
                   help="CIFAR-10 test images to measure attention on (default 200)")
    p.add_argument("--images", nargs="+", metavar="FILE",
                   help="image files to measure attention on instead (any format Pillow reads; resized to the "
                        "model's size); the few-shot probe then runs only with --data")
    p.add_argument("--data", metavar="PATH", help="CIFAR-10 archive or directory (default: where training found "
                                                  "it, $MINIVIT_DATA, the cache, or download)")
    p.add_argument("--batch-size", type=int, default=100, metavar="N", help="images per forward pass (default 100)")
    p.set_defaults(func=run)


def load_model(path):
    """(model, info) from a checkpoint: an .npz written by `minivit train` (read with
    load_checkpoint, normalised with the mean and std it records), or anything load_pretrained
    reads. info: mean, std, class_names, data (where training found its data, or None), kind."""
    from .checkpoint import is_train_checkpoint, load_vit_checkpoint
    from .data import CIFAR10_MEAN, CIFAR10_STD
    from .pretrained import load_pretrained
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {str(path)!r}")
    if is_train_checkpoint(path):
        # the panels read the patch filters, positions and attention of a plain ViT
        model, meta = load_vit_checkpoint(path, "minivit analyze reads ViT checkpoints")
        norm = meta.get("normalize") or {"mean": CIFAR10_MEAN, "std": CIFAR10_STD}
        info = {"mean": tuple(norm["mean"]), "std": tuple(norm["std"]), "class_names": None,
                "data": (meta.get("run") or {}).get("data"), "kind": f"minivit train checkpoint, epoch {meta['epoch']}"}
    else:
        model, meta = load_pretrained(path)
        info = {"mean": meta["mean"], "std": meta["std"], "class_names": meta["class_names"], "data": None,
                "kind": f"pretrained weights ({meta['format']})"}
    return model.eval(), info


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _check_out_dir(out):
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a directory")
    return out


def run(args):
    from tqdm import tqdm

    from .data import find_cifar10, load_cifar10, normalize
    from .predict import preprocess, read_image
    from .train import _write_atomically

    num_images = _check_positive_int("--num-images", args.num_images)
    batch_size = _check_positive_int("--batch-size", args.batch_size)
    out = _check_out_dir(args.out)
    files = [(path, read_image(path)) for path in args.images or []]   # before the slow parts: a typo fails now
    model, info = load_model(args.checkpoint)
    cfg = model.config
    G, P, T = cfg.grid_size, cfg.patch_size, cfg.num_tokens - cfg.num_patches   # T prefix tokens ([CLS])
    mean, std = info["mean"], info["std"]

    data = None
    if not files or args.data:
        saved = info["data"]
        data_path = args.data or (saved if saved and Path(saved).exists() else None)
        data = load_cifar10(find_cifar10(data_path), limit=max(num_images, FEW_SHOT_TRAIN, FEW_SHOT_TEST))
        if tuple(data.test_images.shape[1:]) != (cfg.in_chans, cfg.img_size, cfg.img_size):
            raise ValueError(f"the model takes {cfg.in_chans}x{cfg.img_size}x{cfg.img_size} images but the data's are "
                             f"{'x'.join(map(str, data.test_images.shape[1:]))}; give image files with --images "
                             f"(they are resized to the model's size)")
    if files:
        x = np.stack([preprocess(img, cfg.img_size, mean, std, cfg.in_chans) for _, img in files])  # (B, C, S, S)
        shown = x * np.asarray(std, np.float32)[:, None, None] + np.asarray(mean, np.float32)[:, None, None]
        shown = np.clip(shown, 0, 1)                                   # back to pixels in 0..1, to draw
        source = f"{len(files)} image file(s)"
    else:
        shown = data.test_images[:num_images]                          # uint8 (B, C, S, S)
        x = normalize(shown, mean, std, model.dtype)                   # (B, C, S, S)
        source = f"the first {len(x)} CIFAR-10 test images"
    x = x.astype(model.dtype)
    n_att = len(x)
    shots = ()
    if data is not None:
        pool_labels = data.train_labels[:FEW_SHOT_TRAIN]
        K = int(max(pool_labels.max(), data.test_labels[:FEW_SHOT_TEST].max())) + 1
        fewest = int(np.bincount(pool_labels, minlength=K).min())
        shots = tuple(s for s in FEW_SHOTS if s <= fewest)

    def batches(n):
        return -(-n // batch_size)
    total = 2 + batches(n_att) + 1 + (batches(min(FEW_SHOT_TRAIN, len(data.train_images))) +
                                      batches(min(FEW_SHOT_TEST, len(data.test_images))) + 1 if shots else 0)
    report = {"checkpoint": str(args.checkpoint), "kind": info["kind"], "config": cfg.to_dict(), "images": source,
              "notes": []}
    written = []
    out.mkdir(parents=True, exist_ok=True)

    def write(name, fig):
        _write_atomically(out / name, _png(fig))
        written.append(name)

    def note(text):
        report["notes"].append(text)
        tqdm.write(f"note: {text}")

    with tqdm(total=total, desc="analyze", unit="step", dynamic_ncols=True, mininterval=0.5) as bar:
        bar.set_description("patch filters")
        weight = model.patch_embed.proj.weight.data                    # (D, C, P, P)
        n_pcs = min(28, weight.shape[0], cfg.patch_dim)
        comps, ratio = patch_embed_pcs(weight, n=n_pcs)
        write(FILTERS_PNG, plot_filter_pcs(comps, ratio))
        report["filters_pca"] = {"explained_ratio": [float(r) for r in to_numpy(ratio)]}
        bar.update()

        bar.set_description("positions")
        if cfg.pos_embed == "none":
            note("the model has no position embedding (pos_embed='none'): pos_similarity.png is not drawn")
        else:
            table = model.pos_embed.data if cfg.pos_embed == "learned" else model.pos_table   # (1, N, D)
            fig = plot_pos_similarity(pos_embed_similarity(table, G, prefix_tokens=T))
            if cfg.pos_embed == "sincos2d":
                note("the position embedding is the fixed 2-D sin-cos table (pos_embed='sincos2d'), not learned: "
                     "pos_similarity.png shows the table the model was given")
                fig.suptitle("position embedding similarity: the FIXED 2-D sin-cos table (not learned)", fontsize=10)
            write(POSITIONS_PNG, fig)
        report["pos_embed"] = cfg.pos_embed
        bar.update()

        bar.set_description("attention")
        distance_sum, grids = 0.0, None
        for start in range(0, n_att, batch_size):
            chunk = x[start:start + batch_size]
            maps = attention_maps(model, chunk, batch_size)            # L arrays (b, H, N, N)
            distance_sum = distance_sum + mean_attention_distance(maps, G, P, prefix_tokens=T) * len(chunk)
            if grids is None:                                          # rollout of the first images only
                first = [m[:ROLLOUT_IMAGES] for m in maps]
                grids = rollout_to_grid(attention_rollout(first), G, pool=cfg.pool)   # (b, G, G)
            bar.update()
        distance = to_numpy(distance_sum / n_att)                      # (L, H)
        uniform = uniform_attention_distance(G, P)
        write(DISTANCE_PNG, plot_attention_distance(distance, uniform))
        report["attention_distance"] = {
            "unit": "pixels", "images": n_att, "uniform": uniform,
            "per_head": distance.round(4).tolist(), "per_block": distance.mean(axis=1).round(4).tolist()}
        write(ROLLOUT_PNG, plot_rollout(shown[:len(grids)], grids))
        report["rollout"] = {"images": int(len(grids)), "pool": cfg.pool}
        bar.update()

        if data is None:
            note("no training images (--images without --data): the few-shot probe is skipped")
            report["few_shot"] = None
        elif not shots:
            note(f"some class has no image among the first {FEW_SHOT_TRAIN} training images: "
                 f"the few-shot probe is skipped")
            report["few_shot"] = None
        else:
            if shots != FEW_SHOTS:
                note(f"the first {FEW_SHOT_TRAIN} training images have only {fewest} of some class: shots {shots}")
            bar.set_description("few-shot features")
            feats = {}
            for split, n in (("train", FEW_SHOT_TRAIN), ("test", FEW_SHOT_TEST)):
                images = getattr(data, f"{split}_images")[:n]
                chunks = []
                for start in range(0, len(images), batch_size):
                    chunks.append(features(model, normalize(images[start:start + batch_size], mean, std, model.dtype),
                                           batch_size))
                    bar.update()
                feats[split] = np.concatenate(chunks)                  # (n, D)
            bar.set_description("few-shot probe")
            n_test = len(feats["test"])
            acc = few_shot(feats["train"], data.train_labels[:len(feats["train"])], feats["test"],
                           data.test_labels[:n_test], shots=shots, draws=FEW_SHOT_DRAWS)
            write(FEW_SHOT_PNG, plot_few_shot(acc, chance=1.0 / K))
            report["few_shot"] = {
                "note": "the shots come from CIFAR-10's training split, which a model trained on CIFAR-10 has seen "
                        "with its labels: this measures how linearly separable its features are, not transfer to "
                        "new data as in the paper",
                "l2": DEFAULT_L2, "draws": FEW_SHOT_DRAWS, "train_pool": len(feats["train"]), "test_images": n_test,
                "accuracy": {str(s): {"mean": float(a.mean()), "std": float(a.std()), "draws": a.round(4).tolist()}
                             for s, a in acc.items()}}
            bar.update()
        report["files"] = written + [ANALYSIS_JSON]
        _write_atomically(out / ANALYSIS_JSON, (json.dumps(report, indent=1) + "\n").encode())

    by_block = ", ".join(f"{d:.1f}" for d in report["attention_distance"]["per_block"])
    print(f"{args.checkpoint}: mean attention distance per block (px, mean over heads) {by_block}; "
          f"uniform attention {uniform:.1f} px")
    if report["few_shot"]:
        print("few-shot accuracy: " + ", ".join(f"{s}-shot {v['mean']:.3f}" for s, v in
                                                report["few_shot"]["accuracy"].items()))
    print(f"wrote {', '.join(report['files'])} to {out}")
    return 0
