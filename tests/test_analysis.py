import json

import pytest
import torch

from castlens.analysis import VARIANTS, Collected, collect, summarize, write_report
from castlens.prompts import contrastive_pairs, default_format, filler_prompt, shuffled_label_prompt
from castlens.tasks import load_task
from castlens.vectors import load_vectors, save_vectors
from castlens.models import tokenizer_of


def test_controls_keep_instruction_query_and_length(tiny):
    tok = tokenizer_of(tiny)
    count = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    task = load_task("sst2")
    fmt = default_format(task)
    for p in contrastive_pairs(task, 5, 4, seed=2):
        filler = filler_prompt(p, fmt, count)
        demos = p.few[len(fmt.instruction) + 2: -len(p.zero.split("\n\n", 1)[1]) - 2]
        block = filler[len(fmt.instruction) + 2: -len(p.zero.split("\n\n", 1)[1]) - 2]
        assert filler.startswith(fmt.instruction) and filler.endswith(p.zero.split("\n\n", 1)[1])
        assert 0 <= count(demos) - count(block) <= 12 and "Answer:" not in block  # one word short at most
        shuffled = shuffled_label_prompt(p, fmt, labels=task.labels)
        assert [b.split("\nAnswer:")[0] for b in shuffled.split("\n\n")] == \
            [b.split("\nAnswer:")[0] for b in p.few.split("\n\n")]  # same inputs, only the answers change
    gen = contrastive_pairs(load_task("antonym"), 5, 4, seed=0)
    for p in gen:
        outs = [b.split("\nAnswer: ")[1] for b in shuffled_label_prompt(p, default_format(load_task("antonym")))
                .split("\n\n")[1:-1]]
        assert sorted(outs) == sorted(d.output for d in p.demos) and outs != [d.output for d in p.demos]


def test_collect_matches_the_vectors_and_round_trips(tiny, tmp_path):
    from castlens.vectors import task_vector

    test_only = tmp_path / "test_only.json"  # like medmcqa: a test split and no train split
    test_only.write_text(json.dumps({"name": "test_only", "kind": "classification", "labels": ["x", "y"],
                                     "train": [], "test": [{"input": f"q{i}", "output": "xy"[i % 2]}
                                                           for i in range(8)]}))
    c = collect(tiny, ["add", "antonym", str(test_only)], n=4, shots=2, progress=False)
    assert set(c.diffs) == set(VARIANTS) and c.tasks == ["add", "antonym", "test_only"]
    assert any("no train split" in n for n in c.notes)
    ref = task_vector(tiny, "add", n=4, shots=2)  # the same pairs through the plain vector path
    assert (c.diffs["few"]["add"] - ref.samples).abs().max() < 1e-4
    assert not torch.equal(c.diffs["filler"]["add"], c.diffs["few"]["add"])
    save_vectors(tmp_path / "v", c.to_vectors())
    back = Collected.from_vectors(load_vectors(tmp_path / "v.safetensors"))
    assert back.tasks == c.tasks and torch.equal(back.diffs["shuffled"]["antonym"], c.diffs["shuffled"]["antonym"])


def test_summary_finds_a_planted_shared_direction(tmp_path):
    """Tasks share a direction at layer 2 only; the controls are isotropic noise at every layer."""
    g = torch.Generator().manual_seed(0)
    d, n, L = 128, 30, 4
    u = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)

    def samples(shared: bool) -> torch.Tensor:
        x = torch.randn(n, L, d, generator=g)
        if shared:
            x[:, 2] += u * 12 * torch.rand(n, 1, generator=g)  # varying size: centred PCA sees it
        return x

    tasks = ["a", "b", "c", "d"]
    diffs = {"few": {t: samples(True) for t in tasks}, "filler": {t: samples(False) for t in tasks},
             "shuffled": {t: samples(False) for t in tasks}}
    c = Collected("toy", tasks, n, 3, 0, diffs)
    s = summarize(c, n_boot=200)
    assert s["best_layer"] == 2
    few = s["cross_task_cosine"]["few"]
    assert few["mean"][2] > 0.85 and abs(few["mean"][0]) < 0.15
    assert few["lo"][2] > s["cross_task_cosine"]["filler"]["hi"][2]
    assert min(s["pc1_share_best_layer"].values()) > 0.7  # noise of 30 samples keeps the mean off u a bit
    assert s["pca_explained_variance_ratio"][2][0] > 2 * s["pca_explained_variance_ratio"][0][0]
    files = write_report(c, s, tmp_path, png=False)
    assert json.loads((tmp_path / "summary.json").read_text())["best_layer"] == 2
    assert "| 2 (best) |" in (tmp_path / "summary.md").read_text()
    assert {f.name for f in files} >= {"cosine_by_layer.html", "cosine_heatmap.html", "pca_scatter.html",
                                       "pca_explained_variance.html"}


def test_summary_needs_two_tasks():
    c = Collected("toy", ["a"], 3, 1, 0, {"few": {"a": torch.randn(3, 2, 8)}})
    with pytest.raises(ValueError, match="at least 2 tasks"):
        summarize(c)


def test_report_without_png_export_writes_html_and_says_how_to_fix(tmp_path, monkeypatch, capsys):
    from castlens import plots

    monkeypatch.setattr(plots, "png_export_available", lambda: False)
    tasks = ["a", "b"]
    g = torch.Generator().manual_seed(1)
    c = Collected("toy", tasks, 5, 1, 0, {v: {t: torch.randn(5, 3, 16, generator=g) for t in tasks}
                                        for v in VARIANTS})
    files = write_report(c, summarize(c, n_boot=50), tmp_path)  # png=None: decide from availability
    assert not [f for f in files if f.suffix == ".png"] and (tmp_path / "cosine_by_layer.html").is_file()
    assert "apt-get install -y chromium" in capsys.readouterr().out
