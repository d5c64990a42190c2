"""Steering: add ``strength * v[L]`` to the residual stream at chosen layers and positions.

CAST (arXiv 2507.13236, Sec. 3) injects the averaged contrastive vector into the target task's forward pass at a
middle layer::

    h_L[p]  <-  h_L[p] + lambda * v[L]                      for L in layers, p in positions

and the ICV paper's norm-preserving variant rescales the result to the original norm::

    h_L[p]  <-  (h_L[p] + lambda v[L]) * ||h_L[p]|| / ||h_L[p] + lambda v[L]||

``mode="replace"`` patches instead (Hendel et al. 2023's task vectors): ``h_L[p] <- v[L]``.

The hooks sit on ``blocks.{L}.hook_resid_post`` and exist only inside :func:`steering` (removed on exit, also on
an error). ``positions`` selects tokens: ``"all"`` (every position of every forward pass, so with a KV cache
each newly generated token is steered too), ``"last"`` (the last position of each forward pass), or an integer
tensor ``[batch]`` of per-row indices (the last real token under right padding).

For generation, :func:`generate` decodes greedily with a KV cache and applies the vector at the positions
chosen: ``"last"`` steers the prompt's last token only (generated tokens see the vector through attention to
its cached keys and values), ``"all"`` also every generated token.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from castlens.activations import HOOK
from castlens.vectors import SteeringVector


def _directions(model, vector: SteeringVector | Tensor) -> Tensor:
    if isinstance(vector, SteeringVector):
        vector.check_model(model, f"steering vector {vector.task!r}")
        vector = vector.directions
    want = (model.cfg.n_layers, model.cfg.d_model)
    if vector.ndim == 1 and vector.shape[0] == want[1]:
        vector = vector.expand(want[0], -1)  # one direction for every layer
    if tuple(vector.shape) != want:
        raise ValueError(f"steering vector has shape {tuple(vector.shape)}; the model needs [n_layers, d_model] = "
                         f"{list(want)} (or [d_model])")
    if not torch.isfinite(vector).all():
        raise ValueError("steering vector has NaN or inf values")
    return vector


@contextlib.contextmanager
def steering(model, vector: SteeringVector | Float[Tensor, "layer d_model"], layers: int | Sequence[int],
             strength: float = 1.0, positions: str | Int[Tensor, "batch"] = "all",
             norm_preserving: bool = False, mode: str = "add") -> Iterator[None]:
    """Inside this context every forward pass of ``model`` is steered by ``strength * vector[L]`` at ``layers``
    (``mode="add"``), or has ``vector[L]`` patched in at the chosen positions (``mode="replace"``)."""
    directions = _directions(model, vector)
    layers = [layers] if isinstance(layers, int) else [int(x) for x in layers]
    bad = [x for x in layers if not 0 <= x < model.cfg.n_layers]
    if bad or not layers:
        raise ValueError(f"steering layers {bad or layers} out of range for {model.cfg.n_layers} layers")
    if mode not in ("add", "replace"):
        raise ValueError(f"mode must be 'add' or 'replace', got {mode!r}")
    if isinstance(positions, str) and positions not in ("all", "last"):
        raise ValueError(f"positions must be 'all', 'last' or a tensor of indices, got {positions!r}")

    def make_hook(layer: int):
        def hook(x: Tensor, hook) -> Tensor:
            add = (strength * directions[layer]).to(x.device, x.dtype)
            if isinstance(positions, str) and positions == "all":
                sel = (slice(None), slice(None))
            elif isinstance(positions, str):
                sel = (slice(None), slice(x.shape[1] - 1, x.shape[1]))
            else:
                if positions.shape != (x.shape[0],):
                    raise ValueError(f"positions tensor has shape {tuple(positions.shape)}, expected "
                                     f"[batch] = [{x.shape[0]}]")
                sel = (torch.arange(x.shape[0], device=x.device), positions.to(x.device))
            x = x.clone()
            if mode == "replace":
                x[sel] = directions[layer].to(x.device, x.dtype)
                return x
            h = x[sel]
            new = h + add
            if norm_preserving:
                new = new * (h.norm(dim=-1, keepdim=True) / new.norm(dim=-1, keepdim=True).clamp_min(1e-12))
            x[sel] = new
            return x
        return hook

    with model.hooks(fwd_hooks=[(HOOK.format(layer=layer), make_hook(layer)) for layer in layers]):
        yield


def generate(model, prompt_ids: Sequence[int], max_new_tokens: int,
             vector: SteeringVector | Float[Tensor, "layer d_model"] | None = None, layers: int | Sequence[int] = 0,
             strength: float = 1.0, positions: str = "last", norm_preserving: bool = False, mode: str = "add"
             ) -> list[int]:
    """Greedy decoding with a key/value cache, steered by ``vector`` (``None``: unsteered).

    ``positions="last"`` steers only the prompt's last token: generated tokens are not steered themselves and see
    the vector only through attention to that position's cached keys and values. ``positions="all"`` steers every
    prompt token and every generated token. Returns the new token ids."""
    from transformers import DynamicCache

    from castlens.models import residual_stream_only

    if positions not in ("all", "last"):
        raise ValueError(f"positions must be 'all' or 'last' for generation, got {positions!r}")
    if not prompt_ids:
        raise ValueError("empty prompt")
    device = next(model.parameters()).device
    cache, ids, new = DynamicCache(), torch.tensor([list(prompt_ids)], device=device), []

    def step(x: Tensor, steer: bool) -> int:
        ctx = steering(model, vector, layers, strength, positions, norm_preserving, mode) \
            if steer and vector is not None else contextlib.nullcontext()
        with ctx:
            logits = model(x, past_key_values=cache, use_cache=True, return_type="logits")
        return int(logits[0, -1].argmax())

    with torch.inference_mode(), residual_stream_only(model):
        tok = step(ids, True)  # the prompt: "last" steers its last position, "all" every position
        for _ in range(max_new_tokens):
            new.append(tok)
            if len(new) == max_new_tokens:
                break
            tok = step(torch.tensor([[tok]], device=device), positions == "all")
    return new
