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
from typing import Callable, Mapping, Sequence

import numpy as np


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


def objective(base_correct: Sequence[bool], steered_correct: Sequence[bool], base_gold_p: Sequence[float],
              steered_gold_p: Sequence[float], beta: float = 2.0, gamma: float = 0.1) -> float:
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


# ---------------------------------------------------------------- adaptation on a model
ADAPT_METHODS = ("zero_shot", "icl_examples", "steer2adapt", "single_best", "uniform_mean")


def adapt(model, vectors: Mapping[str, object], target, layer: int | None = None, examples: int = 12,
          kind: str = "raw", k: int | None = None, n_trials: int = 60, bound: float = 2.0, seed: int = 0,
          limit: int | None = None, batch_size: int = 32, strengths: Sequence[float] = (0.5, 1.0, 2.0, 4.0)
          ) -> dict:
    """Steer2Adapt on one target: search ``alpha`` on ``examples`` labelled train items, then score the test split.

    Methods on test: ``zero_shot``; ``icl_examples`` (the same labelled items as demonstrations);
    ``steer2adapt`` (``B^T alpha`` at ``layer``, last prompt token); ``single_best`` (the library vector and
    strength with the best objective on the same items; with per-task CAST vectors in the library this is also
    "the CAST vector of the best source"); ``uniform_mean`` (the library mean, strength chosen the same way).
    Returns a JSON-ready part (as :func:`castlens.transfer.run_target`) plus ``alpha``, the basis and the trace.
    """
    import random
    import time

    import torch

    from castlens.prompts import default_format
    from castlens.reuse import UNSTEERED, Setting, prefix_option_logprobs
    from castlens.transfer import _prefix, encode_items, label_baselines, method_record

    n_layers, d = model.cfg.n_layers, model.cfg.d_model
    layer = n_layers // 2 if layer is None else layer
    lib = library(vectors, layer)
    if lib.vectors.shape[1] != d:
        raise ValueError(f"library vectors have width {lib.vectors.shape[1]}, the model {d}")
    B, ratio = basis(lib, kind, k)
    fmt = default_format(target)
    train = target.split("train")
    if examples > len(train):
        raise ValueError(f"target {target.name!r}: {examples} examples asked for, train has {len(train)}")
    few = random.Random(f"{seed}:adapt:{target.name}").sample(train, examples)
    pos = {id(e): i for i, e in enumerate(train)}  # results name train items by index, never by their text
    test = target.split("test")[:limit]
    prefix = _prefix(model, [fmt.instruction], fmt)

    def encode(items):
        return encode_items(model, target, fmt, items, seed=seed)

    def setting(name: str, v: np.ndarray) -> Setting:
        directions = torch.zeros(n_layers, d)
        directions[layer] = torch.as_tensor(v, dtype=torch.float32)
        return Setting(name, directions, layer, 1.0)

    q, o, g = encode(few)
    rows = torch.arange(len(q))

    def stats(scores):
        return (scores.argmax(-1) == torch.tensor(g)).numpy(), torch.softmax(scores, -1)[rows, g].numpy()

    base_ok, base_p = stats(prefix_option_logprobs(model, prefix, q, o, batch_size=batch_size)[0])
    passes = {"search": 0, "baselines": 0}

    def evaluate_many(named: list[Setting], spent_on: str = "baselines") -> list[float]:
        passes[spent_on] += len(named) * len(q)
        scores = prefix_option_logprobs(model, prefix, q, o, named, batch_size=batch_size)
        out = []
        for sc in scores:
            ok, p = stats(sc)
            out.append(objective(base_ok, ok, base_p, p))
        return out

    t0 = time.perf_counter()
    alpha, trace = search(lambda a: evaluate_many([setting("s2a", a @ B)], "search")[0], len(B), n_trials, bound,
                          seed)
    search_s = time.perf_counter() - t0
    singles = [(i, s) for i in range(len(lib.names)) for s in strengths]
    single_j = evaluate_many([setting(f"{lib.names[i]}x{s}", s * lib.vectors[i]) for i, s in singles])
    i_best, s_best = singles[int(np.argmax(single_j))]
    mean_j = evaluate_many([setting(f"mean x{s}", s * lib.vectors.mean(0)) for s in strengths])
    s_mean = strengths[int(np.argmax(mean_j))]

    qt, ot, gold = encode(test)
    chosen = [UNSTEERED, setting("steer2adapt", alpha @ B), setting("single_best", s_best * lib.vectors[i_best]),
              setting("uniform_mean", s_mean * lib.vectors.mean(0))]
    timings: dict = {}
    scores = prefix_option_logprobs(model, prefix, qt, ot, chosen, batch_size=batch_size, timings=timings)
    icl_prefix = _prefix(model, [fmt.instruction, *(fmt.render(e, True) for e in few)], fmt)
    t1 = time.perf_counter()
    icl = prefix_option_logprobs(model, icl_prefix, qt, ot, batch_size=batch_size)[0]
    icl_s = time.perf_counter() - t1
    qlen = float(np.mean([len(x) for x in qt]))
    methods = {}
    shared = timings["prefix"] + timings["body"]
    for name, sc, plen, secs, extra in (
            ("zero_shot", scores[0], len(prefix), shared + timings["unsteered"], None),
            ("icl_examples", icl, len(icl_prefix), icl_s, None),
            ("steer2adapt", scores[1], len(prefix), shared + timings["steer2adapt"], {"layer": layer}),
            ("single_best", scores[2], len(prefix), shared + timings["single_best"],
             {"layer": layer, "strength": s_best, "vector": lib.names[i_best]}),
            ("uniform_mean", scores[3], len(prefix), shared + timings["uniform_mean"],
             {"layer": layer, "strength": s_mean})):
        methods[name] = method_record(sc, gold, plen + qlen, secs, extra)
    return {"target": target.name, "n_test": len(test), "gold": gold, "examples": [pos[id(e)] for e in few],
            **label_baselines(gold, ot), "methods": methods, "alpha": alpha.tolist(), "library": lib.names, "basis_kind": kind,
            "basis_explained_variance": None if ratio is None else ratio.tolist(), "layer": layer,
            "trace": trace, "search_seconds": search_s,
            "scored_examples": passes, "objective": {"steer2adapt": max(t["objective"] for t in trace),
                                                     "single_best": float(max(single_j)),
                                                     "uniform_mean": float(max(mean_j))}}


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
    from castlens.vectors import random_like

    import torch

    out = {}
    for i, (name, v) in enumerate(library_vectors.items()):
        d = torch.as_tensor(np.asarray(getattr(v, "directions", v)), dtype=torch.float32)
        out[name] = random_like(d, seed=10_000 * (seed + 1) + i).numpy()
    return out


