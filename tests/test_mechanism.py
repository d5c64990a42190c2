import pytest
import torch

from conftest import hf_last_token_states, plain_hf

import castlens
from castlens.mechanism import (component_contributions, difference_attribution, function_vector, head_writes,
                                logit_lens, parse_head, patch_effects, project, split_shared, top_heads)
from castlens.reuse import UNSTEERED, Setting, prefix_option_logprobs, settings_last_token_resid
from castlens.steering import head_patching

FEW = [[5, 6, 7, 8, 9, 11, 12], [3, 14, 15, 9, 2, 20, 21, 22]]
ZERO = [[3, 9], [7, 20, 1]]


def test_components_sum_to_the_plain_decoder_output(tiny_any):
    """Embedding + every head (frozen post-attention norm on Gemma 3) + rest + MLPs = the plain Hugging Face
    decoder layer's output, and the rest is rounding only (no output bias in these models)."""
    ref = plain_hf(tiny_any)
    for layer in (0, 2):
        c = component_contributions(tiny_any, FEW, layer)
        for i, ids in enumerate(FEW):
            want = hf_last_token_states(ref, ids)[layer]
            assert torch.allclose(c.total()[i], want, atol=1e-5)
        rest = torch.stack([c.values[:, c.labels.index(f"L{li} attn rest")] for li in range(layer + 1)])
        assert rest.abs().max() < 1e-5
    diff, _ = difference_attribution(tiny_any, FEW, ZERO, 2)
    want = torch.stack([hf_last_token_states(ref, f)[2] - hf_last_token_states(ref, z)[2] for f, z in zip(FEW, ZERO)])
    assert torch.allclose(diff.total(), want, atol=1e-5)


def test_a_head_by_hand_through_the_plain_output_projection(tiny):
    ref = plain_hf(tiny)
    _, cache = tiny.run_with_cache(torch.tensor([FEW[0]]))
    dh = tiny.cfg.d_head
    z = cache["blocks.1.attn.hook_z"][0, -1, 2]
    head = ref.model.layers[1].self_attn.o_proj.weight[:, 2 * dh:3 * dh] @ z
    c = component_contributions(tiny, FEW[:1], 2)
    assert torch.allclose(c.values[0, c.labels.index("L1H2")], head, atol=1e-5)
    assert torch.allclose(c.z[0, 1, 2], z, atol=1e-6)  # hook_z on the sdpa path equals the eager one


def _plant(model, layer: int, head: int, dim: int) -> torch.Tensor:
    """Make one head write only along the basis vector ``dim`` (strongly); returns that direction."""
    o = model.blocks[layer].attn.o.original_component
    dh = model.cfg.d_head
    with torch.no_grad():
        o.weight[:, head * dh:(head + 1) * dh] = 0
        o.weight[dim, head * dh:(head + 1) * dh] = 50.0
    d = torch.zeros(model.cfg.d_model)
    d[dim] = 1.0
    return d


def test_a_planted_head_ranks_first_by_attribution_and_by_patching():
    model = castlens.load_model("tiny-llama")  # its own copy: the weights are edited
    d = _plant(model, 1, 2, 7)
    diff, few = difference_attribution(model, FEW, ZERO, 2)
    scores = project(diff, d).abs().mean(0)
    assert parse_head(diff.labels[int(scores.argmax())]) == (1, 2)
    # Patching: planted in layer 0, where no earlier head can change its input (a head planted higher amplifies
    # whatever an earlier patched head changes in its input: an indirect effect, which patching rightly counts).
    model = castlens.load_model("tiny-llama")
    d = _plant(model, 0, 2, 7)
    _, few = difference_attribution(model, FEW, ZERO, 2)
    eff = patch_effects(model, ZERO, few.z[:, :3].mean(0), 2)
    assert top_heads(eff.shift(d).abs(), 1) == [(0, 2)]


def test_patching_a_head_with_its_own_activation_changes_nothing(tiny_any):
    one = ZERO[1:]
    own = component_contributions(tiny_any, one, 2).z[0]  # [layer, head, d_head] of this very run
    opts = [[[4], [9], [13]]]
    eff = patch_effects(tiny_any, one, own, 2, opts, [1])
    assert eff.resid_shift is not None and eff.resid_shift.abs().max() < 1e-5
    assert eff.gold_logprob is not None and eff.gold_logprob.abs().max() < 1e-5


