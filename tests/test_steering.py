import functools

import pytest
import torch

from castlens.activations import last_token_resid, pad_batch, tokenize
from castlens.models import load_hf, load_model, model_name, residual_stream_only
from castlens.steering import steering
from castlens.vectors import SteeringVector, VectorFileError

PROMPTS = ["Give the opposite of the word.\n\nhot\nAnswer:", "a b c d e f g h"]

# ---------------------------------------------------------------- one test, float32 and bfloat16
# Two computations of the same numbers (batched and one by one, sdpa and a plain transformers forward, a KV cache
# and a full pass) agree when |got - want| <= atol + rtol * max|want|, per dtype:
# * float32: 1e-4 absolute. Float32 keeps 7 significant digits; reordered sums differ by about 1e-6.
# * bfloat16: 4 units in the last place of the largest value compared (rtol 2^-5). bfloat16 keeps 8 significant
#   bits (about 3 digits), and each matmul, norm and layer rounds its output again, so two computations that round
#   at different points differ by a few units of the largest value's last place, and smaller entries inherit that
#   absolute error (a relative bound per entry would fail on them). Measured on the tiny models: at most 2.3 units
#   (0.07 on last-token residuals of magnitude 7.3, tiny-gemma3; 0.04 on option log-probabilities of 25).
# Greedy tokens: exactly the reference's argmax in float32. In bfloat16 a near-tie can go either way, so each
# chosen token's reference logit must be within the tolerance of the reference's largest logit (every step of the
# reference is conditioned on the tokens generated, so one flip at a tie cannot cascade into a false failure).
DTYPES = (torch.float32, torch.bfloat16)
TOLERANCE = {torch.float32: (1e-4, 0.0), torch.bfloat16: (1e-4, 2 ** -5)}


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: object = "") -> None:
    """``got`` equals the independent ``want`` within the tolerance of ``dtype`` (see TOLERANCE)."""
    atol, rtol = TOLERANCE[dtype]
    got, want = got.detach().float(), want.detach().float()
    assert got.shape == want.shape, what
    err, bound = float((got - want).abs().max()), atol + rtol * float(want.abs().max())
    assert err <= bound, f"{what}: max difference {err:.3g} > {bound:.3g} ({dtype})"


def assert_greedy(new: list[int], logits: torch.Tensor, dtype: torch.dtype) -> None:
    """``new`` is what greedy decoding picks from ``logits`` [step, vocab] of an independent full forward."""
    if dtype == torch.float32:
        assert logits.argmax(-1).tolist() == new
        return
    logits = logits.float()
    chosen = logits[torch.arange(len(new)), torch.tensor(new)]
    atol, rtol = TOLERANCE[dtype]
    assert float((logits.max(-1).values - chosen).max()) <= atol + rtol * float(logits.abs().max()), new


@functools.cache
def _loaded(name: str, dtype: torch.dtype):
    return load_model(name, device="cpu", dtype=dtype)


def tiny_model(request, name: str, dtype: torch.dtype):
    """The random test model ``name`` in ``dtype``: the session's own bridge in float32, another loaded once."""
    if dtype == torch.float32:
        return request.getfixturevalue("tiny" if name == "tiny-llama" else "tiny_gemma3")
    return _loaded(name, dtype)


def plain_ref(model):
    """Independent reference: the plain transformers model behind a tiny bridge, in the bridge's dtype."""
    return load_hf(model_name(model), dtype=model.cfg.dtype)[0]


def short(value: object) -> str:
    """A test id: ``bfloat16`` for ``torch.bfloat16``, names as they are."""
    return str(value).removeprefix("torch.")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_a_bfloat16_test_model_is_what_from_pretrained_loads(name, tmp_path):
    """A model built in code and cast to bfloat16 equals the same weights saved and read back by transformers'
    ``from_pretrained(dtype=torch.bfloat16)`` (the path of every real model), to the bit: only parameters are
    cast; rotary frequencies stay float32 (``model.to(torch.bfloat16)`` rounds them: logits then differ by 0.07)."""
    from transformers import AutoModelForCausalLM

    load_hf(name)[0].save_pretrained(tmp_path)
    want = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ids = torch.tensor([list(range(20, 120))])
    with torch.no_grad():
        assert torch.equal(load_hf(name, dtype=torch.bfloat16)[0](ids).logits, want(ids).logits)


