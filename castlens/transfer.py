"""Transfer: does a vector built from high-resource *source* tasks help a low-resource *target* task?

CAST (arXiv 2507.13236, Sec. 3) and the baselines it is compared with, on each target's test split:

==================  ==========================================================================================
``zero_shot``       target instruction + query
``icl_in_task``     target instruction + ``shots`` target demonstrations (from the target's train split) + query
``icl_cross_task``  ``shots`` source demonstrations (the selected source samples, each in its own task's format)
                    + target instruction + query  (cross-task ICL, Chatterjee et al. 2024)
``cast_mean_diff``  zero-shot prompt, ``h_L[last] += lambda * mean_i (few_i - zero_i)[L]``   (CAST Eq. 2-3)
``icv_pc1``         same, with the first principal direction of the per-sample differences (ICV-style), scaled
                    to the mean difference's norm
``task_vector``     zero-shot prompt, ``h_L[last] <- v[L]``, v = last-token state of source demonstrations +
                    a dummy query, averaged over sources (Hendel et al. 2023; patched, not added)
``random_vector``   zero-shot prompt plus a Gaussian vector with the mean difference's norm per layer (control)
==================  ==========================================================================================

All vectors come from the same ``n`` source samples (:mod:`castlens.selection`). ``random`` draws them once for
all targets; the graph-based methods (``cast``, ``relevance``, ``diversity``) choose them per target from ``pool``
candidates per source, embedded (like the target's dev queries, or its unlabelled test inputs when it has no
train split) as the model's mean-pooled residual stream at the middle layer, or (``embedder="minilm"``) as
all-MiniLM-L6-v2 sentence embeddings. Each sample's few-shot prompt uses
its source task's fixed ``shots`` demonstrations.

Hyper-parameters are never chosen on test items. Each target's train split gives a *dev* split (``dev`` items);
the in-task demonstrations come from the rest of train. Every construction is swept over layers x strengths on
dev, and the best setting (dev accuracy, ties broken by the mean log-probability of the gold answer) is run on
test. A target without a train split (MedMCQA) gets, per construction, the setting with the best mean dev
accuracy over the other targets of the run, and no in-task ICL.

Scoring: each answer option is scored by the summed log-probability of its full verbalisation
(:mod:`castlens.reuse`); classification targets score their labels (letters for multiple choice), generation
targets the gold output among ``n_candidates`` outputs of other items. Steering acts on the last prompt token
only, so the prompt body runs once for every method and setting that uses the zero-shot prompt.

Reported per target and method: accuracy with a 95% bootstrap interval over test items, macro-F1, the paired
bootstrap interval of the difference to zero-shot and to cross-task ICL (a difference whose interval contains 0
is marked as noise), prompt tokens per query and measured wall time per query. A run writes one finished file
per target under ``parts/`` and never rewrites it; an interrupted run resumes from what it finished.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from castlens.activations import tokenize
from castlens.models import model_name, tokenizer_of
from castlens.prompts import PromptFormat, default_format, sample_demos
from castlens.reuse import Setting, UNSTEERED, prefix_last_token_resid, prefix_option_logprobs
from castlens.selection import select
from castlens.tasks import Example, Task, TaskError, load_task
from castlens.vectors import (SteeringVector, _atomic_write, load_vectors, principal_direction, random_like,
                              save_vectors)

CONSTRUCTIONS = {"cast_mean_diff": "add", "icv_pc1": "add", "task_vector": "replace", "random_vector": "add"}
METHODS = ("zero_shot", "icl_in_task", "icl_cross_task", *CONSTRUCTIONS)
DUMMY_QUERY = "x"


@dataclass(frozen=True)
class TransferConfig:
    """Everything that determines a run's numbers (saved as ``config.json``; a resume must match it)."""

    model: str
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    n: int = 32                       # source samples behind every vector
    shots: int = 4                    # demonstrations per ICL prompt (source and target)
    dev: int = 64                     # dev items carved from each target's train split
    limit: int | None = None          # test items per target (None: the whole test split)
    layers: tuple[int, ...] | None = None
    strengths: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    select: str = "random"            # castlens.selection.SELECTION_METHODS
    pool: int = 200                   # candidates per source task for the graph-based selection methods
    embedder: str = "model"           # embeddings for the graph search: EMBEDDERS
    n_candidates: int = 4             # answer candidates for generation targets
    seed: int = 0
    n_boot: int = 1000

    def to_dict(self) -> dict:
        return asdict(self)


