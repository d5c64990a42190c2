"""castlens.export: llama.cpp control-vector GGUF files and the repeng / steering-vectors conversions."""

import json
import sys
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch

from castlens import export as ex
from castlens.export import ControlVectorFileError, export_gguf, import_gguf
from castlens.models import tiny_hf_model
from castlens.steering import steering
from castlens.vectors import SteeringVector, task_vector

IDS = torch.tensor([[256, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]])  # <bos> "Hello world"


@pytest.fixture(scope="module")
def vec(tiny):
    return task_vector(tiny, "antonym", n=4, shots=2, seed=1, keep_samples=False)


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model(seed=0)  # the same weights as the `tiny` bridge


def logits(model, ids=IDS):
    with torch.no_grad():
        out = model(ids, return_type="logits") if hasattr(model, "cfg") else model(ids).logits
    return out.float()


def steered(model, vector, layers, strength=1.0):
    with steering(model, vector, layers=layers, strength=strength):
        return logits(model)


def write_raw_gguf(path, tensors, arch="controlvector", hint="llama"):
    """A GGUF file made with the gguf package alone, as another tool would make it."""
    w = gguf.GGUFWriter(str(path), arch)
    if hint is not None:
        w.add_string(f"{arch}.model_hint", hint)
    for name, array in tensors.items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def field(reader, key):
    f = reader.get_field(key)
    return None if f is None else f.contents()


# ---------------------------------------------------------------- the file
def test_gguf_file_has_llama_cpp_layout_and_repeng_metadata(vec, tmp_path):
    path = export_gguf(vec, tmp_path / "antonym.gguf")
    r = gguf.GGUFReader(path)
    assert field(r, "general.architecture") == "controlvector"
    assert field(r, "controlvector.model_hint") == "tiny-llama"
    assert r.get_field("controlvector.layer_count").types == [gguf.GGUFValueType.UINT32]
    assert field(r, "controlvector.layer_count") == 3
    # one 1-D F32 tensor per steerable block; block 0 is absent (llama.cpp never steers it)
    assert [t.name for t in r.tensors] == ["direction.1", "direction.2", "direction.3"]
    for t in r.tensors:
        layer = int(t.name.split(".")[1])
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [64] and t.data.dtype == np.float32
        assert np.array_equal(t.data, vec.directions[layer].numpy())
    assert field(r, "castlens.layers") == [1, 2, 3] and field(r, "castlens.strength") == 1.0
    assert json.loads(field(r, "castlens.vector"))["task"] == "antonym"


def test_chosen_layers_and_strength_are_baked_in(vec, tmp_path):
    r = gguf.GGUFReader(export_gguf(vec, tmp_path / "a.gguf", layers=[2], strength=4.0, model_hint="llama"))
    assert [t.name for t in r.tensors] == ["direction.2"]
    assert np.allclose(r.tensors[0].data, 4.0 * vec.directions[2].numpy())
    assert field(r, "controlvector.layer_count") == 1 and field(r, "controlvector.model_hint") == "llama"


def test_layer_numbering_follows_llama_cpp_offsets(vec, tmp_path):
    """llama.cpp's arithmetic, re-done in numpy: the loader puts direction.N at buffer offset n_embd*(N-1)
    (common/common.cpp), the applier fills tensors[il] from offset n_embd*(il-1) for il = 1..n_layer-1
    (src/llama-adapter.cpp) and adds tensors[il] to the output of block il. Block il must get castlens v[il]."""
    r = gguf.GGUFReader(export_gguf(vec, tmp_path / "a.gguf"))
    n_layer, n_embd = vec.n_layers, vec.d_model
    buf = np.zeros(n_embd * (n_layer - 1), dtype=np.float32)
    for t in r.tensors:
        n = int(t.name.removeprefix("direction."))
        assert n != 0
        buf[n_embd * (n - 1): n_embd * n] += t.data
    applied = {il: buf[n_embd * (il - 1): n_embd * il] for il in range(1, n_layer)}
    for il, added in applied.items():
        assert np.array_equal(added, vec.directions[il].numpy())


