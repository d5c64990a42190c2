"""Selection at scale: the CAST graph search over synthetic pools of up to 100,000 candidates of width 768.

Each pool size runs in a fresh process and reports wall time and peak RSS growth for ``select_indices("cast")``
(faiss k-NN graph, influence, greedy MMR for 128 picks). Goal (selection issue): 100,000 candidates in under 60 s
on 2 cores, memory linear in the pool.

Usage: python benchmarks/selection_scale.py [--sizes 10000,30000,100000] [--n 128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import date
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import numpy as np
from castlens.selection import select_indices
m, n, d = int(sys.argv[1]), int(sys.argv[2]), 768
rng = np.random.default_rng(0)
centres = rng.normal(size=(50, d)).astype(np.float32)
x = (centres[rng.integers(0, 50, m)] + rng.normal(size=(m, d)).astype(np.float32))
targets = centres[0] + rng.normal(size=(200, d)).astype(np.float32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
chosen = select_indices("cast", x, targets, n, seed=0)
secs = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"pool": m, "n": n, "seconds": secs, "data_mb": x.nbytes / 2**20,
                  "peak_growth_mb": (peak - before) / 1024, "distinct": len(set(chosen))}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,30000,100000")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results/selection_scale.json")
    a = ap.parse_args()
    rows = []
    for m in [int(s) for s in a.sizes.split(",")]:
        r = subprocess.run([sys.executable, "-c", CHILD, str(m), str(a.n)], capture_output=True, text=True, check=True)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"date": str(date.today()), "rows": rows}, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
