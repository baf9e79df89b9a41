"""`minivit predict`: classify images with pretrained weights.

    minivit predict --weights vit-base-patch16-224/ cat.jpg dog.png --top 5
    minivit predict --weights vit-base-patch16-224/ cat.jpg --device gpu

The weights are anything load_pretrained reads (a Hugging Face directory, a timm
safetensors file, the paper's .npz). Each image is read with Pillow, converted to RGB,
resized to the checkpoint's S x S with bilinear filtering (as transformers'
ViTImageProcessor does: no crop), scaled to [0, 1] and normalised with the checkpoint's
mean and std. One forward pass per image; the top classes are printed with their
softmax probabilities. With --device gpu the model and each image are copied to the GPU
(CuPy) and the probabilities back.

Shape legend: C channels, S image side, K classes.
"""
from __future__ import annotations

import warnings

import numpy as np

from . import ops
from .backend import DEVICES, check_device, get_array_module, to_device, to_numpy
from .pretrained import load_pretrained

# The largest image read, in pixels (width x height). Decoding costs 3 to 4 bytes a pixel, and a
# PNG of a few hundred KB can declare 200 megapixels (a decompression bomb); the model sees at
# most a few hundred pixels a side anyway. 80 megapixels is more than nearly every camera gives
# (and below Pillow's own warning level, 89.5); resize a larger photo first. Checked from the
# image's header, before it is decoded. A module constant, so that a test can lower it.
MAX_IMAGE_PIXELS = 80_000_000


def register(subparsers):
    parser = subparsers.add_parser(
        "predict",
        help="classify images with pretrained weights",
        description="Classify images with a pretrained ViT (Hugging Face directory, timm .safetensors or the paper's .npz).",
    )
    parser.add_argument("--weights", required=True, metavar="PATH",
                        help="checkpoint: a Hugging Face directory, a .safetensors file or an .npz file")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    parser.add_argument("--top", type=int, default=5, help="how many classes to print per image (default 5)")
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="cpu (NumPy) or gpu (CuPy) (default cpu)")
    parser.set_defaults(func=run)


def read_image(path):
    """Open an image with Pillow and decode it fully, with one clear error if that fails."""
    from PIL import Image, UnidentifiedImageError
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own pixel limit (Image.MAX_IMAGE_PIXELS) and raises above twice
            # that; a warning would let a bomb through (it decodes anyway), so it is an error here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:       # reads the header only
                width, height = img.size
                if width * height > MAX_IMAGE_PIXELS:   # caught below, which names the file
                    raise ValueError(f"it is {width} x {height} = {width * height / 1e6:.1f} megapixels, more than "
                                     f"the {MAX_IMAGE_PIXELS / 1e6:g} megapixels minivit decodes (a decompression "
                                     f"bomb, or a very large photo: resize it first)")
                img.load()          # decode now: a truncated file fails here, not later
                return img.copy()
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {str(path)!r}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"cannot read image {str(path)!r}: refused as too large to decode safely ({exc}); "
                         f"resize it first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        # UnidentifiedImageError: not an image Pillow knows; OSError: truncated or a directory;
        # SyntaxError / ValueError: some plugins report broken headers this way.
        raise ValueError(f"cannot read image {str(path)!r}: {exc}") from None


def preprocess(img, size, mean, std, channels=3):
    """PIL image -> normalised float32 array (C, S, S)."""
    from PIL import Image
    img = img.convert("RGB" if channels == 3 else "L")
    img = img.resize((size, size), Image.Resampling.BILINEAR)
    x = np.asarray(img, dtype=np.float32) / 255.0                  # (S, S, C) or (S, S), in [0, 1]
    if x.ndim == 2:
        x = x[:, :, None]                                         # (S, S, 1)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))             # (C, S, S)


def top_classes(probs, k, class_names=None):
    """[(name, probability)] of the k most probable classes, most probable first."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [(class_names[i] if class_names else f"class {i}", float(probs[i])) for i in order]


def run(args):
    if args.top < 1:
        raise ValueError(f"--top must be at least 1, got {args.top}")
    device = check_device(getattr(args, "device", "cpu"))   # a GPU that cannot be used: gpu_status() says why
    # Read every image before the (slow) weight load, so a typo fails at once.
    images = [(path, read_image(path)) for path in args.images]
    model, meta = load_pretrained(args.weights)
    cfg = model.config
    if cfg.num_classes == 0:
        raise ValueError(f"{args.weights!r} has no classification head (num_classes = 0); nothing to predict")
    model.eval()
    model.to(device)
    k = min(args.top, cfg.num_classes)
    for path, img in images:
        x = preprocess(img, cfg.img_size, meta["mean"], meta["std"], cfg.in_chans)[None]   # (1, C, S, S)
        with np.errstate(over="ignore", invalid="ignore"):     # checked just below, in one clear line
            logits = model(to_device(x, device))                                         # (1, K)
        if not get_array_module(logits).isfinite(logits).all():   # finite weights can still overflow float32
            raise ValueError(f"the model's outputs (logits) for {path!r} are not finite (NaN or infinity); "
                             f"the weights {args.weights!r} are unusable")
        probs, _ = ops.softmax_forward(logits.astype(np.float64), axis=-1)               # (1, K)
        probs = to_numpy(probs)                                                          # on the host
        print(path)
        for name, p in top_classes(probs[0], k, meta["class_names"]):
            print(f"  {p:7.2%}  {name}")
    return 0
