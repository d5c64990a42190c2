"""Shared-prefix and last-token reuse (castlens.reuse) against the plain full-prompt paths.

The correctness tests run on both random test models: tiny-llama (full attention) and tiny-gemma3 (a sliding
window of 16 tokens on 3 of its 4 layers). Every prompt here is longer than that window (the prefix alone has
64 tokens), so the reuse path's masks must apply the window by position across the padding between prefix and
body."""

import pytest
import torch
from conftest import TINY_MODELS, hf_last_token_states, plain_hf
from test_steering import DTYPES, assert_close, plain_ref, short, tiny_model

from castlens.activations import last_token_resid
from castlens.evaluation import option_logprobs
from castlens.models import TINY_GEMMA3_WINDOW, tokenizer_of
from castlens.reuse import UNSTEERED, Setting, prefix_last_token_resid, prefix_option_logprobs


def enc(model, text):
    return tokenizer_of(model)(text, add_special_tokens=False)["input_ids"]


def make_pieces(tiny):
    prefix = tokenizer_of(tiny)("Say the word.\n\nInput: cat\nAnswer: cat\n\nInput: sun\nAnswer: sun\n\n")["input_ids"]
    texts = ["Input: dog\nAnswer:", "Input: a much longer input with many words in it\nAnswer:", "Input: x\nAnswer:",
             "Input: two words\nAnswer:", "Q"]
    queries = [enc(tiny, t) for t in texts]
    opts = [["dog", "cat", "a longer option"], ["yes", "no"], ["x", "y", "zz", "w"], ["two"], ["ab", "abcd", "a", "b"]]
    assert len(prefix) > 3 * TINY_GEMMA3_WINDOW and max(map(len, queries)) > 3 * TINY_GEMMA3_WINDOW
    return prefix, queries, opts, [[enc(tiny, " " + o) for o in os_] for os_ in opts]


CASES = [(name, dtype) for dtype in DTYPES for name in TINY_MODELS]  # float32 first, then bfloat16
FLOAT32, BFLOAT16 = CASES[:len(TINY_MODELS)], CASES[len(TINY_MODELS):]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: "-".join(map(short, c)))
def model(request):
    """Each random test model in float32 and in bfloat16 (tolerances per dtype: test_steering.TOLERANCE)."""
    return tiny_model(request, *request.param)


@pytest.fixture(scope="module")
def pieces(model):
    return make_pieces(model)


def manual(ref, ids, cont, steer=None):
    """Independent reference: one unpadded forward of the plain Hugging Face model, steered (if asked) by a torch
    forward hook on the decoder layer at the last prompt token; log-softmax, the continuation's tokens summed."""
    handle = None
    if steer:
        v, layer, strength, mode = steer
        at = len(ids) - 1

        def hook(module, inputs, output):
            hs = (output[0] if isinstance(output, tuple) else output).clone()
            hs[:, at] = v[layer] if mode == "replace" else hs[:, at] + strength * v[layer]
            return (hs, *output[1:]) if isinstance(output, tuple) else hs
        handle = ref.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = ref(torch.tensor([ids + cont])).logits[0].float()
    finally:
        if handle is not None:
            handle.remove()
    lp = torch.log_softmax(logits, -1)
    return float(sum(lp[len(ids) - 1 + j, t] for j, t in enumerate(cont)))


UNSTEERED_CASES = [(c, bs) for c in FLOAT32 for bs in (1, 2, 16)] + [(c, bs) for c in BFLOAT16 for bs in (1, 16)]


@pytest.mark.parametrize("model,batch_size", UNSTEERED_CASES, indirect=["model"],
                         ids=[f"{'-'.join(map(short, c))}-{bs}" for c, bs in UNSTEERED_CASES])
def test_unsteered_scores_equal_the_plain_full_prompt_path(model, pieces, batch_size):
    prefix, queries, opts, opt_ids = pieces
    plain = option_logprobs(model, [prefix + q for q in queries], opts)
    fast = prefix_option_logprobs(model, prefix, queries, opt_ids, batch_size=batch_size)[0]
    assert torch.isinf(fast).equal(torch.isinf(plain))
    fin = torch.isfinite(plain)
    assert_close(fast[fin], plain[fin], model.cfg.dtype)


def test_empty_prefix_and_single_token_options(model, pieces):
    _, queries, _, _ = pieces
    letters = [["A", "B", "C"]] * len(queries)
    ids = [[enc(model, o) for o in os_] for os_ in letters]  # byte-level: one token each
    assert all(len(o) == 1 for os_ in ids for o in os_)  # the one-position read path
    plain = option_logprobs(model, queries, letters, sep="")
    fast = prefix_option_logprobs(model, [], queries, ids, batch_size=2)[0]
    assert_close(fast, plain, model.cfg.dtype)


