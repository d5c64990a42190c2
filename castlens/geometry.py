"""Geometry of in-context-learning difference vectors (CAST, arXiv 2507.13236).

A sample's difference vector is the last-token residual stream with k demonstrations (few-shot)
minus without (zero-shot), per layer; a task vector is its mean over the task's prompts. CAST finds
the task vectors of unrelated tasks nearly parallel: a shared "do in-context learning" direction.
- Cosines (``cosine_matrix``, ``mean_offdiag``, ``leave_one_out_cosine``, ``sample_cosines``): per
  layer, how aligned task vectors (or single samples) are, within and across tasks.
- PCA (``pca_by_layer``, ``shared_component_share``): does one direction carry most of the variance
  and most of each task vector's squared norm? Centred PCA sees a shared direction only through its
  varying size across prompts; a constant shared offset sits in the returned "mean".
Why a high cosine alone proves little: random directions in d dims have |cos| ~ 1/sqrt(d)
(``random_cosine_baseline``, ``expected_random_abs_cosine``), so chance is ~0, but any long-vs-short
prompt pair can move the last token alike (position, attention sinks, norm growth). Judge the margin
over controls (``best_layer``): a length-matched prefix with no demonstrations (a shared direction
from length alone) and demonstrations with shuffled labels (from format, not the input-label
mapping). Means of few noisy samples bias cosines towards 0: report bootstrap CIs
(``mean_cross_task_cosine_ci``) and compare curves computed at the same n.

Conventions: inputs are torch tensors or arrays; computation is float64 on CPU and tensor outputs are
float64 (CPU); bad shapes or NaN/inf raise ValueError naming the argument; zero vectors have
cosine 0 with everything (torch's eps convention), e.g. an unchanged layer-0 residual.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from sklearn.decomposition import PCA
from threadpoolctl import threadpool_limits
from torch import Tensor

__all__ = [
    "cosine_matrix",
    "mean_offdiag",
    "leave_one_out_cosine",
    "sample_cosines",
    "mean_cross_task_cosine_ci",
    "bootstrap_mean_ci",
    "random_cosine_baseline",
    "expected_random_abs_cosine",
    "pca_by_layer",
    "shared_component_share",
    "uncentred_first_component",
    "pca_project",
    "best_layer",
]

_EPS = 1e-12  # norms below this count as zero: cosine 0
_CHUNK_ELEMS = 4_000_000  # float64 elements per bootstrap chunk (~32 MB)


# ----------------------------------------------------------------------------- validation


def _f64(x: Any, name: str, dims: str) -> Tensor:
    """`x` as a float64 CPU tensor with len(dims.split()) dims, non-empty and finite."""
    want = dims.split()
    try:
        t = torch.as_tensor(x.detach() if isinstance(x, Tensor) else np.asarray(x))
    except Exception as e:  # noqa: BLE001 - report any unconvertible input uniformly
        raise ValueError(f"{name}: expected a tensor of shape [{dims}], got {type(x).__name__}") from e
    if t.ndim != len(want):
        raise ValueError(f"{name}: expected shape [{dims}] ({len(want)}-D), got {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name}: expected non-empty shape [{dims}], got {tuple(t.shape)}")
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name}: expected a real float tensor, got dtype {t.dtype}")
    t = t.to("cpu", torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: contains NaN or inf (shape [{dims}] = {tuple(t.shape)})")
    return t


def _samples(samples: Any, name: str = "samples", min_tasks: int = 1) -> tuple[list[str], list[Tensor]]:
    """Validate a {task: [n, layer, d]} dict; return names and float64 tensors."""
    if not isinstance(samples, dict) or len(samples) == 0:
        got = f"{len(samples)} tasks" if isinstance(samples, dict) else type(samples).__name__
        raise ValueError(f"{name}: expected a non-empty dict {{task: [n, layer, d]}}, got {got}")
    if len(samples) < min_tasks:
        raise ValueError(f"{name}: expected at least {min_tasks} tasks for a cross-task statistic, got {len(samples)}")
    names = list(samples)
    ts = [_f64(samples[k], f"{name}[{k!r}]", "n layer d") for k in names]
    ref = ts[0].shape[1:]
    for k, t in zip(names, ts):
        if t.shape[1:] != ref:
            raise ValueError(
                f"{name}[{k!r}]: expected [n, layer, d] = [n, {ref[0]}, {ref[1]}] like {names[0]!r}, "
                f"got {tuple(t.shape)}"
            )
    return names, ts


def _unit(x: Tensor) -> Tensor:
    """Normalise the last dim; zero vectors stay zero."""
    n = x.norm(dim=-1, keepdim=True)
    return x / n.clamp_min(_EPS) * (n > _EPS)


def _check_ci(n_boot: int, ci: float) -> None:
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot: expected a positive int, got {n_boot!r}")
    if not 0.0 < float(ci) < 1.0:
        raise ValueError(f"ci: expected a level in (0, 1), got {ci!r}")


def _percentiles(boot: Tensor, ci: float) -> tuple[Tensor, Tensor]:
    """Percentile interval over the last dim of bootstrap statistics."""
    a = (1.0 - ci) / 2.0
    q = torch.tensor([a, 1.0 - a], dtype=torch.float64)
    lo_hi = torch.quantile(boot, q, dim=-1)
    return lo_hi[0], lo_hi[1]


def _boot_counts(n: int, n_boot: int, gen: torch.Generator) -> Tensor:
    """[n_boot, n] multiplicities of a resample-with-replacement of n items."""
    idx = torch.randint(n, (n_boot, n), generator=gen)
    counts = torch.zeros(n_boot, n, dtype=torch.float64)
    return counts.scatter_add_(1, idx, torch.ones(n_boot, n, dtype=torch.float64))


# ----------------------------------------------------------------------------- cosines


def cosine_matrix(vectors: Float[Tensor, "task layer d"]) -> Float[Tensor, "layer task task"]:
    """Per layer, cosine between every pair of task vectors (CAST's cross-task similarity). float64."""
    v = _f64(vectors, "vectors", "task layer d")
    u = _unit(v.transpose(0, 1))  # [layer, task, d]
    return u @ u.transpose(1, 2)


def mean_offdiag(mat: Float[Tensor, "... n n"]) -> Float[Tensor, "..."]:
    """Mean of the off-diagonal entries of the last two (square) dims. float64."""
    m = torch.as_tensor(mat.detach() if isinstance(mat, Tensor) else np.asarray(mat))
    if m.ndim < 2 or m.shape[-1] != m.shape[-2] or m.shape[-1] < 2:
        raise ValueError(f"mat: expected shape [..., n, n] with n >= 2, got {tuple(m.shape)}")
    m = _f64(m, "mat", " ".join(["..."] * (m.ndim - 2) + ["n", "n"]))
    n = m.shape[-1]
    return (m.sum(dim=(-2, -1)) - m.diagonal(dim1=-2, dim2=-1).sum(-1)) / (n * (n - 1))


def leave_one_out_cosine(vectors: Float[Tensor, "task layer d"]) -> Float[Tensor, "layer task"]:
    """Cosine of each task vector with the mean of all OTHER tasks' vectors, per layer. float64.

    A held-out check on CAST's shared direction: does the direction learned from the other tasks
    predict this one?
    """
    v = _f64(vectors, "vectors", "task layer d")
    t = v.shape[0]
    if t < 2:
        raise ValueError(f"vectors: expected at least 2 tasks for leave-one-out, got shape {tuple(v.shape)}")
    others = (v.sum(0, keepdim=True) - v) / (t - 1)  # [task, layer, d]
    cos = (_unit(v) * _unit(others)).sum(-1)  # [task, layer]
    return cos.T.contiguous()


def _decode_pairs(k: np.ndarray, offsets: np.ndarray, blocks: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
    """Map flat pair ids to global sample index pairs (i, j); see sample_cosines."""
    b = np.searchsorted(offsets, k, side="right") - 1
    i_out = np.empty_like(k)
    j_out = np.empty_like(k)
    for bi in np.unique(b):
        sel = b == bi
        r = k[sel] - offsets[bi]
        kind, start_a, n_a, start_b, n_b = blocks[bi]
        if kind == "across":
            i_out[sel] = start_a + r // n_b
            j_out[sel] = start_b + r % n_b
        else:  # row-major upper triangle (i < j) of an n_a x n_a block
            n = n_a
            row = np.floor(((2 * n - 1) - np.sqrt((2.0 * n - 1) ** 2 - 8.0 * r)) / 2).astype(np.int64)
            row = np.clip(row, 0, n - 2)
            row -= r < row * (2 * n - row - 1) // 2  # fix float rounding at row boundaries
            row += r >= (row + 1) * (2 * n - row - 2) // 2
            row_start = row * (2 * n - row - 1) // 2
            i_out[sel] = start_a + row
            j_out[sel] = start_a + row + 1 + (r - row_start)
    return i_out, j_out


def sample_cosines(
    samples: dict[str, Float[Tensor, "n layer d"]], max_pairs: int = 20000, seed: int = 0
) -> dict[str, Float[Tensor, "layer pairs"]]:
    """Per-layer cosines between per-sample difference vectors: {"within": ..., "across": ...}. float64.

    "within": pairs (i < j) of samples of the same task; "across": pairs from different tasks.
    If a kind has more than ``max_pairs`` pairs, ``max_pairs`` of them are drawn without
    replacement (seeded, deterministic; kept in enumeration order). CAST's shared direction shows
    as across-task cosines nearly as high as within-task ones.
    """
    _, ts = _samples(samples, min_tasks=2)
    if not isinstance(max_pairs, (int, np.integer)) or max_pairs < 1:
        raise ValueError(f"max_pairs: expected a positive int, got {max_pairs!r}")
    u = _unit(torch.cat(ts, 0))  # [N, layer, d]
    ns = [t.shape[0] for t in ts]
    starts = np.cumsum([0] + ns[:-1])
    kinds = {
        "within": [("within", s, n, s, n) for s, n in zip(starts, ns) if n >= 2],
        "across": [
            ("across", starts[a], ns[a], starts[b], ns[b]) for a in range(len(ns)) for b in range(a + 1, len(ns))
        ],
    }
    rng = np.random.default_rng(seed)
    out: dict[str, Tensor] = {}
    for kind in ("within", "across"):
        blocks = kinds[kind]
        sizes = [n_a * (n_a - 1) // 2 if k == "within" else n_a * n_b for k, _, n_a, _, n_b in blocks]
        total = int(sum(sizes))
        if total > max_pairs:
            flat = np.sort(rng.choice(total, size=max_pairs, replace=False)).astype(np.int64)
        else:
            flat = np.arange(total, dtype=np.int64)
        if len(flat) == 0:
            out[kind] = torch.zeros(u.shape[1], 0, dtype=torch.float64)
            continue
        offsets = np.cumsum([0] + sizes[:-1]).astype(np.int64)
        i, j = _decode_pairs(flat, offsets, blocks)
        i_t, j_t = torch.from_numpy(i), torch.from_numpy(j)
        step = max(1, _CHUNK_ELEMS // (u.shape[1] * u.shape[2]))
        parts = [(u[i_t[s : s + step]] * u[j_t[s : s + step]]).sum(-1) for s in range(0, len(flat), step)]
        out[kind] = torch.cat(parts, 0).T.contiguous()  # [layer, pairs]
    return out


# ----------------------------------------------------------------------------- bootstrap


def mean_cross_task_cosine_ci(
    samples: dict[str, Float[Tensor, "n layer d"]],
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    method: str = "centered",
) -> dict[str, Float[Tensor, " layer"]]:
    """Mean off-diagonal cosine of the task-mean vectors per layer, with a bootstrap CI.

    The headline statistic (CAST): average each task's difference vectors, take the cosine
    between every pair of task means, average the pairs. Bootstrap: resample samples with
    replacement within each task independently and recompute (vectorised: per draw the pair
    mean is (|sum_t u_t|^2 - sum_t |u_t|^2) / (T (T-1)) for unit task means u_t).

    Returns float64 [layer] tensors {"mean", "lo", "hi", "bias"}; "bias" = median of the
    bootstrap statistics minus "mean". The cosine of *noisy* means is biased towards 0 (noise
    adds ~ tr(cov)/n to each squared norm; large in high d) and resampling adds that noise once
    more, so the raw percentile interval (``method="percentile"``) sits below the point estimate,
    often excluding it. The default ``method="centered"`` shifts the percentile interval by
    -"bias" so it is centred on "mean": a band for the sampling spread of the statistic at this
    n (its expected value at this n, not the infinite-sample cosine, which is higher).
    """
    if method not in ("centered", "percentile"):
        raise ValueError(f"method: expected 'centered' or 'percentile', got {method!r}")
    _, ts = _samples(samples, min_tasks=2)
    _check_ci(n_boot, ci)
    n_task = len(ts)
    n_layer, d = ts[0].shape[1:]
    point = mean_offdiag(cosine_matrix(torch.stack([t.mean(0) for t in ts], 0)))

    gen = torch.Generator().manual_seed(int(seed))
    counts = [_boot_counts(t.shape[0], n_boot, gen) for t in ts]  # drawn up front: chunking-independent
    flat = [t.reshape(t.shape[0], -1) for t in ts]
    step = max(1, _CHUNK_ELEMS // (n_layer * d))
    boot = torch.empty(n_layer, n_boot, dtype=torch.float64)
    for s in range(0, n_boot, step):
        e = min(n_boot, s + step)
        total = torch.zeros(e - s, n_layer, d, dtype=torch.float64)
        sumsq = torch.zeros(e - s, n_layer, dtype=torch.float64)
        for c, x in zip(counts, flat):
            m = _unit((c[s:e] @ x).view(e - s, n_layer, d))  # scale by 1/n is irrelevant to direction
            total += m
            sumsq += (m * m).sum(-1)
        boot[:, s:e] = (((total * total).sum(-1) - sumsq) / (n_task * (n_task - 1))).T
    lo, hi = _percentiles(boot, ci)
    bias = boot.median(dim=-1).values - point
    if method == "centered":
        lo, hi = (lo - bias).clamp(-1.0, 1.0), (hi - bias).clamp(-1.0, 1.0)
    return {"mean": point, "lo": lo, "hi": hi, "bias": bias}


def bootstrap_mean_ci(
    values: Float[Tensor, "... n"], n_boot: int = 1000, ci: float = 0.95, seed: int = 0
) -> tuple[Float[Tensor, "..."], Float[Tensor, "..."], Float[Tensor, "..."]]:
    """Mean over the last dim and its percentile bootstrap CI: (mean, lo, hi), float64 [...]."""
    v = torch.as_tensor(values.detach() if isinstance(values, Tensor) else np.asarray(values))
    if v.ndim < 1:
        raise ValueError(f"values: expected shape [..., n] with n >= 1, got {tuple(v.shape)}")
    v = _f64(v, "values", " ".join(["..."] * (v.ndim - 1) + ["n"]))
    _check_ci(n_boot, ci)
    n = v.shape[-1]
    gen = torch.Generator().manual_seed(int(seed))
    flat = v.reshape(-1, n)
    step = max(1, _CHUNK_ELEMS // max(n, flat.shape[0]))  # draws per chunk: bounded memory
    boot = torch.cat([flat @ _boot_counts(n, min(step, n_boot - s), gen).T for s in range(0, n_boot, step)], 1) / n
    lo, hi = _percentiles(boot, ci)
    shape = v.shape[:-1]
    return v.mean(-1), lo.reshape(shape), hi.reshape(shape)


# ----------------------------------------------------------------------------- random baseline


def random_cosine_baseline(d_model: int, n_tasks: int, n_layers: int, seed: int = 0) -> Float[Tensor, " layer"]:
    """Mean off-diagonal cosine of ``n_tasks`` i.i.d. Gaussian vectors, per layer. float64.

    The chance level for cross-task cosines: ~0, spread ~ 1/sqrt(d_model * n_tasks * (n_tasks - 1) / 2).
    """
    for name, val, lo in (("d_model", d_model, 1), ("n_tasks", n_tasks, 2), ("n_layers", n_layers, 1)):
        if not isinstance(val, (int, np.integer)) or val < lo:
            raise ValueError(f"{name}: expected an int >= {lo}, got {val!r}")
    gen = torch.Generator().manual_seed(int(seed))
    v = torch.randn(n_tasks, n_layers, d_model, generator=gen, dtype=torch.float64)
    return mean_offdiag(cosine_matrix(v))


def expected_random_abs_cosine(d: int) -> float:
    """E|cos| between two uniformly random directions in d dims, ~ sqrt(2 / (pi d)).

    Exact: Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2)); this is what "|cos| ~ 1/sqrt(d)" means.
    """
    if not isinstance(d, (int, np.integer)) or d < 2:
        raise ValueError(f"d: expected an int >= 2, got {d!r}")
    return math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)


# ----------------------------------------------------------------------------- PCA


def pca_by_layer(samples: Float[Tensor, "n layer d"], n_components: int = 10) -> dict[str, Tensor]:
    """Centered PCA (sklearn) of difference vectors, separately per layer. float64.

    Returns {"explained_variance_ratio": [layer, k], "components": [layer, k, d] (orthonormal
    rows), "mean": [layer, d]} with k = min(n_components, n, d). Each component's sign is chosen
    so that the mean difference vector projects non-negatively on it, so PC1 points along the
    shared ICL direction (CAST) consistently across layers.
    """
    x = _f64(samples, "samples", "n layer d")
    n, n_layer, d = x.shape
    if n < 2:
        raise ValueError(f"samples: expected at least 2 samples for PCA, got shape {tuple(x.shape)}")
    if not isinstance(n_components, (int, np.integer)) or n_components < 1:
        raise ValueError(f"n_components: expected a positive int, got {n_components!r}")
    k = int(min(n_components, n, d))
    evr = torch.zeros(n_layer, k, dtype=torch.float64)
    comps = torch.zeros(n_layer, k, d, dtype=torch.float64)
    means = x.mean(0)
    # single-threaded BLAS: no slower for these small eigh/SVDs, and multithreaded OpenBLAS LAPACK
    # was seen to run them ~100x slower on a 2-core machine whose cores were busy with other work
    with threadpool_limits(limits=1, user_api="blas"):
        for layer in range(n_layer):
            xl = x[:, layer].numpy()
            if float(np.abs(xl - xl.mean(0)).max()) == 0.0:
                continue  # no variance: leave zeros (sklearn would divide by zero)
            pca = PCA(n_components=k, svd_solver="covariance_eigh" if n > d else "full").fit(xl)
            c = torch.from_numpy(pca.components_.astype(np.float64))
            sign = torch.where(c @ means[layer] < 0, -1.0, 1.0).to(torch.float64)
            comps[layer] = c * sign[:, None]
            evr[layer] = torch.from_numpy(pca.explained_variance_ratio_.astype(np.float64))
    return {"explained_variance_ratio": evr, "components": comps, "mean": means}


def shared_component_share(
    task_vectors: Float[Tensor, "task layer d"], pc1: Float[Tensor, "layer d"]
) -> Float[Tensor, "layer task"]:
    """Fraction of each task vector's squared norm along the unit PC1 direction (cos^2). float64.

    Near 1 means the task vector is essentially the shared direction (CAST); near 1/d means unrelated.
    """
    v = _f64(task_vectors, "task_vectors", "task layer d")
    p = _f64(pc1, "pc1", "layer d")
    if p.shape != v.shape[1:]:
        raise ValueError(f"pc1: expected shape [layer, d] = {tuple(v.shape[1:])} to match task_vectors, "
                         f"got {tuple(p.shape)}")
    if (p.norm(dim=-1) <= _EPS).any():
        raise ValueError("pc1: a layer's direction has zero norm")
    cos = (_unit(v) * _unit(p)[None]).sum(-1)  # [task, layer]
    return (cos**2).T.contiguous()


def uncentred_first_component(samples: Float[Tensor, "n layer d"]) -> dict[str, Tensor]:
    """The direction shared by all samples: the first right singular vector of the *uncentred* sample matrix per
    layer (sklearn ``TruncatedSVD``), and the fraction of the total second moment ``sum ||x||^2`` it carries.

    Centred PCA moves a common offset into the mean and so cannot see it; this is the "shared first component"
    that a CAST-style parallel direction would be. Returns {"direction": [layer, d] (unit, sign: the sample mean
    projects non-negatively), "energy": [layer]}. float64.
    """
    from sklearn.decomposition import TruncatedSVD

    x = _f64(samples, "samples", "n layer d")
    if x.shape[0] < 2:
        raise ValueError(f"samples: need at least 2 samples, got {x.shape[0]}")
    dirs, energy = [], []
    with threadpool_limits(limits=1, user_api="blas"):
        for layer in range(x.shape[1]):
            xl = x[:, layer].numpy()
            svd = TruncatedSVD(n_components=1, algorithm="arpack", random_state=0).fit(xl)
            d = torch.from_numpy(svd.components_[0]).double()
            d = d / d.norm()
            if float(x[:, layer].mean(0) @ d) < 0:
                d = -d
            dirs.append(d)
            energy.append(float(((x[:, layer] @ d) ** 2).sum() / (x[:, layer] ** 2).sum().clamp_min(_EPS)))
    return {"direction": torch.stack(dirs), "energy": torch.tensor(energy, dtype=torch.float64)}


def pca_project(
    x: Float[Tensor, "n d"], components: Float[Tensor, "k d"], mean: Float[Tensor, " d"]
) -> Float[Tensor, "n k"]:
    """Coordinates of ``x`` in a PCA basis: (x - mean) @ components.T. float64."""
    xx = _f64(x, "x", "n d")
    c = _f64(components, "components", "k d")
    m = _f64(mean, "mean", "d")
    d = xx.shape[1]
    if c.shape[1] != d:
        raise ValueError(f"components: expected shape [k, d] with d = {d} (from x), got {tuple(c.shape)}")
    if m.shape[0] != d:
        raise ValueError(f"mean: expected shape [d] with d = {d} (from x), got {tuple(m.shape)}")
    return (xx - m) @ c.T


def best_layer(signal: Float[Tensor, " layer"], control: Float[Tensor, " layer"]) -> int:
    """Layer with the largest margin of signal over control: argmax(signal - control) (first on ties)."""
    s = _f64(signal, "signal", "layer")
    c = _f64(control, "control", "layer")
    if s.shape != c.shape:
        raise ValueError(f"control: expected shape [layer] = {tuple(s.shape)} like signal, got {tuple(c.shape)}")
    return int(torch.argmax(s - c).item())
