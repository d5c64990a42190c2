"""Sources: the source samples behind a transferred vector, their differences and the vector constructions.

Each source task has fixed ``shots`` demonstrations (seeded; never a sample). A source sample's few-shot prompt
is its task's instruction + those demonstrations + the sample's query, its zero-shot prompt the instruction +
query; its contrastive difference is ``few_i - zero_i`` at the last token, every layer (CAST Eq. 2), computed
with each source's two prefixes run once (:func:`castlens.vectors.contrastive_differences`).

The constructions compared in transfer runs are plain functions of those differences, in one table
(:data:`CONSTRUCTIONS`), plus the Hendel et al. (2023) task vector, which is built from the demonstrations
themselves and patched in rather than added:

==================  ==========================================================================================
``cast_mean_diff``  ``mean_i (few_i - zero_i)``                                                    (CAST Eq. 3)
``icv_pc1``         the first (uncentred) principal direction of the differences, with the mean's norm (ICV)
``task_vector``     last-token state of each source's demonstrations + a dummy query, mean over sources (patch)
``random_vector``   a Gaussian direction with the mean difference's norm per layer (control)
==================  ==========================================================================================

Sample selection: ``random`` draws ``n`` samples round-robin over the sources' shuffled train splits
(:func:`castlens.selection.select_random`); the graph-based methods rank a pool of candidates per source
against the target's dev queries by embeddings (:func:`embed_texts`, :func:`castlens.selection.select_indices`).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from castlens.models import model_name
from castlens.prompts import default_format, sample_demos
from castlens.tasks import Example, Task, TaskError
from castlens.vectors import (SteeringVector, contrastive_differences, demonstration_states, prefix_ids,
                              principal_direction, random_like, text_ids)

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["CONSTRUCTIONS", "MODES", "EMBEDDERS", "Sample", "SourceRecord", "source_demos", "random_samples",
           "candidate_pool", "FunctionVectors", "source_function_vectors",
           "sample_diffs", "source_vectors", "embed_texts", "embedded_pool", "target_embeddings",
           "DUMMY_QUERY"]

Sample = tuple[str, Example]     # (source task name, an item of its train split)
DUMMY_QUERY = "x"
EMBEDDERS = ("model", "minilm")

CONSTRUCTIONS: dict[str, Callable[[Tensor, int], Tensor] | None] = {  # differences [n, layer, d], seed -> vector
    "cast_mean_diff": lambda d, seed: d.mean(0),
    "icv_pc1": lambda d, seed: principal_direction(d) if len(d) > 1 else d.mean(0),
    "task_vector": None,  # from the demonstrations, not the differences: demonstration_states
    "random_vector": lambda d, seed: random_like(d.mean(0), seed),
}
MODES = {"task_vector": "replace"}
METHODS_TEXT = {"cast_mean_diff": "mean_difference (CAST)",
                "icv_pc1": "first principal direction of the differences, mean's norm (ICV)",
                "task_vector": "task vector: demos + dummy query, mean over sources (Hendel et al. 2023; patch)",
                "random_vector": "random, mean's norm per layer"}


def source_demos(sources: Sequence[Task], shots: int, seed: int) -> dict[str, list[Example]]:
    """Each source's fixed few-shot demonstrations (seeded)."""
    return {t.name: sample_demos(t.split("train"), shots, random.Random(f"{seed}:demos:{t.name}"), task=t.name)
            for t in sources}


def random_samples(sources: Sequence[Task], n: int, shots: int, seed: int = 0) -> list[Sample]:
    """``n`` samples round-robin over the sources (:func:`castlens.selection.select_random`), never one of a
    source's own demonstrations."""
    from castlens.selection import select_random

    demos = source_demos(sources, shots, seed)
    return select_random(sources, n, seed=seed, exclude={k: {d.input for d in v} for k, v in demos.items()})


def candidate_pool(sources: Sequence[Task], shots: int, seed: int, per_source: int) -> list[Sample]:
    """Up to ``per_source`` candidates per source (seeded order; never one of that source's demonstrations)."""
    demos = source_demos(sources, shots, seed)
    out = []
    for t in sources:
        banned = {d.input for d in demos[t.name]}
        pool = [e for e in t.split("train") if e.input not in banned]
        random.Random(f"{seed}:pool:{t.name}").shuffle(pool)
        out += [(t.name, e) for e in pool[:per_source]]
    return out


def _few_prefix(model: TransformerBridge, t: Task, demos: Sequence[Example]) -> list[int]:
    fmt = default_format(t)
    return prefix_ids(model, [fmt.instruction, *(fmt.render(d, True) for d in demos)], fmt)


