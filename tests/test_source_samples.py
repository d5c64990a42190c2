"""castlens.source_samples on the tiny model: every reported prediction against an independent plain computation
(full prompts, one unpadded forward each, no cache reuse), demonstrations that fit the context, borrowing, resume."""

import json

import numpy as np
import pytest
import torch

from castlens.activations import last_token_resid
from castlens.evaluation import option_logprobs
from castlens.experiments import selection_study as ss
from castlens.experiments.protocol import options_for, prepare
from castlens.experiments.results import TargetResult
from castlens.experiments.sources import source_demos
from castlens.prompts import default_format
from castlens.selection import select_indices
from castlens.steering import steering
from castlens.tasks import load_task
from castlens.vectors import prefix_ids, text_ids

CFG = dict(model="tiny-llama", sources=("uppercase", "first_item"), targets=("last_item", "plural", "medmcqa"),
           ablation_n=3, ns=(2, 5, 16), dev=6, limit=8, icl_limit=5, layers=(1, 2), strengths=(1.0, 4.0), pool=10,
           n_boot=200, keep_scores=True)


@pytest.fixture(scope="module")
def study(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    cfg = ss.StudyConfig(**CFG)
    ablation, scaling = ss.run_study(tiny, cfg, out, png=False, log=lambda *a: None)
    parts = {t: json.loads((out / "parts" / f"{t}.part.json").read_text()) for t in cfg.targets}
    return cfg, out, ablation, scaling, parts


def _prompt_ids(tiny, target, ex):
    fmt = default_format(target)
    return prefix_ids(tiny, [fmt.instruction], fmt) + text_ids(tiny, fmt.render(ex, False))


def _manual_vector(tiny, cfg, refs):
    """Mean over samples of (few-shot - zero-shot) last-token states, each prompt run alone in full."""
    sources = {s: load_task(s) for s in cfg.sources}
    demos = source_demos(list(sources.values()), cfg.shots, cfg.seed)
    diffs = []
    for task, i in refs:
        t, fmt = sources[task], default_format(sources[task])
        q = text_ids(tiny, fmt.render(t.train[i], False))
        few = prefix_ids(tiny, [fmt.instruction, *(fmt.render(d, True) for d in demos[task])], fmt) + q
        zero = prefix_ids(tiny, [fmt.instruction], fmt) + q
        diffs.append(last_token_resid(tiny, [few], batch_size=1)[0] - last_token_resid(tiny, [zero], batch_size=1)[0])
    return torch.stack(diffs).mean(0)


def _close(got, want):
    """Stored option log-probabilities against the reference (finite entries; -inf pads must coincide)."""
    got = torch.tensor(got)
    assert torch.isinf(got).equal(torch.isinf(want))
    fin = torch.isfinite(want)
    return float((got[fin] - want[fin]).abs().max()) < 1e-3


@pytest.mark.parametrize("variant", ["cast@5", "random@16", "diversity@3", "relevance@3"])
def test_steered_predictions_equal_a_plain_steered_forward(tiny, study, variant):
    cfg, _, _, _, parts = study
    part = parts["plural"]
    method, n = variant.split("@")
    vec = _manual_vector(tiny, cfg, part["rankings"][method][: int(n)])
    target = load_task("plural")
    test = [target.test[i] for i in part["test_items"]]  # the seeded, stratified subset of cfg.limit items
    setting = part["methods"][variant]["setting"]
    scores = []
    for ex in test:
        ids = _prompt_ids(tiny, target, ex)
        opts, _ = options_for(target, ex, default_format(target), cfg.n_candidates, cfg.seed)
        with steering(tiny, vec, setting["layer"], setting["strength"], positions=torch.tensor([len(ids) - 1])):
            scores.append(option_logprobs(tiny, [ids], [opts], batch_size=1)[0])
    scores = torch.stack(scores)
    assert _close(part["methods"][variant]["scores"], scores)
    assert part["methods"][variant]["pred"] == scores.argmax(-1).tolist()
    assert not _close(part["methods"]["zero_shot"]["scores"], scores)  # steering moved the scores
    assert part["methods"][variant]["correct"] == [int(p == g) for p, g in
                                                   zip(part["methods"][variant]["pred"], part["gold"])]


def test_icl_uses_the_selected_samples_as_many_as_fit(tiny, study):
    cfg, _, _, _, parts = study
    part = parts["last_item"]
    target, fmt = load_task("last_item"), default_format(load_task("last_item"))
    sources = {s: load_task(s) for s in cfg.sources}
    test = [target.test[i] for i in part["test_items"]]
    items = part["icl_items"]
    assert len(items) == cfg.icl_limit and len(set(items)) == len(items)
    used = [part["icl"][f"icl@{n}"]["demos_used"] for n in cfg.ns]
    assert used[0] == 2 and used == sorted(used)
    assert used[-1] < 16  # the tiny model's 512-token window cannot hold 16 demonstrations
    for n, k in zip(cfg.ns, used):
        blocks = [default_format(sources[t]).render(sources[t].train[i], True)
                  for t, i in part["rankings"]["cast"][:k + 1]]
        prefix = prefix_ids(tiny, [*blocks[:k], fmt.instruction], fmt)
        qs = [text_ids(tiny, fmt.render(test[i], False)) for i in items]
        opts = [options_for(target, test[i], fmt, cfg.n_candidates, cfg.seed)[0] for i in items]
        room = max(len(q) + max(len(text_ids(tiny, " " + o)) for o in os_) for q, os_ in zip(qs, opts))
        assert len(prefix) + room <= 512
        if k < n:  # one more demonstration would not have fit
            longer = prefix_ids(tiny, [*blocks[:k + 1], fmt.instruction], fmt)
            assert len(longer) + room > 512 - 2
        scores = option_logprobs(tiny, [prefix + q for q in qs], opts, batch_size=1)
        assert _close(part["icl"][f"icl@{n}"]["scores"], scores)


def test_fit_demos_counts_blocks_against_the_context(tiny, monkeypatch):
    monkeypatch.setattr(ss, "context_length", lambda model: 200)
    # budget = 200 - room 30 - tail 20 - 1 = 149: two 50-token blocks fit, a third (150) does not
    assert ss.fit_demos(tiny, [[1] * 50] * 10, [0] * 20, 30) == 2
    assert ss.fit_demos(tiny, [[1] * 49] * 3, [0] * 20, 30) == 3
    assert ss.fit_demos(tiny, [[1] * 150], [0] * 20, 30) == 0


def test_greedy_selections_are_prefixes_of_longer_ones():
    rng = np.random.default_rng(0)
    cand, tgt = rng.normal(size=(300, 16)), rng.normal(size=(20, 16))
    for m in ("cast", "relevance", "diversity"):
        long = select_indices(m, cand, tgt, 64, seed=3)
        for n in (1, 5, 32):
            assert select_indices(m, cand, tgt, n, seed=3) == long[:n], m


def test_settings_come_from_dev_and_a_test_only_target_borrows(study):
    cfg, _, _, _, parts = study
    for t in ("last_item", "plural"):
        p = parts[t]
        for v in p["chosen"]:
            rows = [r for r in p["sweep"] if r["construction"] == v]
            assert len(rows) == len(cfg.layers) * len(cfg.strengths)
            assert p["chosen"][v]["dev_accuracy"] == max(r["dev_accuracy"] for r in rows)
    med = parts["medmcqa"]
    assert med["n_dev"] == 0 and med["sweep"] == []
    for v, c in med["chosen"].items():
        assert c["borrowed_from"] == ["last_item", "plural"]
        keys = [(r["layer"], r["strength"]) for r in parts["last_item"]["sweep"] if r["construction"] == v]
        mean = {k: np.mean([next(r["dev_accuracy"] for r in parts[t]["sweep"] if r["construction"] == v and
                                 (r["layer"], r["strength"]) == k) for t in ("last_item", "plural")]) for k in keys}
        assert mean[(c["layer"], c["strength"])] == pytest.approx(max(mean.values()))


def test_tables_figures_and_resume(tiny, study):
    cfg, out, ablation, scaling, parts = study
    for f in ("ablation.csv", "scaling.csv", "results.md", "ablation.html", "scaling_mean.html",
              "scaling_plural.html", "candidates.safetensors", "config.json"):
        assert (out / f).exists(), f
    by = {(r.target, r.method): r.cells() for r in ablation}
    for t in cfg.targets:  # the table's accuracy is the part's per-item mean
        assert by[(t, "cast@3")]["accuracy"] == pytest.approx(np.mean(parts[t]["methods"]["cast@3"]["correct"]))
    assert by[("mean", "cast@3")]["accuracy"] == pytest.approx(
        np.mean([np.mean(parts[t]["methods"]["cast@3"]["correct"]) for t in cfg.targets]))
    sc = {(r.target, r.method): r.cells() for r in scaling}
    p = parts["plural"]
    assert sc[("plural", "cast@5")]["accuracy"] == pytest.approx(
        np.mean([p["methods"]["cast@5"]["correct"][i] for i in p["icl_items"]]))
    assert sc[("plural", "icl@16")]["demos_used"] == p["icl"]["icl@16"]["demos_used"]
    table = ss.paired_table([ss.icl_view(TargetResult.from_dict(parts[t])) for t in cfg.targets], cfg)
    row = next(r for r in table if (r.target, r.n) == ("plural", 5))
    items = p["icl_items"]
    manual = np.mean([p["methods"]["cast@5"]["correct"][i] - p["methods"]["random@5"]["correct"][i] for i in items])
    assert row.vs_random.point == pytest.approx(manual)
    assert row.vs_icl.point == pytest.approx(
        np.mean([p["methods"]["cast@5"]["correct"][i] for i in items]) - np.mean(p["icl"]["icl@5"]["correct"]))
    assert len(table) == (len(cfg.targets) + 1) * len(cfg.ns)
    before = {f: f.stat().st_mtime_ns for f in (out / "parts").iterdir()}
    csv = (out / "ablation.csv").read_text()
    ss.run_study(tiny, ss.StudyConfig(**CFG), out, png=False, log=lambda *a: None)
    assert {f: f.stat().st_mtime_ns for f in (out / "parts").iterdir()} == before
    assert (out / "ablation.csv").read_text() == csv
    with pytest.raises(ValueError, match="different config"):
        ss.run_study(tiny, ss.StudyConfig(**{**CFG, "pool": 11}), out, png=False, log=lambda *a: None)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="unknown selection methods"):
        ss.StudyConfig(**{**CFG, "methods": ("cast", "nearest")})
    with pytest.raises(ValueError, match="sample counts"):
        ss.StudyConfig(**{**CFG, "ns": (0, 4)})


