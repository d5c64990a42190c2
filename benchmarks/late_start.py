"""A dev sweep scored by option text, with and without late starts (``prefix_option_logprobs(late_start=...)``).

Steering at layer L at the last prompt token leaves every layer below L of the option tokens as it is unsteered,
so castlens runs each steered option chunk from layer L, on the residual one unsteered pass left entering it. This
script measures that against running every layer per setting, on the protocol's own items: ARC-Challenge dev
items (option-text scoring, 4 options), a sweep of random unit directions at the default layers and 2 strengths
(the shape of a staged sweep), SmolLM2-135M-Instruct or Gemma 3 270M, float32, CPU. It first checks that both
give the same scores (max abs difference) and the same dev choice. Usage:

    python benchmarks/late_start.py [--model smollm2-135m-instruct] [--n 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

from castlens.experiments.protocol import ProtocolConfig, default_layers, prepare
from castlens.models import load_model, model_name
from castlens.reuse import UNSTEERED, Setting, prefix_option_logprobs
from castlens.tasks import load_task


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--task", default="arc_challenge")
    ap.add_argument("--n", type=int, default=32, help="dev items scored")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    model = load_model(a.model, device="cpu")
    target = prepare(model, load_task(a.task), ProtocolConfig(dev=a.n, mc_scoring="text"))
    dev = target.dev
    assert dev is not None
    g = torch.Generator().manual_seed(0)
    n_layers, d = model.cfg.n_layers, model.cfg.d_model
    v = torch.randn(n_layers, d, generator=g)
    v = v / v.norm(dim=-1, keepdim=True)  # unit directions: the strength sets the size
    layers = default_layers(n_layers)
    norm = 8.0 if "smollm2" in model_name(model) else 80.0  # about the residual norm's order at middle layers
    settings = [UNSTEERED, *(Setting(f"{layer}x{s}", v, layer, s * norm) for layer in layers for s in (0.5, 1.0))]
    args = (model, target.zero_prefix, dev.queries, dev.options, settings)
    rows = {}
    for late in (True, False):
        times, out = [], None
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            out = prefix_option_logprobs(*args, batch_size=a.batch_size, late_start=late)
            times.append(time.perf_counter() - t0)
        rows[late] = (min(times), times, out)
    fast, slow = rows[True][2], rows[False][2]
    fin = torch.isfinite(slow)
    diff = float((fast[fin] - slow[fin]).abs().max())
    same_pick = bool((fast.argmax(-1) == slow.argmax(-1)).all())
    tokens = sum(len(o) for opts in dev.options for o in opts)
    result = {
        "date": str(date.today()), "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "model": model_name(model),
        "task": a.task, "dev_items": len(dev.queries), "option_tokens": tokens, "settings": len(settings),
        "layers": list(layers), "late_start_s": rows[True][0], "every_layer_s": rows[False][0],
        "late_start_all_s": rows[True][1], "every_layer_all_s": rows[False][1],
        "speedup": rows[False][0] / rows[True][0], "max_abs_diff": diff, "same_argmax": same_pick,
        "bit_identical": bool(torch.equal(fast, slow)),
    }
    print(json.dumps(result, indent=1))
    out = Path(a.out or f"benchmarks/results/late_start_{model_name(model)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
