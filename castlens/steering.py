"""Steering: add ``strength * v[L]`` to the residual stream at chosen layers and positions.

CAST (arXiv 2507.13236, Sec. 3) injects the averaged contrastive vector into the target task's forward pass at a
middle layer::

    h_L[p]  <-  h_L[p] + lambda * v[L]                      for L in layers, p in positions

and the ICV paper's norm-preserving variant rescales the result to the original norm::

    h_L[p]  <-  (h_L[p] + lambda v[L]) * ||h_L[p]|| / ||h_L[p] + lambda v[L]||

``mode="replace"`` patches instead (Hendel et al. 2023's task vectors): ``h_L[p] <- v[L]``.

The hooks sit on ``blocks.{L}.hook_resid_post`` and exist only inside :func:`steering` (removed on exit, also on
an error). ``positions`` selects tokens:

* ``"all"``: every position of every forward pass (so with a KV cache each newly generated token is steered too);
* ``"last"``: the last token of each row's *prompt*. castlens' own loops know where that is and say so through
  :func:`castlens.activations.prompt_ends`: :func:`castlens.evaluation.option_logprobs` (the token before the
  option, not the last option token), :func:`castlens.activations.last_token_resid` and
  :func:`~castlens.activations.mean_resid` (each row's last real token under padding) and :func:`generate`. A
  plain ``model(ids)`` of one row steers its last position; a plain batch of several rows is refused (its last
  column is padding for the shorter rows), with the advice to pass a positions tensor;
* an integer tensor ``[batch]`` of per-row indices (e.g. the last real token under right padding).

Attention runs in its fast native sdpa form (:func:`castlens.models.residual_stream_only`) for every forward pass
in which only residual-stream hooks (``blocks.{L}.hook_resid_*``) are registered, the steering hooks among them;
a pass with any other hook registered (``hook_pattern``, ``hook_attn_out``, ``run_with_cache`` of everything,
...) runs on the bridge's eager attention so that those hooks fire. ``attention="eager"`` keeps eager attention
for every pass, ``attention="sdpa"`` forces sdpa (attention-internal hooks then do not fire). Inside an
enclosing :func:`~castlens.models.residual_stream_only` (castlens' scoring, activation, reuse and generation
loops enter it) the attention path is already chosen and steering leaves it alone. Both paths give the same
steered outputs (to float rounding; tested).

Everything is checked before the first forward pass: the vector's shape and values, the layers (``0..n_layers-1``),
a finite strength, the mode and the positions.

For generation, :func:`generate` decodes greedily with a KV cache and applies the vector at the positions
chosen: ``"last"`` steers the prompt's last token only (generated tokens see the vector through attention to
its cached keys and values), ``"all"`` also every generated token.
"""

from __future__ import annotations

import contextlib
import math
import operator
import re
import weakref
from typing import Any, Iterator, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from castlens.activations import HOOK, check_lengths, current_prompt_ends, prompt_ends
from castlens.vectors import SteeringVector

ATTENTION = ("auto", "sdpa", "eager")
_RESID_HOOK = re.compile(r"blocks\.\d+\.hook_resid_(pre|mid|post)")


# ---------------------------------------------------------------- checks (all before any forward pass)
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


def _layers(model, layers: int | Sequence[int]) -> list[int]:
    """``layers`` as a list of ints, each in ``0..n_layers-1``."""
    n = model.cfg.n_layers
    raw: list[Any] = [layers]
    if isinstance(layers, Sequence) and not isinstance(layers, str) or \
            isinstance(layers, Tensor) and layers.ndim == 1:
        raw = list(layers)
    try:
        out = [operator.index(x) for x in raw]
    except TypeError:
        raise ValueError(f"steering layers must be integers in 0..{n - 1}, got {layers!r}") from None
    bad = [x for x in out if not 0 <= x < n]
    if bad or not out:
        raise ValueError(f"steering layers {bad or out} out of range: layers must be in 0..{n - 1} "
                         f"(the model has {n} layers)")
    return out


