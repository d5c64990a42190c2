"""Source samples: which ones, and how many, make a good CAST vector (CAST, arXiv 2507.13236, Sec. 3.2).

CAST averages the contrastive activations ``few_i - zero_i`` (Eq. 2) of a *selected* subset of the source data,
chosen by a similarity-graph search to be influential and diverse (:mod:`castlens.selection`), and reports that,
unlike in-context learning, steering keeps improving as more source samples are used. Two experiments test this
with one pipeline, per target task:

* **ablation**: CAST vectors from ``ablation_n`` samples chosen by each of ``methods`` (``random``,
  ``relevance``, ``diversity``, ``cast``) from the same candidate pool, at equal sample counts;
* **scaling**: accuracy against the number of source samples ``ns`` for the CAST vector of each of
  ``scale_methods``, and for cross-task ICL whose demonstrations are the same ``cast``-selected samples, as many
  as fit in the model's context window (the most influential first; the rest are dropped and the number used is
  recorded).

The pool holds ``pool`` candidates per source task (never one of that task's demonstrations); candidates and the
target's dev queries are embedded as the model's mean-pooled residual stream at the middle layer (``embedder=
"minilm"``: all-MiniLM-L6-v2 sentence embeddings instead). Every method
ranks the pool once, and ``n`` samples are the first ``n`` of its ranking: for the greedy searches that is exactly
what selecting ``n`` gives (tested), for ``random`` a random subset. Each candidate's difference is computed once
and shared by every method, every ``n`` and every target; a variant's vector is the mean of its samples'
differences (Eq. 3), added at the last prompt token with the layer and strength that are best on the target's
dev split (the transfer protocol of :mod:`castlens.transfer`; a target without a train split borrows them).

Test items: the ablation and the CAST curves use the whole test split (``limit``). Cross-task ICL with thousands
of demonstration tokens costs about a second per query on 2 CPU cores, so the scaling comparison runs on a seeded
subset of ``icl_limit`` test items, and every method of the scaling table (zero-shot, CAST, ICL) is reported on
that same subset, with paired bootstrap intervals.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from castlens.models import context_length, model_name
from castlens.prompts import default_format
from castlens.reuse import Setting, UNSTEERED, prefix_option_logprobs
from castlens.selection import SELECTION_METHODS, select_indices
from castlens.tasks import Task, TaskError, load_task
from castlens.transfer import (_best, _correct, _embedded_pool, _enc, _fmt_delta, _prefix, _split_dev,
                               EMBEDDERS, borrowed_settings, default_layers, embed_texts, encode_items, label_baselines,
                               method_record, open_run, paired_delta, results_csv, resumable_parts, sample_diffs,
                               summarize)
from castlens.vectors import _atomic_write


@dataclass(frozen=True)
class StudyConfig:
    """Everything that determines the numbers of a selection/scaling study (``config.json``)."""

    model: str
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    methods: tuple[str, ...] = SELECTION_METHODS       # ablation: every method at ablation_n samples
    ablation_n: int = 32
    ns: tuple[int, ...] = (4, 8, 16, 32, 64, 128)      # scaling: sample counts
    scale_methods: tuple[str, ...] = ("cast", "random")
    shots: int = 4                                     # demonstrations per source few-shot prompt
    dev: int = 64
    limit: int | None = None                           # test items for the ablation and CAST (None: all)
    icl_limit: int | None = 200                        # test items of the scaling comparison with ICL
    layers: tuple[int, ...] | None = None
    strengths: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    pool: int = 200                                    # candidates per source task
    embedder: str = "model"                            # castlens.transfer.EMBEDDERS
    n_candidates: int = 4
    seed: int = 0
    n_boot: int = 1000
    keep_scores: bool = False                          # store every option log-probability per test item

    def __post_init__(self):
        bad = [m for m in (*self.methods, *self.scale_methods) if m not in SELECTION_METHODS]
        if bad:
            raise ValueError(f"unknown selection methods {bad}; available: {', '.join(SELECTION_METHODS)}")
        if self.embedder not in EMBEDDERS:
            raise ValueError(f"unknown embedder {self.embedder!r}; available: {', '.join(EMBEDDERS)}")
        if (self.ns and min(self.ns) < 1) or self.ablation_n < 1:
            raise ValueError(f"sample counts must be >= 1, got ns={self.ns}, ablation_n={self.ablation_n}")

    def to_dict(self) -> dict:
        return asdict(self)

    def variants(self) -> list[tuple[str, int]]:
        """(selection method, n) of every CAST vector: the ablation's, then the scaling curves' (no repeats)."""
        out = [(m, self.ablation_n) for m in self.methods]
        out += [(m, n) for m in self.scale_methods for n in sorted(self.ns) if (m, n) not in out]
        return out


def name(method: str, n: int) -> str:
    """A variant's method name in the tables: ``cast@32`` (CAST vector, 32 cast-selected samples)."""
    return f"{method}@{n}"


