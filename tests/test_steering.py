import pytest
import torch

from castlens.activations import last_token_resid, pad_batch, tokenize
from castlens.models import residual_stream_only, tiny_hf_model
from castlens.steering import steering
from castlens.vectors import SteeringVector, VectorFileError

PROMPTS = ["Give the opposite of the word.\n\nhot\nAnswer:", "a b c d e f g h"]


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


def test_equals_a_plain_transformers_hook(tiny):
    """Independent computation: the same addition through a torch forward hook on the unwrapped HF layer."""
    ref = tiny_hf_model(seed=0)
    v = torch.randn(tiny.cfg.n_layers, tiny.cfg.d_model)
    ids = torch.tensor(tokenize(tiny, PROMPTS[:1]))

    def add(module, inputs, output):
        hs = output[0] if isinstance(output, tuple) else output
        hs = hs + 2.0 * v[2]
        return (hs, *output[1:]) if isinstance(output, tuple) else hs

    h = ref.model.layers[2].register_forward_hook(add)
    try:
        with torch.no_grad():
            want = ref(ids).logits
    finally:
        h.remove()
    with torch.no_grad(), steering(tiny, v, layers=2, strength=2.0):
        got = tiny(ids)
    with torch.no_grad(), residual_stream_only(tiny), steering(tiny, v, layers=2, strength=2.0):
        got_sdpa = tiny(ids)
    assert (got - want).abs().max() < 1e-4 and (got_sdpa - want).abs().max() < 1e-4


def test_per_row_positions_under_right_padding(tiny):
    seqs = tokenize(tiny, PROMPTS)
    ids, mask, last = pad_batch(seqs, 258, "right")
    v = torch.randn(tiny.cfg.n_layers, tiny.cfg.d_model)
    with steering(tiny, v, layers=3, strength=1.0, positions=last):
        batched = tiny(ids, attention_mask=mask)
    for i, s in enumerate(seqs):
        with steering(tiny, v, layers=3, strength=1.0, positions="last"):
            alone = tiny(torch.tensor([s]))
        assert (batched[i, len(s) - 1] - alone[0, -1]).abs().max() < 1e-4


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
def test_last_token_resid_and_mean_resid_steer_each_rows_prompt_end(tiny, padding_side):
    from castlens.activations import mean_resid

    ref = tiny_hf_model(seed=0)
    prompts = ["short", "a somewhat longer prompt", "mid length"]
    seqs = tokenize(tiny, prompts)
    v = torch.randn(4, 64, generator=torch.Generator().manual_seed(5)) * 2
    with steering(tiny, v, layers=1, strength=3.0, positions="last"):
        acts = last_token_resid(tiny, prompts, batch_size=3, padding_side=padding_side)
        means = mean_resid(tiny, prompts, layer=2, batch_size=3, skip=0)
    for i, ids in enumerate(seqs):
        want = hf_resid_steered_at(ref, ids, 1, 3.0 * v[1], len(ids) - 1)
        assert (acts[i] - want[:, -1]).abs().max() < 1e-4
        assert (means[i] - want[2].mean(0)).abs().max() < 1e-4
    base = last_token_resid(tiny, prompts)
    assert torch.allclose(acts[:, 1] - base[:, 1], 3.0 * v[1].expand(3, -1), atol=1e-4)  # each row's own end


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
        hs[:, sel] = hs[:, sel] + strength * v[layer]
        return (hs, *output[1:]) if isinstance(output, tuple) else hs

    h = ref.model.layers[layer].register_forward_hook(add)
    try:
        with torch.no_grad():
            return ref(torch.tensor([ids])).logits[0]
    finally:
        h.remove()


def test_steering_equals_a_plain_transformers_hook_past_the_window(tiny_any):
    from conftest import plain_hf

    ids = tokenize(tiny_any, [PROMPTS[0] * 2])[0]
    assert len(ids) > 4 * 16  # several sliding windows of tiny-gemma3
    v = torch.randn(4, 64, generator=torch.Generator().manual_seed(11))
    want = plain_steered_logits(plain_hf(tiny_any), ids, v, 2, 2.0, None)
    with torch.no_grad(), steering(tiny_any, v, layers=2, strength=2.0):
        got = tiny_any(torch.tensor([ids]))[0]
    with torch.no_grad(), residual_stream_only(tiny_any), steering(tiny_any, v, layers=2, strength=2.0):
        got_sdpa = tiny_any(torch.tensor([ids]))[0]
    assert (got - want).abs().max() < 1e-4 and (got_sdpa - want).abs().max() < 1e-4


@pytest.mark.parametrize("positions", ["last", "all"])
def test_cached_generation_equals_an_uncached_plain_forward_past_the_window(tiny_any, positions):
    """KV-cache greedy decoding from a 40-token prompt (2.5 windows of tiny-gemma3) to 48 tokens, against one
    uncached plain Hugging Face forward over prompt + generated tokens, steered by a hook where asked."""
    from conftest import plain_hf

    from castlens.steering import generate

    prompt = [256] + list(range(60, 99))
    v = torch.randn(4, 64, generator=torch.Generator().manual_seed(12)) * 3
    new = generate(tiny_any, prompt, 8, v, 1, 2.0, positions)
    at = [len(prompt) - 1] if positions == "last" else None
    logits = plain_steered_logits(plain_hf(tiny_any), prompt + new[:-1], v, 1, 2.0, at)
    assert logits[len(prompt) - 1:].argmax(-1).tolist() == new
    assert new != generate(tiny_any, prompt, 8)  # the vector did change the output