@pytest.fixture(scope="module", params=DTYPES, ids=short)
def llama(request):
    """tiny-llama in float32 and in bfloat16: ``(model, dtype)``."""
    return tiny_model(request, "tiny-llama", request.param), request.param


def resid_all_positions(model, ids):
    """Every layer's resid_post at every position, via run_with_cache (a read path separate from castlens').

    On sdpa attention, the path steering() takes when only residual hooks are registered, so that steered and
    unsteered runs can be compared bit for bit."""
    with residual_stream_only(model):
        _, cache = model.run_with_cache(torch.tensor([ids]), names_filter=lambda n: n.endswith("hook_resid_post"))
    return torch.stack([cache[f"blocks.{L}.hook_resid_post"][0] for L in range(model.cfg.n_layers)])  # [L, pos, d]


def test_changes_only_from_the_layer_on_and_only_at_chosen_positions(tiny):
    ids = tokenize(tiny, PROMPTS[:1])[0]
    v = torch.randn(tiny.cfg.n_layers, tiny.cfg.d_model)
    base = resid_all_positions(tiny, ids)
    with steering(tiny, v, layers=2, strength=3.0, positions="last"):
        steered = resid_all_positions(tiny, ids)
    assert torch.equal(steered[:2], base[:2])  # layers before the injection layer untouched
    assert torch.equal(steered[:, :-1], base[:, :-1])  # earlier positions untouched (causal)
    assert torch.allclose(steered[2, -1] - base[2, -1], 3.0 * v[2], atol=1e-5)  # exactly the added vector
    assert (steered[3, -1] - base[3, -1]).abs().max() > 1e-3  # and it propagates upward
    with steering(tiny, v, layers=[1], strength=1.0, positions="all"):
        all_pos = resid_all_positions(tiny, ids)
    assert torch.allclose(all_pos[1] - base[1], v[1].expand_as(base[1]), atol=1e-5)


def test_in_bfloat16_the_vector_is_added_in_float32_and_rounded_once(request):
    """In a bfloat16 model the steered residual is ``bfloat16(float32(h) + strength * v)``: one rounding, not a
    rounded vector added with a second rounding (which moves some entries by one unit in the last place)."""
    model = tiny_model(request, "tiny-llama", torch.bfloat16)
    ids = tokenize(model, PROMPTS[:1])[0]
    v = torch.randn(4, 64, generator=torch.Generator().manual_seed(13))
    base = resid_all_positions(model, ids)
    with steering(model, v, layers=2, strength=3.0, positions="last"):
        steered = resid_all_positions(model, ids)
    assert steered.dtype == torch.bfloat16 and torch.equal(steered[:2], base[:2])
    assert torch.equal(steered[2, -1], (base[2, -1].float() + 3.0 * v[2]).to(torch.bfloat16))
    with steering(model, v, layers=2, strength=3.0, positions="last", norm_preserving=True):
        kept = resid_all_positions(model, ids)[2, -1].float()
    assert abs(float(kept.norm() / base[2, -1].float().norm()) - 1) < 2 ** -8  # one bfloat16 rounding of the norm


def test_linear_in_strength_and_zero_is_identity(tiny):
    v = torch.randn(tiny.cfg.n_layers, tiny.cfg.d_model)
    base = last_token_resid(tiny, PROMPTS)
    ids = torch.tensor(tokenize(tiny, PROMPTS[:1]))
    with residual_stream_only(tiny):  # the attention path steering() takes with only residual hooks
        logits = tiny(ids)
    with steering(tiny, torch.zeros_like(v), layers=[0, 1, 2, 3], strength=5.0):
        assert torch.equal(tiny(ids), logits)
    for s in (0.5, 2.0):
        with steering(tiny, v, layers=1, strength=s):
            out = last_token_resid(tiny, PROMPTS)
        assert torch.allclose(out[:, 1] - base[:, 1], s * v[1].expand(2, -1), atol=1e-4)