STEERED_CASES = [(c, mode) for c in FLOAT32 for mode in ("add", "replace")] + [(BFLOAT16[0], "add")]


# bfloat16: tiny-llama adding (the plain reference runs one forward per setting, query and option: 13 s on
# tiny-gemma3); tiny-gemma3's windows in bfloat16 are checked against transformers unsteered below.
@pytest.mark.parametrize("model,mode", STEERED_CASES, indirect=["model"],
                         ids=[f"{'-'.join(map(short, c))}-{m}" for c, m in STEERED_CASES])
def test_steered_settings_equal_one_steered_full_forward_each(model, pieces, mode):
    prefix, queries, _, opt_ids = pieces
    g = torch.Generator().manual_seed(1)
    v1, v2 = torch.randn(4, 64, generator=g) * 4, torch.randn(4, 64, generator=g) * 4
    settings = [Setting("a", v1, 1, 2.0, mode), UNSTEERED, Setting("b", v2, 3, -1.5, mode),
                Setting("c", v1, 0, 1, mode)]
    fast = prefix_option_logprobs(model, prefix, queries, opt_ids, settings, batch_size=3)
    ref = plain_ref(model)
    for s_i, s in enumerate(settings):
        steer = None if s.directions is None else (s.directions, s.layer, s.strength, mode)
        for q, (ids, opts) in enumerate(zip(queries, opt_ids)):
            want = torch.tensor([manual(ref, prefix + ids, o, steer) for o in opts])
            assert_close(fast[s_i, q, :len(opts)], want, model.cfg.dtype, (s.name, q))
    fin = torch.isfinite(fast[1])
    assert (fast[0][fin] - fast[1][fin]).abs().max() > 1e-3  # steering did change the scores


@pytest.mark.parametrize("model", FLOAT32, indirect=True, ids=lambda c: "-".join(map(short, c)))
def test_late_start_equals_running_every_layer(model, pieces):
    """A setting hooked from layer L on runs the option chunk from layer L, on the unsteered residual entering it:
    the same numbers as running layers 0..L-1 again under each setting (nothing below L depends on the setting),
    with those layers skipped. Covers no unsteered setting among them (one is added, and dropped from the output),
    head patching, patching in, layer 0 and the last layer."""
    from castlens.reuse import can_start_late

    assert can_start_late(model)
    prefix, queries, _, opt_ids = pieces
    g = torch.Generator().manual_seed(2)
    v = torch.randn(4, 64, generator=g) * 4
    z = torch.randn(model.cfg.d_head, generator=g)
    settings = [Setting("l2", v, 2, 1.5), Setting("l3", v, 3, -2.0), Setting("l0", v, 0, 1.0),
                Setting("rep1", v, 1, mode="replace"), Setting("head", heads=((1, 0, z),)),
                Setting("both", v, 3, 0.5, heads=((2, 1, z),))]
    fast = prefix_option_logprobs(model, prefix, queries, opt_ids, settings, batch_size=2)
    slow = prefix_option_logprobs(model, prefix, queries, opt_ids, settings, batch_size=2, late_start=False)
    assert fast.shape == slow.shape == (len(settings), len(queries), 4)
    fin = torch.isfinite(slow)
    assert torch.isfinite(fast).equal(fin)
    assert_close(fast[fin], slow[fin], model.cfg.dtype)
    with_unsteered = prefix_option_logprobs(model, prefix, queries, opt_ids, [UNSTEERED, *settings], batch_size=2)
    assert_close(with_unsteered[1:][fin], slow[fin], model.cfg.dtype)

    calls: list[int] = []  # how many times each layer runs: the layers below a late start must not
    hooks = [(f"blocks.{i}.hook_resid_post", lambda x, hook, i=i: calls.append(i)) for i in range(4)]
    with model.hooks(fwd_hooks=hooks):
        prefix_option_logprobs(model, prefix, queries[:1], opt_ids[:1], [Setting("l3", v, 3, 1.0)], batch_size=1)
    passes = {i: calls.count(i) for i in range(4)}
    # prefix, body, the added unsteered pass: every layer; the steered chunk: layer 3 only
    assert passes == {0: 3, 1: 3, 2: 3, 3: 4}, passes


def test_last_token_resid_equals_the_plain_path(model, pieces):
    prefix, queries, _, _ = pieces
    dtype = model.cfg.dtype
    plain = last_token_resid(model, [prefix + q for q in queries])
    for bs in (1, 4):
        fast = prefix_last_token_resid(model, prefix, queries, batch_size=bs)
        assert fast.dtype == torch.float32
        assert_close(fast, plain, dtype, bs)
    some = prefix_last_token_resid(model, prefix, queries, layers=[2, 0])
    assert_close(some, plain[:, [2, 0]], dtype)
    assert_close(prefix_last_token_resid(model, [], queries), last_token_resid(model, queries), dtype)


