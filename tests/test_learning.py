"""It learns: a tiny ViT overfits a fixed batch, and generalises on a small synthetic task."""
import numpy as np

from minivit import ViT, ViTConfig
from minivit.ops import cross_entropy_backward, cross_entropy_forward
from minivit.optim import AdamW


def train_step(model, opt, x, y):
    logits = model(x)
    loss, cache = cross_entropy_forward(logits, y)
    model.zero_grad()
    model.backward(cross_entropy_backward(cache))
    opt.step()
    return float(loss), logits


def test_overfits_a_fixed_batch():
    cfg = ViTConfig(img_size=16, patch_size=4, num_classes=10, dim=32, depth=2, heads=4, mlp_dim=64)
    model = ViT(cfg, seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 3, 16, 16)).astype(np.float32)
    y = rng.integers(0, 10, 16)
    opt = AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first, _ = train_step(model, opt, x, y)
    for _ in range(80):
        last, logits = train_step(model, opt, x, y)
    assert last < 0.1 * first, f"loss went from {first:.3f} to {last:.3f}, less than a 90% drop"
    assert (logits.argmax(1) == y).all()


def quadrant_images(n, rng, size=16):
    """Class k: a bright 4x4 square somewhere in quadrant k of a noisy image. Solving it
    needs the position embeddings: the square looks the same in every quadrant."""
    x = rng.standard_normal((n, 3, size, size)).astype(np.float32) * 0.5
    y = rng.integers(0, 4, n)
    half = size // 2
    for i, k in enumerate(y):
        r = (k // 2) * half + rng.integers(0, half - 3)
        c = (k % 2) * half + rng.integers(0, half - 3)
        x[i, :, r:r + 4, c:c + 4] += 2.0
    return x, y


def test_learns_a_synthetic_task_and_generalises():
    rng = np.random.default_rng(1)
    x_train, y_train = quadrant_images(512, rng)
    x_test, y_test = quadrant_images(256, rng)
    cfg = ViTConfig(img_size=16, patch_size=4, num_classes=4, dim=32, depth=2, heads=4, mlp_dim=64)
    model = ViT(cfg, seed=0)
    opt = AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    for epoch in range(15):
        order = rng.permutation(len(x_train))
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            train_step(model, opt, x_train[idx], y_train[idx])
    model.eval()
    accuracy = (model(x_test).argmax(1) == y_test).mean()
    assert accuracy > 0.85, f"held-out accuracy {accuracy:.3f} (chance is 0.25)"
