"""minivit.analysis and `minivit analyze`: every measurement on hand-built cases with known answers.

Expected values come from the case's construction (identity attention looks 0 pixels away, a
head that looks one patch sideways looks P pixels away), from arithmetic written out here, or
from numpy.linalg (lstsq, eigh) applied independently of the code under test.
"""
import io
import itertools
import json
import math
import os

import numpy as np
import pytest

from minivit import ViT, ViTConfig
from minivit import analysis as an
from minivit.cli import main
from minivit.data import CIFAR10

TINY = ViTConfig(img_size=16, patch_size=4, num_classes=10, dim=16, depth=2, heads=2, mlp_dim=32,
                 dropout=0.1, attn_dropout=0.1, drop_path=0.1)   # dropout on: eval mode must turn it off
PNG = b"\x89PNG\r\n\x1a\n"


def row_stochastic(rng, *shape):
    """Random positive matrices whose rows sum to 1 (attention-like)."""
    a = rng.uniform(0.05, 1.0, shape)
    return a / a.sum(-1, keepdims=True)


def sideways_head(G, cls_share=0.0):
    """(N, N) attention of a head whose every patch looks at the patch one column to its right
    (one to its left in the last column): always exactly one patch width away. Each patch
    query also puts cls_share on [CLS] (token 0); [CLS] itself attends to everything evenly."""
    N = 1 + G * G
    a = np.zeros((N, N))
    a[0] = 1.0 / N
    for r, c in itertools.product(range(G), range(G)):
        c2 = c + 1 if c + 1 < G else c - 1
        a[1 + r * G + c, 0] = cls_share
        a[1 + r * G + c, 1 + r * G + c2] = 1.0 - cls_share
    return a


# ============================================================================= mean attention distance

def test_uniform_attention_distance_of_a_2x2_grid_by_hand():
    # 4 patches with centres P apart. From any patch, the 4 keys are itself (0), two neighbours
    # (P each) and the diagonal one (P * sqrt(2)); every patch sees the same, so the mean over all
    # 16 ordered pairs is (0 + P + P + P * sqrt(2)) / 4.
    for P in (1, 4, 16):
        assert an.uniform_attention_distance(2, P) == pytest.approx(P * (2 + math.sqrt(2)) / 4, rel=1e-12)
    assert an.uniform_attention_distance(1, 7) == 0.0        # one patch: only itself


def test_uniform_attention_distance_against_every_pair():
    G, P = 5, 3
    centres = [(P * r, P * c) for r in range(G) for c in range(G)]
    brute = sum(math.dist(p, q) for p in centres for q in centres) / len(centres) ** 2
    assert an.uniform_attention_distance(G, P) == pytest.approx(brute, rel=1e-12)


def test_identity_attention_looks_zero_pixels_away_and_its_rollout_is_the_identity():
    G, B, H, L = 3, 2, 2, 3
    N = 1 + G * G
    maps = [np.broadcast_to(np.eye(N), (B, H, N, N)).copy() for _ in range(L)]
    assert np.array_equal(an.mean_attention_distance(maps, G, 4), np.zeros((L, H)))
    for residual in (True, False):
        assert np.allclose(an.attention_rollout(maps, residual=residual), np.eye(N), atol=1e-15)


def test_a_head_looking_one_patch_sideways_is_patch_size_away_whatever_cls_gets():
    G, P, B = 4, 5, 3
    N = 1 + G * G
    uniform = np.full((N, N), 1.0 / N)
    # head 0: sideways, with 30% on [CLS] (dropped and renormalised away); head 1: identity;
    # head 2: uniform over every token, [CLS] included.
    layer = np.stack([sideways_head(G, cls_share=0.3), np.eye(N), uniform])       # (H, N, N)
    maps = [np.broadcast_to(layer, (B, 3, N, N)).copy()] * 2
    distance = an.mean_attention_distance(maps, G, P)
    assert distance.shape == (2, 3)
    assert np.allclose(distance[:, 0], P, rtol=1e-12)
    assert np.allclose(distance[:, 1], 0.0)
    assert np.allclose(distance[:, 2], an.uniform_attention_distance(G, P), rtol=1e-12)


