"""The CAST mean-difference vector, computed by castlens and by its peers on the same prompts, in one run.

Every path turns the same (few-shot, zero-shot) prompt pairs into ``v[L] = mean_i h_L(few_i) - h_L(zero_i)``,
the output of decoder block ``L`` at the last real token, for every block:

* ``castlens``: :func:`castlens.activations.last_token_resid` over the zero-shot and few-shot prompts
  (bridge hook points, sdpa attention, the forward stopped after the last block), then the mean difference;
* ``steering_vectors``: ``train_steering_vector(hf, tok, [(few, zero), ...], read_token_index=-1)``, forward
  hooks on ``model.layers.{L}`` and the default mean aggregator (its own tokenization and padding);
* ``repeng``: ``batched_get_hiddens`` (``output_hidden_states``, its own tokenization and padding), then the
  mean of differences; repeng's training would go on to PCA, which is not timed;
* ``tl_run_with_cache``: TransformerLens ``run_with_cache`` on the same bridge, resid_post filter;
* ``hf_hidden_states``: plain transformers ``model.model(..., output_hidden_states=True)``.

The numbers are checked equal before anything is timed. ``output_hidden_states``' last entry is the output of
the final norm, not of the last block, so the repeng and plain transformers paths are compared on blocks
``0 .. n-2`` only (the script prints this). Timing: one warm-up, then ``--repeats`` interleaved rounds (every
path once per round, so drift hits all alike); median and best are reported. A peer that is not installed is
listed as such (``pip install --no-deps steering-vectors==0.12.2 repeng==0.4.0``).

Usage: python benchmarks/peers.py [--model tiny-llama] [--task antonym] [--n 32] [--shots 3] [--batch-size 8]
       [--repeats 5] [--out benchmarks/results/peers_<model>.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from castlens.activations import (
    last_token_resid,
    length_sorted_batches,
    pad_batch,
    tokenize,
)
from castlens.models import load_hf, load_model, pad_id
from castlens.prompts import contrastive_pairs
from castlens.tasks import load_task

TOLERANCE = 1e-4  # largest difference allowed, relative to each layer's largest component


def _import_repeng():
    """repeng 0.4.0 names ``np.float_`` (gone in NumPy 2) in annotations evaluated at import only."""
    shim = not hasattr(np, "float_")
    if shim:
        np.float_ = np.float64
    try:
        import repeng.extract

        return repeng.extract
    finally:
        if shim:
            del np.float_


def _last_rows(hidden: Tensor, last: Tensor) -> Tensor:
    return hidden[torch.arange(hidden.shape[0]), last]


def make_paths(model, hf, tok, pairs, batch_size: int) -> tuple[dict[str, Callable[[], Tensor]], list[str]]:
    """Each path returns the [n_layers, d_model] mean-difference vector; also the names of absent peers."""
    n_layers, n = model.cfg.n_layers, len(pairs)
    zeros, fews = [p.zero for p in pairs], [p.few for p in pairs]
    ids = tokenize(model, zeros + fews)
    batches = [[ids[i] for i in b] for b in length_sorted_batches(ids, batch_size)]
    order = [i for b in length_sorted_batches(ids, batch_size) for i in b]
    pad = pad_id(model)

    def mean_diff(acts: Tensor) -> Tensor:  # acts [2n, layers, d] in prompt order (zeros, then fews)
        return (acts[n:] - acts[:n]).mean(0)

    def castlens_path() -> Tensor:
        return mean_diff(last_token_resid(model, ids, batch_size=batch_size, progress=False))

    def batched(run_batch: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Callable[[], Tensor]:
        def run() -> Tensor:
            with torch.inference_mode():
                rows = torch.cat([run_batch(*pad_batch(b, pad, "right")) for b in batches])
            acts = torch.empty_like(rows)
            acts[order] = rows
            return mean_diff(acts)
        return run

    def tl_batch(x: Tensor, mask: Tensor, last: Tensor) -> Tensor:
        _, cache = model.run_with_cache(x, attention_mask=mask, names_filter=lambda s: s.endswith("hook_resid_post"))
        return torch.stack([_last_rows(cache[f"blocks.{L}.hook_resid_post"], last) for L in range(n_layers)], 1)

    def hf_batch(x: Tensor, mask: Tensor, last: Tensor) -> Tensor:
        hs = hf.model(x, attention_mask=mask, output_hidden_states=True).hidden_states
        return torch.stack([_last_rows(h, last) for h in hs[1:]], 1)

    paths: dict[str, Callable[[], Tensor]] = {"castlens": castlens_path}
    missing = []
    try:
        from steering_vectors import train_steering_vector

        def sv_path() -> Tensor:
            sv = train_steering_vector(hf, tok, list(zip(fews, zeros)), batch_size=batch_size, show_progress=False)
            return torch.stack([sv.layer_activations[L] for L in range(n_layers)])
        paths["steering_vectors"] = sv_path
    except ImportError:
        missing.append("steering_vectors")
    try:
        rp = _import_repeng()

        def repeng_path() -> Tensor:
            strs = [s for p in pairs for s in (p.few, p.zero)]  # repeng's order: positive, negative, ...
            h = rp.batched_get_hiddens(hf, tok, strs, list(range(n_layers)), batch_size)
            return torch.stack([torch.from_numpy(h[L][::2] - h[L][1::2]).mean(0) for L in range(n_layers)])
        paths["repeng"] = repeng_path
    except ImportError:
        missing.append("repeng")
    paths["tl_run_with_cache"] = batched(tl_batch)
    paths["hf_hidden_states"] = batched(hf_batch)
    return paths, missing


def check_equal(results: dict[str, Tensor], n_layers: int) -> dict[str, float]:
    """Largest difference from castlens, relative to each layer's largest component (raises past TOLERANCE)."""
    ref = results["castlens"]
    post_norm_last = {"repeng", "hf_hidden_states"}  # hidden_states[-1] is after the final norm
    errors = {}
    for name, v in results.items():
        blocks = slice(0, n_layers - 1) if name in post_norm_last else slice(None)
        scale = ref[blocks].abs().amax(1, keepdim=True).clamp_min(1e-12)
        errors[name] = float(((v[blocks].float() - ref[blocks]).abs() / scale).max())
        if errors[name] > TOLERANCE:
            raise AssertionError(f"{name} differs from castlens by {errors[name]:.2e} (relative) on blocks "
                                 f"{blocks}; nothing was timed")
    return errors