def _strength(strength: float) -> float:
    """``strength`` as a finite float (NaN or inf would make every steered activation non-finite)."""
    try:
        value = float(strength)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"strength must be a finite number, got {strength!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"strength must be a finite number, got {value} (it would make every steered "
                         "activation non-finite)")
    return value


def _positions(positions: str | Tensor) -> tuple[str | Tensor, int]:
    """``positions`` checked, and the largest index of a positions tensor (-1 for "all"/"last")."""
    if isinstance(positions, str):
        if positions not in ("all", "last"):
            raise ValueError(f"positions must be 'all', 'last' or a tensor of indices, got {positions!r}")
        return positions, -1
    if not isinstance(positions, Tensor) or positions.ndim != 1 or positions.dtype.is_floating_point \
            or positions.dtype.is_complex or positions.dtype == torch.bool:
        what = f"a {positions.dtype} tensor of shape {tuple(positions.shape)}" if isinstance(positions, Tensor) \
            else repr(positions)
        raise ValueError(f"positions must be 'all', 'last' or a 1-D integer tensor [batch] of indices, got {what}")
    if positions.numel() == 0:
        raise ValueError("positions tensor is empty; it needs one index per row of the batch")
    if int(positions.min()) < 0:
        raise ValueError(f"positions must be non-negative indices, got {positions.tolist()}")
    return positions, int(positions.max())


# ---------------------------------------------------------------- where "last" is, per forward pass
def _last_index(x: Tensor) -> Tensor | None:
    """Each row's prompt-last index for this forward pass, or ``None`` for "the last position" (one row)."""
    ends = current_prompt_ends()
    if ends is not None:
        if tuple(ends.shape) != (x.shape[0],):
            raise ValueError(f"steering(positions='last'): prompt_ends gave {ends.shape[0]} indices for a "
                             f"forward pass of {x.shape[0]} rows")
        return ends
    if x.shape[0] == 1:
        return None
    raise ValueError(
        f"steering(positions='last') in a forward pass of {x.shape[0]} rows with no prompt ends registered: "
        "castlens cannot tell where each row's prompt ends (the last column is padding for shorter rows). Pass "
        "positions=<integer tensor [batch] of each row's last prompt-token index> (the third value of "
        "castlens.activations.pad_batch), wrap the call in castlens.activations.prompt_ends(indices), or use "
        "option_logprobs / last_token_resid / mean_resid / generate, which register them")


def _checked_selection(x: Tensor, positions: str | Tensor, largest: int) -> tuple:
    """:func:`_selection`, after refusing a positions index past the end of this forward pass."""
    if largest >= x.shape[1]:
        raise ValueError(f"positions index {largest} is past the end of a forward pass of {x.shape[1]} positions")
    return _selection(x, positions)


def _selection(x: Tensor, positions: str | Tensor) -> tuple:
    """The index into ``x`` [batch, pos, d_model] of the positions to steer."""
    if isinstance(positions, str) and positions == "all":
        return slice(None), slice(None)
    rows = torch.arange(x.shape[0], device=x.device)
    if isinstance(positions, str):
        last = _last_index(x)
        if last is None:
            return slice(None), slice(x.shape[1] - 1, x.shape[1])
        return rows, last.to(x.device)
    if positions.shape != (x.shape[0],):
        raise ValueError(f"positions tensor has shape {tuple(positions.shape)}, expected [batch] = [{x.shape[0]}]")
    return rows, positions.to(x.device)


# ---------------------------------------------------------------- sdpa unless a hook needs eager attention
_WATCHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its non-residual hook points


def _eager_only_hook_points(model) -> list:
    """The model's hook points other than ``blocks.{L}.hook_resid_*`` (each once, aliases included): a hook on
    one of these may sit inside attention, which fires only on the bridge's eager attention. Cached per model
    (the hook points of a bridge are fixed when it is built)."""
    try:
        return _WATCHED[model]
    except (KeyError, TypeError):
        pass
    hook_dict = getattr(model, "hook_dict", {})
    resid = {id(hp) for name, hp in hook_dict.items() if _RESID_HOOK.fullmatch(name)}
    points = list({id(hp): hp for hp in hook_dict.values() if id(hp) not in resid}.values())
    with contextlib.suppress(TypeError):
        _WATCHED[model] = points
    return points


