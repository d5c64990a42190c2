import json

import pytest
import torch
from conftest import hf_last_token_states

from castlens.activations import tokenize
from castlens.models import tiny_hf_model
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


def test_principal_direction_recovers_a_planted_shared_direction():
    from castlens.vectors import principal_direction

    g = torch.Generator().manual_seed(0)
    n, d = 40, 48
    u = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    samples = torch.randn(n, 2, d, generator=g) * 0.5
    samples[:, 1] += 5 * u * (1 + 0.2 * torch.randn(n, 1, generator=g))  # layer 1: shared offset, varying size
    v = principal_direction(samples)
    cos = torch.nn.functional.cosine_similarity(v[1], u, dim=0)
    assert cos > 0.98  # signed to agree with the mean (not -u)
    assert torch.allclose(v.norm(dim=-1), samples.mean(0).norm(dim=-1), rtol=1e-5)
    # numpy reference: top right singular vector of the uncentred layer-1 matrix
    _, _, vt = torch.linalg.svd(samples[:, 1].double(), full_matrices=False)
    assert abs(abs(float(torch.nn.functional.cosine_similarity(v[1].double(), vt[0], dim=0))) - 1) < 1e-6
    # centred: the first component of the centred matrix (SVD reference), not the shared offset
    c = principal_direction(samples, centred=True)
    centred = samples[:, 1].double() - samples[:, 1].double().mean(0)
    _, _, vt_c = torch.linalg.svd(centred, full_matrices=False)
    assert abs(abs(float(torch.nn.functional.cosine_similarity(c[1].double(), vt_c[0], dim=0))) - 1) < 1e-6
    assert torch.allclose(c.norm(dim=-1), samples.mean(0).norm(dim=-1), rtol=1e-5)


def test_random_like_matches_norms_only():
    from castlens.vectors import random_like

    v = torch.randn(5, 256) * torch.arange(1, 6)[:, None]
    r = random_like(v, seed=3)
    assert torch.allclose(r.norm(dim=-1), v.norm(dim=-1), rtol=1e-5)
    assert torch.nn.functional.cosine_similarity(r, v).abs().max() < 0.3  # ~1/sqrt(256) apart
    assert torch.equal(r, random_like(v, seed=3)) and not torch.equal(r, random_like(v, seed=4))


def test_icl_task_vector_equals_plain_transformers(tiny):
    """Mean last-token state of demos + dummy query, from an unwrapped copy of the weights."""
    from conftest import hf_last_token_states

    from castlens.vectors import icl_task_vector

    tv = icl_task_vector(tiny, "antonym", n=3, shots=2, seed=0)
    ref_model = tiny_hf_model(seed=0)
    prompts = [p["few"] for p in tv.prompts]
    assert all(p.endswith("\n\nx\nAnswer:") and p.count("\nAnswer: ") == 2 for p in prompts)
    manual = torch.stack([hf_last_token_states(ref_model, ids) for ids in tokenize(tiny, prompts)]).mean(0)
    assert (tv.directions - manual).abs().max() < 1e-4


def test_apply_steers_like_steering_and_removes_its_hooks(tiny):
    """``v.apply(...)`` equals a plain forward with a manual hook adding strength * v[L] at the last prompt token."""
    import torch

    from castlens.activations import tokenize

    v = task_vector(tiny, "antonym", n=3, shots=2, seed=0)
    ids = torch.tensor([tokenize(tiny, ["hot\nAnswer:"])[0]])

    def manual(x, hook):
        x = x.clone()
        x[:, -1] += 4.0 * v.directions[2]
        return x

    with tiny.hooks(fwd_hooks=[("blocks.2.hook_resid_post", manual)]):
        want = tiny(ids, return_type="logits")
    with v.apply(tiny, layers=2, strength=4.0):
        got = tiny(ids, return_type="logits")
    plain = tiny(ids, return_type="logits")
    assert (got - want).abs().max() < 1e-4 and (got - plain).abs().max() > 1e-3


def test_vector_from_your_own_prompts_equals_a_manual_mean(tiny):
    """A CAA-style vector from user pairs: the mean of plain-transformers last-token differences."""
    import torch
    from conftest import hf_last_token_states

    from castlens.activations import tokenize
    from castlens.vectors import vector_from_prompts

    pos, neg = ["I love this.\nAnswer:", "Great film.\nAnswer:"], ["I hate this.\nAnswer:", "Awful film.\nAnswer:"]
    v = vector_from_prompts(tiny, pos, neg, name="sentiment")
    ref = tiny_hf_model(seed=0)
    manual = torch.stack([hf_last_token_states(ref, p) - hf_last_token_states(ref, n)
                          for p, n in zip(tokenize(tiny, pos), tokenize(tiny, neg))]).mean(0)
    assert (v.directions - manual).abs().max() < 1e-4 and v.samples.shape == (2, 4, 64)
    ids = tokenize(tiny, pos)[0]
    v2 = vector_from_prompts(tiny, [ids, tokenize(tiny, pos)[1]], neg)  # token ids work too
    assert torch.allclose(v2.directions, v.directions, atol=1e-5)
    assert v.prompts[0]["positive"] == pos[0] and len(v.prompts[0]["positive_ids_sha256"]) == 64
    assert v2.prompts[0]["positive"] is None
    assert v2.prompts[0]["positive_ids_sha256"] == v.prompts[0]["positive_ids_sha256"]
