"""Why is the few-shot shift parallel across tasks? Which components write it, and does it cause anything.

**Direct attribution (exact).** The residual stream after block ``L`` at the last token is a sum of what every
component wrote into it::

    h_L = e + sum_{l<=L} ( sum_h c_{l,h} + r_l ) + sum_{l<=L} m_l

``e`` is the input of block 0 (the scaled embedding), ``m_l = h_l - h_l^mid`` the MLP's write (after its own
post-norm where the model has one), and the attention write ``a_l = h_l^mid - h_{l-1}`` is split over heads: head
``h`` writes ``c_{l,h} = s_l * (z_{l,h} @ W_O[l,h])`` with ``z_{l,h}`` its ``attn.hook_z`` and ``W_O[l,h]`` its
``[d_head, d_model]`` slice of the output projection. ``s_l`` is 1 for a model without a norm between attention
and the residual (Llama, SmolLM2); for one with a post-attention RMSNorm (Gemma 2/3) it is that norm's scale
*frozen from the actual run*, ``s_l = g_l / rms(sum_h z_{l,h} @ W_O[l,h])`` (per position, per dimension), which
makes the split linear and exact. ``r_l = a_l - sum_h c_{l,h}`` is the rest: the output bias where there is one,
float rounding otherwise (reported; tested to be below 1e-5 of the total). Because every term is read from the
same forward pass, ``sum of components = h_L`` holds to float precision, and so does the split of a difference
``h_L(few) - h_L(zero)`` term by term (:func:`difference_attribution`).

Each component's difference is projected on the **shared direction** ``u`` (the uncentred first component of all
tasks' per-sample differences at ``L``, as :mod:`castlens.analysis` computes it) and on each task's
**remainder** ``(v_T - (v_T . u) u) / ||...||`` (:func:`split_shared`); the same for the controls (filler
demonstrations of the same length, shuffled labels), so a head that writes "the prompt is longer" is told apart
from one that writes "there are demonstrations".

**Causal effect (patching).** Head ``(l, h)``'s mean few-shot ``z`` at the last token is patched into zero-shot
runs of the same (or another) task (:func:`~castlens.steering.head_patching`); the effect is the shift of
``h_L`` along ``u`` and the change of the gold answer's log-probability (normalised over the options) and of
accuracy (Todd et al. 2024's causal indirect effect, with the mean over task prompts). A patch at the last token
changes only the last position, so :mod:`castlens.reuse` runs each zero-shot body once and one token per head
per query; ``hook_z`` fires on the sdpa path, so no eager attention is needed.

**Function vector.** The sum of the top-``k`` heads' mean few-shot writes ``sum_{(l,h) in top k} mean_i
c_{l,h}(few_i)`` (Todd et al. 2024), added to the residual like any steering vector.

**Logit lens.** A direction ``v`` decoded through the final norm and the unembedding: the tokens it promotes
and suppresses most, ``W_U norm(v)`` (:func:`logit_lens`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from castlens.activations import last_token_values
from castlens.models import tokenizer_of
from castlens.reuse import UNSTEERED, Setting, prefix_option_logprobs, settings_last_token_resid
from castlens.steering import HEAD_HOOK

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["Contributions", "component_contributions", "difference_attribution", "project", "split_shared",
           "head_writes", "PatchEffects", "patch_effects", "function_vector", "top_heads", "Decoded", "logit_lens",
           "head_label", "parse_head"]

Prompts = Sequence[str] | Sequence[Sequence[int]]
_HEAD = re.compile(r"L(\d+)H(\d+)")


def head_label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def parse_head(label: str) -> tuple[int, int] | None:
    """``(layer, head)`` of a head label ``"L{l}H{h}"``; ``None`` for the other components."""
    m = _HEAD.fullmatch(label)
    return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass(frozen=True)
class Contributions:
    """What each component wrote into ``blocks.{layer}.hook_resid_post`` at the last token, per prompt.

    ``labels[c]``: ``"embed"``, ``"L{l}H{h}"`` (head ``h`` of layer ``l``), ``"L{l} attn rest"`` (output bias or
    rounding), ``"L{l} mlp"``. ``z``: each head's ``hook_z`` at the last token (for patching means)."""

    labels: tuple[str, ...]
    layer: int
    n_heads: int
    values: Float[Tensor, "prompt component d_model"]
    z: Float[Tensor, "prompt layer head d_head"]

    def total(self) -> Float[Tensor, "prompt d_model"]:
        return self.values.sum(dim=1)

    def heads(self) -> list[int]:
        """Indices of the head components, in (layer, head) order."""
        return [i for i, x in enumerate(self.labels) if parse_head(x) is not None]

    def head_grid(self, scores: Float[Tensor, " component"]) -> Float[Tensor, "layer head"]:
        """The head entries of a per-component score as a layer x head grid (ready for a heatmap)."""
        return scores[self.heads()].reshape(self.layer + 1, self.n_heads)