def test_mean_attention_distance_averages_over_images_and_queries():
    G, P = 2, 4
    N = 1 + G * G
    near, far = np.eye(N), sideways_head(G)                                     # 0 and P pixels
    maps = [np.stack([near, far])[:, None]]                                      # 2 images, 1 head
    assert an.mean_attention_distance(maps, G, P)[0, 0] == pytest.approx(P / 2)
    # Without a [CLS] token (prefix_tokens=0) the same patches give the same distance.
    assert an.mean_attention_distance([far[1:, 1:][None, None]], G, P, prefix_tokens=0)[0, 0] == pytest.approx(P)


# ============================================================================= rollout

def test_rollout_without_residual_is_the_product_later_block_on_the_left(rng):
    B, N = 2, 5
    a1, a2 = row_stochastic(rng, B, 1, N, N), row_stochastic(rng, B, 1, N, N)
    rollout = an.attention_rollout([a1, a2], residual=False)
    assert np.allclose(rollout, a2[:, 0] @ a1[:, 0], rtol=1e-12)
    assert not np.allclose(rollout, a1[:, 0] @ a2[:, 0], rtol=1e-3)     # the order matters and is checked


def test_rollout_averages_heads_and_adds_the_residual(rng):
    B, H, N = 2, 3, 4
    a1, a2 = row_stochastic(rng, B, H, N, N), row_stochastic(rng, B, H, N, N)
    # by hand: heads averaged, (A + I) / 2 (its rows already sum to 1), later block on the left
    r1, r2 = (a1.mean(axis=1) + np.eye(N)) / 2, (a2.mean(axis=1) + np.eye(N)) / 2
    assert np.allclose(an.attention_rollout([a1, a2]), r2 @ r1, rtol=1e-12)
    stacked = an.attention_rollout(np.stack([a1, a2]))                  # (L, B, H, N, N) works too
    assert np.allclose(stacked, r2 @ r1, rtol=1e-12)


def test_rollout_rows_sum_to_one_even_from_unnormalised_maps(rng):
    maps = [row_stochastic(rng, 3, 2, 6, 6) * rng.uniform(0.5, 2.0) for _ in range(6)]
    for residual in (True, False):
        assert np.allclose(an.attention_rollout(maps, residual=residual).sum(-1), 1.0, rtol=1e-12)


def test_rollout_to_grid_reads_the_cls_row_or_the_mean_of_the_patch_rows():
    G = 2
    N = 1 + G * G
    r = np.zeros((1, N, N))
    r[0, 0] = [0.2, 0.1, 0.2, 0.3, 0.2]             # [CLS] row: 0.8 on the patches
    r[0, 1:, 1:] = np.diag([1.0, 2.0, 3.0, 4.0])    # patch rows: each patch on itself
    assert np.allclose(an.rollout_to_grid(r, G, pool="cls"), [[[0.125, 0.25], [0.375, 0.25]]])
    assert np.allclose(an.rollout_to_grid(r, G, pool="mean"), [[[0.1, 0.2], [0.3, 0.4]]])
    no_cls = r[:, 1:, 1:]
    assert np.allclose(an.rollout_to_grid(no_cls, G, pool="mean"), [[[0.1, 0.2], [0.3, 0.4]]])
    with pytest.raises(ValueError, match="needs a \\[CLS\\] token"):
        an.rollout_to_grid(no_cls, G, pool="cls")


# ============================================================================= position embeddings

def test_pos_embed_similarity_of_one_hot_embeddings_is_the_identity_pattern():
    G, D = 3, 12
    table = np.zeros((1 + G * G, D))
    table[0] = 5.0                                           # [CLS]: dropped
    table[1:, :G * G] = np.eye(G * G) * 2.0                  # position p: 2 * e_p
    expected = np.eye(G * G).reshape(G, G, G, G)             # [a, b, c, d] = 1 iff (a, b) == (c, d)
    for given in (table[None], table, table[1:]):            # (1, N, D), (N, D), (G*G, D)
        assert np.allclose(an.pos_embed_similarity(given, G), expected)


