"""Stronger training augmentation, by hand in NumPy: RandAugment, random erasing, Mixup and CutMix,
and the soft-target cross-entropy that mixed labels need.

Where each one sits in a training step (minivit.train; each is off unless its option is given):

    uint8 (B, C, S, S) --data.augment: random crop + flip--> uint8 (B, C, S, S)
      --rand_augment: N ops per image at magnitude M (--randaug-n, --randaug-m)--> uint8 (B, C, S, S)
      --random_erasing: one box per image with probability p (--reprob)--> uint8 (B, C, S, S)
      --data.normalize--> float (B, C, S, S)
      --Mixup: mixup or cutmix, one lambda per batch (--mixup-alpha, --cutmix-alpha, --mix-prob,
               --switch-prob)--> float (B, C, S, S) and soft targets (B, K)
      --model--> logits (B, K) --soft_target_cross_entropy_forward--> loss

RandAugment and random erasing work on the uint8 pixels, before normalisation, as PIL does on the
images of timm's pipeline: solarize and posterize act on the integer values 0..255, and the
colour ops round back to them. Mixup needs fractional pixels, so it works on the normalised
float batch (normalisation is affine per channel, so mixing normalised images is normalising
mixed ones). Everything is vectorised across the batch: one op is one NumPy call on all the
images that drew it, never a loop over images. Every random number comes from the Generator
passed in (the run's data Generator), so a run is reproducible from its seed and resumes bit for
bit.

Shape legend: B images, C channels, H, W image height and width (H = W = S), K classes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .backend import get_array_module

# ============================================================================= RandAugment ops
#
# Each op takes uint8 images (B, C, H, W) and, where it has one, a strength per image (B,), and
# returns new uint8 images (B, C, H, W). The photometric ones follow PIL (ImageOps, ImageEnhance),
# which timm's RandAugment calls; the geometric ones sample the nearest pixel, about the centre.


def _check_images(images, caller):
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        what = f"a {images.dtype} array of shape {images.shape}" if isinstance(images, np.ndarray) else \
            f"a {type(images).__name__}"
        raise TypeError(f"{caller} expects uint8 NumPy images (B, C, H, W) in 0..255, got {what}; augment on "
                        f"the CPU, before normalising")


def _per_image(value, B, name):
    """A scalar or one value per image, as a float64 (B,) array."""
    value = np.asarray(value, dtype=np.float64)
    if value.ndim == 0:
        value = np.full(B, float(value))
    if value.shape != (B,):
        raise ValueError(f"{name} must be a number or one per image ({B},), got shape {value.shape}")
    return value


def _to_uint8(x):
    """float pixels -> uint8: rounded to the nearest integer (halves up), clipped to 0..255."""
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


def _gray(images):
    """float64 (B, 1, H, W) luminance: ITU-R 601-2 luma, as PIL's convert("L") (L = 0.299 R +
    0.587 G + 0.114 B); an image with other than 3 channels: the mean of its channels."""
    x = images.astype(np.float64)
    if images.shape[1] == 3:
        return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]     # (B, 1, H, W)
    return x.mean(axis=1, keepdims=True)                                           # (B, 1, H, W)


def _blend(degenerate, images, factor):
    """PIL's ImageEnhance: degenerate + factor * (image - degenerate), per image. factor 0 gives the
    degenerate image, 1 the image itself, above 1 pushes away from the degenerate one."""
    f = factor[:, None, None, None]                                                # (B, 1, 1, 1)
    return _to_uint8(degenerate + f * (images.astype(np.float64) - degenerate))    # (B, C, H, W)


def identity(images):
    """The image unchanged (one of RandAugment's 14 ops: drawing it weakens the augmentation)."""
    _check_images(images, "identity")
    return images.copy()


def autocontrast(images):
    """Each channel of each image stretched so its darkest pixel becomes 0 and its brightest 255,
    exactly as PIL's ImageOps.autocontrast (cutoff 0): v -> int(v * scale + offset), with scale
    = 255 / (hi - lo), offset = -lo * scale; a channel of one value is left alone."""
    _check_images(images, "autocontrast")
    x = images.astype(np.float64)
    lo = x.min(axis=(2, 3), keepdims=True)                                         # (B, C, 1, 1)
    hi = x.max(axis=(2, 3), keepdims=True)                                         # (B, C, 1, 1)
    flat = hi <= lo
    scale = 255.0 / np.where(flat, 1.0, hi - lo)                                   # (B, C, 1, 1)
    offset = -lo * scale
    # int() truncates toward zero; every value lies in [lo, hi], so x * scale + offset >= 0 and
    # truncation is floor (the same float operations, in the same order, as PIL's table).
    out = np.clip(np.floor(x * scale + offset), 0, 255)                            # (B, C, H, W)
    return np.where(flat, images, out.astype(np.uint8))


def equalize(images):
    """Each channel's histogram equalised, exactly as PIL's ImageOps.equalize: with h the channel's
    histogram and step = (number of pixels - count of its brightest value) // 255, value i maps to
    (step // 2 + pixels darker than i) // step; a channel with one value, or step 0, is left alone."""
    _check_images(images, "equalize")
    B, C, H, W = images.shape
    planes = images.reshape(B * C, H * W).astype(np.int64)                         # (B*C, H*W)
    # All the histograms in one bincount: plane p's value v counts in bin p * 256 + v.
    offsets = (np.arange(B * C) * 256)[:, None]                                    # (B*C, 1)
    hist = np.bincount((planes + offsets).ravel(), minlength=B * C * 256).reshape(B * C, 256)
    last = 255 - np.argmax(hist[:, ::-1] > 0, axis=1)                              # (B*C,) brightest value present
    top_count = hist[np.arange(B * C), last]                                       # (B*C,)
    step = (H * W - top_count) // 255                                              # (B*C,)
    darker = np.cumsum(hist, axis=1) - hist                                        # (B*C, 256) pixels below i
    safe = np.maximum(step, 1)[:, None]
    lut = np.minimum((step[:, None] // 2 + darker) // safe, 255)                   # (B*C, 256); PIL saturates
    one_value = (hist > 0).sum(axis=1) <= 1
    lut = np.where((one_value | (step == 0))[:, None], np.arange(256), lut)
    out = np.take_along_axis(lut, planes, axis=1)                                  # (B*C, H*W)
    return out.reshape(B, C, H, W).astype(np.uint8)


def solarize(images, threshold):
    """Every pixel value >= threshold inverted (v -> 255 - v), as PIL's ImageOps.solarize; one
    threshold per image (or one for all). threshold 256 changes nothing, 0 inverts everything."""
    _check_images(images, "solarize")
    t = _per_image(threshold, len(images), "threshold")[:, None, None, None]       # (B, 1, 1, 1)
    return np.where(images >= t, 255 - images, images)


def posterize(images, bits):
    """Each pixel value kept to its `bits` highest bits (the others zeroed), as PIL's
    ImageOps.posterize; bits in 1..8 per image (or one for all), 8 changes nothing."""
    _check_images(images, "posterize")
    b = _per_image(bits, len(images), "bits")
    if np.any((b < 1) | (b > 8) | (b != np.round(b))):
        raise ValueError(f"bits must be whole numbers in 1..8, got {np.unique(b).tolist()}")
    mask = (255 & ~(2 ** (8 - b.astype(np.int64)) - 1)).astype(np.uint8)           # (B,)
    return images & mask[:, None, None, None]


def brightness(images, factor):
    """PIL's ImageEnhance.Brightness: blended with a black image; factor 0 is black, 1 the image."""
    _check_images(images, "brightness")
    return _blend(0.0, images, _per_image(factor, len(images), "factor"))


def contrast(images, factor):
    """PIL's ImageEnhance.Contrast: blended with a flat grey image at the image's mean luminance
    (its grey version's mean); factor 0 is that flat grey."""
    _check_images(images, "contrast")
    mean = _gray(images).mean(axis=(1, 2, 3), keepdims=True)                       # (B, 1, 1, 1)
    return _blend(mean, images, _per_image(factor, len(images), "factor"))


def color(images, factor):
    """PIL's ImageEnhance.Color (saturation): blended with the image's grey version; factor 0 is grey."""
    _check_images(images, "color")
    return _blend(_gray(images), images, _per_image(factor, len(images), "factor"))


def sharpness(images, factor):
    """PIL's ImageEnhance.Sharpness: blended with a smoothed copy, the 3 x 3 kernel
    [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 inside and the border pixels kept (as PIL's SMOOTH
    filter leaves them); factor 0 is the smoothed image, above 1 sharpens."""
    _check_images(images, "sharpness")
    x = images.astype(np.float64)
    H, W = x.shape[2:]
    smooth = x.copy()
    if H >= 3 and W >= 3:
        box = sum(x[:, :, i:H - 2 + i, j:W - 2 + j] for i in range(3) for j in range(3))   # (B, C, H-2, W-2)
        smooth[:, :, 1:-1, 1:-1] = (box + 4 * x[:, :, 1:-1, 1:-1]) / 13          # centre weight 1 + 4 = 5
    return _blend(smooth, images, _per_image(factor, len(images), "factor"))


def _fill_values(fill, C):
    fill = np.broadcast_to(np.asarray(fill, dtype=np.float64), (C,))
    if np.any((fill < 0) | (fill > 255)):
        raise ValueError(f"fill must be pixel values in 0..255 (one, or one per channel), got {fill.tolist()}")
    return np.floor(fill + 0.5).astype(np.uint8)                                   # (C,)


def affine(images, matrices, fill=128):
    """Each image resampled through its own 2 x 3 matrix, nearest pixel, `fill` where the source
    falls outside the image.

    matrices (B, 2, 3) map an output pixel's position to the source position it shows, both
    measured from the image centre in pixels (x to the right, y down); pixel (row i, column j) is
    the unit cell whose centre is (j + 0.5 - W / 2, i + 0.5 - H / 2). So the identity is
    [[1, 0, 0], [0, 1, 0]], and [[1, 0, -2], [0, 1, 0]] shows each output pixel the one 2 to its
    left: the content moves 2 pixels right."""
    _check_images(images, "affine")
    B, C, H, W = images.shape
    matrices = np.asarray(matrices, dtype=np.float64)
    if matrices.shape != (B, 2, 3):
        raise ValueError(f"matrices must have shape ({B}, 2, 3), one per image, got {matrices.shape}")
    fill = _fill_values(fill, C)
    ys = np.arange(H) + 0.5 - H / 2                                                # (H,)
    xs = np.arange(W) + 0.5 - W / 2                                                # (W,)
    a = matrices[:, :, None, None, :]                                              # (B, 2, 1, 1, 3)
    src = a[..., 0] * xs[None, None, None, :] + a[..., 1] * ys[None, None, :, None] + a[..., 2]  # (B, 2, H, W)
    # The source pixel is the cell that holds the source position: floor, back in corner units.
    # (Positions that are exact half-cells, as in a 90-degree turn, land on cell centres.)
    sx = np.floor(src[:, 0] + W / 2).astype(np.int64)                              # (B, H, W)
    sy = np.floor(src[:, 1] + H / 2).astype(np.int64)                              # (B, H, W)
    inside = (sx >= 0) & (sx < W) & (sy >= 0) & (sy < H)                           # (B, H, W)
    b = np.arange(B)[:, None, None]                                                # (B, 1, 1)
    # The index arrays sit around the ':' for channels, so NumPy puts their dimensions first.
    picked = images[b, :, np.where(inside, sy, 0), np.where(inside, sx, 0)]        # (B, H, W, C)
    out = np.where(inside[..., None], picked, fill)                                # (B, H, W, C)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))                         # (B, C, H, W)


def rotate(images, degrees, fill=128):
    """Each image turned counter-clockwise by its angle in degrees (as PIL's Image.rotate and
    np.rot90), about its centre; nearest pixel, `fill` in the corners that come from outside."""
    _check_images(images, "rotate")
    t = np.deg2rad(_per_image(degrees, len(images), "degrees"))
    c, s = np.cos(t), np.sin(t)
    z = np.zeros_like(t)
    # Turning the content counter-clockwise on screen (y down) maps (x, y) to
    # (x cos t + y sin t, -x sin t + y cos t); each output pixel shows the inverse of that.
    return affine(images, np.stack([np.stack([c, -s, z], 1), np.stack([s, c, z], 1)], 1), fill)


def shear_x(images, shear, fill=128):
    """Rows slid sideways in proportion to their height above the centre: (x, y) -> (x + shear * y, y)."""
    _check_images(images, "shear_x")
    k = _per_image(shear, len(images), "shear")
    one, z = np.ones_like(k), np.zeros_like(k)
    return affine(images, np.stack([np.stack([one, -k, z], 1), np.stack([z, one, z], 1)], 1), fill)


def shear_y(images, shear, fill=128):
    """Columns slid up or down in proportion to their distance from the centre: (x, y) -> (x, y + shear * x)."""
    _check_images(images, "shear_y")
    k = _per_image(shear, len(images), "shear")
    one, z = np.ones_like(k), np.zeros_like(k)
    return affine(images, np.stack([np.stack([one, z, z], 1), np.stack([-k, one, z], 1)], 1), fill)


def translate_x(images, pixels, fill=128):
    """The content moved right by `pixels` (left if negative), `fill` coming in at the other side."""
    _check_images(images, "translate_x")
    d = _per_image(pixels, len(images), "pixels")
    one, z = np.ones_like(d), np.zeros_like(d)
    return affine(images, np.stack([np.stack([one, z, -d], 1), np.stack([z, one, z], 1)], 1), fill)


def translate_y(images, pixels, fill=128):
    """The content moved down by `pixels` (up if negative)."""
    _check_images(images, "translate_y")
    d = _per_image(pixels, len(images), "pixels")
    one, z = np.ones_like(d), np.zeros_like(d)
    return affine(images, np.stack([np.stack([one, z, z], 1), np.stack([z, one, -d], 1)], 1), fill)


# The 14 ops of RandAugment (Cubuk et al., 2020, Table 1 / its code), in its order.
RAND_AUGMENT_OPS = ("identity", "autocontrast", "equalize", "rotate", "solarize", "color", "posterize",
                    "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y")
MAX_MAGNITUDE = 10           # timm's _LEVEL_DENOM: magnitude M runs from 0 to 10


def op_strength(name, magnitude, sign, side):
    """The strength of op `name` at magnitude M (0..10) for images of side `side` pixels, with a
    sign per image (+1 or -1, (B,)) for the ops that go both ways. timm's `increasing` ranges,
    so that a larger M is always a stronger op:

        rotate       30 * M / 10 degrees                  shear_x/y    0.3 * M / 10
        translate    0.45 * M / 10 of the side, rounded to whole pixels (14 px at M 10, S 32)
        solarize     threshold 256 - 256 * M / 10 (M 0: nothing inverted)
        posterize    8 - int(4 * M / 10) bits kept (8..4; never the all-black 0 bits)
        color, contrast, brightness, sharpness    factor 1 + 0.9 * M / 10 * sign (0.1..1.9)
    """
    level = magnitude / MAX_MAGNITUDE
    if name == "rotate":
        return 30.0 * level * sign
    if name in ("shear_x", "shear_y"):
        return 0.3 * level * sign
    if name in ("translate_x", "translate_y"):
        return np.round(0.45 * level * side) * sign
    if name == "solarize":
        return np.full(len(sign), 256.0 - round(256 * level))
    if name == "posterize":
        return np.full(len(sign), 8.0 - int(4 * level))
    if name in ("color", "contrast", "brightness", "sharpness"):
        return 1.0 + 0.9 * level * sign
    return None                                  # identity, autocontrast, equalize: no strength


_OPS = {"identity": identity, "autocontrast": autocontrast, "equalize": equalize, "rotate": rotate,
        "solarize": solarize, "color": color, "posterize": posterize, "contrast": contrast,
        "brightness": brightness, "sharpness": sharpness, "shear_x": shear_x, "shear_y": shear_y,
        "translate_x": translate_x, "translate_y": translate_y}
_GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


def apply_op(name, images, magnitude, sign=None, fill=128):
    """RandAugment's op `name` on every image at magnitude M; sign (B,) of +1 / -1 says which way
    the two-way ops go (default +1)."""
    if name not in _OPS:
        raise ValueError(f"unknown op {name!r}; RandAugment's ops are {', '.join(RAND_AUGMENT_OPS)}")
    sign = np.ones(len(images)) if sign is None else _per_image(sign, len(images), "sign")
    strength = op_strength(name, magnitude, sign, images.shape[-1])
    if strength is None:
        return _OPS[name](images)
    if name in _GEOMETRIC:
        return _OPS[name](images, strength, fill)
    return _OPS[name](images, strength)


def _check_rng(rng, caller):
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"{caller} expects rng to be a numpy.random.Generator (np.random.default_rng(seed)), "
                        f"got {type(rng).__name__}")


def rand_augment(images, rng: np.random.Generator, num_ops: int = 2, magnitude: float = 9, fill=128):
    """RandAugment (Cubuk et al., 2020): num_ops ops in a row on each image, each drawn uniformly
    (with replacement) from RAND_AUGMENT_OPS, all at the one magnitude M (0..10), the two-way
    ops in a random direction per image. uint8 (B, C, H, W) in, uint8 (B, C, H, W) out.

    As in the paper, a drawn op is always applied (timm applies each with probability 0.5, and
    its rand-m9-mstd0.5 also jitters M per op: a weaker augmentation at the same M). The draws
    are the same whatever the images (per round: B ops, B signs), so the Generator's stream
    does not depend on the data. fill: the pixel value (or one per channel) that geometric ops
    bring in from outside the image (minivit.train passes the data's mean colour, which
    normalises to 0)."""
    _check_images(images, "rand_augment")
    _check_rng(rng, "rand_augment")
    if isinstance(num_ops, bool) or not isinstance(num_ops, (int, np.integer)) or num_ops < 0:
        raise ValueError(f"num_ops must be an integer >= 0, got {num_ops!r}")
    if not 0 <= magnitude <= MAX_MAGNITUDE:
        raise ValueError(f"magnitude must be in [0, {MAX_MAGNITUDE}], got {magnitude!r}")
    out = images.copy()
    B = len(images)
    for _ in range(num_ops):
        choice = rng.integers(0, len(RAND_AUGMENT_OPS), B)                         # (B,) which op per image
        sign = np.where(rng.random(B) < 0.5, -1.0, 1.0)                            # (B,) which way
        for k, name in enumerate(RAND_AUGMENT_OPS):
            idx = np.flatnonzero(choice == k)                                      # the images that drew op k
            if idx.size and name != "identity":
                out[idx] = apply_op(name, out[idx], magnitude, sign[idx], fill)
    return out


def random_erasing(images, rng: np.random.Generator, prob: float, fill=128, scale=(0.02, 1 / 3),
                   ratio=(0.3, 1 / 0.3), attempts: int = 10):
    """Random erasing (Zhong et al., 2020; timm's RandomErasing, mode "const"): with probability
    `prob` an image gets one rectangle painted `fill` (the mean colour: 0 once normalised, as
    Cutout's zeros). Its area is a uniform fraction `scale` of the image, its aspect ratio h / w
    log-uniform in `ratio`; of `attempts` candidates the first that fits inside is taken (an image
    with none that fits is left alone), its corner uniform over the places it fits.
    uint8 (B, C, H, W) in and out. The same number of draws for every batch of B images."""
    _check_images(images, "random_erasing")
    _check_rng(rng, "random_erasing")
    if not 0 <= prob <= 1:
        raise ValueError(f"prob must be in [0, 1], got {prob!r}")
    B, C, H, W = images.shape
    fill = _fill_values(fill, C)
    erase = rng.random(B) < prob                                                   # (B,)
    area = rng.uniform(scale[0], scale[1], (B, attempts)) * (H * W)                # (B, attempts) pixels
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (B, attempts)))
    h = np.round(np.sqrt(area * aspect)).astype(np.int64)                          # (B, attempts)
    w = np.round(np.sqrt(area / aspect)).astype(np.int64)                          # (B, attempts)
    fits = (h >= 1) & (w >= 1) & (h < H) & (w < W)                                 # timm: h < H and w < W
    first = np.argmax(fits, axis=1)                                                # (B,) first that fits
    rows = np.arange(B)
    erase &= fits[rows, first]
    h, w = h[rows, first], w[rows, first]                                          # (B,), (B,)
    top = np.floor(rng.random(B) * (H - h + 1)).astype(np.int64)                   # (B,) in 0..H-h
    left = np.floor(rng.random(B) * (W - w + 1)).astype(np.int64)                  # (B,) in 0..W-w
    ys, xs = np.arange(H)[None, :, None], np.arange(W)[None, None, :]
    box = ((ys >= top[:, None, None]) & (ys < (top + h)[:, None, None])
           & (xs >= left[:, None, None]) & (xs < (left + w)[:, None, None]))       # (B, H, W)
    box &= erase[:, None, None]
    return np.where(box[:, None], fill[None, :, None, None], images)               # (B, C, H, W)


