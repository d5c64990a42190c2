"""Compose: Steer2Adapt (arXiv 2602.07276) on held-out targets, against the baselines it must beat.

Each target is adapted with a library of vectors (:mod:`castlens.compose`) from ``examples`` labelled train
items: the coefficients ``alpha`` of ``v = B^T alpha`` at ``layer`` are searched (optuna TPE, ``trials``
evaluations) to maximise the objective ``J``; then every method runs once on the test split:

================  ============================================================================================
``zero_shot``     target instruction + query
``icl_examples``  the same labelled items as demonstrations
``steer2adapt``   ``B^T alpha`` added at ``layer``, last prompt token
``single_best``   the one library vector x strength with the best ``J`` on the same items
``uniform_mean``  the library mean, strength chosen the same way
================  ============================================================================================

The last three are chosen on the labelled items by :func:`~castlens.experiments.protocol.tune_and_test` with
``J`` as its criterion. With ``leave_out_family`` a target's library never holds a task of its own family; with
``random_library`` every library vector is replaced by a norm-matched random one (the control).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np
import torch

from castlens.compose import basis, family, library, objective, search
from castlens.experiments.protocol import (Candidate, Items, ProtocolConfig, check_config, open_run, prepare, prompted,
                                           tune_and_test)
from castlens.experiments.results import Row, Setting, TargetResult, fmt_interval, paired_delta, summarize, to_csv
from castlens.experiments.run import Run, RunError
from castlens.reuse import Setting as Steer
from castlens.reuse import prefix_option_logprobs
from castlens.tasks import Task
from castlens.vectors import prefix_ids

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["ComposeConfig", "adapt", "run_compose", "report", "compare_runs", "METHODS"]

METHODS = ("zero_shot", "icl_examples", "steer2adapt", "single_best", "uniform_mean")
REFS = {"zero": "zero_shot", "icl": "icl_examples"}
COLUMNS = ["target", "method", "accuracy", "ci_lo", "ci_hi", "macro_f1", "delta_zero", "delta_zero_lo",
           "delta_zero_hi", "delta_zero_noise", "delta_icl", "delta_icl_lo", "delta_icl_hi", "delta_icl_noise",
           "prompt_tokens", "n_test"]


@dataclass(frozen=True)
class ComposeConfig(ProtocolConfig):
    """Everything that determines a Steer2Adapt run's numbers (``config.json``)."""

    model: str = ""
    library: tuple[str, ...] = ()         # vector names of the library, in file order
    targets: tuple[str, ...] = ()
    layer: int | None = None              # default: the middle layer
    examples: int = 12
    basis: str = "raw"
    k: int | None = None
    trials: int = 60
    bound: float = 2.0
    strengths: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    leave_out_family: bool = True
    random_library: bool = False
    n_boot: int = 1000

    def __post_init__(self) -> None:
        check_config(self)


def _full(v: np.ndarray, layer: int, n_layers: int) -> torch.Tensor:
    out = torch.zeros(n_layers, v.shape[-1])
    out[layer] = torch.as_tensor(v, dtype=torch.float32)
    return out


