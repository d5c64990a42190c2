"""Results: the typed records every experiment writes, and the statistics and tables made from them.

A run's unit of work is one target task; its :class:`TargetResult` (one ``parts/<target>.part.json``) holds
what a table needs and nothing it must re-derive from names: per method a :class:`MethodResult` (predictions and
per-item correctness on the test items, prompt tokens per query, seconds, the :class:`Setting` it ran with), the
dev sweep as :class:`SweepPoint` s and the chosen point per construction.

Statistics (:func:`summarize`) are percentile bootstraps over test items, seeded: for method ``m`` on target
``t`` with per-item correctness ``c``::

    acc = mean_i c_i,     CI = percentiles 2.5, 97.5 of mean(c[idx_b]) over draws b      (idx_b: n items drawn)
    delta(m, ref) = acc_m - acc_ref,   paired CI from mean(c_m[idx_b] - c_ref[idx_b])    (the same draws)

and the mean over targets averages the per-target accuracies, resampling items within each target
independently. Every difference is paired; an interval that contains 0 is marked ``~`` (noise).
"""

from __future__ import annotations

import csv
import dataclasses
import io
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["Setting", "SweepPoint", "MethodResult", "TargetResult", "Interval", "Row", "summarize",
           "paired_delta", "to_csv", "fmt_interval", "UNSTEERED_NAME", "boot_index"]

UNSTEERED_NAME = "unsteered"


@dataclass(frozen=True)
class Setting:
    """How a method steered: ``construction`` (which vector), ``layer``, ``strength`` (``None``: the vector as
    it is), and ``vector``, the library vector's name where a construction chooses among several."""

    construction: str
    layer: int | None = None
    strength: float | None = None
    vector: str | None = None

    @property
    def steered(self) -> bool:
        return self.layer is not None

    def applied(self) -> dict[str, Any]:
        """The ``setting`` of a method record: layer, strength and vector where given."""
        return {k: v for k, v in (("layer", self.layer), ("strength", self.strength), ("vector", self.vector))
                if v is not None}

    @classmethod
    def from_applied(cls, construction: str, d: Mapping[str, Any] | None) -> Setting | None:
        return None if d is None else cls(construction, d.get("layer"), d.get("strength"), d.get("vector"))


@dataclass(frozen=True)
class SweepPoint:
    """One setting's dev score, or (``borrowed_from``) the setting a target without dev items borrowed."""

    setting: Setting
    dev_accuracy: float
    dev_gold_logprob: float | None = None
    borrowed_from: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        s = self.setting
        d: dict[str, Any] = {"construction": s.construction, "layer": s.layer, "strength": s.strength}
        if s.vector is not None:
            d["vector"] = s.vector
        d["dev_accuracy"] = self.dev_accuracy
        if self.borrowed_from is not None:
            d["borrowed_from"] = list(self.borrowed_from)
        else:
            d["dev_gold_logprob"] = self.dev_gold_logprob
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SweepPoint:
        b = d.get("borrowed_from")
        return cls(Setting(d["construction"], d.get("layer"), d.get("strength"), d.get("vector")),
                   d["dev_accuracy"], d.get("dev_gold_logprob"), None if b is None else tuple(b))


@dataclass(frozen=True)
class MethodResult:
    """One method on one target's test items."""

    pred: list[int]
    correct: list[int]
    prompt_tokens: float
    seconds: float
    setting: Setting | None = None
    scores: list[list[float]] | None = None      # every option's log-probability, when kept
    demos_used: int | None = None                # in-context demonstrations that fit, for ICL methods
    correct_norm: list[int] | None = None        # option-text scoring: right by length-normalised score (acc_norm)

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.correct))

    @property
    def accuracy_norm(self) -> float | None:
        """``acc_norm`` (lm-evaluation-harness): accuracy when each option's log-prob is divided by its length in
        characters; ``None`` unless the run scored option texts."""
        return None if self.correct_norm is None else float(np.mean(self.correct_norm))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"pred": self.pred, "correct": self.correct, "prompt_tokens": self.prompt_tokens,
                             "seconds": self.seconds, "setting": None if self.setting is None else
                             self.setting.applied()}
        if self.scores is not None:
            d["scores"] = self.scores
        if self.demos_used is not None:
            d["demos_used"] = self.demos_used
        if self.correct_norm is not None:
            d["correct_norm"] = self.correct_norm
        return d

    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any]) -> MethodResult:
        return cls(list(d["pred"]), list(d["correct"]), d["prompt_tokens"], d["seconds"],
                   Setting.from_applied(name, d.get("setting")), d.get("scores"), d.get("demos_used"),
                   d.get("correct_norm"))

    def subset(self, items: Sequence[int]) -> MethodResult:
        """The same method restricted to ``items`` (indices into the test items)."""
        return dataclasses.replace(self, pred=[self.pred[i] for i in items],
                                   correct=[self.correct[i] for i in items],
                                   scores=None if self.scores is None else [self.scores[i] for i in items],
                                   correct_norm=None if self.correct_norm is None else
                                   [self.correct_norm[i] for i in items])


