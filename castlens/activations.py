"""Activations: the residual stream at each prompt's last real token, at every layer.

CAST (arXiv 2507.13236, Sec. 3) reads ``blocks.{L}.hook_resid_post`` at the last prompt token. This module runs
prompts through a TransformerLens bridge in padded batches and keeps only those positions, so memory is bounded
by the batch, never by a full activation cache:

* prompts are tokenized once, through the model's own tokenizer (the chat template applied if asked), and the
  bridge gets token ids, so no second BOS is added;
* the last real token is found from the attention mask for either padding side; with left padding the bridge
  derives position ids from the mask, so every row sees the positions it would see alone;
* the forward stops after the deepest layer read (no later block, no unembedding), with attention in its
  native sdpa form (:func:`castlens.models.residual_stream_only`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from castlens.models import context_length, pad_id, residual_stream_only, tokenizer_of

HOOK = "blocks.{layer}.hook_resid_post"


class PromptTooLongError(ValueError):
    """A prompt longer than the model's context (the policy is to refuse, never to truncate silently)."""


def tokenize(model, texts: Sequence[str], chat: bool = False) -> list[list[int]]:
    """Token ids of ``texts`` through the model's own tokenizer; with ``chat`` each text becomes one user turn
    of the chat template, followed by the assistant generation prompt."""
    tok = tokenizer_of(model)
    texts = list(texts)
    if chat:
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"chat=True but the tokenizer of {getattr(model, 'castlens_name', 'this model')} "
                             "has no chat template")
        texts = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                         add_generation_prompt=True) for t in texts]
        return [list(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    return [list(ids) for ids in tok(texts)["input_ids"]]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, padding_side: str = "right"
              ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], Int[Tensor, "batch"]]:
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


def check_lengths(model, seqs: Sequence[Sequence[int]]) -> None:
    limit = context_length(model)
    for i, s in enumerate(seqs):
        if len(s) == 0:
            raise ValueError(f"prompt {i} is empty after tokenization")
        if len(s) > limit:
            raise PromptTooLongError(
                f"prompt {i} has {len(s)} tokens, more than the model's context of {limit}; use fewer or "
                "shorter demonstrations (castlens never truncates a prompt silently)")


def last_token_resid(model, prompts: Sequence[str] | Sequence[Sequence[int]], layers: Sequence[int] | None = None,
                     batch_size: int = 16, padding_side: str = "right", chat: bool = False,
                     progress: bool | None = None) -> Float[Tensor, "prompt layer d_model"]:
    """``blocks.{L}.hook_resid_post`` at each prompt's last token, for each ``L`` in ``layers`` (default all).

    ``prompts`` are strings or token-id lists. Prompts are batched longest first (less padding) and the result is
    returned in the input order, in float32 on the CPU: shape ``[len(prompts), len(layers), d_model]``.
    """
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad or not layers:
        raise ValueError(f"layers {bad or layers} out of range for a model with {n_layers} layers")
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    seqs = tokenize(model, prompts, chat) if isinstance(prompts[0], str) else [list(p) for p in prompts]
    check_lengths(model, seqs)

    out = torch.empty(len(seqs), len(layers), model.cfg.d_model, dtype=torch.float32)
    deepest = max(layers)
    device = next(model.parameters()).device
    state: dict = {}

    def make_hook(j: int, layer: int):
        def hook(x: Tensor, hook) -> None:
            out[state["rows"], j] = x[torch.arange(x.shape[0], device=x.device), state["last"]].float().cpu()
            if layer == deepest:
                raise StopForward
        return hook

    fwd_hooks = [(HOOK.format(layer=layer), make_hook(j, layer)) for j, layer in enumerate(layers)]
    batches = length_sorted_batches(seqs, batch_size)
    show = progress if progress is not None else len(batches) > 4
    with torch.inference_mode(), residual_stream_only(model), model.hooks(fwd_hooks=fwd_hooks):
        for rows in tqdm(batches, desc="activations", disable=not show, leave=False):
            ids, mask, last = pad_batch([seqs[r] for r in rows], pad_id(model), padding_side)
            state["rows"], state["last"] = torch.tensor(rows), last.to(device)
            try:
                model(ids.to(device), attention_mask=mask.to(device), return_type=None)
            except StopForward:
                pass
    return out


def mean_resid(model, prompts: Sequence[str] | Sequence[Sequence[int]], layer: int, batch_size: int = 16,
               progress: bool | None = None, skip: int = 1) -> Float[Tensor, "prompt d_model"]:
    """The mean over each prompt's real tokens of ``blocks.{layer}.hook_resid_post``: a sentence embedding from
    the model itself (the default embedding of :mod:`castlens.selection`). Stops after ``layer``.

    The first ``skip`` positions are left out (of prompts longer than that): the first token is an attention
    sink whose residual norm is about 100x the others' in SmolLM2 (27,000 against 190 at layer 15), so with it
    every mean points the same way (pairwise cosine 0.99 between unrelated sentences)."""
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"layer {layer} out of range for a model with {model.cfg.n_layers} layers")
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    seqs = tokenize(model, prompts) if isinstance(prompts[0], str) else [list(p) for p in prompts]
    check_lengths(model, seqs)
    out = torch.empty(len(seqs), model.cfg.d_model, dtype=torch.float32)
    device = next(model.parameters()).device
    state: dict = {}

    def hook(x: Tensor, hook) -> None:
        m = state["mask"].to(x.device, x.dtype)[..., None]
        out[state["rows"]] = ((x * m).sum(1) / m.sum(1)).float().cpu()
        raise StopForward

    batches = length_sorted_batches(seqs, batch_size)
    with torch.inference_mode(), residual_stream_only(model), model.hooks(fwd_hooks=[(HOOK.format(layer=layer), hook)]):
        for rows in tqdm(batches, desc="embeddings", leave=False,
                         disable=not (progress if progress is not None else len(batches) > 4)):
            ids, mask, _ = pad_batch([seqs[r] for r in rows], pad_id(model), "right")
            keep = mask.clone()
            long = mask.sum(1) > skip
            keep[long, :skip] = 0  # right padding: the first positions are real tokens
            state["rows"], state["mask"] = torch.tensor(rows), keep
            try:
                model(ids.to(device), attention_mask=mask.to(device), return_type=None)
            except StopForward:
                pass
    return out
