"""Worked solutions to lesson 12's exercises (lessons/12_data_parallel.ipynb).

Each function has the name of its stub in the notebook; minivit/exercises/lesson12.py grades them.
Legend: B batch, B_k the size of shard k, K ranks (shards), n values in a buffer.
"""
from __future__ import annotations

import numpy as np


def combine_shard_gradients(grads, sizes):
    """Exercise 1. grads: K dicts {name: gradient of the mean loss over shard k}; sizes: the K B_k.
    Returns {name: gradient of the mean loss over the whole batch}."""
    sizes = [int(s) for s in sizes]
    B = sum(sizes)
    # loss = (1/B) sum_i l_i = sum_k (B_k / B) * [(1/B_k) sum_{i in shard k} l_i]  =>  g = sum_k (B_k / B) g_k
    return {name: sum((size / B) * g[name] for g, size in zip(grads, sizes)) for name in grads[0]}


def ring_allreduce(buffers, send):
    """Exercise 2. buffers: K arrays (n,), one per rank; send(src, dst, array) -> the array dst receives.
    Returns K arrays (n,), each the sum of the K buffers."""
    K, n = len(buffers), len(buffers[0])
    # K chunks, split as np.array_split splits: the first n % K chunks one value longer (empty when n < K)
    sizes = [n // K + (r < n % K) for r in range(K)]
    starts = np.cumsum([0] + sizes[:-1])
    chunks = [slice(int(a), int(a) + z) for a, z in zip(starts, sizes)]
    work = [b.copy() for b in buffers]                                   # each rank's own copy, K x (n,)
    # Reduce-scatter: at step s rank r passes chunk (r - s) % K to its right-hand neighbour, which adds
    # it to its own. A chunk travels once around the ring gathering one rank's values per hop, so after
    # K - 1 steps rank r holds the complete sum of chunk (r + 1) % K.
    for s in range(K - 1):
        # every rank sends before any receives (they do it at the same time on a real network)
        arrived = [(r, (r - s) % K, send(r, (r + 1) % K, work[r][chunks[(r - s) % K]])) for r in range(K)]
        for r, c, values in arrived:
            work[(r + 1) % K][chunks[c]] += values
    # All-gather: at step s rank r passes chunk (r + 1 - s) % K, complete, to its neighbour, which
    # overwrites its own copy: every rank ends with every complete chunk, the same bits everywhere.
    for s in range(K - 1):
        arrived = [(r, (r + 1 - s) % K, send(r, (r + 1) % K, work[r][chunks[(r + 1 - s) % K]])) for r in range(K)]
        for r, c, values in arrived:
            work[(r + 1) % K][chunks[c]] = values
    return work


def allreduce_seconds(n_values, K, gbit_per_s, bytes_per_value=4, latency_s=0.0):
    """Exercise 3. The time of one ring all-reduce of n_values values on K ranks."""
    steps = 2 * (K - 1)                                   # K - 1 reduce-scatter steps, K - 1 all-gather steps
    chunk_bytes = n_values / K * bytes_per_value          # one message: one chunk of n / K values
    bytes_per_second = gbit_per_s * 1e9 / 8               # Gbit/s are bits: 8 to a byte
    return steps * (latency_s + chunk_bytes / bytes_per_second)
