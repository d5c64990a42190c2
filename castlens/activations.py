"""Activations: the residual stream at each prompt's last real token, at every layer.

CAST (arXiv 2507.13236, Sec. 3) reads ``blocks.{L}.hook_resid_post`` at the last prompt token. This module runs
prompts through a TransformerLens bridge in padded batches and keeps only those positions, so memory is bounded
by the batch, never by a full activation cache:

* prompts are tokenized once, through the model's own tokenizer (the chat template applied if asked), and the
  bridge gets token ids, so no second BOS is added;
* the last real token is found from the attention mask for either padding side; with left padding the bridge
  derives position ids from the mask, so every row sees the positions it would see alone;
* the forward stops after the deepest layer read (no later block, no unembedding), with attention in its
  native sdpa form (:func:`castlens.models.residual_stream_only`);
* each batch's forward runs inside :func:`prompt_ends`, so an active ``steering(..., positions="last")`` steers
  each row's last *prompt* token, not the last column of the padded batch (padding, for shorter rows).

Too long is an error, never a silent cut: :class:`PromptTooLongError` names the prompt, the task when the caller
gives it, and what to shorten (the demonstrations only when they are what makes the prompt too long).
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator, Sequence, cast

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from castlens.distributed import shows_progress
from castlens.models import context_length, input_device, model_name, pad_id, residual_stream_only, tokenizer_of

HOOK = "blocks.{layer}.hook_resid_post"


class PromptTooLongError(ValueError):
    """A prompt longer than the model's context (the policy is to refuse, never to truncate silently).

    Carries ``n_tokens``, ``limit``, ``index`` (the prompt's position in the caller's list, if known), ``task``
    (if the caller knows it) and ``query_tokens``: the token count of the same prompt *without* demonstrations
    (its zero-shot form), if the caller knows it. The message follows from them:

    * ``query_tokens > limit``: the query itself is too long; no number of demonstrations helps;
    * ``query_tokens <= limit``: the demonstrations make it too long; use fewer or shorter ones;
    * ``query_tokens`` unknown: the prompt is too long; shorten it (its demonstrations, if it has any).
    """

    def __init__(self, n_tokens: int, limit: int, index: int | None = None, task: str | None = None,
                 query_tokens: int | None = None):
        self.n_tokens, self.limit, self.index, self.task, self.query_tokens = n_tokens, limit, index, task, \
            query_tokens
        super().__init__(self._message())

    def __reduce__(self):  # pickles (multiprocessing) with its fields, not just the message
        return type(self), (self.n_tokens, self.limit, self.index, self.task, self.query_tokens)

    def _message(self) -> str:
        head = (f"task {self.task!r}: " if self.task else "") + \
            ("the prompt" if self.index is None else f"prompt {self.index}")
        q, limit = self.query_tokens, self.limit
        if q is not None and q > limit:
            return (f"{head}: the query itself is {q - limit} tokens over the model's limit of {limit} (it has {q} "
                    f"tokens without any demonstration, more than the model's context of {limit}); no number of "
                    "demonstrations makes it fit: shorten the query or use a model with a longer context")
        told = f"{head} has {self.n_tokens} tokens, more than the model's context of {limit}"
        if q is not None:
            return (f"{told}, because of its demonstrations (without them it has {q}): use fewer or shorter "
                    "demonstrations, or drop the earliest ones (truncate_demos=True, --truncate-demos); castlens "
                    "never truncates a prompt silently")
        return f"{told}: shorten it (fewer or shorter demonstrations, if it has any); castlens never truncates a " \
            "prompt silently"


# ---------------------------------------------------------------- where each row's prompt ends
_PROMPT_LAST: ContextVar[Tensor | None] = ContextVar("castlens_prompt_last", default=None)


@contextlib.contextmanager
def prompt_ends(last: Int[Tensor, " batch"]) -> Iterator[None]:
    """Tell an active :func:`castlens.steering.steering` ``(positions="last")`` which position of each row is the
    last token of that row's *prompt*, for every forward pass run inside this context.

    In a right-padded batch the last column is padding for the shorter rows, and in a scoring pass
    (``prompt + option``) it is the last option token, after every position read; neither is "the last token"
    CAST steers. castlens' own batch loops (:func:`last_token_resid`, :func:`mean_resid`,
    :func:`castlens.evaluation.option_logprobs`, :func:`castlens.steering.generate`) wrap each forward in this
    context; code that runs its own batched forward passes can do the same. ``last`` is ``[batch]``, one index
    per row of the pass's input ids; the innermost context wins."""
    if last.ndim != 1 or last.dtype.is_floating_point or last.dtype == torch.bool:
        raise ValueError(f"prompt_ends needs a 1-D integer tensor [batch], got {last.dtype} of shape "
                         f"{tuple(last.shape)}")
    token = _PROMPT_LAST.set(last)
    try:
        yield
    finally:
        _PROMPT_LAST.reset(token)


