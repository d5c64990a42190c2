"""Peak memory of extraction against the number of prompts: it must stay flat beyond the stored vectors.

Each point runs in a fresh process: load the model, note the resident set size (RSS), extract the last-token
residual stream of N prompts, and report the peak RSS growth next to the size of the returned tensor. A flat
curve (growth minus output size roughly constant in N) means memory is bounded by the batch, not the run.

Usage: python benchmarks/memory_extraction.py [--model tiny-llama] [--counts 1000,2500,5000,10000] [--layers all]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import date
from pathlib import Path

CHILD = r"""
import json, random, resource, sys, time
import torch
from castlens.activations import last_token_resid
from castlens.models import load_model, tokenizer_of
model_name, n, layers = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(2)
model = load_model(model_name, device="cpu")
words = "apple river stone cloud garden window pencil mirror candle bottle forest rocket".split()
rng = random.Random(0)
tok = tokenizer_of(model)
prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + "\nAnswer:" for _ in range(n)]
ids = [tok(p)["input_ids"] for p in prompts]
layer_list = None if layers == "all" else [int(x) for x in layers.split(",")]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
out = last_token_resid(model, ids, layers=layer_list, batch_size=32, progress=False)
secs = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"prompts": n, "tokens": sum(map(len, ids)), "rss_after_load_mb": before / 1024,
                  "peak_rss_mb": peak / 1024, "growth_mb": (peak - before) / 1024,
                  "output_mb": out.numel() * 4 / 2 ** 20, "seconds": secs}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--counts", default="1000,2500,5000,10000")
    ap.add_argument("--layers", default="all")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows = []
    for n in [int(x) for x in a.counts.split(",")]:
        r = subprocess.run([sys.executable, "-c", CHILD, a.model, str(n), a.layers], capture_output=True, text=True,
                           check=True)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        rows[-1]["growth_minus_output_mb"] = rows[-1]["growth_mb"] - rows[-1]["output_mb"]
        print(rows[-1], flush=True)
    out = Path(a.out or f"benchmarks/results/memory_extraction_{a.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": str(date.today()), "model": a.model, "layers": a.layers, "rows": rows},
                              indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
