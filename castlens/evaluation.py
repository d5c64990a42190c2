"""Evaluation: score each answer option by the log-probability of its full verbalisation.

For a prompt ``x`` and options ``y_1..y_m`` (labels, letters or option texts), each a sequence of tokens
``t_1..t_T`` of ``sep + y``::

    score(y | x) = sum_{j=1..T} log P(t_j | x, t_<j)          # every token of a multi-token label counts

the prediction is the argmax over options (with ``normalize="chars"``, the score divided by the option's
character count, as lm-evaluation-harness's acc_norm). Prompt and continuation are tokenized separately and
concatenated, so the prompt's tokens are identical across options. Works inside :func:`castlens.steering.steering`
(hooks on the residual stream fire on every scoring pass); there ``positions="last"`` means each row's last
*prompt* token (told to the steering hooks through :func:`castlens.activations.prompt_ends`), not the last
option token or, in a right-padded batch, a padding position.

Logits are computed only where they are read: the final residual stream is captured at the option positions,
the forward stops there, and the model's own final norm and unembedding (``ln_final``, ``unembed``) are applied
to those rows alone, instead of a 49,152-way unembedding at every position.
"""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from castlens.activations import (
    HOOK,
    StopForward,
    check_lengths,
    length_sorted_batches,
    pad_batch,
    prompt_ends,
    token_ids,
)
from castlens.distributed import shows_progress
from castlens.models import input_device, pad_id, residual_stream_only, tokenizer_of


def option_logprobs(model, prompts: Sequence[str] | Sequence[Sequence[int]], options: Sequence[Sequence[str]],
                    sep: str = " ",
                    batch_size: int = 16, chat: bool = False, progress: bool | None = None, task: str | None = None
                    ) -> Float[Tensor, "prompt option"]:
    """Summed log-probability of ``sep + option`` after each prompt (text, or token ids); ``-inf`` pads rows with
    fewer options. A prompt that does not fit the model's context with its longest option raises
    :class:`castlens.activations.PromptTooLongError` (naming ``task`` if given)."""
    if len(prompts) != len(options):
        raise ValueError(f"{len(prompts)} prompts but {len(options)} option lists")
    if not prompts:
        raise ValueError("no prompts given")
    tok = tokenizer_of(model)
    p_ids = token_ids(model, prompts, chat)
    rows: list[list[int]] = []  # one row per (prompt, option)
    where: list[tuple[int, int, int, int]] = []  # (prompt, option, prompt length, option length) per row
    longest: list[list[int]] = []  # each prompt with its longest option: what must fit the context
    for i, (prompt, opts) in enumerate(zip(p_ids, options)):
        if not prompt:
            raise ValueError(f"prompt {i} is empty after tokenization")
        if not opts:
            raise ValueError(f"prompt {i} has no options")
        for j, opt in enumerate(opts):
            cont = tok(sep + opt, add_special_tokens=False)["input_ids"]
            if not cont:
                raise ValueError(f"prompt {i}, option {j} ({opt!r}) tokenizes to nothing")
            rows.append(prompt + cont)
            where.append((i, j, len(prompt), len(cont)))
        longest.append(max((rows[-k] for k in range(1, len(opts) + 1)), key=len))
    check_lengths(model, longest, task=task)
    out = torch.full((len(prompts), max(len(o) for o in options)), float("-inf"))
    pad = pad_id(model)
    batches = length_sorted_batches(rows, batch_size)
    device = input_device(model)
    final = HOOK.format(layer=model.cfg.n_layers - 1)
    state: dict = {}

    def capture(x: Tensor, hook) -> None:  # the final residual at the positions that predict option tokens
        state["h"] = [x[b, s - 1:s + n - 1] for b, (s, n) in enumerate(state["spans"])]
        raise StopForward

    with torch.inference_mode(), residual_stream_only(model), model.hooks(fwd_hooks=[(final, capture)]):
        for batch in tqdm(batches, desc="scoring", disable=not shows_progress(progress, len(batches)),
                          leave=False):
            ids, mask, _ = pad_batch([rows[r] for r in batch], pad, "right")
            state["spans"] = [(where[r][2], where[r][3]) for r in batch]
            ends = torch.tensor([where[r][2] - 1 for r in batch], device=device)  # each row's last prompt token
            try:
                with prompt_ends(ends):
                    model(ids.to(device), attention_mask=mask.to(device), return_type=None)
            except StopForward:
                pass
            logits = model.unembed(model.ln_final(torch.cat(state["h"])[None]))[0].float()
            lp_all = torch.log_softmax(logits, dim=-1)
            offset = 0
            for b, r in enumerate(batch):
                i, j, start, n = where[r]
                lp = lp_all[offset:offset + n]
                offset += n
                out[i, j] = lp.gather(-1, ids[b, start:start + n, None].to(lp.device)).sum().cpu()
    return out


def predict(scores: Float[Tensor, "prompt option"], options: Sequence[Sequence[str]] | None = None,
            normalize: str | None = None) -> Tensor:
    """Index of the best option per prompt; ``normalize="chars"`` divides by each option's length first."""
    if normalize == "chars":
        if options is None:
            raise ValueError("normalize='chars' needs the options")
        lengths = torch.full_like(scores, 1.0)
        for i, opts in enumerate(options):
            lengths[i, : len(opts)] = torch.tensor([max(1, len(o)) for o in opts], dtype=scores.dtype)
        scores = scores / lengths
    elif normalize is not None:
        raise ValueError(f"normalize must be None or 'chars', got {normalize!r}")
    return scores.argmax(-1)


def accuracy_and_macro_f1(pred: Sequence[int], gold: Sequence[int]) -> tuple[float, float]:
    """Accuracy and macro-F1 over the classes that occur in ``gold`` or ``pred``."""
    from sklearn.metrics import accuracy_score, f1_score

    pred, gold = [int(p) for p in pred], [int(g) for g in gold]
    if len(pred) != len(gold) or not gold:
        raise ValueError(f"need equally many predictions and gold labels, got {len(pred)} and {len(gold)}")
    return float(accuracy_score(gold, pred)), float(f1_score(gold, pred, average="macro", zero_division=0))