def test_ablation_only_runs_no_icl(tiny, tmp_path):
    cfg = ss.StudyConfig(**{**CFG, "targets": ("plural",), "ns": (), "scale_methods": (), "keep_scores": False})
    ablation, scaling = ss.run_study(tiny, cfg, tmp_path, png=False, log=lambda *a: None)
    part = json.loads((tmp_path / "parts" / "plural.part.json").read_text())
    assert part["icl"] == {} and set(part["methods"]) == {"zero_shot", "random@3", "relevance@3", "diversity@3",
                                                          "cast@3"}
    md = (tmp_path / "results.md").read_text()
    assert "## Scaling" not in md
    assert not list(tmp_path.glob("scaling_*"))
    # the table says what it ran on: the run's 8 test items (not "whole test splits") and its scoring mode
    assert f"{cfg.limit} seeded test items per target" in md and "whole test splits" not in md
    assert "scored by their option letters" in md


def test_target_cost_weights_sweep_and_test_passes_by_option_tokens(tiny):
    """The estimate that balances targets over ranks, counted by hand: dev items x (unsteered + variants x layers x
    strengths) plus test items x (zero-shot + variants), each weighted by the mean option tokens per item and an
    eighth of its body; a target without a train split (MedMCQA) has no sweep."""
    cfg = ss.StudyConfig(**{**CFG, "ns": ()})  # the 4 selection methods at ablation_n, 2 layers x 2 strengths
    for name, swept in [("plural", True), ("medmcqa", False)]:
        p = prepare(tiny, load_task(name), cfg)
        per_item = np.mean([sum(len(o) for o in opts) for opts in p.test.options]) \
            + np.mean([len(q) for q in p.test.queries]) / 8
        passes = (cfg.dev * (1 + 4 * 2 * 2) if swept else 0) + cfg.limit * (1 + 4)
        assert ss.target_cost(tiny, cfg, p) == pytest.approx(per_item * passes)
