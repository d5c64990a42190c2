"""Direct attribution of a last-token residual difference to model components (issue #16, part 1).

For a pre-norm transformer without output norms (Llama) the residual stream after layer L is a sum:

    h_L = e + sum_{l<=L} ( sum_h z_{l,h} W_O[l,h] + b_O[l] ) + sum_{l<=L} m_l

where e is the embedding (``hook_embed``), z_{l,h} the head's ``attn.hook_z`` at the last position and
W_O[l,h] its [d_head, d_model] slice of the output projection, m_l the MLP output (``hook_mlp_out``).
The difference h_L(few) - h_L(zero) splits term by term.

Status: part 1 only for architectures without post-attention/post-MLP norms; Gemma 3 norm freezing is not
implemented yet (raises NotImplementedError).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor


@dataclass(frozen=True)
class Contributions:
    labels: tuple[str, ...]
    values: Float[Tensor, "prompt component d_model"]

    def total(self) -> Float[Tensor, "prompt d_model"]:
        return self.values.sum(dim=1)


def component_contributions(model, prompts: Sequence[str] | Sequence[Sequence[int]], layer: int) -> Contributions:
    from castlens.activations import token_ids
    if any("post_attention" in n or "ln1_post" in n for n in model.hook_dict):
        raise NotImplementedError("post-attention norms (Gemma 3) are not supported yet")
    cfg = model.cfg
    labels = ["embed"]
    for li in range(layer + 1):
        labels += [f"L{li}H{h}" for h in range(cfg.n_heads)] + [f"L{li} attn bias", f"L{li} mlp"]
    rows = []
    for ids in token_ids(model, prompts):
        names = ["hook_embed"] + [f"blocks.{li}.{k}" for li in range(layer + 1)
                                  for k in ("attn.hook_z", "hook_mlp_out")]
        with torch.no_grad():
            _, cache = model.run_with_cache(torch.tensor([list(ids)]), names_filter=lambda n: n in names)
        parts = [cache["hook_embed"][0, -1]]
        for li in range(layer + 1):
            attn = model.blocks[li].attn
            z = cache[f"blocks.{li}.attn.hook_z"][0, -1]  # [head, d_head]
            parts += list(torch.einsum("hd,hdm->hm", z, attn.W_O))
            b = getattr(attn, "b_O", None)
            parts.append(b if b is not None else torch.zeros_like(parts[0]))
            parts.append(cache[f"blocks.{li}.hook_mlp_out"][0, -1])
        rows.append(torch.stack([p.to(parts[0].dtype) for p in parts]))
    return Contributions(tuple(labels), torch.stack(rows))


def difference_attribution(model, few_prompts, zero_prompts, layer: int) -> Contributions:
    few = component_contributions(model, few_prompts, layer)
    zero = component_contributions(model, zero_prompts, layer)
    return Contributions(few.labels, few.values - zero.values)


def project(contributions: Contributions, direction: Float[Tensor, " d_model"]) -> Float[Tensor, "prompt component"]:
    d = direction / direction.norm()
    return contributions.values @ d.to(contributions.values.dtype)