def run_compose(model, library_vectors: Mapping[str, object], targets: Sequence, out, leave_out_family: bool = True,
                n_boot: int = 1000, log=print, note: str = "", compare_to=None, **adapt_kw) -> list[dict]:
    """:func:`adapt` on each target (resumable: one ``parts/<target>.part.json`` each, never rewritten), then
    ``results.csv``, ``results.md``, ``coefficients.csv`` and a coefficient heatmap in ``out``. ``compare_to``:
    a finished run on the same targets (e.g. the real library, when this run is the random-library control);
    writes ``comparison.md`` with the paired difference of its Steer2Adapt accuracy minus this run's."""
    from pathlib import Path

    from castlens import plots
    from castlens.transfer import _fmt_delta, results_csv, resumable_parts, summarize
    from castlens.vectors import _atomic_write

    out = Path(out)

    def compute(t, done: list[dict]) -> dict:
        lib = {k: v for k, v in library_vectors.items()
               if k != t.name and not (leave_out_family and family(k) == family(t.name))}
        if not lib:
            raise ValueError(f"target {t.name!r}: no library vector left after leaving out its family")
        log(f"  library {', '.join(lib)}")
        part = adapt(model, lib, t, **adapt_kw)
        z, s = (np.mean(part["methods"][m]["correct"]) for m in ("zero_shot", "steer2adapt"))
        log(f"  zero-shot {100 * z:.1f}%, Steer2Adapt {100 * s:.1f}%; alpha {np.round(part['alpha'], 2).tolist()}")
        return part

    finished = resumable_parts(out, targets, adapt_kw.get("limit"), compute, log)
    parts = [finished[t.name] for t in targets]
    rows = summarize(parts, n_boot=n_boot, methods=ADAPT_METHODS, refs=(("zero_shot", "zero"), ("icl_examples", "icl")))
    cols = ["target", "method", "accuracy", "ci_lo", "ci_hi", "macro_f1", "delta_zero", "delta_zero_lo",
            "delta_zero_hi", "delta_zero_noise", "delta_icl", "delta_icl_lo", "delta_icl_hi", "delta_icl_noise",
            "prompt_tokens", "n_test"]
    _atomic_write(out / "results.csv", results_csv(rows, cols).encode())
    names = sorted({n for p in parts for n in p["library"]}, key=lambda n: list(library_vectors).index(n))
    coef = np.full((len(parts), len(names)), np.nan)
    for i, p in enumerate(parts):
        if p["basis_kind"] == "raw":
            for n, a in zip(p["library"], p["alpha"]):
                coef[i, names.index(n)] = a
    lines = ["target," + ",".join(names)] + [p["target"] + "," + ",".join("" if np.isnan(x) else f"{x:.3f}"
                                                                          for x in row) for p, row in zip(parts, coef)]
    _atomic_write(out / "coefficients.csv", ("\n".join(lines) + "\n").encode())

    md = ["# Steer2Adapt: composing library vectors for a held-out target" + (f" ({note})" if note else ""), "",
          f"Layer {parts[0]['layer']}, basis `{parts[0]['basis_kind']}`, {len(parts[0]['examples'])} labelled "
          f"examples per target, {len(parts[0]['trace'])} search trials; accuracy in % with 95% bootstrap "
          "intervals over test items; `~`: the paired interval contains 0.", "",
          "| target | method | accuracy | vs zero-shot | vs ICL with the examples | prompt tokens |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['target']} | {r['method']} | {100 * r['accuracy']:.1f} [{100 * r['ci_lo']:.1f}, "
                  f"{100 * r['ci_hi']:.1f}] | {_fmt_delta(r, 'zero')} | {_fmt_delta(r, 'icl')} | {r['prompt_tokens']:.0f} |")
    md += ["", "Search cost per target: " + "; ".join(
        f"{p['target']} {p['scored_examples']['search']} example forwards ({p['search_seconds']:.0f}s)" for p in parts),
        "", "Coefficients (raw basis): `coefficients.csv`; single best library vector per target: " + "; ".join(
        f"{p['target']}: {p['methods']['single_best']['setting']['vector']} x"
        f"{p['methods']['single_best']['setting']['strength']:g}" for p in parts)]
    _atomic_write(out / "results.md", ("\n".join(md) + "\n").encode())
    if compare_to is not None:
        _atomic_write(out / "comparison.md", compare_runs(Path(compare_to), out, parts, n_boot).encode())
    png = plots.png_export_available()
    fig = plots.coefficient_heatmap(coef, [p["target"] for p in parts], names,
                                    title="Steer2Adapt coefficients: which library vectors serve which target",
                                    caption="Blank: left out (same family as the target).")
    plots.save_figure(fig, out / "coefficients", png=png)
    return rows


