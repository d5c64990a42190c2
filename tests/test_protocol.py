"""castlens.experiments.protocol: a whole tiny-model experiment through tune_and_test, every number checked against
an independent computation (each prompt alone, in full, steered by a plain hook at its last token)."""

import numpy as np
import pytest
import torch

from castlens.evaluation import option_logprobs
from castlens.experiments.protocol import ProtocolConfig, default_layers, grid, options_for, prepare, tune_and_test
from castlens.experiments.results import Setting
from castlens.steering import steering
from castlens.tasks import load_task
from castlens.vectors import text_ids

CFG = ProtocolConfig(dev=6, shots=2, limit=5, n_candidates=4, seed=0)
LAYERS, STRENGTHS = (1, 2), (1.0, 4.0, 16.0)


def _manual_scores(tiny, target, items, vector, setting):
    """Option log-probabilities of each item, prompt run alone, steered at its own last token (or not)."""
    out = []
    for ex in items:
        ids = target.zero_prefix + text_ids(tiny, target.fmt.render(ex, False))
        opts, _ = options_for(target.task, ex, target.fmt, CFG.n_candidates, CFG.seed)
        if setting is None:
            out.append(option_logprobs(tiny, [ids], [opts], batch_size=1)[0])
            continue
        with steering(tiny, vector, setting.layer, setting.strength, positions=torch.tensor([len(ids) - 1])):
            out.append(option_logprobs(tiny, [ids], [opts], batch_size=1)[0])
    return torch.stack(out)


@pytest.fixture(scope="module")
def experiment(tiny):
    g = torch.Generator().manual_seed(3)
    vector = torch.randn(tiny.cfg.n_layers, tiny.cfg.d_model, generator=g)
    target = prepare(tiny, load_task("plural"), CFG)
    result = tune_and_test(tiny, target, grid({"planted": vector}, LAYERS, STRENGTHS), log=lambda *a: None)
    return vector, target, result


def test_the_chosen_setting_is_the_argmax_of_a_hand_computed_dev_sweep(tiny, experiment):
    vector, target, result = experiment
    gold = torch.tensor(target.dev.gold)
    keys = {}
    for i, (layer, s) in enumerate((layer, s) for layer in LAYERS for s in STRENGTHS):
        sc = _manual_scores(tiny, target, target.dev.examples, vector, Setting("planted", layer, s))
        acc = float((sc.argmax(-1) == gold).double().mean())
        gold_lp = float(torch.log_softmax(sc, -1)[torch.arange(len(gold)), gold].mean())
        keys[(layer, s)] = (round(acc, 9), gold_lp, -i)
        point = next(p for p in result.sweep if (p.setting.layer, p.setting.strength) == (layer, s))
        assert point.dev_accuracy == pytest.approx(acc) and point.dev_gold_logprob == pytest.approx(gold_lp, abs=1e-3)
    best = max(keys, key=keys.get)
    chosen = result.chosen["planted"].setting
    assert (chosen.layer, chosen.strength) == best
    assert len({k[:2] for k in keys.values()}) == len(keys)  # every setting scores differently: a real choice
    assert best != min(keys, key=keys.get)
    assert result.methods["planted"].setting == chosen


def test_test_scores_are_the_plain_steered_and_unsteered_forwards(tiny, experiment):
    vector, target, result = experiment
    test = target.test.examples
    for name, setting in (("zero_shot", None), ("planted", result.chosen["planted"].setting)):
        manual = _manual_scores(tiny, target, test, vector, setting)
        assert result.methods[name].pred == manual.argmax(-1).tolist()
        assert result.methods[name].correct == [int(p == g) for p, g in zip(manual.argmax(-1).tolist(), result.gold)]
    assert result.n_test == CFG.limit and result.n_dev == CFG.dev and result.layers == list(LAYERS)
    assert result.chance == pytest.approx(1 / CFG.n_candidates)


def test_a_result_round_trips_through_its_part_file(experiment):
    from castlens.experiments.results import TargetResult

    _, _, result = experiment
    assert TargetResult.from_dict(result.to_dict()) == result


def test_a_target_without_dev_items_borrows_the_best_mean_setting(tiny, experiment):
    vector, _, donor = experiment
    target = prepare(tiny, load_task("medmcqa"), ProtocolConfig(limit=3))
    result = tune_and_test(tiny, target, grid({"planted": vector}, LAYERS, STRENGTHS), donors=[donor, donor],
                           log=lambda *a: None)
    best = max((p for p in donor.sweep if p.setting.construction == "planted"), key=lambda p: p.dev_accuracy)
    assert result.chosen["planted"].borrowed_from == (donor.target, donor.target)
    assert result.chosen["planted"].dev_accuracy == pytest.approx(best.dev_accuracy)
    assert np.isclose(result.methods["planted"].accuracy, np.mean(result.methods["planted"].correct))


def test_limit_takes_a_seeded_subset_stratified_by_label():
    """The first 70 Financial PhraseBank test items are all one label: --limit must not take the first N."""
    from collections import Counter

    from castlens.experiments.protocol import test_items

    t = load_task("financial_phrasebank")
    idx = test_items(t, 60, seed=0)
    assert len(idx) == 60 == len(set(idx)) and idx == sorted(idx) and idx != list(range(60))
    full, got = Counter(e.output for e in t.test), Counter(t.test[i].output for i in idx)
    for label, n in full.items():  # each label keeps its share, to within one item
        assert abs(got[label] - 60 * n / len(t.test)) <= 1
    assert test_items(t, 60, seed=0) == idx and test_items(t, 60, seed=1) != idx
    assert test_items(t, None, 0) == list(range(len(t.test))) == test_items(t, 10**6, 0)