def test_equals_a_plain_transformers_hook(llama):
    """Independent computation: the same addition through a torch forward hook on the unwrapped HF layer."""
    model, dtype = llama
    ref = plain_ref(model)
    v = torch.randn(model.cfg.n_layers, model.cfg.d_model)
    ids = torch.tensor(tokenize(model, PROMPTS[:1]))

    def add(module, inputs, output):
        hs = output[0] if isinstance(output, tuple) else output
        hs = (hs + 2.0 * v[2]).to(hs.dtype)  # the sum in float32, rounded once (as castlens does)
        return (hs, *output[1:]) if isinstance(output, tuple) else hs

    h = ref.model.layers[2].register_forward_hook(add)
    try:
        with torch.no_grad():
            want = ref(ids).logits
    finally:
        h.remove()
    with torch.no_grad(), steering(model, v, layers=2, strength=2.0):
        got = model(ids)
    with torch.no_grad(), residual_stream_only(model), steering(model, v, layers=2, strength=2.0):
        got_sdpa = model(ids)
    assert got.dtype == dtype
    assert_close(got, want, dtype)
    assert_close(got_sdpa, want, dtype)


def test_per_row_positions_under_right_padding(llama):
    model, dtype = llama
    seqs = tokenize(model, PROMPTS)
    ids, mask, last = pad_batch(seqs, 258, "right")
    v = torch.randn(model.cfg.n_layers, model.cfg.d_model)
    with steering(model, v, layers=3, strength=1.0, positions=last):
        batched = model(ids, attention_mask=mask)
    for i, s in enumerate(seqs):
        with steering(model, v, layers=3, strength=1.0, positions="last"):
            alone = model(torch.tensor([s]))
        assert_close(batched[i, len(s) - 1], alone[0, -1], dtype, i)


def test_norm_preserving_keeps_the_norm(tiny):
    ids = tokenize(tiny, PROMPTS[:1])[0]
    base = resid_all_positions(tiny, ids)
    v = torch.randn(tiny.cfg.n_layers, tiny.cfg.d_model) * 10
    with steering(tiny, v, layers=2, strength=1.0, norm_preserving=True):
        out = resid_all_positions(tiny, ids)
    assert torch.allclose(out[2].norm(dim=-1), base[2].norm(dim=-1), rtol=1e-5)
    assert (out[2] - base[2]).abs().max() > 1e-2


def test_hooks_removed_after_error_and_bad_input(tiny):
    v = torch.randn(tiny.cfg.n_layers, tiny.cfg.d_model)
    with pytest.raises(RuntimeError, match="inside"):
        with steering(tiny, v, layers=1):
            raise RuntimeError("inside")
    assert all(not hp._forward_hooks for hp in tiny.hook_dict.values())
    with pytest.raises(ValueError, match=r"shape \(4, 32\); the model needs \[n_layers, d_model\] = \[4, 64\]"):
        with steering(tiny, torch.randn(4, 32), layers=1):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with steering(tiny, v, layers=7):
            pass
    other = SteeringVector(torch.randn(30, 576), model="smollm2-135m-instruct", task="sst2", n_samples=1, shots=1,
                           seed=0)
    with pytest.raises(VectorFileError, match="made for model 'smollm2-135m-instruct'"):
        with steering(tiny, other, layers=1):
            pass


def test_replace_mode_patches_exactly(tiny):
    ids = tokenize(tiny, PROMPTS[:1])[0]
    v = torch.randn(tiny.cfg.n_layers, tiny.cfg.d_model)
    base = resid_all_positions(tiny, ids)
    with steering(tiny, v, layers=2, positions="last", mode="replace"):
        out = resid_all_positions(tiny, ids)
    assert torch.equal(out[2, -1], v[2]) and torch.equal(out[:2], base[:2]) and torch.equal(out[:, :-1], base[:, :-1])
    with pytest.raises(ValueError, match="mode must be"):
        with steering(tiny, v, layers=2, mode="scale"):
            pass


@pytest.mark.parametrize("positions", ["last", "all"])
def test_generation_with_kv_cache_steers_only_the_chosen_positions(tiny, positions):
    """Cached greedy decoding equals, token for token, one uncached forward over prompt + generated tokens
    steered at exactly the positions asked for ('last': the prompt's last token only; 'all': every position)."""
    from castlens.steering import generate

    prompt = list(range(20, 40))
    v = torch.randn(4, 64, generator=torch.Generator().manual_seed(3)) * 3
    new = generate(tiny, prompt, 8, v, 1, 2.0, positions)
    where = torch.tensor([len(prompt) - 1]) if positions == "last" else "all"
    with torch.no_grad(), steering(tiny, v, 1, 2.0, positions=where):
        logits = tiny(torch.tensor([prompt + new[:-1]]), return_type="logits")[0]
    assert logits[len(prompt) - 1:].argmax(-1).tolist() == new
    assert new != generate(tiny, prompt, 8)  # the vector did change the output
    assert all(not hp._forward_hooks for hp in tiny.hook_dict.values())


