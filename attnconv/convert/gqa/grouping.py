"""Balanced grouping of KV heads: which heads share a group, chosen by the cost of merging them.

A grouping splits the n_kv heads into n_out groups of equal size. Its cost is the sum of its groups' costs,
each given by the caller (the relative key + value objective of the merge the method will do). Small
problems are solved exactly by enumerating every grouping. Large ones (a 7B model's 32 heads into 8 groups:
~10^20 groupings) search on a pairwise proxy, group cost ~ (2 / size) x the sum of its pairs' costs (exact for
a mean merge in a Euclidean metric), by local search from the contiguous grouping (best swap of two heads
between groups until none helps) plus seeded random restarts; the true costs then pick among the results and
the contiguous grouping.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from itertools import combinations

Group = tuple[int, ...]
MAX_EXHAUSTIVE = 20_000  # groupings enumerated exactly up to this count (8 heads: at most 105)
RESTARTS = 4


def count_groupings(n: int, size: int) -> int:
    k = n // size
    return math.factorial(n) // (math.factorial(size) ** k * math.factorial(k))


def contiguous(n: int, size: int) -> list[Group]:
    return [tuple(range(g, g + size)) for g in range(0, n, size)]


def _all_groupings(items: tuple[int, ...], size: int):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for others in combinations(rest, size - 1):
        group = (first, *others)
        remaining = tuple(i for i in rest if i not in others)
        for tail in _all_groupings(remaining, size):
            yield [group, *tail]


def _local_search(groups: list[Group], cost: Callable[[Group], float]) -> tuple[list[Group], float]:
    groups = [tuple(sorted(g)) for g in groups]
    costs = [cost(g) for g in groups]
    while True:
        best = (0.0, None)
        for a, b in combinations(range(len(groups)), 2):
            for i in groups[a]:
                for j in groups[b]:
                    ga = tuple(sorted([*(h for h in groups[a] if h != i), j]))
                    gb = tuple(sorted([*(h for h in groups[b] if h != j), i]))
                    gain = costs[a] + costs[b] - cost(ga) - cost(gb)
                    if gain > best[0] + 1e-12 * (costs[a] + costs[b]):
                        best = (gain, (a, b, ga, gb))
        if best[1] is None:
            return groups, sum(costs)
        a, b, ga, gb = best[1]
        groups[a], groups[b] = ga, gb
        costs[a], costs[b] = cost(ga), cost(gb)


def best_grouping(n: int, size: int, cost: Callable[[Group], float], seed: int = 0) -> tuple[list[Group], dict]:
    """The balanced grouping of heads 0..n-1 into groups of `size` with the least total cost, and a record.

    The contiguous grouping wins ties (so a method stays exactly the plain merge when nothing is gained);
    groups come out ordered by their first head, heads ascending within a group.
    """
    cache: dict[Group, float] = {}

    def cached(g: Group) -> float:
        if g not in cache:
            cache[g] = float(cost(g))
        return cache[g]

    start = contiguous(n, size)
    start_cost = sum(cached(g) for g in start)
    total = count_groupings(n, size)
    best, best_cost = start, start_cost
    if total <= MAX_EXHAUSTIVE:
        search = "exhaustive"
        for groups in _all_groupings(tuple(range(n)), size):
            c = sum(cached(g) for g in groups)
            if c < best_cost - 1e-12 * abs(start_cost):
                best, best_cost = groups, c
    else:
        search = f"local search on pairwise costs, {RESTARTS} seeded restarts"
        pair = {p: cached(p) for p in combinations(range(n), 2)}

        def proxy(g: Group) -> float:
            return 2 / size * sum(pair[p] for p in combinations(sorted(g), 2))

        rng = random.Random(seed)
        starts = [start]
        for _ in range(RESTARTS):
            heads = list(range(n))
            rng.shuffle(heads)
            starts.append([tuple(heads[g:g + size]) for g in range(0, n, size)])
        for s in starts:
            groups, _ = _local_search(s, proxy)
            c = sum(cached(g) for g in groups)
            if c < best_cost - 1e-12 * abs(start_cost):
                best, best_cost = groups, c
    best = sorted(tuple(sorted(g)) for g in best)
    record = {"search": search, "groupings": total, "groups_scored": len(cache),
              "cost_contiguous": start_cost, "cost_chosen": best_cost}
    return [list(g) for g in best], record
