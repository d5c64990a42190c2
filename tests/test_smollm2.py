"""The real default model: castlens' vectors against plain transformers on the same weights."""
import pytest
import torch
from conftest import hf_last_token_states

from castlens.activations import last_token_resid, tokenize
from castlens.models import load_hf
from castlens.prompts import contrastive_pairs
from castlens.tasks import load_task
from castlens.vectors import task_vector
from castlens.models import tokenizer_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def plain():
    hf, tok = load_hf("smollm2-135m-instruct")
    assert hf.config._attn_implementation == "sdpa"
    return hf.eval(), tok


def test_loads_real_smollm2(smollm2, plain):
    assert (smollm2.cfg.n_layers, smollm2.cfg.d_model) == (30, 576)
    ids = tokenize(smollm2, ["The capital of France is"])[0]
    assert ids == plain[1]("The capital of France is").input_ids  # one tokenization path, no BOS added
    assert tokenizer_of(smollm2).bos_token == "<|im_start|>"
    chat = tokenize(smollm2, ["hi"], chat=True)[0]
    assert chat.count(tokenizer_of(smollm2).bos_token_id) == 3  # system, user, assistant: no doubled BOS
    with torch.no_grad():
        logits = plain[0](torch.tensor([ids])).logits[0, -1]
    assert plain[1].decode(logits.argmax()).strip() == "Paris"  # a real instruction-tuned model, not noise


def test_vectors_equal_plain_transformers(smollm2, plain):
    hf, _ = plain
    v = task_vector(smollm2, "sst2", n=3, shots=3, seed=0)
    pairs = contrastive_pairs(load_task("sst2"), 3, 3, seed=0)
    diffs = []
    for p in pairs:
        zero, few = tokenize(smollm2, [p.zero, p.few])
        ref_few = hf_last_token_states(hf, few)
        with torch.no_grad():  # output_hidden_states agrees with the layer hooks below the final norm
            hs = hf(torch.tensor([few]), output_hidden_states=True).hidden_states
        assert torch.allclose(torch.stack([h[0, -1] for h in hs[1:-1]]), ref_few[:-1], atol=1e-4, rtol=0)
        diffs.append(ref_few - hf_last_token_states(hf, zero))
    manual = torch.stack(diffs).mean(0)
    scale = manual.abs().amax(-1, keepdim=True)  # residual norms grow to ~1e3 in late layers
    assert ((v.directions - manual).abs() / scale).max() < 1e-4
    assert torch.nn.functional.cosine_similarity(v.directions, manual).min() > 0.99999


def test_batched_padding_on_smollm2(smollm2):
    pairs = contrastive_pairs(load_task("arc_easy"), 4, 2, seed=0)
    prompts = [p.zero for p in pairs] + [p.few for p in pairs]
    alone = torch.cat([last_token_resid(smollm2, [p]) for p in prompts])
    for side in ("left", "right"):
        batched = last_token_resid(smollm2, prompts, batch_size=8, padding_side=side)
        rel = (batched - alone).abs() / alone.abs().amax(-1, keepdim=True)
        assert rel.max() < 1e-4, side


def test_concurrent_first_loads_share_one_cache(tmp_path):
    """Two processes loading on a machine with no cache (torchrun ranks, two notebooks): one converts, the other
    waits and reads the finished cache. An incomplete folder from an interrupted run (tokenizer files, no weights)
    is rebuilt, not read. Before the lock, a clean 2-rank launch failed with "Unrecognized model"."""
    import os
    import subprocess
    import sys

    broken = tmp_path / "smollm2-135m-instruct"
    broken.mkdir()
    (broken / "tokenizer_config.json").write_text("{}")
    code = "import castlens; m = castlens.load_model(); print(m.cfg.n_layers, m.cfg.d_model)"
    env = {**os.environ, "CASTLENS_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert out.split() == ["30", "576"]
    assert (broken / "config.json").is_file() and (broken / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".smollm2-135m-instruct-")]  # no temp folder left


def test_a_two_rank_launch_on_a_machine_without_a_cache(tmp_path):
    """``torchrun --nproc-per-node 2`` as the first use of the model on a machine: rank 0 converts it while rank 1
    waits (transformers writes weights on rank 0 only; a rank-1 conversion left a cache of tokenizer files that
    failed every later load, which is how a clean `make protocol-figures` failed)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "CASTLENS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "castlens",
           "--", "vectors", "--tasks", "uppercase,plural", "--n", "2", "--shots", "1", "--out", str(tmp_path / "v")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    cache = tmp_path / "cache" / "smollm2-135m-instruct"
    assert (cache / "model.safetensors").is_file() and (cache / "config.json").is_file()
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".smollm2-135m-instruct-")] == []