def _any_hooked(points: list) -> bool:
    return any(hp._forward_hooks or hp._backward_hooks or hp._forward_pre_hooks for hp in points)


def _native_attention_active(model) -> bool:
    """True inside :func:`castlens.models.residual_stream_only` (no block runs the bridge's attention module):
    the enclosing code (``option_logprobs``, ``castlens.reuse``, ``generate`` ...) has chosen the attention path
    already, and steering leaves it as it is."""
    blocks = list(getattr(model, "blocks", []))
    return all(getattr(getattr(getattr(b, "original_component", None), "self_attn", None), "original_component",
                       None) is None for b in blocks)


@contextlib.contextmanager
def _attention_choice(model, attention: str) -> Iterator[None]:
    """Run attention as sdpa in every forward pass whose registered hooks allow it (see the module docstring).

    The choice is made on entry and again before each forward pass (a pre-hook on the embedding), so hooks added
    inside the context, e.g. by ``run_with_cache``, get eager attention for exactly the passes they are in.
    Inside an enclosing :func:`castlens.models.residual_stream_only` nothing is changed."""
    if attention == "eager" or _native_attention_active(model):
        yield
        return
    from castlens.models import residual_stream_only

    watch = [] if attention == "sdpa" else _eager_only_hook_points(model)
    state: dict = {"stack": None}

    def choose(*_) -> None:
        fast = not _any_hooked(watch)
        if fast and state["stack"] is None:
            stack = contextlib.ExitStack()
            stack.enter_context(residual_stream_only(model))
            state["stack"] = stack
        elif not fast and state["stack"] is not None:
            state["stack"].close()
            state["stack"] = None

    choose()
    embed = getattr(model, "embed", None)
    handle = embed.register_forward_pre_hook(choose) if isinstance(embed, torch.nn.Module) else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
        if state["stack"] is not None:
            state["stack"].close()


# ---------------------------------------------------------------- steering
@contextlib.contextmanager
def steering(model, vector: SteeringVector | Float[Tensor, "layer d_model"], layers: int | Sequence[int],
             strength: float = 1.0, positions: str | Int[Tensor, " batch"] = "all",
             norm_preserving: bool = False, mode: str = "add", attention: str = "auto") -> Iterator[None]:
    """Inside this context every forward pass of ``model`` is steered by ``strength * vector[L]`` at ``layers``
    (``mode="add"``), or has ``vector[L]`` patched in at the chosen positions (``mode="replace"``).

    ``positions``: ``"all"``, ``"last"`` (each row's last prompt token; see the module docstring for where
    castlens knows it and where it refuses) or an integer tensor ``[batch]``. ``attention``: ``"auto"`` (sdpa
    for each pass with only ``blocks.{L}.hook_resid_*`` hooks, eager when any other hook is registered),
    ``"eager"`` (always the bridge's eager attention, unless the caller is inside
    :func:`~castlens.models.residual_stream_only`) or ``"sdpa"`` (always sdpa; attention-internal hooks then do
    not fire). Bad arguments raise ``ValueError`` on entry, before any forward pass."""
    directions = _directions(model, vector)
    layers = _layers(model, layers)
    strength = _strength(strength)
    if mode not in ("add", "replace"):
        raise ValueError(f"mode must be 'add' or 'replace', got {mode!r}")
    positions, largest = _positions(positions)
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")

    def make_hook(layer: int):
        def hook(x: Tensor, hook) -> Tensor:
            sel = _checked_selection(x, positions, largest)
            x = x.clone()
            v = directions[layer].to(x.device, torch.float32)  # this layer's device: layers may live on several
            if mode == "replace":
                x[sel] = v.to(x.dtype)
                return x
            # In float32, rounded once to the residual's dtype: in bfloat16 the vector would be rounded before the
            # addition and the norms of norm_preserving would keep 3 significant digits.
            h = x[sel].float()
            new = h + strength * v
            if norm_preserving:
                new = new * (h.norm(dim=-1, keepdim=True) / new.norm(dim=-1, keepdim=True).clamp_min(1e-12))
            x[sel] = new.to(x.dtype)
            return x
        return hook

    with model.hooks(fwd_hooks=[(HOOK.format(layer=layer), make_hook(layer)) for layer in layers]), \
            _attention_choice(model, attention):
        yield


