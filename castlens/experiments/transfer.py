"""Transfer: does a vector built from high-resource *source* tasks help a low-resource *target* task?

CAST (arXiv 2507.13236, Sec. 3) against the baselines it is compared with, on each target's test split:

==================  ==========================================================================================
``zero_shot``       target instruction + query
``icl_in_task``     target instruction + ``shots`` target demonstrations (from the target's train split) + query
``icl_cross_task``  ``shots`` source demonstrations (of the selected source samples, each in its own task's
                    format) + target instruction + query  (cross-task ICL, Chatterjee et al. 2024)
``cast_mean_diff``  zero-shot prompt, ``h_L[last] += lambda * mean_i (few_i - zero_i)[L]``   (CAST Eq. 2-3)
``icv_pc1``         the same with the differences' first principal direction (ICV-style)
``task_vector``     zero-shot prompt, ``h_L[last] <- v[L]`` (Hendel et al. 2023; patched, not added)
``random_vector``   zero-shot prompt plus a Gaussian vector with the mean difference's norm per layer (control)
``function_vector`` zero-shot prompt, ``h_L[last] += lambda * sum of the top-k heads' mean few-shot writes``
                    (``--function-vector``; Todd et al. 2024: heads ranked by their causal effect on the sources,
                    :func:`~castlens.experiments.sources.source_function_vectors`; ``k`` chosen on dev)
==================  ==========================================================================================

All vectors come from the same ``n`` source samples (:mod:`castlens.experiments.sources`): ``random`` draws them
once for all targets; ``cast``, ``relevance`` and ``diversity`` choose them per target from ``pool`` candidates
per source by the graph search. Every construction's layer x strength is chosen on the target's dev split and
run once on test (:func:`~castlens.experiments.protocol.tune_and_test`). Reported: accuracy with 95% bootstrap
intervals, macro-F1, paired differences to zero-shot and to cross-task ICL, prompt tokens and wall time per
query. The run folder (:class:`~castlens.experiments.run.Run`) keeps one part per target; a rerun resumes. Under
torchrun with shared source vectors, each target's dev sweep and baselines are split over the ranks first
(:func:`in_pieces`), so the slowest target no longer sets the wall time.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
from torch import Tensor

from castlens.distributed import share
from castlens.experiments.protocol import (CONTENT_FREE, Candidate, Prepared, ProtocolConfig, calibrated_zero_shot,
                                           check_config, default_layers, dev_sweep, first_pass, grid, in_task_icl,
                                           join_sweeps, open_run, prepare, prompted, split_dev, tune_and_test)
from castlens.experiments.results import (MethodResult, Row, Setting, SweepPoint, TargetResult, fmt_interval,
                                          paired_delta, summarize, to_csv)
from castlens.experiments.run import Run
from castlens.experiments.sources import (CONSTRUCTIONS, EMBEDDERS, MODES, SourceRecord, embedded_pool,
                                          random_samples, source_function_vectors, source_vectors,
                                          target_embeddings)
from castlens.prompts import cross_task_blocks, default_format
from castlens.selection import SELECTION_METHODS, select_indices
from castlens.tasks import Task
from castlens.vectors import SteeringVector, load_vectors, prefix_ids, random_like, save_vectors

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["TransferConfig", "run_transfer", "in_pieces", "report", "sweep_figure", "METHODS", "REFS", "MODES",
           "CONSTRUCTIONS", "COLUMNS"]

METHODS = ("zero_shot", "calibrated_zero_shot", "icl_in_task", "icl_cross_task", *CONSTRUCTIONS, "function_vector")
REFS = {"zero": "zero_shot", "cross_icl": "icl_cross_task", "random": "random_vector"}
COLUMNS = ["target", "method", "accuracy", "ci_lo", "ci_hi", "macro_f1", "delta_zero", "delta_zero_lo",
           "delta_zero_hi", "delta_zero_noise", "delta_cross_icl", "delta_cross_icl_lo", "delta_cross_icl_hi",
           "delta_cross_icl_noise", "delta_random", "delta_random_lo", "delta_random_hi", "delta_random_noise",
           "prompt_tokens", "layer", "strength", "n_test", "chance", "majority", "acc_norm"]


@dataclass(frozen=True)
class TransferConfig(ProtocolConfig):
    """Everything that determines a run's numbers (``config.json``; a resume must match it)."""

    model: str = ""
    sources: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    n: int = 32                       # source samples behind every vector
    layers: tuple[int, ...] | None = None
    strengths: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    select: str = "random"            # castlens.selection.SELECTION_METHODS
    pool: int = 200                   # candidates per source task for the graph-based selection methods
    embedder: str = "model"           # embeddings for the graph search: EMBEDDERS
    n_boot: int = 1000
    n_random: int = 1                 # norm-matched random controls, each its own seed, each through the sweep
    staged_sweep: bool = False        # dev sweep: middle strength first, then every strength at the 2 best layers
    draw_seed: int | None = None      # the source side alone (samples, demonstrations, pool); None: seed
    function_vector: bool = False     # add the function-vector construction (top-k heads, k in fv_heads)
    fv_heads: tuple[int, ...] = (1, 3, 5, 10)

    def __post_init__(self) -> None:
        if self.select not in SELECTION_METHODS:
            raise ValueError(f"unknown selection method {self.select!r}; available: {', '.join(SELECTION_METHODS)}")
        if self.embedder not in EMBEDDERS:
            raise ValueError(f"unknown embedder {self.embedder!r}; available: {', '.join(EMBEDDERS)}")
        if not self.fv_heads or min(self.fv_heads) < 1:
            raise ValueError(f"--fv-heads must be positive head counts, got {list(self.fv_heads)}")
        check_config(self)

    @property
    def source_seed(self) -> int:
        """The seed of the source-sample draw: ``draw_seed`` varies it alone (dev split, test items and random
        controls stay those of ``seed``), so runs that differ only in it give the spread between draws."""
        return self.seed if self.draw_seed is None else self.draw_seed


