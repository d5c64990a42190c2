"""castlens.transfer on the tiny model: outputs, statistics, the dev/test separation and resume."""

import json

import numpy as np
import pytest

from castlens.experiments import transfer as tr
from castlens.experiments.protocol import options_for, split_dev
from castlens.experiments.results import Interval, MethodResult, TargetResult, paired_delta, summarize
from castlens.experiments.sources import candidate_pool, sample_diffs
from castlens.prompts import default_format
from castlens.tasks import load_task

CFG = dict(model="tiny-llama", sources=("uppercase", "first_item"), targets=("last_item", "plural"), n=6, shots=2,
           dev=6, limit=8, layers=(1, 2), strengths=(1.0, 4.0), n_boot=200)


def test_options_classification_and_generation():
    fpb = load_task("financial_phrasebank")
    ex = fpb.test[0]
    opts, gold = options_for(fpb, ex, default_format(fpb))
    assert opts == list(fpb.labels) and opts[gold] == ex.output
    plural = load_task("plural")
    for ex in plural.test[:10]:
        opts, gold = options_for(plural, ex, default_format(plural), n_candidates=4, seed=1)
        assert len(set(opts)) == 4 and opts[gold] == ex.output
        assert (opts, gold) == options_for(plural, ex, default_format(plural), n_candidates=4, seed=1)


def test_dev_split_comes_from_train_and_is_disjoint_from_the_demo_pool():
    t = load_task("sciq")
    dev, pool = split_dev(t, 64, 4, seed=0)
    train = {e.input for e in t.train}
    assert len(dev) == 64 and {e.input for e in dev} <= train and {e.input for e in pool} <= train
    assert not {e.input for e in dev} & {e.input for e in pool}
    assert not {e.input for e in dev + pool} & {e.input for e in t.test}
    assert split_dev(load_task("medmcqa"), 64, 4, 0) == ([], [])


def test_summarize_against_a_manual_bootstrap():
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 3, 40).tolist()
    zero = rng.integers(0, 3, 40).tolist()
    better = list(gold)  # always right
    methods = {"zero_shot": zero, "icl_cross_task": zero, "cast_mean_diff": better}
    part = TargetResult.from_dict({
        "target": "t", "n_test": 40, "gold": gold, "chance": 1 / 3, "majority": 0.5,
        "methods": {m: {"pred": p, "correct": [int(a == b) for a, b in zip(p, gold)], "prompt_tokens": 10.0,
                        "seconds": 1.0, "setting": None} for m, p in methods.items()}})
    rows = summarize([part], tr.METHODS, tr.REFS, n_boot=500, seed=0)
    by = {(r.target, r.method): r.cells() for r in rows}
    acc = np.mean(np.asarray(zero) == np.asarray(gold))
    idx = np.random.default_rng(0).integers(0, 40, size=(500, 40))
    c = (np.asarray(zero) == np.asarray(gold)).astype(float)
    lo, hi = np.percentile(c[idx].mean(1), [2.5, 97.5])
    r = by[("t", "zero_shot")]
    assert r["accuracy"] == pytest.approx(acc) and (r["ci_lo"], r["ci_hi"]) == pytest.approx((lo, hi))
    cast = by[("t", "cast_mean_diff")]
    assert cast["accuracy"] == 1.0 and cast["delta_zero"] == pytest.approx(1 - acc)
    assert not cast["delta_zero_noise"] and cast["delta_zero_lo"] > 0
    assert by[("t", "icl_cross_task")]["delta_zero_noise"]  # identical predictions: an interval around 0
    assert by[("mean", "cast_mean_diff")]["accuracy"] == 1.0


def _run(tmp_path, tiny, name, **kw):
    cfg = tr.TransferConfig(**{**CFG, **kw})
    rows = tr.run_transfer(tiny, cfg, tmp_path / name, png=False, log=lambda *a: None)
    return cfg, rows, tmp_path / name


