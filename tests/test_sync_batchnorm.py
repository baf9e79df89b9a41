"""Synchronised BatchNorm (cnn_ops.sync_batchnorm2d_*, cnn_fastops' twin): a batch split over K
ranks normalises, updates its running averages and back-propagates exactly as the whole batch
in one process does.

The K ranks here are K threads of this process that meet in `ThreadGroup.sum` (a barrier, then
every rank adds the K arrays in rank order: the same sum on every rank, as an all-reduce gives);
tests/test_distributed.py runs the real thing, a hybrid ViT on 2 MPI ranks against 1 process.

Shape legend: B batch, b a rank's shard of it, C channels, H, W height and width.
"""
import threading

import numpy as np
import pytest

from minivit import cnn_fastops, cnn_ops
from minivit.gradcheck import TOLERANCE, check_op

OPS = {"reference": cnn_ops, "fast": cnn_fastops}


class ThreadGroup:
    """The group of one rank among K threads: sum() and count() wait for every rank's value."""

    def __init__(self, shared, rank, weight):
        self.shared, self.rank, self.weight = shared, rank, weight

    def _all(self, value):
        slots, barrier = self.shared
        slots[self.rank] = value
        barrier.wait()                       # every rank has put its value
        values = list(slots)
        barrier.wait()                       # every rank has read them all: the slots may be reused
        return values

    def sum(self, a):
        values = self._all(a.copy())
        total = values[0].copy()
        for v in values[1:]:
            total += v
        return total

    def count(self, n):
        return sum(self._all(n))


