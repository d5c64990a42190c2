"""Selection study: which source samples, and how many, make a good CAST vector (CAST, arXiv 2507.13236, Sec. 3.2).

CAST averages the contrastive activations ``few_i - zero_i`` (Eq. 2) of a *selected* subset of the source data,
chosen by a similarity-graph search to be influential and diverse (:mod:`castlens.selection`), and reports that,
unlike in-context learning, steering keeps improving as more source samples are used. Two comparisons, per
target task, from one pool of ``pool`` candidates per source:

* **ablation**: CAST vectors from ``ablation_n`` samples chosen by each of ``methods`` (``random``,
  ``relevance``, ``diversity``, ``cast``), at equal sample counts;
* **scaling**: accuracy against the number of samples ``ns`` for the CAST vector of each of ``scale_methods``,
  and for cross-task ICL whose demonstrations are the same ``cast``-selected samples, as many as fit in the
  context window (the most influential first; the number used is recorded).

Every method ranks the pool once and ``n`` samples are the first ``n`` of its ranking (for the greedy searches
exactly what selecting ``n`` gives; for ``random`` a random subset of the pool). Each candidate's difference is
computed once and shared by every method, ``n`` and target; every variant gets its own layer and strength from
the target's dev split (:func:`~castlens.experiments.protocol.tune_and_test`). Cross-task ICL with thousands of
demonstration tokens costs about a second per query on 2 CPU cores, so the scaling table runs on a seeded subset
of ``icl_limit`` test items, every method on the same items, with paired intervals.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from castlens.experiments.protocol import (Prepared, ProtocolConfig, check_config, default_layers, grid, open_run,
                                           prepare, prompted, tune_and_test)
from castlens.experiments.results import (Interval, MethodResult, Row, TargetResult, fmt_interval, paired_delta,
                                          summarize, to_csv)
from castlens.experiments.run import Run
from castlens.experiments.sources import EMBEDDERS, Sample, embedded_pool, sample_diffs, target_embeddings
from castlens.models import context_length
from castlens.prompts import cross_task_blocks, default_format
from castlens.selection import SELECTION_METHODS, select_indices
from castlens.tasks import Task, TaskError
from castlens.vectors import prefix_ids, text_ids

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["StudyConfig", "run_study", "report", "fit_demos", "variant_name", "figures", "DeltaRow", "paired_table",
           "icl_view", "target_cost"]


@dataclass(frozen=True)
class StudyConfig(ProtocolConfig):
    """Everything that determines the numbers of a selection/scaling study (``config.json``)."""

    model: str = ""
    sources: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    methods: tuple[str, ...] = SELECTION_METHODS       # ablation: every method at ablation_n samples
    ablation_n: int = 32
    ns: tuple[int, ...] = (4, 8, 16, 32, 64, 128)      # scaling: sample counts
    scale_methods: tuple[str, ...] = ("cast", "random")
    icl_limit: int | None = 200                        # test items of the scaling comparison with ICL
    layers: tuple[int, ...] | None = None
    strengths: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    pool: int = 200                                    # candidates per source task
    embedder: str = "model"                            # castlens.experiments.sources.EMBEDDERS
    n_boot: int = 1000
    keep_scores: bool = False                          # store every option log-probability per test item

    def __post_init__(self) -> None:
        bad = [m for m in (*self.methods, *self.scale_methods) if m not in SELECTION_METHODS]
        if bad:
            raise ValueError(f"unknown selection methods {bad}; available: {', '.join(SELECTION_METHODS)}")
        if self.embedder not in EMBEDDERS:
            raise ValueError(f"unknown embedder {self.embedder!r}; available: {', '.join(EMBEDDERS)}")
        if (self.ns and min(self.ns) < 1) or self.ablation_n < 1:
            raise ValueError(f"sample counts must be >= 1, got ns={self.ns}, ablation_n={self.ablation_n}")
        check_config(self)

    def variants(self) -> list[tuple[str, int]]:
        """(selection method, n) of every CAST vector: the ablation's, then the scaling curves' (no repeats)."""
        out = [(m, self.ablation_n) for m in self.methods]
        out += [(m, n) for m in self.scale_methods for n in sorted(self.ns) if (m, n) not in out]
        return out


def variant_name(method: str, n: int) -> str:
    """A variant's method name in the tables: ``cast@32`` (CAST vector, 32 cast-selected samples)."""
    return f"{method}@{n}"