def _vectors(model: TransformerBridge, cfg: TransferConfig, sources: Sequence[Task], run: Run, vec: str, rec: str,
             samples: Sequence | None) -> tuple[dict[str, SteeringVector], SourceRecord]:
    """The source vectors and their record, computed once and kept in the run folder as ``vec`` and ``rec``."""
    vec_path, rec_path = run.out / vec, run.out / rec
    if vec_path.exists() and rec_path.exists():
        run.log(f"reusing the source vectors in {vec_path}")
        return load_vectors(vec_path, model), SourceRecord.from_dict(json.loads(rec_path.read_text()))
    run.log(f"vectors from {cfg.n} {cfg.select} samples of {', '.join(cfg.sources)} ({cfg.shots} shots)")
    if samples is None:
        samples = random_samples(sources, cfg.n, cfg.shots, cfg.source_seed)
    vectors, record = source_vectors(model, sources, samples, cfg.shots, cfg.source_seed, cfg.select)
    save_vectors(vec_path, vectors)
    run.write_json(rec, record.to_dict())
    run.log(f"  {record.tokens_processed} tokens in {record.seconds:.0f}s")
    return vectors, record


def _function_vectors(model: TransformerBridge, cfg: TransferConfig, sources: dict[str, Task], record: SourceRecord,
                      run: Run, path: str, batch_size: int) -> dict[int, Tensor]:
    """The function vectors of the record's samples (k -> [d_model]), computed once and kept in the run folder
    (``path``, with the heads' causal effects and ranking beside the vectors)."""
    from safetensors.torch import load_file, save

    from castlens.files import atomic_write

    out = run.out / path
    if out.exists():
        return {int(k[3:]): v for k, v in load_file(str(out)).items() if k.startswith("top")}
    run.log(f"function vectors: heads ranked by patching on {', '.join(cfg.sources)}")
    samples = [(t, sources[t].train[i]) for t, i in record.samples]
    fv = source_function_vectors(model, list(sources.values()), samples, cfg.shots, cfg.fv_heads, cfg.source_seed,
                                 batch_size=batch_size)
    atomic_write(out, save({"effect": fv.effect.contiguous(), **{f"top{k}": v.contiguous()
                                                                  for k, v in fv.vectors.items()}},
                           metadata={"heads": json.dumps(fv.heads[:max(cfg.fv_heads)])}))
    return fv.vectors