def fit_demos(model, blocks: Sequence[list[int]], tail: Sequence[int], room: int) -> int:
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


def run_target(model, cfg: StudyConfig, target: Task, sources: dict[str, Task], pool, pool_emb: np.ndarray,
               diffs: dict[int, torch.Tensor], others: Sequence[dict] = (), batch_size: int = 16, log=print) -> dict:
    """Every variant, zero-shot and the ICL curve on one target; returns its JSON-ready part. ``pool`` holds
    (source name, example of ``sources[name].train``); ``diffs`` caches per-candidate differences across targets
    (filled here)."""
    fmt = default_format(target)
    dev, _ = _split_dev(target, cfg.dev, cfg.shots, cfg.seed)
    test = target.split("test")[: cfg.limit]
    layers = list(cfg.layers or default_layers(model.cfg.n_layers))
    seconds: dict = {}
    t0 = time.perf_counter()
    queries = dev or target.split("test")[:64]   # unlabelled inputs when there is no train split
    t_emb = embed_texts(model, [fmt.render(e, False) for e in queries], batch_size, cfg.embedder)
    need: dict[str, int] = {}
    for m, n in cfg.variants():
        need[m] = max(need.get(m, 0), n)
    if cfg.ns:
        need["cast"] = max(need.get("cast", 0), max(cfg.ns))  # the ICL demonstrations
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
    vectors = {name(m, n): torch.stack([diffs[i] for i in ranking[m][:n]]).mean(0) for m, n in cfg.variants()}

    def encode(items):
        return encode_items(model, target, fmt, items, cfg.n_candidates, cfg.seed)

    zero_prefix = _prefix(model, [fmt.instruction], fmt)
    grid = [(v, layer, s) for v in vectors for layer in layers for s in cfg.strengths]
    settings = [Setting(f"{v}/{layer}x{s:g}", vectors[v], layer, s) for v, layer, s in grid]
    sweep: list[dict] = []
    if dev:
        t0 = time.perf_counter()
        q, o, g = encode(dev)
        scores = prefix_option_logprobs(model, zero_prefix, q, o, [UNSTEERED, *settings], batch_size=batch_size)
        gold_lp = torch.log_softmax(scores.clamp_min(-1e30), -1)[:, torch.arange(len(g)), torch.tensor(g)].mean(-1)
        for i, (v, layer, strength) in enumerate([("unsteered", None, None), *grid]):
            sweep.append({"construction": v, "layer": layer, "strength": strength,
                          "dev_accuracy": float(np.mean(_correct(scores[i], g)[1])),
                          "dev_gold_logprob": float(gold_lp[i])})
        chosen = {v: _best(sweep, v) for v in vectors}
        seconds["dev_sweep"] = time.perf_counter() - t0
        log(f"  dev sweep: {len(dev)} items x {len(settings)} settings in {seconds['dev_sweep']:.0f}s")
    else:
        chosen = borrowed_settings(target.name, others, list(vectors))
        log(f"  no train split: settings borrowed from {', '.join(next(iter(chosen.values()))['borrowed_from'])}")

    t0 = time.perf_counter()
    q, o, gold = encode(test)
    qlen = float(np.mean([len(x) for x in q]))
    test_settings = [UNSTEERED] + [Setting(v, vectors[v], chosen[v]["layer"], chosen[v]["strength"])
                                   for v in vectors]
    scores = prefix_option_logprobs(model, zero_prefix, q, o, test_settings, batch_size=batch_size)
    methods = {"zero_shot": method_record(scores[0], gold, len(zero_prefix) + qlen, 0.0)}
    for i, v in enumerate(vectors, 1):
        methods[v] = method_record(scores[i], gold, len(zero_prefix) + qlen, 0.0,
                                   {k: chosen[v][k] for k in ("layer", "strength")})
    if cfg.keep_scores:
        for i, m in enumerate(methods):
            methods[m]["scores"] = scores[i].tolist()
    seconds["test"] = time.perf_counter() - t0

    # cross-task ICL with the cast-selected samples as demonstrations, on a subset of the test items
    items = _subset(len(test), cfg.icl_limit, target.name, cfg.seed)
    qs, os_ = [q[i] for i in items], [o[i] for i in items]
    room = max(len(a) + max(map(len, b)) for a, b in zip(qs, os_))
    rendered = [default_format(sources[pool[i][0]]).render(pool[i][1], True)
                for i in ranking.get("cast", [])[:max(cfg.ns, default=0)]]
    blocks = [_enc(model, b + fmt.separator) for b in rendered]
    icl, done = {}, {}
    for n in sorted(cfg.ns):  # no ns: no scaling, no ICL
        k = fit_demos(model, blocks[:n], zero_prefix, room)  # zero_prefix: the instruction after the demos
        while True:  # the block-wise count can be off by a merged token at a boundary: never overflow
            prefix = _prefix(model, [*rendered[:k], fmt.instruction], fmt)
            if len(prefix) + room <= context_length(model) or k == 0:
                break
            k -= 1
        if k not in done:
            t0 = time.perf_counter()
            bs = batch_size if len(prefix) < 2000 else min(batch_size, 8)  # long prefix: 8 measured fastest
            s = prefix_option_logprobs(model, prefix, qs, os_, batch_size=bs)[0]
            done[k] = method_record(s, [gold[i] for i in items], len(prefix) + float(np.mean([len(x) for x in qs])),
                                    time.perf_counter() - t0)
            if cfg.keep_scores:
                done[k]["scores"] = s.tolist()
            log(f"  cross-task ICL with {k} demonstrations ({len(prefix)} tokens): "
                f"{100 * np.mean(done[k]['correct']):.1f}% in {done[k]['seconds']:.0f}s")
        icl[name("icl", n)] = {**done[k], "demos_used": k}
    index = {s: {id(e): i for i, e in enumerate(t.train)} for s, t in sources.items()}
    return {"target": target.name, "n_test": len(test), "n_dev": len(dev), "gold": gold,
            "n_options": max(map(len, o)), **label_baselines(gold, o), "layers": layers, "chosen": chosen,
            "sweep": sweep, "methods": methods, "icl_items": items, "icl": icl, "seconds": seconds,
            "rankings": {m: [[pool[i][0], index[pool[i][0]][id(pool[i][1])]] for i in r] for m, r in ranking.items()}}