def current_prompt_ends() -> Int[Tensor, " batch"] | None:
    """The per-row prompt-last indices registered by the innermost :func:`prompt_ends`, or ``None``."""
    return _PROMPT_LAST.get()


def tokenize(model, texts: Sequence[str], chat: bool = False) -> list[list[int]]:
    """Token ids of ``texts`` through the model's own tokenizer; with ``chat`` each text becomes one user turn
    of the chat template, followed by the assistant generation prompt."""
    tok = tokenizer_of(model)
    texts = list(texts)
    if chat:
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"chat=True but the tokenizer of {model_name(model)} "
                             "has no chat template")
        texts = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                         add_generation_prompt=True) for t in texts]
        return [list(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    return [list(ids) for ids in tok(texts)["input_ids"]]


def token_ids(model, prompts: Sequence[str] | Sequence[Sequence[int]], chat: bool = False) -> list[list[int]]:
    """Prompts given as text (tokenized by :func:`tokenize`) or as token ids (copied), as lists of ids."""
    if prompts and isinstance(prompts[0], str):
        return tokenize(model, cast("Sequence[str]", prompts), chat)
    return [list(p) for p in cast("Sequence[Sequence[int]]", prompts)]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, padding_side: str = "right"
              ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], Int[Tensor, " batch"]]:
    """Padded ids, the attention mask and the index of each row's last real token."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if padding_side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    last = torch.full((len(seqs),), width - 1) if padding_side == "left" else \
        torch.tensor([len(s) - 1 for s in seqs])
    return ids, mask, last


class StopForward(Exception):
    """Raised by a hook once it has read what it needs, to skip the rest of the forward pass."""


def length_sorted_batches(seqs: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices of ``seqs`` in batches of ``batch_size``, longest first (rows of similar length pad least)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def check_lengths(model, seqs: Sequence[Sequence[int]], task: str | None = None,
                  query_lengths: Sequence[int | None] | None = None) -> None:
    """Refuse an empty prompt or one longer than the model's context (:class:`PromptTooLongError`).

    ``task`` names the task in the error. ``query_lengths[i]``, if given, is the token count of prompt ``i``
    without its demonstrations (its zero-shot form): with it the error says whether the demonstrations or the
    query itself make the prompt too long."""
    limit = context_length(model)
    if query_lengths is not None and len(query_lengths) != len(seqs):
        raise ValueError(f"{len(seqs)} prompts but {len(query_lengths)} query lengths")
    for i, s in enumerate(seqs):
        if len(s) == 0:
            raise ValueError((f"task {task!r}: " if task else "") + f"prompt {i} is empty after tokenization")
        q = None if query_lengths is None else query_lengths[i]
        if len(s) > limit or (q is not None and q > limit):
            raise PromptTooLongError(len(s), limit, index=i, task=task, query_tokens=q)


def last_token_values(model, prompts: Sequence[str] | Sequence[Sequence[int]], names: Sequence[str],
                      batch_size: int = 16, padding_side: str = "right", chat: bool = False,
                      progress: bool | None = None, task: str | None = None) -> dict[str, Tensor]:
    """The value of each hook point in ``names`` at each prompt's last token: ``{name: [prompt, ...]}`` (float32,
    CPU, input order; ``...`` is the hook's shape without batch and position, e.g. ``[d_model]`` for
    ``blocks.{L}.hook_resid_post``, ``[n_heads, d_head]`` for ``blocks.{L}.attn.hook_z``).

    Attention runs as sdpa (:func:`castlens.models.residual_stream_only`): the residual, MLP, norm and
    ``attn.hook_z`` (the input of the output projection) hook points fire there; scores and patterns do not, and
    a name that never fires raises. The forward stops after the deepest block any name belongs to. Prompts are
    batched longest first; under ``steering(..., positions="last")`` each prompt's last token is the one steered.
    ``task`` names the task in the error for a prompt that is too long."""
    names = list(dict.fromkeys(names))
    if not names:
        raise ValueError("no hook names given")
    unknown = [n for n in names if n not in model.hook_dict]
    if unknown:
        raise ValueError(f"unknown hook points {unknown}; e.g. {HOOK.format(layer=0)}")
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    seqs = token_ids(model, prompts, chat)
    check_lengths(model, seqs, task=task)
    blocks = [int(n.split(".")[1]) if n.startswith("blocks.") else -1 for n in names]
    deepest = max(blocks)
    stop = HOOK.format(layer=deepest) if deepest >= 0 else None
    out: dict[str, Tensor] = {}
    device = input_device(model)
    state: dict = {}

    def grab(name: str):
        def hook(x: Tensor, hook) -> None:
            value = x[torch.arange(x.shape[0], device=x.device), state["last"]].float().cpu()
            if name not in out:
                out[name] = torch.empty(len(seqs), *value.shape[1:], dtype=torch.float32)
            out[name][state["rows"]] = value
        return hook

    def halt(x: Tensor, hook) -> None:
        raise StopForward

    fwd_hooks = [(n, grab(n)) for n in names] + ([(stop, halt)] if stop else [])
    batches = length_sorted_batches(seqs, batch_size)
    show = shows_progress(progress, len(batches))
    with torch.inference_mode(), residual_stream_only(model), model.hooks(fwd_hooks=fwd_hooks):
        for rows in tqdm(batches, desc="activations", disable=not show, leave=False):
            ids, mask, last = pad_batch([seqs[r] for r in rows], pad_id(model), padding_side)
            state["rows"], state["last"] = torch.tensor(rows), last.to(device)
            try:
                with prompt_ends(state["last"]):
                    model(ids.to(device), attention_mask=mask.to(device), return_type=None)
            except StopForward:
                pass
    missing = [n for n in names if n not in out]
    if missing:
        raise ValueError(f"hook points {missing} did not fire on the sdpa path (attention scores and patterns "
                         "fire only on the bridge's eager attention)")
    return out


def last_token_resid(model, prompts: Sequence[str] | Sequence[Sequence[int]], layers: Sequence[int] | None = None,
                     batch_size: int = 16, padding_side: str = "right", chat: bool = False,
                     progress: bool | None = None, task: str | None = None) -> Float[Tensor, "prompt layer d_model"]:
    """``blocks.{L}.hook_resid_post`` at each prompt's last token, for each ``L`` in ``layers`` (default all).

    ``prompts`` are strings or token-id lists. Prompts are batched longest first (less padding) and the result is
    returned in the input order, in float32 on the CPU: shape ``[len(prompts), len(layers), d_model]``. Under
    ``steering(..., positions="last")`` each prompt's last token is the one steered. ``task`` names the task in
    the error for a prompt that is too long. (:func:`last_token_values` for any hook points.)
    """
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad or not layers:
        raise ValueError(f"layers {bad or layers} out of range for a model with {n_layers} layers")
    names = [HOOK.format(layer=layer) for layer in layers]
    values = last_token_values(model, prompts, names, batch_size, padding_side, chat, progress, task)
    return torch.stack([values[n] for n in names], 1)


def mean_resid(model, prompts: Sequence[str] | Sequence[Sequence[int]], layer: int, batch_size: int = 16,
               progress: bool | None = None, skip: int = 1, task: str | None = None
               ) -> Float[Tensor, "prompt d_model"]:
    """The mean over each prompt's real tokens of ``blocks.{layer}.hook_resid_post``: a sentence embedding from
    the model itself (the default embedding of :mod:`castlens.selection`). Stops after ``layer``.

    The first ``skip`` positions are left out (of prompts longer than that): the first token is an attention
    sink whose residual norm is about 100x the others' in SmolLM2 (27,000 against 190 at layer 15), so with it
    every mean points the same way (pairwise cosine 0.99 between unrelated sentences). Under
    ``steering(..., positions="last")`` each prompt's last token is the one steered; ``task`` names the task in
    the error for a prompt that is too long."""
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"layer {layer} out of range for a model with {model.cfg.n_layers} layers")
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    seqs = token_ids(model, prompts)
    check_lengths(model, seqs, task=task)
    out = torch.empty(len(seqs), model.cfg.d_model, dtype=torch.float32)
    device = input_device(model)
    state: dict = {}

    def hook(x: Tensor, hook) -> None:  # summed in float32: a bfloat16 sum (and count) would round at each step
        m = state["mask"].to(x.device, torch.float32)[..., None]
        out[state["rows"]] = ((x.float() * m).sum(1) / m.sum(1)).cpu()
        raise StopForward

    batches = length_sorted_batches(seqs, batch_size)
    with torch.inference_mode(), residual_stream_only(model), model.hooks(fwd_hooks=[(HOOK.format(layer=layer), hook)]):
        for rows in tqdm(batches, desc="embeddings", leave=False,
                         disable=not shows_progress(progress, len(batches))):
            ids, mask, last = pad_batch([seqs[r] for r in rows], pad_id(model), "right")
            keep = mask.clone()
            long = mask.sum(1) > skip
            keep[long, :skip] = 0  # right padding: the first positions are real tokens
            state["rows"], state["mask"] = torch.tensor(rows), keep
            try:
                with prompt_ends(last.to(device)):
                    model(ids.to(device), attention_mask=mask.to(device), return_type=None)
            except StopForward:
                pass
    return out