@dataclass(frozen=True)
class TargetResult:
    """Every method on one target (one part file). ``extra``: what one experiment alone records (the
    selection study's rankings, Steer2Adapt's coefficients and search trace), kept as written."""

    target: str
    n_test: int
    gold: list[int]
    chance: float
    majority: float | None
    methods: dict[str, MethodResult]
    n_dev: int = 0
    n_options: int | None = None
    layers: list[int] = field(default_factory=list)
    chosen: dict[str, SweepPoint] = field(default_factory=dict)
    sweep: list[SweepPoint] = field(default_factory=list)
    kind: str = "classification"   # a generation target's options are other items' outputs
    extra: dict[str, Any] = field(default_factory=dict)

    _CORE = ("target", "n_test", "n_dev", "gold", "n_options", "chance", "majority", "layers", "chosen", "sweep",
             "methods", "kind")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"target": self.target, "n_test": self.n_test, "n_dev": self.n_dev, "gold": self.gold,
                             "n_options": self.n_options, "chance": self.chance, "majority": self.majority,
                             "layers": self.layers, "chosen": {k: v.to_dict() for k, v in self.chosen.items()},
                             "sweep": [p.to_dict() for p in self.sweep],
                             "methods": {k: v.to_dict() for k, v in self.methods.items()}}
        if self.kind != "classification":
            d["kind"] = self.kind
        return {**d, **self.extra}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TargetResult:
        return cls(target=d["target"], n_test=d["n_test"], gold=list(d["gold"]), chance=d["chance"],
                   majority=d["majority"], n_dev=d.get("n_dev", 0), n_options=d.get("n_options"),
                   layers=list(d.get("layers", [])),
                   methods={k: MethodResult.from_dict(k, v) for k, v in d["methods"].items()},
                   chosen={k: SweepPoint.from_dict(v) for k, v in d.get("chosen", {}).items()},
                   sweep=[SweepPoint.from_dict(p) for p in d.get("sweep", [])], kind=d.get("kind", "classification"),
                   extra={k: v for k, v in d.items() if k not in cls._CORE})

    def with_methods(self, methods: Mapping[str, MethodResult], **extra: Any) -> TargetResult:
        return dataclasses.replace(self, methods={**self.methods, **methods}, extra={**self.extra, **extra})

    def view(self, items: Sequence[int], methods: Mapping[str, MethodResult]) -> TargetResult:
        """This target restricted to test ``items``, with ``methods`` (already on those items) added."""
        kept = {k: self.methods[k].subset(items) for k in self.methods}
        return dataclasses.replace(self, n_test=len(items), gold=[self.gold[i] for i in items],
                                   methods={**kept, **methods})


# ---------------------------------------------------------------- statistics
@dataclass(frozen=True)
class Interval:
    """A point estimate with its 95% interval; ``noise`` when the interval contains 0."""

    point: float
    lo: float
    hi: float

    @property
    def noise(self) -> bool:
        return bool(self.lo <= 0 <= self.hi)


@dataclass(frozen=True)
class Row:
    """One table row: a method on a target, or averaged over targets (``mean``; ``target`` says over how many).
    ``deltas``: paired differences to reference methods, by the reference's short name."""

    target: str
    method: str
    accuracy: float
    ci_lo: float
    ci_hi: float
    macro_f1: float | None      # None for generation targets (options drawn per item: no classes)
    n_test: int
    prompt_tokens: float
    setting: Setting | None = None
    chance: float | None = None
    majority: float | None = None
    mean: bool = False
    deltas: dict[str, Interval] = field(default_factory=dict)
    n_samples: int | None = None
    demos_used: float | None = None
    accuracy_norm: float | None = None   # acc_norm, where the run scored option texts (MethodResult.correct_norm)

    def cells(self) -> dict[str, Any]:
        """The row as named cells, for CSV: ``delta_<ref>``, ``_lo``, ``_hi`` and ``_noise`` per reference."""
        s = self.setting
        d: dict[str, Any] = {"target": self.target, "method": self.method, "accuracy": self.accuracy,
                             "ci_lo": self.ci_lo, "ci_hi": self.ci_hi, "macro_f1": self.macro_f1,
                             "n_test": self.n_test, "prompt_tokens": self.prompt_tokens,
                             "layer": None if s is None else s.layer, "strength": None if s is None else s.strength,
                             "chance": self.chance, "majority": self.majority, "n_samples": self.n_samples,
                             "demos_used": self.demos_used, "acc_norm": self.accuracy_norm}
        for ref, iv in self.deltas.items():
            d.update({f"delta_{ref}": iv.point, f"delta_{ref}_lo": iv.lo, f"delta_{ref}_hi": iv.hi,
                      f"delta_{ref}_noise": iv.noise})
        return d