def _post_attention_gain(model: TransformerBridge, layer: int) -> tuple[Tensor, float] | None:
    """``(gain, eps)`` of the RMSNorm between attention and the residual, if the block has one (Gemma 2/3)."""
    block = model.blocks[layer].original_component
    if not hasattr(block, "pre_feedforward_layernorm"):  # Llama-style: post_attention_layernorm is the MLP's input
        return None
    norm = getattr(block.post_attention_layernorm, "original_component", block.post_attention_layernorm)
    w = norm.weight.detach().float().cpu()
    gain = 1.0 + w if "Gemma" in type(norm).__name__ else w  # Gemma's RMSNorm scales by (1 + weight)
    return gain, float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))


def component_contributions(model: TransformerBridge, prompts: Prompts, layer: int, batch_size: int = 8,
                            progress: bool | None = None) -> Contributions:
    """Every component's write into ``blocks.{layer}.hook_resid_post`` at each prompt's last token (see the module
    docstring); ``values.sum(1)`` equals that residual. One sdpa forward per batch, stopped after ``layer``."""
    cfg = model.cfg
    if not 0 <= layer < cfg.n_layers:
        raise ValueError(f"layer {layer} out of range: the model has layers 0..{cfg.n_layers - 1}")
    names = ["blocks.0.hook_resid_pre"]
    for li in range(layer + 1):
        names += [f"blocks.{li}.hook_resid_mid", f"blocks.{li}.hook_resid_post", HEAD_HOOK.format(layer=li)]
    got = last_token_values(model, prompts, names, batch_size=batch_size, progress=progress)
    labels = ["embed"]
    parts = [got["blocks.0.hook_resid_pre"][:, None]]
    zs = []
    before = got["blocks.0.hook_resid_pre"]
    for li in range(layer + 1):
        z = got[HEAD_HOOK.format(layer=li)]  # [prompt, head, d_head]
        zs.append(z)
        w_o = model.blocks[li].attn.o.original_component.weight.detach().float().cpu()  # [d_model, head * d_head]
        raw = torch.einsum("phk,mhk->phm", z, w_o.reshape(w_o.shape[0], z.shape[1], z.shape[2]))
        norm = _post_attention_gain(model, li)
        if norm is not None:
            gain, eps = norm
            summed = raw.sum(1)
            raw = raw * (gain / (summed.pow(2).mean(-1, keepdim=True) + eps).sqrt())[:, None]
        mid, post = got[f"blocks.{li}.hook_resid_mid"], got[f"blocks.{li}.hook_resid_post"]
        attn = mid - before
        parts += [raw, (attn - raw.sum(1))[:, None], (post - mid)[:, None]]
        labels += [head_label(li, h) for h in range(z.shape[1])] + [f"L{li} attn rest", f"L{li} mlp"]
        before = post
    return Contributions(tuple(labels), layer, cfg.n_heads, torch.cat(parts, 1), torch.stack(zs, 1))


