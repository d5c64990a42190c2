"""Compose: adapt to a new task with a linear combination of existing steering vectors (Steer2Adapt).

Steer2Adapt (arXiv 2602.07276) observes that tasks of a domain share a few concept directions, so a small
*library* of vectors spans a useful subspace, and a new task needs only coefficients::

    v = sum_i alpha_i b_i = B^T alpha            B: [k, d_model], the basis at one layer

found from a handful of labelled examples by black-box search. This module holds the pure parts: the library
and its basis (as given, orthonormalised, or reduced by PCA with its explained variance), the adaptation
objective, and a seeded Bayesian-optimisation search (optuna's TPE sampler) over ``alpha`` with its trace.

The objective rewards turning wrong answers right and penalises turning right answers wrong more heavily than any
loss of confidence: over ``n`` examples, with ``fixed`` and ``broken`` counted against the unsteered model::

    J(alpha) = (fixed - beta * broken) / n + gamma * mean_i (p_i(alpha) - p_i(0))

where ``p_i`` is the probability of the gold option (normalised over options), ``beta = 2`` and ``gamma = 0.1``.
Since ``beta > gamma`` and each ``|p_i(alpha) - p_i(0)| <= 1``, breaking one answer costs more than the largest
confidence loss on it. Knows no model: the caller evaluates ``alpha`` (see :mod:`castlens.reuse`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
from numpy.typing import ArrayLike


@dataclass
class Library:
    """Named vectors at one layer: ``vectors`` is ``[m, d_model]``."""

    names: list[str]
    vectors: np.ndarray
    layer: int
    meta: dict = field(default_factory=dict)


def library(vectors: Mapping[str, object], layer: int) -> Library:
    """A library from ``{name: SteeringVector or [n_layers, d] array}``, taking each vector's ``layer`` row."""
    if not vectors:
        raise ValueError("an empty vector library")
    rows = []
    for name, v in vectors.items():
        arr = np.asarray(getattr(v, "directions", v), dtype=np.float64)
        if arr.ndim != 2 or not 0 <= layer < arr.shape[0]:
            raise ValueError(f"library vector {name!r}: shape {arr.shape} has no layer {layer}")
        rows.append(arr[layer])
    widths = {r.shape[0] for r in rows}
    if len(widths) != 1:
        raise ValueError(f"library vectors have different widths {sorted(widths)}")
    return Library(list(vectors), np.stack(rows), layer)


def basis(lib: Library, kind: str = "raw", k: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The basis ``[k, d]`` and, for ``kind="pca"``, the explained-variance ratio of each direction.

    ``raw``: the library vectors as they are; ``orthonormal``: an orthonormal basis of their span (QR, in library
    order, each scaled back to the mean library norm so coefficients stay comparable); ``pca``: the leading
    ``k`` principal directions of the library (scikit-learn, centred), scaled the same way."""
    v = lib.vectors
    scale = float(np.linalg.norm(v, axis=1).mean())
    if kind == "raw":
        return v.copy(), None
    if kind == "orthonormal":
        q, r = np.linalg.qr(v.T)
        keep = np.abs(np.diag(r)) > 1e-8 * max(1.0, np.abs(r).max())
        return (q[:, keep].T * scale), None
    if kind == "pca":
        from sklearn.decomposition import PCA

        k = k or min(len(v) - 1, v.shape[1]) or 1
        if not 1 <= k <= min(len(v), v.shape[1]):
            raise ValueError(f"k={k} components from {len(v)} library vectors")
        pca = PCA(n_components=k, svd_solver="full").fit(v)
        return pca.components_ * scale, pca.explained_variance_ratio_
    raise ValueError(f"basis kind must be 'raw', 'orthonormal' or 'pca', got {kind!r}")


def objective(base_correct: ArrayLike, steered_correct: ArrayLike, base_gold_p: ArrayLike,
              steered_gold_p: ArrayLike, beta: float = 2.0, gamma: float = 0.1) -> float:
    """``J = (fixed - beta * broken) / n + gamma * mean(p_steered - p_base)`` (see the module docstring)."""
    b, s = np.asarray(base_correct, bool), np.asarray(steered_correct, bool)
    pb, ps = np.asarray(base_gold_p, float), np.asarray(steered_gold_p, float)
    if not (len(b) == len(s) == len(pb) == len(ps)) or len(b) == 0:
        raise ValueError("objective needs equally many (>= 1) base and steered results")
    if beta <= gamma:
        raise ValueError(f"beta ({beta}) must exceed gamma ({gamma}): a broken answer must cost more than "
                         "a loss of confidence")
    fixed, broken = int((~b & s).sum()), int((b & ~s).sum())
    return (fixed - beta * broken) / len(b) + gamma * float((ps - pb).mean())


def search(evaluate: Callable[[np.ndarray], float], k: int, n_trials: int = 60, bound: float = 2.0, seed: int = 0
           ) -> tuple[np.ndarray, list[dict]]:
    """Maximise ``evaluate(alpha)`` over ``alpha in [-bound, bound]^k`` with optuna's seeded TPE sampler; the first
    trial is ``alpha = 0`` (the unsteered model). Returns the best ``alpha`` and the trace (one dict per trial)."""
    import optuna

    if k < 1 or n_trials < 1:
        raise ValueError(f"need k >= 1 coefficients and n_trials >= 1, got {k} and {n_trials}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.enqueue_trial({f"a{i}": 0.0 for i in range(k)})
    trace: list[dict] = []

    def run(trial) -> float:
        alpha = np.array([trial.suggest_float(f"a{i}", -bound, bound) for i in range(k)])
        value = float(evaluate(alpha))
        trace.append({"trial": trial.number, "alpha": alpha.tolist(), "objective": value})
        return value

    study.optimize(run, n_trials=n_trials)
    best = np.array([study.best_params[f"a{i}"] for i in range(k)])
    return best, trace


# Task families for leave-one-family-out experiments: a held-out target's library never contains a task of its
# own family (names of the shared collection; a task not listed is its own family).
FAMILIES = {
    "sentiment": ("sst2", "financial_phrasebank", "emotion", "eprstmt_zh", "marc_de", "marc_es", "marc_fr",
                  "marc_ja", "marc_zh"),
    "nli": ("mnli", "xnli_en", "xnli_de", "xnli_fr", "xnli_zh"),
    "paraphrase": ("qqp", "pawsx_en", "pawsx_de", "pawsx_zh"),
    "topic": ("ag_news",),
    "multiple_choice_qa": ("arc_easy", "arc_challenge", "sciq", "commonsense_qa", "social_i_qa", "medmcqa", "race"),
    "yes_no_qa": ("boolq",),
}


def family(task: str) -> str:
    return next((f for f, names in FAMILIES.items() if task in names), task)


def random_library(library_vectors: Mapping[str, object], seed: int = 0) -> dict[str, np.ndarray]:
    """The control library: each vector replaced by a Gaussian direction with its norm at every layer (names
    kept, so the same families are left out)."""
    import torch

    from castlens.vectors import random_like

    out = {}
    for i, (name, v) in enumerate(library_vectors.items()):
        d = torch.as_tensor(np.asarray(getattr(v, "directions", v)), dtype=torch.float32)
        out[name] = random_like(d, seed=10_000 * (seed + 1) + i).numpy()
    return out
