"""Fast paths on SmolLM2-135M-Instruct (CPU), each against its plain counterpart in the same run.

1. few-shot scoring with a shared k-shot prefix (``prefix_option_logprobs``) against the same prompts run whole
   (one row per prompt, and ``option_logprobs`` with one row per option);
2. few-shot extraction with a shared prefix (``prefix_last_token_resid``) against ``last_token_resid``;
3. a sweep of m steering settings at one layer: one call (body once, last token per setting) against m calls;
4. the cost of a steering hook: a steered full forward (every position) against an unsteered one;
5. how extraction time grows with the number of prompts and with prompt length.

Every pair is first checked for equal numbers (max abs difference < 1e-4). Usage:
    python benchmarks/reuse_throughput.py [--n 64] [--shots 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

from castlens.activations import last_token_resid, tokenize
from castlens.evaluation import option_logprobs
from castlens.models import load_model, tokenizer_of
from castlens.prompts import default_format, sample_demos
from castlens.reuse import UNSTEERED, Setting, prefix_last_token_resid, prefix_option_logprobs
from castlens.steering import steering
from castlens.tasks import load_task


def best(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), sorted(times)[len(times) // 2], out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results/reuse_throughput.json")
    ap.add_argument("--only", default="scoring,extraction,sweep,overhead,scaling",
                    help="parts to run; the others are kept from an existing --out file")
    a = ap.parse_args()
    only = set(a.only.split(","))
    torch.manual_seed(0)
    model = load_model("smollm2-135m-instruct", device="cpu")
    tok = tokenizer_of(model)
    enc = lambda t: list(tok(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    task = load_task("financial_phrasebank")
    fmt = default_format(task)
    import random

    demos = sample_demos(task.train, a.shots, random.Random(0))
    prefix = tokenize(model, [fmt.separator.join([fmt.instruction, *(fmt.render(d, True) for d in demos)])
                              + fmt.separator])[0]
    zero_prefix = tokenize(model, [fmt.instruction + fmt.separator])[0]
    items = task.test[: a.n]
    queries = [enc(fmt.render(e, False)) for e in items]
    labels = list(task.labels)
    opt_ids = [[enc(" " + o) for o in labels]] * len(queries)
    full = [prefix + q for q in queries]
    zero_full = [zero_prefix + q for q in queries]
    bs, R = a.batch_size, a.repeats
    res: dict = {"date": str(date.today()), "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
                 "torch": torch.__version__, "n": a.n, "shots": a.shots, "batch_size": bs,
                 "prefix_tokens": len(prefix), "mean_query_tokens": sum(map(len, queries)) / len(queries)}

    def check(x, y, what, relative=False):
        """Max abs difference; for activations relative to the largest magnitude per layer (SmolLM2's residual
        stream has components in the hundreds, where float32 sums differ in the 4th decimal)."""
        fin = torch.isfinite(y)
        if relative:
            d = float(((x - y).abs().amax(dim=(0, 2)) / y.abs().amax(dim=(0, 2))).max())
        else:
            d = float((x[fin] - y[fin]).abs().max())
        assert d < 1e-4, f"{what}: max {'relative ' if relative else ''}difference {d}"
        return d

    if Path(a.out).exists():
        res = {**json.loads(Path(a.out).read_text()), **res}

    v = torch.randn(model.cfg.n_layers, model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    v = v / v.norm(dim=-1, keepdim=True) * 8  # a steering vector for parts 3 and 4

    # 1. few-shot scoring
    if "scoring" in only:
        t_reuse, m_reuse, s_reuse = best(
            lambda: prefix_option_logprobs(model, prefix, queries, opt_ids, batch_size=bs)[0], R)
        t_whole, m_whole, s_whole = best(lambda: prefix_option_logprobs(model, [], full, opt_ids, batch_size=bs)[0], R)
        t_rows, m_rows, s_rows = best(lambda: option_logprobs(model, full, [labels] * len(full), batch_size=bs), R)
        res["scoring"] = {"reuse_s": t_reuse, "whole_prompt_s": t_whole, "row_per_option_s": t_rows,
                          "speedup_vs_whole": t_whole / t_reuse, "speedup_vs_rows": t_rows / t_reuse,
                          "max_abs_diff": max(check(s_reuse, s_whole, "scoring"), check(s_reuse, s_rows, "scoring")),
                          "median_s": [m_reuse, m_whole, m_rows]}
        print("scoring", res["scoring"], flush=True)

    # 2. few-shot extraction
    if "extraction" in only:
        t_r, m_r, a_r = best(lambda: prefix_last_token_resid(model, prefix, queries, batch_size=bs), R)
        t_p, m_p, a_p = best(lambda: last_token_resid(model, full, batch_size=bs), R)
        res["extraction"] = {"reuse_s": t_r, "plain_s": t_p, "speedup": t_p / t_r,
                             "max_rel_diff": check(a_r, a_p, "resid", relative=True),
                             "median_s": [m_r, m_p]}
        print("extraction", res["extraction"], flush=True)

    # 3. a sweep of m settings at one layer (zero-shot prompts, steering the last prompt token)
    if "sweep" in only:
        strengths = (0.25, 0.5, 1, 2, 4, 8, -1, -4)
        settings = [UNSTEERED] + [Setting(f"x{s}", v, 15, s) for s in strengths]
        t_one, m_one, s_one = best(lambda: prefix_option_logprobs(model, zero_prefix, queries, opt_ids, settings,
                                                                  batch_size=bs), R)
        t_m, m_m, s_m = best(lambda: torch.stack([prefix_option_logprobs(model, [], zero_full, opt_ids, [s],
                                                                         batch_size=bs)[0] for s in settings]), R)
        res["sweep"] = {"settings": len(settings), "layer": 15, "one_call_s": t_one, "separate_full_passes_s": t_m,
                        "speedup": t_m / t_one, "max_abs_diff": check(s_one, s_m, "sweep"), "median_s": [m_one, m_m]}
        print("sweep", res["sweep"], flush=True)

    # 4. steering overhead on a full forward (every position steered)
    if "overhead" in only:
        def steered():
            with steering(model, v, 15, 1.0, positions="all"):
                return option_logprobs(model, zero_full, [labels] * len(zero_full), batch_size=bs)

        plain = lambda: option_logprobs(model, zero_full, [labels] * len(zero_full), batch_size=bs)  # noqa: E731
        best(plain, 1)  # warm-up
        t_plain, m_plain, _ = best(plain, R + 2)
        t_steer, m_steer, _ = best(steered, R + 2)
        res["steering_overhead"] = {"unsteered_s": t_plain, "steered_s": t_steer, "overhead": t_steer / t_plain - 1,
                                    "median_overhead": m_steer / m_plain - 1}
        print("steering overhead", res["steering_overhead"], flush=True)

    # 5. extraction scaling: number of prompts, prompt length
    if "scaling" in only:
        res["scaling_n"], res["scaling_len"] = [], []
        pool = [enc(fmt.render(e, False)) for e in task.test[:128]]
        for n in (16, 32, 64, 128):
            t, _, _ = best(lambda: last_token_resid(model, [zero_prefix + q for q in pool[:n]], batch_size=bs), 1)
            res["scaling_n"].append({"prompts": n, "s": t, "tokens": sum(len(zero_prefix) + len(q) for q in pool[:n])})
        for k in (0, 2, 4, 8):
            d = sample_demos(task.train, k, random.Random(1))
            pre = tokenize(model, [fmt.separator.join([fmt.instruction, *(fmt.render(x, True) for x in d)])
                                   + fmt.separator])[0]
            rows = [pre + q for q in pool[:32]]
            t, _, _ = best(lambda: last_token_resid(model, rows, batch_size=bs), 1)
            t2, _, _ = best(lambda: prefix_last_token_resid(model, pre, pool[:32], batch_size=bs), 1)
            res["scaling_len"].append({"shots": k, "mean_tokens": sum(map(len, rows)) / len(rows), "plain_s": t,
                                       "reuse_s": t2})
        print("scaling", res["scaling_n"], res["scaling_len"], flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