def icl_view(part: dict, cfg: StudyConfig) -> dict:
    """The part restricted to its ICL subset: zero-shot, every scaling variant and ICL on the same items."""
    items = part["icl_items"]
    keep = ["zero_shot"] + [name(m, n) for m in cfg.scale_methods for n in sorted(cfg.ns)]
    methods = {m: {**part["methods"][m], "pred": [part["methods"][m]["pred"][i] for i in items],
                   "correct": [part["methods"][m]["correct"][i] for i in items]} for m in keep}
    return {**part, "n_test": len(items), "gold": [part["gold"][i] for i in items], "methods": {**methods,
                                                                                               **part["icl"]}}


def run_study(model, cfg: StudyConfig, out: str | Path, batch_size: int = 16, png: bool | None = None,
              log=print) -> tuple[list[dict], list[dict]]:
    """The study into ``out``: ``config.json``, ``candidates.safetensors``, ``parts/<target>.part.json`` (one per
    finished target, never rewritten; a rerun resumes), then ``ablation.csv``, ``scaling.csv``, ``results.md``
    and the figures. Returns the ablation rows and the scaling rows."""
    out = Path(out)
    if model_name(model) != cfg.model:
        raise ValueError(f"the config names model {cfg.model!r} but the loaded model is {model_name(model)!r}")
    sources = [load_task(s) for s in cfg.sources]
    targets = [load_task(t) for t in cfg.targets]
    if set(cfg.sources) & set(cfg.targets):
        raise TaskError(f"tasks {sorted(set(cfg.sources) & set(cfg.targets))} are both source and target")
    for stale in [*out.glob(".*.tmp"), *out.glob("parts/.*.tmp")]:  # left by a killed run; never a result
        stale.unlink()
    open_run(out, cfg)
    diffs: dict[int, torch.Tensor] = {}
    by_name = {s.name: s for s in sources}
    embedded: list = []  # the candidate pool and its embeddings, made when a target first needs them

    def compute(t: Task, done: list[dict]) -> dict:
        if not embedded:
            embedded.extend(_embedded_pool(model, cfg, sources, out, batch_size, log))
        return run_target(model, cfg, t, by_name, *embedded, diffs, done, batch_size, log)

    parts = resumable_parts(out, targets, cfg.limit, compute, log)
    ordered = [parts[t] for t in cfg.targets]
    ablation = summarize(ordered, cfg.n_boot, cfg.seed, ["zero_shot", *(name(m, cfg.ablation_n) for m in cfg.methods)],
                         refs=(("zero_shot", "zero"), (name("random", cfg.ablation_n), "random")))
    views = [icl_view(p, cfg) for p in ordered]
    scale_names = ["zero_shot"] + [name(m, n) for m in (*cfg.scale_methods, "icl") for n in sorted(cfg.ns)]
    scaling = summarize(views, cfg.n_boot, cfg.seed, scale_names, refs=(("zero_shot", "zero"),))
    for r in scaling:
        r["n_samples"] = int(r["method"].split("@")[1]) if "@" in r["method"] else None
        if r["method"].startswith("icl@"):
            r["demos_used"] = float(np.mean([v["icl"][r["method"]]["demos_used"] for v in views
                                             if r["target"].startswith("mean") or v["target"] == r["target"]]))
    deltas = paired_table(views, cfg)
    write_outputs(out, cfg, ablation, scaling, deltas, png, log)
    return ablation, scaling


