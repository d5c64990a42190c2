import time

import pytest

from castlens.models import ModelError, cache_dir, load_model


def test_unknown_names_fail_fast_and_clearly(monkeypatch):
    with pytest.raises(ModelError, match="unknown model 'gpt-nine'"):
        load_model("gpt-nine")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(ModelError, match="hub is not reachable from here"):
        load_model("some-org/not-a-cached-model")
    assert time.perf_counter() - t < 20


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CASTLENS_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path


def test_tiny_model_is_seeded_and_hooked(tiny):
    other = load_model("tiny-llama", device="cpu")
    a = dict(tiny.original_model.named_parameters())
    assert all((p - a[n]).abs().max() == 0 for n, p in other.original_model.named_parameters())
    assert "blocks.3.hook_resid_post" in tiny.hook_dict or "blocks.3.hook_out" in tiny.hook_dict


def test_tiny_tokenizer_is_deterministic():
    from castlens.models import tiny_tokenizer

    ids = tiny_tokenizer()("héllo, 你").input_ids
    assert all(tiny_tokenizer()("héllo, 你").input_ids == ids for _ in range(5))
    assert tiny_tokenizer().decode(ids) == "<bos>héllo, 你"
