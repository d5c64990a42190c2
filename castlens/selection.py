"""Selection: which source samples form a CAST vector.

CAST (arXiv 2507.13236, Sec. 3.2) averages the contrastive activations of a *selected* subset of the
high-resource source data, chosen to be both *influential* (close to what the target needs, and representative
of the pool) and *diverse*. Every selection method has one signature::

    select(tasks, n, seed, exclude) -> [(task name, Example), ...]       # n samples, deterministic for a seed

``random`` spreads ``n`` over the source tasks as evenly as possible (round-robin over a seeded shuffle of each
task's train split): the draw a transfer run with ``select="random"`` uses. Knows no model. (In
:func:`select_indices`, ``random`` ranks a given candidate pool in a seeded random order instead: the baseline
the graph searches are compared with at equal n. The two draw from different sets, the whole train splits and
the pool, and each name is kept because committed run configs record it.)

The graph search works on embeddings (any ``[n, d]`` array; the caller computes them), in
:func:`select_indices`. Candidates and target queries are first centred on the candidates' mean (language-model
states are anisotropic: they share a large common direction that makes every cosine close to 1 and would leave
the diversity term nothing to measure; Ethayarajh 2019, Mu & Viswanath 2018), then L2-normalised; ``cos`` is the
inner product:

* relevance ``rel_i``: the mean cosine between candidate ``i`` and its ``k`` nearest target queries;
* representativeness ``rep_i``: the in-degree of ``i`` in the candidates' ``k``-nearest-neighbour graph
  (how many candidates count ``i`` among their ``k`` nearest, as in vote-k), divided by ``k``;
* influence ``u_i = alpha * norm(rel_i) + (1 - alpha) * norm(rep_i)``, each min-max normalised to [0, 1];
* greedy maximal marginal relevance: repeatedly pick ``argmax_i u_i - lam * max_{j in S} cos(i, j)``.

Baselines on the same embeddings: ``relevance`` (top ``n`` by ``rel``) and ``diversity`` (``u = 0``: greedy
farthest-point selection from a seeded random start). The candidate graph uses faiss: exact inner-product search
up to 20,000 candidates, an inverted-file index (``IndexIVFFlat``) above, so time and memory grow linearly with
the pool instead of building an ``n x n`` matrix.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Sequence

import numpy as np

from castlens.tasks import Example, Task, TaskError

Selected = list[tuple[str, Example]]


def select_random(tasks: Sequence[Task], n: int, seed: int = 0,
                  exclude: dict[str, set[str]] | None = None) -> Selected:
    """``n`` source samples, round-robin over ``tasks``, each task's train split in a seeded random order;
    inputs in ``exclude[task]`` (e.g. that task's demonstrations) are never chosen."""
    if n < 1 or not tasks:
        raise TaskError(f"need n >= 1 and at least one source task, got n={n} and {len(tasks)} tasks")
    pools = []
    for t in tasks:
        banned = (exclude or {}).get(t.name, set())
        pool = [e for e in t.split("train") if e.input not in banned]
        random.Random(f"{seed}:select:{t.name}").shuffle(pool)
        pools.append(pool)
    if n > sum(len(p) for p in pools):
        raise TaskError(f"{n} source samples asked for, the sources have {sum(len(p) for p in pools)}")
    out: Selected = []
    depth = 0
    while len(out) < n:
        for t, pool in zip(tasks, pools):
            if depth < len(pool) and len(out) < n:
                out.append((t.name, pool[depth]))
        depth += 1
    return out


SELECTORS: dict[str, Callable[..., Selected]] = {"random": select_random}


def select(method: str, tasks: Sequence[Task], n: int, seed: int = 0,
           exclude: dict[str, set[str]] | None = None) -> Selected:
    if method not in SELECTORS:
        raise ValueError(f"unknown selection method {method!r}; available: {', '.join(SELECTORS)}")
    return SELECTORS[method](tasks, n, seed=seed, exclude=exclude)


# ---------------------------------------------------------------- graph search on embeddings
def _normalised(x: np.ndarray, name: str) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty [n, d] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or inf")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn(base: np.ndarray, queries: np.ndarray, k: int, seed: int = 0, exact_up_to: int = 20_000
        ) -> tuple[np.ndarray, np.ndarray]:
    """Inner products and indices of the ``k`` nearest ``base`` rows for each query row (both normalised)."""
    import faiss

    n, d = base.shape
    k = min(k, n)
    index: Any  # an exact or an inverted-file faiss index
    if n <= exact_up_to:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = int(4 * np.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        index.train(base[rng.choice(n, size=min(n, 40 * nlist), replace=False)])
        index.nprobe = 8
    index.add(base)
    sims, idx = index.search(queries, k)
    return sims, idx


def _minmax(v: np.ndarray) -> np.ndarray:
    span = v.max() - v.min()
    return (v - v.min()) / span if span > 0 else np.zeros_like(v)


def influence(candidates: np.ndarray, targets: np.ndarray, k: int = 10, alpha: float = 0.5, seed: int = 0
              ) -> dict[str, np.ndarray]:
    """``rel``, ``rep`` and the combined influence ``u`` of every candidate (see the module docstring)."""
    c, t = _normalised(candidates, "candidates"), _normalised(targets, "targets")
    if c.shape[1] != t.shape[1]:
        raise ValueError(f"candidates have width {c.shape[1]}, targets {t.shape[1]}")
    sims, _ = knn(t, c, k, seed)  # each candidate's k nearest target queries
    rel = sims.mean(1)
    _, idx = knn(c, c, k + 1, seed)  # +1: a candidate is its own nearest neighbour
    votes = np.bincount(idx[:, 1:].ravel()[idx[:, 1:].ravel() >= 0], minlength=len(c)) / k
    return {"rel": rel, "rep": votes, "u": alpha * _minmax(rel) + (1 - alpha) * _minmax(votes)}


def mmr(embeddings: np.ndarray, scores: np.ndarray, n: int, lam: float = 0.5, first: int | None = None
        ) -> list[int]:
    """Greedy maximal marginal relevance: ``argmax scores_i - lam * max_{j chosen} cos(i, j)``; O(n_pool) memory
    (one running max-similarity vector), O(n * n_pool * d) time."""
    x = _normalised(embeddings, "embeddings")
    if not 1 <= n <= len(x):
        raise ValueError(f"cannot choose {n} of {len(x)} candidates")
    scores = np.asarray(scores, dtype=np.float64)
    max_sim = np.full(len(x), -np.inf)
    chosen: list[int] = []
    taken = np.zeros(len(x), dtype=bool)
    for step in range(n):
        if step == 0 and first is not None:
            i = int(first)
        else:
            gain = scores - lam * np.where(np.isfinite(max_sim), max_sim, 0.0)
            gain[taken] = -np.inf
            i = int(np.argmax(gain))
        chosen.append(i)
        taken[i] = True
        max_sim = np.maximum(max_sim, x @ x[i])
    return chosen


SELECTION_METHODS = ("random", "relevance", "diversity", "cast")


def select_indices(method: str, candidates: np.ndarray, targets: np.ndarray | None, n: int, seed: int = 0,
                   k: int = 10, alpha: float = 0.5, lam: float = 0.5, center: bool = True) -> list[int]:
    """Indices of ``n`` candidates chosen by ``method`` (one of ``SELECTION_METHODS``); deterministic for a seed.
    ``center``: subtract the candidates' mean from candidates and targets first (see the module docstring)."""
    if method not in SELECTION_METHODS:
        raise ValueError(f"unknown selection method {method!r}; available: {', '.join(SELECTION_METHODS)}")
    m = len(candidates)
    if not 1 <= n <= m:
        raise ValueError(f"cannot choose {n} of {m} candidates")
    rng = np.random.default_rng(seed)
    if method == "random":
        return [int(i) for i in rng.choice(m, size=n, replace=False)]
    if center:
        mu = np.asarray(candidates).mean(0, dtype=np.float64).astype(np.float32)
        candidates = np.asarray(candidates, dtype=np.float32) - mu
        targets = None if targets is None else np.asarray(targets, dtype=np.float32) - mu
    if method == "diversity":
        return mmr(candidates, np.zeros(m), n, lam=1.0, first=int(rng.integers(m)))
    if targets is None:
        raise ValueError(f"selection method {method!r} needs target embeddings")
    inf = influence(candidates, targets, k, alpha, seed)
    if method == "relevance":
        return [int(i) for i in np.argsort(-inf["rel"], kind="stable")[:n]]
    return mmr(candidates, inf["u"], n, lam=lam)
