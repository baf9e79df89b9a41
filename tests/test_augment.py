"""minivit.augment: RandAugment ops, random erasing, Mixup / CutMix and the soft-target loss.

Expected values come from elsewhere: PIL (the library timm's RandAugment calls) for the
photometric ops, np.rot90 and hand-built pixel patterns for the geometric ones, hand-counted
areas for CutMix, torch for the loss, central differences for its gradient.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps

from minivit import augment as aug
from minivit.gradcheck import TOLERANCE, check_op, rel_error


def images(B=6, C=3, S=8, seed=0, low=0, high=256):
    return np.random.default_rng(seed).integers(low, high, (B, C, S, S)).astype(np.uint8)


def pil_each(batch, op):
    """op applied by PIL to each image of a uint8 (B, 3, H, W) batch."""
    out = [np.asarray(op(Image.fromarray(np.ascontiguousarray(im.transpose(1, 2, 0))))) for im in batch]
    return np.stack(out).transpose(0, 3, 1, 2)


# ----------------------------------------------------------------------------- every op

@pytest.mark.parametrize("name", aug.RAND_AUGMENT_OPS)
@pytest.mark.parametrize("magnitude", [0, 5, 10])
def test_every_op_keeps_shape_dtype_and_range_and_leaves_its_input_alone(name, magnitude):
    x = images(B=5, S=12)
    before = x.copy()
    sign = np.array([1, -1, 1, -1, 1.0])
    y = aug.apply_op(name, x, magnitude, sign, fill=(10, 20, 30))
    assert y.shape == x.shape and y.dtype == np.uint8
    assert np.array_equal(x, before)                                 # a new array, the input untouched
    if magnitude == 0 and name not in ("autocontrast", "equalize"):  # strength 0 is the identity
        assert np.array_equal(y, x), name


@pytest.mark.parametrize("name", ["identity", "autocontrast", "equalize", "solarize", "posterize", "color",
                                  "contrast", "brightness", "sharpness"])
def test_photometric_ops_act_on_each_image_alone(name):
    """Vectorised over the batch, but no image's result depends on another image."""
    x = images(B=4, S=10, seed=3)
    sign = np.array([1, -1, -1, 1.0])
    whole = aug.apply_op(name, x, 7, sign)
    one_by_one = np.concatenate([aug.apply_op(name, x[i:i + 1], 7, sign[i:i + 1]) for i in range(4)])
    assert np.array_equal(whole, one_by_one)


# ----------------------------------------------------------------------------- against PIL

def test_autocontrast_and_equalize_equal_pil():
    x = images(B=5, S=16, seed=1, low=30, high=200)      # a narrow range: autocontrast has work to do
    x[1, 0] = 77                                         # a flat channel: left alone by both
    x[2, 1, :8] = 0                                      # lopsided histograms
    x[2, 2] = np.random.default_rng(5).integers(0, 3, (16, 16))   # few values: PIL's step is 0
    assert np.array_equal(aug.autocontrast(x), pil_each(x, ImageOps.autocontrast))
    assert np.array_equal(aug.equalize(x), pil_each(x, ImageOps.equalize))
    big = images(B=2, S=32, seed=2)                      # step >= 1 with a full histogram
    assert np.array_equal(aug.equalize(big), pil_each(big, ImageOps.equalize))


def test_solarize_and_posterize_equal_pil_and_known_values():
    x = images(B=3, S=8, seed=4)
    thresholds, bits = np.array([0, 128, 256]), np.array([1, 4, 8])
    got = aug.solarize(x, thresholds)
    for i, t in enumerate(thresholds):
        assert np.array_equal(got[i], pil_each(x[i:i + 1], lambda im: ImageOps.solarize(im, int(t)))[0])
    got = aug.posterize(x, bits)
    for i, b in enumerate(bits):
        assert np.array_equal(got[i], pil_each(x[i:i + 1], lambda im: ImageOps.posterize(im, int(b)))[0])
    v = np.array([0, 100, 127, 128, 200, 255], np.uint8).reshape(1, 1, 1, 6)
    assert aug.solarize(v, 128).ravel().tolist() == [0, 100, 127, 127, 55, 0]
    assert aug.posterize(v, 2).ravel().tolist() == [0, 64, 64, 128, 192, 192]
    with pytest.raises(ValueError, match="bits"):
        aug.posterize(v, 0)