def test_a_staged_sweep_scores_the_middle_strength_then_the_two_best_layers(tiny, experiment):
    """staged=True: the first pass is every layer at the middle strength, the second every strength at the two
    best first-pass layers; the choice is the argmax over the scored points, each score a hand-computed one."""
    vector, target, _ = experiment
    layers, strengths = (0, 1, 2), (1.0, 4.0, 16.0)
    result = tune_and_test(tiny, target, grid({"planted": vector}, layers, strengths), log=lambda *a: None,
                           staged=True)
    gold = torch.tensor(target.dev.gold)
    keys = {}
    for layer, s in ((layer, s) for layer in layers for s in strengths):
        sc = _manual_scores(tiny, target, target.dev.examples, vector, Setting("planted", layer, s))
        keys[(layer, s)] = (round(float((sc.argmax(-1) == gold).double().mean()), 9),
                            float(torch.log_softmax(sc, -1)[torch.arange(len(gold)), gold].mean()))
    first = sorted(layers, key=lambda x: keys[(x, 4.0)], reverse=True)[:2]
    want = {(x, 4.0) for x in layers} | {(x, s) for x in first for s in strengths}
    got = {(p.setting.layer, p.setting.strength) for p in result.sweep[1:]}
    assert got == want and len(got) == 7 and len(result.sweep) == 8
    order = [(x, s) for x in layers for s in strengths]
    best = max(want, key=lambda k: (*keys[k], -order.index(k)))
    chosen = result.chosen["planted"].setting
    assert (chosen.layer, chosen.strength) == best
    for p in result.sweep[1:]:
        assert p.dev_accuracy == pytest.approx(keys[(p.setting.layer, p.setting.strength)][0])


def test_borrowing_from_staged_sweeps_uses_the_settings_every_donor_scored():
    """Donors with different second passes: the borrowed setting is the best mean over the common points only."""
    from castlens.experiments.protocol import borrowed_settings
    from castlens.experiments.results import SweepPoint, TargetResult

    def donor(name, points):
        return TargetResult(name, 1, [0], 0.5, 0.5, {}, sweep=[SweepPoint(Setting("unsteered"), 0.3)] + [
            SweepPoint(Setting("v", layer, s), acc) for (layer, s), acc in points.items()])

    a = donor("a", {(1, 4.0): 0.5, (2, 4.0): 0.6, (2, 1.0): 0.9})   # (2, 1.0) only a scored
    b = donor("b", {(1, 4.0): 0.7, (2, 4.0): 0.6, (1, 1.0): 0.9})   # (1, 1.0) only b scored
    got = borrowed_settings("t", [a, b], ["v"])["v"]
    assert (got.setting.layer, got.setting.strength) == (1, 4.0) and got.dev_accuracy == pytest.approx(0.6)
    assert got.borrowed_from == ("a", "b")


@pytest.mark.parametrize("staged", [False, True])
def test_sweeps_of_disjoint_constructions_joined_equal_the_whole_sweep(tiny, experiment, staged):
    """Split over processes, each construction's sweep is scored alone: joined, the points (numbers and order) and
    the choices are those of one sweep of every construction, and the test scores too."""
    from castlens.experiments.protocol import dev_sweep, join_sweeps

    vector, target, _ = experiment
    g = torch.Generator().manual_seed(5)
    vectors = {"planted": vector, "other": torch.randn(vector.shape, generator=g),
               "third": torch.randn(vector.shape, generator=g)}
    cands = grid(vectors, (0, 1, 2), STRENGTHS)
    whole = tune_and_test(tiny, target, cands, log=lambda *a: None, staged=staged)
    parts = [dev_sweep(tiny, target, {c: cands[c] for c in names}, staged=staged)
             for names in (["third"], ["planted", "other"])]
    joined = join_sweeps(cands, parts, staged)
    assert joined == whole.sweep  # exactly: a construction's points do not depend on the others scored beside it
    again = tune_and_test(tiny, target, cands, log=lambda *a: None, staged=staged, sweep=joined)
    assert again.chosen == whole.chosen and again.sweep == whole.sweep
    assert {k: m.pred for k, m in again.methods.items()} == {k: m.pred for k, m in whole.methods.items()}
    with pytest.raises(ValueError, match="do not cover"):
        join_sweeps(cands, parts[1:], staged)


@pytest.mark.parametrize("n_layers", range(3, 65))
def test_default_layers_cover_the_depth_evenly_with_at_most_nine(n_layers):
    layers = default_layers(n_layers)
    steps = set(np.diff(layers).tolist())
    assert 1 <= len(layers) <= 9 and len(steps) <= 1  # evenly spaced, a bounded sweep at any depth
    assert layers[0] == (steps or {1}).pop() and 0 < layers[-1] < n_layers - 1  # neither the first nor the last
    assert n_layers - 1 - layers[-1] <= layers[0]  # no gap at the top larger than the step
