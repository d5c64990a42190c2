"""What data parallelism costs on one machine: 2 processes x 1 thread against 1 process x 2 threads, same work.

On a 2-core machine two ranks cannot be faster than one process using both cores; this measures the price of
the multi-process path instead, in one run: ``castlens vectors`` over the same tasks as

* ``one``: ``python -m castlens vectors ...`` with ``OMP_NUM_THREADS=2``;
* ``two``: ``torchrun --standalone --nproc-per-node 2 -m castlens -- vectors ...`` with one thread per rank
  (torchrun's default), each rank computing its share of the tasks and rank 0 merging.

Both write the same vectors (checked, within 1e-6 relative, before anything is reported). Timing: ``--repeats``
interleaved rounds (one, two, one, two ...), medians of the wall time of the whole command (process start,
imports, model load, work, merge) and of the compute alone (the per-task times the command logs, summed for one
process, the slowest rank's sum for two).

Usage: python benchmarks/distributed_overhead.py [--model smollm2-135m-instruct] [--tasks a,b,c,d] [--n 16]
       [--shots 4] [--repeats 3] [--out benchmarks/results/distributed_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from castlens.vectors import load_vectors

TASK_TIME = re.compile(r"^(\[rank (\d+)\] )?\[\d+/\d+\] \S+: \d+ pairs in ([0-9.]+)s", re.M)


def _run(kind: str, args: list[str], out: Path) -> tuple[float, float]:
    """Wall seconds of one command, and its compute seconds (the slowest rank's logged task times)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2" if kind == "one" else "1"}
    launcher = [sys.executable, "-m", "castlens"] if kind == "one" else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "castlens", "--"]
    t0 = time.perf_counter()
    r = subprocess.run([*launcher, *args, "--out", str(out)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{kind} failed:\n{r.stdout}\n{r.stderr}")
    per_rank: dict[int, float] = {}
    for m in TASK_TIME.finditer(r.stdout):
        rank = int(m.group(2) or 0)
        per_rank[rank] = per_rank.get(rank, 0.0) + float(m.group(3))
    return wall, max(per_rank.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tasks", default="uppercase,first_item,plural,antonym")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/distributed_overhead.json")
    a = ap.parse_args()
    args = ["vectors", "--model", a.model, "--tasks", a.tasks, "--n", str(a.n), "--shots", str(a.shots)]
    times: dict[str, list[tuple[float, float]]] = {"one": [], "two": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            for kind in ("one", "two"):
                out = Path(tmp) / f"{kind}{r}"
                times[kind].append(_run(kind, args, out))
                print(f"round {r + 1}: {kind} {times[kind][-1][0]:.1f}s wall, {times[kind][-1][1]:.1f}s compute")
            one, two = load_vectors(Path(tmp) / f"one{r}.safetensors"), load_vectors(Path(tmp) / f"two{r}.safetensors")
            for k in one:
                torch.testing.assert_close(two[k].directions, one[k].directions, rtol=1e-6, atol=1e-7)
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in times.items()}
    res = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "torch": torch.__version__, "command": " ".join(args), "repeats": a.repeats,
           "wall_s": {k: round(v[0], 2) for k, v in med.items()},
           "compute_s": {k: round(v[1], 2) for k, v in med.items()},
           "ratio_wall_two_over_one": round(med["two"][0] / med["one"][0], 3),
           "ratio_compute_two_over_one": round(med["two"][1] / med["one"][1], 3), "rounds": times}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"median wall: one process x 2 threads {med['one'][0]:.1f}s, 2 processes x 1 thread {med['two'][0]:.1f}s "
          f"(x{res['ratio_wall_two_over_one']}); compute {med['one'][1]:.1f}s vs {med['two'][1]:.1f}s "
          f"(x{res['ratio_compute_two_over_one']}); wrote {a.out}")


if __name__ == "__main__":
    main()
