"""castlens.compose: library, basis, the adaptation objective and the coefficient search."""

import numpy as np
import pytest

from castlens import compose


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