def boot_index(n: int, n_boot: int, seed: int) -> np.ndarray:
    """The bootstrap draws over ``n`` items, ``[n_boot, n]``: the same for every method of a target."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _ci(draws: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return float(lo), float(hi)


def summarize(parts: Sequence[TargetResult], methods: Sequence[str], refs: Mapping[str, str],
              n_boot: int = 1000, seed: int = 0) -> list[Row]:
    """One row per (target, method) present, then one per method averaged over the targets that have it, with
    paired deltas to each reference ``refs`` (short name -> method). A mean over only some targets is labelled
    ``mean (k of n)`` and gets no deltas."""
    from castlens.evaluation import accuracy_and_macro_f1

    rows: list[Row] = []
    draws: dict[tuple[str, str], np.ndarray] = {}
    for p in parts:
        idx = boot_index(p.n_test, n_boot, seed)
        for m in (m for m in methods if m in p.methods):
            res = p.methods[m]
            draws[(p.target, m)] = np.asarray(res.correct, dtype=float)[idx].mean(1)
            acc, f1 = accuracy_and_macro_f1(res.pred, p.gold)
            lo, hi = _ci(draws[(p.target, m)])
            rows.append(Row(p.target, m, acc, lo, hi, f1 if p.kind == "classification" else None, p.n_test,
                            res.prompt_tokens, res.setting, p.chance, p.majority, accuracy_norm=res.accuracy_norm))
    means: list[Row] = []
    for m in methods:
        mine = [r for r in rows if r.method == m]
        if not mine:
            continue
        label = "mean" if len(mine) == len(parts) else f"mean ({len(mine)} of {len(parts)})"
        draws[("mean", m)] = np.mean([draws[(r.target, m)] for r in mine], 0)
        lo, hi = _ci(draws[("mean", m)])
        f1s = [r.macro_f1 for r in mine if r.macro_f1 is not None]
        norms = [r.accuracy_norm for r in mine if r.accuracy_norm is not None]
        means.append(Row(label, m, float(np.mean([r.accuracy for r in mine])), lo, hi,
                         float(np.mean(f1s)) if len(f1s) == len(mine) else None, sum(r.n_test for r in mine),
                         float(np.mean([r.prompt_tokens for r in mine])), mean=True,
                         accuracy_norm=float(np.mean(norms)) if len(norms) == len(mine) else None))
    out = []
    for r in rows + means:
        key = "mean" if r.mean else r.target
        deltas = {}
        for name, ref in refs.items():
            other = next((x for x in rows + means if x.method == ref and x.target == r.target), None)
            if ref == r.method or other is None or (r.mean and r.target != "mean"):
                continue
            diff = draws[(key, r.method)] - draws[(key, ref)]
            deltas[name] = Interval(r.accuracy - other.accuracy, *_ci(diff))
        out.append(dataclasses.replace(r, deltas=deltas))
    return out


def paired_delta(parts: Sequence[TargetResult], a: str, b: str | Sequence[str], n_boot: int = 1000, seed: int = 0
                 ) -> Interval:
    """Mean over ``parts`` of accuracy(``a``) - accuracy(``b``) with a paired bootstrap 95% interval: items are
    resampled within each part, the same draws for both methods and the same draws as :func:`summarize`.

    ``b`` may name several methods (the random draws): ``a`` is then compared with their mean, item by item,
    ``x_i = correct_a(i) - mean_k correct_k(i)``, so the interval covers the item sampling, not the spread of
    the draws (which :func:`castlens.experiments.transfer.random_table` reports beside it)."""
    refs = [b] if isinstance(b, str) else list(b)
    if not refs:
        raise ValueError("paired_delta: no reference method given")
    draws, point = [], []
    for p in parts:
        x = np.asarray(p.methods[a].correct, float) - np.mean([np.asarray(p.methods[r].correct, float)
                                                              for r in refs], 0)
        draws.append(x[boot_index(p.n_test, n_boot, seed)].mean(1))
        point.append(x.mean())
    return Interval(float(np.mean(point)), *_ci(np.mean(draws, 0)))


# ---------------------------------------------------------------- tables
def to_csv(rows: Sequence[Row], columns: Sequence[str]) -> str:
    """``rows`` as CSV with ``columns`` (floats to 4 decimals, missing cells empty)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, list(columns), lineterminator="\n")
    w.writeheader()
    for r in rows:
        c = r.cells()
        w.writerow({k: (f"{c[k]:.4f}" if isinstance(c.get(k), float) else c.get(k, "")) for k in columns})
    return buf.getvalue()


def fmt_interval(iv: Interval | None) -> str:
    """``+7.8 [+5.6, +10.2]`` in points, `` ~`` when inside the noise; empty for no interval."""
    if iv is None:
        return ""
    return f"{100 * iv.point:+.1f} [{100 * iv.lo:+.1f}, {100 * iv.hi:+.1f}]{' ~' if iv.noise else ''}"
