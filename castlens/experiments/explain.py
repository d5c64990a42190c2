"""Explain: which components write the shared few-shot direction, does it cause anything, and what transfers.

The run (:func:`run_explain`), at one layer ``L`` (default ``round(0.45 * n_layers)``, the middle layers where
CAST steers and where :mod:`castlens.analysis` finds the direction most parallel):

1. **Per task** (one part each, resumable): ``n`` zero-shot prompts and their few-shot, length-matched filler and
   shuffled-label variants (:func:`castlens.analysis.variant_prompts`); every component's last-token write into
   ``h_L`` for each (:func:`castlens.mechanism.component_contributions`), kept as differences to zero-shot; each
   head's mean ``z`` on each variant; then each head's mean ``z`` of each variant patched into ``n`` other
   zero-shot queries of the task (drawn with another seed) at the last token
   (:func:`castlens.mechanism.patch_effects`): few-shot means for the signal, shuffled-label means as the
   function-vector paper does, filler means to see which causal effect "the prompt is longer" has.
2. **Shared direction** ``u``: the uncentred first component of all tasks' per-sample few-shot differences at
   ``L``; each task's remainder direction is its mean difference minus its ``u`` component. Attribution table:
   every component's mean write along ``u`` and along the task's remainder, over all samples of all tasks, with
   bootstrap intervals, for the signal and both controls. Patching table: each head's shift along ``u`` and
   change of the gold log-probability, as the mean over tasks with a bootstrap interval over tasks.
3. **Per target** (one part each): the sources' mean ``z`` patched into the target's zero-shot queries; then the
   target steered at ``L`` with the CAST vector ``v`` (mean few-minus-zero difference over the sources' samples),
   its shared part ``(v . u) u``, its remainder, its part along the shared direction of the *other* tasks
   (``u`` recomputed without the target), a function vector (the top-``k`` heads by their patched shift along
   ``u`` on the sources, their mean writes summed; ``k`` chosen on dev), and ``n_random`` norm-matched random
   vectors, each through the same dev sweep over strengths (:func:`~castlens.experiments.protocol.tune_and_test`)
   and tested once, with paired intervals against zero-shot, the whole vector and the random control.
4. **Logit lens** of ``u``, each task's mean difference, the function vector and the top heads' mean writes.

Steering happens at ``L`` only, where the split is defined; the CAST transfer runs (``castlens transfer``) tune
the layer as well, so their numbers are not the same as the whole-vector row here.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from castlens import geometry as geo
from castlens.analysis import VARIANTS, variant_prompts
from castlens.experiments.protocol import (Candidate, ProtocolConfig, check_config, encode, input_digests, prepare,
                                           tune_and_test)
from castlens.experiments.results import Row, Setting, TargetResult, fmt_interval, summarize, to_csv
from castlens.experiments.run import Run
from castlens.files import atomic_write
from castlens.mechanism import (Contributions, PatchEffects, component_contributions, function_vector, head_label,
                                head_writes, logit_lens, parse_head, patch_effects, split_shared, top_heads)
from castlens.models import model_name
from castlens.prompts import contrastive_pairs, default_format
from castlens.tasks import Task, TaskError, load_task
from castlens.vectors import prefix_ids, random_like

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["ExplainConfig", "TaskMechanism", "run_explain", "patch_queries", "patch_intervals", "default_layer",
           "SPLITS", "COLUMNS"]

SPLITS = ("cast_mean_diff", "cast_shared", "cast_remainder", "shared_of_others", "function_vector")
REFS = {"zero": "zero_shot", "whole": "cast_mean_diff", "random": "random_vector"}
COLUMNS = ["target", "method", "accuracy", "ci_lo", "ci_hi", "delta_zero", "delta_zero_lo", "delta_zero_hi",
           "delta_whole", "delta_whole_lo", "delta_whole_hi", "delta_random", "delta_random_lo", "delta_random_hi",
           "layer", "strength", "n_test", "chance", "majority"]


def default_layer(n_layers: int) -> int:
    return round(0.45 * n_layers)


@dataclass(frozen=True)
class ExplainConfig(ProtocolConfig):
    """Everything that determines the run's numbers (``config.json``; a resume must match it)."""

    model: str = ""
    tasks: tuple[str, ...] = ()       # attribution, own-task patching, the shared direction (with sources, targets)
    sources: tuple[str, ...] = ()     # their samples build the CAST vector; their patch effects rank heads
    targets: tuple[str, ...] = ()     # held out: patched with the sources' means, steered with the split vector
    n: int = 8                        # queries per task (attribution and patching each)
    layer: int | None = None          # None: default_layer(n_layers)
    strengths: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    fv_heads: tuple[int, ...] = (1, 3, 5, 10)
    n_random: int = 5
    n_boot: int = 1000

    def __post_init__(self) -> None:
        check_config(self)
        if self.n < 2:
            raise ValueError(f"--n must be at least 2 (got {self.n}): the shared direction needs 2 samples")
        if self.shots < 1:
            raise ValueError(f"--shots must be at least 1 (got {self.shots}): with no demonstrations there is no "
                             "difference to explain")
        if not self.sources or not self.targets:
            raise ValueError("explain needs --sources (to build the vector) and --targets (to steer)")
        if set(self.sources) & set(self.targets):
            raise ValueError(f"tasks both source and target: {sorted(set(self.sources) & set(self.targets))}")
        if self.n_random < 2:
            raise ValueError(f"--n-random must be at least 2 (got {self.n_random}): the random control is a "
                             "distribution of draws")
        if not self.fv_heads or min(self.fv_heads) < 1:
            raise ValueError(f"--fv-heads must be positive head counts, got {self.fv_heads}")

    @property
    def all_tasks(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.sources, *self.targets, *self.tasks)))


