"""Extraction throughput on SmolLM2-135M-Instruct: castlens against plain transformers, same prompts, same run.

castlens reads ``blocks.{L}.hook_resid_post`` at the last token of every layer through TransformerLens'
bridge. The plain alternatives use an unwrapped copy of the same weights (sdpa attention), the same batches and
the same padding, and read the last token of every layer:

* ``hf_body``: ``model.model(..., output_hidden_states=True)`` (the floor: no unembedding);
* ``hf_full``: ``model(..., output_hidden_states=True)`` (what one usually writes; computes logits too);
* ``bridge_cache``: TransformerLens' own ``run_with_cache`` with a resid_post filter (eager attention, logits).

Usage: python benchmarks/extraction_throughput.py [--n 64] [--shots 5] [--batch-size 16] [--repeats 3]
Writes benchmarks/results/extraction_throughput.json and prints a markdown row set.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from castlens.activations import last_token_resid, length_sorted_batches, pad_batch, tokenize
from castlens.models import load_hf, load_model
from castlens.prompts import contrastive_pairs
from castlens.tasks import CAST_SOURCES, load_task
from castlens.models import tokenizer_of


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=48, help="prompts (few-shot prompts spread over the CAST sources)")
    ap.add_argument("--shots", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=512, help="drop longer prompts (RACE passages run to 2k+)")
    a = ap.parse_args()
    torch.manual_seed(0)

    model = load_model("smollm2-135m-instruct", device="cpu")
    hf, _ = load_hf("smollm2-135m-instruct")
    hf.eval()
    per_task = max(1, a.n // len(CAST_SOURCES))
    prompts = [p.few for t in CAST_SOURCES for p in contrastive_pairs(load_task(t), per_task, a.shots, seed=0)]
    seqs = tokenize(model, prompts)
    seqs = [s for s in seqs if len(s) <= a.max_tokens][: a.n]
    n_tokens = sum(len(s) for s in seqs)
    batches = [[seqs[i] for i in b] for b in length_sorted_batches(seqs, a.batch_size)]  # castlens' batches
    pad = tokenizer_of(model).pad_token_id

    def castlens_run():
        return last_token_resid(model, seqs, batch_size=a.batch_size, progress=False)

    def hf_run(full: bool):
        def run():
            with torch.inference_mode():
                for b in batches:
                    ids, mask, last = pad_batch(b, pad, "right")
                    fn = hf if full else hf.model
                    hs = fn(ids, attention_mask=mask, output_hidden_states=True).hidden_states
                    torch.stack([h[torch.arange(len(b)), last] for h in hs[1:]], 1)
        return run

    def bridge_cache_run():
        with torch.inference_mode():
            for b in batches:
                ids, mask, last = pad_batch(b, pad, "right")
                _, cache = model.run_with_cache(ids, attention_mask=mask,
                                                names_filter=lambda n: n.endswith("hook_resid_post"))
                del cache

    paths = {"castlens": castlens_run, "hf_body": hf_run(False), "hf_full": hf_run(True),
             "bridge_cache": bridge_cache_run}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for fn in paths.values():  # warm-up
        fn()
    for _ in range(a.repeats):  # interleaved, so drift hits every path alike
        for k, fn in paths.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}  # least disturbed by other load on a shared machine
    result = {
        "date": date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "prompts": len(seqs), "tokens": n_tokens, "batch_size": a.batch_size,
        "shots": a.shots, "seconds_all": times, "seconds_median": med, "seconds_best": best,
        "tokens_per_s": {k: n_tokens / v for k, v in best.items()},
        "speed_castlens_relative_to": {k: best[k] / best["castlens"] for k in best if k != "castlens"},
        "speed_castlens_relative_to_median": {k: med[k] / med["castlens"] for k in med if k != "castlens"},
        "command": "python benchmarks/extraction_throughput.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items()),
    }
    out = Path(__file__).parent / "results" / "extraction_throughput.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"{len(seqs)} prompts, {n_tokens} tokens, batch {a.batch_size}, best and median of {a.repeats}")
    print("| path | best s | median s | tokens/s (best) | castlens speed / this path's (best, median) |")
    print("|---|---|---|---|---|")
    for k in paths:
        rel = "1.00" if k == "castlens" else (f"{result['speed_castlens_relative_to'][k]:.2f}, "
                                              f"{result['speed_castlens_relative_to_median'][k]:.2f}")
        print(f"| {k} | {best[k]:.2f} | {med[k]:.2f} | {result['tokens_per_s'][k]:.0f} | {rel} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