def test_run_outputs_and_dev_chosen_settings(tmp_path, tiny):
    cfg, rows, out = _run(tmp_path, tiny, "a")
    for f in ("results.csv", "results.md", "costs.csv", "config.json", "sources.json", "vectors.safetensors",
              "sweep_last_item.html", "cost_accuracy.html", "accuracy_by_target.html"):
        assert (out / f).exists(), f
    part = json.loads((out / "parts" / "plural.part.json").read_text())
    # plural is a generation target: no contextual calibration (its options are drawn per item)
    assert set(part["methods"]) == set(tr.METHODS) - {"calibrated_zero_shot", "function_vector"}  # FV: opt-in
    assert part["n_test"] == 8 and part["n_dev"] == 6
    for c in tr.CONSTRUCTIONS:  # the test setting is the dev argmax of its construction
        best = max(r["dev_accuracy"] for r in part["sweep"] if r["construction"] == c)
        assert part["chosen"][c]["dev_accuracy"] == best
        assert (part["chosen"][c]["layer"], part["chosen"][c]["strength"]) == \
            (part["methods"][c]["setting"]["layer"], part["methods"][c]["setting"]["strength"])
    n_sweep = 1 + 3 * 2 * 2 + 2  # unsteered + 3 additive constructions x layers x strengths + task vector x layers
    assert len(part["sweep"]) == n_sweep
    # steering leaves the prompt length alone; ICL pays for its demonstrations
    m = part["methods"]
    tokens = {k: m[k]["prompt_tokens"] for k in ("cast_mean_diff", "zero_shot", "icl_cross_task")}
    assert tokens["cast_mean_diff"] == tokens["zero_shot"] < tokens["icl_cross_task"]
    assert len(rows) == 7 * 3


def test_resume_after_interruption_gives_the_same_results(tmp_path, tiny, monkeypatch):
    _, _, full = _run(tmp_path, tiny, "full")
    real, calls = tr.tune_and_test, []

    def dies_on_second(*a, **kw):
        calls.append(a[1].task.name)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*a, **kw)

    monkeypatch.setattr(tr, "tune_and_test", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, tiny, "resumed")
    out = tmp_path / "resumed"
    assert (out / "parts" / "last_item.part.json").exists() and not (out / "parts" / "plural.part.json").exists()
    assert not (out / "results.csv").exists() and not list(out.rglob("*.tmp"))
    first = (out / "parts" / "last_item.part.json").read_bytes()
    monkeypatch.setattr(tr, "tune_and_test", real)
    _run(tmp_path, tiny, "resumed")
    assert (out / "parts" / "last_item.part.json").read_bytes() == first  # a finished part is never rewritten
    assert (out / "results.csv").read_text() == (full / "results.csv").read_text()


def test_refuses_to_resume_with_a_different_config(tmp_path, tiny):
    _run(tmp_path, tiny, "a")
    with pytest.raises(ValueError, match="different config"):
        _run(tmp_path, tiny, "a", shots=3)


def test_the_folder_records_the_default_grid_so_a_changed_default_cannot_resume_it(tmp_path, tiny, monkeypatch):
    _, _, out = _run(tmp_path, tiny, "d", layers=None)
    recorded = json.loads((out / "config.json").read_text())["layers"]
    assert recorded == [1, 2] == json.loads((out / "parts" / "plural.part.json").read_text())["layers"]
    monkeypatch.setattr(tr, "default_layers", lambda n: (1,))
    with pytest.raises(ValueError, match="different config"):
        _run(tmp_path, tiny, "d", layers=None)


def test_test_only_target_borrows_settings_from_the_other_targets(tmp_path, tiny):
    _, rows, out = _run(tmp_path, tiny, "b", targets=("plural", "medmcqa"), limit=6)
    part = json.loads((out / "parts" / "medmcqa.part.json").read_text())
    assert part["sweep"] == [] and "icl_in_task" not in part["methods"]
    assert all(part["chosen"][c]["borrowed_from"] == ["plural"] for c in tr.CONSTRUCTIONS)
    assert any(r.target == "mean (1 of 2)" and r.method == "icl_in_task" for r in rows)
    with pytest.raises(ValueError, match="no train split"):
        _run(tmp_path, tiny, "c", targets=("medmcqa",), limit=6)


