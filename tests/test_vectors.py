import json

import pytest
import torch
from conftest import hf_last_token_states

from castlens.activations import tokenize
from castlens.models import load_model, tiny_hf_model
from castlens.prompts import contrastive_pairs
from castlens.tasks import load_task
from castlens.vectors import SteeringVector, VectorFileError, compute_vectors, load_vectors, save_vectors, task_vector


def test_vector_equals_manual_mean_of_plain_transformers_differences(tiny):
    v = task_vector(tiny, "antonym", n=6, shots=3, seed=1)
    ref_model = tiny_hf_model(seed=0)
    pairs = contrastive_pairs(load_task("antonym"), 6, 3, seed=1)
    diffs = []
    for p in pairs:
        zero, few = tokenize(tiny, [p.zero, p.few])
        diffs.append(hf_last_token_states(ref_model, few) - hf_last_token_states(ref_model, zero))
    manual = sum(diffs) / len(diffs)
    assert v.directions.shape == (tiny.cfg.n_layers, tiny.cfg.d_model)
    assert (v.directions - manual).abs().max() < 1e-4
    assert (v.samples - torch.stack(diffs)).abs().max() < 1e-4
    # the record lists the exact prompts given to the tokenizer
    assert [r["few"] for r in v.prompts] == [p.few for p in pairs]
    assert all(r["few_starts_with_bos"] for r in v.prompts)


def test_save_load_round_trip(tiny, tmp_path):
    vs = compute_vectors(tiny, ["add", "first_item"], n=4, shots=2)
    path = save_vectors(tmp_path / "v", vs)
    assert path.name == "v.safetensors" and (tmp_path / "v.json").is_file()
    back = load_vectors(path, model=tiny)
    assert set(back) == {"add", "first_item"}
    for k in vs:
        assert torch.equal(back[k].directions, vs[k].directions) and torch.equal(back[k].samples, vs[k].samples)
        assert back[k].metadata() == vs[k].metadata()
    meta = json.loads((tmp_path / "v.json").read_text())["vectors"]["add"]
    assert meta["hook"] == "blocks.{layer}.hook_resid_post" and meta["weight_processing"].startswith("none")
    assert meta["model"] == "tiny-llama" and meta["castlens_version"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_unicode_metadata_round_trip(tmp_path):
    v = SteeringVector(torch.randn(3, 8), model="m", task="tâche ✓", n_samples=1, shots=0, seed=0,
                       prompts=[{"zero": "", "few": "你好\n"}])
    assert load_vectors(save_vectors(tmp_path / "u", v))["tâche ✓"].prompts == v.prompts


@pytest.fixture
def saved(tmp_path):
    v = SteeringVector(torch.randn(4, 64), model="tiny-llama", task="t", n_samples=2, shots=1, seed=0)
    return save_vectors(tmp_path / "v", v), v


def test_wrong_model_or_width(saved, tiny):
    path, v = saved
    load_vectors(path, model=tiny)
    other = SteeringVector(torch.randn(4, 32), model="tiny-llama", task="t", n_samples=2, shots=1, seed=0)
    p2 = save_vectors(path.with_name("w"), other)
    with pytest.raises(VectorFileError, match=r"w.safetensors, vector 't': made for model 'tiny-llama' .*d_model 32"):
        load_vectors(p2, model=tiny)
    p3 = save_vectors(path.with_name("n"), SteeringVector(torch.randn(4, 64), model="gpt2", task="t",
                                                            n_samples=1, shots=1, seed=0))
    with pytest.raises(VectorFileError, match="made for model 'gpt2'"):
        load_vectors(p3, model=tiny)


def test_corrupt_truncated_missing_nan(saved):
    path, _ = saved
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(VectorFileError, match="do not match"):
        load_vectors(path)
    path.write_bytes(blob)
    js = path.with_suffix(".json")
    doc = json.loads(js.read_text())
    js.write_text("{not json")
    with pytest.raises(VectorFileError, match="not valid JSON"):
        load_vectors(path)
    doc["vectors"]["t"]["d_model"] = 65
    js.write_text(json.dumps(doc))
    with pytest.raises(VectorFileError, match=r"shape \(4, 64\), expected"):
        load_vectors(path)
    with pytest.raises(VectorFileError, match="file not found"):
        load_vectors(path.with_name("absent"))
    bad = SteeringVector(torch.full((2, 3), float("nan")), model="m", task="t", n_samples=1, shots=1, seed=0)
    with pytest.raises(ValueError, match="NaN"):
        save_vectors(path.with_name("nan"), bad)
    # a NaN smuggled into a consistent file is still caught on load
    from safetensors.torch import save
    import hashlib
    blob = save({"t": torch.full((4, 64), float("inf"))})
    path.write_bytes(blob)
    doc["vectors"]["t"]["d_model"] = 64
    doc["sha256"] = hashlib.sha256(blob).hexdigest()
    js.write_text(json.dumps(doc))
    with pytest.raises(VectorFileError, match="NaN or inf"):
        load_vectors(path)