def test_colour_ops_by_hand():
    """Brightness scales, contrast pulls toward the mean luminance, color toward each pixel's
    luminance, sharpness toward the 3 x 3 smoothed image; values by hand on a 2-pixel image."""
    x = np.array([[[[100, 200]], [[50, 50]], [[0, 250]]]], np.uint8)          # (1, 3, 1, 2)
    assert aug.brightness(x, 0.5).ravel().tolist() == [50, 100, 25, 25, 0, 125]
    assert aug.brightness(x, 2.0).ravel().tolist() == [200, 255, 100, 100, 0, 255]   # clipped
    gray = np.array([0.299 * 100 + 0.587 * 50 + 0.114 * 0, 0.299 * 200 + 0.587 * 50 + 0.114 * 250])
    assert np.array_equal(aug.color(x, 0.0)[0, :, 0], np.floor(np.tile(gray, (3, 1)) + 0.5))
    assert np.array_equal(aug.contrast(x, 0.0)[0], np.full((3, 1, 2), np.floor(gray.mean() + 0.5)))
    f = 1.5
    expected = np.clip(np.floor(gray.mean() + f * (x[0].astype(float) - gray.mean()) + 0.5), 0, 255)
    assert np.array_equal(aug.contrast(x, f)[0], expected)
    # Sharpness: factor 0 on a 3 x 3 image changes only the centre, to (sum of the 8 + 5 * centre) / 13.
    y = np.array([[10, 0, 0], [0, 130, 0], [0, 0, 0]], np.uint8).reshape(1, 1, 3, 3)
    smoothed = aug.sharpness(y, 0.0)
    expected = y.copy()
    expected[0, 0, 1, 1] = round((10 + 5 * 130) / 13)                     # 50.77 -> 51
    assert np.array_equal(smoothed, expected)
    for op in (aug.brightness, aug.contrast, aug.color, aug.sharpness):
        assert np.array_equal(op(images(), 1.0), images())              # factor 1 is the identity


# ----------------------------------------------------------------------------- geometry

def test_rotate_by_90_equals_rot90_and_360_is_the_identity():
    x = images(B=3, S=8, seed=6)
    assert np.array_equal(aug.rotate(x, 90), np.rot90(x, 1, axes=(2, 3)))
    assert np.array_equal(aug.rotate(x, -90), np.rot90(x, -1, axes=(2, 3)))
    assert np.array_equal(aug.rotate(x, 180), x[:, :, ::-1, ::-1])
    assert np.array_equal(aug.rotate(x, [0, 360, -360]), x)
    # A small turn keeps the centre pixels and fills the corners.
    y = aug.rotate(x, 30, fill=(1, 2, 3))
    assert y[0, :, 0, 0].tolist() == [1, 2, 3]
    assert np.array_equal(y[:, :, 3:5, 3:5], x[:, :, 3:5, 3:5])


def test_translate_moves_a_pattern_by_exactly_that_many_pixels():
    x = np.zeros((2, 3, 8, 8), np.uint8)
    x[:, :, 3, 2] = 200                                  # one bright pixel at row 3, column 2
    x[:, :, 5, 6] = 100
    right = aug.translate_x(x, [2, -2], fill=0)
    assert right[0, 0, 3, 4] == 200 and right[0, 0, 5, 6 + 2 - 8] == 0 and right[0].sum() == 3 * 200
    assert right[1, 0, 3, 0] == 200 and right[1, 0, 5, 4] == 100
    down = aug.translate_y(x, 2, fill=7)
    assert np.array_equal(down[:, :, 2:], x[:, :, :-2]) and np.all(down[:, :, :2] == 7)
    left = aug.translate_x(x, -3, fill=9)
    assert np.array_equal(left[:, :, :, :-3], x[:, :, :, 3:]) and np.all(left[:, :, :, -3:] == 9)


def test_shear_slides_rows_in_proportion_to_their_height():
    """shear_x by 1 about the centre of an 8 x 8 image: a row whose centre is y below the image
    centre (y = row + 0.5 - 4) slides right by y pixels; shear_y is the same, transposed."""
    x = images(B=1, C=1, S=8, seed=7)
    y = aug.shear_x(x, 1.0, fill=0)
    for row in range(8):
        shift = row + 0.5 - 4                            # -3.5 .. 3.5; output column j reads j - shift
        for j in range(8):
            src = int(np.floor(j + 0.5 - shift))         # nearest: the cell holding the source point
            expected = x[0, 0, row, src] if 0 <= src < 8 else 0
            assert y[0, 0, row, j] == expected
    assert np.array_equal(aug.shear_y(x, 1.0, fill=0), aug.shear_x(x.transpose(0, 1, 3, 2), 1.0, fill=0)
                          .transpose(0, 1, 3, 2))