def _selected(model: TransformerBridge, cfg: TransferConfig, sources: Sequence[Task], target: Task, run: Run,
              batch_size: int) -> list:
    """The ``cfg.n`` pool candidates the graph search picks for ``target`` (against its dev queries, or its
    unlabelled test inputs when it has no train split); the pool's embeddings are kept in the run folder."""
    pool, emb = embedded_pool(model, sources, cfg.shots, cfg.source_seed, cfg.pool, cfg.embedder,
                              run.out / "candidates.safetensors", batch_size, run.log)
    t_emb = target_embeddings(model, target, split_dev(target, cfg.dev, cfg.shots, cfg.seed)[0], cfg.embedder,
                              batch_size)
    return [pool[i] for i in select_indices(cfg.select, emb, t_emb, cfg.n, seed=cfg.source_seed)]


def cross_task_icl(model: TransformerBridge, cfg: TransferConfig, target, record: SourceRecord,
                   sources: dict[str, Task], batch_size: int = 16):
    """Cross-task ICL: ``shots`` of the selected source samples (seeded), each in its own task's format, then
    the target instruction and query."""
    rng = random.Random(f"{cfg.seed}:cross-demos:{target.task.name}")
    picked = rng.sample(range(len(record.samples)), min(cfg.shots, len(record.samples)))
    demos = [(sources[t].train[i], default_format(sources[t])) for t, i in (record.samples[j] for j in picked)]
    prefix = prefix_ids(model, cross_task_blocks(demos, target.fmt), target.fmt)
    return {"icl_cross_task": prompted(model, prefix, target.test, batch_size)}


def run_transfer(model: TransformerBridge, cfg: TransferConfig, out: str | Path, data_dir: str | None = None,
                 batch_size: int = 16, png: bool | None = None, log: Callable[[str], None] = print) -> list[Row]:
    """The whole run into ``out``: ``config.json``, the source vectors, one part per target, then the tables and
    figures (:func:`report`). A second call with the same config resumes; with a different one it refuses."""
    # the grid written out: the folder's config records what ran, and a changed default cannot resume it
    cfg = replace(cfg, layers=tuple(cfg.layers or default_layers(model.cfg.n_layers)))
    run, sources, targets = open_run(model, cfg, out, data_dir, png, log, cfg.layers)
    order = sorted(targets, key=lambda t: not targets[t].train)  # a test-only target borrows from the others
    shared = run.world.once(lambda: _vectors(model, cfg, list(sources.values()), run, "vectors.safetensors",
                                             "sources.json", None)) if cfg.select == "random" else None
    if shared is None and run.unfinished(order):  # the candidate pool once, before the ranks split the targets
        run.world.once(lambda: embedded_pool(model, list(sources.values()), cfg.shots, cfg.source_seed, cfg.pool,
                                             cfg.embedder, run.out / "candidates.safetensors", batch_size, run.log))
    layers = list(cfg.layers or ())  # written out at the top

    def candidates(name: str, vectors: dict[str, SteeringVector], record: SourceRecord) -> dict[str, list[Candidate]]:
        directions = {c: vectors[c].directions for c in CONSTRUCTIONS}
        mean = vectors["cast_mean_diff"].directions
        directions.update({r: random_like(mean, cfg.seed + 1000 * k) for k, r in enumerate(random_draws(cfg), 1)})
        cands = grid(directions, layers, cfg.strengths, MODES)
        if cfg.function_vector:
            fvs = _function_vectors(model, cfg, sources, record, run, "function_vectors.safetensors" if shared
                                    else f"vectors/{name}.fv.safetensors", batch_size)
            full = {k: v.float()[None].expand(model.cfg.n_layers, -1).clone() for k, v in fvs.items()}
            cands["function_vector"] = [Candidate(Setting("function_vector", layer, s, f"top{k}"), full[k])
                                        for k in cfg.fv_heads for layer in layers for s in cfg.strengths]
        return cands

    def calibration(target: Prepared) -> dict[str, MethodResult]:
        return calibrated_zero_shot(model, target, batch_size)

    def icl(target: Prepared, record: SourceRecord) -> dict[str, MethodResult]:
        return {**in_task_icl(model, target, batch_size),
                **cross_task_icl(model, cfg, target, record, sources, batch_size)}

    def finish(part: TargetResult, extra: dict[str, MethodResult]) -> TargetResult:
        part = part.with_methods(extra)
        log(f"  zero-shot {100 * part.methods['zero_shot'].accuracy:.1f}%, "
            f"CAST {100 * part.methods['cast_mean_diff'].accuracy:.1f}%")
        return part

    def compute(name: str, done: list[TargetResult]) -> TargetResult:
        t = targets[name]
        vectors, record = shared or _vectors(
            model, cfg, list(sources.values()), run, f"vectors/{name}.safetensors", f"vectors/{name}.sources.json",
            _selected(model, cfg, list(sources.values()), t, run, batch_size))
        target = prepare(model, t, cfg)
        part = tune_and_test(model, target, candidates(name, vectors, record), donors=done, batch_size=batch_size,
                             log=log, staged=cfg.staged_sweep)
        return finish(part, {**calibration(target), **icl(target, record)})

    if shared is not None and run.world.size > 1:  # every rank on every target: its sweep and baselines in pieces
        if cfg.function_vector:  # once, before the ranks need it
            run.world.once(lambda: _function_vectors(model, cfg, sources, shared[1], run,
                                                     "function_vectors.safetensors", batch_size))
        prepared = {t: prepare(model, targets[t], cfg) for t in run.unfinished(order)}
        parts = in_pieces(model, run, order, prepared, {t: candidates(t, *shared) for t in prepared},
                          {"calibration": (lambda t: calibration(prepared[t]),  # per-item priors under option text
                                           lambda t: 1.0 + len(CONTENT_FREE) * bool(prepared[t].fmt.choice_labels)),
                           "icl": (lambda t: icl(prepared[t], shared[1]), lambda t: 2.0)},
                          finish, cfg.staged_sweep, batch_size, log)
    else:
        sizes = {t: min(len(targets[t].test), cfg.limit or len(targets[t].test)) for t in order}
        parts = run.parts(order, compute, TargetResult.from_dict, TargetResult.to_dict, sizes,
                          after=[t for t in order if not targets[t].train])
    if not run.world.main:  # one rank writes the tables
        return []
    files = [run.out / "sources.json"] if shared else sorted((run.out / "vectors").glob("*.sources.json"))
    records = [SourceRecord.from_dict(json.loads(p.read_text())) for p in files]
    return report(run, cfg, [parts[t] for t in targets], records)


