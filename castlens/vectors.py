"""Contrastive (few-shot minus zero-shot) steering vectors and their files.

For a task with queries ``x_i`` and demonstrations ``D_i`` (CAST, arXiv 2507.13236, Sec. 3)::

    delta_i[L] = h_L(D_i + x_i)[last] - h_L(x_i)[last]        # per sample, every layer L
    v[L]       = mean_i delta_i[L]                            # the task's steering vector

with ``h_L`` the residual stream after block ``L`` (``blocks.{L}.hook_resid_post``) at the last prompt token, in
the model's raw residual coordinates. A :class:`SteeringVector` carries ``v`` as ``[n_layers, d_model]`` and its
provenance; :func:`save_vectors` writes many of them as one safetensors file with a JSON file beside it that also
lists every prompt pair, as the exact text given to the tokenizer, so anyone can recompute the vector.
No pickle is used anywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, Union

import torch
from jaxtyping import Float
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from castlens import __version__
from castlens import geometry as geo
from castlens.activations import HOOK, check_lengths, last_token_resid, tokenize
from castlens.files import atomic_write
from castlens.models import WEIGHT_PROCESSING, model_name, tokenizer_of
from castlens.prompts import PromptFormat, PromptPair, contrastive_pairs, default_format, few_shot_prompt, sample_demos
from castlens.tasks import Example, Task, load_task

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

FORMAT = "castlens.vectors/1"


class VectorFileError(ValueError):
    """A vector file that cannot be used: the message names the file and the problem."""


@dataclass
class SteeringVector:
    """Per-layer directions of one task (or one construction) and where they came from."""

    directions: Float[Tensor, "layer d_model"]
    model: str
    task: str
    n_samples: int
    shots: int
    seed: int
    method: str = "mean_difference"
    hook: str = HOOK
    position: str = "last"
    prompt_format: dict = field(default_factory=dict)
    chat: bool = False
    prompts: list[dict] = field(default_factory=list)
    weight_processing: str = WEIGHT_PROCESSING
    castlens_version: str = __version__
    samples: Float[Tensor, "sample layer d_model"] | None = None  # per-sample differences, optional

    @property
    def n_layers(self) -> int:
        return self.directions.shape[0]

    @property
    def d_model(self) -> int:
        return self.directions.shape[1]

    def at(self, layer: int) -> Float[Tensor, "d_model"]:
        return self.directions[layer]

    def apply(self, model: TransformerBridge, layers: int | Sequence[int], strength: float = 1.0,
              positions: str | Tensor = "last", **kw: Any) -> contextlib.AbstractContextManager[None]:
        """Steer with this vector: ``with v.apply(model, layers=15, strength=4.0): ...`` adds ``strength *
        v[L]`` at ``blocks.{L}.hook_resid_post`` (:func:`castlens.steering.steering`, which checks that the
        vector was made for ``model``); the hooks are removed on exit, also after an error."""
        from castlens.steering import steering

        return steering(model, self, layers, strength, positions, **kw)

    def metadata(self) -> dict:
        meta = {k: v for k, v in asdict(self).items() if k not in ("directions", "samples")}
        return {**meta, "n_layers": self.n_layers, "d_model": self.d_model}

    def check_model(self, model, where: str = "vector") -> None:
        """Raise if this vector was not made for ``model`` (by name, width and depth)."""
        name, d, n = model_name(model), model.cfg.d_model, model.cfg.n_layers
        if self.model != name or self.d_model != d or self.n_layers != n:
            raise VectorFileError(
                f"{where}: made for model {self.model!r} ({self.n_layers} layers x d_model {self.d_model}), "
                f"not for {name!r} ({n} layers x d_model {d})")


def _prompt_records(model, pairs: Sequence[PromptPair], ids: Sequence[Sequence[int]], chat: bool) -> list[dict]:
    """The exact text the tokenizer saw for each prompt, and whether its ids start with a BOS token."""
    tok = tokenizer_of(model)
    n = len(pairs)

    def text(t: str) -> str:
        return tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                       add_generation_prompt=True) if chat else t

    return [{"query": p.query, "zero": text(p.zero), "few": text(p.few), "add_special_tokens": not chat,
             "zero_starts_with_bos": bool(ids[i][0] == tok.bos_token_id),
             "few_starts_with_bos": bool(ids[n + i][0] == tok.bos_token_id),
             "zero_tokens": len(ids[i]), "few_tokens": len(ids[n + i])} for i, p in enumerate(pairs)]


Prompt = Union[str, Sequence[int]]


def contrastive_activations(model: TransformerBridge, negative: Sequence[Prompt], *positives: Sequence[Prompt],
                            prefixes: Sequence[Sequence[int]] | None = None, batch_size: int = 16,
                            chat: bool = False, progress: bool | None = None
                            ) -> Float[Tensor, "set sample layer d_model"]:
    """Last-token residual stream ``h_L(prompt)[last]`` of the negative prompts (set 0) and of each positive set.

    The one forward path behind every castlens vector (few vs zero-shot, filler or shuffled-label controls, any
    contrastive positive/negative pairs). Prompts are text or token ids. Without ``prefixes`` all prompts run
    in one batched pass (:func:`~castlens.activations.last_token_resid`); with ``prefixes`` (one per set,
    negative first) every prompt of set ``j`` is ``prefixes[j] + prompt`` as ids, and each prefix runs once
    (:func:`~castlens.reuse.prefix_last_token_resid`)."""
    if not positives:
        raise ValueError("contrastive activations need at least one set of positive prompts")
    if len({len(negative), *(len(p) for p in positives)}) != 1 or not negative:
        raise ValueError(f"every prompt set needs the same number (>= 1) of prompts, got {len(negative)} negative "
                         f"and {[len(p) for p in positives]} positive")
    sets = [negative, *positives]
    if prefixes is None:
        flat: list[Any] = [x for s in sets for x in s]  # all text or all token ids
        acts = last_token_resid(model, flat, batch_size=batch_size, chat=chat, progress=progress)
        return acts.view(len(sets), len(negative), *acts.shape[1:])
    from castlens.reuse import prefix_last_token_resid

    if len(prefixes) != len(sets):
        raise ValueError(f"{len(prefixes)} prefixes for {len(sets)} prompt sets")
    if any(isinstance(x, str) for s in sets for x in s):
        raise ValueError("prompts after a shared prefix must be token ids")
    return torch.stack([prefix_last_token_resid(model, pre, [list(x) for x in s], batch_size=batch_size,  # type: ignore[arg-type]
                                                progress=progress) for pre, s in zip(prefixes, sets)])


def contrastive_differences(model: TransformerBridge, negative: Sequence[Prompt], *positives: Sequence[Prompt],
                            **kw: Any) -> Float[Tensor, "set sample layer d_model"]:
    """Per positive set ``k`` and sample ``i``: ``h_L(positive_k[i])[last] - h_L(negative[i])[last]``, every
    layer (CAST Eq. 2 for few- vs zero-shot prompts); arguments as :func:`contrastive_activations`."""
    acts = contrastive_activations(model, negative, *positives, **kw)
    return acts[1:] - acts[0]


def _ids_digest(ids: Sequence[int]) -> str:
    return hashlib.sha256(json.dumps([int(i) for i in ids]).encode()).hexdigest()


def vector_from_prompts(model: TransformerBridge, positive: Sequence[Prompt], negative: Sequence[Prompt],
                        name: str = "custom", method: str = "mean_difference", chat: bool = False,
                        batch_size: int = 16, keep_samples: bool = True) -> SteeringVector:
    """A vector from prompts you wrote: the mean over pairs of ``h(positive_i) - h(negative_i)`` at the last
    token (CAST few/zero-shot pairs, or any contrastive pairs as in CAA), text or token ids.

    The provenance records each prompt's text (for text prompts) and the sha256 of its token ids, so the file
    says exactly what the model saw."""
    if len(positive) != len(negative) or not positive:
        raise ValueError(f"need equally many (>= 1) positive and negative prompts, got {len(positive)} and "
                         f"{len(negative)}")
    ids = [tokenize(model, [x], chat)[0] if isinstance(x, str) else [int(t) for t in x]
           for x in [*negative, *positive]]
    (diffs,) = contrastive_differences(model, ids[:len(negative)], ids[len(negative):], batch_size=batch_size)
    n = len(negative)
    prompts = [{"negative": negative[i] if isinstance(negative[i], str) else None,
                "positive": positive[i] if isinstance(positive[i], str) else None,
                "negative_tokens": len(ids[i]), "positive_tokens": len(ids[n + i]),
                "negative_ids_sha256": _ids_digest(ids[i]), "positive_ids_sha256": _ids_digest(ids[n + i])}
               for i in range(n)]
    return SteeringVector(directions=diffs.mean(0), model=model_name(model), task=name, n_samples=n, shots=0,
                          seed=0, method=method, chat=chat, prompts=prompts, samples=diffs if keep_samples else None)


def task_vector(model, task: Task | str, n: int, shots: int, seed: int = 0, fmt: PromptFormat | None = None,
                chat: bool = False, batch_size: int = 16, keep_samples: bool = True,
                progress: bool | None = None, data_dir: str | None = None, truncate_demos: bool = False
                ) -> SteeringVector:
    """The CAST mean-difference vector of ``task`` from ``n`` queries with ``shots`` demonstrations each.

    A few-shot prompt longer than the model's context is an error (:class:`PromptTooLongError`) unless
    ``truncate_demos``: then its earliest demonstrations are dropped until it fits (the prompt records keep the
    demonstrations actually used)."""
    task = load_task(task, data_dir) if isinstance(task, str) else task
    fmt = fmt or default_format(task)
    pairs = contrastive_pairs(task, n, shots, seed=seed, fmt=fmt)
    if truncate_demos:
        from dataclasses import replace

        from castlens.models import context_length
        from castlens.prompts import fit_demonstrations

        limit, count = context_length(model), (lambda s: len(tokenize(model, [s], chat)[0]))
        fitted = []
        for p in pairs:
            if count(p.few) > limit:
                few, kept = fit_demonstrations(Example(p.query, ""), list(p.demos), fmt, count, limit, task=task.name)
                p = replace(p, few=few, demos=tuple(kept))
            fitted.append(p)
        pairs = fitted
    ids = tokenize(model, [p.zero for p in pairs] + [p.few for p in pairs], chat)
    check_lengths(model, ids[len(pairs):], task=task.name, query_lengths=[len(z) for z in ids[:len(pairs)]])
    (diffs,) = contrastive_differences(model, ids[:len(pairs)], ids[len(pairs):], batch_size=batch_size, chat=chat,
                                       progress=progress)
    return SteeringVector(
        directions=diffs.mean(0), model=model_name(model), task=task.name, n_samples=n, shots=shots, seed=seed,
        prompt_format=fmt.to_dict(), chat=chat, prompts=_prompt_records(model, pairs, ids, chat),
        samples=diffs if keep_samples else None)


def compute_vectors(model, tasks: Sequence[Task | str], n: int, shots: int, seed: int = 0, **kwargs
                    ) -> dict[str, SteeringVector]:
    """:func:`task_vector` for each task, keyed by task name."""
    out = {}
    for t in tasks:
        v = task_vector(model, t, n, shots, seed=seed, **kwargs)
        out[v.task] = v
    return out


# ---------------------------------------------------------------- files
def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    elif p.suffix != ".safetensors":
        p = p.with_name(p.name + ".safetensors")
    return p, p.with_suffix(".json")


def save_vectors(path: str | os.PathLike, vectors: dict[str, SteeringVector] | SteeringVector) -> Path:
    """Write ``vectors`` to ``<path>.safetensors`` plus ``<path>.json``; returns the safetensors path.

    Each file is written to a temporary name and renamed, so a reader never sees a partial file; the JSON holds
    the safetensors file's sha256, so a mismatched pair is detected on load.
    """
    if isinstance(vectors, SteeringVector):
        vectors = {vectors.task: vectors}
    if not vectors:
        raise ValueError("no vectors to save")
    tensors, meta = {}, {}
    for key, v in vectors.items():
        if not torch.isfinite(v.directions).all():
            raise ValueError(f"vector {key!r} has NaN or inf values; refusing to save it")
        tensors[key] = v.directions.detach().float().cpu().contiguous()
        if v.samples is not None:
            tensors[f"{key}/samples"] = v.samples.detach().float().cpu().contiguous()
        meta[key] = v.metadata()
    st_path, js_path = _paths(path)
    blob = st_save(tensors)
    doc = {"format": FORMAT, "safetensors": st_path.name, "sha256": hashlib.sha256(blob).hexdigest(),
           "vectors": meta}
    atomic_write(st_path, blob)
    atomic_write(js_path, json.dumps(doc, indent=1, ensure_ascii=False))
    return st_path


def load_vectors(path: str | os.PathLike, model=None) -> dict[str, SteeringVector]:
    """Read a vector file written by :func:`save_vectors`; with ``model``, check that it was made for it."""
    st_path, js_path = _paths(path)
    for p in (st_path, js_path):
        if not p.is_file():
            raise VectorFileError(f"{p}: file not found (a vector file is a .safetensors with a .json beside it)")
    try:
        doc = json.loads(js_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise VectorFileError(f"{js_path}: not valid JSON ({err})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("vectors"), dict):
        raise VectorFileError(f"{js_path}: not a castlens vector file (expected format {FORMAT!r})")
    blob = st_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != doc.get("sha256"):
        raise VectorFileError(f"{st_path}: contents do not match {js_path.name} (truncated, modified or from "
                              "another save)")
    try:
        tensors = st_load(blob)
    except Exception as err:  # noqa: BLE001 - safetensors raises several types (SafetensorError, ...) on bad bytes
        raise VectorFileError(f"{st_path}: cannot be read as safetensors ({err})") from None
    out = {}
    fields = set(SteeringVector.__dataclass_fields__) - {"directions", "samples"}
    for key, meta in doc["vectors"].items():
        where = f"{st_path}, vector {key!r}"
        if key not in tensors:
            raise VectorFileError(f"{where}: listed in the JSON but missing from the tensors")
        t = tensors[key]
        expect = (meta.get("n_layers"), meta.get("d_model"))
        if t.ndim != 2 or tuple(t.shape) != expect:
            raise VectorFileError(f"{where}: shape {tuple(t.shape)}, expected [n_layers, d_model] = {list(expect)}")
        if not torch.isfinite(t).all():
            raise VectorFileError(f"{where}: contains NaN or inf values")
        samples = tensors.get(f"{key}/samples")
        if samples is not None and (samples.ndim != 3 or tuple(samples.shape[1:]) != tuple(t.shape)):
            raise VectorFileError(f"{where}: per-sample tensor has shape {tuple(samples.shape)}, expected "
                                  f"[n, {t.shape[0]}, {t.shape[1]}]")
        missing = {"model", "task", "n_samples", "shots", "seed"} - set(meta)
        if missing:
            raise VectorFileError(f"{where}: metadata lacks {sorted(missing)}")
        v = SteeringVector(directions=t, samples=samples, **{k: meta[k] for k in fields if k in meta})
        if model is not None:
            v.check_model(model, where)
        out[key] = v
    return out



# ---------------------------------------------------------------- other constructions (compared in transfer runs)
def principal_direction(samples: Float[Tensor, "n layer d"], centred: bool = False) -> Float[Tensor, "layer d"]:
    """ICV-style vector: the first principal direction of the per-sample differences at each layer, signed to
    agree with their mean and scaled to the mean's norm (so strengths compare with the mean-difference vector).

    ``centred=False`` (default) takes the top right singular vector of the uncentred differences: the direction
    they share. Centred PCA (``centred=True``, as sklearn's PCA) moves that shared offset into the mean and returns
    the main direction along which samples *differ*.
    """
    if samples.ndim != 3 or samples.shape[0] < 2:
        raise ValueError(f"samples must be [n >= 2, layer, d], got shape {tuple(samples.shape)}")
    # both are signed so that the mean difference projects non-negatively on them
    unit = geo.pca_by_layer(samples, n_components=1)["components"][:, 0] if centred \
        else geo.uncentred_first_component(samples)["direction"]
    return (unit * samples.double().mean(0).norm(dim=-1, keepdim=True)).float()


def random_like(directions: Float[Tensor, "layer d"], seed: int = 0) -> Float[Tensor, "layer d"]:
    """A control: a Gaussian random direction per layer with the same norm as ``directions`` at that layer."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(directions.shape, generator=g, dtype=torch.float64)
    return (r / r.norm(dim=-1, keepdim=True) * directions.double().norm(dim=-1, keepdim=True)).float()


def text_ids(model: TransformerBridge, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens: a piece that follows other ids."""
    return list(tokenizer_of(model)(text, add_special_tokens=False)["input_ids"])


def prefix_ids(model: TransformerBridge, blocks: Sequence[str | None], fmt: PromptFormat) -> list[int]:
    """Token ids of the non-empty ``blocks`` joined by the format's separator and followed by it (the
    tokenizer's special tokens first): the shared prefix of prompts whose query ids follow."""
    text = fmt.separator.join(b for b in blocks if b)
    return tokenize(model, [text + fmt.separator if text else ""])[0]


def demonstration_states(model: TransformerBridge, prefixes: Sequence[Sequence[int]], query: Sequence[int]
                         ) -> Float[Tensor, "set layer d_model"]:
    """Hendel et al. (2023): the last-token residual stream of each demonstration prefix followed by ``query``
    (a dummy query), every layer; their mean is the task vector, patched in (``mode="replace"``), not added."""
    from castlens.reuse import prefix_last_token_resid

    return torch.stack([prefix_last_token_resid(model, p, [list(query)])[0] for p in prefixes])


def icl_task_vector(model: TransformerBridge, task: Task | str, n: int, shots: int, seed: int = 0,
                    dummy: str = "x", fmt: PromptFormat | None = None, data_dir: str | None = None
                    ) -> SteeringVector:
    """The Hendel et al. (2023) task vector of ``task``: :func:`demonstration_states` of ``n`` seeded sets of
    ``shots`` demonstrations (with the instruction) and a dummy query, averaged."""
    task = load_task(task, data_dir) if isinstance(task, str) else task
    fmt = fmt or default_format(task)
    rng = random.Random(f"{seed}:task_vector:{task.name}:{n}:{shots}")
    train = task.split("train")
    sets = [sample_demos(train, shots, rng, task=task.name) for _ in range(n)]
    prefixes = [prefix_ids(model, [fmt.instruction, *(fmt.render(d, True) for d in demos)], fmt) for demos in sets]
    query = text_ids(model, fmt.render(Example(dummy, ""), False))
    return SteeringVector(directions=demonstration_states(model, prefixes, query).mean(0), model=model_name(model),
                          task=task.name, n_samples=n, shots=shots, seed=seed,
                          method="task_vector (Hendel et al. 2023; patch, do not add)", prompt_format=fmt.to_dict(),
                          prompts=[{"few": few_shot_prompt(Example(dummy, ""), d, fmt), "dummy_query": dummy}
                                   for d in sets])