def test_bad_input(tiny):
    prefix, queries, _, opt_ids = make_pieces(tiny)
    with pytest.raises(ValueError, match="queries but"):
        prefix_option_logprobs(tiny, prefix, queries, opt_ids[:-1])
    with pytest.raises(ValueError, match="query 0 is empty"):
        prefix_option_logprobs(tiny, prefix, [[]], [[[1]]])
    with pytest.raises(ValueError, match="out of range"):
        prefix_option_logprobs(tiny, prefix, queries, opt_ids, [Setting("s", torch.zeros(4, 64), 9)])
    with pytest.raises(ValueError, match="context"):
        prefix_last_token_resid(tiny, prefix * 40, queries)


def test_options_share_rows_when_one_is_a_prefix_path_of_another():
    from castlens.reuse import _option_rows

    # " 1".." 5" (shared first token), "entailment" (2 tokens) beside 1-token labels, single tokens
    rows, reads = _option_rows([[[7, 1], [7, 2], [7, 3]], [[5, 6], [8], [9]], [[1], [2]], [[4, 5, 6], [4, 9]]])
    assert rows == [(0, [7]), (1, [5]), (2, []), (3, [4, 5])]
    assert reads[1] == [(1, [5, 6]), (1, [8]), (1, [9])]
    assert reads[3] == [(3, [4, 5, 6]), (3, [4, 9])]
    rows, _ = _option_rows([[[1, 2], [3, 4]]])  # different first tokens: a row each
    assert rows == [(0, [1]), (0, [3])]


def test_reuse_equals_plain_transformers_unpadded(model, pieces):
    """Independent of TransformerLens and of castlens' padding: one unpadded plain Hugging Face forward per query
    (its own masks, its own sliding window), against the prefix + body + last-token passes."""
    prefix, queries, _, opt_ids = pieces
    dtype = model.cfg.dtype
    ref = plain_ref(model)
    fast = prefix_option_logprobs(model, prefix, queries, opt_ids, batch_size=3)[0]
    resid = prefix_last_token_resid(model, prefix, queries, batch_size=3)
    for q, (ids, opts) in enumerate(zip(queries, opt_ids)):
        assert_close(resid[q], hf_last_token_states(ref, prefix + ids), dtype, q)
        want = []
        for o in opts:
            with torch.no_grad():
                lp = torch.log_softmax(ref(torch.tensor([prefix + ids + o])).logits[0].float(), -1)
            want.append(sum(float(lp[len(prefix) + len(ids) - 1 + t, tok]) for t, tok in enumerate(o)))
        assert_close(fast[q, :len(opts)], torch.tensor(want), dtype, q)


def test_the_window_is_what_these_prompts_test(tiny_gemma3):
    """Without its window, tiny-gemma3 gives other numbers on these prompts: the tests above do test the window."""
    prefix, queries, _, _ = make_pieces(tiny_gemma3)
    ref = plain_hf(tiny_gemma3)
    windowed = hf_last_token_states(ref, prefix + queries[1])
    ref.config.sliding_window = 10_000
    assert (hf_last_token_states(ref, prefix + queries[1]) - windowed).abs().max() > 1e-2


def test_masks_follow_positions_across_the_padding(tiny, tiny_gemma3):
    from castlens.reuse import _attention_mask, _layout

    _, mask, pos = _layout(tiny, 3, [[5, 6], []])
    assert _attention_mask(tiny, mask, pos) is not None and _attention_mask(tiny, mask, pos).equal(mask)  # 2-d
    prefix, w = 20, TINY_GEMMA3_WINDOW
    _, mask, pos = _layout(tiny_gemma3, prefix, [list(range(10)), [7]])  # row 1: 9 pads between prefix and body
    masks = _attention_mask(tiny_gemma3, mask, pos)
    assert set(masks) == {"full_attention", "sliding_attention"}
    seen = masks["sliding_attention"][:, 0, -1] == 0  # what the last body token sees
    for row, n in enumerate((10, 1)):
        want = torch.zeros(prefix + 10, dtype=torch.bool)
        real = [*range(prefix), *range(prefix + 10 - n, prefix + 10)]  # slots of real tokens, position = index
        for k, slot in enumerate(real):
            want[slot] = len(real) - 1 - k < w
        assert seen[row].equal(want), row
    assert (masks["full_attention"][1, 0, -1] == 0).sum() == prefix + 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_setting_refuses_a_non_finite_strength(bad):
    with pytest.raises(ValueError, match=f"setting 'sweep-3': strength {bad} is not a finite number"):
        Setting("sweep-3", torch.zeros(4, 64), 1, bad)