@dataclass(frozen=True)
class TaskMechanism:
    """One task's part: per-sample component differences at ``L`` (``diffs[variant]`` [n, component, d]), the
    heads' mean ``z`` on each variant's prompts (few-shot, filler, shuffled labels), their mean few-shot writes,
    and the patch effects of each head's mean (``patched[variant]``)."""

    task: str
    labels: tuple[str, ...]
    layer: int
    n_heads: int
    diffs: dict[str, Tensor]
    z_mean: dict[str, Tensor]          # variant (VARIANTS) -> [layer, head, d_head]
    writes: Tensor                     # [layer, head, d_model]
    patched: dict[str, PatchEffects]   # variant -> effects on this task's zero-shot queries

    def save(self, path: Path) -> None:
        from safetensors.torch import save

        t = {f"diff.{v}": d for v, d in self.diffs.items()} | {f"z.{v}": z for v, z in self.z_mean.items()}
        t["writes"] = self.writes
        for v, e in self.patched.items():
            t[f"patch.{v}.resid_shift"] = e.resid_shift if e.resid_shift is not None else torch.zeros(0)
            t[f"patch.{v}.gold_logprob"] = e.gold_logprob if e.gold_logprob is not None else torch.zeros(0)
            t[f"patch.{v}.accuracy"] = e.accuracy if e.accuracy is not None else torch.zeros(0)
        meta = {"task": self.task, "labels": json.dumps(self.labels), "layer": str(self.layer),
                "n_heads": str(self.n_heads),
                "base": json.dumps({v: [e.base_accuracy, e.n_queries] for v, e in self.patched.items()})}
        atomic_write(path, save({k: x.contiguous() for k, x in t.items()}, metadata=meta))

    @classmethod
    def load(cls, path: Path) -> TaskMechanism:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        base = json.loads(meta["base"])
        got = (lambda k: t[k] if t[k].numel() else None)
        patched = {v: PatchEffects(int(meta["layer"]), got(f"patch.{v}.resid_shift"), got(f"patch.{v}.gold_logprob"),
                                   got(f"patch.{v}.accuracy"), base[v][0], base[v][1]) for v in base}
        return cls(meta["task"], tuple(json.loads(meta["labels"])), int(meta["layer"]), int(meta["n_heads"]),
                   {k[5:]: x for k, x in t.items() if k.startswith("diff.")},
                   {k[2:]: x for k, x in t.items() if k.startswith("z.")}, t["writes"], patched)


