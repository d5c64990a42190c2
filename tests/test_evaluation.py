import pytest
import torch

from castlens.activations import tokenize
from castlens.evaluation import accuracy_and_macro_f1, option_logprobs, predict
from castlens.models import tiny_hf_model, tokenizer_of
from castlens.steering import steering

PROMPTS = ["Question 1: is it?\nAnswer:", "Review: fine film\nAnswer:"]
OPTIONS = [["duplicate", "not duplicate"], ["negative", "positive", "neutral"]]


def manual(ref, tok, prompt_ids, option, sep=" ", hook=None):
    """Sum of log P(token | prefix) over the option's tokens, one unpadded plain-transformers pass."""
    cont = tok(sep + option, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + cont])
    with torch.no_grad():
        logp = torch.log_softmax(ref(ids).logits[0].double(), -1)
    return sum(logp[len(prompt_ids) - 1 + k, t].item() for k, t in enumerate(cont)), len(cont)


def test_multi_token_options_equal_a_manual_sum(tiny):
    ref = tiny_hf_model(seed=0)
    tok = tokenizer_of(tiny)
    got = option_logprobs(tiny, PROMPTS, OPTIONS, batch_size=3)
    assert got.shape == (2, 3) and got[0, 2] == float("-inf")
    for i, ids in enumerate(tokenize(tiny, PROMPTS)):
        for j, opt in enumerate(OPTIONS[i]):
            want, n_tok = manual(ref, tok, ids, opt)
            assert n_tok > 1  # byte-level: every option is multi-token, so all tokens must be summed
            assert abs(got[i, j].item() - want) < 1e-3


def test_scores_follow_steering(tiny):
    ref = tiny_hf_model(seed=0)
    v = torch.randn(tiny.cfg.n_layers, tiny.cfg.d_model)
    base = option_logprobs(tiny, PROMPTS, OPTIONS)
    with steering(tiny, v, layers=1, strength=4.0):
        steered = option_logprobs(tiny, PROMPTS, OPTIONS)
    assert (steered - base)[:, :2].abs().max() > 1e-2

    def add(module, inputs, output):
        return (output[0] + 4.0 * v[1], *output[1:]) if isinstance(output, tuple) else output + 4.0 * v[1]

    h = ref.model.layers[1].register_forward_hook(add)
    try:
        ids = tokenize(tiny, PROMPTS)[1]
        want, _ = manual(ref, tokenizer_of(tiny), ids, "positive")
    finally:
        h.remove()
    assert abs(steered[1, 1].item() - want) < 1e-3


def test_predict_and_metrics():
    scores = torch.tensor([[-1.0, -2.0, float("-inf")], [-9.0, -6.0, -8.0]])
    assert predict(scores).tolist() == [0, 1]
    # per-character normalisation can flip a choice towards the longer option
    assert predict(torch.tensor([[-2.0, -3.0]]), [["ab", "abcdef"]], normalize="chars").tolist() == [1]
    acc, f1 = accuracy_and_macro_f1([0, 1, 1, 2], [0, 1, 2, 2])
    assert acc == 0.75 and abs(f1 - (1 + 2 / 3 + 2 / 3) / 3) < 1e-12  # per-class F1: 1, 2/3, 2/3
    with pytest.raises(ValueError, match="equally many"):
        accuracy_and_macro_f1([0], [0, 1])
    with pytest.raises(ValueError, match="2 prompts but 1 option lists"):
        option_logprobs(None, PROMPTS, OPTIONS[:1])


def test_steering_at_the_final_layer_reaches_the_scores(tiny):
    """The capture hook must see the steered final residual (steering registered first)."""
    ref = tiny_hf_model(seed=0)
    v = torch.randn(tiny.cfg.n_layers, tiny.cfg.d_model)
    last = tiny.cfg.n_layers - 1
    with steering(tiny, v, layers=last, strength=3.0):
        got = option_logprobs(tiny, PROMPTS[:1], OPTIONS[:1])

    def add(module, inputs, output):
        return (output[0] + 3.0 * v[last], *output[1:]) if isinstance(output, tuple) else output + 3.0 * v[last]

    h = ref.model.layers[last].register_forward_hook(add)
    try:
        want, _ = manual(ref, tokenizer_of(tiny), tokenize(tiny, PROMPTS[:1])[0], "not duplicate")
    finally:
        h.remove()
    assert abs(got[0, 1].item() - want) < 1e-3