# ---------------------------------------------------------------- round trip through the file
def test_reimported_vector_steers_like_the_original(tiny, vec, tmp_path):
    back = import_gguf(export_gguf(vec, tmp_path / "a.gguf"), tiny.cfg.n_layers, tiny.cfg.d_model)
    assert torch.equal(back.directions[1:], vec.directions[1:]) and not back.directions[0].any()
    for layers in ([2], [1, 2, 3]):
        assert torch.allclose(steered(tiny, back, layers, 2.0), steered(tiny, vec, layers, 2.0))
    assert not torch.allclose(steered(tiny, back, [2], 2.0), logits(tiny), atol=1e-3)  # it does steer


def test_baked_strength_steers_like_castlens_strength(tiny, vec, tmp_path):
    back = import_gguf(export_gguf(vec, tmp_path / "a.gguf", layers=[2], strength=4.0), 4, 64)
    assert torch.allclose(steered(tiny, back, [2]), steered(tiny, vec, [2], 4.0), atol=1e-5)
    assert torch.allclose(steered(tiny, back, [1, 2, 3]), steered(tiny, vec, [2], 4.0), atol=1e-5)  # rest is zero


def test_import_restores_provenance(vec, tmp_path):
    back = import_gguf(export_gguf(vec, tmp_path / "a.gguf", layers=[1, 3], strength=0.5), 4, 64)
    assert (back.model, back.task, back.n_samples, back.shots, back.seed) == ("tiny-llama", "antonym", 4, 2, 1)
    assert back.prompts == vec.prompts
    assert back.method == "mean_difference (via llama.cpp GGUF a.gguf: blocks [1, 3], strength 0.5)"
    assert import_gguf(tmp_path / "a.gguf", 4, 64, model="m", task="t", scale=2.0).directions[1].allclose(
        vec.directions[1])


def test_import_file_from_another_tool(tmp_path):
    a, b = np.full(64, 0.5, np.float32), np.arange(64, dtype=np.float32)
    path = write_raw_gguf(tmp_path / "other.gguf", {"direction.3": a, "direction.1": b})
    v = import_gguf(path, 4, 64)
    assert v.model == "llama" and v.task == "other" and v.method.startswith("imported from llama.cpp")
    assert torch.equal(v.directions[1], torch.from_numpy(b)) and torch.equal(v.directions[3], torch.from_numpy(a))
    assert not v.directions[0].any() and not v.directions[2].any()  # absent layers are zero
    assert import_gguf(write_raw_gguf(tmp_path / "nohint.gguf", {"direction.2": a}, hint=None), 4, 64).model \
        == "unknown"


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("n_layers,d_model,message", [(4, 32, "d_model is 32"), (3, 64, "only 3 blocks")])
def test_import_wrong_width_or_depth(vec, tmp_path, n_layers, d_model, message):
    path = export_gguf(vec, tmp_path / "a.gguf")
    with pytest.raises(ControlVectorFileError, match=message) as err:
        import_gguf(path, n_layers, d_model)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("arch,tensors,message", [
    ("llama", {"token_embd.weight": np.zeros((8, 64), np.float32)}, "general.architecture is 'llama'"),
    ("controlvector", {"token_embd.weight": np.zeros(64, np.float32)}, "not named direction.N"),
    ("controlvector", {"direction.x": np.zeros(64, np.float32)}, "not named direction.N"),
    ("controlvector", {"direction.0": np.zeros(64, np.float32)}, "refuses layer index 0"),
    ("controlvector", {"direction.1": np.zeros(64, np.float16)}, "llama.cpp needs F32"),
    ("controlvector", {"direction.1": np.zeros((2, 32), np.float32)}, "llama.cpp needs 1-D"),
    ("controlvector", {"direction.1": np.full(64, np.nan, np.float32)}, "NaN or inf"),
    ("controlvector", {}, "no direction tensors"),
])
def test_import_rejects_files_that_are_not_control_vectors(tmp_path, arch, tensors, message):
    path = write_raw_gguf(tmp_path / "bad.gguf", tensors, arch=arch)
    with pytest.raises(ControlVectorFileError, match=message) as err:
        import_gguf(path, 4, 64)
    assert str(path) in str(err.value)