def test_generation_last_differs_from_steering_every_new_token(tiny):
    from castlens.steering import generate

    prompt = list(range(50, 70))
    v = torch.randn(4, 64, generator=torch.Generator().manual_seed(4)) * 3
    assert generate(tiny, prompt, 6, v, 2, 3.0, "last") != generate(tiny, prompt, 6, v, 2, 3.0, "all")


# ---------------------------------------------------------------- "last" = each row's last prompt token
def hf_resid_steered_at(ref, ids, layer, add, at):
    """Independent reference: every plain transformers decoder layer's output for one unpadded prompt, with
    ``add`` added to layer ``layer``'s output at position ``at`` only. Shape [n_layers, pos, d_model]."""
    outs = []

    def steer(module, inputs, output):
        hs = (output[0] if isinstance(output, tuple) else output).clone()
        hs[:, at] += add
        return (hs, *output[1:]) if isinstance(output, tuple) else hs

    def grab(module, inputs, output):
        outs.append((output[0] if isinstance(output, tuple) else output)[0])

    handles = [ref.model.layers[layer].register_forward_hook(steer)]
    handles += [m.register_forward_hook(grab) for m in ref.model.layers]
    try:
        with torch.no_grad():
            ref.model(torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return torch.stack(outs)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_last_token_resid_and_mean_resid_steer_each_rows_prompt_end(llama, padding_side):
    from castlens.activations import mean_resid

    model, dtype = llama
    ref = plain_ref(model)
    prompts = ["short", "a somewhat longer prompt", "mid length"]
    seqs = tokenize(model, prompts)
    v = torch.randn(4, 64, generator=torch.Generator().manual_seed(5)) * 2
    with steering(model, v, layers=1, strength=3.0, positions="last"):
        acts = last_token_resid(model, prompts, batch_size=3, padding_side=padding_side)
        means = mean_resid(model, prompts, layer=2, batch_size=3, skip=0)
    assert acts.dtype == means.dtype == torch.float32
    for i, ids in enumerate(seqs):
        want = hf_resid_steered_at(ref, ids, 1, 3.0 * v[1], len(ids) - 1).float()
        assert_close(acts[i], want[:, -1], dtype, i)
        assert_close(means[i], want[2].mean(0), dtype, i)
    base = last_token_resid(model, prompts)
    assert_close(acts[:, 1] - base[:, 1], 3.0 * v[1].expand(3, -1), dtype)  # each row's own end


def test_last_in_a_plain_batched_forward_is_refused_and_a_single_row_works(tiny):
    seqs = tokenize(tiny, PROMPTS)
    ids, mask, _ = pad_batch(seqs, 258, "right")
    v = torch.randn(4, 64)
    with steering(tiny, v, layers=1, positions="last"):
        with pytest.raises(ValueError, match=r"forward pass of 2 rows.*cannot tell where each row's prompt ends.*"
                                             r"Pass positions=<integer tensor \[batch\]"):
            tiny(ids, attention_mask=mask)
        alone = tiny(torch.tensor([seqs[1]]))  # one unpadded row: its last position
    with steering(tiny, v, layers=1, positions=torch.tensor([len(seqs[1]) - 1])):
        explicit = tiny(torch.tensor([seqs[1]]))
    assert torch.equal(alone, explicit)
    assert all(not hp._forward_hooks for hp in tiny.hook_dict.values())


# ---------------------------------------------------------------- sdpa by default
def test_steering_runs_on_sdpa_by_default_and_equals_eager(tiny):
    ids = torch.tensor(tokenize(tiny, PROMPTS[:1]))
    v = torch.randn(4, 64, generator=torch.Generator().manual_seed(6)) * 3
    seen = []

    def spy(x, hook):  # a residual hook: allowed on the fast path
        seen.append(tiny.original_model.config._attn_implementation)

    with torch.no_grad():
        with steering(tiny, v, layers=2, strength=2.0, positions="last"), \
                tiny.hooks(fwd_hooks=[("blocks.3.hook_resid_post", spy)]):
            fast = tiny(ids)
        with steering(tiny, v, layers=2, strength=2.0, positions="last", attention="eager"), \
                tiny.hooks(fwd_hooks=[("blocks.3.hook_resid_post", spy)]):
            eager = tiny(ids)
    assert seen == ["sdpa", "eager"]
    assert (fast - eager).abs().max() < 1e-5 and (fast - tiny(ids)).abs().max() > 1e-3
    assert tiny.original_model.config._attn_implementation == "eager"
    assert all(type(b.original_component.self_attn).__name__.endswith("Bridge") for b in tiny.blocks)


def test_attention_internal_hooks_get_eager_attention_inside_steering(tiny):
    """A hook inside attention (here run_with_cache of hook_pattern, added inside the context) makes that pass
    eager, so it fires; the steered result is the same either way."""
    ids = torch.tensor(tokenize(tiny, PROMPTS[:1]))
    v = torch.randn(4, 64, generator=torch.Generator().manual_seed(8)) * 3
    with torch.no_grad(), steering(tiny, v, layers=1, strength=2.0):
        fast = tiny(ids)
        logits, cache = tiny.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
        again = tiny(ids)  # the hooks are gone again: back on sdpa
    assert len(cache) == tiny.cfg.n_layers and cache["blocks.0.attn.hook_pattern"].shape[-1] == ids.shape[1]
    assert (logits - fast).abs().max() < 1e-5 and torch.equal(again, fast)


def plain_steered_logits(ref, ids, v, layer, strength, at):
    """Independent reference: a plain Hugging Face forward with ``strength * v[layer]`` added to the decoder
    layer's output at positions ``at`` (a list, or ``None`` for every position) by a torch forward hook."""
    def add(module, inputs, output):
        hs = (output[0] if isinstance(output, tuple) else output).clone()
        sel = slice(None) if at is None else at
        hs[:, sel] = (hs[:, sel] + strength * v[layer]).to(hs.dtype)  # float32 sum, rounded once (bfloat16 models)
        return (hs, *output[1:]) if isinstance(output, tuple) else hs

    h = ref.model.layers[layer].register_forward_hook(add)
    try:
        with torch.no_grad():
            return ref(torch.tensor([ids])).logits[0]
    finally:
        h.remove()


WINDOW_CASES = [(name, dtype) for dtype in DTYPES for name in ("tiny-llama", "tiny-gemma3")]


@pytest.mark.parametrize("name,dtype", WINDOW_CASES, ids=short)
def test_steering_equals_a_plain_transformers_hook_past_the_window(request, name, dtype):
    model = tiny_model(request, name, dtype)
    ids = tokenize(model, [PROMPTS[0] * 2])[0]
    assert len(ids) > 4 * 16  # several sliding windows of tiny-gemma3
    v = torch.randn(4, 64, generator=torch.Generator().manual_seed(11))
    want = plain_steered_logits(plain_ref(model), ids, v, 2, 2.0, None)
    with torch.no_grad(), steering(model, v, layers=2, strength=2.0):
        got = model(torch.tensor([ids]))[0]
    with torch.no_grad(), residual_stream_only(model), steering(model, v, layers=2, strength=2.0):
        got_sdpa = model(torch.tensor([ids]))[0]
    assert_close(got, want, dtype)
    assert_close(got_sdpa, want, dtype)


# bfloat16: tiny-gemma3 only, whose sliding windows make the cached and the full pass differ most (time)
GENERATION_CASES = [c for c in WINDOW_CASES if c != ("tiny-llama", torch.bfloat16)]


@pytest.mark.parametrize("name,dtype", GENERATION_CASES, ids=short)
@pytest.mark.parametrize("positions", ["last", "all"])
def test_cached_generation_equals_an_uncached_plain_forward_past_the_window(request, name, dtype, positions):
    """KV-cache greedy decoding from a 40-token prompt (2.5 windows of tiny-gemma3) to 48 tokens, against one
    uncached plain Hugging Face forward over prompt + generated tokens, steered by a hook where asked."""
    from castlens.steering import generate

    model = tiny_model(request, name, dtype)
    prompt = [256] + list(range(60, 99))
    v = torch.randn(4, 64, generator=torch.Generator().manual_seed(12)) * 3
    new = generate(model, prompt, 8, v, 1, 2.0, positions)
    at = [len(prompt) - 1] if positions == "last" else None
    logits = plain_steered_logits(plain_ref(model), prompt + new[:-1], v, 1, 2.0, at)
    assert_greedy(new, logits[len(prompt) - 1:], dtype)
    assert new != generate(model, prompt, 8)  # the vector did change the output
