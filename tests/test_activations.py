import pytest
import torch
from conftest import hf_last_token_states

from castlens.activations import PromptTooLongError, last_token_resid, tokenize
from castlens.models import tiny_hf_model
from castlens.models import tokenizer_of

PROMPTS = [
    "a",
    "Give the opposite of the word.\n\nhot\nAnswer: cold\n\nup\nAnswer: down\n\nfast\nAnswer: slow\n\nbig\nAnswer:",
    "short one",
    "unicode: médium 你好 ✓",
    "x " * 120,
]


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("batch_size", [2, 5])
def test_batched_equals_one_by_one(tiny, padding_side, batch_size):
    alone = torch.cat([last_token_resid(tiny, [p]) for p in PROMPTS])
    batched = last_token_resid(tiny, PROMPTS, batch_size=batch_size, padding_side=padding_side)
    assert batched.shape == (len(PROMPTS), tiny.cfg.n_layers, tiny.cfg.d_model)
    assert (batched - alone).abs().max() < 1e-4


def test_equals_plain_transformers(tiny):
    """Against an unwrapped copy of the same weights, read with torch hooks (independent of TransformerLens)."""
    ref_model = tiny_hf_model(seed=0)
    got = last_token_resid(tiny, PROMPTS, batch_size=3, padding_side="left")
    for i, ids in enumerate(tokenize(tiny, PROMPTS)):
        ref = hf_last_token_states(ref_model, ids)
        assert (got[i] - ref).abs().max() < 1e-4, i


def test_layer_subset_and_order(tiny):
    full = last_token_resid(tiny, PROMPTS[:3])
    sub = last_token_resid(tiny, PROMPTS[:3], layers=[2, 0])
    assert torch.equal(sub[:, 0], full[:, 2]) and torch.equal(sub[:, 1], full[:, 0])


def test_token_ids_and_chat(tiny):
    ids = tokenize(tiny, PROMPTS[:2])
    assert ids[0][0] == tokenizer_of(tiny).bos_token_id and ids[0].count(ids[0][0]) == 1
    assert torch.equal(last_token_resid(tiny, ids), last_token_resid(tiny, PROMPTS[:2]))
    chat = tokenize(tiny, ["hi"], chat=True)[0]
    assert tokenizer_of(tiny).decode(chat) == "<bos>user: hi<eos><bos>assistant:"


def test_hooks_removed_and_attention_restored(tiny):
    from castlens.models import residual_stream_only

    attn_before = [b.original_component.self_attn for b in tiny.blocks]
    last_token_resid(tiny, PROMPTS[:2])
    with pytest.raises(RuntimeError):
        with residual_stream_only(tiny):
            raise RuntimeError("boom")
    assert [b.original_component.self_attn for b in tiny.blocks] == attn_before
    assert tiny.original_model.config._attn_implementation == "eager"
    assert all(not hp._forward_hooks for hp in tiny.hook_dict.values())


def test_bad_inputs(tiny):
    with pytest.raises(PromptTooLongError, match="prompt 1 has 6.. tokens, more than the model's context of 512"):
        last_token_resid(tiny, ["ok", "y" * 600])
    with pytest.raises(ValueError, match="out of range"):
        last_token_resid(tiny, ["ok"], layers=[4])
    with pytest.raises(ValueError, match="no prompts"):
        last_token_resid(tiny, [])


def test_bfloat16_runs_close_to_float32(tiny):
    from castlens.models import load_model

    bf = load_model("tiny-llama", device="cpu", dtype=torch.bfloat16)
    a, b = last_token_resid(tiny, PROMPTS[:3]), last_token_resid(bf, PROMPTS[:3])
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    cos = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1))
    assert (cos > 0.99).all()


def test_mean_resid_equals_the_mean_of_a_single_prompt_cache(tiny):
    from castlens.activations import mean_resid

    prompts = [list(range(40, 40 + n)) for n in (5, 1, 23, 9)]
    got = mean_resid(tiny, prompts, layer=2, batch_size=3)  # first token (attention sink) left out
    every = mean_resid(tiny, prompts, layer=2, batch_size=2, skip=0)
    for i, p in enumerate(prompts):
        _, cache = tiny.run_with_cache(torch.tensor([p]), names_filter="blocks.2.hook_resid_post")
        h = cache["blocks.2.hook_resid_post"][0].float()
        assert (got[i] - (h[1:] if len(p) > 1 else h).mean(0)).abs().max() < 1e-4
        assert (every[i] - h.mean(0)).abs().max() < 1e-4
    with pytest.raises(ValueError, match="out of range"):
        mean_resid(tiny, prompts, layer=7)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_equals_one_by_one_and_plain_transformers_past_the_window(tiny_any, padding_side):
    """On tiny-llama and on tiny-gemma3 (sliding window 16), with prompts of up to 240 tokens: padding keeps
    every row as it is alone, and each row equals the plain Hugging Face decoder layers' outputs."""
    from conftest import plain_hf

    from castlens.models import TINY_GEMMA3_WINDOW

    ids = tokenize(tiny_any, PROMPTS)
    assert sum(len(s) > 3 * TINY_GEMMA3_WINDOW for s in ids) >= 2
    alone = torch.cat([last_token_resid(tiny_any, [s]) for s in ids])
    batched = last_token_resid(tiny_any, ids, batch_size=3, padding_side=padding_side)
    assert (batched - alone).abs().max() < 1e-4
    ref = plain_hf(tiny_any)
    for i, s in enumerate(ids):
        assert (alone[i] - hf_last_token_states(ref, s)).abs().max() < 1e-4, i