def fit_demos(model: TransformerBridge, blocks: Sequence[list[int]], tail: Sequence[int], room: int) -> int:
    """How many of ``blocks`` (token ids of rendered demonstrations, in order of preference) fit before ``tail``
    (the target instruction) with ``room`` tokens left for the query and answer, within the context window."""
    budget = context_length(model) - room - len(tail) - 1  # 1: the tokenizer's leading special token, if any
    used = 0
    for i, b in enumerate(blocks):
        used += len(b)
        if used > budget:
            return i
    return len(blocks)


def _subset(n_test: int, k: int | None, target: str, seed: int) -> list[int]:
    if k is None or k >= n_test:
        return list(range(n_test))
    return sorted(random.Random(f"{seed}:icl-subset:{target}").sample(range(n_test), k))


def _icl_curve(model: TransformerBridge, cfg: StudyConfig, target, ranking: list[int], pool: list[Sample],
               sources: dict[str, Task], items: list[int], batch_size: int, log) -> dict[str, MethodResult]:
    """Cross-task ICL with the first n cast-selected samples as demonstrations, as many as fit, for each n."""
    test = target.test.subset(items)
    room = max(len(a) + max(map(len, b)) for a, b in zip(test.queries, test.options))
    demos = [(pool[i][1], default_format(sources[pool[i][0]])) for i in ranking[:max(cfg.ns)]]
    rendered = cross_task_blocks(demos, target.fmt)[:-1]  # the demonstrations; the instruction follows them
    blocks = [text_ids(model, b + target.fmt.separator) for b in rendered]
    icl, done = {}, {}
    for n in sorted(cfg.ns):
        k = fit_demos(model, blocks[:n], target.zero_prefix, room)  # zero_prefix: the instruction after the demos
        while True:  # the block-wise count can be off by a merged token at a boundary: never overflow
            prefix = prefix_ids(model, cross_task_blocks(demos[:k], target.fmt), target.fmt)
            if len(prefix) + room <= context_length(model) or k == 0:
                break
            k -= 1
        if k not in done:
            done[k] = prompted(model, prefix, test, batch_size, cfg.keep_scores, demos_used=k)
            log(f"  cross-task ICL with {k} demonstrations ({len(prefix)} tokens): "
                f"{100 * done[k].accuracy:.1f}% in {done[k].seconds:.0f}s")
        icl[variant_name("icl", n)] = done[k]
    return icl