def patch_queries(model: TransformerBridge, task: Task, n: int, seed: int, n_candidates: int,
                   avoid: Sequence[str] = ()):
    """``n`` queries for patching, encoded with their options: a seeded draw from the split the attribution
    queries come from, with any query whose input is in ``avoid`` (the attribution's queries, whose few-shot
    prompts made the patched means) replaced by a further draw."""
    fmt = default_format(task)
    pool = task.train or task.test
    rng = random.Random(f"{seed}:patch:{task.name}")
    picked = rng.sample(pool, min(n, len(pool)))
    banned = set(avoid)
    rest = [e for e in pool if e not in picked and e.input not in banned]
    rng.shuffle(rest)
    keep = [e for e in picked if e.input not in banned]
    keep += rest[:len(picked) - len(keep)]
    if not keep:
        raise TaskError(f"task {task.name!r}: no query left for patching after leaving out the attribution's")
    return prefix_ids(model, [fmt.instruction], fmt), encode(model, task, fmt, keep, n_candidates, seed)


def _mechanism(model: TransformerBridge, task: Task, cfg: ExplainConfig, layer: int, batch_size: int
               ) -> TaskMechanism:
    prompts, _ = variant_prompts(model, task, cfg.n, cfg.shots, cfg.seed)
    used = [p.query for p in contrastive_pairs(task, cfg.n, cfg.shots, seed=cfg.seed, fmt=default_format(task),
                                                split="train" if task.train else "test",
                                                demo_split="train" if task.train else "test")]
    zero = component_contributions(model, prompts["zero"], layer, batch_size)
    got: dict[str, Contributions] = {v: component_contributions(model, prompts[v], layer, batch_size)
                                     for v in VARIANTS}
    diffs = {v: got[v].values - zero.values for v in VARIANTS}
    z_mean = {v: got[v].z.mean(0) for v in VARIANTS}
    prefix, items = patch_queries(model, task, cfg.n, cfg.seed, cfg.n_candidates, used)
    patched = {v: patch_effects(model, items.queries, z, layer, items.options, items.gold, prefix, batch_size)
               for v, z in z_mean.items()}
    return TaskMechanism(task.name, zero.labels, layer, zero.n_heads, diffs, z_mean, head_writes(got["few"]), patched)


def _shared(parts: Sequence[TaskMechanism], variant: str = "few") -> Tensor:
    """The uncentred first component of the parts' per-sample total differences (unit, float32)."""
    totals = torch.cat([p.diffs[variant].sum(1) for p in parts])[:, None]  # [N, 1, d]
    return geo.uncentred_first_component(totals)["direction"][0].float()


def _shared_by_layer(parts: Sequence[TaskMechanism]) -> list[Tensor]:
    """The shared direction after each layer ``0..L``: the uncentred first component of the per-sample few-shot
    differences ``h_l(few) - h_l(zero)``, each the sum of the embedding and the components of layers ``<= l``."""
    labels = parts[0].labels
    depth = torch.tensor([-1 if c == "embed" else int(c[1:].split("H")[0].split(" ")[0]) for c in labels])
    out = []
    for li in range(parts[0].layer + 1):
        keep = depth <= li
        totals = torch.cat([p.diffs["few"][:, keep].sum(1) for p in parts])[:, None]
        out.append(geo.uncentred_first_component(totals)["direction"][0].float())
    return out


def _remainders(parts: Sequence[TaskMechanism], u: Tensor) -> dict[str, Tensor]:
    out = {}
    for p in parts:
        _, rest = split_shared(p.diffs["few"].sum(1).mean(0), u)
        out[p.task] = rest / rest.norm().clamp_min(1e-12)
    return out


@dataclass(frozen=True)
class AttributionRow:
    """One component's mean write along the shared direction and along the tasks' remainders (one variant)."""

    variant: str
    component: str
    shared: tuple[float, float, float]      # mean, lo, hi
    remainder: tuple[float, float, float]


def attribution_rows(parts: Sequence[TaskMechanism], u: Tensor, rest: dict[str, Tensor], n_boot: int, seed: int
                     ) -> list[AttributionRow]:
    """Per variant and component: the write along ``u`` and along each task's remainder, as a mean over every
    sample of every task (equal ``n`` per task, so also the mean of the task means) with a bootstrap interval."""
    rows = []
    for v in VARIANTS:
        along = torch.cat([p.diffs[v] @ u for p in parts]).T.double()            # [component, N]
        off = torch.cat([p.diffs[v] @ rest[p.task] for p in parts]).T.double()
        a, off_ci = geo.bootstrap_mean_ci(along, n_boot, seed=seed), geo.bootstrap_mean_ci(off, n_boot, seed=seed)
        for c, label in enumerate(parts[0].labels):
            rows.append(AttributionRow(v, label, (float(a[0][c]), float(a[1][c]), float(a[2][c])),
                                       (float(off_ci[0][c]), float(off_ci[1][c]), float(off_ci[2][c]))))
    return rows


