"""Reuse: run a shared prefix once, and steer only the last prompt token, so sweeps cost almost nothing.

Few-shot ICL, cross-task ICL and the few-shot half of vector extraction give many queries the *same*
demonstrations. Every query ``i`` is the token sequence ``prefix + body_i + last_i``; the forward pass is split
along it and the key/value cache carries the attention context from one piece to the next:

1. ``prefix`` (instruction and demonstrations) runs once; its keys and values are kept;
2. each batch of query bodies runs on top of that cache (rows left-padded *between* prefix and body, with explicit
   position ids, so each row sees exactly the positions it would see alone);
3. the last prompt token (plus, for multi-token answers, the answer tokens) runs on top of the body cache once
   per *setting*: unsteered, or steered by ``strength * v[L]`` at the last prompt token (CAST, Sec. 3).

Because steering the last prompt token changes nothing before it, step 3 is all that a new layer, strength or
vector costs: one token per query for single-token answers, instead of the whole prompt. A sweep over layers x
strengths x vector constructions at the last token therefore runs the prompt body once (the "lower layers
once" reuse of the performance issue, taken to its limit: every position except the steered one is shared).

**Late starts.** Multi-token answers (option texts) make step 3 cost every option token per setting. But a
setting hooked from layer ``L`` on (steering at ``blocks.{L}.hook_resid_post``, or a head of layer ``L``
patched) changes nothing below ``L``: the option tokens' residuals entering ``L``, and their keys and values
below it, are the unsteered ones. So one unsteered pass captures ``blocks.{L-1}.hook_resid_post`` of the whole
chunk, and every setting at ``L`` runs only layers ``L..n-1`` from it (the layers below stand aside for that
pass; the decoder's own loop, masks and rotary embeddings run as usual). Measured bit-identical on both embedded
models, 1.7x (SmolLM2) and 1.2x (Gemma 3, whose 262k-way unembedding stays) faster on a staged sweep's layers
(``benchmarks/late_start.py``).

Steering goes through :func:`castlens.steering.steering`, i.e. TransformerLens hooks on
``blocks.{L}.hook_resid_post``; attention runs in its native sdpa form (:func:`residual_stream_only`).

Token sequences are passed as ids. ``prefix + query`` is a concatenation of ids, so a caller comparing against a
plain full-prompt pass must give the plain path the same concatenated ids (tokenizing the joined text can merge
tokens across the boundary differently).

Sliding-window attention (Gemma 2/3, Mistral): a sliding layer lets position ``q`` see keys at positions
``q - window < k <= q`` only. Hugging Face measures that distance in *cache slots*, which equal positions for an
unpadded or edge-padded row, but not here: the padding sits between prefix and body, so a padded row's body is
further from its prefix in slots than in positions. For such models castlens therefore builds the attention masks
itself, from positions (one per layer type: ``full_attention`` and ``sliding_attention``), and its caches keep
every key (no layer drops keys older than the window; the mask hides them). Models without sliding layers get
the 2-d padding mask as before, and Hugging Face builds the same causal mask from it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from castlens.activations import HOOK, StopForward, check_lengths, length_sorted_batches
from castlens.distributed import shows_progress
from castlens.models import input_device, pad_id, residual_stream_only
from castlens.steering import head_patching, steering

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

KV = list[tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class Setting:
    """One way to run the last prompt token: unsteered (``directions=None``), ``strength * directions[layer]``
    added (``mode="add"``, optionally norm-preserving), or ``directions[layer]`` patched in (``mode="replace"``)."""

    name: str
    directions: Tensor | None = None  # [n_layers, d_model]
    layer: int = 0
    strength: float = 1.0
    mode: str = "add"
    norm_preserving: bool = False
    heads: tuple[tuple[int, int, Tensor], ...] = ()  # (layer, head, z [d_head]) patched in: steering.head_patching

    def __post_init__(self) -> None:
        if not math.isfinite(float(self.strength)):
            raise ValueError(f"setting {self.name!r}: strength {self.strength} is not a finite number")

    @property
    def first_layer(self) -> int | None:
        """The lowest layer this setting's hooks touch (``None``: it has none); layers below it of the tokens it
        runs compute the same under every setting."""
        layers = ([self.layer] if self.directions is not None else []) + [lh for lh, _, _ in self.heads]
        return min(layers) if layers else None

    @contextlib.contextmanager
    def applied(self, model: TransformerBridge, positions: Tensor) -> Iterator[None]:
        """This setting's hooks at ``positions`` (one index per row) for the passes inside the block."""
        with contextlib.ExitStack() as stack:
            if self.directions is not None:
                stack.enter_context(steering(model, self.directions, self.layer, self.strength, positions=positions,
                                             norm_preserving=self.norm_preserving, mode=self.mode))
            if self.heads:
                stack.enter_context(head_patching(model, {(lh, h): z for lh, h, z in self.heads}, positions))
            yield


