import pytest
import torch

from castlens.activations import tokenize
from castlens.evaluation import accuracy_and_macro_f1, option_logprobs, predict
from castlens.models import tiny_hf_model
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
    tok = tiny.castlens_tokenizer
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
        want, _ = manual(ref, tiny.castlens_tokenizer, ids, "positive")
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
        want, _ = manual(ref, tiny.castlens_tokenizer, tokenize(tiny, PROMPTS[:1])[0], "not duplicate")
    finally:
        h.remove()
    assert abs(got[0, 1].item() - want) < 1e-3