def test_import_rejects_corrupt_and_missing_files(vec, tmp_path):
    good = export_gguf(vec, tmp_path / "good.gguf").read_bytes()
    cases = {"noise.gguf": b"not a gguf file at all" * 10, "empty.gguf": b"",
             "truncated.gguf": good[: len(good) - 100], "header.gguf": good[:40]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ControlVectorFileError) as err:
            import_gguf(tmp_path / name, 4, 64)
        assert str(tmp_path / name) in str(err.value), name
    with pytest.raises(ControlVectorFileError, match="file not found"):
        import_gguf(tmp_path / "absent.gguf", 4, 64)


@pytest.mark.parametrize("layers,message", [([0, 2], "layer 0 cannot be exported"), ([4], r"out of range 1 \.\. 3"),
                                            ([], "no layers"), ([2, 2], "repeat")])
def test_export_rejects_bad_layers(vec, tmp_path, layers, message):
    with pytest.raises(ValueError, match=message):
        export_gguf(vec, tmp_path / "a.gguf", layers=layers)
    assert list(tmp_path.iterdir()) == []


def test_export_rejects_nan_without_writing(vec, tmp_path):
    bad = SteeringVector(directions=torch.full((4, 64), float("nan")), model="m", task="t", n_samples=1, shots=0,
                         seed=0)
    with pytest.raises(ValueError, match="NaN or inf"):
        export_gguf(bad, tmp_path / "a.gguf")
    with pytest.raises(ValueError, match="strength must be finite"):
        export_gguf(vec, tmp_path / "a.gguf", strength=float("inf"))
    assert list(tmp_path.iterdir()) == []


def test_failed_export_leaves_no_partial_file(vec, tmp_path, monkeypatch):
    target = export_gguf(vec, tmp_path / "a.gguf", layers=[1])
    before = target.read_bytes()

    def broken(self, *args, **kwargs):
        self.fout[0].write(b"half a tensor")
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(vec, tmp_path / "a.gguf", layers=[1, 2, 3])
    with pytest.raises(OSError, match="disk full"):
        export_gguf(vec, tmp_path / "new.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf"]  # no new file, no temporary left
    assert target.read_bytes() == before


# ---------------------------------------------------------------- repeng and steering-vectors
def test_missing_package_is_named(vec, monkeypatch):
    monkeypatch.setitem(sys.modules, "steering_vectors", None)
    monkeypatch.setitem(sys.modules, "repeng", None)
    with pytest.raises(ImportError, match="needs the package steering-vectors"):
        ex.to_steering_vectors(vec)
    with pytest.raises(ImportError, match="needs the package repeng"):
        ex.to_repeng(vec)


def test_from_documented_structures_without_the_packages(vec):
    control = SimpleNamespace(model_type="llama",  # repeng.ControlVector's fields; -1 is the last layer
                              directions={2: vec.directions[2].numpy(), -1: vec.directions[3].numpy()})
    steer = SimpleNamespace(layer_activations={1: vec.directions[1]}, layer_type="decoder_block")  # steering-vectors'

    v = ex.from_repeng(control, 4)
    assert v.model == "llama" and torch.equal(v.directions[2:], vec.directions[2:]) and not v.directions[:2].any()
    s = ex.from_steering_vectors(steer, 4, model="tiny-llama")
    assert torch.equal(s.directions[1], vec.directions[1]) and s.directions.abs().sum(1).nonzero().tolist() == [[1]]
    steer.layer_type = "mlp"
    with pytest.raises(ValueError, match="layer_type 'mlp'"):
        ex.from_steering_vectors(steer, 4)
    with pytest.raises(ValueError, match="layer 7 out of range"):
        ex.from_repeng(SimpleNamespace(directions={7: np.zeros(64)}), 4)
    with pytest.raises(ValueError, match="different widths"):
        ex.from_repeng(SimpleNamespace(directions={1: np.zeros(64), 2: np.zeros(32)}), 4)
    with pytest.raises(TypeError, match="expected a repeng ControlVector"):
        ex.from_repeng(vec.directions, 4)