def default_layers(n_layers: int) -> tuple[int, ...]:
    """Every ``n_layers // 10``-th layer, skipping the first and last (30 layers: 3, 6, ..., 27)."""
    step = max(1, n_layers // 10)
    return tuple(range(step, n_layers - 1, step)) or (0,)


# ---------------------------------------------------------------- text pieces (token ids)
def _enc(model, text: str) -> list[int]:
    return list(tokenizer_of(model)(text, add_special_tokens=False)["input_ids"])


def _prefix(model, blocks: Sequence[str | None], fmt: PromptFormat) -> list[int]:
    """Tokens of the blocks joined and followed by the separator (the tokenizer's special tokens first)."""
    text = fmt.separator.join(b for b in blocks if b)
    return tokenize(model, [text + fmt.separator if text else ""])[0]


def options_for(task: Task, ex: Example, fmt: PromptFormat, n_candidates: int = 4, seed: int = 0
                ) -> tuple[list[str], int]:
    """Answer options of one item and the gold index: a classification task's labels (verbalised); for a
    generation task, the gold output among ``n_candidates`` distinct outputs of the task's other items."""
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


# ---------------------------------------------------------------- vectors from the source samples
def _source_demos(sources: Sequence[Task], shots: int, seed: int) -> dict[str, list[Example]]:
    return {t.name: sample_demos(t.split("train"), shots, random.Random(f"{seed}:demos:{t.name}"), task=t.name)
            for t in sources}


def candidate_pool(sources: Sequence[Task], shots: int, seed: int, per_source: int) -> list[tuple[str, Example]]:
    """Up to ``per_source`` candidates per source (seeded order; never one of that source's demonstrations)."""
    demos = _source_demos(sources, shots, seed)
    out = []
    for t in sources:
        banned = {d.input for d in demos[t.name]}
        pool = [e for e in t.split("train") if e.input not in banned]
        random.Random(f"{seed}:pool:{t.name}").shuffle(pool)
        out += [(t.name, e) for e in pool[:per_source]]
    return out


def sample_diffs(model, sources: Sequence[Task], samples: Sequence[tuple[str, Example]], shots: int, seed: int = 0,
                 batch_size: int = 16, progress: bool | None = None
                 ) -> tuple[Float[Tensor, "sample layer d_model"], list[tuple[str, Example]], int]:
    """Per-sample contrastive activations ``few_i - zero_i`` at the last token, every layer (CAST Eq. 2).

    A sample's few-shot prompt is its source task's instruction + that task's fixed ``shots`` demonstrations +
    the sample's query, its zero-shot prompt the instruction + query; the few-shot half shares one prefix per
    source (run once, :mod:`castlens.reuse`). Returns the differences grouped by source task (in ``sources``
    order, each task's samples in their given order), that order, and the number of tokens processed."""
    unknown = {name for name, _ in samples} - {t.name for t in sources}
    if unknown or not samples:
        raise TaskError(f"samples name tasks that are not sources: {sorted(unknown)}" if unknown
                        else "no source samples given")
    demos = _source_demos(sources, shots, seed)
    few, zero, order, tokens = [], [], [], 0
    for t in sources:
        fmt = default_format(t)
        mine = [(name, e) for name, e in samples if name == t.name]
        if not mine:
            continue
        qs = [_enc(model, fmt.render(e, False)) for _, e in mine]
        few_prefix = _prefix(model, [fmt.instruction, *(fmt.render(d, True) for d in demos[t.name])], fmt)
        zero_prefix = _prefix(model, [fmt.instruction], fmt)
        few.append(prefix_last_token_resid(model, few_prefix, qs, batch_size=batch_size, progress=progress))
        zero.append(prefix_last_token_resid(model, zero_prefix, qs, batch_size=batch_size, progress=progress))
        order += mine
        tokens += len(few_prefix) + len(zero_prefix) + 2 * sum(map(len, qs))
    return torch.cat(few) - torch.cat(zero), order, tokens


def source_vectors(model, sources: Sequence[Task], n: int, shots: int, seed: int = 0, method: str = "random",
                   batch_size: int = 16, progress: bool | None = None,
                   samples: list[tuple[str, Example]] | None = None) -> tuple[dict[str, SteeringVector], dict]:
    """The four constructions from the same ``n`` selected source samples (differences by :func:`sample_diffs`),
    and a record of the samples and cost. ``samples``: use these source samples instead of drawing ``n`` with
    ``method``."""
    t0 = time.perf_counter()
    demos = _source_demos(sources, shots, seed)
    chosen = samples if samples is not None else \
        select(method, sources, n, seed=seed, exclude={k: {d.input for d in v} for k, v in demos.items()})
    diffs, order, tokens = sample_diffs(model, sources, chosen, shots, seed, batch_size, progress)
    tv = []
    for t in sources:
        fmt = default_format(t)
        few_prefix = _prefix(model, [fmt.instruction, *(fmt.render(d, True) for d in demos[t.name])], fmt)
        tv.append(prefix_last_token_resid(model, few_prefix, [_enc(model, fmt.render(Example(DUMMY_QUERY, ""),
                                                                                      False))])[0])
    mean = diffs.mean(0)
    meta = dict(model=model_name(model), task="sources:" + ",".join(t.name for t in sources), n_samples=n,
                shots=shots, seed=seed, prompts=[{"task": name, "query": e.input} for name, e in order])
    vecs = {
        "cast_mean_diff": SteeringVector(directions=mean, method="mean_difference (CAST)", samples=diffs, **meta),
        "icv_pc1": SteeringVector(directions=principal_direction(diffs) if len(diffs) > 1 else mean,
                                  method="first principal direction of the differences, mean's norm (ICV)", **meta),
        "task_vector": SteeringVector(directions=torch.stack(tv).mean(0),
                                      method="task vector: demos + dummy query, mean over sources "
                                             "(Hendel et al. 2023; patch)", **meta),
        "random_vector": SteeringVector(directions=random_like(mean, seed), method="random, mean's norm per layer",
                                        **meta),
    }
    index = {t.name: {id(e): i for i, e in enumerate(t.train)} for t in sources}  # ids, never task text
    record = {"samples": [{"task": name, "train_index": index[name][id(e)]} for name, e in order],
              "selection": method,
              "demos": {k: [index[k][id(d)] for d in v] for k, v in demos.items()},
              "tokens_processed": tokens, "seconds": time.perf_counter() - t0}
    return vecs, record


# ---------------------------------------------------------------- one target
def _split_dev(task: Task, dev: int, shots: int, seed: int) -> tuple[list[Example], list[Example]]:
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


def encode_items(model, task: Task, fmt: PromptFormat, items: Sequence[Example], n_candidates: int = 4,
                 seed: int = 0) -> tuple[list[list[int]], list[list[list[int]]], list[int]]:
    """Query token ids, option token ids per query (``" " + option``) and gold option indices of ``items``."""
    opts = [options_for(task, e, fmt, n_candidates, seed) for e in items]
    return ([_enc(model, fmt.render(e, False)) for e in items],
            [[_enc(model, " " + o) for o in texts] for texts, _ in opts], [g for _, g in opts])


def _correct(scores: torch.Tensor, gold: Sequence[int]) -> tuple[list[int], list[int]]:
    pred = scores.argmax(-1).tolist()
    return pred, [int(p == g) for p, g in zip(pred, gold)]


def method_record(scores: torch.Tensor, gold: Sequence[int], prompt_tokens: float, seconds: float,
                  setting: dict | None = None) -> dict:
    """One method's entry of a part: predictions, per-item correctness, prompt tokens per query, seconds."""
    pred, corr = _correct(scores, gold)
    return {"pred": pred, "correct": corr, "prompt_tokens": prompt_tokens, "seconds": seconds, "setting": setting}


def label_baselines(gold: Sequence[int], options: Sequence[Sequence]) -> dict:
    """Chance (mean 1/#options) and majority-class accuracy of a test split."""
    counts = np.bincount(gold, minlength=max(map(len, options)))
    return {"chance": float(np.mean([1 / len(x) for x in options])), "majority": float(counts.max() / len(gold))}


def sweep_settings(vectors: dict[str, SteeringVector], layers: Sequence[int], strengths: Sequence[float]
                   ) -> list[Setting]:
    out = []
    for name, mode in CONSTRUCTIONS.items():
        for layer in layers:
            for s in (strengths if mode == "add" else (1.0,)):
                out.append(Setting(f"{name}@{layer}x{s:g}", vectors[name].directions, layer, s, mode))
    return out


def _best(rows: list[dict], construction: str) -> dict:
    """The dev-best setting of one construction: highest accuracy, then mean gold log-prob, then order."""
    cands = [r for r in rows if r["construction"] == construction]
    return max(cands, key=lambda r: (round(r["dev_accuracy"], 9), r["dev_gold_logprob"], -cands.index(r)))


def borrowed_settings(target: str, others: Sequence[dict], constructions: Sequence[str]) -> dict[str, dict]:
    """For a target without a dev split: per construction, the (layer, strength) with the best mean dev accuracy
    over the finished ``others`` that have a sweep (ties: the earlier setting)."""
    donors = [p for p in others if p["sweep"]]
    if not donors:
        raise TaskError(f"target {target!r} has no train split to tune on, and no other target of this run has a "
                        "dev sweep to borrow a setting from")
    chosen = {}
    for c in constructions:
        keys = [(r["layer"], r["strength"]) for r in donors[0]["sweep"] if r["construction"] == c]
        acc = {k: np.mean([next(r["dev_accuracy"] for r in p["sweep"] if r["construction"] == c and
                                (r["layer"], r["strength"]) == k) for p in donors]) for k in keys}
        k = max(keys, key=lambda k: (round(acc[k], 9), -keys.index(k)))
        chosen[c] = {"construction": c, "layer": k[0], "strength": k[1], "dev_accuracy": float(acc[k]),
                     "borrowed_from": [p["target"] for p in donors]}
    return chosen


def run_target(model, cfg: TransferConfig, target: Task, vectors: dict[str, SteeringVector], record: dict,
               others: Sequence[dict] = (), batch_size: int = 16, log=print) -> dict:
    """All methods on one target; returns the JSON-ready part (predictions per test item, sweep, costs)."""
    fmt = default_format(target)
    dev, pool = _split_dev(target, cfg.dev, cfg.shots, cfg.seed)
    test = target.split("test")[: cfg.limit]
    layers = list(cfg.layers or default_layers(model.cfg.n_layers))

    def encode(items):
        return encode_items(model, target, fmt, items, cfg.n_candidates, cfg.seed)

    zero_prefix = _prefix(model, [fmt.instruction], fmt)
    settings = sweep_settings(vectors, layers, cfg.strengths)
    sweep: list[dict] = []
    if dev:
        q, o, g = encode(dev)
        t0 = time.perf_counter()
        scores = prefix_option_logprobs(model, zero_prefix, q, o, [UNSTEERED, *settings], batch_size=batch_size)
        lp = torch.log_softmax(scores.clamp_min(-1e30), -1)  # normalised over options, for the tie-break
        gold_lp = lp[:, torch.arange(len(g)), torch.tensor(g)].mean(-1)
        for i, s in enumerate([UNSTEERED, *settings]):
            construction = s.name.split("@")[0]
            sweep.append({"construction": construction, "layer": s.layer if s.directions is not None else None,
                          "strength": s.strength if s.directions is not None else None,
                          "dev_accuracy": float(np.mean(_correct(scores[i], g)[1])),
                          "dev_gold_logprob": float(gold_lp[i])})
        log(f"  dev sweep: {len(dev)} items x {len(settings)} settings in {time.perf_counter() - t0:.0f}s")
        chosen = {c: _best(sweep, c) for c in CONSTRUCTIONS}
    else:
        chosen = borrowed_settings(target.name, others, list(CONSTRUCTIONS))
        donors = next(iter(chosen.values()))["borrowed_from"]
        log(f"  no train split: settings borrowed from the dev sweeps of {', '.join(donors)}")

    q, o, gold = encode(test)
    methods: dict[str, dict] = {}

    qlen = float(np.mean([len(x) for x in q]))

    def add(name, scores, prefix_len, seconds, setting=None):
        methods[name] = method_record(scores, gold, prefix_len + qlen, seconds, setting)

    test_settings = [UNSTEERED] + [Setting(c, vectors[c].directions, chosen[c]["layer"], chosen[c]["strength"],
                                           CONSTRUCTIONS[c]) for c in CONSTRUCTIONS]
    timings: dict = {}
    scores = prefix_option_logprobs(model, zero_prefix, q, o, test_settings, batch_size=batch_size, timings=timings)
    shared = timings["prefix"] + timings["body"]
    add("zero_shot", scores[0], len(zero_prefix), shared + timings["unsteered"])
    for i, c in enumerate(CONSTRUCTIONS, 1):
        add(c, scores[i], len(zero_prefix), shared + timings[c], {k: chosen[c][k] for k in ("layer", "strength")})
    if pool:
        demos = sample_demos(pool, cfg.shots, random.Random(f"{cfg.seed}:target-demos:{target.name}"),
                             task=target.name)
        prefix = _prefix(model, [fmt.instruction, *(fmt.render(d, True) for d in demos)], fmt)
        t0 = time.perf_counter()
        add("icl_in_task", prefix_option_logprobs(model, prefix, q, o, batch_size=batch_size)[0], len(prefix),
            time.perf_counter() - t0)
    src = {name: load_task(name) for name in {s["task"] for s in record["samples"]}}
    samples = [src[s["task"]].train[s["train_index"]] for s in record["samples"]]
    src_fmts = {name: default_format(t) for name, t in src.items()}
    rng = random.Random(f"{cfg.seed}:cross-demos:{target.name}")
    picked = rng.sample(range(len(samples)), min(cfg.shots, len(samples)))
    blocks = [src_fmts[record["samples"][i]["task"]].render(samples[i], True) for i in picked]
    prefix = _prefix(model, [*blocks, fmt.instruction], fmt)
    t0 = time.perf_counter()
    add("icl_cross_task", prefix_option_logprobs(model, prefix, q, o, batch_size=batch_size)[0], len(prefix),
        time.perf_counter() - t0)
    return {"target": target.name, "n_test": len(test), "n_dev": len(dev), "gold": gold,
            "n_options": max(map(len, o)), **label_baselines(gold, o), "chosen": chosen, "sweep": sweep, "layers": layers,
            "methods": methods}


# ---------------------------------------------------------------- statistics and tables
def _boot_index(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def summarize(parts: Sequence[dict], n_boot: int = 1000, seed: int = 0, methods: Sequence[str] = METHODS,
              refs: Sequence[tuple[str, str]] = (("zero_shot", "zero"), ("icl_cross_task", "cross_icl"))
              ) -> list[dict]:
    """One row per (target, method) and per method averaged over targets ("mean"): accuracy with a percentile
    bootstrap CI over test items, macro-F1, and paired bootstrap CIs of the difference to zero-shot and to
    cross-task ICL (the same resampled items for both methods). The mean row averages the per-target accuracies;
    its CI resamples items within each target independently."""
    from castlens.evaluation import accuracy_and_macro_f1

    rows, draws = [], {}
    for p in parts:
        idx = _boot_index(p["n_test"], n_boot, seed)
        for m in [m for m in methods if m in p["methods"]]:
            r = p["methods"][m]
            c = np.asarray(r["correct"], dtype=float)
            draws[(p["target"], m)] = c[idx].mean(1)
            acc, f1 = accuracy_and_macro_f1(r["pred"], p["gold"])
            rows.append({"target": p["target"], "method": m, "accuracy": acc, "macro_f1": f1,
                         "n_test": p["n_test"], "prompt_tokens": r["prompt_tokens"],
                         "layer": (r["setting"] or {}).get("layer"), "strength": (r["setting"] or {}).get("strength"),
                         "chance": p["chance"], "majority": p["majority"]})
    targets = [p["target"] for p in parts]
    for m in methods:
        have = [t for t in targets if (t, m) in draws]
        if not have:
            continue
        draws[("mean", m)] = np.mean([draws[(t, m)] for t in have], 0)
        rows.append({"target": "mean" if len(have) == len(targets) else f"mean ({len(have)} of {len(targets)})", "method": m,
                     "accuracy": float(np.mean([r["accuracy"] for r in rows if r["method"] == m and
                                                r["target"] in have])),
                     "macro_f1": float(np.mean([r["macro_f1"] for r in rows if r["method"] == m and
                                                r["target"] in have])),
                     "n_test": sum(r["n_test"] for r in rows if r["method"] == m and r["target"] in have),
                     "prompt_tokens": float(np.mean([r["prompt_tokens"] for r in rows if r["method"] == m and
                                                     r["target"] in have])),
                     "layer": None, "strength": None, "chance": None, "majority": None, "_key": "mean"})
    for r in rows:
        key = r.pop("_key", r["target"])
        d = draws[(key, r["method"])]
        r["ci_lo"], r["ci_hi"] = (float(x) for x in np.percentile(d, [2.5, 97.5]))
        for ref, name in refs:
            if (key, ref) in draws and ref != r["method"] and (key != "mean" or r["target"] == "mean"):
                diff = d - draws[(key, ref)]
                delta = r["accuracy"] - next(x["accuracy"] for x in rows if x["method"] == ref and
                                             x["target"] == r["target"])
                lo, hi = np.percentile(diff, [2.5, 97.5])
                r[f"delta_{name}"], r[f"delta_{name}_lo"], r[f"delta_{name}_hi"] = delta, float(lo), float(hi)
                r[f"delta_{name}_noise"] = bool(lo <= 0 <= hi)
    return rows


def paired_delta(parts: Sequence[dict], a: str, b: str, n_boot: int = 1000, seed: int = 0
                 ) -> tuple[float, float, float]:
    """Mean over ``parts`` of accuracy(``a``) - accuracy(``b``), with a paired bootstrap 95% interval: items are
    resampled within each part, the same draw for both methods and the same draws as :func:`summarize`."""
    draws, point = [], []
    for p in parts:
        x = np.asarray(p["methods"][a]["correct"], float) - np.asarray(p["methods"][b]["correct"], float)
        draws.append(x[_boot_index(p["n_test"], n_boot, seed)].mean(1))
        point.append(x.mean())
    lo, hi = np.percentile(np.mean(draws, 0), [2.5, 97.5])
    return float(np.mean(point)), float(lo), float(hi)


RESULT_COLUMNS = ["target", "method", "accuracy", "ci_lo", "ci_hi", "macro_f1", "delta_zero", "delta_zero_lo",
                  "delta_zero_hi", "delta_zero_noise", "delta_cross_icl", "delta_cross_icl_lo", "delta_cross_icl_hi",
                  "delta_cross_icl_noise", "prompt_tokens", "layer", "strength", "n_test", "chance", "majority"]


def results_csv(rows: Sequence[dict], columns: Sequence[str] = RESULT_COLUMNS) -> str:
    """``rows`` as CSV with ``columns`` (floats to 4 decimals, missing cells empty)."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, list(columns), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{r[k]:.4f}" if isinstance(r.get(k), float) else r.get(k, "")) for k in columns})
    return buf.getvalue()


def _fmt_delta(r: dict, name: str) -> str:
    if f"delta_{name}" not in r:
        return ""
    mark = " ~" if r[f"delta_{name}_noise"] else ""
    return f"{100 * r[f'delta_{name}']:+.1f} [{100 * r[f'delta_{name}_lo']:+.1f}, {100 * r[f'delta_{name}_hi']:+.1f}]{mark}"


def results_md(rows: Sequence[dict], cfg: TransferConfig, costs: dict) -> str:
    lines = [f"# Transfer: {', '.join(cfg.sources)} -> {', '.join(cfg.targets)}", "",
             f"Model {cfg.model}; {cfg.n} source samples ({cfg.select} selection), {cfg.shots} demonstrations per "
             f"ICL prompt; layer and strength chosen on {cfg.dev} dev items per target (from its train split); "
             f"accuracy in % with 95% bootstrap intervals over test items ({cfg.n_boot} draws). Delta columns: "
             "paired difference in points; `~` marks an interval that contains 0 (inside the noise).", "",
             "| target | method | accuracy | macro-F1 | vs zero-shot | vs cross-task ICL | layer x strength | "
             "prompt tokens/query |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        setting = f"{r['layer']} x {r['strength']:g}" if r.get("layer") is not None else ""
        lines.append(f"| {r['target']} | {r['method']} | {100 * r['accuracy']:.1f} [{100 * r['ci_lo']:.1f}, "
                     f"{100 * r['ci_hi']:.1f}] | {100 * r['macro_f1']:.1f} | {_fmt_delta(r, 'zero')} | "
                     f"{_fmt_delta(r, 'cross_icl')} | {setting} | {r['prompt_tokens']:.0f} |")
    lines += ["", "Chance and majority-class accuracy per target: " + "; ".join(
        f"{r['target']} {100 * r['chance']:.0f}% / {100 * r['majority']:.0f}%" for r in rows
        if r["method"] == "zero_shot" and r["chance"] is not None) + ".", "",
        f"Vectors: {costs['vector_tokens']} tokens processed once, {costs['vector_seconds']:.0f}s. Wall time per "
        "test query, in ms (with castlens' prefix and body reuse; see costs.csv):", ""]
    lines += ["| method | " + " | ".join(costs["targets"]) + " |", "|---|" + "---|" * len(costs["targets"])]
    for m in METHODS:
        vals = [costs["ms"].get((t, m)) for t in costs["targets"]]
        lines.append(f"| {m} | " + " | ".join("" if v is None else f"{v:.1f}" for v in vals) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the run
def _write_json(path: Path, obj) -> None:
    _atomic_write(path, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


def open_run(out: Path, cfg) -> None:
    """Start a run in ``out`` (writes ``config.json``) or check that the run there has the same config (keys
    added to the config dataclass since that run count with their defaults); refuses a different config."""
    conf = out / "config.json"
    now = json.loads(json.dumps(cfg.to_dict()))
    if not conf.exists():
        _write_json(conf, cfg.to_dict())
        return
    defaults = type(cfg)(model=cfg.model, sources=cfg.sources, targets=cfg.targets).to_dict()
    old = {**json.loads(json.dumps(defaults)), **json.loads(conf.read_text())}
    if old != now:
        diff = {k: (old.get(k), v) for k, v in now.items() if old.get(k) != v}
        raise ValueError(f"{out} holds a run with a different config ({diff}); use another --out")


def resumable_parts(out: Path, targets: Sequence[Task], limit: int | None, compute, log=print) -> dict[str, dict]:
    """Per target (those with a train split first, so a test-only target can borrow their dev settings), the
    finished ``out/parts/<target>.part.json`` if there is one (never rewritten), else ``compute(target, parts
    finished so far)``, written atomically. Returns {target name: part}."""
    parts: dict[str, dict] = {}
    for i, t in enumerate(sorted(targets, key=lambda t: not t.train), 1):
        path = out / "parts" / f"{t.name}.part.json"
        if path.exists():
            parts[t.name] = json.loads(path.read_text())
            log(f"[{i}/{len(targets)}] {t.name}: finished earlier, kept")
            continue
        t0 = time.perf_counter()
        log(f"[{i}/{len(targets)}] {t.name}: {len(t.test[:limit])} test items")
        parts[t.name] = compute(t, list(parts.values()))
        _write_json(path, parts[t.name])
        log(f"  done in {time.perf_counter() - t0:.0f}s")
    return parts


def run_transfer(model, cfg: TransferConfig, out: str | Path, batch_size: int = 16, png: bool | None = None,
                 log=print) -> list[dict]:
    """The whole run into ``out``: ``config.json``, ``vectors.safetensors``, ``parts/<target>.part.json`` (one per
    finished target, never rewritten), then ``results.csv``, ``results.md``, ``costs.csv`` and the figures.
    A second call with the same config resumes; with a different config it refuses."""
    out = Path(out)
    if model_name(model) != cfg.model:
        raise ValueError(f"the config names model {cfg.model!r} but the loaded model is {model_name(model)!r}")
    sources = [load_task(s) for s in cfg.sources]
    targets = [load_task(t) for t in cfg.targets]
    overlap = set(cfg.sources) & set(cfg.targets)
    if overlap:
        raise TaskError(f"tasks {sorted(overlap)} are both source and target")
    for stale in [*out.glob(".*.tmp"), *out.glob("parts/.*.tmp")]:  # left by a killed run; never a result
        stale.unlink()
    open_run(out, cfg)
    from castlens.selection import SELECTION_METHODS

    if cfg.select not in SELECTION_METHODS:
        raise ValueError(f"unknown selection method {cfg.select!r}; available: {', '.join(SELECTION_METHODS)}")
    shared = None
    if cfg.select == "random":
        shared = _vectors_once(model, cfg, sources, out / "vectors.safetensors", out / "sources.json", None,
                               batch_size, log)
    else:
        pool, pool_emb = _embedded_pool(model, cfg, sources, out, batch_size, log)

    def compute(t: Task, done: list[dict]) -> dict:
        if shared is not None:
            vectors, record = shared
        else:
            vectors, record = _vectors_once(
                model, cfg, sources, out / "vectors" / f"{t.name}.safetensors",
                out / "vectors" / f"{t.name}.sources.json",
                _selected(model, cfg, t, pool, pool_emb, batch_size), batch_size, log)
        part = run_target(model, cfg, t, vectors, record, others=done, batch_size=batch_size, log=log)
        z, c = (np.mean(part["methods"][m]["correct"]) for m in ("zero_shot", "cast_mean_diff"))
        log(f"  zero-shot {100 * z:.1f}%, CAST {100 * c:.1f}%")
        return part

    parts = resumable_parts(out, targets, cfg.limit, compute, log)
    ordered_parts = [parts[t] for t in cfg.targets]
    rows = summarize(ordered_parts, cfg.n_boot, cfg.seed)
    records = [json.loads(p.read_text()) for p in sorted((out / "vectors").glob("*.sources.json"))] \
        if shared is None else [shared[1]]
    cost = {"tokens_processed": sum(r["tokens_processed"] for r in records if "tokens_processed" in r),
            "seconds": sum(r["seconds"] for r in records if "seconds" in r)}
    write_outputs(out, cfg, ordered_parts, rows, cost, png, log)
    return rows


def _vectors_once(model, cfg: TransferConfig, sources, vec_path: Path, rec_path: Path, samples, batch_size, log):
    """The source vectors and their record, computed once and kept in ``vec_path`` / ``rec_path``."""
    if vec_path.exists() and rec_path.exists():
        log(f"reusing the source vectors in {vec_path}")
        return load_vectors(vec_path, model), json.loads(rec_path.read_text())
    log(f"vectors from {cfg.n} {cfg.select} samples of {', '.join(cfg.sources)} ({cfg.shots} shots)")
    vectors, record = source_vectors(model, sources, cfg.n, cfg.shots, cfg.seed, cfg.select, batch_size,
                                     samples=samples)
    save_vectors(vec_path, vectors)
    _write_json(rec_path, record)
    log(f"  {record['tokens_processed']} tokens in {record['seconds']:.0f}s")
    return vectors, record


EMBEDDERS = ("model", "minilm")


def embed_texts(model, texts: list[str], batch_size: int = 16, embedder: str = "model") -> np.ndarray:
    """Embeddings for the graph search: ``model``, the steered model's own residual stream at the middle layer,
    mean-pooled over the text's tokens; ``minilm``, all-MiniLM-L6-v2 sentence embeddings (unit length)."""
    if embedder == "minilm":
        from castlens.models import load_sentence_embedder

        return load_sentence_embedder().encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                                               normalize_embeddings=True, show_progress_bar=False)
    if embedder != "model":
        raise ValueError(f"unknown embedder {embedder!r}; available: {', '.join(EMBEDDERS)}")
    from castlens.activations import mean_resid

    return mean_resid(model, [_enc(model, x) for x in texts], model.cfg.n_layers // 2, batch_size).numpy()


def _embedded_pool(model, cfg: TransferConfig, sources, out: Path, batch_size: int, log):
    """The candidate pool and its embeddings, computed once per run (``candidates.safetensors``)."""
    from safetensors.numpy import load_file, save

    pool = candidate_pool(sources, cfg.shots, cfg.seed, cfg.pool)
    path = out / "candidates.safetensors"
    if path.exists():
        emb = load_file(str(path))["embeddings"]
        if emb.shape[0] == len(pool):
            return pool, emb
    fmts = {t.name: default_format(t) for t in sources}
    t0 = time.perf_counter()
    emb = embed_texts(model, [fmts[name].render(e, False) for name, e in pool], batch_size, cfg.embedder)
    _atomic_write(path, save({"embeddings": emb}))
    log(f"embedded {len(pool)} source candidates in {time.perf_counter() - t0:.0f}s")
    return pool, emb


def _selected(model, cfg: TransferConfig, target: Task, pool, pool_emb, batch_size: int):
    """The ``cfg.n`` candidates chosen for ``target`` (its dev queries, or unlabelled test inputs if no train)."""
    from castlens.selection import select_indices

    fmt = default_format(target)
    dev, _ = _split_dev(target, cfg.dev, cfg.shots, cfg.seed)
    queries = dev or target.split("test")[:64]
    t_emb = embed_texts(model, [fmt.render(e, False) for e in queries], batch_size, cfg.embedder)
    return [pool[i] for i in select_indices(cfg.select, pool_emb, t_emb, cfg.n, seed=cfg.seed)]


def write_outputs(out: Path, cfg: TransferConfig, parts: Sequence[dict], rows: Sequence[dict], cost: dict,
                  png: bool | None = None, log=print) -> None:
    from castlens import plots

    costs = {"targets": [p["target"] for p in parts], "vector_tokens": cost["tokens_processed"],
             "vector_seconds": cost["seconds"],
             "ms": {(p["target"], m): 1000 * r["seconds"] / p["n_test"] for p in parts
                    for m, r in p["methods"].items()}}
    _atomic_write(out / "results.csv", results_csv(rows).encode())
    _atomic_write(out / "results.md", results_md(rows, cfg, costs).encode())
    cost_lines = ["target,method,prompt_tokens_per_query,ms_per_query"] + [
        f"{p['target']},{m},{r['prompt_tokens']:.1f},{costs['ms'][(p['target'], m)]:.2f}"
        for p in parts for m, r in p["methods"].items()]
    _atomic_write(out / "costs.csv", ("\n".join(cost_lines) + "\n").encode())
    if png is None:
        png = plots.png_export_available()
        if not png:
            log(f"note: writing HTML figures only; for PNGs: {plots.PNG_EXPORT_FIX}")
    who = f"{cfg.model}; sources {', '.join(cfg.sources)}; {cfg.n} samples x {cfg.shots} shots"
    for p in parts:
        if not p["sweep"]:
            continue
        zero = next(r["dev_accuracy"] for r in p["sweep"] if r["construction"] == "unsteered")
        curves = {}
        for c, mode in CONSTRUCTIONS.items():
            for s in sorted({r["strength"] for r in p["sweep"] if r["construction"] == c}):
                curves[f"{c} x{s:g}" if mode == "add" else c] = [
                    r["dev_accuracy"] for r in p["sweep"] if r["construction"] == c and r["strength"] == s]
        fig = plots.accuracy_sweep(p["layers"], curves, title=f"{p['target']}: dev accuracy by steering layer",
                                   caption=f"{who}; {p['n_dev']} dev items (from train); steering at the last "
                                           "prompt token", baselines={"zero-shot (dev)": zero,
                                                                      "chance": p["chance"]})
        plots.save_figure(fig, out / f"sweep_{p['target']}", png=png)
    mean = [r for r in rows if r["target"].startswith("mean")]
    fig = plots.cost_accuracy([r["method"] for r in mean], [r["prompt_tokens"] for r in mean],
                              [r["accuracy"] for r in mean], [r["ci_lo"] for r in mean], [r["ci_hi"] for r in mean],
                              title="Accuracy against prompt length (mean over targets)",
                              caption=f"{who}. Bars: 95% bootstrap intervals.")
    plots.save_figure(fig, out / "cost_accuracy", png=png)
    names = [p["target"] for p in parts]
    fig = plots.method_bars(names, {m: [next((r["accuracy"] for r in rows if r["target"] == t and r["method"] == m),
                                             math.nan) for t in names] for m in METHODS},
                            {m: [(next((r["ci_lo"] for r in rows if r["target"] == t and r["method"] == m), math.nan),
                                  next((r["ci_hi"] for r in rows if r["target"] == t and r["method"] == m), math.nan))
                                 for t in names] for m in METHODS},
                            chance=[p["chance"] for p in parts], title="Test accuracy per target and method",
                            caption=f"{who}. Bars: 95% bootstrap intervals; dashes: chance.")
    plots.save_figure(fig, out / "accuracy_by_target", png=png)
