"""Lesson 12's exercise checkers accept the worked solutions, reject planted wrong answers, and report
a stub that still raises NotImplementedError as not attempted."""
from __future__ import annotations


import numpy as np
import pytest

from minivit.exercises import load_solutions, Wrong, lesson12

solutions = load_solutions("12")


def stub(*args, **kwargs):
    raise NotImplementedError


CHECKERS = [
    (lesson12.check_combine_shard_gradients, solutions.combine_shard_gradients),
    (lesson12.check_ring_allreduce, solutions.ring_allreduce),
    (lesson12.check_allreduce_seconds, solutions.allreduce_seconds),
]


@pytest.mark.parametrize("checker, solution", CHECKERS, ids=lambda f: getattr(f, "__name__", ""))
def test_checker_accepts_the_worked_solution(checker, solution, capsys):
    assert checker(solution) is True
    assert "PASSED" in capsys.readouterr().out


@pytest.mark.parametrize("checker", [c for c, _ in CHECKERS], ids=lambda f: f.__name__)
def test_checker_reports_a_stub_as_not_attempted(checker, capsys):
    assert checker(stub) is False
    assert "NOT ATTEMPTED YET" in capsys.readouterr().out


# ----------------------------------------------------------------------------- exercise 1

def combine_plain_mean(grads, sizes):
    # wrong: the classic mistake, the mean of the shard means (right only for equal shards)
    return {k: sum(g[k] for g in grads) / len(grads) for k in grads[0]}


def combine_sum(grads, sizes):
    # wrong: sums the shards' mean gradients without weighting or dividing (K times too large for equal shards)
    return {k: sum(g[k] for g in grads) for k in grads[0]}


def combine_weighted_over_k(grads, sizes):
    # wrong: weights by size but divides by K instead of by the batch size
    return {k: sum(s * g[k] for g, s in zip(grads, sizes)) / len(grads) for k in grads[0]}


@pytest.mark.parametrize("wrong, message", [(combine_plain_mean, "plain mean"), (combine_sum, "sum of the shards"),
                                            (combine_weighted_over_k, "B_k / B")],
                         ids=lambda f: getattr(f, "__name__", ""))
def test_combine_checker_rejects(wrong, message):
    with pytest.raises(Wrong, match=message):
        lesson12.check_combine_shard_gradients(wrong)


def test_the_plain_mean_is_right_for_equal_shards_only():
    # why the checker needs uneven splits: with equal shards the plain mean is the whole batch's gradient
    grads = [{"w": np.full(3, float(k))} for k in range(4)]
    equal = solutions.combine_shard_gradients(grads, [5] * 4)["w"]
    assert np.array_equal(combine_plain_mean(grads, [5] * 4)["w"], equal)
    assert not np.allclose(combine_plain_mean(grads, [1, 2, 3, 4])["w"],
                           solutions.combine_shard_gradients(grads, [1, 2, 3, 4])["w"])


# ----------------------------------------------------------------------------- exercise 2

def allreduce_all_to_all(buffers, send):
    # wrong: every rank sends its whole buffer to every other rank, K - 1 full buffers per rank
    K = len(buffers)
    received = [[b.copy()] for b in buffers]
    for r in range(K):
        for d in range(K):
            if d != r:
                received[d].append(send(r, d, buffers[r]))
    return [sum(rs[1:], rs[0]) for rs in received]


def allreduce_pass_whole_buffer(buffers, send):
    # wrong: a ring that passes whole buffers around: right neighbour only, but K - 1 full buffers per rank
    K = len(buffers)
    work = [b.copy() for b in buffers]
    moving = [b.copy() for b in buffers]
    for _ in range(K - 1):
        moving = [send(r, (r + 1) % K, moving[r]) for r in range(K)]
        moving = [moving[(r - 1) % K] for r in range(K)]         # what rank r received from r - 1
        for r in range(K):
            work[r] += moving[r]
    return work


def allreduce_floor_chunks(buffers, send):
    # wrong: chunks of n // K values, the remainder tacked onto the last chunk (not np.array_split's split):
    # the sum comes out right, but the messages are not the chunks the exercise asks for
    K, n = len(buffers), len(buffers[0])
    size = n // K
    chunks = [slice(r * size, (r + 1) * size if r < K - 1 else n) for r in range(K)]
    return _ring(buffers, send, chunks)


def allreduce_drops_remainder(buffers, send):
    # wrong: chunks of n // K values, the last n % K values never summed
    K, n = len(buffers), len(buffers[0])
    size = n // K
    return _ring(buffers, send, [slice(r * size, (r + 1) * size) for r in range(K)])


