import csv
import dataclasses

import pytest
import torch

from castlens import geometry as geo
from castlens.activations import last_token_resid
from castlens.analysis import variant_prompts
from castlens.cli import main
from castlens.experiments.explain import ExplainConfig, run_explain
from castlens.experiments.run import RunError
from castlens.tasks import load_task

SOURCES, TARGETS, EXTRA = ("uppercase", "first_item", "next_number"), ("plural", "antonym"), ("last_item",)
CFG = ExplainConfig(model="tiny-llama", tasks=EXTRA, sources=SOURCES, targets=TARGETS, n=4, shots=2, dev=8, limit=12,
                    layer=2, strengths=(1.0, 4.0), fv_heads=(1, 3), n_random=2, n_boot=200)
FILES = ("summary.md", "attribution.csv", "patching.csv", "split_steering.csv", "logit_lens.md")


@pytest.fixture(scope="module")
def explained(tmp_path_factory, tiny):
    out = tmp_path_factory.mktemp("explain")
    run_explain(tiny, CFG, out, png=False, log=lambda s: None)
    return out


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_attribution_adds_up_to_an_independent_difference(explained, tiny):
    """Per variant, the components' writes along u sum to the mean last-token difference along u, recomputed here
    from plain last_token_resid (u: the uncentred first component of those independent differences)."""
    diffs = {}
    for name in (*SOURCES, *TARGETS, *EXTRA):
        p, _ = variant_prompts(tiny, load_task(name), CFG.n, CFG.shots, CFG.seed)
        zero = last_token_resid(tiny, p["zero"], layers=[2])[:, 0]
        for v in ("few", "filler", "shuffled"):
            diffs.setdefault(v, []).append(last_token_resid(tiny, p[v], layers=[2])[:, 0] - zero)
    u = geo.uncentred_first_component(torch.cat(diffs["few"])[:, None])["direction"][0].float()
    rows = _rows(explained / "attribution.csv")
    for v in ("few", "filler", "shuffled"):
        total = sum(float(r["shared"]) for r in rows if r["variant"] == v)
        want = float((torch.cat(diffs[v]) @ u).mean())
        assert total == pytest.approx(want, abs=2e-3)  # the CSV keeps 4 decimals per component
    assert {r["component"] for r in rows} >= {"embed", "L0H0", "L2H3", "L1 attn rest", "L2 mlp"}


def test_split_steering_has_every_part_the_controls_and_paired_deltas(explained):
    rows = _rows(explained / "split_steering.csv")
    methods = {r["method"] for r in rows}
    assert methods >= {"zero_shot", "cast_mean_diff", "cast_shared", "cast_remainder", "shared_of_others",
                       "function_vector", "random_vector", "random_vector_1"}
    shared = next(r for r in rows if r["target"] == "mean" and r["method"] == "cast_shared")
    assert shared["delta_whole"] != "" and shared["delta_random"] != "" and shared["delta_zero"] != ""
    assert {r["layer"] for r in rows if r["layer"]} == {"2"}  # steered at the explained layer only
    patch = _rows(explained / "patching.csv")
    assert {r["means"] for r in patch} == {"few", "filler", "shuffled"} and len(patch) == 6 * 3 * 3 * 4


def test_a_rerun_resumes_to_the_same_files_and_another_config_is_refused(explained, tiny):
    before = {f: (explained / f).read_bytes() for f in FILES}
    run_explain(tiny, CFG, explained, png=False, log=lambda s: None)
    assert {f: (explained / f).read_bytes() for f in FILES} == before
    (explained / "parts" / "tensors" / "plural.safetensors").unlink()  # e.g. a clone: the tensors are not committed
    run_explain(tiny, CFG, explained, png=False, log=lambda s: None)
    assert {f: (explained / f).read_bytes() for f in FILES} == before
    with pytest.raises(RunError, match="n"):
        run_explain(tiny, dataclasses.replace(CFG, n=5), explained, png=False, log=lambda s: None)