def patch_intervals(parts: Sequence[TaskMechanism], u: Tensor, variant: str, n_boot: int, seed: int
                    ) -> dict[str, np.ndarray]:
    """Per head, the patch effect of ``variant``'s means as the mean over ``parts`` (tasks) with a percentile
    bootstrap interval over tasks: ``"shift"`` (along ``u``) and, where scored, ``"gold_logprob"``; each
    [layer, head, 3] (mean, lo, hi)."""
    per_task = {"shift": [p.patched[variant].shift(u) for p in parts],
                "gold_logprob": [x for p in parts if (x := p.patched[variant].gold_logprob) is not None]}
    return {k: torch.stack(geo.bootstrap_mean_ci(torch.stack(xs, -1).double(), n_boot, seed=seed), -1).numpy()
            for k, xs in per_task.items() if xs}


def _grid(rows: Sequence[AttributionRow], variant: str, which: str, layers: int, heads: int) -> np.ndarray:
    g = np.full((layers, heads), np.nan)
    for r in rows:
        lh = parse_head(r.component)
        if r.variant == variant and lh is not None:
            g[lh] = getattr(r, which)[0]
    return g


def _source_means(parts: Sequence[TaskMechanism], u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Over the sources: mean few-shot ``z`` [layer, head, d_head], mean head writes, and each head's mean patched
    shift along ``u`` (the ranking of the function vector)."""
    z = torch.stack([p.z_mean["few"] for p in parts]).mean(0)
    w = torch.stack([p.writes for p in parts]).mean(0)
    score = torch.stack([p.patched["few"].shift(u) for p in parts]).mean(0)
    return z, w, score


def _steer_candidates(cfg: ExplainConfig, n_layers: int, layer: int, vectors: dict[str, Tensor],
                      fvs: dict[int, Tensor], seed: int) -> dict[str, list[Candidate]]:
    def full(v: Tensor) -> Tensor:
        return v.float()[None].expand(n_layers, -1).clone()

    cands = {name: [Candidate(Setting(name, layer, s), full(v)) for s in cfg.strengths] for name, v in vectors.items()}
    cands["function_vector"] = [Candidate(Setting("function_vector", layer, s, f"top{k}"), full(fv))
                                for k, fv in fvs.items() for s in cfg.strengths]
    whole = full(vectors["cast_mean_diff"])
    for k in range(cfg.n_random):
        name = "random_vector" if k == 0 else f"random_vector_{k}"
        r = random_like(whole, seed + 1000 * (k + 1))
        cands[name] = [Candidate(Setting(name, layer, s), r) for s in cfg.strengths]
    return cands


def run_explain(model: TransformerBridge, cfg: ExplainConfig, out: str | Path, data_dir: str | None = None,
                batch_size: int = 8, png: bool | None = None, log: Callable[[str], None] = print) -> list[Row]:
    """The whole run into ``out`` (see the module docstring); a rerun with the same config resumes."""
    if model_name(model) != cfg.model:
        raise ValueError(f"the config names model {cfg.model!r} but the loaded model is {model_name(model)!r}")
    layer = default_layer(model.cfg.n_layers) if cfg.layer is None else cfg.layer
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"--layer {layer} out of range: the model has layers 0..{model.cfg.n_layers - 1}")
    tasks = {t.name: t for t in (load_task(s, data_dir) for s in cfg.all_tasks)}
    names = list(tasks)
    if len(names) < 3:
        raise ValueError(f"explain needs at least 3 tasks for a shared direction, got {names}")
    run = Run(out, cfg, png=png, log=log, inputs=input_digests(model, list(tasks.values())))
    tensors = run.out / "parts" / "tensors"
    if run.world.main:  # a task part whose tensors are gone (not committed, say) is computed again
        for name in names:
            if not (tensors / f"{name}.safetensors").exists():
                run.part_path(name).unlink(missing_ok=True)
    run.world.barrier()

    def compute(name: str, _: list) -> dict:
        _mechanism(model, tasks[name], cfg, layer, batch_size).save(tensors / f"{name}.safetensors")
        return {"task": name, "file": f"tensors/{name}.safetensors"}

    run.parts(names, compute, lambda d: d, lambda d: d)
    mech = {t: TaskMechanism.load(tensors / f"{t}.safetensors") for t in names}
    parts = [mech[t] for t in names]
    u = _shared(parts)
    rest = _remainders(parts, u)
    src = [mech[t] for t in cfg.sources if t in mech]
    z_src, w_src, score = _source_means(src, u)
    ranked = top_heads(score, score.numel())
    fvs = {k: function_vector(w_src, ranked[:k]) for k in cfg.fv_heads if k <= score.numel()}
    v_whole = torch.cat([p.diffs["few"].sum(1) for p in src]).mean(0)
    order = sorted(cfg.targets, key=lambda t: not tasks[t].train)

    def compute_target(name: str, done: list[TargetResult]) -> TargetResult:
        t = tasks[name]
        prefix, items = patch_queries(model, t, cfg.n, cfg.seed + 1, cfg.n_candidates)
        eff = patch_effects(model, items.queries, z_src, layer, items.options, items.gold, prefix, batch_size)
        run.write_json(f"patching/{name}.effects.json", eff.summary(u))
        u_others = _shared([p for p in parts if p.task != name])
        shared, remainder = split_shared(v_whole, u)
        vectors = {"cast_mean_diff": v_whole, "cast_shared": shared, "cast_remainder": remainder,
                   "shared_of_others": split_shared(v_whole, u_others)[0]}
        cands = _steer_candidates(cfg, model.cfg.n_layers, layer, vectors, fvs, cfg.seed)
        return tune_and_test(model, prepare(model, t, cfg), cands, donors=done, batch_size=batch_size, log=log)

    results = run.parts([f"target_{t}" for t in order], lambda u_, done: compute_target(u_[7:], done),
                        TargetResult.from_dict, TargetResult.to_dict,
                        after=[f"target_{t}" for t in order if not tasks[t].train])
    if not run.world.main:
        return []
    return _report(run, cfg, model, layer, parts, u, rest, src, score, ranked, fvs,
                   [results[f"target_{t}"] for t in order])


def _report(run: Run, cfg: ExplainConfig, model: TransformerBridge, layer: int, parts: Sequence[TaskMechanism],
            u: Tensor, rest: dict[str, Tensor], src: Sequence[TaskMechanism], score: Tensor,
            ranked: list[tuple[int, int]], fvs: dict[int, Tensor], targets: Sequence[TargetResult]) -> list[Row]:
    from castlens import plots

    n_l, n_h = layer + 1, parts[0].n_heads
    who = (f"{cfg.model}; {len(parts)} tasks x {cfg.n} queries, {cfg.shots} demonstrations; last token, "
           f"blocks.{layer}.hook_resid_post")
    rows = attribution_rows(parts, u, rest, cfg.n_boot, cfg.seed)
    run.write("attribution.csv", "variant,component,shared,shared_lo,shared_hi,remainder,remainder_lo,remainder_hi\n"
              + "".join(f"{r.variant},{r.component},{r.shared[0]:.4f},{r.shared[1]:.4f},{r.shared[2]:.4f},"
                        f"{r.remainder[0]:.4f},{r.remainder[1]:.4f},{r.remainder[2]:.4f}\n" for r in rows))
    names = {"few": "few-shot minus zero-shot", "filler": "filler minus zero-shot",
             "shuffled": "shuffled labels minus zero-shot"}
    run.figure("attribution_shared", plots.head_heatmaps(
        {names[v]: _grid(rows, v, "shared", n_l, n_h) for v in VARIANTS},
        title=f"Each head's write along the shared direction at layer {layer}",
        caption=f"{who}. Mean over all samples of the head's last-token write (few or control minus zero-shot) "
                "projected on the shared direction (uncentred first component of the few-shot differences).",
        colorbar_title="write along u"))
    run.figure("attribution_remainder", plots.head_heatmaps(
        {names[v]: _grid(rows, v, "remainder", n_l, n_h) for v in VARIANTS},
        title=f"Each head's write along the tasks' own (remainder) directions at layer {layer}",
        caption=f"{who}. As the shared figure, projected on each task's mean difference minus its shared part.",
        colorbar_title="write along remainder"))
    patch_rows = ["task,means,layer,head,shift_along_shared,gold_logprob,accuracy"]
    shifts, logprobs = {}, {}
    for v in VARIANTS:
        shifts[f"{v} means"] = torch.stack([p.patched[v].shift(u) for p in parts]).mean(0).numpy()
        lp = torch.stack([x for p in parts if (x := p.patched[v].gold_logprob) is not None]).mean(0)
        logprobs[f"{v} means"] = lp.numpy()
        for p in parts:
            e = p.patched[v]
            s = e.shift(u)
            for li in range(n_l):
                for h in range(n_h):
                    patch_rows.append(f"{p.task},{v},{li},{h},{s[li, h]:.4f},"
                                      f"{_cell(e.gold_logprob, li, h)},{_cell(e.accuracy, li, h)}")
    run.write("patching.csv", "\n".join(patch_rows) + "\n")
    how = (f"{who}. Means from the task's own few-shot, filler or shuffled-label prompts, patched into {cfg.n} "
           "other zero-shot queries per task at the last token; averaged over tasks.")
    run.figure("patching_shift", plots.head_heatmaps(
        shifts, title=f"Causal effect of patching one head's mean z: shift of h_{layer} along the shared direction",
        caption=how, colorbar_title="shift along u"))
    run.figure("patching_gold_logprob", plots.head_heatmaps(
        logprobs, title="Causal effect of patching one head's mean z: change of the gold answer's log-probability",
        caption=how + " Log-probability normalised over the options.", colorbar_title="gold log-prob"))
    heads = [ranked[i] for i in range(min(5, len(ranked)))]
    w_src = torch.stack([p.writes for p in src]).mean(0)
    lens = logit_lens(model, {"shared direction u": u, **{f"task {p.task}": p.diffs["few"].sum(1).mean(0)
                                                          for p in parts},
                              **{f"function vector top{k}": fv for k, fv in fvs.items()},
                              **{f"head {head_label(*lh)} (mean write)": w_src[lh] for lh in heads}}, k=8)
    by_layer = logit_lens(model, {f"layer {li}": d for li, d in enumerate(_shared_by_layer(parts))}, k=8)
    run.write("logit_lens.md", f"At layer {layer}:\n\n| direction | most promoted | most suppressed |\n|---|---|---|\n"
              + "".join(f"| {d.name} | {_tokens(d.promoted)} | {_tokens(d.suppressed)} |\n" for d in lens)
              + "\nThe shared direction of every layer up to it (the residual difference after layer l is the sum "
                "of the components of layers <= l, so it comes from the same parts):\n\n"
                "| layer | most promoted | most suppressed |\n|---|---|---|\n"
              + "".join(f"| {d.name[6:]} | {_tokens(d.promoted)} | {_tokens(d.suppressed)} |\n" for d in by_layer))
    randoms = ["random_vector", *[f"random_vector_{k}" for k in range(1, cfg.n_random)]]
    table = summarize(targets, ["zero_shot", *SPLITS, *randoms], REFS, cfg.n_boot, cfg.seed)
    run.write("split_steering.csv", to_csv(table, COLUMNS))
    cell = {(r.target, r.method): r for r in table}
    groups = [p.target for p in targets] + ["mean"]
    shown = ["zero_shot", *SPLITS, "random_vector"]
    run.figure("split_steering", plots.method_bars(
        groups, {m: [cell[(g, m)].accuracy for g in groups] for m in shown},
        {m: [(cell[(g, m)].ci_lo, cell[(g, m)].ci_hi) for g in groups] for m in shown},
        chance=[p.chance for p in targets] + [float(np.mean([p.chance for p in targets]))],
        title=f"Which part of the CAST vector transfers (steered at layer {layer})",
        caption=f"{who}. Each part's strength (the function vector's size too) chosen on dev, tested once; "
                f"random_vector: the first of {cfg.n_random} norm-matched draws. Bars: 95% bootstrap intervals."))
    run.write("summary.md", _summary(cfg, layer, rows, parts, u, ranked, table, targets, who))
    return table


def _cell(x: Tensor | None, li: int, h: int) -> str:
    return "" if x is None else f"{float(x[li, h]):.4f}"


def _tokens(tokens: Sequence[str]) -> str:
    return " ".join(f"`{t!r}`"[0:40] for t in tokens).replace("|", "\\|")


def _summary(cfg: ExplainConfig, layer: int, rows: Sequence[AttributionRow], parts: Sequence[TaskMechanism],
             u: Tensor, ranked: list[tuple[int, int]], table: Sequence[Row],
             targets: Sequence[TargetResult], who: str) -> str:
    def top(variant: str, k: int = 8) -> list[AttributionRow]:
        mine = [r for r in rows if r.variant == variant and r.component != "embed"]
        return sorted(mine, key=lambda r: -abs(r.shared[0]))[:k]

    total = {v: sum(r.shared[0] for r in rows if r.variant == v) for v in VARIANTS}
    rest = [i for i, c in enumerate(parts[0].labels) if c.endswith("attn rest")]
    worst = max(float(p.diffs[v][:, rest].abs().max() / p.diffs[v].sum(1).norm(dim=-1).max()) for p in parts
                for v in VARIANTS)
    lines = [f"# Explain: {cfg.model}, layer {layer}", "", who + ".", "",
             "Total write along the shared direction u (the sum over components equals the projection of the "
             "whole difference): " + ", ".join(f"{v} {total[v]:.2f}" for v in VARIANTS) + ". Sum identity: the "
             "largest attention rest (output bias or rounding; the models here have no output bias) is "
             f"{worst:.1e} of the largest difference norm.", "",
             "## Components writing the shared direction (largest |mean write along u|, few-shot signal)", "",
             "| component | few - zero along u | filler - zero | shuffled - zero | along the task remainders |",
             "|---|---|---|---|---|"]
    by = {(r.variant, r.component): r for r in rows}
    for r in top("few", 12):
        f_, s_ = by[("filler", r.component)], by[("shuffled", r.component)]
        lines.append(f"| {r.component} | {_iv(r.shared)} | {_iv(f_.shared)} | {_iv(s_.shared)} | {_iv(r.remainder)} |")
    src = [p for p in parts if p.task in cfg.sources]
    effect = {v: patch_intervals(src, u, v, cfg.n_boot, cfg.seed) for v in VARIANTS}
    lines += ["", f"## Heads by causal effect (each head's mean z patched at the last token; mean over the "
              f"{len(src)} sources with a bootstrap interval over tasks)", "",
              "| head | shift of h_L along u, few-shot means | filler means | shuffled-label means | "
              "gold log-prob change (few-shot means, own tasks) |", "|---|---|---|---|---|"]
    for lh in ranked[:10]:
        lp = effect["few"].get("gold_logprob")
        lines.append(f"| {head_label(*lh)} | " + " | ".join(_iv(effect[v]["shift"][lh]) for v in VARIANTS)
                     + f" | {'' if lp is None else _iv(lp[lh])} |")
    lines += ["", "## Which part transfers (steered at layer L, strengths tuned on dev, test once)", "",
              "| target | method | accuracy % | vs zero-shot | vs whole vector | vs random (draw 0) | setting |",
              "|---|---|---|---|---|---|---|"]
    for t in table:
        if t.method.startswith("random_vector_"):
            continue
        st = "" if t.setting is None else f"{t.setting.vector or ''} x{t.setting.strength}"
        lines.append(f"| {t.target} | {t.method} | {100 * t.accuracy:.1f} | {fmt_interval(t.deltas.get('zero'))} | "
                     f"{fmt_interval(t.deltas.get('whole'))} | {fmt_interval(t.deltas.get('random'))} | {st} |")
    names = ["random_vector", *[f"random_vector_{k}" for k in range(1, cfg.n_random)]]
    lines += ["", f"Random controls as a distribution ({len(names)} norm-matched draws, each tuned the same way): "
              "test accuracy %, and each split's rank among them (1 = above all).", "",
              "| target | random mean | min - max | " + " | ".join(f"{s} rank" for s in SPLITS) + " |",
              "|---|---|---|" + "---|" * len(SPLITS)]
    for p in targets:
        acc = np.array([p.methods[n].accuracy for n in names])
        ranks = [f"{1 + int((acc >= p.methods[s].accuracy).sum())} of {len(acc) + 1}" for s in SPLITS]
        lines.append(f"| {p.target} | {100 * acc.mean():.1f} | {100 * acc.min():.1f} - {100 * acc.max():.1f} | "
                     + " | ".join(ranks) + " |")
    return "\n".join(lines) + "\n"


def _iv(x: Sequence[float]) -> str:
    return f"{x[0]:+.3f} [{x[1]:+.3f}, {x[2]:+.3f}]"