UNSTEERED = Setting("unsteered")


def _text_config(model: TransformerBridge) -> Any:
    config: Any = model.original_model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _layer_types(model: TransformerBridge) -> list[str] | None:
    """The attention type of each layer when the model has sliding-window layers (``None``: it has none, and the
    2-d padding mask is all it needs). Models without ``layer_types`` but with a window slide on every layer."""
    config = _text_config(model)
    types = list(getattr(config, "layer_types", None) or [])
    if types:
        return types if "sliding_attention" in types else None
    if getattr(config, "sliding_window", None) is None:
        return None
    return ["sliding_attention"] * model.cfg.n_layers


def _attention_mask(model: TransformerBridge, mask: Tensor, pos: Tensor) -> Tensor | dict[str, Tensor]:
    """What the forward gets as ``attention_mask``: ``mask`` [row, past + new] (1 = real token) itself, or, for a
    model with sliding-window layers, additive 4-d masks [row, 1, new, past + new] built from positions ``pos``
    [row, new] of the new tokens: one tensor if all layers are alike, else one per layer type (a dict, which
    hybrid models such as Gemma 3 take in place of building their own).

    A key is visible to a query if it is a real token, not later in the row (causal), and, on a sliding layer,
    less than ``window`` positions back. A real token's position is the count of real tokens before it, which is
    how every layout here assigns positions (prefix, left-padded body, right-padded last-token chunk)."""
    device = input_device(model)
    types = _layer_types(model)
    if types is None:
        return mask.to(device)
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise NotImplementedError(f"castlens.reuse: layer types {unknown} of {type(model.original_model).__name__} "
                                  "are not supported (only full and sliding-window attention)")
    mask, pos = mask.to(device), pos.to(device)
    n_past = mask.shape[1] - pos.shape[1]
    key_slot = torch.arange(mask.shape[1], device=device)
    query_slot = n_past + torch.arange(pos.shape[1], device=device)
    key_pos = mask.cumsum(-1) - 1
    visible = mask.bool()[:, None, :] & (key_slot[None, None, :] <= query_slot[None, :, None])  # [row, new, all]
    window = _text_config(model).sliding_window
    dtype = next(model.parameters()).dtype

    def additive(keep: Tensor) -> Tensor:  # finite, not -inf: a row with no visible key stays free of NaN
        return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, torch.finfo(dtype).min)[:, None]

    def build(kind: str) -> Tensor:
        near = pos[:, :, None] - key_pos[:, None, :] < window
        return additive(visible & near if kind == "sliding_attention" else visible)

    kinds = sorted(set(types))
    return build(kinds[0]) if len(kinds) == 1 else {k: build(k) for k in kinds}


def _forward(model: TransformerBridge, ids: Tensor, mask: Tensor, pos: Tensor, kv: KV | DynamicCache | None,
             read: list[tuple[int, int, int]] | None, resid_layers: Sequence[int] = (),
             entering: dict[int, Tensor | None] | None = None, start: int = 0, h0: Tensor | None = None
             ) -> tuple[DynamicCache, Tensor | None, dict[int, Tensor]]:
    """One bridge forward on top of cached keys/values ``kv``; returns the grown cache, the final residual at
    ``read`` = [(row, start, n)] spans (concatenated rows) and the residual at the last column for
    ``resid_layers``. No unembedding is computed here; a pass that only reads ``resid_layers`` stops after the
    deepest of them (its cache is then incomplete and must not be reused).

    ``entering``: each layer ``L >= 1`` it has as a key is set, in place, to the whole residual entering ``L``
    (``blocks.{L-1}.hook_resid_post`` [row, col, d_model], model dtype and device). ``start > 0``: the pass begins
    at layer ``start`` from ``h0``, the residual entering it (captured by an earlier pass of the same ids); layers
    below ``start`` are skipped (:func:`_layers_from`) and their cache layers are left as they are."""
    device = input_device(model)
    if isinstance(kv, DynamicCache):
        cache = kv
        for layer in _layers(cache):
            layer.rewind()
    else:
        cache = DynamicCache(ddp_cache_data=kv) if kv else DynamicCache()
    out: dict = {"resid": {}}
    final = max(resid_layers) if resid_layers and read is None else model.cfg.n_layers - 1
    capture = {x - 1 for x in entering or {}}

    def grab(layer: int):
        def hook(x: Tensor, hook) -> None:
            if entering is not None and layer in capture:
                entering[layer + 1] = x
            if layer in resid_layers:
                out["resid"][layer] = x[:, -1].float().cpu()
            if layer == final and read is not None:
                out["h"] = torch.cat([x[r, s:s + n] for r, s, n in read])
            if layer == final:
                raise StopForward
        return hook

    hooks = [(HOOK.format(layer=layer), grab(layer)) for layer in sorted(set(resid_layers) | capture | {final})]
    mask_arg = _attention_mask(model, mask, pos)
    with model.hooks(fwd_hooks=hooks), _layers_from(model, start) as decoder:
        try:
            if start == 0:
                model(ids.to(device), attention_mask=mask_arg, position_ids=pos.to(device),
                      past_key_values=cache, use_cache=True, return_type=None)
            else:
                assert h0 is not None and decoder is not None  # callers check can_start_late first
                decoder(inputs_embeds=h0, attention_mask=mask_arg, position_ids=pos.to(device),
                        past_key_values=cache, use_cache=True)
        except StopForward:
            pass
    return cache, out.get("h"), out["resid"]