# ---------------------------------------------------------------- patching attention heads
HEAD_HOOK = "blocks.{layer}.attn.hook_z"


@contextlib.contextmanager
def head_patching(model, values: Mapping[tuple[int, int], Float[Tensor, " d_head"]],
                  positions: str | Int[Tensor, " batch"] = "last") -> Iterator[None]:
    """Inside this context head ``h`` of layer ``l`` outputs ``values[(l, h)]`` at ``positions`` instead of what
    it computed: its ``z`` (the attention-weighted values, ``blocks.{l}.attn.hook_z`` [batch, pos, head, d_head])
    is replaced before the output projection, so the head then writes ``values[(l, h)] @ W_O[l, h]`` (through any
    norm after attention) and every later layer sees the result. This is activation patching of one head
    (Wang et al. 2022; Todd et al. 2024 patch a head's mean output on task prompts into other runs).

    ``hook_z`` is the input hook of the bridge's output projection, so it fires on the sdpa fast path as well as
    on the eager one and patching does not need eager attention (tested equal). ``positions`` as for
    :func:`steering`. Bad arguments raise ``ValueError`` on entry."""
    cfg = model.cfg
    checked: dict[int, list[tuple[int, Tensor]]] = {}
    for key, v in values.items():
        layer, head = (operator.index(k) for k in key)
        if not 0 <= layer < cfg.n_layers or not 0 <= head < cfg.n_heads:
            raise ValueError(f"head ({layer}, {head}) out of range: layers 0..{cfg.n_layers - 1}, heads "
                             f"0..{cfg.n_heads - 1}")
        v = torch.as_tensor(v)
        if tuple(v.shape) != (cfg.d_head,) or not torch.isfinite(v).all():
            raise ValueError(f"head ({layer}, {head}): value of shape {tuple(v.shape)}; need finite [d_head] = "
                             f"[{cfg.d_head}]")
        checked.setdefault(layer, []).append((head, v))
    if not checked:
        raise ValueError("no heads to patch")
    positions, largest = _positions(positions)

    def make_hook(patches: list[tuple[int, Tensor]]):
        def hook(z: Tensor, hook) -> Tensor:
            sel = _checked_selection(z, positions, largest)
            z = z.clone()
            for head, v in patches:
                z[(*sel, head)] = v.to(z.device, z.dtype)
            return z
        return hook

    with model.hooks(fwd_hooks=[(HEAD_HOOK.format(layer=layer), make_hook(p)) for layer, p in checked.items()]):
        yield