def test_cli_transfer_bad_input_is_one_line(tmp_path, capsys):
    from castlens.cli import main

    assert main(["transfer", "--model", "tiny-llama", "--sources", "plural", "--targets", "nope",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]
    assert main(["transfer", "--model", "tiny-llama", "--sources", "plural", "--targets", "plural",
                 "--out", str(tmp_path / "y")]) == 2
    assert "both source and target" in capsys.readouterr().err


def test_graph_selection_chooses_per_target_vectors(tmp_path, tiny):
    cfg, rows, out = _run(tmp_path, tiny, "g", select="cast", pool=12)
    recs = {t: json.loads((out / "vectors" / f"{t}.sources.json").read_text()) for t in CFG["targets"]}
    pool = candidate_pool([load_task(s) for s in CFG["sources"]], CFG["shots"], 0, 12)
    for t, rec in recs.items():
        assert rec["selection"] == "cast" and len(rec["samples"]) == CFG["n"]
        tasks = {t: load_task(t) for t in CFG["sources"]}
        chosen = {(s["task"], tasks[s["task"]].train[s["train_index"]].input) for s in rec["samples"]}
        assert chosen <= {(n, e.input) for n, e in pool}
    assert (out / "candidates.safetensors").exists() and (out / "results.csv").exists()
    with pytest.raises(ValueError, match="unknown selection method"):
        _run(tmp_path, tiny, "h", select="magic")


def test_paired_delta_against_a_manual_paired_bootstrap():
    rng = np.random.default_rng(1)
    parts = []
    for n in (30, 50):
        a, b = rng.integers(0, 2, n), rng.integers(0, 2, n)
        parts.append(_part({"a": a.tolist(), "b": b.tolist()}))
    d, lo, hi = (lambda iv: (iv.point, iv.lo, iv.hi))(paired_delta(parts, "a", "b", n_boot=400, seed=5))
    draws = []
    for p in parts:
        idx = np.random.default_rng(5).integers(0, p.n_test, size=(400, p.n_test))
        x = np.asarray(p.methods["a"].correct) - np.asarray(p.methods["b"].correct)
        draws.append(x[idx].mean(1))
    assert d == pytest.approx(np.mean([np.mean(np.subtract(p.methods["a"].correct, p.methods["b"].correct))
                                       for p in parts]))
    assert (lo, hi) == pytest.approx(tuple(np.percentile(np.mean(draws, 0), [2.5, 97.5])))
    same = paired_delta([_part({"a": [1, 0, 1, 1], "b": [1, 0, 1, 1]})], "a", "b")
    assert same == Interval(0.0, 0.0, 0.0) and same.noise


def _part(correct: dict) -> TargetResult:
    n = len(next(iter(correct.values())))
    return TargetResult("t", n, [0] * n, 0.5, 0.5, {m: MethodResult(c, c, 1.0, 0.0) for m, c in correct.items()})


def test_sample_diffs_refuses_samples_of_other_tasks_before_running(tiny):
    from castlens.tasks import TaskError

    up, plural = load_task("uppercase"), load_task("plural")
    with pytest.raises(TaskError, match=r"not sources: \['plural'\]"):
        sample_diffs(tiny, [up], [("uppercase", up.train[5]), ("plural", plural.train[0])], shots=2)
    with pytest.raises(TaskError, match="no source samples"):
        sample_diffs(tiny, [up], [], shots=2)


def test_calibrated_zero_shot_divides_out_the_content_free_prior(tiny):
    """Contextual calibration against a manual computation: each prompt scored alone in full."""
    import torch

    from castlens.evaluation import option_logprobs
    from castlens.experiments.protocol import CONTENT_FREE, ProtocolConfig, calibrated_zero_shot, prepare
    from castlens.tasks import Example
    from castlens.vectors import text_ids

    target = prepare(tiny, load_task("sst2"), ProtocolConfig(dev=4, limit=10))
    got = calibrated_zero_shot(tiny, target)["calibrated_zero_shot"]
    labels = list(target.task.labels)

    def scores(examples):
        ids = [target.zero_prefix + text_ids(tiny, target.fmt.render(e, False)) for e in examples]
        return option_logprobs(tiny, ids, [[target.fmt.verbalize(x) for x in labels]] * len(ids), batch_size=1)

    prior = torch.softmax(scores([Example(x, labels[0]) for x in CONTENT_FREE]), -1).mean(0)
    manual = (torch.log_softmax(scores(target.test.examples), -1) - prior.log()).argmax(-1).tolist()
    assert got.pred == manual
    assert calibrated_zero_shot(tiny, prepare(tiny, load_task("plural"), ProtocolConfig(limit=3))) == {}


def test_random_controls_as_a_distribution(tmp_path, tiny):
    cfg, rows, out = _run(tmp_path, tiny, "r", n_random=3)
    part = json.loads((out / "parts" / "plural.part.json").read_text())
    draws = ["random_vector", "random_vector_1", "random_vector_2"]
    assert set(draws) <= set(part["methods"]) and set(draws) <= set(part["chosen"])
    md = (out / "results.md").read_text()
    assert "Random controls as a distribution: 3 norm-matched random vectors" in md
    acc = [np.mean(part["methods"][d]["correct"]) for d in draws]
    cast = np.mean(part["methods"]["cast_mean_diff"]["correct"])
    rank = 1 + sum(a > cast for a in acc)
    row = next(line for line in md.splitlines() if line.startswith("| plural | ") and " of 4 |" in line)
    assert row.split("|")[5].strip() == f"{rank} of 4"
    assert f"{100 * np.mean(acc):.1f}" == row.split("|")[2].strip()


def test_function_vector_is_the_sum_of_the_top_heads_mean_writes_recomputed_by_hand(tmp_path, tiny):
    """--function-vector: the saved top-k vector equals the sum over the saved top-k heads of z @ W_O[l, h] at
    each few-shot prompt's last token (plain run_with_cache), averaged over the samples; the construction is in
    the tables with its k."""
    import torch
    from safetensors import safe_open

    from castlens.experiments.sources import SourceRecord, _few_prefix, source_demos
    from castlens.vectors import text_ids

    cfg = tr.TransferConfig(**{**CFG, "targets": ("plural",)}, function_vector=True, fv_heads=(1, 3), n_random=2)
    tr.run_transfer(tiny, cfg, tmp_path / "fv", png=False, log=lambda s: None)
    out = tmp_path / "fv"
    with safe_open(str(out / "function_vectors.safetensors"), "pt") as f:
        heads = [tuple(h) for h in json.loads(f.metadata()["heads"])]
        top3, effect = f.get_tensor("top3"), f.get_tensor("effect")
    assert effect.shape == (tiny.cfg.n_layers, tiny.cfg.n_heads) and len(heads) == 3
    assert float(effect[heads[0]]) == float(effect.max())
    record = SourceRecord.from_dict(json.loads((out / "sources.json").read_text()))
    sources = {t: load_task(t) for t in cfg.sources}
    demos = source_demos(list(sources.values()), cfg.shots, cfg.seed)
    want, n = torch.zeros(tiny.cfg.d_model), 0
    for t, i in record.samples:
        fmt = default_format(sources[t])
        ids = _few_prefix(tiny, sources[t], demos[t]) + text_ids(tiny, fmt.render(sources[t].train[i], False))
        _, cache = tiny.run_with_cache(torch.tensor([ids]))
        for layer, h in heads:
            z = cache[f"blocks.{layer}.attn.hook_z"][0, -1, h]
            w_o = tiny.blocks[layer].attn.o.weight.T.reshape(tiny.cfg.n_heads, tiny.cfg.d_head, -1)[h]
            want += z @ w_o
        n += 1
    assert torch.allclose(top3, want / n, atol=1e-4)
    part = json.loads((out / "parts" / "plural.part.json").read_text())
    assert part["methods"]["function_vector"]["setting"]["vector"] in ("top1", "top3")
    assert "function_vector rank" in (out / "results.md").read_text()


def test_draw_seed_redraws_the_source_samples_alone(tmp_path, tiny):
    """Two runs that differ only in --draw-seed: other source samples (so other vectors), the same test items,
    gold answers, dev sweep items and zero-shot predictions."""
    cfg = tr.TransferConfig(**{**CFG, "targets": ("plural",)})
    tr.run_transfer(tiny, cfg, tmp_path / "a", png=False, log=lambda s: None)
    tr.run_transfer(tiny, tr.TransferConfig(**{**CFG, "targets": ("plural",)}, draw_seed=7), tmp_path / "b",
                    png=False, log=lambda s: None)
    src = [json.loads((tmp_path / r / "sources.json").read_text())["samples"] for r in "ab"]
    assert src[0] != src[1]
    a, b = (json.loads((tmp_path / r / "parts" / "plural.part.json").read_text()) for r in "ab")
    assert a["gold"] == b["gold"] and a["n_dev"] == b["n_dev"]
    assert a["methods"]["zero_shot"]["pred"] == b["methods"]["zero_shot"]["pred"]
    assert a["sweep"][0] == b["sweep"][0]  # the unsteered dev point: the same dev items


def test_paired_delta_against_the_mean_of_several_references():
    """Against several references (the random draws), the item-wise difference to their mean, by hand."""
    a, r1, r2 = [1, 1, 0, 1, 0, 1], [0, 1, 0, 0, 0, 1], [1, 0, 0, 0, 1, 1]
    p = _part({"a": a, "r1": r1, "r2": r2})
    iv = paired_delta([p], "a", ["r1", "r2"], n_boot=300, seed=2)
    x = np.array(a) - (np.array(r1) + np.array(r2)) / 2  # [0.5, 0.5, 0, 1, -0.5, 0]
    assert iv.point == pytest.approx(x.mean()) == pytest.approx(0.25)
    idx = np.random.default_rng(2).integers(0, 6, size=(300, 6))
    assert (iv.lo, iv.hi) == pytest.approx(tuple(np.percentile(x[idx].mean(1), [2.5, 97.5])))
    assert paired_delta([p], "a", ["r1"]) == paired_delta([p], "a", "r1")
    with pytest.raises(ValueError, match="no reference"):
        paired_delta([p], "a", [])