def test_op_strengths_follow_the_magnitude():
    sign = np.array([1.0, -1.0])
    assert aug.op_strength("rotate", 10, sign, 32).tolist() == [30, -30]
    assert aug.op_strength("translate_x", 10, sign, 32).tolist() == [14, -14]        # 0.45 * 32 = 14.4
    assert aug.op_strength("solarize", 0, sign, 32).tolist() == [256, 256]           # nothing inverted
    assert aug.op_strength("posterize", 10, sign, 32).tolist() == [4, 4]
    np.testing.assert_allclose(aug.op_strength("contrast", 5, sign, 32), [1.45, 0.55])


# ----------------------------------------------------------------------------- RandAugment, erasing

def test_rand_augment_is_seeded_and_applies_num_ops_ops():
    x = images(B=16, S=16, seed=8)
    a = aug.rand_augment(x, np.random.default_rng(1), 2, 9)
    assert a.shape == x.shape and a.dtype == np.uint8
    assert np.array_equal(a, aug.rand_augment(x, np.random.default_rng(1), 2, 9))   # same seed, same batch
    assert not np.array_equal(a, aug.rand_augment(x, np.random.default_rng(2), 2, 9))
    assert np.array_equal(aug.rand_augment(x, np.random.default_rng(1), 0, 9), x)   # no ops
    # One op per image: each image equals what its drawn op does to it (replaying the draws).
    rng = np.random.default_rng(3)
    one = aug.rand_augment(x, rng, 1, 6, fill=(5, 6, 7))
    rng = np.random.default_rng(3)
    choice, sign = rng.integers(0, 14, 16), np.where(rng.random(16) < 0.5, -1.0, 1.0)
    for i in range(16):
        expected = aug.apply_op(aug.RAND_AUGMENT_OPS[choice[i]], x[i:i + 1], 6, sign[i:i + 1], fill=(5, 6, 7))
        assert np.array_equal(one[i:i + 1], expected)
    with pytest.raises(ValueError, match="magnitude"):
        aug.rand_augment(x, rng, 2, 11)
    with pytest.raises(TypeError, match="uint8"):
        aug.rand_augment(x.astype(np.float32), rng)


def test_random_erasing_paints_one_box_of_the_fill_colour():
    x = images(B=64, S=16, seed=9, low=1, high=250)
    y = aug.random_erasing(x, np.random.default_rng(0), 1.0, fill=(0, 255, 128))
    assert y.shape == x.shape and y.dtype == np.uint8
    changed = np.any(y != x, axis=1)                                      # (B, H, W)
    erased = 0
    for i in range(64):
        rows, cols = np.nonzero(changed[i])
        if rows.size == 0:
            continue
        erased += 1
        box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
        assert changed[i][box].all()                                      # one solid rectangle
        assert (y[i, :, box[0], box[1]] == np.array([0, 255, 128])[:, None, None]).all()
        area = changed[i].sum() / 256
        assert 0.02 - 0.02 <= area <= 1 / 3 + 0.05                        # rounding of h and w
    assert erased >= 55                                                   # nearly always a box fits
    assert np.array_equal(aug.random_erasing(x, np.random.default_rng(0), 0.0), x)
    assert np.array_equal(y, aug.random_erasing(x, np.random.default_rng(0), 1.0, fill=(0, 255, 128)))


# ----------------------------------------------------------------------------- Mixup and CutMix

def test_mixup_blends_images_and_labels_alike():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3, 4, 4))
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 7])
    mixed, target, p = aug.mixup_batch(x, labels, np.random.default_rng(1), aug.Mixup(mixup_alpha=0.8), 10)
    assert p.kind == "mixup" and 0 < p.lam < 1 and sorted(p.perm) == list(range(8))
    np.testing.assert_allclose(mixed, p.lam * x + (1 - p.lam) * x[p.perm])
    np.testing.assert_allclose(target.sum(axis=1), 1.0)
    for i in range(8):
        expected = np.zeros(10)
        expected[labels[i]] += p.lam
        expected[labels[p.perm[i]]] += 1 - p.lam
        np.testing.assert_allclose(target[i], expected)


def test_cutmix_lambda_is_the_real_pasted_area():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 3, 16, 16))
    labels = np.array([1, 2, 3, 4])
    mixup = aug.Mixup(cutmix_alpha=1.0)
    seen_clipped = False
    for seed in range(40):
        mixed, target, p = aug.mixup_batch(x, labels, np.random.default_rng(seed), mixup, 5)
        assert p.kind == "cutmix"
        pasted = np.any(mixed != x, axis=1)[np.array(p.perm) != np.arange(4)]     # (n, H, W), self-pairs excluded
        top, bottom, left, right = p.box
        area = (bottom - top) * (right - left)
        if len(pasted):
            assert (pasted.sum(axis=(1, 2)) == area).all()                         # counted pixel by pixel
        assert p.lam == pytest.approx(1 - area / 256)
        assert np.allclose(target.sum(axis=1), 1)
        for i in range(4):                       # an image paired with itself keeps its whole label
            share = p.lam if p.perm[i] != i else 1.0
            assert target[i, labels[i]] == pytest.approx(share)
        seen_clipped |= area < int(16 * np.sqrt(1 - p.lam)) ** 2 or top == 0 or right == 16
    assert seen_clipped                                                           # some boxes hit the border