# ---------------------------------------------------------------- generation
def _prompt_list(model, prompt_ids) -> list[int]:
    """``prompt_ids`` (a list of ids, a 1-D tensor, or one row: a ``[1, T]`` tensor or ``[[...]]``) as a list of
    ints, each a token id of the model's vocabulary."""
    if isinstance(prompt_ids, str):
        raise ValueError("generate needs token ids, not text: tokenize it first "
                         "(castlens.activations.tokenize(model, [text])[0])")
    if not isinstance(prompt_ids, Tensor):
        rows = list(prompt_ids)
        if rows and all(isinstance(r, (list, tuple, Tensor)) for r in rows):  # nested: a batch of rows
            if len(rows) != 1:
                raise ValueError(f"generate decodes one prompt; got a batch of {len(rows)} rows (call it once "
                                 "per prompt)")
            return _prompt_list(model, rows[0])
        try:
            ids = [operator.index(t) for t in rows]
        except TypeError:
            raise ValueError(f"prompt_ids must be integer token ids, got {rows[:8]!r}...") from None
    else:
        if prompt_ids.dtype.is_floating_point or prompt_ids.dtype.is_complex or prompt_ids.dtype == torch.bool:
            raise ValueError(f"prompt_ids must hold integer token ids, got a {prompt_ids.dtype} tensor")
        if prompt_ids.ndim == 2 and prompt_ids.shape[0] != 1:
            raise ValueError(f"generate decodes one prompt; got a batch of {prompt_ids.shape[0]} rows (shape "
                             f"{list(prompt_ids.shape)}; call it once per row)")
        if prompt_ids.ndim not in (1, 2):
            raise ValueError(f"prompt_ids must be [pos] or [1, pos], got shape {list(prompt_ids.shape)}")
        ids = [int(t) for t in prompt_ids.reshape(-1).tolist()]
    if not ids:
        raise ValueError("empty prompt")
    vocab = model.cfg.d_vocab
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt_ids {bad[:8]} are not token ids of this model (0..{vocab - 1})")
    return ids


def generate(model, prompt_ids: Sequence[int] | Int[Tensor, " pos"] | Int[Tensor, "1 pos"], max_new_tokens: int,
             vector: SteeringVector | Float[Tensor, "layer d_model"] | None = None, layers: int | Sequence[int] = 0,
             strength: float = 1.0, positions: str = "last", norm_preserving: bool = False, mode: str = "add"
             ) -> list[int]:
    """Greedy decoding with a key/value cache, steered by ``vector`` (``None``: unsteered).

    ``prompt_ids``: one prompt's token ids, as a list, a 1-D tensor or a ``[1, T]`` tensor (a batch of more rows
    is refused). ``positions="last"`` steers only the prompt's last token: generated tokens are not steered
    themselves and see the vector only through attention to that position's cached keys and values.
    ``positions="all"`` steers every prompt token and every generated token. Every argument is checked before
    the first forward pass. Returns the ``max_new_tokens`` new token ids."""
    from transformers import DynamicCache

    from castlens.models import input_device, residual_stream_only

    if positions not in ("all", "last"):
        raise ValueError(f"positions must be 'all' or 'last' for generation, got {positions!r}")
    try:
        max_new_tokens = operator.index(max_new_tokens)
    except TypeError:
        raise ValueError(f"max_new_tokens must be an integer, got {max_new_tokens!r}") from None
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be 0 or more, got {max_new_tokens}")
    ids_list = _prompt_list(model, prompt_ids)
    check_lengths(model, [ids_list])
    if vector is not None:  # the same checks steering() makes, before the first forward pass
        vector, layers, strength = _directions(model, vector), _layers(model, layers), _strength(strength)
        if mode not in ("add", "replace"):
            raise ValueError(f"mode must be 'add' or 'replace', got {mode!r}")
    if max_new_tokens == 0:
        return []
    device = input_device(model)
    cache, ids, new = DynamicCache(), torch.tensor([ids_list], device=device), []
    last = torch.tensor([len(ids_list) - 1], device=device)

    def step(x: Tensor, steer: bool, ends: Tensor | None = None) -> int:
        with contextlib.ExitStack() as ctx:
            if steer and vector is not None:
                ctx.enter_context(steering(model, vector, layers, strength, positions, norm_preserving, mode))
            if ends is not None:
                ctx.enter_context(prompt_ends(ends))
            logits = model(x, past_key_values=cache, use_cache=True, return_type="logits")
        return int(logits[0, -1].argmax())

    with torch.inference_mode(), residual_stream_only(model):
        tok = step(ids, True, last)  # the prompt: "last" steers its last token, "all" every position
        for _ in range(max_new_tokens):
            new.append(tok)
            if len(new) == max_new_tokens:
                break
            tok = step(torch.tensor([[tok]], device=device), positions == "all")
    return new