@pytest.fixture
def repeng_pkg():
    pytest.importorskip("sklearn")
    try:
        return ex._import_repeng()
    except ImportError:
        pytest.skip("repeng is not installed (pip install --no-deps repeng==0.4.0)")


def test_repeng_round_trip_and_steering(tiny, hf, vec, repeng_pkg):
    cv = ex.to_repeng(vec)
    assert isinstance(cv, repeng_pkg.ControlVector) and sorted(cv.directions) == [0, 1, 2, 3]
    assert all(a.dtype == np.float32 for a in cv.directions.values())
    back = ex.from_repeng(cv, 4)
    assert torch.equal(back.directions, vec.directions) and back.model == "tiny-llama"
    # repeng's ControlModel adds directions[L] to the output of model.layers[L]: castlens blocks.L
    model = repeng_pkg.ControlModel(hf, [2])
    try:
        model.set_control(ex.to_repeng(vec, layers=[2]), 3.0)
        with torch.no_grad():
            theirs = model(IDS).logits
    finally:
        model.reset()
        model.unwrap()
    assert torch.allclose(theirs, steered(tiny, vec, [2], 3.0), atol=1e-4)


def test_repeng_gguf_files_interchange(vec, tmp_path, repeng_pkg):
    # repeng's own writer -> castlens reader
    path = tmp_path / "repeng.gguf"
    ex.to_repeng(vec, layers=[1, 2, 3], model_type="llama").export_gguf(path)
    v = import_gguf(path, 4, 64)
    assert torch.equal(v.directions[1:], vec.directions[1:]) and v.model == "llama"
    # castlens writer -> repeng reader
    cv = repeng_pkg.ControlVector.import_gguf(export_gguf(vec, tmp_path / "castlens.gguf"))
    assert cv.model_type == "tiny-llama" and sorted(cv.directions) == [1, 2, 3]
    assert all(np.array_equal(cv.directions[L], vec.directions[L].numpy()) for L in (1, 2, 3))


def test_steering_vectors_round_trip_and_steering(tiny, hf, vec):
    try:
        import steering_vectors as sv_pkg
    except ImportError:
        pytest.skip("steering-vectors is not installed (pip install --no-deps steering-vectors==0.12.2)")
    sv = ex.to_steering_vectors(vec)
    assert isinstance(sv, sv_pkg.SteeringVector) and sv.layer_type == "decoder_block"
    assert sorted(sv.layer_activations) == [0, 1, 2, 3]
    back = ex.from_steering_vectors(sv, 4, model="tiny-llama")
    assert torch.equal(back.directions, vec.directions)
    # steering-vectors hooks the output of model.layers.{L}: castlens blocks.L (block 0 included)
    for layers in ([0], [2], [1, 3]):
        with torch.no_grad(), ex.to_steering_vectors(vec, layers=layers).apply(hf, multiplier=2.0):
            theirs = hf(IDS).logits
        assert torch.allclose(theirs, steered(tiny, vec, layers, 2.0), atol=1e-4), layers


def test_peers_benchmark_runs_and_agrees(tmp_path):
    """benchmarks/peers.py checks every peer's vector equals castlens' before timing anything."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).parent.parent / "benchmarks" / "peers.py"
    spec = importlib.util.spec_from_file_location("peers_benchmark", script)
    peers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peers)
    out = tmp_path / "peers.json"
    result = peers.main(["--n", "4", "--shots", "1", "--repeats", "1", "--batch-size", "4", "--out", str(out)])
    assert json.loads(out.read_text())["pairs"] == 4
    assert {"castlens", "tl_run_with_cache", "hf_hidden_states"} <= set(result["seconds_median"])
    assert all(err <= peers.TOLERANCE for err in result["max_relative_difference_from_castlens"].values())
