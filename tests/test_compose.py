"""castlens.compose: library, basis, the adaptation objective and the coefficient search."""

from dataclasses import replace

import numpy as np
import pytest

from castlens import compose
from castlens.experiments.compose import METHODS, ComposeConfig, run_compose


def test_objective_on_hand_made_cases():
    base = [True, True, False, False]
    # one fixed answer, nothing broken, confidence unchanged: +1/4
    assert compose.objective(base, [True, True, True, False], [.5] * 4, [.5] * 4) == pytest.approx(0.25)
    # one broken answer costs beta = 2 times a fixed one
    assert compose.objective(base, [True, False, False, False], [.5] * 4, [.5] * 4) == pytest.approx(-0.5)
    # a fix and a break: net negative
    assert compose.objective(base, [True, False, True, False], [.5] * 4, [.5] * 4) < 0
    # losing all confidence without breaking anything costs less than one break
    conf_loss = compose.objective(base, base, [1.0] * 4, [0.0] * 4)
    assert conf_loss == pytest.approx(-0.1) and conf_loss > compose.objective(base, [False, True, False, False],
                                                                             [.5] * 4, [.5] * 4)
    with pytest.raises(ValueError, match="must exceed"):
        compose.objective(base, base, [0] * 4, [0] * 4, beta=0.1, gamma=0.2)
    with pytest.raises(ValueError, match="equally many"):
        compose.objective(base, base[:3], [0] * 4, [0] * 4)


def test_basis_kinds():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(4, 16))
    v[3] = v[0] + v[1]  # rank 3
    lib = compose.library({f"t{i}": np.stack([v[i], -v[i]]) for i in range(4)}, layer=0)
    raw, _ = compose.basis(lib, "raw")
    assert np.allclose(raw, v)
    ortho, _ = compose.basis(lib, "orthonormal")
    assert ortho.shape == (3, 16)
    g = ortho @ ortho.T
    assert np.allclose(g, np.eye(3) * g[0, 0])  # orthogonal, equal norms
    # the span is kept: every library vector is a combination of the basis
    coef, *_ = np.linalg.lstsq(ortho.T, v.T, rcond=None)
    assert np.allclose(ortho.T @ coef, v.T)
    pcs, ratio = compose.basis(lib, "pca", k=2)
    assert pcs.shape == (2, 16) and ratio.shape == (2,) and ratio[0] >= ratio[1] and ratio.sum() <= 1 + 1e-9
    with pytest.raises(ValueError, match="no layer"):
        compose.library({"a": np.zeros((2, 3))}, layer=5)


def test_search_recovers_a_planted_optimum_and_is_seeded():
    target = np.array([1.2, -0.5, 0.0])
    f = lambda a: -float(((a - target) ** 2).sum())  # noqa: E731
    best, trace = compose.search(f, 3, n_trials=80, seed=0)
    assert np.abs(best - target).max() < 0.35
    assert trace[0]["alpha"] == [0.0, 0.0, 0.0] and len(trace) == 80
    again, _ = compose.search(f, 3, n_trials=80, seed=0)
    assert np.allclose(best, again)


def test_search_recovers_a_planted_combination_on_the_tiny_model(tiny):
    """Gold answers are the tiny model's own predictions when steered by V^T alpha*; searching alpha with the
    adaptation objective from the unsteered model finds coefficients close to alpha*."""
    import torch

    from castlens.reuse import UNSTEERED, Setting, prefix_option_logprobs

    g = torch.Generator().manual_seed(0)
    basis = torch.randn(3, 64, generator=g)
    basis = basis / basis.norm(dim=-1, keepdim=True) * 6
    alpha_star = np.array([1.5, -1.0, 0.5])
    queries = [torch.randint(3, 250, (int(n),), generator=g).tolist() for n in torch.randint(5, 30, (40,), generator=g)]
    options = [[[65], [66], [67], [68]]] * 40

    def scores(alpha):
        v = (torch.tensor(alpha, dtype=torch.float32) @ basis).expand(4, -1).contiguous()
        return prefix_option_logprobs(tiny, [], queries, options, [Setting("s", v, 2, 1.0)])[0]

    gold = scores(alpha_star).argmax(-1)
    base = prefix_option_logprobs(tiny, [], queries, options, [UNSTEERED])[0]
    rows = torch.arange(len(queries))
    base_ok, base_p = (base.argmax(-1) == gold).numpy(), torch.softmax(base, -1)[rows, gold].numpy()
    assert base_ok.mean() < 0.8  # the planted direction matters

    def evaluate(alpha):
        s = scores(alpha)
        return compose.objective(base_ok, (s.argmax(-1) == gold).numpy(), base_p,
                                 torch.softmax(s, -1)[rows, gold].numpy())

    best, trace = compose.search(evaluate, 3, n_trials=80, bound=3.0, seed=0)
    cos = best @ alpha_star / np.linalg.norm(best) / np.linalg.norm(alpha_star)
    assert cos > 0.95 and np.abs(best - alpha_star).max() < 0.5
    assert max(t["objective"] for t in trace) > trace[0]["objective"] == pytest.approx(0.0)