def test_pos_embed_similarity_reads_patches_row_by_row():
    G = 3
    rc = np.array([(r, c) for r in range(G) for c in range(G)], dtype=np.float64)
    table = np.concatenate([rc + 1.0, np.ones((G * G, 1))], axis=1)   # patch (r, c) -> (r + 1, c + 1, 1)
    sim = an.pos_embed_similarity(table, G)
    for a, b, c, d in itertools.product(range(G), repeat=4):
        u, v = np.array([a + 1, b + 1, 1.0]), np.array([c + 1, d + 1, 1.0])
        assert sim[a, b, c, d] == pytest.approx(u @ v / np.linalg.norm(u) / np.linalg.norm(v), rel=1e-12)
    equal = table.copy()
    equal[4] = 3 * equal[0]                                  # same direction: cosine 1
    equal[5] = -equal[0]                                     # opposite: -1
    sim = an.pos_embed_similarity(equal, G)
    assert sim[1, 1, 0, 0] == pytest.approx(1.0) and sim[1, 2, 0, 0] == pytest.approx(-1.0)


def test_sincos_pos_embed_is_most_similar_to_itself():
    model = ViT(ViTConfig(img_size=16, patch_size=4, dim=16, depth=1, heads=2, pos_embed="sincos2d"))
    sim = an.pos_embed_similarity(model.pos_table, 4)
    for a, b in itertools.product(range(4), repeat=2):
        assert np.unravel_index(sim[a, b].argmax(), (4, 4)) == (a, b)


# ============================================================================= patch-filter PCA

def test_patch_embed_pcs_against_an_eigendecomposition(rng):
    D, C, P = 40, 3, 4
    weight = rng.normal(size=(D, C, P, P)) * rng.uniform(0.1, 2.0, size=(1, C, P, P))
    comps, ratio = an.patch_embed_pcs(weight, n=5)
    assert comps.shape == (5, C, P, P) and ratio.shape == (5,)
    x = weight.reshape(D, -1)
    cov = np.cov(x, rowvar=False)                              # (C*P*P, C*P*P), mean removed
    values, vectors = np.linalg.eigh(cov)                      # ascending
    values, vectors = values[::-1], vectors[:, ::-1]
    assert np.allclose(ratio, values[:5] / values.sum(), rtol=1e-9)
    for i in range(5):                                         # each component is an eigenvector, up to sign
        assert abs(comps[i].ravel() @ vectors[:, i]) == pytest.approx(1.0, rel=1e-9)
        flat = comps[i].ravel()
        assert flat[np.abs(flat).argmax()] > 0                 # the sign convention


def test_patch_embed_pcs_of_a_rank_two_mix(rng):
    D, C, P = 30, 3, 2
    f1, f2 = rng.normal(size=(C, P, P)), rng.normal(size=(C, P, P))
    weight = (rng.normal(size=(D, 1, 1, 1)) * f1 + rng.normal(size=(D, 1, 1, 1)) * f2 + 7.0)  # + a shared mean
    comps, ratio = an.patch_embed_pcs(weight, n=4)
    assert ratio[:2].sum() == pytest.approx(1.0, rel=1e-12) and np.allclose(ratio[2:], 0, atol=1e-12)
    basis = np.linalg.qr(np.stack([f1.ravel(), f2.ravel()], axis=1))[0]      # (C*P*P, 2)
    for i in range(2):                                     # the first two components span f1 and f2
        v = comps[i].ravel()
        assert np.linalg.norm(basis.T @ v) == pytest.approx(1.0, rel=1e-9)


# ============================================================================= linear probe

def ridge_by_lstsq(x, labels, K, l2):
    """The same minimiser from numpy.linalg.lstsq on the augmented system
    [X 1; sqrt(l2) I 0] [W; b] = [T; 0]: the extra rows penalise W and leave b free."""
    B, D = x.shape
    t = -np.ones((B, K))
    t[np.arange(B), labels] = 1
    a = np.block([[x, np.ones((B, 1))], [np.sqrt(l2) * np.eye(D), np.zeros((D, 1))]])
    wb = np.linalg.lstsq(a, np.vstack([t, np.zeros((D, K))]), rcond=None)[0]
    return wb[:D], wb[D]