def run_target(model: TransformerBridge, cfg: StudyConfig, task: Task, sources: dict[str, Task], pool: list[Sample],
               pool_emb: np.ndarray, diffs: dict[int, torch.Tensor], donors: Sequence[TargetResult] = (),
               batch_size: int = 16, log: Callable[[str], None] = print, target: Prepared | None = None
               ) -> TargetResult:
    """Every variant, zero-shot and the ICL curve on one target. ``diffs`` caches per-candidate differences
    across targets (filled here); ``target``: ``task`` already prepared (:func:`prepare`), if the caller has it."""
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    target = prepare(model, task, cfg) if target is None else target
    t_emb = target_embeddings(model, task, target.dev.examples if target.dev else [], cfg.embedder, batch_size)
    need: dict[str, int] = {}
    for m, n in [*cfg.variants(), *([("cast", max(cfg.ns))] if cfg.ns else [])]:  # cast: the ICL demonstrations
        need[m] = max(need.get(m, 0), n)
    if max(need.values()) > len(pool):
        raise TaskError(f"{max(need.values())} samples asked for, the pool has {len(pool)} candidates")
    ranking = {m: select_indices(m, pool_emb, t_emb, k, seed=cfg.seed) for m, k in need.items()}
    seconds["select"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    missing = sorted({i for r in ranking.values() for i in r} - set(diffs))
    if missing:
        d, order, _ = sample_diffs(model, list(sources.values()), [pool[i] for i in missing], cfg.shots, cfg.seed,
                                   batch_size)
        where = {id(pool[i][1]): i for i in missing}
        for row, (_, e) in zip(d, order):
            diffs[where[id(e)]] = row
    seconds["differences"] = time.perf_counter() - t0
    vectors = {variant_name(m, n): torch.stack([diffs[i] for i in ranking[m][:n]]).mean(0) for m, n in cfg.variants()}
    t0 = time.perf_counter()
    cands = grid(vectors, list(cfg.layers or default_layers(model.cfg.n_layers)), cfg.strengths)
    part = tune_and_test(model, target, cands, donors=donors, batch_size=batch_size, keep_scores=cfg.keep_scores,
                         log=log)
    seconds["tune_and_test"] = time.perf_counter() - t0
    items = _subset(part.n_test, cfg.icl_limit, task.name, cfg.seed)
    icl = _icl_curve(model, cfg, target, ranking.get("cast", []), pool, sources, items, batch_size, log) \
        if cfg.ns else {}
    index = {s: {id(e): i for i, e in enumerate(t.train)} for s, t in sources.items()}
    return part.with_methods({}, icl_items=items, icl={k: v.to_dict() for k, v in icl.items()}, seconds=seconds,
                             rankings={m: [[pool[i][0], index[pool[i][0]][id(pool[i][1])]] for i in r]
                                       for m, r in ranking.items()})


def target_cost(model: TransformerBridge, cfg: StudyConfig, p: Prepared) -> float:
    """A target's relative cost, to balance the targets over the ranks of a multi-process run: its dev sweep
    (every variant x layer x strength, and the unsteered pass) and its test scoring (zero-shot and every variant),
    each item and setting weighted by :attr:`~castlens.experiments.protocol.Items.scoring_cost` (its option tokens
    dominate under option-text scoring: an ARC-Challenge item costs ten times a Financial PhraseBank one). The
    scaling curve's cross-task ICL, about the same for every target, is left out."""
    variants, layers = len(cfg.variants()), len(cfg.layers or default_layers(model.cfg.n_layers))
    sweep = len(p.dev.queries) * (1 + variants * layers * len(cfg.strengths)) if p.dev is not None else 0
    return p.test.scoring_cost * (sweep + len(p.test.queries) * (1 + variants))


def icl_view(part: TargetResult) -> TargetResult:
    """The part restricted to its ICL subset: every method and the ICL curve on the same items."""
    icl = {k: MethodResult.from_dict(k, v) for k, v in part.extra["icl"].items()}
    return part.view(part.extra["icl_items"], icl)


def run_study(model: TransformerBridge, cfg: StudyConfig, out: str | Path, data_dir: str | None = None,
              batch_size: int = 16, png: bool | None = None, log: Callable[[str], None] = print
              ) -> tuple[list[Row], list[Row]]:
    """The study into ``out``: ``config.json``, ``candidates.safetensors``, one part per target (a rerun
    resumes), then the tables and figures (:func:`report`). Returns the ablation and the scaling rows."""
    # the grid written out: the folder's config records what ran, and a changed default cannot resume it
    cfg = replace(cfg, layers=tuple(cfg.layers or default_layers(model.cfg.n_layers)))
    run, sources, targets = open_run(model, cfg, out, data_dir, png, log, cfg.layers)
    diffs: dict[int, torch.Tensor] = {}
    order = sorted(targets, key=lambda t: not targets[t].train)  # a test-only target borrows from the others
    # the pool and its embeddings: made only if some target is unfinished, by one rank, then read back
    pool, emb = run.world.once(lambda: embedded_pool(
        model, list(sources.values()), cfg.shots, cfg.seed, cfg.pool, cfg.embedder,
        run.out / "candidates.safetensors", batch_size, log)) if run.unfinished(order) else ([], np.zeros(0))

    prepared = {t: prepare(model, targets[t], cfg) for t in run.unfinished(order)}  # once: the balance and the run

    def compute(name: str, done: list[TargetResult]) -> TargetResult:
        return run_target(model, cfg, targets[name], sources, pool, emb, diffs, done, batch_size, log,
                          prepared[name])

    parts = run.parts(order, compute, TargetResult.from_dict, TargetResult.to_dict,
                      {t: target_cost(model, cfg, p) for t, p in prepared.items()},
                      after=[t for t in order if not targets[t].train])
    if not run.world.main:  # one rank writes the tables
        return [], []
    return report(run, cfg, [parts[t] for t in targets])


# ---------------------------------------------------------------- tables and figures
ABLATION_COLUMNS = ["target", "method", "accuracy", "ci_lo", "ci_hi", "macro_f1", "delta_zero", "delta_zero_lo",
                    "delta_zero_hi", "delta_zero_noise", "delta_random", "delta_random_lo", "delta_random_hi",
                    "delta_random_noise", "layer", "strength", "n_test", "chance", "majority"]
SCALING_COLUMNS = ["target", "method", "n_samples", "demos_used", "accuracy", "ci_lo", "ci_hi", "delta_zero",
                   "delta_zero_lo", "delta_zero_hi", "delta_zero_noise", "prompt_tokens", "layer", "strength",
                   "n_test"]


@dataclass(frozen=True)
class DeltaRow:
    """Per target (or ``mean``) and n: CAST from cast-selected samples minus random-selected, and minus ICL."""

    target: str
    n: int
    vs_random: Interval
    vs_icl: Interval


def report(run: Run, cfg: StudyConfig, parts: Sequence[TargetResult]) -> tuple[list[Row], list[Row]]:
    """``ablation.csv``, ``scaling.csv``, ``results.md`` and the figures, from the finished parts alone."""
    ablation = summarize(parts, ["zero_shot", *(variant_name(m, cfg.ablation_n) for m in cfg.methods)],
                         {"zero": "zero_shot", "random": variant_name("random", cfg.ablation_n)}, cfg.n_boot, cfg.seed)
    views = [icl_view(p) for p in parts]
    ns = sorted(cfg.ns)
    n_of = {variant_name(m, n): n for m in (*cfg.scale_methods, "icl") for n in ns}
    scaling = summarize(views, ["zero_shot", *n_of], {"zero": "zero_shot"}, cfg.n_boot, cfg.seed)
    icl = {variant_name("icl", n) for n in ns}

    def used(r: Row) -> float | None:
        if r.method not in icl:
            return None
        return float(np.mean([v.methods[r.method].demos_used for v in views if r.mean or v.target == r.target]))

    scaling = [replace(r, n_samples=n_of.get(r.method), demos_used=used(r)) for r in scaling]
    deltas = paired_table(views, cfg)
    run.write("ablation.csv", to_csv(ablation, ABLATION_COLUMNS))
    run.write("scaling.csv", to_csv(scaling, SCALING_COLUMNS))
    run.write("results.md", results_md(cfg, ablation, scaling, deltas))
    for stem, fig in figures(cfg, ablation, scaling).items():
        run.figure(stem, fig)
    return ablation, scaling


def paired_table(views: Sequence[TargetResult], cfg: StudyConfig) -> list[DeltaRow]:
    """Per target and on average, per n: CAST (cast selection) minus CAST (random selection) and minus cross-task
    ICL with the same samples, paired on the scaling items. Empty without both selections in ``scale_methods``."""
    if not {"cast", "random"} <= set(cfg.scale_methods):
        return []
    return [DeltaRow(t, n, paired_delta(ps, variant_name("cast", n), variant_name("random", n), cfg.n_boot, cfg.seed),
                     paired_delta(ps, variant_name("cast", n), variant_name("icl", n), cfg.n_boot, cfg.seed))
            for t, ps in [*((v.target, [v]) for v in views), ("mean", list(views))] for n in sorted(cfg.ns)]


def _targets(rows: Sequence[Row]) -> list[str]:
    return list(dict.fromkeys(r.target for r in rows if not r.mean))


def _setting(r: Row) -> str:
    return f"{r.setting.layer} x {r.setting.strength:g}" if r.setting is not None and r.setting.layer is not None \
        else ""


_SCORED_BY = {"letter": "their option letters (the prompt lists the options)",
              "text": "option text (`--mc-scoring text`: each option's summed log-probability after `Answer:`, as "
                      "lm-evaluation-harness's `acc`)"}


def results_md(cfg: StudyConfig, ablation: Sequence[Row], scaling: Sequence[Row], deltas: Sequence[DeltaRow]) -> str:
    emb = {"model": "the model's own residual stream at its middle layer (mean over tokens after the first)",
           "minilm": "all-MiniLM-L6-v2 sentence embeddings"}[cfg.embedder]
    lines = [f"# Source-sample selection{' and scaling' if cfg.ns else ''}: {', '.join(cfg.sources)} -> "
             f"{', '.join(_targets(ablation))}", "",
             f"Model {cfg.model}. CAST mean-difference vectors (CAST Eq. 2-3) from source samples chosen out of "
             f"{cfg.pool} candidates per source task, embedded for the graph search with {emb}, centred on the "
             f"pool's mean; each vector's layer and strength chosen on {cfg.dev} dev items "
             f"per target (from its train split; MedMCQA borrows). Accuracy in % with 95% bootstrap intervals over "
             f"test items ({cfg.n_boot} draws); deltas are paired, in points; `~` marks an interval containing 0.", "",
             f"Multiple-choice targets are scored by {_SCORED_BY[cfg.mc_scoring]}.", "",
             f"## Ablation: {cfg.ablation_n} samples per vector, "
             f"{f'{cfg.limit} seeded test items per target' if cfg.limit else 'whole test splits'}", "",
             "| target | method | accuracy | vs zero-shot | vs random selection | layer x strength |",
             "|---|---|---|---|---|---|"]
    for r in ablation:
        lines.append(f"| {r.target} | {r.method} | {100 * r.accuracy:.1f} [{100 * r.ci_lo:.1f}, {100 * r.ci_hi:.1f}] | "
                     f"{fmt_interval(r.deltas.get('zero'))} | {fmt_interval(r.deltas.get('random'))} | {_setting(r)} |")
    if not cfg.ns:
        return "\n".join(lines) + "\n"
    lines += ["", f"## Scaling: accuracy against the number of source samples, on {cfg.icl_limit or 'all'} test "
              "items per target (the same items for every method)", "",
              "`icl@n`: cross-task ICL with the first n cast-selected samples as demonstrations, as many as fit in "
              "the context window (`demos used`).", "",
              "| target | method | demos used | accuracy | vs zero-shot | prompt tokens/query |",
              "|---|---|---|---|---|---|"]
    for r in scaling:
        used = f"{r.demos_used:.0f}" if r.demos_used is not None else ""
        lines.append(f"| {r.target} | {r.method} | {used} | {100 * r.accuracy:.1f} [{100 * r.ci_lo:.1f}, "
                     f"{100 * r.ci_hi:.1f}] | {fmt_interval(r.deltas.get('zero'))} | {r.prompt_tokens:.0f} |")
    if deltas:
        lines += ["", "Paired differences on the same items, in points: the CAST vector from cast-selected samples "
                  "minus the one from random samples, and minus cross-task ICL with the cast-selected samples.", "",
                  "| target | n | cast - random selection | cast - cross-task ICL |", "|---|---|---|---|"]
        lines += [f"| {d.target} | {d.n} | {fmt_interval(d.vs_random)} | {fmt_interval(d.vs_icl)} |" for d in deltas]
    return "\n".join(lines) + "\n"


def figures(cfg: StudyConfig, ablation: Sequence[Row], scaling: Sequence[Row]) -> dict:
    """The study's plotly figures by file stem: ``ablation`` (accuracy per target and selection method) and
    ``scaling_<target>`` / ``scaling_mean`` (accuracy against the number of source samples)."""
    from castlens import plots

    who = f"{cfg.model}; sources {', '.join(cfg.sources)}"
    targets = _targets(ablation)
    groups = [*targets, "mean"]
    ab_methods = ["zero_shot", *(variant_name(m, cfg.ablation_n) for m in cfg.methods)]

    def cell(rows: Sequence[Row], t: str, m: str, k: str) -> float:
        r = next((r for r in rows if r.method == m and (r.target == t or (t == "mean" and r.mean))), None)
        v = None if r is None else getattr(r, k)
        return math.nan if v is None else v

    chance = [cell(ablation, t, "zero_shot", "chance") for t in targets]
    out = {"ablation": plots.method_bars(
        groups, {m: [cell(ablation, t, m, "accuracy") for t in groups] for m in ab_methods},
        {m: [(cell(ablation, t, m, "ci_lo"), cell(ablation, t, m, "ci_hi")) for t in groups] for m in ab_methods},
        chance=[*chance, float(np.mean(chance))],
        title=f"Selection ablation: CAST vectors from {cfg.ablation_n} source samples",
        caption=f"{who}; {cfg.pool} candidates per source; layer and strength per vector chosen on dev. Bars: 95% "
                "bootstrap intervals over test items; dashes: chance.")}
    ns = sorted(cfg.ns)
    icl = "cross-task ICL, cast-selected demos"
    for t in groups if ns else []:
        def curve(m: str) -> list[tuple[float, float, float]]:
            return [(cell(scaling, t, variant_name(m, n), "accuracy"), cell(scaling, t, variant_name(m, n), "ci_lo"),
                     cell(scaling, t, variant_name(m, n), "ci_hi")) for n in ns]

        curves = {f"CAST vector, {m} selection": curve(m) for m in cfg.scale_methods}
        curves[icl] = curve("icl")
        out[f"scaling_{t}"] = plots.scaling_curves(
            ns, curves, baselines={"zero-shot": cell(scaling, t, "zero_shot", "accuracy")},
            labels={icl: [f"{cell(scaling, t, variant_name('icl', n), 'demos_used'):.0f}" for n in ns]},
            title=f"{'Mean over targets' if t == 'mean' else t}: accuracy against source samples",
            caption=f"{who}; {cfg.icl_limit or 'all'} test items per target, the same for every method. Bands: 95% "
                    "bootstrap intervals. Numbers on the ICL curve: demonstrations that fit in the context window.")
    return out