def adapt(model: TransformerBridge, vectors: Mapping[str, object], task: Task, cfg: ComposeConfig,
          batch_size: int = 32, log: Callable[[str], None] = print) -> TargetResult:
    """Steer2Adapt on one target with the library ``vectors`` (see the module docstring)."""
    n_layers, d = model.cfg.n_layers, model.cfg.d_model
    layer = n_layers // 2 if cfg.layer is None else cfg.layer
    lib = library(vectors, layer)
    if lib.vectors.shape[1] != d:
        raise ValueError(f"library vectors have width {lib.vectors.shape[1]}, the model {d}")
    B, ratio = basis(lib, cfg.basis, cfg.k)
    train = task.split("train")
    if cfg.examples > len(train):
        raise ValueError(f"target {task.name!r}: {cfg.examples} examples asked for, train has {len(train)}")
    few = random.Random(f"{cfg.seed}:adapt:{task.name}").sample(train, cfg.examples)
    target = prepare(model, task, cfg, dev=few)
    items: Items = target.dev  # type: ignore[assignment]

    def stats(scores: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return _stats(scores, items.gold)

    base = stats(prefix_option_logprobs(model, target.zero_prefix, items.queries, items.options,
                                        batch_size=batch_size)[0])

    t0 = time.perf_counter()
    alpha, trace = search(lambda a: _objective(model, target, items, base, _full(a @ B, layer, n_layers), layer,
                                               batch_size), len(B), cfg.trials, cfg.bound, cfg.seed)
    search_s = time.perf_counter() - t0
    cands = {"steer2adapt": [Candidate(Setting("steer2adapt", layer), _full(alpha @ B, layer, n_layers))],
             "single_best": [Candidate(Setting("single_best", layer, s, lib.names[i]), _full(lib.vectors[i], layer,
                                                                                            n_layers))
                             for i in range(len(lib.names)) for s in cfg.strengths],
             "uniform_mean": [Candidate(Setting("uniform_mean", layer, s), _full(lib.vectors.mean(0), layer,
                                                                                n_layers)) for s in cfg.strengths]}
    best_j: dict[str, float] = {}

    def by_objective(scores: torch.Tensor, _: Items) -> list[tuple[float, ...]]:
        keys: list[tuple[float, ...]] = [(objective(base[0], ok, base[1], p),) for ok, p in map(stats, scores)]
        flat = [c for cs in cands.values() for c in cs]
        for name in cands:
            best_j[name] = max(k[0] for k, c in zip(keys[1:], flat) if c.setting.construction == name)
        return keys

    part = tune_and_test(model, target, cands, pick=by_objective, batch_size=batch_size, log=log)
    icl_prefix = prefix_ids(model, [target.fmt.instruction, *(target.block(e) for e in few)], target.fmt)
    pos = {id(e): i for i, e in enumerate(train)}  # results name train items by index, never by their text
    n = len(items.gold)
    return part.with_methods(
        {"icl_examples": prompted(model, icl_prefix, target.test, batch_size)}, examples=[pos[id(e)] for e in few],
        alpha=alpha.tolist(), library=lib.names, basis_kind=cfg.basis,
        basis_explained_variance=None if ratio is None else ratio.tolist(), layer=layer, trace=trace,
        search_seconds=search_s, scored_examples={"search": cfg.trials * n, "baselines": (len(cands["single_best"]) +
                                                                                          len(cfg.strengths)) * n},
        objective={"steer2adapt": max(t["objective"] for t in trace), "single_best": best_j["single_best"],
                   "uniform_mean": best_j["uniform_mean"]})


def _stats(scores: torch.Tensor, gold: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per item: is the top option the gold one, and the gold option's probability (normalised over options)."""
    g = torch.tensor(gold)
    return (scores.argmax(-1) == g).numpy(), torch.softmax(scores, -1)[torch.arange(len(g)), g].numpy()


def _objective(model, target, items: Items, base, directions: torch.Tensor, layer: int, batch_size: int) -> float:
    scores = prefix_option_logprobs(model, target.zero_prefix, items.queries, items.options,
                                    [Steer("s2a", directions, layer, 1.0)], batch_size=batch_size)[0]
    ok, p = _stats(scores, items.gold)
    return objective(base[0], ok, base[1], p)


def run_compose(model: TransformerBridge, library_vectors: Mapping[str, object], cfg: ComposeConfig,
                out: str | Path, data_dir: str | None = None, compare_to: str | Path | None = None,
                batch_size: int = 32, png: bool | None = None, log: Callable[[str], None] = print) -> list[Row]:
    """:func:`adapt` on each target (one part each, resumable; the config is checked like every run's), then
    the tables and the coefficient heatmap (:func:`report`)."""
    if tuple(library_vectors) != cfg.library:
        raise ValueError(f"the config's library {list(cfg.library)} is not the one given {list(library_vectors)}")
    run, _, targets = open_run(model, cfg, out, data_dir, png, log, None if cfg.layer is None else [cfg.layer])

    def compute(name: str, done: list[TargetResult]) -> TargetResult:
        lib = {k: v for k, v in library_vectors.items()
               if k != name and not (cfg.leave_out_family and family(k) == family(name))}
        if not lib:
            raise ValueError(f"target {name!r}: no library vector left after leaving out its family")
        log(f"  library {', '.join(lib)}")
        part = adapt(model, lib, targets[name], cfg, batch_size, log)
        log(f"  zero-shot {100 * part.methods['zero_shot'].accuracy:.1f}%, Steer2Adapt "
            f"{100 * part.methods['steer2adapt'].accuracy:.1f}%; alpha {np.round(part.extra['alpha'], 2).tolist()}")
        return part

    parts = run.parts(list(targets), compute, TargetResult.from_dict, TargetResult.to_dict,
                      {t: min(len(targets[t].test), cfg.limit or len(targets[t].test)) for t in targets})
    if not run.world.main:  # one rank writes the tables
        return []
    return report(run, cfg, [parts[t] for t in targets], compare_to)


def report(run: Run, cfg: ComposeConfig, parts: Sequence[TargetResult], compare_to: str | Path | None = None
           ) -> list[Row]:
    """``results.csv``, ``coefficients.csv``, ``results.md``, ``comparison.md`` (with ``compare_to``) and the
    coefficient heatmap, from the finished parts alone."""
    from castlens import plots

    rows = summarize(parts, METHODS, REFS, cfg.n_boot, 0)
    run.write("results.csv", to_csv(rows, COLUMNS))
    names = [n for n in cfg.library if any(n in p.extra["library"] for p in parts)]
    coef = np.full((len(parts), len(names)), np.nan)
    for i, p in enumerate(parts):
        if p.extra["basis_kind"] == "raw":
            for n, a in zip(p.extra["library"], p.extra["alpha"]):
                coef[i, names.index(n)] = a
    cells = [",".join("" if np.isnan(x) else f"{x:.3f}" for x in row) for row in coef]
    run.write("coefficients.csv", "\n".join(["target," + ",".join(names)] +
                                            [f"{p.target},{c}" for p, c in zip(parts, cells)]) + "\n")
    note = " (control: every library vector replaced by a norm-matched random one)" if cfg.random_library else ""
    first = parts[0].extra
    md = ["# Steer2Adapt: composing library vectors for a held-out target" + note, "",
          f"Layer {first['layer']}, basis `{first['basis_kind']}`, {len(first['examples'])} labelled examples per "
          f"target, {len(first['trace'])} search trials; accuracy in % with 95% bootstrap intervals over test items; "
          "`~`: the paired interval contains 0.", "",
          "| target | method | accuracy | vs zero-shot | vs ICL with the examples | prompt tokens |",
          "|---|---|---|---|---|---|"]
    md += [f"| {r.target} | {r.method} | {100 * r.accuracy:.1f} [{100 * r.ci_lo:.1f}, {100 * r.ci_hi:.1f}] | "
           f"{fmt_interval(r.deltas.get('zero'))} | {fmt_interval(r.deltas.get('icl'))} | {r.prompt_tokens:.0f} |"
           for r in rows]
    best = {p.target: p.methods["single_best"].setting for p in parts}
    md += ["", "Search cost per target: " + "; ".join(
        f"{p.target} {p.extra['scored_examples']['search']} example forwards ({p.extra['search_seconds']:.0f}s)"
        for p in parts), "", "Coefficients (raw basis): `coefficients.csv`; single best library vector per target: " +
        "; ".join(f"{t}: {s.vector} x{s.strength:g}" for t, s in best.items() if s is not None)]
    run.write("results.md", "\n".join(md) + "\n")
    if compare_to is not None:
        run.write("comparison.md", compare_runs(Path(compare_to), run.out, parts, cfg.n_boot))
    run.figure("coefficients", plots.coefficient_heatmap(
        coef, [p.target for p in parts], names, title="Steer2Adapt coefficients: which library vectors serve which "
        "target", caption="Blank: left out (same family as the target)."))
    return rows


def compare_runs(there: Path, here: Path, parts: Sequence[TargetResult], n_boot: int = 1000, seed: int = 0) -> str:
    """Markdown: Steer2Adapt accuracy of the run in ``there`` minus that of ``parts`` (the run in ``here``) per
    target and on average, with paired bootstrap intervals (the same test items in both runs, checked)."""
    merged = []
    for p in parts:
        f = there / "parts" / f"{p.target}.part.json"
        if not f.exists():
            raise RunError(f"cannot compare with {there}: it has no finished part for target {p.target!r}")
        o = TargetResult.from_dict(json.loads(f.read_text()))
        if o.gold != p.gold:
            raise RunError(f"cannot compare with {there}: target {p.target!r} was tested on other items")
        merged.append(p.with_methods({"there": o.methods["steer2adapt"], "here": p.methods["steer2adapt"]}))
    lines = [f"# Steer2Adapt in `{there}` minus Steer2Adapt in `{here}`", "",
             "Paired difference in accuracy points (the same test items), 95% bootstrap interval; `~`: the interval "
             "contains 0.", "", "| target | there | here | difference |", "|---|---|---|---|"]
    for t, ps in [*((p.target, [p]) for p in merged), ("mean", merged)]:
        acc = [float(np.mean([p.methods[m].accuracy for p in ps])) for m in ("there", "here")]
        lines.append(f"| {t} | {100 * acc[0]:.1f} | {100 * acc[1]:.1f} | "
                     f"{fmt_interval(paired_delta(ps, 'there', 'here', n_boot, seed))} |")
    return "\n".join(lines) + "\n"