@pytest.mark.parametrize("B, D, l2", [(50, 8, 0.7), (9, 20, 0.7), (50, 8, 0.0), (200, 30, 25.0)])
def test_ridge_probe_equals_lstsq_on_the_augmented_system(rng, B, D, l2):
    K = 4
    x = rng.normal(size=(B, D)).astype(np.float32) + 3.0
    labels = rng.integers(0, K, B)
    W, b = an.fit_linear_probe(x, labels, K, l2=l2)
    W_ref, b_ref = ridge_by_lstsq(x.astype(np.float64), labels, K, l2)
    assert W.shape == (D, K) and b.shape == (K,)
    assert np.allclose(W, W_ref, rtol=1e-8, atol=1e-10) and np.allclose(b, b_ref, rtol=1e-8, atol=1e-10)


def test_probe_on_separable_clusters_is_exact_and_accuracy_counts(rng):
    K, D = 5, 12
    centres = rng.normal(size=(K, D)) * 10
    labels = np.repeat(np.arange(K), 8)
    x = centres[labels] + rng.normal(size=(len(labels), D))
    W, b = an.fit_linear_probe(x, labels, K)
    test_labels = rng.integers(0, K, 100)
    assert an.probe_accuracy(W, b, centres[test_labels] + rng.normal(size=(100, D)), test_labels) == 1.0
    # accuracy by hand: scores = x @ I + 0, so the prediction is each row's argmax
    feats = np.array([[3.0, 1, 0], [0, 2, 1], [5, 0, 9], [1, 1, 2]])
    assert an.probe_accuracy(np.eye(3), np.zeros(3), feats, np.array([0, 1, 0, 2])) == 0.75


def separated_features(rng, per_class, K=4, D=6):
    labels = np.repeat(np.arange(K), per_class)
    return rng.normal(size=(len(labels), D)) + 4 * np.eye(K, D)[labels], labels


