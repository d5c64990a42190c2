"""GPU throughput: castlens against a bare transformers forward and TransformerLens' run_with_cache.

A randomly initialised Llama-3.1-8B-shaped model (hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP 14336, vocab
128256) in bfloat16; no weights are needed. Reports tokens/s and model-FLOPs utilisation (MFU) against a bf16
matrix-product ceiling measured in the same run, for:

* bare: ``hf.model(ids)`` with sdpa attention (the floor: the body, no unembedding);
* tl_run_with_cache: ``bridge.run_with_cache(ids, names_filter=resid_post)`` (TransformerLens' default path);
* castlens_extraction: ``last_token_resid`` at every layer (bridge hook points, sdpa, stops after the last block);
* castlens_steered_scoring: ``option_logprobs`` under ``steering`` (every position steered at the middle layer).

FLOPs per token: 2 x (non-embedding parameters) + 2 x n_layers x seq x d_model (causal attention scores and
values). CI has no GPU, so this is not part of ``make test``; ``--config tiny --device cpu`` smoke-tests it.

Usage: python benchmarks/gpu_throughput.py [--batch 16] [--seq 512] [--repeats 5] [--config 8b|tiny]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

CONFIGS = {
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256),
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=259),
}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, repeats, device):
    fn()  # warm-up
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times), sorted(times)[len(times) // 2]


def matmul_ceiling(device, dtype, n=8192, repeats=10):
    n = n if device.startswith("cuda") else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t, _ = timed(lambda: a @ b, repeats, device)
    return 2 * n ** 3 / t


def main() -> None:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import LlamaConfig, LlamaForCausalLM

    from castlens.activations import last_token_resid
    from castlens.evaluation import option_logprobs
    from castlens.models import register, tiny_tokenizer
    from castlens.steering import steering

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", choices=list(CONFIGS), default="8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    cfg = LlamaConfig(**CONFIGS[a.config], max_position_embeddings=8192, tie_word_embeddings=False,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(a.device):
        hf = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(old)
    tok = tiny_tokenizer()
    bridge = TransformerBridge.boot_transformers(f"llama-3.1-8b-shaped-{a.config}", hf_model=hf, tokenizer=tok)
    bridge.eval()
    register(bridge, f"random-{a.config}", tok)
    n_body = sum(p.numel() for n, p in hf.model.named_parameters() if "embed_tokens" not in n)
    L, d = cfg.num_hidden_layers, cfg.hidden_size
    flops_tok = 2 * n_body + 2 * L * a.seq * d
    ids = torch.randint(0, 250, (a.batch, a.seq), device=a.device)
    rows = ids.tolist()
    ceiling = matmul_ceiling(a.device, dtype)
    v = torch.randn(L, d) * 0.1
    tokens = a.batch * a.seq

    def bare():
        with torch.inference_mode():
            hf.model(ids)

    def tl():
        with torch.inference_mode():
            bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_post"))

    def extraction():
        last_token_resid(bridge, rows, batch_size=a.batch, progress=False)

    def steered():
        with steering(bridge, v, L // 2, 1.0, positions="all"):
            option_logprobs(bridge, [r[:-1] for r in rows], [["a", "b"]] * len(rows), sep="", batch_size=a.batch,
                            progress=False)

    out = {"date": str(date.today()), "device": torch.cuda.get_device_name() if a.device.startswith("cuda")
           else platform.processor() or "cpu", "config": a.config, "dtype": str(dtype), "batch": a.batch,
           "seq": a.seq, "torch": torch.__version__, "matmul_ceiling_tflops": ceiling / 1e12,
           "flops_per_token": flops_tok, "paths": {}}
    for name, fn in (("bare_sdpa_body", bare), ("tl_run_with_cache", tl), ("castlens_extraction", extraction),
                     ("castlens_steered_scoring", steered)):
        best, med = timed(fn, a.repeats, a.device)
        out["paths"][name] = {"best_s": best, "median_s": med, "tokens_per_s": tokens / best,
                              "mfu": tokens / best * flops_tok / ceiling}
        print(name, out["paths"][name], flush=True)
    for name, r in out["paths"].items():
        r["relative_to_bare"] = r["tokens_per_s"] / out["paths"]["bare_sdpa_body"]["tokens_per_s"]
    path = Path(a.out or f"benchmarks/results/gpu_throughput_{a.config}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
