"""Models across devices: a model placed by accelerate (``load_model(..., device_map=...)``) gives the numbers of
the same model (same seed) loaded plainly on one device.

No GPU is needed for the hard case. On a machine without one accelerate runs ``"cpu"`` entries in place and
*offloads* ``"disk"`` entries: their weights are written to the offload folder, the modules hold ``meta``
placeholders, and accelerate's hooks read the weights back around each module's own forward. There a
parameter's ``.device`` says ``meta``, not where the module runs, and code that reads a weight outside its
module's forward finds no data. The maps below offload the input embedding (so castlens must send inputs where
it *runs*: ``castlens.models.input_device``), the two middle decoder layers, the final norm and the unembedding.

Every comparison is against the plain load, within ``TOL``: accelerate hands the same weights back and the
arithmetic is the same, so the measured differences are 0 in float32 and in bfloat16 alike."""

import pytest
import torch
from conftest import TINY_MODELS

from castlens.activations import last_token_resid, mean_resid
from castlens.evaluation import option_logprobs
from castlens.models import (
    ModelError,
    input_device,
    load_model,
    model_name,
    tiny_hf_model,
    tiny_tokenizer,
    tokenizer_of,
)
from castlens.reuse import UNSTEERED, Setting, prefix_last_token_resid, prefix_option_logprobs
from castlens.steering import generate, steering
from castlens.vectors import task_vector, vector_from_prompts

TOL = 1e-5  # dispatched against plain: the same weights, the same operations (measured: exactly 0)
OFFLOADED = ("model.layers.1", "model.layers.2")


def offload_map(name: str) -> dict[str, str]:
    """The embedding, layers 1-2, the final norm and the unembedding on disk; the rest on the CPU. tiny-gemma3
    ties its unembedding to its embedding, so both go to the same place (a split tie is refused by the bridge)."""
    where = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.norm": "disk", "lm_head": "disk"}
    where.update({f"model.layers.{i}": "disk" if f"model.layers.{i}" in OFFLOADED else "cpu" for i in range(4)})
    return where


CASES = [(name, "float32") for name in TINY_MODELS]  # every test
WITH_BF16 = CASES + [("tiny-llama", "bfloat16")]  # the tests of the KV-cache paths (bfloat16 caches and masks)
with_bf16 = pytest.mark.parametrize("pair", WITH_BF16, ids=["-".join(c) for c in WITH_BF16], indirect=True)


@pytest.fixture(scope="module", params=CASES, ids=["-".join(c) for c in CASES])
def pair(request, tmp_path_factory):
    """(plain, dispatched): one model loaded on the CPU, and again with ``offload_map`` (same seed, same dtype)."""
    name, dtype = request.param
    if dtype == "float32":
        plain = request.getfixturevalue("tiny" if name == "tiny-llama" else "tiny_gemma3")
    else:
        plain = load_model(name, device="cpu", dtype=dtype)
    folder = tmp_path_factory.mktemp(f"offload-{name}-{dtype}")
    return plain, load_model(name, dtype=dtype, device_map=offload_map(name), offload_folder=folder)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(torch.isinf(a), torch.isinf(b)) and \
        bool(((a - b).nan_to_num(posinf=0, neginf=0)).abs().max() <= TOL)


def prompts(model) -> tuple[list[str], list[str]]:
    """Few-shot and zero-shot prompts of 20 to 60 tokens (several of tiny-gemma3's 16-token windows)."""
    demos = "Input: hot\nAnswer: cold\n\nInput: up\nAnswer: down\n\n"
    queries = ["Input: big\nAnswer:", "Input: a long query with many words\nAnswer:", "Input: yes\nAnswer:"]
    return [demos + q for q in queries], queries


@with_bf16
def test_the_map_is_applied_and_inputs_go_where_the_embedding_runs(pair):
    plain, model = pair
    hf = model.original_model
    assert hf.hf_device_map == offload_map(model_name(model))
    for i in range(4):
        devices = {p.device.type for p in hf.model.layers[i].parameters()}
        assert devices == ({"meta"} if f"model.layers.{i}" in OFFLOADED else {"cpu"}), i
    assert next(model.parameters()).device.type == "meta"  # the embedding's placeholder comes first
    assert input_device(model) == torch.device("cpu") and model.cfg.device == "cpu"
    assert next(p for p in hf.parameters() if p.device.type != "meta").dtype == next(plain.parameters()).dtype