def test_run_compose_leaves_out_the_family_and_resumes(tmp_path, tiny):
    import json

    from castlens.vectors import compute_vectors

    lib = compute_vectors(tiny, ["uppercase", "first_item", "next_number"], n=3, shots=2)
    lib["financial_phrasebank"] = lib["uppercase"]  # a stand-in vector under a sentiment task's name
    cfg = ComposeConfig(model="tiny-llama", library=tuple(lib), targets=("sst2", "plural"), layer=2, examples=2,
                        trials=4, limit=8, n_boot=50)
    rows = run_compose(tiny, lib, cfg, tmp_path, batch_size=8, png=False, log=lambda *a: None)
    part = json.loads((tmp_path / "parts" / "sst2.part.json").read_text())
    assert "financial_phrasebank" not in part["library"] and len(part["alpha"]) == 3  # same family: left out
    assert "financial_phrasebank" in json.loads((tmp_path / "parts" / "plural.part.json").read_text())["library"]
    assert set(part["methods"]) == set(METHODS) and part["scored_examples"]["search"] == 4 * 2
    before = (tmp_path / "parts" / "plural.part.json").read_bytes()
    again = run_compose(tiny, lib, cfg, tmp_path, batch_size=8, png=False, log=lambda *a: None)
    assert (tmp_path / "parts" / "plural.part.json").read_bytes() == before and again == rows
    with pytest.raises(ValueError, match="different config"):  # a resume with other settings is refused
        run_compose(tiny, lib, replace(cfg, trials=5), tmp_path, png=False, log=lambda *a: None)
    head = (tmp_path / "coefficients.csv").read_text().splitlines()[0]
    assert head == "target,uppercase,first_item,next_number,financial_phrasebank"


def test_random_library_keeps_names_and_norms_only():
    import torch

    lib = {"a": torch.randn(4, 16), "b": torch.randn(4, 16) * 3}
    rnd = compose.random_library(lib, seed=0)
    assert list(rnd) == ["a", "b"]
    for k in lib:
        assert np.allclose(np.linalg.norm(rnd[k], axis=1), lib[k].norm(dim=1).numpy(), rtol=1e-5)
        cos = (rnd[k] * lib[k].numpy()).sum(1) / np.linalg.norm(rnd[k], axis=1) / lib[k].norm(dim=1).numpy()
        assert np.abs(cos).max() < 0.9
    assert not np.allclose(rnd["a"], compose.random_library(lib, seed=1)["a"])


def test_compare_runs_pairs_the_same_items(tmp_path):
    import json
    from dataclasses import replace

    from castlens.experiments.compose import compare_runs
    from castlens.experiments.results import MethodResult, TargetResult

    gold = [0, 1, 2, 0, 1, 2, 0, 1]

    def part(correct):
        return TargetResult("t", 8, gold, 1 / 3, 3 / 8, {"steer2adapt": MethodResult(correct, correct, 1.0, 0.0)})

    there, here = part([1] * 8), part([1, 0] * 4)
    (tmp_path / "a" / "parts").mkdir(parents=True)
    (tmp_path / "a" / "parts" / "t.part.json").write_text(json.dumps(there.to_dict()))
    md = compare_runs(tmp_path / "a", tmp_path / "b", [here], n_boot=200)
    row = next(line for line in md.splitlines() if line.startswith("| t |"))
    assert row.startswith("| t | 100.0 | 50.0 | +50.0 [")  # 4 of 8 items differ, all in favour of "there"
    assert not row.endswith("~ |")
    with pytest.raises(ValueError, match="other items"):
        compare_runs(tmp_path / "a", tmp_path / "b", [replace(here, gold=gold[::-1])])
    with pytest.raises(ValueError, match="no finished part"):
        compare_runs(tmp_path / "a", tmp_path / "b", [replace(here, target="u")])
