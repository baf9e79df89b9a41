"""Checkers for lesson 12 (data parallelism by hand).

    check_combine_shard_gradients(combine_shard_gradients)   exercise 1: one gradient from K shards' gradients
    check_ring_allreduce(ring_allreduce)                     exercise 2: a ring all-reduce over simulated ranks
    check_allreduce_seconds(allreduce_seconds)               exercise 3: the time of one ring all-reduce

Exercise 1 is graded with minivit itself: a tiny ViT in float64 computes the gradient of a whole batch
and of its shards (equal and uneven splits), and the learner's combination of the shards' gradients
must equal the whole batch's. Exercise 2 runs the learner's all-reduce on a simulated network: the
checker's `send` records every message (who sends, to whom, how many bytes, what it holds), so a ring
that sends too much, to the wrong rank, or the wrong partial sums is caught, not only a wrong result.
Shape legend: B batch, K ranks (shards), n values in a buffer.
"""
from __future__ import annotations

import math

import numpy as np

from ..config import ViTConfig
from ..model import ViT
from ..ops import cross_entropy_backward, cross_entropy_forward
from . import Wrong, exercise, expect_close


# ----------------------------------------------------------------------------- exercise 1

# A tiny ViT: 8 x 8 images cut into 4 patches of 4 x 4, one block, float64, no dropout.
TINY = ViTConfig(img_size=8, patch_size=4, num_classes=10, dim=16, depth=1, heads=2, mlp_dim=32)


def batch_gradients(model, x, y):
    """{name: gradient of the mean cross-entropy over the batch (x, y)}, for every parameter."""
    logits = model(x)                                                # (B, K)
    _, cache = cross_entropy_forward(logits, y)
    model.zero_grad()
    model.backward(cross_entropy_backward(cache))
    return {name: p.grad.copy() for name, p in model.named_parameters()}


def _combined(got, names, where):
    if not isinstance(got, dict):
        raise Wrong(f"combine_shard_gradients must return a dict {{name: array}}, got {type(got).__name__} ({where})")
    if set(got) != set(names):
        missing, extra = sorted(set(names) - set(got)), sorted(set(got) - set(names))
        raise Wrong(f"the returned dict must have one entry per parameter ({where}); "
                    f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}")
    return got


def _diagnose(got, grads, sizes):
    """A hint naming the usual mistake the learner's answer matches, if it matches one."""
    name = next(iter(grads[0]))
    value = np.asarray(got[name], dtype=np.float64)
    plain_mean = sum(g[name] for g in grads) / len(grads)
    plain_sum = sum(g[name] for g in grads)
    if np.allclose(value, plain_mean, rtol=1e-9, atol=1e-14):
        return ("That is the plain mean of the shards' gradients: right only when every shard has the same "
                f"size (these have {list(sizes)}). Weight shard k by its size B_k / B.")
    if np.allclose(value, plain_sum, rtol=1e-9, atol=1e-14):
        return ("That is the sum of the shards' gradients: each shard's gradient is already a mean; "
                "weight it by B_k / B.")
    return "The whole batch's gradient is sum_k (B_k / B) g_k, with B = sum_k B_k."


@exercise("combine the shards' gradients into the whole batch's gradient")
def check_combine_shard_gradients(combine_shard_gradients):
    """combine_shard_gradients(grads, sizes) -> {name: array}: grads is a list of K dicts {name:
    gradient of the mean loss over shard k}, sizes the K shard sizes. Graded against the gradient of
    the whole batch, computed by minivit."""
    rng = np.random.default_rng(12)
    model = ViT(TINY, seed=3).astype(np.float64)
    names = [name for name, _ in model.named_parameters()]
    # (B, shard sizes): equal shards, uneven ones (one image alone), two shards, and K = 1
    cases = [(9, [3, 3, 3]), (8, [5, 2, 1]), (7, [1, 6]), (4, [4]), (13, [2, 7, 1, 3])]
    worst = 0.0
    for B, sizes in cases:
        x = rng.standard_normal((B, 3, 8, 8))                      # (B, C, S, S)
        y = rng.integers(0, 10, size=B)                            # (B,)
        whole = batch_gradients(model, x, y)
        ends = np.cumsum(sizes)
        grads = [batch_gradients(model, x[e - s:e], y[e - s:e]) for s, e in zip(sizes, ends)]
        given = [{k: v.copy() for k, v in g.items()} for g in grads]
        # sizes as a plain list here, as a NumPy array in the last case: both must work
        got = combine_shard_gradients(given, np.array(sizes) if B == 13 else list(sizes))
        where = f"B = {B} split into shards of {sizes}"
        got = _combined(got, names, where)
        for name in names:
            try:
                expect_close(f"{name} ({where})", got[name], whole[name], rtol=1e-10, atol=1e-14)
            except Wrong as wrong:
                raise Wrong(f"{wrong}. {_diagnose(got, grads, sizes)}") from None
            scale = np.abs(whole[name]).max()
            if scale > 0:
                worst = max(worst, float(np.abs(np.asarray(got[name]) - whole[name]).max() / scale))
    # Shards as different in size as they get: 1 image against 99 (plain arrays, no model).
    grads = [{"w": rng.standard_normal((2, 3))}, {"w": rng.standard_normal((2, 3))}]
    got = _combined(combine_shard_gradients([dict(g) for g in grads], [1, 99]), ["w"], "sizes [1, 99]")
    want = (1 * grads[0]["w"] + 99 * grads[1]["w"]) / 100
    try:
        expect_close("w (shards of 1 and 99 images)", got["w"], want, rtol=1e-12)
    except Wrong as wrong:
        raise Wrong(f"{wrong}. {_diagnose(got, grads, [1, 99])}") from None
    return (f"{len(cases)} splits of a batch (equal, uneven, K = 1) of a float64 ViT, every parameter: "
            f"equal to the whole batch's gradient (largest difference {worst:.1e} of the gradient's size)")


