"""Option scoring on SmolLM2-135M-Instruct: castlens against plain transformers, same rows, same run.

castlens' ``option_logprobs`` runs the bridge with native sdpa attention, captures the final residual only at
the positions that predict option tokens, and unembeds those rows alone. The plain path runs the unwrapped
model's full forward (logits at every position) over the same padded batches and reads the same positions.

Usage: python benchmarks/scoring_throughput.py [--n 32] [--shots 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

import torch

from castlens.activations import length_sorted_batches, pad_batch, tokenize
from castlens.evaluation import option_logprobs
from castlens.models import load_hf, load_model
from castlens.prompts import contrastive_pairs
from castlens.tasks import load_task
from castlens.models import tokenizer_of


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--shots", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    model = load_model("smollm2-135m-instruct", device="cpu")
    hf, _ = load_hf("smollm2-135m-instruct")
    hf.eval()
    task = load_task("financial_phrasebank")
    prompts = [p.few for p in contrastive_pairs(task, a.n, a.shots, seed=0)]
    options = [list(task.labels)] * len(prompts)
    tok = tokenizer_of(model)
    rows, spans = [], []
    for ids in tokenize(model, prompts):
        for opt in task.labels:
            cont = tok(" " + opt, add_special_tokens=False)["input_ids"]
            rows.append(ids + cont)
            spans.append((len(ids), len(cont)))
    batches = length_sorted_batches(rows, a.batch_size)

    def plain():
        out = torch.empty(len(rows))
        with torch.inference_mode():
            for batch in batches:
                ids, mask, _ = pad_batch([rows[r] for r in batch], tok.pad_token_id, "right")
                logits = hf(ids, attention_mask=mask).logits
                for b, r in enumerate(batch):
                    s, n = spans[r]
                    lp = torch.log_softmax(logits[b, s - 1:s + n - 1].float(), -1)
                    out[r] = lp.gather(-1, ids[b, s:s + n, None]).sum()
        return out.view(len(prompts), -1)

    def ours():
        return option_logprobs(model, prompts, options, batch_size=a.batch_size, progress=False)

    assert (plain() - ours()).abs().max() < 1e-2  # same numbers (float32, different attention kernels)
    times = {"castlens": [], "hf_full": []}
    for _ in range(a.repeats):
        for k, fn in (("castlens", ours), ("hf_full", plain)):
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    n_tok = sum(len(r) for r in rows)
    res = {"date": date.today().isoformat(), "rows": len(rows), "tokens": n_tok, "seconds_all": times,
           "seconds_best": best, "speed_castlens_relative_to_hf_full": best["hf_full"] / best["castlens"],
           "command": "python benchmarks/scoring_throughput.py " + " ".join(
               f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items())}
    out = Path(__file__).parent / "results" / "scoring_throughput.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"{len(rows)} rows ({len(prompts)} prompts x {len(task.labels)} options), {n_tok} tokens, best of "
          f"{a.repeats}: castlens {best['castlens']:.2f}s, transformers full forward {best['hf_full']:.2f}s, "
          f"castlens {res['speed_castlens_relative_to_hf_full']:.2f}x as fast; wrote {out}")


if __name__ == "__main__":
    main()
