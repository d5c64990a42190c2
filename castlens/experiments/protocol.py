"""Protocol: how every castlens experiment tunes a steering vector and tests it, written once.

For one target task and a table of candidate vectors (constructions), :func:`tune_and_test` does::

    dev, pool = split of the target's train split        (dev items; the rest are in-task demonstrations)
    for every construction c and setting s in its grid:  dev score of s      (one pass: castlens.reuse)
    chosen[c] = argmax_s pick(dev scores of s)            (default: dev accuracy, ties by gold log-prob, order)
    test: zero-shot and each chosen setting               (one pass; steering at the last prompt token)

Hyper-parameters are never chosen on test items. A target without a train split borrows, per construction, the
setting with the best mean dev accuracy over the other targets of the run (``donors``). Scoring: each answer
option is scored by the summed log-probability of its verbalisation after the prompt; classification targets
score their labels, generation targets the gold output among ``n_candidates`` outputs of other items.

Extra methods that use a different prompt (in-task or cross-task ICL) are scored on the same test items with
:func:`prompted`. The result is a :class:`~castlens.experiments.results.TargetResult`; an experiment adds the
methods it compares and writes tables from :func:`~castlens.experiments.results.summarize`.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from castlens.experiments.results import UNSTEERED_NAME, MethodResult, Setting, SweepPoint, TargetResult
from castlens.prompts import PromptFormat, default_format, sample_demos
from castlens.reuse import UNSTEERED, prefix_option_logprobs
from castlens.reuse import Setting as Steer
from castlens.experiments.run import Run
from castlens.tasks import Example, Task, TaskError, load_task, with_mc_scoring
from castlens.vectors import prefix_ids, text_ids

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["ProtocolConfig", "Candidate", "Items", "Prepared", "prepare", "tune_and_test", "prompted", "grid",
           "default_layers", "split_dev", "options_for", "encode", "borrowed_settings", "check_config",
           "by_accuracy", "Pick", "test_items", "input_digests", "check_layers", "open_run",
           "calibrated_zero_shot", "CONTENT_FREE", "first_pass", "dev_sweep", "join_sweeps"]


@dataclass(frozen=True)
class ProtocolConfig:
    """What the protocol needs of a run's config (every runner's config has these fields)."""

    dev: int = 64                    # dev items carved from the target's train split
    shots: int = 4                   # in-task demonstrations kept out of the dev split
    limit: int | None = None         # test items (None: the whole test split)
    n_candidates: int = 4            # answer candidates for generation targets
    seed: int = 0
    mc_scoring: str = "letter"       # multiple-choice answers as letters or option texts (castlens.tasks.MC_SCORING)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Candidate:
    """One point of a construction's grid: the setting and the vector it steers with (``mode="replace"``
    patches the vector in, Hendel et al. 2023)."""

    setting: Setting
    directions: Tensor
    mode: str = "add"

    def steer(self, name: str | None = None) -> Steer:
        s = self.setting
        return Steer(name or f"{s.construction}/{s.vector}/{s.layer}x{s.strength}", self.directions,
                     s.layer or 0, 1.0 if s.strength is None else s.strength, self.mode)


def grid(vectors: Mapping[str, Tensor], layers: Sequence[int], strengths: Sequence[float],
         modes: Mapping[str, str] | None = None) -> dict[str, list[Candidate]]:
    """Every vector at every layer x strength (a ``replace`` vector at strength 1 only)."""
    out = {}
    for name, v in vectors.items():
        mode = (modes or {}).get(name, "add")
        out[name] = [Candidate(Setting(name, layer, s), v, mode) for layer in layers
                     for s in (strengths if mode == "add" else (1.0,))]
    return out


def check_config(cfg: object) -> None:
    """Refuse settings that cannot give meaningful numbers, before any model is loaded: non-finite or missing
    strengths, counts below 1, a task that is both source and target (fields a config lacks are skipped)."""
    import math

    strengths = getattr(cfg, "strengths", (1.0,))
    if not strengths or any(not math.isfinite(s) for s in strengths):
        raise ValueError(f"steering strengths must be finite numbers, got {list(strengths)}")
    for name in ("n", "shots", "dev", "pool", "limit", "n_boot", "examples", "trials", "icl_limit"):
        v = getattr(cfg, name, None)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    both = set(getattr(cfg, "sources", ())) & set(getattr(cfg, "targets", ()))
    if both:
        raise TaskError(f"tasks {sorted(both)} are both source and target")


def check_layers(layers: Sequence[int] | None, n_layers: int) -> None:
    """Refuse steering layers the model does not have, naming the valid range (before any forward pass)."""
    bad = [x for x in layers or () if not 0 <= x < n_layers]
    if bad:
        raise ValueError(f"steering layers {bad} out of range: the model has layers 0..{n_layers - 1}")


def default_layers(n_layers: int) -> tuple[int, ...]:
    """Every ``ceil(n_layers / 10)``-th layer, skipping the first and last: at most 9 layers at any depth, so a
    sweep costs the same share of a model's depth (30 layers: 3, 6, ..., 27; 18 layers: 2, 4, ..., 16)."""
    step = max(1, -(-n_layers // 10))
    return tuple(range(step, n_layers - 1, step)) or (0,)


# ---------------------------------------------------------------- items
def split_dev(task: Task, dev: int, shots: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(dev items, in-task demonstration pool) from the train split; both empty for a test-only task."""
    if not task.train:
        return [], []
    train = list(task.train)
    random.Random(f"{seed}:dev:{task.name}").shuffle(train)
    k = min(dev, len(train) - shots)
    if k < 1:
        raise TaskError(f"task {task.name!r}: train split of {len(train)} is too small for a dev split and "
                        f"{shots} demonstrations")
    return train[:k], train[k:]


def options_for(task: Task, ex: Example, fmt: PromptFormat, n_candidates: int = 4, seed: int = 0
                ) -> tuple[list[str], int]:
    """Answer options of one item and the gold index: a classification task's labels (verbalised), or under
    option-text scoring the item's option texts; for a generation task, the gold output among ``n_candidates``
    distinct outputs of the task's other items."""
    if fmt.choice_labels and ex.choices:
        return list(ex.choices), fmt.choice_labels.index(ex.output)
    if task.kind == "classification" and task.labels:
        return [fmt.verbalize(label) for label in task.labels], task.labels.index(ex.output)
    others = sorted({e.output for e in task.train + task.test if e.output != ex.output})
    if len(others) < n_candidates - 1:
        raise TaskError(f"task {task.name!r}: {n_candidates} answer candidates need {n_candidates - 1} other "
                        f"distinct outputs, found {len(others)}")
    rng = random.Random(f"{seed}:candidates:{task.name}:{ex.input}")
    opts = rng.sample(others, n_candidates - 1)
    gold = rng.randrange(n_candidates)
    opts.insert(gold, ex.output)
    return [fmt.verbalize(o) for o in opts], gold


@dataclass(frozen=True)
class Items:
    """Encoded items: query token ids, option token ids per query (``" " + option``) and gold indices; under
    option-text scoring also each option's character count (``" " + option``), for ``acc_norm``."""

    examples: list[Example]
    queries: list[list[int]]
    options: list[list[list[int]]]
    gold: list[int]
    option_chars: list[list[int]] | None = None

    @property
    def query_tokens(self) -> float:
        return float(np.mean([len(q) for q in self.queries]))

    @property
    def scoring_cost(self) -> float:
        """A relative cost of scoring one item under one setting, for balancing work over ranks: its option tokens
        (run once per setting) and an eighth of its body (shared by every setting through castlens' reuse)."""
        return self.query_tokens / 8 + float(np.mean([sum(map(len, o)) for o in self.options]))

    def subset(self, idx: Sequence[int]) -> Items:
        return Items([self.examples[i] for i in idx], [self.queries[i] for i in idx],
                     [self.options[i] for i in idx], [self.gold[i] for i in idx],
                     None if self.option_chars is None else [self.option_chars[i] for i in idx])


def encode(model: TransformerBridge, task: Task, fmt: PromptFormat, items: Sequence[Example],
           n_candidates: int = 4, seed: int = 0) -> Items:
    opts = [options_for(task, e, fmt, n_candidates, seed) for e in items]
    chars = [[len(" " + o) for o in texts] for texts, _ in opts] if fmt.choice_labels else None
    return Items(list(items), [text_ids(model, fmt.render(e, False)) for e in items],
                 [[text_ids(model, " " + o) for o in texts] for texts, _ in opts], [g for _, g in opts], chars)


@dataclass(frozen=True)
class Prepared:
    """A target ready for the protocol: format, encoded dev and test items, in-task demonstration pool and the
    zero-shot prefix (instruction)."""

    task: Task
    fmt: PromptFormat
    dev: Items | None
    test: Items
    pool: list[Example]
    zero_prefix: list[int]
    seed: int = 0
    shots: int = 4
    test_items: list[int] | None = None   # indices into the test split when a subset is scored

    def block(self, ex: Example) -> str:
        return self.fmt.render(ex, True)


def test_items(task: Task, limit: int | None, seed: int = 0) -> list[int]:
    """Indices of the test items a run scores: all of them, or a seeded random subset of ``limit``, stratified
    by label for a classification task (each label keeps its share, largest remainders first), in split order.
    Never the first ``limit``: a split sorted by label would leave whole classes out."""
    test = task.split("test")
    if limit is None or limit >= len(test):
        return list(range(len(test)))
    rng = random.Random(f"{seed}:limit:{task.name}")
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(test):
        groups.setdefault(e.output if task.kind == "classification" else "", []).append(i)
    share = {k: limit * len(v) / len(test) for k, v in groups.items()}
    take = {k: int(s) for k, s in share.items()}
    for k in sorted(groups, key=lambda k: (-(share[k] - take[k]), k))[: limit - sum(take.values())]:
        take[k] += 1
    return sorted(i for k, v in groups.items() for i in rng.sample(v, take[k]))


def prepare(model: TransformerBridge, task: Task, cfg: ProtocolConfig, dev: Sequence[Example] | None = None
            ) -> Prepared:
    """``task`` split into dev (``cfg.dev`` train items, or the given ``dev``), the demonstration pool and the
    test items (:func:`test_items`), encoded; answers written as ``cfg.mc_scoring`` says."""
    task = with_mc_scoring(task, cfg.mc_scoring)
    fmt = default_format(task)
    if dev is None:
        dev, pool = split_dev(task, cfg.dev, cfg.shots, cfg.seed)
    else:
        pool = [e for e in task.train if e not in dev]
    items = test_items(task, cfg.limit, cfg.seed)
    test = [task.split("test")[i] for i in items]
    enc = (lambda xs: encode(model, task, fmt, xs, cfg.n_candidates, cfg.seed))
    return Prepared(task, fmt, enc(dev) if dev else None, enc(test), list(pool),
                    prefix_ids(model, [fmt.instruction], fmt), cfg.seed, cfg.shots,
                    None if len(items) == len(task.test) else items)


def label_baselines(gold: Sequence[int], options: Sequence[Sequence]) -> tuple[float, float]:
    """Chance (mean 1/#options) and majority-class accuracy of a test split."""
    counts = np.bincount(gold, minlength=max(map(len, options)))
    return float(np.mean([1 / len(x) for x in options])), float(counts.max() / len(gold))


def method_result(scores: Tensor, items: Items, prompt_tokens: float, seconds: float,
                  setting: Setting | None = None, keep_scores: bool = False, demos_used: int | None = None,
                  normalized: bool = True) -> MethodResult:
    """Predictions and correctness from ``scores`` [item, option]; ``correct_norm`` too where the items carry
    option lengths and ``normalized`` (scores that are summed log-probabilities, not calibrated ones)."""
    pred = scores.argmax(-1).tolist()
    norm = None
    if items.option_chars is not None and normalized:  # acc_norm: summed log-prob / characters
        chars = torch.ones_like(scores)
        for i, c in enumerate(items.option_chars):
            chars[i, :len(c)] = torch.tensor(c, dtype=scores.dtype)
        norm = [int(p == g) for p, g in zip((scores / chars).argmax(-1).tolist(), items.gold)]
    return MethodResult(pred, [int(p == g) for p, g in zip(pred, items.gold)], prompt_tokens, seconds, setting,
                        scores.tolist() if keep_scores else None, demos_used, norm)


# ---------------------------------------------------------------- choosing a setting
Pick = Callable[[Tensor, Items], list[tuple[float, ...]]]


def by_accuracy(scores: Tensor, items: Items) -> list[tuple[float, ...]]:
    """Sort keys of each setting (``scores[0]`` is unsteered): dev accuracy (to 9 digits), then the mean
    log-probability of the gold answer normalised over options."""
    g = torch.tensor(items.gold)
    acc = (scores.argmax(-1) == g).double().mean(-1)
    gold_lp = torch.log_softmax(scores.clamp_min(-1e30), -1)[:, torch.arange(len(g)), g].mean(-1)
    return [(round(float(a), 9), float(lp)) for a, lp in zip(acc, gold_lp)]


def borrowed_settings(target: str, donors: Sequence[TargetResult] | Mapping[str, Sequence[SweepPoint]],
                      constructions: Sequence[str]) -> dict[str, SweepPoint]:
    """For a target without dev items: per construction, the setting with the best mean dev accuracy over the
    ``donors`` (finished targets, or target name -> dev sweep) that have a sweep (ties: the earlier setting),
    among the settings every donor scored (a staged sweep scores different points per target)."""
    pairs = list(donors.items()) if isinstance(donors, Mapping) else [(p.target, p.sweep) for p in donors]
    names, runs = [n for n, s in pairs if s], [list(s) for _, s in pairs if s]
    if not runs:
        raise TaskError(f"target {target!r} has no train split to tune on, and no other target of this run has a "
                        "dev sweep to borrow a setting from")
    chosen = {}
    for c in constructions:
        scored = [{p.setting for p in sw} for sw in runs[1:]]
        keys = [p.setting for p in runs[0] if p.setting.construction == c and all(p.setting in x for x in scored)]
        acc = {k: float(np.mean([next(x.dev_accuracy for x in sw if x.setting == k) for sw in runs])) for k in keys}
        k = max(keys, key=lambda k: (round(acc[k], 9), -keys.index(k)))
        chosen[c] = SweepPoint(k, acc[k], borrowed_from=tuple(names))
    return chosen


def first_pass(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The staged sweep's first pass over one construction's grid: every layer (and library vector) at its middle
    strength (the upper middle of the sorted strengths; a patched vector has one)."""
    strengths = sorted({c.setting.strength for c in candidates if c.setting.strength is not None})
    mid = strengths[len(strengths) // 2] if strengths else None
    return [c for c in candidates if c.setting.strength == mid]


def _dev_points(model: TransformerBridge, target: Prepared, cands: Sequence[Candidate], pick: Pick,
                batch_size: int) -> list[tuple[SweepPoint, tuple[float, ...]]]:
    """Dev score and choice key of unsteered (first) and of every candidate, in one pass."""
    d = target.dev
    assert d is not None
    scores = prefix_option_logprobs(model, target.zero_prefix, d.queries, d.options,
                                    [UNSTEERED, *(c.steer() for c in cands)], batch_size=batch_size)
    acc_lp = by_accuracy(scores, d)  # (dev accuracy to 9 digits, gold log-prob) per setting, recorded
    keys = acc_lp if pick is by_accuracy else pick(scores, d)
    acc = (scores.argmax(-1) == torch.tensor(d.gold)).double().mean(-1).tolist()
    settings = [Setting(UNSTEERED_NAME), *(c.setting for c in cands)]
    return [(SweepPoint(s, float(acc[i]), acc_lp[i][1]), keys[i]) for i, s in enumerate(settings)]


def _accuracy_key(p: SweepPoint) -> tuple[float, ...]:
    """:func:`by_accuracy`'s choice key of a recorded sweep point (it records both parts of it exactly)."""
    return (round(p.dev_accuracy, 9), p.dev_gold_logprob if p.dev_gold_logprob is not None else -math.inf)


def _scored(model: TransformerBridge, target: Prepared, candidates: Mapping[str, Sequence[Candidate]], pick: Pick,
            batch_size: int, staged: bool) -> list[tuple[SweepPoint, tuple[float, ...]]]:
    """Unsteered and every candidate the sweep scores on dev, with its choice key (see :func:`tune_and_test`)."""
    flat = [c for cs in candidates.values() for c in cs]
    first = [c for cs in candidates.values() for c in first_pass(cs)] if staged else flat
    points = _dev_points(model, target, first, pick, batch_size)
    if staged:
        key = {p.setting: k for p, k in points}
        best = set()
        for cs in candidates.values():
            ranked = sorted(first_pass(cs), key=lambda c: key[c.setting], reverse=True)
            best |= {(c.setting.construction, c.setting.layer, c.setting.vector) for c in ranked[:2]}
        done = {c.setting for c in first}
        second = [c for c in flat if c.setting not in done
                  and (c.setting.construction, c.setting.layer, c.setting.vector) in best]
        points += _dev_points(model, target, second, pick, batch_size)[1:] if second else []
    return points


def dev_sweep(model: TransformerBridge, target: Prepared, candidates: Mapping[str, Sequence[Candidate]],
              batch_size: int = 16, staged: bool = False) -> list[SweepPoint]:
    """The dev sweep of :func:`tune_and_test` alone (unsteered first), with its default choice rule. Each
    construction's points depend on that construction alone, so sweeps of disjoint parts of ``candidates`` (on
    other processes, say) joined by :func:`join_sweeps` equal the sweep of the whole: same numbers, same order."""
    if target.dev is None:
        raise TaskError(f"target {target.task.name!r} has no dev items to sweep on")
    return [p for p, _ in _scored(model, target, candidates, by_accuracy, batch_size, staged)]


def join_sweeps(candidates: Mapping[str, Sequence[Candidate]], sweeps: Sequence[Sequence[SweepPoint]],
                staged: bool = False) -> list[SweepPoint]:
    """Sweeps of disjoint parts of ``candidates`` (:func:`dev_sweep`) as the one sweep of all of them, in the order
    :func:`tune_and_test` records it: unsteered, the (first-pass) points in grid order, then the second pass."""
    if not sweeps:
        raise ValueError("no sweeps to join")
    at = {p.setting: p for sw in sweeps for p in sw[1:]}
    flat = [c.setting for cs in candidates.values() for c in cs]
    first = [c.setting for cs in candidates.values() for c in first_pass(cs)] if staged else flat
    missing = [s for s in first if s not in at]
    if missing or set(at) - set(flat):
        raise ValueError(f"the sweeps do not cover the candidates: {len(missing)} first-pass settings missing, "
                         f"{len(set(at) - set(flat))} settings outside the grid")
    seen = set(first)
    return [sweeps[0][0], *(at[s] for s in first), *(at[s] for s in flat if s in at and s not in seen)]


def tune_and_test(model: TransformerBridge, target: Prepared, candidates: Mapping[str, Sequence[Candidate]],
                  pick: Pick = by_accuracy, donors: Sequence[TargetResult] | Mapping[str, Sequence[SweepPoint]] = (),
                  batch_size: int = 16, keep_scores: bool = False, log: Callable[[str], None] = print,
                  staged: bool = False, sweep: Sequence[SweepPoint] | None = None) -> TargetResult:
    """Choose each construction's setting on ``target.dev`` (or borrow it from ``donors``: finished targets, or
    target name -> sweep) and score zero-shot and every chosen setting on the test items (see the module
    docstring). The sweep is recorded.

    ``staged``: instead of the whole grid, a first pass at the middle strength (:func:`first_pass`), then every
    strength at the construction's two best (layer, vector) points of that pass; the choice is the best of all
    points scored. The same rule for every construction, random controls included, at a fraction of the cost
    (9 layers x 4 strengths: 16 of 36 points). ``sweep``: the dev sweep already scored (:func:`join_sweeps` of
    :func:`dev_sweep` parts), chosen from by the default rule."""
    flat = [c for cs in candidates.values() for c in cs]
    if sweep is not None and pick is not by_accuracy:
        raise ValueError("a precomputed sweep is chosen from by dev accuracy (pick=by_accuracy) only")
    if target.dev is not None:
        t0 = time.perf_counter()
        points = _scored(model, target, candidates, pick, batch_size, staged) if sweep is None else \
            [(p, _accuracy_key(p)) for p in sweep]
        sweep = [p for p, _ in points]
        key = {p.setting: k for p, k in points}
        chosen = {}
        for name, cs in candidates.items():
            scored = [j for j in range(len(cs)) if cs[j].setting in key]
            best_j = max(scored, key=lambda j: (*key[cs[j].setting], -j))
            chosen[name] = next(p for p in sweep if p.setting == cs[best_j].setting)
        log(f"  dev sweep: {len(target.dev.queries)} items x {len(sweep) - 1} settings in "
            f"{time.perf_counter() - t0:.0f}s")
    else:
        sweep = []
        chosen = borrowed_settings(target.task.name, donors, list(candidates))
        log(f"  no train split: settings borrowed from the dev sweeps of "
            f"{', '.join(next(iter(chosen.values())).borrowed_from or ())}")
    pick_c = {name: next(c for c in cs if c.setting == chosen[name].setting) for name, cs in candidates.items()}
    t = target.test
    timings: dict[str, float] = {}
    steers = [UNSTEERED, *(c.steer(name) for name, c in pick_c.items())]
    scores = prefix_option_logprobs(model, target.zero_prefix, t.queries, t.options, steers, batch_size=batch_size,
                                    timings=timings)
    shared, tokens = timings["prefix"] + timings["body"], len(target.zero_prefix) + t.query_tokens
    methods = {"zero_shot": method_result(scores[0], t, tokens, shared + timings[UNSTEERED.name], None, keep_scores)}
    for i, (name, c) in enumerate(pick_c.items(), 1):
        methods[name] = method_result(scores[i], t, tokens, shared + timings[name], c.setting, keep_scores)
    chance, majority_class = label_baselines(t.gold, t.options)
    majority: float | None = majority_class
    layers = sorted({c.setting.layer for c in flat if c.setting.layer is not None})
    if target.task.kind != "classification":
        majority = None  # the options are other items' outputs, drawn per item: there is no majority class
    return TargetResult(target.task.name, len(t.queries), t.gold, chance, majority, methods,
                        n_dev=0 if target.dev is None else len(target.dev.queries), n_options=max(map(len, t.options)),
                        layers=layers, chosen=chosen, sweep=sweep, kind=target.task.kind,
                        extra={} if target.test_items is None else {"test_items": target.test_items})


def prompted(model: TransformerBridge, prefix: Sequence[int], items: Items, batch_size: int = 16,
             keep_scores: bool = False, demos_used: int | None = None) -> MethodResult:
    """A method that changes the prompt instead of steering (in-task or cross-task ICL): ``prefix`` before every
    query, scored on ``items``; prefix tokens plus mean query tokens per query, and the wall time."""
    t0 = time.perf_counter()
    bs = batch_size if len(prefix) < 2000 else min(batch_size, 8)  # a long prefix: 8 per batch measured fastest
    scores = prefix_option_logprobs(model, prefix, items.queries, items.options, batch_size=bs)[0]
    return method_result(scores, items, len(prefix) + items.query_tokens, time.perf_counter() - t0, None,
                         keep_scores, demos_used)


def in_task_icl(model: TransformerBridge, target: Prepared, batch_size: int = 16) -> dict[str, MethodResult]:
    """In-task ICL: ``shots`` seeded demonstrations from the pool (none for a target without one)."""
    if not target.pool:
        return {}
    demos = sample_demos(target.pool, target.shots, random.Random(f"{target.seed}:target-demos:{target.task.name}"),
                         task=target.task.name)
    prefix = prefix_ids(model, [target.fmt.instruction, *(target.block(d) for d in demos)], target.fmt)
    return {"icl_in_task": prompted(model, prefix, target.test, batch_size)}


CONTENT_FREE = ("N/A", "", "[MASK]")


def calibrated_zero_shot(model: TransformerBridge, target: Prepared, batch_size: int = 16
                         ) -> dict[str, MethodResult]:
    """Contextual calibration (Zhao et al. 2021, "Calibrate Before Use"): the label prior the model gives to
    content-free inputs, divided out of every zero-shot prediction, with no vector::

        p_cf = mean over x in {"N/A", "", "[MASK]"} of softmax_y score(y | x)
        y_hat(x) = argmax_y  log softmax_y score(y | x) - log p_cf(y)

    It fixes a label bias (a model that answers one label to everything) without steering, so a steering gain
    must beat it too. Classification targets only (a generation target's options differ per item). Under
    option-text scoring the options differ per item too, so the prior is each item's own: its option texts
    scored after the content-free inputs."""
    if target.task.kind != "classification" or not target.task.labels:
        return {}
    t = target.test
    t0 = time.perf_counter()
    per_item = target.fmt.choice_labels != ()
    keep = t.examples if per_item else t.examples[:1]
    cf = encode(model, target.task, target.fmt, [Example(x, e.output, e.choices) for e in keep for x in CONTENT_FREE],
                seed=target.seed)
    prior = prefix_option_logprobs(model, target.zero_prefix, cf.queries, cf.options, batch_size=batch_size)[0]
    prior = torch.log_softmax(prior.clamp_min(-1e30), -1).exp().reshape(len(keep), len(CONTENT_FREE), -1)
    log_prior = prior.mean(1).log().nan_to_num(0.0, neginf=0.0)  # [item or 1, option]; 0 where no option
    scores = prefix_option_logprobs(model, target.zero_prefix, t.queries, t.options, batch_size=batch_size)[0]
    return {"calibrated_zero_shot": method_result(torch.log_softmax(scores, -1) - log_prior, t,
                                                  len(target.zero_prefix) + t.query_tokens, time.perf_counter() - t0,
                                                  normalized=False)}


def input_digests(model: TransformerBridge, tasks: Sequence[Task]) -> dict[str, str]:
    """sha256 of each task's content (its items, labels and instruction) and of the model's weights: recorded in
    a run's config, so a part is never reused after the data or the weights it came from changed."""
    import hashlib
    import json

    out = {}
    for t in tasks:
        blob = json.dumps([t.instruction, t.labels, [[e.input, e.output] for e in t.train],
                           [[e.input, e.output] for e in t.test]], ensure_ascii=False).encode()
        out[f"task:{t.name}"] = hashlib.sha256(blob).hexdigest()
    from accelerate.utils import align_module_device

    h = hashlib.sha256()
    for name, _ in sorted(model.named_parameters(), key=lambda x: x[0]):
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        with align_module_device(module):  # an offloaded module's weights are loaded for the read (meta otherwise)
            p = getattr(module, attr)
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    out["model_weights"] = h.hexdigest()
    return out


def open_run(model: TransformerBridge, cfg: ProtocolConfig, out: str | Path, data_dir: str | None = None,
             png: bool | None = None, log: Callable[[str], None] = print, layers: Sequence[int] | None = None
             ) -> tuple[Run, dict[str, Task], dict[str, Task]]:
    """What every runner does first: check the loaded model against the config and the steering ``layers``
    against the model, load the sources and targets (by name; a task given by its file is keyed by its name),
    and open the run folder with the inputs' checksums. Returns the run, the sources and the targets."""
    from castlens.models import model_name

    if model_name(model) != getattr(cfg, "model", None):
        raise ValueError(f"the config names model {getattr(cfg, 'model', None)!r} but the loaded model is "
                         f"{model_name(model)!r}")
    check_layers(layers, model.cfg.n_layers)
    mode = cfg.mc_scoring
    sources = {t.name: t for t in (with_mc_scoring(load_task(s, data_dir), mode) for s in getattr(cfg, "sources", ()))}
    targets = {t.name: t for t in (with_mc_scoring(load_task(s, data_dir), mode) for s in getattr(cfg, "targets", ()))}
    run = Run(out, cfg, png=png, log=log, inputs=input_digests(model, [*sources.values(), *targets.values()]))
    return run, sources, targets