def difference_attribution(model: TransformerBridge, few_prompts: Prompts, zero_prompts: Prompts, layer: int,
                           batch_size: int = 8) -> tuple[Contributions, Contributions]:
    """:func:`component_contributions` of paired prompts, and the pairwise difference (few minus zero); returns
    ``(difference, few)``: the few-shot side keeps the heads' ``z`` for patching means."""
    if len(few_prompts) != len(zero_prompts):
        raise ValueError(f"{len(few_prompts)} few-shot prompts but {len(zero_prompts)} zero-shot prompts")
    few = component_contributions(model, few_prompts, layer, batch_size)
    zero = component_contributions(model, zero_prompts, layer, batch_size)
    return Contributions(few.labels, layer, few.n_heads, few.values - zero.values, few.z - zero.z), few


def project(contributions: Contributions, direction: Float[Tensor, " d_model"]) -> Float[Tensor, "prompt component"]:
    """Each component's write along the unit vector of ``direction``."""
    d = direction.double() / direction.double().norm().clamp_min(1e-12)
    return (contributions.values.double() @ d).float()


def split_shared(vector: Float[Tensor, "*layer d_model"], direction: Float[Tensor, "*layer d_model"]
                 ) -> tuple[Float[Tensor, "*layer d_model"], Float[Tensor, "*layer d_model"]]:
    """``vector`` = its component along ``direction`` + the remainder orthogonal to it (per layer); the two sum
    back to ``vector``."""
    if vector.shape != direction.shape:
        raise ValueError(f"vector {tuple(vector.shape)} and direction {tuple(direction.shape)} differ in shape")
    u = direction.double() / direction.double().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    shared = (vector.double() * u).sum(-1, keepdim=True) * u
    return shared.to(vector.dtype), (vector.double() - shared).to(vector.dtype)


def head_writes(few: Contributions) -> Float[Tensor, "layer head d_model"]:
    """Each head's mean write over the (few-shot) prompts, the building block of a function vector."""
    return few.values[:, few.heads()].mean(0).reshape(few.layer + 1, few.n_heads, -1)