def allreduce_adds_in_all_gather(buffers, send):
    # wrong: adds the complete chunks again in the all-gather instead of copying them
    K, n = len(buffers), len(buffers[0])
    chunks = lesson12.ring_chunks(n, K)
    return _ring(buffers, send, chunks, gather=lambda mine, values: mine + values)


def allreduce_reduce_scatter_only(buffers, send):
    # wrong: stops after the reduce-scatter; each rank holds one complete chunk only
    K, n = len(buffers), len(buffers[0])
    return _ring(buffers, send, lesson12.ring_chunks(n, K), all_gather=False)


def allreduce_sums_directly(buffers, send):
    # wrong: computes the sum without the network and sends filler of the right sizes
    K, n = len(buffers), len(buffers[0])
    total = sum(buffers[1:], buffers[0].copy())
    chunks = lesson12.ring_chunks(n, K)
    for _ in range(2 * (K - 1)):
        for r in range(K):
            send(r, (r + 1) % K, np.zeros(chunks[r].stop - chunks[r].start))
    return [total.copy() for _ in range(K)]


def _ring(buffers, send, chunks, gather=lambda mine, values: values, all_gather=True):
    K = len(buffers)
    work = [b.copy() for b in buffers]
    for s in range(K - 1):
        arrived = [(r, (r - s) % K, send(r, (r + 1) % K, work[r][chunks[(r - s) % K]])) for r in range(K)]
        for r, c, values in arrived:
            work[(r + 1) % K][chunks[c]] += values
    for s in range(K - 1 if all_gather else 0):
        arrived = [(r, (r + 1 - s) % K, send(r, (r + 1) % K, work[r][chunks[(r + 1 - s) % K]])) for r in range(K)]
        for r, c, values in arrived:
            work[(r + 1) % K][chunks[c]] = gather(work[(r + 1) % K][chunks[c]], values)
    return work


@pytest.mark.parametrize("wrong, message", [
    (allreduce_all_to_all, "messages"),
    (allreduce_pass_whole_buffer, "messages"),
    (allreduce_floor_chunks, "np.array_split"),
    (allreduce_drops_remainder, "np.array_split"),
    (allreduce_adds_in_all_gather, "wrong values"),
    (allreduce_reduce_scatter_only, "messages"),
    (allreduce_sums_directly, "wrong values"),
], ids=lambda f: getattr(f, "__name__", ""))
def test_ring_checker_rejects(wrong, message):
    with pytest.raises(Wrong, match=message):
        lesson12.check_ring_allreduce(wrong)


def test_the_network_counts_two_k_minus_one_over_k_of_the_buffer_per_rank():
    # the byte count the lesson asserts, on the worked solution, for n divisible by K
    for K, n in [(2, 8), (4, 12), (8, 64)]:
        network = lesson12.Network(K)
        solutions.ring_allreduce([np.ones(n) for _ in range(K)], network.send)
        assert [network.bytes_sent(r) for r in range(K)] == [2 * (K - 1) * (n // K) * 8] * K


# ----------------------------------------------------------------------------- exercise 3

def seconds_without_all_gather(n, K, gbit, b=4, lat=0.0):
    return (K - 1) * (lat + n / K * b * 8 / (gbit * 1e9))


def seconds_bits_as_bytes(n, K, gbit, b=4, lat=0.0):
    return 2 * (K - 1) * (lat + n / K * b / (gbit * 1e9))


def seconds_naive_k_minus_one(n, K, gbit, b=4, lat=0.0):
    # wrong: K - 1 whole buffers per rank (the all-to-all), not 2(K - 1)/K
    return (K - 1) * (lat + n * b * 8 / (gbit * 1e9))


def seconds_latency_once(n, K, gbit, b=4, lat=0.0):
    # wrong: one latency per all-reduce instead of one per message
    return lat + 2 * (K - 1) / K * n * b * 8 / (gbit * 1e9) if K > 1 else 0.0


@pytest.mark.parametrize("wrong, message", [(seconds_without_all_gather, "all-gather"),
                                            (seconds_bits_as_bytes, "8 times too short"),
                                            (seconds_naive_k_minus_one, "expected"),
                                            (seconds_latency_once, "latency once per message")],
                         ids=lambda f: getattr(f, "__name__", ""))
def test_seconds_checker_rejects(wrong, message):
    with pytest.raises(Wrong, match=message):
        lesson12.check_allreduce_seconds(wrong)