def in_pieces(model: TransformerBridge, run: Run, order: Sequence[str], prepared: Mapping[str, Prepared],
              candidates: Mapping[str, Mapping[str, Sequence[Candidate]]],
              baselines: Mapping[str, tuple[Callable[[str], Mapping[str, MethodResult]], Callable[[str], float]]],
              finish: Callable[[TargetResult, dict[str, MethodResult]], TargetResult], staged: bool = False,
              batch_size: int = 16, log: Callable[[str], None] = print) -> dict[str, TargetResult]:
    """The targets' parts of a multi-process run, with every target's work split over the ranks, so no rank waits
    on another's largest target: first, pieces (``parts/pieces/``): each target's dev sweep in ``2 x ranks``
    groups of constructions (:func:`~castlens.experiments.protocol.dev_sweep`; a construction's points depend on
    it alone) and its ``baselines`` (name -> (the methods with their own prompts, no setting to choose; the passes
    over the test items they cost, for the balance): each its own piece, their methods added in this order); then,
    per target, the joined sweep chooses the settings (a target without dev items borrows from the others'
    sweeps) and the test items are scored (:func:`tune_and_test`). The parts equal those of one process, timings
    aside. ``prepared`` and ``candidates``: the unfinished targets of ``order``."""
    cost = {t: p.test.scoring_cost for t, p in prepared.items()}
    work: dict[str, tuple[str, list[str] | str]] = {}  # unit -> (target, constructions, or a baselines' name)
    sizes: dict[str, float] = {}
    for t, p in prepared.items():
        if p.dev is not None:
            scored = {c: _sweep_size(cs, staged) for c, cs in candidates[t].items()}
            for g in (g for g in share(list(scored), 2 * run.world.size, scored) if g):
                unit = f"pieces/{t}.sweep.{'+'.join(g)}"  # named by its constructions: a resume on more ranks
                work[unit] = (t, g)                       # computes its own pieces, never misreads these
                sizes[unit] = cost[t] * len(p.dev.queries) * (2 + sum(scored[c] for c in g))
        for name in baselines:
            work[f"pieces/{t}.{name}"] = (t, name)
            sizes[f"pieces/{t}.{name}"] = cost[t] * len(p.test.queries) * baselines[name][1](t)

    def piece(unit: str, _: list) -> dict:
        t, g = work[unit]
        if isinstance(g, str):
            return {"methods": {k: v.to_dict() for k, v in baselines[g][0](t).items()}}
        sweep = dev_sweep(model, prepared[t], {c: candidates[t][c] for c in g}, batch_size, staged)
        return {"sweep": [x.to_dict() for x in sweep]}
    done = run.parts(list(work), piece, lambda d: d, lambda d: d, sizes)
    sweeps: dict[str, list[SweepPoint]] = {}
    for t in order:  # every target's sweep, for those that borrow (finished targets' from their parts)
        if t in prepared and prepared[t].dev is not None:
            sweeps[t] = join_sweeps(candidates[t], [[SweepPoint.from_dict(x) for x in done[u]["sweep"]]
                                                    for u, (t2, g) in work.items() if t2 == t and isinstance(g, list)],
                                     staged)
        elif t not in prepared:
            sweeps[t] = TargetResult.from_dict(json.loads(run.part_path(t).read_text())).sweep

    def target(t: str, _: list) -> TargetResult:
        p = prepared[t]
        part = tune_and_test(model, p, candidates[t], donors={d: s for d, s in sweeps.items() if d != t},
                             batch_size=batch_size, log=log, staged=staged, sweep=sweeps.get(t) if p.dev else None)
        extra = {k: MethodResult.from_dict(k, v) for name in baselines
                 for k, v in done[f"pieces/{t}.{name}"]["methods"].items()}
        return finish(part, extra)
    return run.parts(order, target, TargetResult.from_dict, TargetResult.to_dict,
                     {t: cost[t] * len(p.test.queries) * (1 + len(candidates[t])) for t, p in prepared.items()})