class _Skipped(torch.nn.Module):
    """Stands in for a decoder layer below a late start: hands its input on unchanged and computes nothing."""

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states


def _decoder_layers(model: TransformerBridge) -> tuple[Any, torch.nn.ModuleList] | None:
    """The Hugging Face decoder (the model without its head) and the module list holding the bridge's blocks, or
    ``None`` where this layout is not found (such a model always runs from layer 0)."""
    hf: Any = model.original_model
    decoder = hf.get_decoder() if hasattr(hf, "get_decoder") else None
    blocks = list(getattr(model, "blocks", []))
    layers = getattr(decoder, "layers", None)
    if decoder is None or not isinstance(layers, torch.nn.ModuleList) or len(layers) != len(blocks) or \
            any(a is not b for a, b in zip(layers, blocks)):
        return None
    return decoder, layers


def can_start_late(model: TransformerBridge) -> bool:
    """Whether :mod:`castlens.reuse` can start a pass at a middle layer of ``model`` (Hugging Face decoders whose
    layer list holds the bridge's blocks: Llama, Gemma 3 and most others)."""
    return _decoder_layers(model) is not None


@contextlib.contextmanager
def _layers_from(model: TransformerBridge, start: int) -> Iterator[Any]:
    """Inside the block the decoder's layers below ``start`` are :class:`_Skipped` (the decoder still loops over
    every layer, so per-layer attention types and cache indices stay aligned); yields the decoder (``None`` for
    ``start == 0``, where nothing is swapped)."""
    found = _decoder_layers(model) if start > 0 else None
    if found is None:
        yield None
        return
    decoder, layers = found
    kept = [layers[i] for i in range(start)]
    try:
        for i in range(start):
            layers[i] = _Skipped()
        yield decoder
    finally:
        for i, layer in enumerate(kept):
            layers[i] = layer


class _RewindableLayer(DynamicLayer):
    """A cache layer over a preallocated buffer: new tokens are written after the kept ``base`` tokens, and
    :meth:`rewind` drops them again, so running many settings on top of one cache copies no past keys/values
    (a plain DynamicCache concatenates, i.e. copies the whole past, at every step)."""

    def __init__(self, keys: Tensor, values: Tensor, room: int):
        super().__init__()
        b, h, t, d = keys.shape
        self.base = t
        self.buf_k = keys.new_empty((b, h, t + room, d))
        self.buf_v = values.new_empty((b, h, t + room, values.shape[-1]))
        self.buf_k[:, :, :t] = keys
        self.buf_v[:, :, :t] = values
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.rewind()

    def rewind(self) -> None:
        self.keys, self.values = self.buf_k[:, :, :self.base], self.buf_v[:, :, :self.base]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        assert self.keys is not None  # set by rewind() in __init__
        end = self.keys.shape[-2] + key_states.shape[-2]
        self.buf_k[:, :, end - key_states.shape[-2]:end] = key_states
        self.buf_v[:, :, end - key_states.shape[-2]:end] = value_states
        self.keys, self.values = self.buf_k[:, :, :end], self.buf_v[:, :, :end]
        return self.keys, self.values


