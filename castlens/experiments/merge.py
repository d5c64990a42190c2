"""Merge: the tables of independent runs (a SLURM array, a models x targets x settings sweep) as one.

A sweep on a cluster is many ordinary castlens runs, one folder each, that share nothing but the read-only task
files and model cache. Each folder's ``config.json`` says what makes it different, so merging needs no
bookkeeping of its own::

    for each table name every run has (results.csv, costs.csv, ablation.csv, ...):
        rows of every run, in the order the runs are given,
        each prefixed by ``run`` (the folder) and the config keys whose values differ between the runs

plus ``runs.md``: one line per run with those keys, and for a table of accuracies by target and method
(``results.csv`` of transfer runs, say, merged over seeds of the source-sample draw) ``spread.md``: per target and
method present in every run, the mean, standard deviation and range over the runs of the accuracy and of its
paired differences to zero-shot and to the random control (draw 0), and, where the runs tuned several random draws
(methods ``random_vector``, ``random_vector_1``, ...), of its difference to the draws' mean accuracy on the same
items, ``acc - mean_k acc(random_k)`` (the paired difference's point estimate: every draw scores the same items).
The ``mean`` rows enter only when every run averages over the same targets; a mean over other targets is another
quantity. Nothing else is computed and no number changes: a merged row is a row of one run's table. Runs of
different kinds (a transfer and a compose run) have different tables and are refused, as is a folder that is
not a finished run. Knows no model.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from castlens.experiments.run import RunError
from castlens.files import atomic_write

__all__ = ["Merged", "merge_runs"]

IGNORED_KEYS = ("inputs",)  # checksums of the inputs: they differ whenever the model or a task differs


@dataclass(frozen=True)
class Merged:
    """What :func:`merge_runs` wrote: ``tables`` (name -> merged CSV), the config ``keys`` that differ."""

    out: Path
    tables: dict[str, Path]
    keys: tuple[str, ...]
    runs: tuple[Path, ...]


def _cell(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)


def _read(run: Path) -> tuple[dict[str, Any], dict[str, list[list[str]]]]:
    if not (run / "config.json").is_file():
        raise RunError(f"{run} is not a castlens run folder (no config.json)")
    tables = {p.name: list(csv.reader(io.StringIO(p.read_text()))) for p in sorted(run.glob("*.csv"))}
    if not tables:
        raise RunError(f"{run} has no tables yet (no .csv): finish the run first (rerun its command)")
    return json.loads((run / "config.json").read_text()), tables


SPREAD_COLUMNS = ("accuracy", "delta_zero", "delta_random")
RANDOM_DRAW = "random_vector"       # the methods random_vector, random_vector_1, ...: the tuned random draws
DRAWS_COLUMN = "delta_draws"


def _spread(name: str, tables: Sequence[list[list[str]]]) -> list[str]:
    """Markdown: per (target, method) in every run's ``name`` table, each of :data:`SPREAD_COLUMNS` the table
    has as mean, sd and min - max over the runs, in points (empty when the table has no such columns)."""
    import numpy as np

    header = tables[0][0]
    cols = [c for c in SPREAD_COLUMNS if c in header]
    if not {"target", "method"} <= set(header) or not cols:
        return []
    at = {c: header.index(c) for c in ("target", "method", *cols)}
    keyed = [{(r[at["target"]], r[at["method"]]): r for r in t[1:]} for t in tables]
    values = [{k: {c: float(r[at[c]]) * 100 for c in cols if r[at[c]] != ""} for k, r in t.items()} for t in keyed]
    if "accuracy" in cols and any(m.startswith(RANDOM_DRAW) for _, m in keyed[0]):
        cols = [*cols, DRAWS_COLUMN]
        for t in values:
            for (target, _), v in t.items():
                draws = [w["accuracy"] for (g, m), w in t.items() if g == target and m.startswith(RANDOM_DRAW)]
                if draws and "accuracy" in v:
                    v[DRAWS_COLUMN] = v["accuracy"] - float(np.mean(draws))
    same_targets = len({frozenset(g for g, _ in t if g != "mean") for t in keyed}) == 1
    lines = ["", f"## {name}", "", *([f"`{DRAWS_COLUMN}`: accuracy minus the mean accuracy of the run's random "
                                       "draws on the same target, in points.", ""] if DRAWS_COLUMN in cols else []),
             "| target | method | " + " | ".join(f"{c} mean (sd) [min, max]" for c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for key in (k for k in keyed[0] if all(k in t for t in keyed) and (same_targets or k[0] != "mean")):
        cells = []
        for c in cols:
            x = np.array([t[key][c] for t in values if c in t[key]])
            f = "+.1f" if c.startswith("delta") else ".1f"
            cells.append("" if len(x) < len(keyed) else f"{x.mean():{f}} ({x.std(ddof=1) if len(x) > 1 else 0:.1f}) "
                         f"[{x.min():{f}}, {x.max():{f}}]")
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    if not same_targets:
        lines += ["", "The runs cover different targets, so their `mean` rows (averages over other targets) are "
                  "left out."]
    return lines


def merge_runs(runs: Sequence[str | Path], out: str | Path) -> Merged:
    """The merged tables of ``runs`` into ``out`` (see the module docstring)."""
    paths = [Path(r) for r in runs]
    if len(paths) < 2:
        raise ValueError(f"merge needs at least 2 run folders, got {len(paths)}")
    if len({p.resolve() for p in paths}) < len(paths):
        raise ValueError("a run folder is given twice: " + ", ".join(sorted({str(p) for p in paths
                                                                              if paths.count(p) > 1})))
    read = [_read(p) for p in paths]
    names = set(read[0][1])
    for p, (_, tables) in zip(paths, read):
        if set(tables) != names:
            raise RunError(f"{p} has the tables {sorted(tables)}, {paths[0]} has {sorted(names)}: runs of different "
                           "kinds cannot be merged")
        for name in names:
            if tables[name][:1] != read[0][1][name][:1]:
                raise RunError(f"{p}/{name} has other columns than {paths[0]}/{name}")
    configs = [cfg for cfg, _ in read]
    all_keys = [k for k in configs[0] if k not in IGNORED_KEYS] + \
        [k for cfg in configs[1:] for k in cfg if k not in configs[0] and k not in IGNORED_KEYS]
    keys = tuple(k for k in dict.fromkeys(all_keys) if len({_cell(cfg.get(k)) for cfg in configs}) > 1)
    labels = [p.as_posix() for p in paths]
    out = Path(out)
    written = {}
    for name in sorted(names):
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        header = read[0][1][name][0]
        w.writerow(["run", *(f"config_{k}" if k in header or k == "run" else k for k in keys), *header])
        for label, cfg, (_, tables) in zip(labels, configs, read):
            for row in tables[name][1:]:
                w.writerow([label, *(_cell(cfg.get(k)) for k in keys), *row])
        written[name] = atomic_write(out / name, buf.getvalue())
    lines = [f"# {len(paths)} merged runs", "", "Config keys that differ: " + (", ".join(keys) or "none") + ".", "",
             "| run | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    lines += [f"| {label} | " + " | ".join(_cell(cfg.get(k)) for k in keys) + " |"
              for label, cfg in zip(labels, configs)]
    spread = [line for name in sorted(names) for line in _spread(name, [t[name] for _, t in read])]
    if spread:
        atomic_write(out / "spread.md", f"# Spread over {len(paths)} runs (differing in "
                     f"{', '.join(keys) or 'nothing'})\n" + "\n".join(spread) + "\n")
    lines += ["", "spread.md: each number's mean, sd and range over the runs." if spread else ""]
    atomic_write(out / "runs.md", "\n".join(lines).rstrip() + "\n")
    return Merged(out, written, keys, tuple(paths))