def paired_table(views: Sequence[dict], cfg: StudyConfig) -> list[dict]:
    """Per target and on average, per n: CAST (cast selection) minus CAST (random selection) and minus cross-task
    ICL with the same samples, paired on the scaling items. Empty without both selections in ``scale_methods``."""
    if not {"cast", "random"} <= set(cfg.scale_methods):
        return []
    rows = []
    for t, ps in [*((v["target"], [v]) for v in views), ("mean", list(views))]:
        for n in sorted(cfg.ns):
            rows.append({"target": t, "n": n, **{k: paired_delta(ps, name("cast", n), name(ref, n), cfg.n_boot, cfg.seed)
                                                 for k, ref in (("vs_random", "random"), ("vs_icl", "icl"))}})
    return rows


ABLATION_COLUMNS = ["target", "method", "accuracy", "ci_lo", "ci_hi", "macro_f1", "delta_zero", "delta_zero_lo",
                    "delta_zero_hi", "delta_zero_noise", "delta_random", "delta_random_lo", "delta_random_hi",
                    "delta_random_noise", "layer", "strength", "n_test", "chance", "majority"]
SCALING_COLUMNS = ["target", "method", "n_samples", "demos_used", "accuracy", "ci_lo", "ci_hi", "delta_zero",
                   "delta_zero_lo", "delta_zero_hi", "delta_zero_noise", "prompt_tokens", "layer", "strength",
                   "n_test"]


