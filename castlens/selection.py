"""Selection: which source samples form a CAST vector.

CAST (arXiv 2507.13236, Sec. 3.2) averages the contrastive activations of a *selected* subset of the
high-resource source data. Every selection method has one signature::

    select(tasks, n, seed, exclude) -> [(task name, Example), ...]       # n samples, deterministic for a seed

``random`` (the baseline, and the default until the graph search lands) spreads ``n`` over the source tasks as
evenly as possible (round-robin over a seeded shuffle of each task's train split). Knows no model.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

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