def time_paths(paths: dict[str, Callable[[], Tensor]], repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(repeats):  # interleaved rounds
        for k, fn in paths.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return times


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--task", default="antonym")
    ap.add_argument("--n", type=int, default=32, help="prompt pairs")
    ap.add_argument("--shots", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="JSON file (default benchmarks/results/peers_<model>.json)")
    a = ap.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # repeng's batched_get_hiddens always draws a progress bar
    torch.manual_seed(0)

    model = load_model(a.model, device="cpu")
    hf, tok = load_hf(a.model)
    hf.eval()
    pairs = contrastive_pairs(load_task(a.task), a.n, a.shots, seed=0)
    paths, missing = make_paths(model, hf, tok, pairs, a.batch_size)
    results = {k: fn() for k, fn in paths.items()}  # also the warm-up
    errors = check_equal(results, model.cfg.n_layers)
    times = time_paths(paths, a.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    n_tokens = sum(len(s) for s in tokenize(model, [p.zero for p in pairs] + [p.few for p in pairs]))
    result = {
        "date": date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "model": a.model, "task": a.task, "pairs": a.n, "shots": a.shots,
        "tokens": n_tokens, "batch_size": a.batch_size, "repeats": a.repeats, "not_installed": missing,
        "max_relative_difference_from_castlens": errors,
        "compared_blocks": {k: "0..n-2" if k in ("repeng", "hf_hidden_states") else "all" for k in paths},
        "seconds_all": times, "seconds_median": med, "seconds_best": best,
        "path_median_over_castlens_median": {k: med[k] / med["castlens"] for k in med},
        "command": "python benchmarks/peers.py " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                           for k, v in vars(a).items() if v is not None),
    }
    out = Path(a.out) if a.out else Path(__file__).parent / "results" / f"peers_{a.model.replace('/', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"{a.model}, task {a.task}: {a.n} pairs, {n_tokens} tokens, batch {a.batch_size}, "
          f"{a.repeats} interleaved rounds" + (f"; not installed: {', '.join(missing)}" if missing else ""))
    print("| path | median s | best s | median / castlens median | max rel. diff (blocks) |")
    print("|---|---|---|---|---|")
    for k in paths:
        print(f"| {k} | {med[k]:.3f} | {best[k]:.3f} | {result['path_median_over_castlens_median'][k]:.2f} | "
              f"{errors[k]:.1e} ({result['compared_blocks'][k]}) |")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