@pytest.mark.parametrize("change, match", [
    (dict(targets=("uppercase",)), "both source and target"),
    (dict(n_random=1), "n-random"),
    (dict(shots=0), "shots"),
    (dict(fv_heads=(0,)), "fv-heads"),
])
def test_bad_configs_are_refused_before_any_model_work(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(CFG, **change)


def test_cli_refuses_a_layer_out_of_range(tmp_path, capsys):
    code = main(["explain", "--model", "tiny-llama", "--sources", "uppercase,first_item", "--targets", "plural",
                 "--layer", "9", "--n", "2", "--out", str(tmp_path / "x"), "--no-png"])
    assert code != 0
    assert "layer 9 out of range" in capsys.readouterr().err
    assert not (tmp_path / "x" / "parts").exists()


def test_patching_queries_leave_out_the_attribution_queries(tiny):
    """The patched means come from the attribution queries' few-shot prompts, so those queries are never patched;
    reverse_word's seeded patch draw hits 3 of them at n=8 and they are replaced by further draws."""
    from castlens.experiments.explain import patch_queries
    from castlens.prompts import contrastive_pairs, default_format

    task = load_task("reverse_word")
    used = [p.query for p in contrastive_pairs(task, 8, 4, seed=0, fmt=default_format(task))]
    _, plain = patch_queries(tiny, task, 8, 0, 4)
    _, kept = patch_queries(tiny, task, 8, 0, 4, used)
    assert len({e.input for e in plain.examples} & set(used)) > 0  # the draw alone would overlap
    assert len(kept.examples) == 8 and not {e.input for e in kept.examples} & set(used)
    assert len({e.input for e in kept.examples}) == 8


def test_the_logit_lens_table_decodes_the_shared_direction_of_every_layer(explained, tiny):
    """Row l of the per-layer table is the logit lens of the uncentred first component of the few-shot differences
    after layer l, recomputed here from plain last_token_resid at layer 0."""
    from castlens.mechanism import logit_lens

    text = (explained / "logit_lens.md").read_text()
    rows = [line for line in text.split("every layer up to it")[1].splitlines() if line.startswith("| ")][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| 0", "| 1", "| 2"]
    diffs = []
    for name in (*SOURCES, *TARGETS, *EXTRA):
        p, _ = variant_prompts(tiny, load_task(name), CFG.n, CFG.shots, CFG.seed)
        diffs.append(last_token_resid(tiny, p["few"], layers=[0])[:, 0] - last_token_resid(tiny, p["zero"],
                                                                                           layers=[0])[:, 0])
    u0 = geo.uncentred_first_component(torch.cat(diffs)[:, None])["direction"][0].float()
    (want,) = logit_lens(tiny, {"u0": u0}, k=8)
    assert rows[0].split(" | ")[1] == " ".join(f"`{t!r}`"[0:40] for t in want.promoted).replace("|", "\\|")


def test_patch_intervals_are_the_mean_over_tasks_of_the_csv_with_an_interval_around_it(explained):
    """The summary's causal-effect intervals: the mean over the source tasks of each head's shift (recomputed here
    from patching.csv) inside a bootstrap interval over tasks; a task set of copies of one task has no spread."""
    from castlens.experiments.explain import TaskMechanism, _shared, patch_intervals

    parts = [TaskMechanism.load(explained / "parts" / "tensors" / f"{t}.safetensors")
             for t in (*SOURCES, *TARGETS, *EXTRA)]
    u = _shared(parts)
    src = parts[:len(SOURCES)]
    rows = [r for r in _rows(explained / "patching.csv") if r["means"] == "filler" and r["task"] in SOURCES]
    for v in ("few", "filler", "shuffled"):
        got = patch_intervals(src, u, v, 200, 0)
        assert got["shift"].shape == (3, 4, 3) and got["gold_logprob"].shape == (3, 4, 3)
        assert (got["shift"][..., 1] <= got["shift"][..., 0] + 1e-9).all()
        assert (got["shift"][..., 0] <= got["shift"][..., 2] + 1e-9).all()
    got = patch_intervals(src, u, "filler", 200, 0)["shift"]
    for li, h in [(0, 0), (1, 2), (2, 3)]:
        want = sum(float(r["shift_along_shared"]) for r in rows if (int(r["layer"]), int(r["head"])) == (li, h)) / 3
        assert got[li, h, 0] == pytest.approx(want, abs=1e-4)
    same = patch_intervals([src[0]] * 3, u, "few", 200, 0)["shift"]
    assert same[..., 1] == pytest.approx(same[..., 0]) and same[..., 2] == pytest.approx(same[..., 0])