# ----------------------------------------------------------------------------- exercise 2

class Network:
    """A simulated network of K ranks: send(src, dst, array) delivers a copy of array to dst and
    records the message (sender, receiver, its values), so the checker can read the traffic."""

    def __init__(self, K):
        self.K = K
        self.messages = [[] for _ in range(K)]     # messages[r]: what rank r sent, in order

    def send(self, src, dst, array):
        for name, rank in (("src", src), ("dst", dst)):
            if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < self.K:
                raise Wrong(f"send({src!r}, {dst!r}, ...): {name} must be a rank 0..{self.K - 1}")
        if not isinstance(array, np.ndarray) or array.ndim != 1:
            raise Wrong(f"send: rank {src} sent {type(array).__name__}"
                        f"{' of shape ' + str(array.shape) if isinstance(array, np.ndarray) else ''}; "
                        f"send one chunk, a 1-D slice of a buffer")
        if src == dst:
            raise Wrong(f"send: rank {src} sent a message to itself")
        self.messages[src].append((int(dst), array.copy()))
        return array.copy()                        # what dst receives: a copy, never the sender's array

    def bytes_sent(self, rank):
        return sum(a.nbytes for _, a in self.messages[rank])


def ring_chunks(n, K):
    """The K chunks of a buffer of n values, as slices: np.array_split's split (the first n % K
    chunks one value longer than the others; chunks are empty when n < K)."""
    sizes = [n // K + (r < n % K) for r in range(K)]
    ends = np.cumsum(sizes)
    return [slice(int(e - s), int(e)) for s, e in zip(sizes, ends)]


def expected_messages(buffers):
    """For each rank, the 2(K-1) messages of the ring in order: (receiver, values)."""
    K = len(buffers)
    chunks = ring_chunks(len(buffers[0]), K)
    total = sum(buffers[1:], buffers[0].copy())
    out = [[] for _ in range(K)]
    for r in range(K):
        for s in range(K - 1):                     # reduce-scatter: chunk (r - s) % K, summed over s + 1 ranks
            c = chunks[(r - s) % K]
            out[r].append(((r + 1) % K, sum(buffers[(r - j) % K][c] for j in range(s + 1))))
        for s in range(K - 1):                     # all-gather: chunk (r + 1 - s) % K, complete
            out[r].append(((r + 1) % K, total[chunks[(r + 1 - s) % K]]))
    return out


def _check_traffic(network, buffers, where):
    K, n = len(buffers), len(buffers[0])
    want = expected_messages(buffers)
    for r in range(K):
        sent = network.messages[r]
        for i, (dst, _) in enumerate(sent):
            if dst != (r + 1) % K:
                raise Wrong(f"{where}: rank {r} sent message {i + 1} to rank {dst}; in a ring every rank sends "
                            f"only to its right-hand neighbour, rank {(r + 1) % K}")
        if len(sent) != 2 * (K - 1):
            big = max((a.size for _, a in sent), default=0)
            raise Wrong(f"{where}: rank {r} sent {len(sent)} messages (the largest {big} values); a ring all-reduce "
                        f"sends 2(K - 1) = {2 * (K - 1)}: K - 1 chunks in the reduce-scatter, K - 1 in the all-gather")
        for i, ((_, got), (_, expect)) in enumerate(zip(sent, want[r])):
            phase, s = ("reduce-scatter", i) if i < K - 1 else ("all-gather", i - (K - 1))
            c = (r - s) % K if phase == "reduce-scatter" else (r + 1 - s) % K
            if got.shape != expect.shape:
                raise Wrong(f"{where}: at {phase} step {s}, rank {r} sent {got.size} values; chunk {c} has "
                            f"{expect.size} (chunks are np.array_split(range({n}), {K}): the first {n % K} "
                            f"of them one value longer)")
            if not np.allclose(got, expect, rtol=1e-12, atol=1e-12):
                what = (f"the sum of chunk {c} over ranks {[(r - j) % K for j in range(s + 1)]}"
                        if phase == "reduce-scatter" else f"the complete sum of chunk {c}")
                raise Wrong(f"{where}: at {phase} step {s}, rank {r} sent the wrong values; it should send {what}")


@exercise("a ring all-reduce over simulated ranks")
def check_ring_allreduce(ring_allreduce):
    """ring_allreduce(buffers, send) -> list of K arrays, each the sum of the K buffers; every message
    goes through the checker's send(src, dst, array)."""
    rng = np.random.default_rng(2)
    # (K, n): one rank, n divisible by K, n not divisible by K, n < K (empty chunks), a larger ring
    cases = [(1, 5), (2, 8), (3, 10), (4, 4), (4, 3), (5, 23), (8, 1000)]
    for K, n in cases:
        buffers = [rng.standard_normal(n) for _ in range(K)]                      # K x (n,)
        given = [b.copy() for b in buffers]
        network = Network(K)
        where = f"K = {K} ranks, n = {n} values"
        results = ring_allreduce(given, network.send)
        if not all(np.array_equal(g, b) for g, b in zip(given, buffers)):
            raise Wrong(f"{where}: ring_allreduce changed the buffers it was given; work on copies")
        if not isinstance(results, (list, tuple)) or len(results) != K:
            raise Wrong(f"{where}: return a list of K = {K} arrays, one per rank, got {type(results).__name__}"
                        + (f" of length {len(results)}" if isinstance(results, (list, tuple)) else ""))
        _check_traffic(network, buffers, where)
        total = sum(buffers[1:], buffers[0].copy())
        for r, got in enumerate(results):
            expect_close(f"rank {r}'s result ({where})", got, total, rtol=1e-12, atol=1e-12)
        if not all(np.array_equal(results[0], got) for got in results[1:]):
            raise Wrong(f"{where}: the ranks' results differ in their last bits; in the all-gather each rank must "
                        f"copy the complete chunks it receives, not add them up again")
        per_rank = [network.bytes_sent(r) for r in range(K)]
        assert sum(per_rank) == 2 * (K - 1) * n * 8                    # follows from the messages checked above
    return (f"{len(cases)} rings (n divisible by K or not, n < K, K = 1): the sum on every rank, bit for bit the same, "
            f"2(K - 1) messages per rank, each the right chunk with the right partial sum")


# ----------------------------------------------------------------------------- exercise 3

def ring_allreduce_seconds(n_values, K, gbit_per_s, bytes_per_value=4, latency_s=0.0):
    """The alpha-beta model of a ring all-reduce: 2(K - 1) steps, each one message of n / K values
    per rank, all ranks sending at once: 2(K - 1) latency + 2(K - 1)/K n bytes / bandwidth."""
    if K == 1:
        return 0.0
    steps = 2 * (K - 1)
    return steps * latency_s + steps / K * n_values * bytes_per_value * 8 / (gbit_per_s * 1e9)


@exercise("the time of one ring all-reduce (alpha-beta model)")
def check_allreduce_seconds(allreduce_seconds):
    """allreduce_seconds(n_values, K, gbit_per_s, bytes_per_value, latency_s) -> seconds."""
    # (n, K, Gbit/s, bytes per value, latency): the two models of the lesson, bf16, one rank, a big ring
    cases = [(1_794_058, 2, 1.0, 4, 0.0), (1_794_058, 8, 10.0, 4, 2e-5), (86_567_656, 64, 100.0, 2, 5e-6),
             (86_567_656, 256, 100.0, 4, 5e-6), (1000, 1, 1.0, 4, 1e-3), (10_000, 3, 1.0, 8, 5e-5),
             (1, 256, 10.0, 4, 2e-5)]
    for n, K, bw, b, lat in cases:
        got = allreduce_seconds(n, K, bw, b, lat)
        try:
            got = float(got)
        except (TypeError, ValueError):
            raise Wrong(f"allreduce_seconds must return a number of seconds, got {type(got).__name__}") from None
        want = ring_allreduce_seconds(n, K, bw, b, lat)
        if not math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-15):
            where = f"n = {n:,} values of {b} bytes, K = {K}, {bw:g} Gbit/s, latency {lat:g} s"
            ratio = got / want if want else float("inf")
            hint = ("Each rank sends 2(K - 1) messages of n / K values: 2(K - 1)/K n values in all, and pays the "
                    "latency once per message. A bandwidth in Gbit/s moves gbit_per_s * 1e9 / 8 bytes per second.")
            if want and math.isclose(ratio, 8, rel_tol=1e-6):
                hint = "8 times too long: a byte is 8 bits, and the bandwidth is in bits per second."
            elif want and math.isclose(ratio, 1 / 8, rel_tol=1e-6):
                hint = "8 times too short: a bandwidth in Gbit/s moves gbit_per_s * 1e9 / 8 bytes per second."
            elif want and math.isclose(ratio, 0.5, rel_tol=1e-6):
                hint = "Half the time: the all-gather after the reduce-scatter costs as much again."
            raise Wrong(f"{where}: got {got:.6g} s, expected {want:.6g} s. {hint}")
    return f"{len(cases)} cases (K = 1 to 256, float32, bf16 and float64, with and without latency): right"
