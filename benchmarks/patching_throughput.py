"""Head patching: castlens' reuse path against the plain way, same heads, same queries, one run.

The quantity is the one ``castlens explain`` measures for every head: ``h_L`` at the last token of zero-shot
queries with one head's ``z`` (its ``attn.hook_z``) replaced by a given value at that token.

* ``castlens``: :func:`castlens.reuse.settings_last_token_resid` with one :class:`~castlens.reuse.Setting` per
  head: each query body once (sdpa; ``hook_z`` fires there too), then one token per head per query, stopped
  after layer ``L``;
* ``plain``: TransformerLens ``run_with_hooks`` of the whole prompt per head (the bridge's eager attention, as a
  hook on ``hook_z`` makes it), batched over the queries with right padding and the patch at each row's last
  token, read at ``blocks.L.hook_resid_post`` (the forward runs to the end, as a plain call does).

Numbers are checked equal first (max abs difference < 1e-3 relative to the largest value). Usage:
    python benchmarks/patching_throughput.py [--task antonym] [--n 8] [--layers 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from castlens.activations import pad_batch
from castlens.experiments.protocol import encode
from castlens.models import load_model, pad_id
from castlens.prompts import default_format
from castlens.reuse import UNSTEERED, Setting, settings_last_token_resid
from castlens.tasks import load_task
from castlens.vectors import prefix_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--task", default="antonym")
    ap.add_argument("--n", type=int, default=8, help="zero-shot queries")
    ap.add_argument("--layers", type=int, default=4, help="patch every head of layers 0..layers-1")
    ap.add_argument("--layer", type=int, default=14, help="the residual read")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/patching_throughput.json")
    a = ap.parse_args()
    model = load_model(a.model, device="cpu")
    task = load_task(a.task)
    fmt = default_format(task)
    items = encode(model, task, fmt, random.Random(0).sample(task.train or task.test, a.n))
    prefix = prefix_ids(model, [fmt.instruction], fmt)
    queries = [prefix + q for q in items.queries]
    g = torch.Generator().manual_seed(0)
    heads = [(li, h) for li in range(a.layers) for h in range(model.cfg.n_heads)]
    values = {lh: torch.randn(model.cfg.d_head, generator=g) for lh in heads}
    settings = [UNSTEERED] + [Setting(f"L{li}H{h}", heads=((li, h, values[(li, h)]),)) for li, h in heads]

    def fast() -> torch.Tensor:
        return settings_last_token_resid(model, [], queries, settings, [a.layer], batch_size=a.n)[1:, :, 0]

    def plain() -> torch.Tensor:
        ids, mask, last = pad_batch(queries, pad_id(model), "right")
        rows, out = torch.arange(len(queries)), []
        for lh in heads:
            seen = {}

            def patch(z, hook, lh=lh):
                z = z.clone()
                z[rows, last, lh[1]] = values[lh]
                return z

            def grab(x, hook):
                seen["h"] = x[rows, last].float()

            with torch.inference_mode():
                model.run_with_hooks(ids, attention_mask=mask, return_type=None,
                                     fwd_hooks=[(f"blocks.{lh[0]}.attn.hook_z", patch),
                                                (f"blocks.{a.layer}.hook_resid_post", grab)])
            out.append(seen["h"])
        return torch.stack(out)

    f, p = fast(), plain()
    err = float((f - p).abs().max() / p.abs().max())
    if err > 1e-3:
        raise SystemExit(f"the paths differ: max relative difference {err:.2e}")
    times: dict[str, list[float]] = {"castlens": [], "plain": []}
    for _ in range(a.repeats):  # interleaved rounds
        for name, fn in (("castlens", fast), ("plain", plain)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "torch": torch.__version__, "model": a.model, "task": a.task, "queries": a.n, "heads": len(heads),
           "mean_query_tokens": sum(map(len, queries)) / len(queries), "layer_read": a.layer,
           "max_rel_diff": err, "median_s": med, "best_s": {k: min(v) for k, v in times.items()},
           "speedup_median": med["plain"] / med["castlens"], "rounds": times}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"{len(heads)} heads x {a.n} queries ({res['mean_query_tokens']:.0f} tokens each): castlens "
          f"{med['castlens']:.2f}s, plain {med['plain']:.2f}s median -> {res['speedup_median']:.1f}x; "
          f"max rel. diff {err:.1e}; wrote {a.out}")


if __name__ == "__main__":
    main()
