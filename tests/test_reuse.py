"""Shared-prefix and last-token reuse (castlens.reuse) against the plain full-prompt paths."""

import pytest
import torch

from castlens.activations import last_token_resid
from castlens.evaluation import option_logprobs
from castlens.models import tokenizer_of
from castlens.reuse import UNSTEERED, Setting, prefix_last_token_resid, prefix_option_logprobs
from castlens.steering import steering


def enc(model, text):
    return tokenizer_of(model)(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def pieces(tiny):
    prefix = tokenizer_of(tiny)("Say the word.\n\nInput: cat\nAnswer: cat\n\nInput: sun\nAnswer: sun\n\n")["input_ids"]
    texts = ["Input: dog\nAnswer:", "Input: a much longer input with many words in it\nAnswer:", "Input: x\nAnswer:",
             "Input: two words\nAnswer:", "Q"]
    queries = [enc(tiny, t) for t in texts]
    opts = [["dog", "cat", "a longer option"], ["yes", "no"], ["x", "y", "zz", "w"], ["two"], ["ab", "abcd", "a", "b"]]
    return prefix, queries, opts, [[enc(tiny, " " + o) for o in os_] for os_ in opts]


def manual(model, ids, cont, steer=None):
    """Independent reference: one unpadded full forward, log-softmax, the continuation's tokens summed."""
    ctx = steering(model, steer[0], steer[1], steer[2], positions=torch.tensor([len(ids) - 1]), mode=steer[3]) \
        if steer else torch.no_grad()
    with torch.no_grad(), ctx:
        logits = model(torch.tensor([ids + cont]), return_type="logits")[0].float()
    lp = torch.log_softmax(logits, -1)
    return float(sum(lp[len(ids) - 1 + j, t] for j, t in enumerate(cont)))


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_unsteered_scores_equal_the_plain_full_prompt_path(tiny, pieces, batch_size):
    prefix, queries, opts, opt_ids = pieces
    plain = option_logprobs(tiny, [prefix + q for q in queries], opts)
    fast = prefix_option_logprobs(tiny, prefix, queries, opt_ids, batch_size=batch_size)[0]
    assert torch.isinf(fast).equal(torch.isinf(plain))
    fin = torch.isfinite(plain)
    assert (fast[fin] - plain[fin]).abs().max() < 1e-4


def test_empty_prefix_and_single_token_options(tiny, pieces):
    _, queries, _, _ = pieces
    letters = [["A", "B", "C"]] * len(queries)
    ids = [[enc(tiny, o) for o in os_] for os_ in letters]  # byte-level: one token each
    assert all(len(o) == 1 for os_ in ids for o in os_)  # the one-position read path
    plain = option_logprobs(tiny, queries, letters, sep="")
    fast = prefix_option_logprobs(tiny, [], queries, ids, batch_size=2)[0]
    assert (fast - plain).abs().max() < 1e-4


@pytest.mark.parametrize("mode", ["add", "replace"])
def test_steered_settings_equal_one_steered_full_forward_each(tiny, pieces, mode):
    prefix, queries, _, opt_ids = pieces
    g = torch.Generator().manual_seed(1)
    v1, v2 = torch.randn(4, 64, generator=g) * 4, torch.randn(4, 64, generator=g) * 4
    settings = [Setting("a", v1, 1, 2.0, mode), UNSTEERED, Setting("b", v2, 3, -1.5, mode), Setting("c", v1, 0, 1, mode)]
    fast = prefix_option_logprobs(tiny, prefix, queries, opt_ids, settings, batch_size=3)
    for s_i, s in enumerate(settings):
        for q, (ids, opts) in enumerate(zip(queries, opt_ids)):
            for j, o in enumerate(opts):
                steer = None if s.directions is None else (s.directions, s.layer, s.strength, mode)
                want = manual(tiny, prefix + ids, o, steer)
                assert abs(float(fast[s_i, q, j]) - want) < 1e-4, (s.name, q, j)
    fin = torch.isfinite(fast[1])
    assert (fast[0][fin] - fast[1][fin]).abs().max() > 1e-3  # steering did change the scores


def test_last_token_resid_equals_the_plain_path(tiny, pieces):
    prefix, queries, _, _ = pieces
    plain = last_token_resid(tiny, [prefix + q for q in queries])
    for bs in (1, 4):
        fast = prefix_last_token_resid(tiny, prefix, queries, batch_size=bs)
        assert (fast - plain).abs().max() < 1e-4
    some = prefix_last_token_resid(tiny, prefix, queries, layers=[2, 0])
    assert (some - plain[:, [2, 0]]).abs().max() < 1e-4
    assert (prefix_last_token_resid(tiny, [], queries) - last_token_resid(tiny, queries)).abs().max() < 1e-4


def test_bad_input(tiny, pieces):
    prefix, queries, _, opt_ids = pieces
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
