"""Tests for castlens.geometry against planted data and independent numpy computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from castlens import geometry as G

D, T, N = 256, 6, 40


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These tensors are tiny: one thread is as fast, and avoids OpenMP spin-wait stalls (~100x seen)
    when the 2 cores are shared with other processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


A_BY_LAYER = (0.0, 2.0, 12.0)  # layer 0: no shared direction; 1: weak; 2: strong


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _planted(a_by_layer=A_BY_LAYER, n=N, sigma=0.25, b=1.0, seed=0, d=D, n_tasks=T, dir_seed=None):
    """Per-task samples x = a * s_i * u + b * w_task + sigma * noise, per layer.

    u: shared unit direction (same for all tasks and layers); s_i ~ 1 + 0.5 N(0, 1) varies the
    shared component's size across samples (so centred PCA can see it); w_task: a unit
    task-specific direction; both drawn from ``dir_seed`` (default ``seed``), the rest from
    ``seed``. Returns (samples dict, u, W).
    """
    gd = torch.Generator().manual_seed(seed if dir_seed is None else dir_seed)
    u = torch.randn(d, generator=gd, dtype=torch.float64)
    u /= u.norm()
    w = torch.randn(n_tasks, d, generator=gd, dtype=torch.float64)
    w /= w.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(seed + 10_000)
    samples = {}
    for t in range(n_tasks):
        layers = []
        for a in a_by_layer:
            s = 1 + 0.5 * torch.randn(n, 1, generator=g, dtype=torch.float64)
            layers.append(a * s * u + b * w[t] + sigma * torch.randn(n, d, generator=g, dtype=torch.float64))
        samples[f"task{t}"] = torch.stack(layers, 1).float()  # [n, layer, d], float32 like activations
    return samples, u, w


@pytest.fixture(scope="module")
def planted():
    return _planted()


@pytest.fixture(scope="module")
def planted_ci(planted):
    samples, _, _ = planted
    return G.mean_cross_task_cosine_ci(samples, n_boot=400, seed=0)


# ----------------------------------------------------------------------------- planted direction


def test_planted_cross_task_cosine_low_without_and_high_with_shared_direction(planted_ci):
    m = planted_ci["mean"]
    assert m.dtype == torch.float64 and m.shape == (3,)
    assert abs(m[0].item()) < 3 / math.sqrt(D)
    assert 0.1 < m[1].item() < 0.9
    assert m[2].item() > 0.9


def test_planted_pca_recovers_shared_direction(planted):
    samples, u, _ = planted
    pooled = torch.cat(list(samples.values()))
    pca = G.pca_by_layer(pooled, n_components=10)
    assert pca["explained_variance_ratio"].shape == (3, 10)
    assert pca["components"].shape == (3, 10, D) and pca["mean"].shape == (3, D)
    pc1 = pca["components"][:, 0]
    assert abs(pc1[2] @ u).item() > 0.95
    assert (pc1[2] @ u).item() > 0  # sign convention: mean projects non-negatively
    assert pca["explained_variance_ratio"][2, 0].item() > 0.5
    assert pca["explained_variance_ratio"][0, 0].item() < 0.2  # noise layer: no dominant PC
    task_means = torch.stack([s.mean(0) for s in samples.values()])
    share = G.shared_component_share(task_means, pc1)
    assert share.shape == (3, T)
    assert (share[2] > 0.9).all()
    assert (share[0] < 0.5).all()


def test_pca_matches_sklearn_and_is_orthonormal():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 2, 12)) * np.linspace(1, 3, 12)
    out = G.pca_by_layer(torch.from_numpy(x), n_components=4)
    for layer in range(2):
        ref = PCA(n_components=4, svd_solver="full").fit(x[:, layer])
        np.testing.assert_allclose(out["explained_variance_ratio"][layer].numpy(), ref.explained_variance_ratio_,
                                   atol=1e-10)
        c = out["components"][layer].numpy()
        np.testing.assert_allclose(np.abs(np.sum(c * ref.components_, axis=1)), 1.0, atol=1e-8)
        np.testing.assert_allclose(c @ c.T, np.eye(4), atol=1e-10)
        np.testing.assert_allclose(out["mean"][layer].numpy(), x[:, layer].mean(0), atol=1e-12)
        proj = G.pca_project(torch.from_numpy(x[:, layer]), out["components"][layer], out["mean"][layer]).numpy()
        ref_proj = ref.transform(x[:, layer])
        np.testing.assert_allclose(np.abs(proj), np.abs(ref_proj), atol=1e-8)
        np.testing.assert_allclose(proj, (x[:, layer] - x[:, layer].mean(0)) @ c.T, atol=1e-10)


def test_pca_n_components_capped_and_constant_layer():
    x = torch.randn(5, 2, 8, dtype=torch.float64)
    x[:, 1] = 3.0  # no variance at layer 1
    out = G.pca_by_layer(x, n_components=10)
    assert out["explained_variance_ratio"].shape == (2, 5)
    assert out["components"].shape == (2, 5, 8)
    assert torch.all(out["explained_variance_ratio"][1] == 0)
    assert out["explained_variance_ratio"][0].sum().item() == pytest.approx(1.0, abs=1e-9)


# ----------------------------------------------------------------------------- exact formulas


def test_cosine_matrix_mean_offdiag_leave_one_out_match_manual_loops():
    rng = np.random.default_rng(2)
    v = rng.normal(size=(5, 3, 17))
    cm = G.cosine_matrix(torch.from_numpy(v).float())
    assert cm.shape == (3, 5, 5) and cm.dtype == torch.float64
    loo = G.leave_one_out_cosine(v)
    assert loo.shape == (3, 5)
    for layer in range(3):
        manual = np.empty((5, 5))
        for i in range(5):
            for j in range(5):
                a, b = v[i, layer], v[j, layer]
                manual[i, j] = np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))
        np.testing.assert_allclose(cm[layer].numpy(), manual, atol=1e-6)  # input was float32
        offdiag = [manual[i, j] for i in range(5) for j in range(5) if i != j]
        assert G.mean_offdiag(torch.from_numpy(manual)).item() == pytest.approx(np.mean(offdiag), abs=1e-12)
        for i in range(5):
            others = np.mean([v[j, layer] for j in range(5) if j != i], axis=0)
            want = np.dot(v[i, layer], others) / (np.linalg.norm(v[i, layer]) * np.linalg.norm(others))
            assert loo[layer, i].item() == pytest.approx(want, abs=1e-12)
    batched = G.mean_offdiag(cm)
    assert batched.shape == (3,)


def test_zero_vector_has_cosine_zero():
    v = torch.zeros(3, 1, 4)
    v[0, 0, 0] = 1.0
    v[1, 0, 1] = 2.0
    cm = G.cosine_matrix(v)
    assert torch.isfinite(cm).all()
    assert cm[0, 2, 0].item() == 0.0 and cm[0, 0, 0].item() == pytest.approx(1.0)


def test_random_baseline_near_zero_with_predicted_spread():
    d = 576
    rb = G.random_cosine_baseline(d, n_tasks=20, n_layers=30, seed=0)
    assert rb.shape == (30,) and rb.dtype == torch.float64
    assert abs(rb.mean().item()) < 3 / math.sqrt(d)
    assert torch.equal(rb, G.random_cosine_baseline(d, 20, 30, seed=0))
    # mean over P = T(T-1)/2 pairs of ~N(0, 1/d) cosines: sd ~ 1/sqrt(d P)
    many = G.random_cosine_baseline(64, n_tasks=4, n_layers=3000, seed=1)
    assert many.std().item() == pytest.approx(1 / math.sqrt(64 * 6), rel=0.1)


def test_expected_random_abs_cosine_matches_monte_carlo():
    assert G.expected_random_abs_cosine(2) == pytest.approx(2 / math.pi)
    assert G.expected_random_abs_cosine(3) == pytest.approx(0.5)
    d = 64
    rng = np.random.default_rng(3)
    a, b = _unit_rows(rng.normal(size=(40000, d))), _unit_rows(rng.normal(size=(40000, d)))
    mc = np.abs(np.sum(a * b, axis=1)).mean()
    assert G.expected_random_abs_cosine(d) == pytest.approx(mc, rel=0.02)
    assert G.expected_random_abs_cosine(576) == pytest.approx(math.sqrt(2 / (math.pi * 576)), rel=0.01)


# ----------------------------------------------------------------------------- bootstrap


def test_ci_brackets_point_and_is_deterministic(planted, planted_ci):
    r = planted_ci
    assert set(r) >= {"mean", "lo", "hi"}
    assert (r["lo"] <= r["mean"]).all() and (r["mean"] <= r["hi"]).all()
    samples, _, _ = planted
    again = G.mean_cross_task_cosine_ci(samples, n_boot=400, seed=0)
    other = G.mean_cross_task_cosine_ci(samples, n_boot=400, seed=1)
    for k in ("mean", "lo", "hi"):
        assert torch.equal(r[k], again[k])
    assert not torch.equal(r["lo"], other["lo"])
    # point estimate is the documented statistic, computed independently
    means = np.stack([s.double().mean(0).numpy() for s in samples.values()])  # [task, layer, d]
    for layer in range(3):
        c = _unit_rows(means[:, layer]) @ _unit_rows(means[:, layer]).T
        assert r["mean"][layer].item() == pytest.approx((c.sum() - T) / (T * (T - 1)), abs=1e-10)


def test_vectorised_bootstrap_matches_naive_loop():
    """Same bootstrap distribution as a plain numpy loop (independent RNG, compared in distribution)."""
    samples, _, _ = _planted(a_by_layer=(3.0,), sigma=1.0, n=30, seed=5)
    xs = [s.double().numpy()[:, 0] for s in samples.values()]
    rng = np.random.default_rng(0)
    stats = []
    for _ in range(1500):
        m = _unit_rows(np.stack([x[rng.integers(0, len(x), len(x))].mean(0) for x in xs]))
        c = m @ m.T
        stats.append((c.sum() - T) / (T * (T - 1)))
    lo_n, med_n, hi_n = np.quantile(stats, [0.025, 0.5, 0.975])
    r = G.mean_cross_task_cosine_ci(samples, n_boot=1500, method="percentile")
    width = hi_n - lo_n
    assert r["lo"].item() == pytest.approx(lo_n, abs=0.15 * width)
    assert r["hi"].item() == pytest.approx(hi_n, abs=0.15 * width)
    assert (r["mean"] + r["bias"]).item() == pytest.approx(med_n, abs=0.1 * width)


def test_centered_ci_covers_expected_statistic_and_percentile_ci_is_biased_low():
    """The cosine of noisy task means is biased low, and resampling adds the noise again.

    So the raw percentile interval sits below the point estimate; the centred interval covers the
    statistic's expected value at this n (Monte Carlo over fresh datasets) at about its level.
    """
    cfg = dict(a_by_layer=(3.0,), sigma=1.0, n=40, dir_seed=0)
    expected = np.mean([G.mean_cross_task_cosine_ci(_planted(seed=s, **cfg)[0], n_boot=1)["mean"].item()
                        for s in range(100, 180)])
    covered, pct_contains_point = 0, 0
    data = _planted(seed=0, **cfg)[0]
    c = G.mean_cross_task_cosine_ci(data, n_boot=200, seed=0)
    p = G.mean_cross_task_cosine_ci(data, n_boot=200, seed=0, method="percentile")
    assert torch.equal(c["bias"], p["bias"]) and c["bias"].item() < 0
    torch.testing.assert_close(c["lo"] + c["bias"], p["lo"])  # centred = percentile shifted by -bias
    torch.testing.assert_close(c["hi"] + c["bias"], p["hi"])
    for s in range(20):
        c = G.mean_cross_task_cosine_ci(_planted(seed=s, **cfg)[0], n_boot=200, seed=s)
        covered += c["lo"].item() <= expected <= c["hi"].item()
        pct_contains_point += (c["lo"] + c["bias"]).item() <= c["mean"].item() <= (c["hi"] + c["bias"]).item()
    assert covered >= 16  # nominal 95% of 20
    assert pct_contains_point <= 2
    # the infinite-sample cosine of the task means (3u + w_t) is well above what n = 40 gives
    _, u, w = _planted(**cfg)
    pop = _unit_rows((3.0 * u + w).numpy())
    truth = ((pop @ pop.T).sum() - T) / (T * (T - 1))
    assert expected < truth - 0.1


def test_planted_ci_at_low_noise_is_close_to_population_value(planted, planted_ci):
    _, u, w = planted
    pop = _unit_rows((12.0 * u + w).numpy())  # E[task mean] at layer 2
    truth = ((pop @ pop.T).sum() - T) / (T * (T - 1))
    assert planted_ci["lo"][2].item() - 0.01 < truth < planted_ci["hi"][2].item() + 0.01


def test_ci_width_shrinks_with_more_samples():
    cfg = dict(a_by_layer=(3.0,), sigma=1.0)
    small = G.mean_cross_task_cosine_ci(_planted(n=20, **cfg)[0], n_boot=300)
    large = G.mean_cross_task_cosine_ci(_planted(n=200, **cfg)[0], n_boot=300)
    assert (large["hi"] - large["lo"]).item() < 0.6 * (small["hi"] - small["lo"]).item()


def test_bootstrap_mean_ci():
    rng = np.random.default_rng(4)
    vals = rng.normal(loc=[[0.3], [0.7]], scale=0.2, size=(2, 400))
    m, lo, hi = G.bootstrap_mean_ci(vals, n_boot=2000, seed=0)
    assert m.shape == lo.shape == hi.shape == (2,)
    np.testing.assert_allclose(m.numpy(), vals.mean(1), atol=1e-12)
    assert (lo <= m).all() and (m <= hi).all()
    assert lo[0].item() < 0.3 < hi[0].item() and lo[1].item() < 0.7 < hi[1].item()
    se = 0.2 / math.sqrt(400)  # 95% percentile interval ~ mean +- 1.96 se
    np.testing.assert_allclose((hi - lo).numpy(), 2 * 1.96 * se, rtol=0.15)
    m2, lo2, hi2 = G.bootstrap_mean_ci(torch.from_numpy(vals), n_boot=2000, seed=0)
    assert torch.equal(lo, lo2) and torch.equal(hi, hi2)
    _, lo_small, hi_small = G.bootstrap_mean_ci(vals[:, :40], n_boot=2000, seed=0)
    assert ((hi - lo) < (hi_small - lo_small)).all()


# ----------------------------------------------------------------------------- sample cosines


def test_sample_cosines_within_exceeds_across_for_task_specific_directions():
    samples, _, _ = _planted(a_by_layer=(0.0, 0.0), b=3.0, sigma=0.25, n=25)
    sc = G.sample_cosines(samples)
    n_within, n_across = T * 25 * 24 // 2, (T * (T - 1) // 2) * 25 * 25
    assert sc["within"].shape == (2, n_within) and sc["across"].shape == (2, n_across)
    assert (sc["within"].mean(1) > sc["across"].mean(1) + 0.3).all()
    assert sc["across"].mean().abs().item() < 3 / math.sqrt(D)


def test_sample_cosines_match_brute_force_and_subsample_deterministically():
    rng = np.random.default_rng(6)
    samples = {"a": rng.normal(size=(4, 2, 5)), "b": rng.normal(size=(3, 2, 5)), "c": rng.normal(size=(5, 2, 5))}
    xs = [(k, _unit_rows(v)) for k, v in samples.items()]
    want_w = [[], []]
    want_a = [[], []]
    for ti, (_, x) in enumerate(xs):
        for tj, (_, y) in enumerate(xs):
            for i in range(len(x)):
                for j in range(len(y)):
                    for layer in range(2):
                        c = float(np.dot(x[i, layer], y[j, layer]))
                        if ti == tj and i < j:
                            want_w[layer].append(c)
                        elif ti < tj:
                            want_a[layer].append(c)
    sc = G.sample_cosines(samples)
    for layer in range(2):
        np.testing.assert_allclose(np.sort(sc["within"][layer].numpy()), np.sort(want_w[layer]), atol=1e-12)
        np.testing.assert_allclose(np.sort(sc["across"][layer].numpy()), np.sort(want_a[layer]), atol=1e-12)
    sub = G.sample_cosines(samples, max_pairs=7, seed=3)
    assert sub["within"].shape == (2, 7) and sub["across"].shape == (2, 7)
    assert torch.equal(sub["across"], G.sample_cosines(samples, max_pairs=7, seed=3)["across"])
    assert not torch.equal(sub["across"], G.sample_cosines(samples, max_pairs=7, seed=4)["across"])
    full = sc["across"][0].numpy()
    assert all(np.isclose(full, v).any() for v in sub["across"][0].numpy())  # a subset of the real pairs
    # the same pair is used at every layer
    idx = [int(np.argmin(np.abs(full - v))) for v in sub["across"][0].numpy()]
    np.testing.assert_allclose(sub["across"][1].numpy(), sc["across"][1].numpy()[idx], atol=1e-12)


# ----------------------------------------------------------------------------- best layer


def test_best_layer_picks_planted_layer_and_uses_margin(planted_ci):
    control = G.random_cosine_baseline(D, T, 3)
    assert G.best_layer(planted_ci["mean"], control) == 2
    assert G.best_layer([0.0, 0.5, 0.9], [0.0, 0.1, 0.8]) == 1  # the margin, not the raw maximum


# ----------------------------------------------------------------------------- bad inputs

_x = torch.randn(3, 2, 4)
_nan = _x.clone()
_nan[0, 0, 0] = float("nan")

BAD = [
    ("cosine_matrix 2-D", lambda: G.cosine_matrix(torch.randn(4, 5)),
     r"vectors: expected shape \[task layer d\].*got \(4, 5\)"),
    ("cosine_matrix NaN", lambda: G.cosine_matrix(_nan), r"vectors: contains NaN"),
    ("cosine_matrix empty", lambda: G.cosine_matrix(torch.randn(0, 2, 4)), r"vectors: expected non-empty"),
    ("mean_offdiag not square", lambda: G.mean_offdiag(torch.randn(3, 4)), r"mat: expected shape \[\.\.\., n, n\]"),
    ("mean_offdiag 1x1", lambda: G.mean_offdiag(torch.ones(1, 1)), r"mat: .*n >= 2"),
    ("loo one task", lambda: G.leave_one_out_cosine(torch.randn(1, 2, 4)), r"vectors: expected at least 2 tasks"),
    ("sample_cosines empty", lambda: G.sample_cosines({}), r"samples: expected a non-empty dict"),
    ("sample_cosines not dict", lambda: G.sample_cosines(_x), r"samples: expected a non-empty dict"),
    ("sample_cosines 1 task", lambda: G.sample_cosines({"a": _x}), r"samples: expected at least 2 tasks"),
    ("sample_cosines d mismatch", lambda: G.sample_cosines({"a": _x, "b": torch.randn(3, 2, 5)}),
     r"samples\['b'\]: expected \[n, layer, d\] = \[n, 2, 4\].*got \(3, 2, 5\)"),
    ("sample_cosines 2-D task", lambda: G.sample_cosines({"a": _x, "b": torch.randn(3, 4)}),
     r"samples\['b'\]: expected shape \[n layer d\]"),
    ("sample_cosines NaN", lambda: G.sample_cosines({"a": _x, "b": _nan}), r"samples\['b'\]: contains NaN"),
    ("sample_cosines max_pairs", lambda: G.sample_cosines({"a": _x, "b": _x}, max_pairs=0), r"max_pairs"),
    ("ci 1 task", lambda: G.mean_cross_task_cosine_ci({"a": _x}), r"samples: expected at least 2 tasks"),
    ("ci layer mismatch", lambda: G.mean_cross_task_cosine_ci({"a": _x, "b": torch.randn(3, 5, 4)}), r"samples\['b'\]"),
    ("ci level", lambda: G.mean_cross_task_cosine_ci({"a": _x, "b": _x}, ci=1.5), r"ci: expected a level in \(0, 1\)"),
    ("ci n_boot", lambda: G.mean_cross_task_cosine_ci({"a": _x, "b": _x}, n_boot=0), r"n_boot"),
    ("ci method", lambda: G.mean_cross_task_cosine_ci({"a": _x, "b": _x}, method="bca"), r"method"),
    ("bootstrap scalar", lambda: G.bootstrap_mean_ci(torch.tensor(1.0)), r"values: expected shape \[\.\.\., n\]"),
    ("bootstrap NaN", lambda: G.bootstrap_mean_ci(torch.tensor([1.0, float("nan")])), r"values: contains NaN"),
    ("random d_model", lambda: G.random_cosine_baseline(0, 3, 2), r"d_model"),
    ("random n_tasks", lambda: G.random_cosine_baseline(8, 1, 2), r"n_tasks: expected an int >= 2"),
    ("expected abs d", lambda: G.expected_random_abs_cosine(1), r"d: expected an int >= 2"),
    ("pca 2-D", lambda: G.pca_by_layer(torch.randn(5, 8)), r"samples: expected shape \[n layer d\]"),
    ("pca one sample", lambda: G.pca_by_layer(torch.randn(1, 2, 3)), r"samples: expected at least 2 samples"),
    ("pca n_components", lambda: G.pca_by_layer(_x, n_components=0), r"n_components"),
    ("share pc1 shape", lambda: G.shared_component_share(_x, torch.randn(2, 5)),
     r"pc1: expected shape \[layer, d\] = \(2, 4\)"),
    ("share pc1 zero", lambda: G.shared_component_share(_x, torch.zeros(2, 4)), r"pc1: .*zero norm"),
    ("project comps", lambda: G.pca_project(torch.randn(5, 4), torch.randn(2, 3), torch.zeros(4)),
     r"components: expected shape \[k, d\] with d = 4"),
    ("project mean", lambda: G.pca_project(torch.randn(5, 4), torch.randn(2, 4), torch.zeros(3)),
     r"mean: expected shape \[d\] with d = 4"),
    ("best_layer shape", lambda: G.best_layer(torch.randn(3), torch.randn(4)), r"control: expected shape \[layer\]"),
    ("best_layer NaN", lambda: G.best_layer(torch.tensor([0.0, float("nan")]), torch.zeros(2)),
     r"signal: contains NaN"),
]


@pytest.mark.parametrize("call,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_raise_value_error_naming_the_problem(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_accepts_numpy_and_float32_returns_float64():
    v = np.random.default_rng(7).normal(size=(3, 2, 4)).astype(np.float32)
    for out in (G.cosine_matrix(v), G.leave_one_out_cosine(v), G.mean_offdiag(G.cosine_matrix(torch.from_numpy(v)))):
        assert out.dtype == torch.float64


def test_uncentred_first_component_finds_a_constant_offset():
    """A shared offset of constant size: invisible to centred PCA, found by the uncentred component."""
    from castlens.geometry import uncentred_first_component

    g = torch.Generator().manual_seed(0)
    d, n = 64, 50
    u = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    x = torch.randn(n, 2, d, generator=g)
    x[:, 1] += 8 * u  # layer 1 only
    out = uncentred_first_component(x)
    assert abs(float(out["direction"][1] @ u.double())) > 0.98 and float(out["direction"][1] @ u.double()) > 0
    assert out["energy"][1] > 0.5 and out["energy"][0] < 0.15
    # numpy reference for the energy: top singular value squared over the Frobenius norm squared
    sv = torch.linalg.svdvals(x[:, 1].double())
    assert abs(float(out["energy"][1]) - float(sv[0] ** 2 / (sv ** 2).sum())) < 1e-6