def test_vectors_equal_the_plain_load(pair):
    plain, model = pair
    few, zero = prompts(model)
    mine = [vector_from_prompts(m, few, zero, name="antonym-by-hand") for m in (plain, model)]
    assert close(mine[0].directions, mine[1].directions) and close(mine[0].samples, mine[1].samples)
    cast = [task_vector(m, "antonym", n=3, shots=2, seed=1) for m in (plain, model)]
    assert close(cast[0].directions, cast[1].directions)
    assert cast[1].directions.dtype == torch.float32 and cast[1].directions.device.type == "cpu"
    assert cast[0].directions.abs().max() > 1e-2  # a real difference, not zeros on both sides


def test_steered_option_scores_and_activations_equal_the_plain_load(pair):
    plain, model = pair
    few, _ = prompts(model)
    options = [["cold", "small", "no"]] * len(few)
    v = torch.randn(4, 64, generator=torch.Generator().manual_seed(2)) * 3
    out = []
    for m in (plain, model):
        with steering(m, v, layers=1, strength=2.0, positions="last"):
            steered = option_logprobs(m, few, options, batch_size=2)
            acts = last_token_resid(m, few, batch_size=2)
            means = mean_resid(m, few, layer=3, batch_size=2)
        out.append((steered, acts, means, option_logprobs(m, few, options)))
    for got, want in zip(out[1], out[0]):
        assert close(got, want)
    assert (out[0][0] - out[0][3]).abs().max() > 1e-3  # the vector did change the scores


@with_bf16
def test_reuse_paths_equal_the_plain_load(pair):
    plain, model = pair
    tok = tokenizer_of(model)
    few, zero = prompts(model)
    prefix = tok(few[0][:few[0].index("Input: big")])["input_ids"]
    queries = [tok(q, add_special_tokens=False)["input_ids"] for q in zero]
    option_ids = [[tok(" " + o, add_special_tokens=False)["input_ids"] for o in ("cold", "small", "no")]] * 3
    g = torch.Generator().manual_seed(3)
    v = torch.randn(4, 64, generator=g) * 3
    settings = [UNSTEERED, Setting("add", v, 2, 2.0), Setting("replace", v, 1, mode="replace"),
                Setting("norm", v, 0, 1.5, norm_preserving=True)]
    scores = [prefix_option_logprobs(m, prefix, queries, option_ids, settings, batch_size=2) for m in (plain, model)]
    resid = [prefix_last_token_resid(m, prefix, queries, batch_size=2) for m in (plain, model)]
    assert close(scores[1], scores[0]) and close(resid[1], resid[0])


@with_bf16
def test_greedy_generation_equals_the_plain_load(pair):
    plain, model = pair
    prompt = tokenizer_of(model)(prompts(model)[0][1])["input_ids"]
    v = torch.randn(4, 64, generator=torch.Generator().manual_seed(4)) * 3
    for positions in ("last", "all"):
        steered = [generate(m, prompt, 6, v, 1, 2.0, positions) for m in (plain, model)]
        assert steered[1] == steered[0], positions
    assert generate(model, prompt, 6) == generate(plain, prompt, 6) != steered[0]


def test_the_bridges_eager_attention_reads_offloaded_weights(pair):
    """The bridge's own attention (the path of attention-internal hooks) reads projection weights itself; it
    must see the real weights of an offloaded layer, not its meta placeholders."""
    plain, model = pair
    ids = torch.tensor([tokenizer_of(model)(prompts(model)[0][1])["input_ids"]])
    names = [f"blocks.{i}.attn.hook_{k}" for i in (1, 2) for k in ("pattern", "z")]
    v = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))
    out = []
    for m in (plain, model):
        with torch.no_grad():
            logits, cache = m.run_with_cache(ids, names_filter=lambda n: n in names)
            with steering(m, v, layers=2, strength=2.0, attention="eager"):
                eager = m(ids)
        out.append([logits, eager, *(cache[n] for n in names)])
    for got, want in zip(out[1], out[0]):
        assert close(got.float(), want.float())