def run_ranks(fn, shards, B):
    """fn(rank, group, lo, hi) on one thread per shard; returns the K results in rank order."""
    K = len(shards)
    shared = ([None] * K, threading.Barrier(K, timeout=20))
    results, errors = [None] * K, []

    def target(rank):
        lo, hi = shards[rank]
        try:
            results[rank] = fn(rank, ThreadGroup(shared, rank, (hi - lo) / B), lo, hi)
        except BaseException as exc:   # noqa: BLE001 (reported below, and the barrier is broken for the others)
            errors.append(exc)
            shared[1].abort()
    threads = [threading.Thread(target=target, args=(r,)) for r in range(K)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def bn_inputs(rng, shape):
    C = shape[1]
    return dict(x=rng.standard_normal(shape) * 2.0 + 1.0, weight=rng.uniform(0.5, 1.5, C),
                bias=rng.standard_normal(C), running_mean=rng.standard_normal(C) * 0.1,
                running_var=rng.uniform(0.5, 2.0, C))


# (batch shape, shards): even, uneven, a shard of one image, three ranks, 1 x 1 maps (statistics
# from the batch alone), one channel.
CASES = [((6, 3, 5, 4), [(0, 3), (3, 6)]),
         ((7, 2, 3, 5), [(0, 3), (3, 7)]),
         ((5, 4, 2, 2), [(0, 1), (1, 5)]),
         ((9, 2, 4, 3), [(0, 3), (3, 6), (6, 9)]),
         ((8, 3, 1, 1), [(0, 4), (4, 8)]),
         ((4, 1, 3, 3), [(0, 2), (2, 4)])]


@pytest.mark.parametrize("kind", OPS)
@pytest.mark.parametrize("shape,shards", CASES, ids=["even", "uneven", "one-image", "three-ranks", "1x1", "1ch"])
def test_shards_normalise_and_backpropagate_as_the_whole_batch(kind, shape, shards):
    """Each rank's output is its rows of the whole batch's output; its dx, times its weight
    n_r / B (the weight distributed.sum_gradients gives its gradients), is its rows of the whole
    batch's dx; the weighted dweight and dbias add up to the batch's; every rank ends with the
    batch's running averages. Each rank's dout is the gradient of its own mean loss: the batch's
    dout divided by its weight."""
    ops = OPS[kind]
    rng = np.random.default_rng(7)
    inputs = bn_inputs(rng, shape)
    B = shape[0]
    dout = rng.standard_normal(shape)                                    # d(batch loss)/d(out)
    rm, rv = inputs["running_mean"].copy(), inputs["running_var"].copy()
    out, cache = ops.batchnorm2d_forward(inputs["x"], inputs["weight"], inputs["bias"], rm, rv, True, 0.3, 1e-4)
    dx, dweight, dbias = ops.batchnorm2d_backward(dout, cache)

    def rank(r, group, lo, hi):
        rm_r, rv_r = inputs["running_mean"].copy(), inputs["running_var"].copy()
        out_r, cache_r = ops.sync_batchnorm2d_forward(inputs["x"][lo:hi], inputs["weight"], inputs["bias"],
                                                      rm_r, rv_r, True, group, 0.3, 1e-4)
        grads = ops.sync_batchnorm2d_backward(dout[lo:hi] / group.weight, cache_r)
        return out_r, grads, group.weight, rm_r, rv_r

    results = run_ranks(rank, shards, B)
    np.testing.assert_allclose(np.concatenate([r[0] for r in results]), out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.concatenate([r[1][0] * r[2] for r in results]), dx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sum(r[1][1] * r[2] for r in results), dweight, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sum(r[1][2] * r[2] for r in results), dbias, rtol=1e-10, atol=1e-12)
    for r in results:
        np.testing.assert_allclose(r[3], rm, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(r[4], rv, rtol=1e-12, atol=1e-14)
        assert np.array_equal(r[3], results[0][3]) and np.array_equal(r[4], results[0][4])   # the same on every rank


@pytest.mark.parametrize("kind", OPS)
def test_a_shard_normalised_alone_is_not_the_batch(kind):
    """The test above can fail: a rank that normalised with its own shard's statistics (plain
    batchnorm2d_forward) is off from the whole batch's output by far more than its tolerance."""
    ops = OPS[kind]
    rng = np.random.default_rng(8)
    inputs = bn_inputs(rng, (6, 3, 4, 4))
    inputs["x"][3:] += 2.0                                               # the shards differ in mean
    rm, rv = inputs["running_mean"].copy(), inputs["running_var"].copy()
    out, _ = ops.batchnorm2d_forward(inputs["x"], inputs["weight"], inputs["bias"], rm, rv, True)
    alone, _ = ops.batchnorm2d_forward(inputs["x"][:3], inputs["weight"], inputs["bias"], rm.copy(), rv.copy(), True)
    assert np.abs(alone - out[:3]).max() > 0.5


class OneRank:
    """A group of one rank: sums are the values themselves."""
    weight = 1.0

    def sum(self, a):
        return a.copy()

    def count(self, n):
        return n


@pytest.mark.parametrize("kind", OPS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_sync_batchnorm_gradients_and_one_rank_is_plain_batchnorm(kind, training):
    """float64 central differences for x, weight and bias; with one rank the op is batchnorm2d's."""
    ops = OPS[kind]
    rng = np.random.default_rng(9)
    inputs = {**bn_inputs(rng, (3, 2, 4, 5)), "training": training, "group": OneRank()}
    errors = check_op(ops.sync_batchnorm2d_forward, ops.sync_batchnorm2d_backward, inputs, ("x", "weight", "bias"))
    assert max(errors.values()) < TOLERANCE, errors
    plain = {k: (v.copy() if hasattr(v, "copy") else v) for k, v in inputs.items() if k != "group"}
    out, cache = ops.sync_batchnorm2d_forward(**{**inputs, "running_mean": plain["running_mean"].copy(),
                                                 "running_var": plain["running_var"].copy()})
    want, want_cache = ops.batchnorm2d_forward(**plain)
    np.testing.assert_allclose(out, want, rtol=1e-13, atol=1e-13)
    dout = rng.standard_normal(out.shape)
    for got, ref in zip(ops.sync_batchnorm2d_backward(dout, cache), ops.batchnorm2d_backward(dout, want_cache)):
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-13)


def test_fast_sync_batchnorm_matches_the_reference():
    """cnn_fastops' sync op against cnn_ops' on two ranks (the fast one is the ResNet's default)."""
    rng = np.random.default_rng(10)
    inputs = bn_inputs(rng, (5, 3, 3, 4))
    dout = rng.standard_normal((5, 3, 3, 4))

    def rank(r, group, lo, hi):
        outs = []
        for ops in (cnn_ops, cnn_fastops):
            out, cache = ops.sync_batchnorm2d_forward(inputs["x"][lo:hi], inputs["weight"], inputs["bias"],
                                                      inputs["running_mean"].copy(), inputs["running_var"].copy(),
                                                      True, group)
            outs.append((out, *ops.sync_batchnorm2d_backward(dout[lo:hi], cache)))
        return outs

    for reference, fast in run_ranks(rank, [(0, 2), (2, 5)], 5):
        for a, b in zip(reference, fast):
            np.testing.assert_allclose(b, a, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("kind", OPS)
def test_bad_groups_and_too_few_values_are_refused_by_name(kind):
    ops = OPS[kind]
    inputs = bn_inputs(np.random.default_rng(11), (1, 2, 1, 1))
    args = [inputs[k] for k in ("x", "weight", "bias", "running_mean", "running_var")]
    with pytest.raises(TypeError, match="group must have sum"):
        ops.sync_batchnorm2d_forward(*args, True, None)
    # one value per channel on this rank is fine when the ranks have more between them ...
    group = OneRank()
    group.count = lambda n: n + 3
    ops.sync_batchnorm2d_forward(*args, True, group)
    # ... but not when they have one in all
    with pytest.raises(ValueError, match="more than 1 value per channel over all ranks, got 1"):
        ops.sync_batchnorm2d_forward(*args, True, OneRank())