# ============================================================================= Mixup and CutMix

@dataclass(frozen=True)
class MixParams:
    """How one batch is mixed: image i becomes lam * image i + (1 - lam) * image perm[i] (mixup),
    or image i with the box rows top:bottom, columns left:right pasted from image perm[i]
    (cutmix; lam is then the share of image i left). perm None: the batch is not mixed (lam 1)."""

    lam: float
    perm: np.ndarray | None = None                 # (B,) partner of each image
    box: tuple | None = None                       # (top, bottom, left, right) for cutmix

    @property
    def kind(self):
        return "none" if self.perm is None else ("cutmix" if self.box is not None else "mixup")


@dataclass(frozen=True)
class Mixup:
    """timm's Mixup in "batch" mode: one lambda for the whole batch, drawn from Beta(alpha, alpha).

    mixup_alpha   > 0: mixup (Zhang et al., 2018): whole images blended, labels blended alike
    cutmix_alpha  > 0: cutmix (Yun et al., 2019): a box of the partner pasted in; lambda is
                  recomputed from the box's real area after it is clipped at the border
    prob          the chance that a batch is mixed at all (else its targets are plain one-hots)
    switch_prob   with both alphas > 0, the chance that a mixed batch uses cutmix (else mixup)
    label_smoothing  applied to the mixed one-hots: (1 - s) * mix + s / K, as timm's mixup_target

    Partners are a random permutation of the batch (timm pairs the batch with its reverse)."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.0

    def __post_init__(self):
        for name in ("mixup_alpha", "cutmix_alpha"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0 (0 turns it off), got {value!r}")
        for name in ("prob", "switch_prob"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def draw(self, rng: np.random.Generator, batch: int, height: int, width: int) -> MixParams:
        """The mixing of one batch of `batch` images of height x width, drawn from rng."""
        _check_rng(rng, "Mixup.draw")
        if not self.enabled or rng.random() >= self.prob:
            return MixParams(1.0)
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = bool(rng.random() < self.switch_prob)
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        perm = rng.permutation(batch)                                              # (B,)
        if not use_cutmix:
            return MixParams(lam, perm)
        box = cutmix_box(rng, lam, height, width)
        top, bottom, left, right = box
        lam = 1.0 - (bottom - top) * (right - left) / (height * width)             # the box's real area
        return MixParams(lam, perm, box)


def cutmix_box(rng, lam, height, width):
    """timm's rand_bbox: a box of about (1 - lam) of the image, sides sqrt(1 - lam) of the image's,
    centred at a uniform random pixel, clipped at the border (so it may be smaller)."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    top, bottom = min(max(cy - cut_h // 2, 0), height), min(max(cy + cut_h // 2, 0), height)
    left, right = min(max(cx - cut_w // 2, 0), width), min(max(cx + cut_w // 2, 0), width)
    return top, bottom, left, right


def mix_images(x, partner, params: MixParams):
    """The mixed batch: x (B, C, H, W) float, partner = x[params.perm] (or the partners' rows of a
    shard of the batch). NumPy or CuPy."""
    if params.perm is None:
        return x
    if params.box is None:
        return params.lam * x + (1.0 - params.lam) * partner                       # (B, C, H, W)
    top, bottom, left, right = params.box
    out = x.copy()
    out[:, :, top:bottom, left:right] = partner[:, :, top:bottom, left:right]
    return out


def mix_targets(labels, num_classes: int, params: MixParams, label_smoothing: float = 0.0):
    """Soft targets (B, K) float64: lam * one_hot(labels) + (1 - lam) * one_hot(labels[perm]),
    then label smoothing (1 - s) * t + s / K; each row sums to 1. NumPy labels (B,)."""
    labels = np.asarray(labels)
    B = len(labels)
    target = np.zeros((B, num_classes))                                            # (B, K)
    target[np.arange(B), labels] = params.lam
    if params.perm is not None:
        # add, not assign: an image paired with itself (or a partner of its own class) keeps both shares
        np.add.at(target, (np.arange(B), labels[params.perm]), 1.0 - params.lam)
    return (1.0 - label_smoothing) * target + label_smoothing / num_classes


def dominant_labels(labels, params: MixParams):
    """The label that weighs more in each mixed image, for training accuracy: the image's own
    (lam >= 1/2, ties included) or its partner's."""
    labels = np.asarray(labels)
    return labels if params.perm is None or params.lam >= 0.5 else labels[params.perm]


def mixup_batch(x, labels, rng, mixup: Mixup, num_classes: int):
    """(mixed x, soft targets (B, K), params) of a whole batch: draw, mix the images, mix the labels."""
    params = mixup.draw(rng, len(x), x.shape[2], x.shape[3])
    partner = x if params.perm is None else x[params.perm]
    return (mix_images(x, partner, params), mix_targets(labels, num_classes, params, mixup.label_smoothing),
            params)


# ============================================================================= the loss on soft targets

def soft_target_cross_entropy_forward(logits, target):
    """timm's SoftTargetCrossEntropy: mean over the batch of -sum_k target[k] * log softmax(logits)[k].
    logits (B, K), target (B, K) with rows of probabilities (mixed, smoothed one-hots). The same as
    torch.nn.functional.cross_entropy(logits, target) with class-probability targets; with one-hot
    rows it is the ordinary cross-entropy."""
    xp = get_array_module(logits)
    if logits.ndim != 2 or tuple(target.shape) != tuple(logits.shape):
        raise ValueError(f"soft targets must have the logits' shape (B, K) = {tuple(logits.shape)}, got "
                         f"{tuple(target.shape)}")
    B = logits.shape[0]
    target = xp.asarray(target, dtype=logits.dtype)
    shifted = logits - logits.max(axis=1, keepdims=True)                           # (B, K), max is 0
    logsumexp = xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))                # (B, 1)
    logp = shifted - logsumexp                                                     # (B, K)
    loss = -(target * logp).sum() / B                                              # scalar
    return loss, (logp, target)


def soft_target_cross_entropy_backward(cache, dloss=1.0):
    """Gradient of the mean loss with respect to the logits (B, K). The cache comes first, as in
    ops.cross_entropy_backward."""
    logp, target = cache
    xp = get_array_module(logp)
    B = logp.shape[0]
    # forward: loss = -sum(target * logp) / B, logp = logits - logsumexp(logits)
    #   d logp_k / d logits_j = [k == j] - softmax_j, so
    #   dlogits_j = -(target_j - softmax_j * sum_k target_k) / B   (= (softmax - target) / B when rows sum to 1)
    return (xp.exp(logp) * target.sum(axis=1, keepdims=True) - target) * (dloss / B)   # (B, K)