def test_switch_prob_and_mix_prob_choose_per_batch():
    kinds = [aug.Mixup(1.0, 1.0, prob=0.8, switch_prob=0.25).draw(np.random.default_rng(s), 4, 8, 8).kind
             for s in range(400)]
    assert kinds.count("none") == pytest.approx(80, abs=30)
    assert kinds.count("cutmix") == pytest.approx(0.8 * 0.25 * 400, abs=30)
    assert aug.Mixup(0.0, 0.0).draw(np.random.default_rng(0), 4, 8, 8).kind == "none"
    with pytest.raises(ValueError, match="switch_prob"):
        aug.Mixup(1.0, 1.0, switch_prob=1.5)


def test_mixed_targets_with_label_smoothing_sum_to_one_and_match_timm_formula():
    p = aug.MixParams(0.7, np.array([1, 0, 2]))
    labels = np.array([3, 5, 5])
    t = aug.mix_targets(labels, 6, p, label_smoothing=0.1)
    np.testing.assert_allclose(t.sum(axis=1), 1.0)
    off, on = 0.1 / 6, 1 - 0.1 + 0.1 / 6              # timm's mixup_target: smoothed one-hots, then mixed
    y1, y2 = np.full((3, 6), off), np.full((3, 6), off)
    y1[np.arange(3), labels] = on
    y2[np.arange(3), labels[p.perm]] = on
    np.testing.assert_allclose(t, 0.7 * y1 + 0.3 * y2)
    assert aug.dominant_labels(labels, p).tolist() == [3, 5, 5]
    assert aug.dominant_labels(labels, aug.MixParams(0.3, p.perm)).tolist() == [5, 3, 5]


def test_mixup_is_seeded():
    x = np.random.default_rng(0).standard_normal((8, 3, 8, 8))
    labels = np.arange(8) % 3
    m = aug.Mixup(0.8, 1.0, prob=0.9)
    a = [aug.mixup_batch(x, labels, np.random.default_rng(s), m, 3) for s in (5, 5, 6)]
    assert np.array_equal(a[0][0], a[1][0]) and np.array_equal(a[0][1], a[1][1])
    assert not np.array_equal(a[0][0], a[2][0])


# ----------------------------------------------------------------------------- the loss

def test_soft_target_cross_entropy_gradient_check():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 7)) * 3
    target = rng.random((5, 7))
    target /= target.sum(axis=1, keepdims=True)
    errors = check_op(lambda logits: aug.soft_target_cross_entropy_forward(logits, target),
                      lambda dout, cache: aug.soft_target_cross_entropy_backward(cache, dout),
                      {"logits": logits}, ("logits",))
    assert errors["logits"] < TOLERANCE
    # Rows that do not sum to 1 (the backward keeps the general formula).
    errors = check_op(lambda logits: aug.soft_target_cross_entropy_forward(logits, 2.5 * target),
                      lambda dout, cache: aug.soft_target_cross_entropy_backward(cache, dout),
                      {"logits": logits}, ("logits",))
    assert errors["logits"] < TOLERANCE


def test_soft_target_cross_entropy_matches_torch(torch):
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((6, 10)) * 4
    p = aug.MixParams(0.62, rng.permutation(6))
    target = aug.mix_targets(rng.integers(0, 10, 6), 10, p, label_smoothing=0.1)
    loss, cache = aug.soft_target_cross_entropy_forward(logits, target)
    dlogits = aug.soft_target_cross_entropy_backward(cache)
    t_logits = torch.tensor(logits, requires_grad=True)
    t_loss = torch.nn.functional.cross_entropy(t_logits, torch.tensor(target))
    t_loss.backward()
    assert rel_error(np.array(loss), t_loss.detach().numpy()) < 1e-12
    assert rel_error(dlogits, t_logits.grad.numpy()) < 1e-10
    # One-hot targets with smoothing: torch's own label_smoothing on integer labels.
    labels = rng.integers(0, 10, 6)
    t = aug.mix_targets(labels, 10, aug.MixParams(1.0), label_smoothing=0.1)
    ref = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(labels), label_smoothing=0.1)
    assert rel_error(np.array(aug.soft_target_cross_entropy_forward(logits, t)[0]), ref.numpy()) < 1e-12