def test_auto_map_within_a_memory_limit_offloads_to_disk(tiny, tmp_path):
    """``device_map="auto"`` with a CPU budget smaller than the model (about 0.7 MB) spills layers to disk."""
    model = load_model("tiny-llama", device_map="auto", max_memory={"cpu": "300KB"}, offload_folder=tmp_path)
    placed = model.original_model.hf_device_map
    assert "disk" in placed.values() and "cpu" in placed.values(), placed
    few, zero = prompts(model)
    assert close(last_token_resid(model, few), last_token_resid(tiny, few))
    assert close(option_logprobs(model, zero, [["a", "b"]] * 3), option_logprobs(tiny, zero, [["a", "b"]] * 3))


def test_a_model_folder_loads_through_from_pretrained_with_a_device_map(tmp_path):
    """Models read from files (local folders, hub ids, the embedded GGUF caches) get the map from
    ``from_pretrained``, which loads each weight straight to its place."""
    folder = tmp_path / "llama"
    tiny_hf_model(seed=7).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    plain = load_model(str(folder), device="cpu")
    model = load_model(str(folder), device_map=offload_map("tiny-llama"), offload_folder=tmp_path / "offload")
    assert model.original_model.hf_device_map["model.layers.1"] == "disk"
    few, _ = prompts(model)
    options = [["cold", "small"]] * 3
    assert close(option_logprobs(model, few, options), option_logprobs(plain, few, options))
    assert generate(model, tokenizer_of(model)(few[0])["input_ids"], 6) == \
        generate(plain, tokenizer_of(plain)(few[0])["input_ids"], 6)


def test_placements_that_cannot_work_are_refused_before_loading(tmp_path):
    with pytest.raises(ValueError, match=r"pass device \('cpu'\) or device_map \('auto'\), not both"):
        load_model("tiny-llama", device="cpu", device_map="auto")
    with pytest.raises(ValueError, match="max_memory and offload_folder only apply with a device_map"):
        load_model("tiny-llama", max_memory={"cpu": "1GB"})
    with pytest.raises(ModelError, match=r"puts model.layers.1, model.layers.2 on 'disk': pass offload_folder"):
        load_model("tiny-llama", device_map={**offload_map("tiny-llama"), "model.embed_tokens": "cpu",
                                             "model.norm": "cpu", "lm_head": "cpu"})
    mixed = {**{k: 0 for k in offload_map("tiny-llama")}, "model.layers.3": "cpu"}  # checked before any GPU use
    with pytest.raises(ModelError, match=r"offloads model.layers.3 to the CPU or disk while other modules are on a "
                                         r"GPU: TransformerLens 4.3's TransformerBridge refuses"):
        load_model("tiny-llama", device_map=mixed)
    with pytest.raises(ValueError, match="dtype must be a floating-point torch dtype"):
        load_model("tiny-llama", device="cpu", dtype="int8")


def test_a_transfer_run_on_a_disk_offloaded_model_equals_the_plain_one(tmp_path):
    """The CLI end to end with --device-map (a JSON file) and --offload-folder: the run's weight checksum (read
    through accelerate's hooks, not from the meta placeholders) and its results equal the plain load's."""
    import json

    from castlens.cli import main

    mapping = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "disk", "lm_head": "disk"}
    mapping.update({f"model.layers.{i}": "disk" if i in (1, 2) else "cpu" for i in range(4)})
    (tmp_path / "map.json").write_text(json.dumps(mapping))
    args = ["transfer", "--model", "tiny-llama", "--no-png", "--sources", "first_item", "--targets", "plural",
            "--n", "2", "--shots", "1", "--dev", "3", "--limit", "4", "--layers", "1,2", "--strengths", "1",
            "--n-boot", "20"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert main([*args, "--device-map", str(tmp_path / "map.json"), "--offload-folder", str(tmp_path / "off"),
                 "--out", str(tmp_path / "placed")]) == 0
    for name in ("config.json", "results.csv"):
        assert (tmp_path / "placed" / name).read_text() == (tmp_path / "plain" / name).read_text()
    with pytest.raises(SystemExit):  # argparse: usage and the reason, exit code 2
        main([*args, "--device-map", "nowhere.json", "--out", str(tmp_path / "bad")])