def test_patching_for_the_answers_alone_gives_the_same_answer_effects(tiny):
    """layer=None skips the residual read (function-vector ranking needs the answers only): the same gold
    log-prob and accuracy changes as the full measurement, and no residual shift to project."""
    few = component_contributions(tiny, FEW, 2)
    opts, gold = [[[4], [9], [13]]] * len(ZERO), [1] * len(ZERO)
    full = patch_effects(tiny, ZERO, few.z.mean(0), 2, opts, gold)
    alone = patch_effects(tiny, ZERO, few.z.mean(0), None, opts, gold)
    assert alone.resid_shift is None and full.gold_logprob is not None and full.gold_logprob.abs().max() > 1e-3
    assert torch.allclose(alone.gold_logprob, full.gold_logprob, atol=1e-6)
    assert torch.equal(alone.accuracy, full.accuracy)
    with pytest.raises(ValueError, match="without the residual"):
        alone.shift(torch.ones(tiny.cfg.d_model))


def test_fast_head_patching_equals_a_full_forward_with_a_hook_z_patch(tiny_any):
    """The reuse path (prefix once, bodies once, one token per setting, sdpa) against a plain eager forward of the
    whole prompt with a hook on that head's hook_z at the last position."""
    prefix, queries = [5, 6, 7, 8], [[9, 10, 11], [12, 2, 13, 14, 15]]
    opts = [[[4], [9], [13]]] * 2
    value = torch.randn(tiny_any.cfg.d_head, generator=torch.Generator().manual_seed(0))
    s = Setting("patch", heads=((1, 1, value),))
    resid = settings_last_token_resid(tiny_any, prefix, queries, [UNSTEERED, s], [2])[:, :, 0]
    scores = prefix_option_logprobs(tiny_any, prefix, queries, opts, [UNSTEERED, s])
    for q, ids in enumerate(queries):
        full = torch.tensor([prefix + ids])
        seen = {}

        def patch(z, hook):
            z = z.clone()
            z[0, -1, 1] = value
            return z

        def grab(x, hook):
            seen["h"] = x[0, -1].clone()

        with torch.no_grad():
            logits = tiny_any.run_with_hooks(full, fwd_hooks=[("blocks.1.attn.hook_z", patch),
                                                              ("blocks.2.hook_resid_post", grab)])
        assert torch.allclose(resid[1, q], seen["h"], atol=1e-4)
        lp = torch.log_softmax(logits[0, -1].float(), -1)[[4, 9, 13]]
        assert torch.allclose(scores[1, q], lp, atol=1e-4)
    assert (resid[1] - resid[0]).abs().max() > 1e-3  # the patch did something


def test_head_patching_refuses_bad_heads(tiny):
    with pytest.raises(ValueError, match="out of range"):
        with head_patching(tiny, {(9, 0): torch.zeros(tiny.cfg.d_head)}):
            pass
    with pytest.raises(ValueError, match=r"d_head"):
        with head_patching(tiny, {(1, 0): torch.zeros(3)}):
            pass


def test_split_into_shared_part_and_remainder_sums_back():
    g = torch.Generator().manual_seed(1)
    v, u = torch.randn(4, 32, generator=g), torch.randn(4, 32, generator=g)
    shared, rest = split_shared(v, u)
    assert torch.allclose(shared + rest, v, atol=1e-6)
    assert (rest * u).sum(-1).abs().max() < 1e-5  # the remainder is orthogonal to the direction
    assert torch.allclose(torch.nn.functional.cosine_similarity(shared, u, dim=-1).abs(), torch.ones(4), atol=1e-5)


def test_function_vector_is_the_sum_of_the_chosen_heads_mean_writes(tiny):
    _, few = difference_attribution(tiny, FEW, ZERO, 2)
    w = head_writes(few)
    want = few.values[:, few.labels.index("L0H1")].mean(0) + few.values[:, few.labels.index("L2H3")].mean(0)
    assert torch.allclose(function_vector(w, [(0, 1), (2, 3)]), want, atol=1e-6)
    assert top_heads(torch.tensor([[0.0, 3.0], [5.0, 1.0]]), 2) == [(1, 0), (0, 1)]


def test_logit_lens_matches_the_plain_norm_and_unembedding(tiny_any):
    ref = plain_hf(tiny_any)
    v = torch.randn(tiny_any.cfg.d_model, generator=torch.Generator().manual_seed(2))
    (dec,) = logit_lens(tiny_any, {"v": v}, k=5)
    with torch.no_grad():
        logits = ref.lm_head(ref.model.norm(v[None, None]))[0, 0]
    tok = castlens.models.tokenizer_of(tiny_any)
    assert dec.promoted == [tok.decode([i]) for i in logits.topk(5).indices.tolist()]
    assert dec.suppressed == [tok.decode([i]) for i in (-logits).topk(5).indices.tolist()]