def sample_diffs(model: TransformerBridge, sources: Sequence[Task], samples: Sequence[Sample], shots: int,
                 seed: int = 0, batch_size: int = 16, progress: bool | None = None
                 ) -> tuple[Float[Tensor, "sample layer d_model"], list[Sample], int]:
    """Per-sample contrastive differences ``few_i - zero_i`` (see the module docstring), grouped by source task
    (in ``sources`` order, each task's samples in their given order); returns them, that order, and the number
    of tokens processed."""
    unknown = {name for name, _ in samples} - {t.name for t in sources}
    if unknown or not samples:
        raise TaskError(f"samples name tasks that are not sources: {sorted(unknown)}" if unknown
                        else "no source samples given")
    demos = source_demos(sources, shots, seed)
    diffs: list[Tensor] = []
    order: list[Sample] = []
    tokens = 0
    for t in sources:
        fmt = default_format(t)
        mine = [(name, e) for name, e in samples if name == t.name]
        if not mine:
            continue
        qs = [text_ids(model, fmt.render(e, False)) for _, e in mine]
        few, zero = _few_prefix(model, t, demos[t.name]), prefix_ids(model, [fmt.instruction], fmt)
        diffs += contrastive_differences(model, qs, qs, prefixes=(zero, few), batch_size=batch_size,
                                         progress=progress)
        order += mine
        tokens += len(few) + len(zero) + 2 * sum(map(len, qs))
    return torch.cat(diffs), order, tokens


@dataclass(frozen=True)
class SourceRecord:
    """Which source samples and demonstrations a set of vectors came from (train-split indices, never text),
    and what it cost."""

    samples: list[tuple[str, int]]
    selection: str
    demos: dict[str, list[int]]
    tokens_processed: int
    seconds: float

    def to_dict(self) -> dict:
        return {"samples": [{"task": t, "train_index": i} for t, i in self.samples], "selection": self.selection,
                "demos": self.demos, "tokens_processed": self.tokens_processed, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict) -> SourceRecord:
        return cls([(s["task"], s["train_index"]) for s in d["samples"]], d.get("selection", "random"), d["demos"],
                   d.get("tokens_processed", 0), d.get("seconds", 0.0))


def source_vectors(model: TransformerBridge, sources: Sequence[Task], samples: Sequence[Sample], shots: int,
                   seed: int = 0, selection: str = "random", batch_size: int = 16, progress: bool | None = None
                   ) -> tuple[dict[str, SteeringVector], SourceRecord]:
    """Every construction of :data:`CONSTRUCTIONS` from the same source samples, and their record."""
    t0 = time.perf_counter()
    demos = source_demos(sources, shots, seed)
    diffs, order, tokens = sample_diffs(model, sources, samples, shots, seed, batch_size, progress)
    tv = torch.cat([demonstration_states(model, [_few_prefix(model, t, demos[t.name])],
                                         text_ids(model, default_format(t).render(Example(DUMMY_QUERY, ""), False)))
                    for t in sources])
    prompts = [{"task": name, "query": e.input} for name, e in order]
    vecs = {}
    for name, build in CONSTRUCTIONS.items():
        vecs[name] = SteeringVector(directions=build(diffs, seed) if build is not None else tv.mean(0),
                                    model=model_name(model), task="sources:" + ",".join(t.name for t in sources),
                                    n_samples=len(order), shots=shots, seed=seed, method=METHODS_TEXT[name],
                                    prompts=prompts, samples=diffs if name == "cast_mean_diff" else None)
    index = {t.name: {id(e): i for i, e in enumerate(t.train)} for t in sources}  # ids, never task text
    record = SourceRecord([(name, index[name][id(e)]) for name, e in order], selection,
                          {k: [index[k][id(d)] for d in v] for k, v in demos.items()}, tokens,
                          time.perf_counter() - t0)
    return vecs, record


@dataclass(frozen=True)
class FunctionVectors:
    """Function vectors of the source tasks (Todd et al. 2024): ``effect`` [layer, head] is each head's causal
    effect, the mean over sources of the change of the gold answer's log-probability (normalised over the options)
    when the head's mean few-shot ``z`` over all samples is patched at the last token into zero-shot queries of
    the sources that are neither samples nor demonstrations; ``heads`` ranks them; ``vectors[k]`` is the sum of the
    top-``k`` heads' mean few-shot writes [d_model]."""

    effect: Float[Tensor, "layer head"]
    heads: list[tuple[int, int]]
    vectors: dict[int, Float[Tensor, " d_model"]]