def test_few_shot_draws_shots_images_per_class_and_is_reproducible(rng, monkeypatch):
    train_x, train_y = separated_features(rng, 30)
    test_x, test_y = separated_features(rng, 10)
    seen = []
    real_fit = an.fit_linear_probe

    def counting_fit(features, labels, num_classes, l2):
        seen.append((features.shape[0], np.bincount(labels, minlength=num_classes), num_classes,
                     {tuple(row) for row in features}))
        return real_fit(features, labels, num_classes, l2)
    monkeypatch.setattr(an, "fit_linear_probe", counting_fit)
    out = an.few_shot(train_x, train_y, test_x, test_y, shots=(1, 5, 10), draws=3, seed=4)
    assert list(out) == [1, 5, 10] and all(v.shape == (3,) for v in out.values())
    assert [n for n, *_ in seen] == [4, 20, 40] * 3                      # shots * K images per fit
    assert all((counts == n // 4).all() and K == 4 for n, counts, K, _ in seen)
    rows = {tuple(r) for r in train_x}
    assert all(used <= rows for *_, used in seen)                         # only training images
    assert seen[0][3] != seen[3][3]                                       # the draws differ
    monkeypatch.setattr(an, "fit_linear_probe", real_fit)
    again = an.few_shot(train_x, train_y, test_x, test_y, shots=(1, 5, 10), draws=3, seed=4)
    assert all(np.array_equal(out[s], again[s]) for s in out)
    assert all(0 <= v.min() and v.max() <= 1 for v in out.values())
    assert out[10].mean() > 0.9                                           # well separated classes


# ============================================================================= running a model

def test_attention_maps_and_features_do_not_depend_on_batching_and_restore_the_mode(rng):
    model = ViT(TINY, seed=1)
    x = rng.normal(size=(7, 3, 16, 16)).astype(np.float32)
    model.eval()
    logits = model(x, keep_attention=True)                                # one batch, eval mode
    whole = [m.copy() for m in model.attention_maps()]
    pooled = model.forward_features(x)
    for start_training in (True, False):
        model.train(start_training)
        maps = an.attention_maps(model, x, batch_size=3)                  # batches of 3, 3, 1
        assert len(maps) == TINY.depth and all(m.shape == (7, TINY.heads, 17, 17) for m in maps)
        assert all(np.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(maps, whole))
        assert np.allclose(an.features(model, x, batch_size=2), pooled, rtol=1e-5, atol=1e-6)
        assert model.training is start_training and all(b.training is start_training for b in model.blocks)
    assert logits.shape == (7, 10)


# ============================================================================= bad input

@pytest.mark.parametrize("call, error, message", [
    (lambda: an.attention_rollout(np.ones((1, 1, 3, 3))), TypeError, "list of per-block arrays"),
    (lambda: an.attention_rollout([]), ValueError, "maps is empty"),
    (lambda: an.attention_rollout([np.ones((1, 1, 3, 4))]), ValueError, "square"),
    (lambda: an.attention_rollout([np.ones((1, 1, 3, 3)), np.ones((1, 1, 4, 4))]), ValueError, "one shape"),
    (lambda: an.attention_rollout([-np.ones((1, 1, 3, 3))]), ValueError, "negative"),
    (lambda: an.attention_rollout([np.full((1, 1, 3, 3), np.nan)]), ValueError, "NaN"),
    (lambda: an.mean_attention_distance([np.ones((1, 1, 5, 5))], 3, 4), ValueError, "5 tokens, but prefix_tokens=1"),
    (lambda: an.mean_attention_distance([np.ones((1, 1, 5, 5))], 2, 4, prefix_tokens=2), ValueError,
     "prefix_tokens=2"),
    (lambda: an.mean_attention_distance([np.ones((1, 1, 5, 5))], 2, 4, prefix_tokens=-1), ValueError,
     "prefix_tokens must be an integer >= 0"),
    (lambda: an.mean_attention_distance([np.ones((1, 1, 5, 5))], 2, 0), ValueError, "patch_size must be"),
    (lambda: an.uniform_attention_distance(2.5, 4), ValueError, "grid_size must be a positive integer"),
    (lambda: an.rollout_to_grid(np.ones((1, 5, 5)), 3), ValueError, "fewer than the 9 patches"),
    (lambda: an.rollout_to_grid(np.ones((1, 5, 5)), 2, pool="max"), ValueError, "pool must be"),
    (lambda: an.pos_embed_similarity(np.ones((11, 4)), 3), ValueError, "11 tokens"),
    (lambda: an.pos_embed_similarity(np.ones((2, 5, 4)), 2), ValueError, r"\(1, N, D\)"),
    (lambda: an.pos_embed_similarity(np.zeros((4, 4)), 2), ValueError, "all zeros"),
    (lambda: an.patch_embed_pcs(np.ones((4, 3, 2, 2)), n=5), ValueError, "at most 4"),
    (lambda: an.patch_embed_pcs(np.ones((4, 3, 2, 3))), ValueError, "square patches"),
    (lambda: an.patch_embed_pcs(np.ones((4, 3, 2, 2)), n=2), ValueError, "the same"),
    (lambda: an.fit_linear_probe(np.ones((3, 2)), np.array([0, 1, 3]), 3), ValueError, "lie in 0..2"),
    (lambda: an.fit_linear_probe(np.ones((3, 2)), np.array([0, 1]), 3), ValueError, r"must be \(3,\)"),
    (lambda: an.fit_linear_probe(np.ones((3, 2)), np.array([0.0, 1, 2]), 3), TypeError, "integer class"),
    (lambda: an.fit_linear_probe(np.ones((3, 2)), np.array([0, 1, 2]), 3, l2=-1), ValueError, "l2 must be"),
    (lambda: an.fit_linear_probe(np.ones(3), np.array([0, 1, 2]), 3), ValueError, r"\(B, D\)"),
    (lambda: an.probe_accuracy(np.ones((3, 2)), np.ones(2), np.ones((4, 2)), np.zeros(4, int)), ValueError,
     r"W must be \(D, K\)"),
    (lambda: an.few_shot(np.ones((4, 2)), np.array([0, 0, 1, 1]), np.ones((2, 2)), np.array([0, 1]), shots=3),
     ValueError, "class 0 has only 2"),
    (lambda: an.few_shot(np.ones((4, 2)), np.array([0, 0, 1, 1]), np.ones((2, 3)), np.array([0, 1]), shots=1),
     ValueError, "same width"),
    (lambda: an.few_shot(np.ones((4, 2)), np.array([0, 0, 1, 1]), np.ones((2, 2)), np.array([0, 1]), shots=0),
     ValueError, "each value of shots"),
    (lambda: an.attention_maps(ViT(TINY), np.ones((2, 3, 16, 16), np.float32), batch_size=0), ValueError,
     "batch_size must be a positive integer"),
    (lambda: an.features("model", np.ones((2, 3, 16, 16), np.float32)), TypeError, "minivit ViT"),
    (lambda: an.features(ViT(TINY), np.ones((2, 3, 8, 8), np.float32)), ValueError, "shape"),
])
def test_bad_input_is_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ============================================================================= figures

def test_the_figures_draw(rng):
    def png(fig):
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()[:8]

    comps, ratio = an.patch_embed_pcs(rng.normal(size=(40, 3, 4, 4)), n=9)
    assert png(an.plot_filter_pcs(comps, ratio)) == PNG
    assert png(an.plot_filter_pcs(comps[:, :1])) == PNG                      # one channel: grey
    assert png(an.plot_pos_similarity(an.pos_embed_similarity(rng.normal(size=(17, 8)), 4))) == PNG
    assert png(an.plot_attention_distance(rng.uniform(0, 9, (3, 4)), uniform=6.0)) == PNG
    images = rng.integers(0, 256, (3, 3, 16, 16)).astype(np.uint8)
    assert png(an.plot_rollout(images, row_stochastic(rng, 3, 16).reshape(3, 4, 4))) == PNG
    assert png(an.plot_rollout(rng.normal(size=(2, 3, 16, 16)), np.ones((2, 4, 4)) / 16)) == PNG
    assert png(an.plot_few_shot({1: np.array([0.2, 0.3]), 5: np.array([0.5, 0.6])}, chance=0.1)) == PNG
    with pytest.raises(ValueError, match="same B"):
        an.plot_rollout(images, np.ones((2, 4, 4)))


# ============================================================================= `minivit analyze`

def balanced_data(n_train=100, n_test=30, seed=0):
    """A 16 x 16 CIFAR-like set, 10 classes, brightness by class; exactly n_train / 10 images a class."""
    rng = np.random.default_rng(seed)

    def split(labels):
        images = rng.integers(0, 100, (len(labels), 3, 16, 16)) + 15 * labels[:, None, None, None]
        return images.astype(np.uint8), labels.astype(np.int64)
    return CIFAR10(*split(rng.permutation(np.arange(n_train) % 10)), *split(rng.integers(0, 10, n_test)),
                   classes=[f"class{k}" for k in range(10)])


@pytest.fixture
def fake_cifar(monkeypatch):
    """`minivit analyze` loads this synthetic set instead of CIFAR-10."""
    import minivit.data
    data = balanced_data()
    monkeypatch.setattr(minivit.data, "find_cifar10", lambda path=None, download=True: "synthetic")
    monkeypatch.setattr(minivit.data, "load_cifar10", lambda path, limit=None: data)
    return data


MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def saved_checkpoint(tmp_path, config=TINY):
    from minivit.checkpoint import save_checkpoint
    return save_checkpoint(tmp_path / "best.npz", ViT(config, seed=3), None, 1, {},
                           extra={"normalize": {"mean": MEAN, "std": STD}})


def test_analyze_writes_every_figure_and_the_numbers_it_says(tmp_path, capsys, fake_cifar):
    from minivit.data import normalize
    ckpt, out = saved_checkpoint(tmp_path), tmp_path / "analysis"
    assert main(["analyze", str(ckpt), "--out", str(out), "--num-images", "12", "--batch-size", "5"]) == 0
    printed = capsys.readouterr()
    assert "mean attention distance per block" in printed.out and "few-shot accuracy: 1-shot" in printed.out
    names = ["filters_pca.png", "pos_similarity.png", "attention_distance.png", "rollout.png", "few_shot.png"]
    assert sorted(os.listdir(out)) == sorted(names + ["analysis.json"])         # no temp files left
    assert all((out / n).read_bytes()[:8] == PNG for n in names)
    report = json.loads((out / "analysis.json").read_text())
    assert report["files"] == names + ["analysis.json"] and report["config"]["depth"] == 2

    # the numbers, measured again here in one batch from the checkpoint's weights and normalisation
    model, _ = an.load_model(ckpt)
    x = normalize(fake_cifar.test_images[:12], MEAN, STD)
    distance = an.mean_attention_distance(an.attention_maps(model, x), 4, 4)
    got = report["attention_distance"]
    assert np.allclose(got["per_head"], distance, atol=2e-4) and np.array(got["per_head"]).shape == (2, 2)
    assert np.allclose(got["per_block"], distance.mean(axis=1), atol=2e-4)
    assert got["uniform"] == an.uniform_attention_distance(4, 4) and got["images"] == 12
    few = report["few_shot"]
    assert list(few["accuracy"]) == ["1", "5", "10"] and few["draws"] == 5      # 10 training images a class
    expected = an.few_shot(an.features(model, normalize(fake_cifar.train_images, MEAN, STD)), fake_cifar.train_labels,
                           an.features(model, normalize(fake_cifar.test_images, MEAN, STD)), fake_cifar.test_labels,
                           shots=(1, 5, 10))
    for s, acc in expected.items():
        assert np.allclose(few["accuracy"][str(s)]["draws"], acc, atol=1e-4)
    assert len(report["filters_pca"]["explained_ratio"]) == 16                   # min(28, D = 16, C*P*P = 48)


def test_analyze_image_files_with_fixed_or_no_positions(tmp_path, capsys):
    from PIL import Image
    from minivit.pretrained import save_pretrained
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(paths[-1])
    for pos, drawn in (("sincos2d", True), ("none", False)):
        weights = save_pretrained(ViT(TINY.replace(pos_embed=pos, pool="mean")), tmp_path / f"{pos}.safetensors")
        out = tmp_path / pos
        assert main(["analyze", str(weights), "--images", *map(str, paths), "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        assert "note: no training images (--images without --data): the few-shot probe is skipped" in printed
        assert ("the position embedding is the fixed 2-D sin-cos table" if drawn else "pos_embed='none'") in printed
        assert (out / "pos_similarity.png").exists() is drawn and not (out / "few_shot.png").exists()
        report = json.loads((out / "analysis.json").read_text())
        assert report["few_shot"] is None and report["rollout"] == {"images": 3, "pool": "mean"}


@pytest.mark.parametrize("args, message", [
    (["missing.npz"], "checkpoint not found"),
    (["CKPT", "--num-images", "0"], "--num-images must be a positive integer"),
    (["CKPT", "--batch-size", "-1"], "--batch-size must be a positive integer"),
    (["CKPT", "--out", "FILE"], "exists and is not a directory"),
    (["CKPT", "--images", "nowhere.png"], "image not found"),
])
def test_analyze_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    ckpt = saved_checkpoint(tmp_path)
    (tmp_path / "file").write_text("x")
    args = [str(ckpt) if a == "CKPT" else str(tmp_path / "file") if a == "FILE" else a for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    assert main(["analyze", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minivit analyze: error: ") and message in err[0], err


def test_analyze_refuses_a_resnet_checkpoint_clearly(tmp_path):
    from minivit.checkpoint import save_checkpoint
    from minivit.resnet import ResNet, ResNetConfig
    model = ResNet(ResNetConfig(layers=(1, 1, 1), widths=(4, 8, 8), stem="cifar", num_classes=10, img_size=16))
    path = save_checkpoint(tmp_path / "resnet.npz", model, None, epoch=1, rng_state={})
    with pytest.raises(ValueError, match="holds a resnet model; minivit analyze reads ViT checkpoints"):
        an.load_model(path)