def compare_runs(there, here, parts: Sequence[dict], n_boot: int = 1000, seed: int = 0) -> str:
    """Markdown: Steer2Adapt accuracy of the run in ``there`` minus that of ``parts`` (the run in ``here``) per
    target and on average, with paired bootstrap intervals (the same test items in both runs, checked)."""
    import json

    from castlens.transfer import paired_delta

    merged = []
    for p in parts:
        f = there / "parts" / f"{p['target']}.part.json"
        if not f.exists():
            raise ValueError(f"cannot compare with {there}: it has no finished part for target {p['target']!r}")
        o = json.loads(f.read_text())
        if o["gold"] != p["gold"]:
            raise ValueError(f"cannot compare with {there}: target {p['target']!r} was tested on other items")
        merged.append({**p, "methods": {"there": o["methods"]["steer2adapt"], "here": p["methods"]["steer2adapt"]}})
    lines = [f"# Steer2Adapt in `{there}` minus Steer2Adapt in `{here}`", "",
             "Paired difference in accuracy points (the same test items), 95% bootstrap interval; `~`: the interval "
             "contains 0.", "", "| target | there | here | difference |", "|---|---|---|---|"]
    rows = [(p["target"], [p]) for p in merged] + [("mean", merged)]
    for t, ps in rows:
        d, lo, hi = paired_delta(ps, "there", "here", n_boot, seed)
        acc = [float(np.mean([np.mean(p["methods"][m]["correct"]) for p in ps])) for m in ("there", "here")]
        lines.append(f"| {t} | {100 * acc[0]:.1f} | {100 * acc[1]:.1f} | {100 * d:+.1f} [{100 * lo:+.1f}, "
                     f"{100 * hi:+.1f}]{' ~' if lo <= 0 <= hi else ''} |")
    return "\n".join(lines) + "\n"