def source_function_vectors(model: TransformerBridge, sources: Sequence[Task], samples: Sequence[Sample],
                            shots: int, ks: Sequence[int], seed: int = 0, queries: int = 4, batch_size: int = 16
                            ) -> FunctionVectors:
    """:class:`FunctionVectors` from the same few-shot prompts as :func:`source_vectors` (each source's fixed
    demonstrations + a sample's query), every head of every layer; ``queries`` patched queries per source."""
    from castlens.experiments.protocol import encode
    from castlens.mechanism import component_contributions, function_vector, head_writes, patch_effects, top_heads

    demos = source_demos(sources, shots, seed)
    last = model.cfg.n_layers - 1
    z, writes, counts, effects = [], [], [], []
    used = {(name, e.input) for name, e in samples} | {(t, d.input) for t, ds in demos.items() for d in ds}
    for t in sources:
        mine = [e for name, e in samples if name == t.name]
        if not mine:
            continue
        fmt, few = default_format(t), _few_prefix(model, t, demos[t.name])
        got = component_contributions(model, [few + text_ids(model, fmt.render(e, False)) for e in mine], last,
                                      batch_size)
        z.append(got.z.sum(0))
        writes.append(head_writes(got) * len(mine))
        counts.append(len(mine))
    z_mean, w_mean = torch.stack(z).sum(0) / sum(counts), torch.stack(writes).sum(0) / sum(counts)
    for t in sources:
        fmt = default_format(t)
        rest = [e for e in t.split("train") if (t.name, e.input) not in used]
        picked = random.Random(f"{seed}:fv-queries:{t.name}").sample(rest, min(queries, len(rest)))
        if not picked:
            raise TaskError(f"source {t.name!r}: no train item left to measure function-vector heads on")
        items = encode(model, t, fmt, picked, seed=seed)
        eff = patch_effects(model, items.queries, z_mean, None, items.options, items.gold,
                            prefix_ids(model, [fmt.instruction], fmt), batch_size)
        assert eff.gold_logprob is not None
        effects.append(eff.gold_logprob)
    effect = torch.stack(effects).mean(0)
    if max(ks) > effect.numel():
        raise ValueError(f"function vectors of {max(ks)} heads asked for; the model has {effect.numel()} heads")
    ranked = top_heads(effect, effect.numel())
    return FunctionVectors(effect, ranked, {k: function_vector(w_mean, ranked[:k]) for k in ks})


def embed_texts(model: TransformerBridge | None, texts: Sequence[str], batch_size: int = 16,
                embedder: str = "model") -> np.ndarray:
    """Embeddings for the graph search: ``model``, the steered model's own residual stream at the middle layer,
    mean-pooled over the text's tokens after the first; ``minilm``, all-MiniLM-L6-v2 sentence embeddings
    (unit length)."""
    if embedder == "minilm":
        from castlens.models import load_sentence_embedder

        return load_sentence_embedder().encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                                               normalize_embeddings=True, show_progress_bar=False)
    if embedder != "model" or model is None:
        raise ValueError(f"unknown embedder {embedder!r}; available: {', '.join(EMBEDDERS)}")
    from castlens.activations import mean_resid

    return mean_resid(model, [text_ids(model, x) for x in texts], model.cfg.n_layers // 2, batch_size).numpy()


def embedded_pool(model: TransformerBridge, sources: Sequence[Task], shots: int, seed: int, per_source: int,
                  embedder: str, path: Path, batch_size: int = 16, log: Callable[[str], None] = print
                  ) -> tuple[list[Sample], np.ndarray]:
    """The candidate pool (:func:`candidate_pool`) and its embeddings for the graph search, computed once per
    run and kept in ``path`` (reused while it holds one row per candidate)."""
    from safetensors.numpy import load_file, save

    from castlens.files import atomic_write

    pool = candidate_pool(sources, shots, seed, per_source)
    if path.exists():
        emb = load_file(str(path))["embeddings"]
        if emb.shape[0] == len(pool):
            return pool, emb
    fmts = {t.name: default_format(t) for t in sources}
    t0 = time.perf_counter()
    emb = embed_texts(model, [fmts[name].render(e, False) for name, e in pool], batch_size, embedder)
    atomic_write(path, save({"embeddings": emb}))
    log(f"embedded {len(pool)} source candidates in {time.perf_counter() - t0:.0f}s")
    return pool, emb


def target_embeddings(model: TransformerBridge, task: Task, dev: Sequence[Example], embedder: str,
                      batch_size: int = 16) -> np.ndarray:
    """What the graph search compares the pool with: the target's dev queries, or, for a target without a train
    split, its first 64 test inputs (unlabelled: no answer is read)."""
    fmt = default_format(task)
    queries = list(dev) or task.split("test")[:64]
    return embed_texts(model, [fmt.render(e, False) for e in queries], batch_size, embedder)