def _layers(cache: DynamicCache) -> list[Any]:
    """The cache's layers, untyped: castlens' own (rewindable) layers or transformers' ones, all with keys/values."""
    return list(cache.layers)


def _rewindable(kv: KV, room: int) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = [_RewindableLayer(k, v, room) for k, v in kv]
    return cache


def _kv(cache: DynamicCache) -> KV:
    return [(layer.keys, layer.values) for layer in _layers(cache)]


def _select(kv: KV, rows: Tensor) -> KV:
    return [(k[rows], v[rows]) for k, v in kv]


def prefix_cache(model: TransformerBridge, prefix_ids: Sequence[int]) -> KV | None:
    """Keys and values of ``prefix_ids`` at every layer (``None`` for an empty prefix)."""
    if not prefix_ids:
        return None
    ids = torch.tensor([list(prefix_ids)])
    with torch.inference_mode(), residual_stream_only(model):
        cache, _, _ = _forward(model, ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None], None, None)
    return _kv(cache)


def _layout(model: TransformerBridge, p: int, seqs: list[list[int]]) -> tuple[Tensor, Tensor, Tensor]:
    """Ids, attention mask (over prefix + sequences) and position ids for ``seqs`` placed after a prefix of
    ``p`` tokens, left-padded between prefix and sequence."""
    b, width = len(seqs), max(len(x) for x in seqs)
    ids = torch.full((b, width), pad_id(model), dtype=torch.long)
    smask = torch.zeros((b, width), dtype=torch.long)
    pos = torch.ones((b, width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s)
            smask[i, width - len(s):] = 1
            pos[i, width - len(s):] = torch.arange(p, p + len(s))
    return ids, torch.cat([torch.ones((b, p), dtype=torch.long), smask], 1), pos


def _expand(kv: KV | None, b: int) -> KV | None:
    return [(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in kv] if kv else None


def _body_batch(model: TransformerBridge, prefix_kv: KV | None, p: int, bodies: list[list[int]], room: int):
    """Run the bodies on top of the prefix cache; returns a rewindable cache holding prefix + bodies (with
    ``room`` more positions, or ``None`` if both are empty), the mask over prefix + bodies and each row's next
    position. With a prefix, the bodies' keys and values are written straight into one preallocated buffer."""
    ids, mask, pos = _layout(model, p, bodies)
    nxt = torch.tensor([p + len(s) for s in bodies])
    width = ids.shape[1]
    expanded = _expand(prefix_kv, len(bodies))
    cache = _rewindable(expanded, width + room) if expanded else None
    if width == 0:
        return cache, mask, nxt
    grown, _, _ = _forward(model, ids, mask, pos, cache, None)
    if cache is None:
        return _rewindable(_kv(grown), room), mask, nxt
    for layer in _layers(cache):  # keep the bodies: later passes rewind to here
        layer.base = layer.keys.shape[-2]
    return cache, mask, nxt


def _option_rows(options: Sequence[Sequence[Sequence[int]]]
                 ) -> tuple[list[tuple[int, list[int]]], list[list[tuple[int, list[int]]]]]:
    """Rows of the last-token chunk for a batch, shared between options: a row ``(query b, tokens c)`` runs
    ``[last token] + c``, and position ``t`` of it predicts the ``t``-th token of every option whose tokens minus
    the last are a prefix of ``c``. Single-token labels all share one row; so do " 1".." 5" (a shared space) and
    options like "entailment" = 2 tokens beside one-token "neutral". Returns the rows and, per query, per option,
    (row index, option tokens)."""
    rows: list[tuple[int, list[int]]] = []
    reads = []
    for b, opts in enumerate(options):
        mine: list[int] = []
        where = {}
        for j in sorted(range(len(opts)), key=lambda j: -len(opts[j])):  # longest first: they define rows
            head = list(opts[j][:-1])
            r = next((r for r in mine if rows[r][1][:len(head)] == head), None)
            if r is None:
                rows.append((b, head))
                r = len(rows) - 1
                mine.append(r)
            where[j] = (r, list(opts[j]))
        reads.append([where[j] for j in range(len(opts))])
    return rows, reads


def prefix_option_logprobs(model: TransformerBridge, prefix_ids: Sequence[int], query_ids: Sequence[Sequence[int]],
                           option_ids: Sequence[Sequence[Sequence[int]]], settings: Sequence[Setting] = (UNSTEERED,),
                           batch_size: int = 16, progress: bool | None = None,
                           prefix_kv: KV | None = None, timings: dict | None = None, late_start: bool = True
                           ) -> Float[Tensor, "setting query option"]:
    """``sum_j log P(option token j | prefix, query, option tokens < j)`` under each setting (steering at the
    query's last token), for every query and option; ``-inf`` pads rows with fewer options.

    Equals :func:`castlens.evaluation.option_logprobs` on the concatenated ids ``prefix + query`` (tested to
    1e-4), but runs the prefix once and each query body once for all ``settings``. ``timings``, if given, gets
    the seconds spent on the prefix, the bodies, and each setting's last-token passes (keyed by setting name)."""
    import time

    timings = {} if timings is None else timings
    clock = time.perf_counter
    if len(query_ids) != len(option_ids):
        raise ValueError(f"{len(query_ids)} queries but {len(option_ids)} option lists")
    if not query_ids:
        raise ValueError("no queries given")
    p = len(prefix_ids)
    for i, (q, opts) in enumerate(zip(query_ids, option_ids)):
        if not q:
            raise ValueError(f"query {i} is empty")
        if not opts or any(not o for o in opts):
            raise ValueError(f"query {i} has no options or an option with no tokens")
    check_lengths(model, [list(prefix_ids) + list(q) + max((list(x) for x in o), key=len)
                          for q, o in zip(query_ids, option_ids)])
    for s in settings:
        if s.directions is not None and not 0 <= s.layer < model.cfg.n_layers:
            raise ValueError(f"setting {s.name!r}: layer {s.layer} out of range")
    n_opt = max(len(o) for o in option_ids)
    out = torch.full((len(settings), len(query_ids), n_opt), float("-inf"))
    # Late starts: a setting whose hooks begin at layer L >= 1 runs the chunk from layer L, on the residual an
    # unsteered pass (first: settings without hooks, or one added for them) left entering L.
    late_ok = late_start and can_start_late(model)
    starts = [(s.first_layer or 0) if late_ok else 0 for s in settings]
    late = sorted({x for x in starts if x > 0})
    asked = len(settings)
    if late and all(s.first_layer is not None for s in settings):  # nothing unsteered to capture from: add it
        settings, starts = [*settings, UNSTEERED], [*starts, 0]
        out = torch.cat([out, out[:1].clone()])
    order = sorted(range(len(settings)), key=lambda i: (starts[i] > 0, settings[i].first_layer is not None))
    pad = pad_id(model)
    batches = length_sorted_batches(query_ids, batch_size)
    with torch.inference_mode(), residual_stream_only(model):
        t0 = clock()
        kv0 = prefix_kv if prefix_kv is not None else prefix_cache(model, prefix_ids)
        timings["prefix"] = timings.get("prefix", 0.0) + clock() - t0
        for batch in tqdm(batches, desc="scoring", leave=False,
                          disable=not shows_progress(progress, len(batches))):
            t0 = clock()
            rows, reads = _option_rows([option_ids[q] for q in batch])
            room = max(1 + len(c) for _, c in rows)
            kv, mask, nxt = _body_batch(model, kv0, p, [list(query_ids[q][:-1]) for q in batch], room)
            chunks = [[query_ids[batch[b]][-1]] + c for b, c in rows]
            width = max(len(c) for c in chunks)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            cmask = torch.zeros((len(rows), width), dtype=torch.long)
            src = torch.tensor([b for b, _ in rows])
            for r, c in enumerate(chunks):
                ids[r, :len(c)] = torch.tensor(c)
                cmask[r, :len(c)] = 1
            pos = nxt[src, None] + torch.arange(width)[None]
            full_mask = torch.cat([mask[src], cmask], 1)
            same = len(rows) == len(batch)  # one row per query: the body cache serves as it is
            kv_rows = kv if kv is None or same else _rewindable(_select(_kv(kv), src), width)
            read = [(r, 0, len(c)) for r, c in enumerate(chunks)]
            offsets = torch.tensor([0] + [len(c) for c in chunks]).cumsum(0)
            timings["body"] = timings.get("body", 0.0) + clock() - t0
            base: dict[int, Tensor | None] = {}  # layer -> unsteered residual entering it, at every chunk column
            for si in order:
                s = settings[si]
                t0 = clock()
                start = starts[si]
                capture = bool(late) and s.first_layer is None and not base  # the first pass without hooks
                if capture:
                    base = dict.fromkeys(late)
                with s.applied(model, torch.zeros(len(rows), dtype=torch.long)):
                    _, h, _ = _forward(model, ids, full_mask, pos, kv_rows, read, start=start, h0=base.get(start),
                                       entering=base if capture else None)
                assert h is not None  # read= was given: the final residual at the option positions
                lp = torch.log_softmax(model.unembed(model.ln_final(h[None]))[0].float(), -1).cpu()
                for b, q in enumerate(batch):
                    for j, (r, toks) in enumerate(reads[b]):
                        at = offsets[r] + torch.arange(len(toks))
                        out[si, q, j] = lp[at, torch.tensor(toks)].sum()
                timings[s.name] = timings.get(s.name, 0.0) + clock() - t0
    return out[:asked]


def prefix_last_token_resid(model: TransformerBridge, prefix_ids: Sequence[int], query_ids: Sequence[Sequence[int]],
                            layers: Sequence[int] | None = None, batch_size: int = 16,
                            progress: bool | None = None) -> Float[Tensor, "query layer d_model"]:
    """``blocks.{L}.hook_resid_post`` at the last token of ``prefix + query`` for each query, with the prefix run
    once. Equals :func:`castlens.activations.last_token_resid` on the concatenated ids (tested to 1e-4)."""
    layers = list(range(model.cfg.n_layers)) if layers is None else [int(x) for x in layers]
    if not layers or any(not 0 <= x < model.cfg.n_layers for x in layers):
        raise ValueError(f"layers {layers} out of range for {model.cfg.n_layers} layers")
    if not query_ids or any(not q for q in query_ids):
        raise ValueError("need at least one query and no empty query")
    check_lengths(model, [list(prefix_ids) + list(q) for q in query_ids])
    p = len(prefix_ids)
    out = torch.empty(len(query_ids), len(layers), model.cfg.d_model)
    batches = length_sorted_batches(query_ids, batch_size)
    with torch.inference_mode(), residual_stream_only(model):
        kv0 = prefix_cache(model, prefix_ids)
        for batch in tqdm(batches, desc="activations", leave=False,
                          disable=not shows_progress(progress, len(batches))):
            ids, mask, pos = _layout(model, p, [list(query_ids[q]) for q in batch])
            kv = _expand(kv0, len(batch))
            _, _, resid = _forward(model, ids, mask, pos, kv, None, resid_layers=layers)
            for j, layer in enumerate(layers):
                out[torch.tensor(batch), j] = resid[layer]
    return out


def settings_last_token_resid(model: TransformerBridge, prefix_ids: Sequence[int], query_ids: Sequence[Sequence[int]],
                              settings: Sequence[Setting], layers: Sequence[int], batch_size: int = 16,
                              progress: bool | None = None) -> Float[Tensor, "setting query layer d_model"]:
    """``blocks.{L}.hook_resid_post`` at the last token of ``prefix + query`` under each setting (steering or head
    patching at that token): the prefix once, each query body once, then one token per query per setting, stopped
    after the deepest layer read. Equals :func:`prefix_last_token_resid` inside each setting's hooks (tested)."""
    layers = [int(x) for x in layers]
    if not layers or any(not 0 <= x < model.cfg.n_layers for x in layers):
        raise ValueError(f"layers {layers} out of range for {model.cfg.n_layers} layers")
    if not query_ids or any(not q for q in query_ids):
        raise ValueError("need at least one query and no empty query")
    if not settings:
        raise ValueError("no settings given")
    check_lengths(model, [list(prefix_ids) + list(q) for q in query_ids])
    p = len(prefix_ids)
    out = torch.empty(len(settings), len(query_ids), len(layers), model.cfg.d_model)
    batches = length_sorted_batches(query_ids, batch_size)
    with torch.inference_mode(), residual_stream_only(model):
        kv0 = prefix_cache(model, prefix_ids)
        for batch in tqdm(batches, desc="settings", leave=False, disable=not shows_progress(progress, len(batches))):
            kv, mask, nxt = _body_batch(model, kv0, p, [list(query_ids[q][:-1]) for q in batch], 1)
            ids = torch.tensor([[query_ids[q][-1]] for q in batch])
            full_mask = torch.cat([mask, torch.ones((len(batch), 1), dtype=torch.long)], 1)
            rows = torch.tensor(batch)
            for si, s in enumerate(settings):
                with s.applied(model, torch.zeros(len(batch), dtype=torch.long)):
                    _, _, resid = _forward(model, ids, full_mask, nxt[:, None], kv, None, resid_layers=layers)
                for j, layer in enumerate(layers):
                    out[si, rows, j] = resid[layer]
    return out