def results_md(cfg: StudyConfig, ablation: Sequence[dict], scaling: Sequence[dict], deltas: Sequence[dict]
               ) -> str:
    emb = {"model": "the model's own residual stream at its middle layer (mean over tokens after the first)",
           "minilm": "all-MiniLM-L6-v2 sentence embeddings"}[cfg.embedder]
    lines = [f"# Source-sample selection{' and scaling' if cfg.ns else ''}: {', '.join(cfg.sources)} -> "
             f"{', '.join(cfg.targets)}", "",
             f"Model {cfg.model}. CAST mean-difference vectors (CAST Eq. 2-3) from source samples chosen out of "
             f"{cfg.pool} candidates per source task, embedded for the graph search with {emb}, centred on the "
             f"pool's mean; each vector's layer and strength chosen on {cfg.dev} dev items "
             f"per target (from its train split; MedMCQA borrows). Accuracy in % with 95% bootstrap intervals over "
             f"test items ({cfg.n_boot} draws); deltas are paired, in points; `~` marks an interval containing 0.", "",
             f"## Ablation: {cfg.ablation_n} samples per vector, whole test splits", "",
             "| target | method | accuracy | vs zero-shot | vs random selection | layer x strength |",
             "|---|---|---|---|---|---|"]
    for r in ablation:
        setting = f"{r['layer']} x {r['strength']:g}" if r.get("layer") is not None else ""
        lines.append(f"| {r['target']} | {r['method']} | {100 * r['accuracy']:.1f} [{100 * r['ci_lo']:.1f}, "
                     f"{100 * r['ci_hi']:.1f}] | {_fmt_delta(r, 'zero')} | {_fmt_delta(r, 'random')} | {setting} |")
    if not cfg.ns:
        return "\n".join(lines) + "\n"
    lines += ["", f"## Scaling: accuracy against the number of source samples, on {cfg.icl_limit or 'all'} test "
              "items per target (the same items for every method)", "",
              "`icl@n`: cross-task ICL with the first n cast-selected samples as demonstrations, as many as fit in "
              "the context window (`demos used`).", "",
              "| target | method | demos used | accuracy | vs zero-shot | prompt tokens/query |", "|---|---|---|---|---|---|"]
    for r in scaling:
        used = f"{r['demos_used']:.0f}" if r.get("demos_used") is not None else ""
        lines.append(f"| {r['target']} | {r['method']} | {used} | {100 * r['accuracy']:.1f} [{100 * r['ci_lo']:.1f}, "
                     f"{100 * r['ci_hi']:.1f}] | {_fmt_delta(r, 'zero')} | {r['prompt_tokens']:.0f} |")
    if deltas:
        lines += ["", "Paired differences on the same items, in points: the CAST vector from cast-selected samples minus "
                  "the one from random samples, and minus cross-task ICL with the cast-selected samples.", "",
                  "| target | n | cast - random selection | cast - cross-task ICL |", "|---|---|---|---|"]
        for r in deltas:
            lines.append(f"| {r['target']} | {r['n']} | " + " | ".join(
                f"{100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]{' ~' if lo <= 0 <= hi else ''}"
                for d, lo, hi in (r["vs_random"], r["vs_icl"])) + " |")
    return "\n".join(lines) + "\n"


def figures(cfg: StudyConfig, ablation: Sequence[dict], scaling: Sequence[dict]) -> dict:
    """The study's plotly figures by file stem: ``ablation`` (accuracy per target and selection method) and
    ``scaling_<target>`` / ``scaling_mean`` (accuracy against the number of source samples)."""
    from castlens import plots

    who = f"{cfg.model}; sources {', '.join(cfg.sources)}"
    groups = [*cfg.targets, "mean"]
    ab_methods = ["zero_shot", *(name(m, cfg.ablation_n) for m in cfg.methods)]

    def cell(rows, t, m, k):
        return next((r[k] for r in rows if r["method"] == m and (r["target"] == t or
                                                                   (t == "mean" and r["target"].startswith("mean")))),
                    math.nan)

    chance = [cell(ablation, t, "zero_shot", "chance") for t in cfg.targets]
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
        curves = {f"CAST vector, {m} selection": [tuple(cell(scaling, t, name(m, n), k) for k in ("accuracy", "ci_lo",
                                                                                              "ci_hi")) for n in ns]
                  for m in cfg.scale_methods}
        curves[icl] = [tuple(cell(scaling, t, name("icl", n), k) for k in ("accuracy", "ci_lo", "ci_hi")) for n in ns]
        out[f"scaling_{t}"] = plots.scaling_curves(
            ns, curves, baselines={"zero-shot": cell(scaling, t, "zero_shot", "accuracy")},
            labels={icl: [f"{cell(scaling, t, name('icl', n), 'demos_used'):.0f}" for n in ns]},
            title=f"{'Mean over targets' if t == 'mean' else t}: accuracy against source samples",
            caption=f"{who}; {cfg.icl_limit or 'all'} test items per target, the same for every method. Bands: 95% "
                    "bootstrap intervals. Numbers on the ICL curve: demonstrations that fit in the context window.")
    return out


def write_outputs(out: Path, cfg: StudyConfig, ablation, scaling, deltas, png=None, log=print) -> None:
    from castlens import plots

    _atomic_write(out / "ablation.csv", results_csv(ablation, ABLATION_COLUMNS).encode())
    _atomic_write(out / "scaling.csv", results_csv(scaling, SCALING_COLUMNS).encode())
    _atomic_write(out / "results.md", results_md(cfg, ablation, scaling, deltas).encode())
    if png is None:
        png = plots.png_export_available()
        if not png:
            log(f"note: writing HTML figures only; for PNGs: {plots.PNG_EXPORT_FIX}")
    for stem, fig in figures(cfg, ablation, scaling).items():
        plots.save_figure(fig, out / stem, png=png)