def steered_at_prompt_end(ref, tok, prompt_ids, option, layer, add):
    """Independent reference for positions="last": a plain transformers pass of prompt + option with a torch
    hook adding ``add`` to decoder layer ``layer``'s output at the prompt's last token only."""
    def hook(module, inputs, output):
        hs = (output[0] if isinstance(output, tuple) else output).clone()
        hs[:, len(prompt_ids) - 1] += add
        return (hs, *output[1:]) if isinstance(output, tuple) else hs

    h = ref.model.layers[layer].register_forward_hook(hook)
    try:
        return manual(ref, tok, prompt_ids, option)[0]
    finally:
        h.remove()


def test_readme_example_last_steers_each_prompts_last_token(tiny):
    """The README example: under steering(positions="last") option_logprobs steers each row's last *prompt*
    token (before the option, whatever the padding), so the scores move, and each equals a plain forward with a
    manual hook at that index. (Before, "last" hit the last option token, after every position read: +0.)"""
    ref = tiny_hf_model(seed=0)
    v = torch.randn(tiny.cfg.n_layers, tiny.cfg.d_model, generator=torch.Generator().manual_seed(7))
    prompts = PROMPTS + ["x\nAnswer:"]  # three lengths: right padding in every batch
    options = OPTIONS + [["a", "longer option"]]
    base = option_logprobs(tiny, prompts, options)
    with steering(tiny, v, layers=2, strength=4.0, positions="last"):
        scores = option_logprobs(tiny, prompts, options, batch_size=4)
    fin = torch.isfinite(base)
    assert (scores - base)[fin].abs().min() > 1e-3  # every score moved
    for i, ids in enumerate(tokenize(tiny, prompts)):
        for j, opt in enumerate(options[i]):
            want = steered_at_prompt_end(ref, tokenizer_of(tiny), ids, opt, 2, 4.0 * v[2])
            assert abs(scores[i, j].item() - want) < 1e-3, (i, j)


def test_prefix_option_logprobs_equals_option_logprobs_under_last(tiny):
    """castlens.reuse passes explicit position tensors; its steered scores equal option_logprobs under
    steering(positions="last") on the same concatenated ids, so the committed CLI results are unaffected."""
    from castlens.reuse import Setting, prefix_option_logprobs

    tok = tokenizer_of(tiny)
    prefix = tok("Say it.\n\nInput: cat\nAnswer: cat\n\n")["input_ids"]
    queries = [tok(t, add_special_tokens=False)["input_ids"]
               for t in ["Input: dog\nAnswer:", "Input: a longer query here\nAnswer:", "Input: x\nAnswer:"]]
    opts = [["dog", "cat"], ["yes", "no", "maybe"], ["x"]]
    opt_ids = [[tok(" " + o, add_special_tokens=False)["input_ids"] for o in os_] for os_ in opts]
    v = torch.randn(4, 64, generator=torch.Generator().manual_seed(2)) * 3
    for mode in ("add", "replace"):
        fast = prefix_option_logprobs(tiny, prefix, queries, opt_ids, [Setting("s", v, 1, 2.5, mode)],
                                      batch_size=2)[0]
        with steering(tiny, v, 1, 2.5, positions="last", mode=mode):
            plain = option_logprobs(tiny, [prefix + q for q in queries], opts, batch_size=3)
        assert torch.isinf(fast).equal(torch.isinf(plain))
        fin = torch.isfinite(plain)
        assert (fast[fin] - plain[fin]).abs().max() < 1e-4, mode