def _sweep_size(cands: Sequence[Candidate], staged: bool) -> int:
    """Settings a construction's sweep scores: its grid, or (staged) the first pass and all strengths at 2 points."""
    if not staged:
        return len(cands)
    first = len(first_pass(cands))
    return first + min(len(cands) - first, 2 * (len(cands) // max(first, 1) - 1))


def random_draws(cfg: TransferConfig) -> list[str]:
    """Names of the random controls beyond ``random_vector`` (``random_vector_1`` ...), ``n_random - 1`` of them."""
    return [f"random_vector_{k}" for k in range(1, cfg.n_random)]


def random_table(parts: Sequence[TargetResult], cfg: TransferConfig) -> list[str]:
    """Markdown: per target, the random controls as a distribution (mean, standard deviation, range of test
    accuracy over ``n_random`` draws, each tuned by the same sweep), the rank of each CAST construction among
    them (1 = above every draw) and its paired difference to the draws' mean (:func:`paired_delta`), then the
    mean over targets. Empty with a single draw."""
    names = ["random_vector", *random_draws(cfg)]
    if len(names) < 2:
        return []
    ranked = [c for c in ("cast_mean_diff", "icv_pc1", "function_vector") if all(c in p.methods for p in parts)]
    lines = ["", f"Random controls as a distribution: {len(names)} norm-matched random vectors, each tuned by the "
             "same dev sweep; test accuracy in %, the rank of each construction among the draws "
             f"(1 = above all {len(names)}), and its paired difference to the draws' mean in points (95% bootstrap "
             "interval over test items; `~`: inside the noise).", "",
             "| target | random mean | sd | min - max | " + " | ".join(f"{c} rank" for c in ranked) + " | "
             + " | ".join(f"{c} vs random mean" for c in ranked) + " |",
             "|---|---|---|---|" + "---|" * 2 * len(ranked)]
    for p in parts:
        acc = np.array([p.methods[n].accuracy for n in names if n in p.methods])
        ranks = [1 + int((acc > p.methods[c].accuracy).sum()) for c in ranked]
        vs = [fmt_interval(paired_delta([p], c, [n for n in names if n in p.methods], cfg.n_boot, cfg.seed))
              for c in ranked]
        lines.append(f"| {p.target} | {100 * acc.mean():.1f} | {100 * acc.std(ddof=1):.1f} | {100 * acc.min():.1f} - "
                     f"{100 * acc.max():.1f} | " + " | ".join(f"{r} of {len(acc) + 1}" for r in ranks) + " | "
                     + " | ".join(vs) + " |")
    if len(parts) > 1 and all(n in p.methods for p in parts for n in names):
        means = [np.mean([p.methods[n].accuracy for n in names]) for p in parts]
        vs = [fmt_interval(paired_delta(parts, c, names, cfg.n_boot, cfg.seed)) for c in ranked]
        lines.append(f"| mean | {100 * np.mean(means):.1f} | | | " + " | " * len(ranked) + " | ".join(vs) + " |")
    return lines


def report(run: Run, cfg: TransferConfig, parts: Sequence[TargetResult], records: Sequence[SourceRecord]
           ) -> list[Row]:
    """``results.csv``, ``results.md``, ``costs.csv`` and the figures, from the finished parts alone."""
    from castlens import plots

    rows = summarize(parts, [*METHODS, *random_draws(cfg)], REFS, cfg.n_boot, cfg.seed)
    ms = {(p.target, m): 1000 * r.seconds / p.n_test for p in parts for m, r in p.methods.items()}
    run.write("results.csv", to_csv(rows, COLUMNS))
    run.write("results.md", _markdown(rows, cfg, [p.target for p in parts], ms, records)
              + "".join(line + "\n" for line in random_table(parts, cfg)))
    run.write("costs.csv", "\n".join(["target,method,prompt_tokens_per_query,ms_per_query"] + [
        f"{p.target},{m},{r.prompt_tokens:.1f},{ms[(p.target, m)]:.2f}" for p in parts
        for m, r in p.methods.items()]) + "\n")
    who = f"{cfg.model}; sources {', '.join(cfg.sources)}; {cfg.n} samples x {cfg.shots} shots"
    for p in parts:
        if p.sweep:
            run.figure(f"sweep_{p.target}", sweep_figure(p, f"{who}; {p.n_dev} dev items (from train)"))
    mean = [r for r in rows if r.mean]
    run.figure("cost_accuracy", plots.cost_accuracy(
        [r.method for r in mean], [r.prompt_tokens for r in mean], [r.accuracy for r in mean],
        [r.ci_lo for r in mean], [r.ci_hi for r in mean], title="Accuracy against prompt length (mean over targets)",
        caption=f"{who}. Bars: 95% bootstrap intervals."))
    cell = {(r.target, r.method): r for r in rows}
    names = [p.target for p in parts]
    get = (lambda t, m, k: getattr(cell[(t, m)], k) if (t, m) in cell else math.nan)
    shown = [m for m in METHODS if any((t, m) in cell for t in names)]
    run.figure("accuracy_by_target", plots.method_bars(
        names, {m: [get(t, m, "accuracy") for t in names] for m in shown},
        {m: [(get(t, m, "ci_lo"), get(t, m, "ci_hi")) for t in names] for m in shown},
        chance=[p.chance for p in parts], title="Test accuracy per target and method",
        caption=f"{who}. Bars: 95% bootstrap intervals; dashes: chance."))
    return rows


def sweep_figure(p: TargetResult, caption: str = "") -> Any:
    """Dev accuracy over layer x strength, one heatmap per construction (a patched vector, which has one strength,
    as the one row ``patch``), the chosen setting of each outlined; colours diverge around zero-shot dev accuracy."""
    from castlens import plots

    col = {layer: i for i, layer in enumerate(p.layers)}
    grids: dict[str, dict[float | str, list[float]]] = {}
    chosen: dict[str, tuple[int, float | str]] = {}
    for c in CONSTRUCTIONS:
        row_of = (lambda s: "patch") if MODES.get(c) == "replace" else float  # strength -> row key
        for x in p.sweep:
            s = x.setting
            if s.construction == c and s.layer in col and s.strength is not None:
                row = grids.setdefault(c, {}).setdefault(row_of(s.strength), [math.nan] * len(col))
                row[col[s.layer]] = x.dev_accuracy
        best = p.chosen.get(c)
        if c in grids and best is not None and best.setting.layer in col and best.setting.strength is not None:
            chosen[c] = (best.setting.layer, row_of(best.setting.strength))
    return plots.sweep_heatmaps(p.layers, grids, chosen, caption=f"{caption}; steering at the last prompt token",
                                title=f"{p.target}: dev accuracy by steering layer and strength",
                                baselines={"zero-shot (dev)": p.sweep[0].dev_accuracy, "chance": p.chance})


_MC_SCORING = {
    "letter": "Multiple-choice tasks are scored by their option letters (the prompt lists the options).",
    "text": "Multiple-choice tasks are scored by option text (`--mc-scoring text`, as lm-evaluation-harness): each "
            "option's summed log-probability after `Answer:`, in demonstrations too; accuracy is `acc` (it chooses "
            "the settings on dev), `acc_norm` divides each option's score by its length in characters. "
            "Calibrated zero-shot uses each item's own content-free prior over its options.",
}


def _markdown(rows: Sequence[Row], cfg: TransferConfig, targets: list[str], ms: dict,
              records: Sequence[SourceRecord]) -> str:
    lines = [f"# Transfer: {', '.join(cfg.sources)} -> {', '.join(targets)}", "",
             f"Model {cfg.model}; {cfg.n} source samples ({cfg.select} selection), {cfg.shots} demonstrations per "
             f"ICL prompt; layer and strength chosen on {cfg.dev} dev items per target (from its train split); "
             f"accuracy in % with 95% bootstrap intervals over test items ({cfg.n_boot} draws). Delta columns: "
             "paired difference in points; `~` marks an interval that contains 0 (inside the noise). \"vs random "
             "vector\": against the norm-matched random vector tuned by the same dev sweep, the control a steering "
             "gain must beat (a model that answers one label to everything rewards any push off it).", "",
             _MC_SCORING[cfg.mc_scoring], ""]
    norm = any(r.accuracy_norm is not None for r in rows)
    lines += ["| target | method | accuracy | " + ("acc_norm | " if norm else "") + "macro-F1 | vs zero-shot | "
              "vs cross-task ICL | vs random vector | layer x strength | prompt tokens/query |",
              "|---|---|---|---|---|---|---|---|---|" + ("---|" if norm else "")]
    for r in rows:
        s = r.setting
        setting = f"{s.layer} x {s.strength:g}" if s is not None and s.layer is not None else ""
        if s is not None and s.vector:
            setting = f"{s.vector}, {setting}"
        acc_norm = "" if not norm else ("| " if r.accuracy_norm is None else f"| {100 * r.accuracy_norm:.1f} ")
        lines.append(f"| {r.target} | {r.method} | {100 * r.accuracy:.1f} [{100 * r.ci_lo:.1f}, {100 * r.ci_hi:.1f}] "
                     f"{acc_norm}| {'n/a' if r.macro_f1 is None else f'{100 * r.macro_f1:.1f}'} | "
                     f"{fmt_interval(r.deltas.get('zero'))} | "
                     f"{fmt_interval(r.deltas.get('cross_icl'))} | {fmt_interval(r.deltas.get('random'))} | "
                     f"{setting} | {r.prompt_tokens:.0f} |")
    lines += ["", "Chance and majority-class accuracy per target: " + "; ".join(
        f"{r.target} {100 * r.chance:.0f}% / {100 * r.majority:.0f}%" for r in rows
        if r.method == "zero_shot" and r.chance is not None and r.majority is not None) + "."]
    generation = sorted({r.target for r in rows if r.chance is not None and r.majority is None})
    if generation:
        lines += ["", f"Generation targets ({', '.join(generation)}): each item is scored as a choice between its gold "
                  f"output and {cfg.n_candidates - 1} outputs of other items of the task (chance "
                  f"{100 / cfg.n_candidates:.0f}%); they have no classes, so no macro-F1 and no majority baseline."]
    lines += ["",
        f"Vectors: {sum(r.tokens_processed for r in records)} tokens processed once, "
        f"{sum(r.seconds for r in records):.0f}s. Wall time per test query, in ms (with castlens' prefix and body "
        "reuse; see costs.csv):", ""]
    lines += ["| method | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
    for m in [*METHODS, *random_draws(cfg)]:
        vals = [ms.get((t, m)) for t in targets]
        if all(v is None for v in vals):
            continue
        lines.append(f"| {m} | " + " | ".join("" if v is None else f"{v:.1f}" for v in vals) + " |")
    return "\n".join(lines) + "\n"