def top_heads(scores: Float[Tensor, "layer head"], k: int) -> list[tuple[int, int]]:
    """The ``k`` heads with the largest scores, best first."""
    if not 1 <= k <= scores.numel():
        raise ValueError(f"k={k} heads asked for, the grid has {scores.numel()}")
    idx = scores.flatten().argsort(descending=True)[:k]
    return [(int(i) // scores.shape[1], int(i) % scores.shape[1]) for i in idx]


def function_vector(writes: Float[Tensor, "layer head d_model"], heads: Sequence[tuple[int, int]]
                    ) -> Float[Tensor, " d_model"]:
    """Todd et al. (2024): the sum of the chosen heads' mean writes."""
    if not heads:
        raise ValueError("a function vector needs at least one head")
    return torch.stack([writes[layer, head] for layer, head in heads]).sum(0)


@dataclass(frozen=True)
class PatchEffects:
    """Per head (layer x head), the effect of patching its mean ``z`` into zero-shot runs at the last token:
    ``resid_shift``: mean change of ``h_L`` (project it with :meth:`shift`); ``gold_logprob``: mean change of the
    gold option's log-probability normalised over the options; ``accuracy``: change of accuracy (``None`` where
    no options were given); ``base_accuracy``: unpatched accuracy."""

    layer: int
    resid_shift: Float[Tensor, "layer head d_model"] | None
    gold_logprob: Float[Tensor, "layer head"] | None
    accuracy: Float[Tensor, "layer head"] | None
    base_accuracy: float | None
    n_queries: int

    def shift(self, direction: Float[Tensor, " d_model"]) -> Float[Tensor, "layer head"]:
        """The mean change of ``h_L`` along the unit vector of ``direction``."""
        if self.resid_shift is None:
            raise ValueError("these effects were measured without the residual stream (patch_effects layer=None)")
        u = direction.float() / direction.float().norm().clamp_min(1e-12)
        return self.resid_shift @ u

    def summary(self, direction: Float[Tensor, " d_model"]) -> dict:
        """JSON-ready: the grids as nested lists (layer, head), the shift projected on ``direction``."""
        grid = (lambda x: None if x is None else [[round(float(v), 5) for v in row] for row in x])
        return {"layer": self.layer, "n_queries": self.n_queries, "base_accuracy": self.base_accuracy,
                "shift_along_direction": grid(self.shift(direction)), "gold_logprob": grid(self.gold_logprob),
                "accuracy": grid(self.accuracy)}


def patch_effects(model: TransformerBridge, zero_ids: Sequence[Sequence[int]], means: Float[Tensor, "layer head d"],
                  layer: int | None, options: Sequence[Sequence[Sequence[int]]] | None = None,
                  gold: Sequence[int] | None = None, prefix_ids: Sequence[int] = (), batch_size: int = 16
                  ) -> PatchEffects:
    """Patch each head of layers ``0..means.shape[0]-1`` in turn (its mean ``z`` from ``means``) into the
    zero-shot runs ``prefix_ids + zero_ids[i]`` at the last token and measure the effects (:class:`PatchEffects`).
    Cost: each body once, then one token per head per query (twice with options: the residual read stops at
    ``layer``, the scores run to the end). ``layer=None`` measures the answers alone (``resid_shift`` is None)."""
    n_l, n_h = means.shape[:2]
    heads = [(li, h) for li in range(n_l) for h in range(n_h)]
    settings = [UNSTEERED] + [Setting(head_label(li, h), heads=((li, h, means[li, h]),)) for li, h in heads]
    shift = None
    if layer is not None:
        resid = settings_last_token_resid(model, prefix_ids, zero_ids, settings, [layer], batch_size)[:, :, 0]
        shift = (resid[1:] - resid[0]).mean(1).reshape(n_l, n_h, -1)
    elif options is None:
        raise ValueError("patch_effects with layer=None measures the answers: give options and gold")
    lp = acc = base = None
    if options is not None:
        if gold is None or len(gold) != len(zero_ids) or len(options) != len(zero_ids):
            raise ValueError("options and gold need one entry per query")
        scores = prefix_option_logprobs(model, prefix_ids, zero_ids, options, settings, batch_size=batch_size)
        g = torch.tensor(list(gold))
        norm = torch.log_softmax(scores.clamp_min(-1e30), -1)[:, torch.arange(len(g)), g]  # [setting, query]
        right = (scores.argmax(-1) == g).float()
        lp = (norm[1:] - norm[0]).mean(1).reshape(n_l, n_h)
        acc = (right[1:].mean(1) - right[0].mean()).reshape(n_l, n_h)
        base = float(right[0].mean())
    return PatchEffects(n_l - 1 if layer is None else layer, shift, lp, acc, base, len(zero_ids))


@dataclass(frozen=True)
class Decoded:
    """The tokens a direction promotes (largest logits first) and suppresses (smallest first)."""

    name: str
    promoted: list[str]
    suppressed: list[str]


def logit_lens(model: TransformerBridge, directions: dict[str, Float[Tensor, " d_model"]], k: int = 10
               ) -> list[Decoded]:
    """Decode each direction through the final norm and the unembedding: ``W_U norm(v)`` (the norm of a direction
    alone: its gain applied, the scale immaterial to the ranking). Computed one direction at a time, so a large
    vocabulary costs one row of logits each."""
    tok = tokenizer_of(model)
    out = []
    with torch.inference_mode():
        for name, v in directions.items():
            if tuple(v.shape) != (model.cfg.d_model,):
                raise ValueError(f"direction {name!r} has shape {tuple(v.shape)}, need [d_model] = "
                                 f"[{model.cfg.d_model}]")
            x = v.to(next(model.unembed.parameters()).device, next(model.unembed.parameters()).dtype)
            logits = model.unembed(model.ln_final(x[None, None]))[0, 0].float().cpu()
            top = logits.topk(k).indices.tolist()
            bottom = (-logits).topk(k).indices.tolist()
            out.append(Decoded(name, [tok.decode([i]) for i in top], [tok.decode([i]) for i in bottom]))
    return out
