"""castlens merge: the tables of independent runs (a sweep) as one, each row a row of one run's table."""

import csv
import io
import json

import pytest

from castlens.cli import main
from castlens.experiments.merge import merge_runs
from castlens.experiments.run import RunError


def _run(path, config, tables):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    for name, rows in tables.items():
        (path / name).write_text("\n".join(",".join(r) for r in rows) + "\n")
    return path


def test_rows_are_prefixed_by_the_run_and_the_config_keys_that_differ(tmp_path):
    head = ["target", "method", "accuracy"]
    a = _run(tmp_path / "gemma" / "s4", {"model": "gemma-3-270m", "n": 8, "strengths": [1, 4], "inputs": {"x": "1"}},
             {"results.csv": [head, ["sst2", "zero_shot", "0.5"], ["sst2", "cast", "0.6"]]})
    b = _run(tmp_path / "smol" / "s4", {"model": "smollm2", "n": 8, "strengths": [2, 8], "inputs": {"x": "2"}},
             {"results.csv": [head, ["sst2", "zero_shot", "0.4"]]})
    m = merge_runs([a, b], tmp_path / "merged")
    assert m.keys == ("model", "strengths")  # n is the same; the input checksums are not a setting
    rows = list(csv.reader(io.StringIO((tmp_path / "merged" / "results.csv").read_text())))
    assert rows == [["run", "model", "strengths", *head],
                    [a.as_posix(), "gemma-3-270m", "1,4", "sst2", "zero_shot", "0.5"],
                    [a.as_posix(), "gemma-3-270m", "1,4", "sst2", "cast", "0.6"],
                    [b.as_posix(), "smollm2", "2,8", "sst2", "zero_shot", "0.4"]]
    assert "| " + b.as_posix() + " | smollm2 | 2,8 |" in (tmp_path / "merged" / "runs.md").read_text()


def test_merge_refuses_what_is_not_one_kind_of_finished_run(tmp_path, capsys):
    a = _run(tmp_path / "a", {"n": 1}, {"results.csv": [["x"], ["1"]]})
    b = _run(tmp_path / "b", {"n": 2}, {"results.csv": [["x"], ["2"]], "costs.csv": [["y"], ["3"]]})
    unfinished = _run(tmp_path / "c", {"n": 3}, {})
    with pytest.raises(RunError, match="runs of different kinds"):
        merge_runs([a, b], tmp_path / "m")
    with pytest.raises(RunError, match="no tables yet"):
        merge_runs([a, unfinished], tmp_path / "m")
    with pytest.raises(RunError, match="not a castlens run folder"):
        merge_runs([a, tmp_path], tmp_path / "m")
    assert main(["merge", str(a), str(a), "--out", str(tmp_path / "m")]) == 2
    assert "given twice" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_the_slurm_array_covers_the_sweep_once_and_queues_one_merge(tmp_path):
    """scripts/sweep.slurm with ``castlens`` and ``sbatch`` replaced by recorders: every array index is one
    distinct (model, target, strengths) run folder, and only the last index queues the merge after the array."""
    import os
    import re
    import subprocess
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "sweep.slurm"
    n = [int(x) for x in re.search(r"--array=(\d+)-(\d+)", script.read_text()).groups()]
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for tool in ("castlens", "sbatch"):
        (bin_ / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "{tmp_path}/calls"\n')
        (bin_ / tool).chmod(0o755)
    for i in range(n[0], n[1] + 1):
        env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": str(i),
               "SLURM_ARRAY_JOB_ID": "42", "OUT": "runs/sweep"}
        subprocess.run(["bash", str(script)], env=env, check=True, cwd=tmp_path)
    calls = (tmp_path / "calls").read_text().splitlines()
    runs = [c for c in calls if c.startswith("castlens transfer")]
    outs = {c.split("--out ")[1] for c in runs}
    assert len(runs) == len(outs) == n[1] - n[0] + 1 == 20
    assert {o.split("/")[2] for o in outs} == {"smollm2-135m-instruct", "gemma-3-270m"}
    merges = [c for c in calls if c.startswith("sbatch")]
    assert len(merges) == 1 and "afterok:42" in merges[0] and "castlens merge runs/sweep/*/*/s*" in merges[0]


def test_spread_over_draw_seeds_against_numpy(tmp_path):
    """spread.md: mean, sd (ddof 1) and range over the runs, in points, for rows present in every run."""
    import numpy as np

    head = ["target", "method", "accuracy", "delta_zero", "delta_random"]
    acc, dz = [0.61, 0.55, 0.58], [0.277, 0.2, 0.25]
    runs = [_run(tmp_path / f"d{k}", {"draw_seed": k}, {"results.csv": [
        head, ["fpb", "cast_mean_diff", str(acc[k]), str(dz[k]), "0.1"], ["fpb", "zero_shot", "0.33", "", ""],
        *([["sciq", "cast_mean_diff", "0.25", "0", "0"]] if k else [])]}) for k in range(3)]
    merge_runs(runs, tmp_path / "m")
    md = (tmp_path / "m" / "spread.md").read_text()
    a, d = np.array(acc) * 100, np.array(dz) * 100
    assert (f"| fpb | cast_mean_diff | {a.mean():.1f} ({a.std(ddof=1):.1f}) [{a.min():.1f}, {a.max():.1f}] | "
            f"{d.mean():+.1f} ({d.std(ddof=1):.1f}) [{d.min():+.1f}, {d.max():+.1f}] | +10.0 (0.0) [+10.0, +10.0] |"
            ) in md
    assert "| fpb | zero_shot | 33.0 (0.0) [33.0, 33.0] |  |  |" in md
    assert "sciq" not in md  # not in every run
    assert "draw_seed" in md.splitlines()[0]


def test_spread_against_the_draws_mean_and_no_mean_over_other_targets(tmp_path):
    """vs draws' mean: a method's accuracy minus the mean accuracy of the random draws of the same target and run;
    ``mean`` rows are left out when the runs average over different targets (a 5-target run and 1-target runs)."""
    import numpy as np

    head = ["target", "method", "accuracy"]
    cast, draws = [0.58, 0.52], [[0.40, 0.50, 0.45], [0.33, 0.41, 0.35]]

    def rows(k):
        return [head, ["fpb", "cast_mean_diff", str(cast[k])],
                *(["fpb", "random_vector" + (f"_{i}" if i else ""), str(a)] for i, a in enumerate(draws[k])),
                ["mean", "cast_mean_diff", "0.4"]]

    runs = [_run(tmp_path / "all", {"draw_seed": None}, {"results.csv": [*rows(0), ["sciq", "cast_mean_diff", "0.3"]]}),
            _run(tmp_path / "one", {"draw_seed": 1}, {"results.csv": rows(1)})]
    merge_runs(runs, tmp_path / "m")
    md = (tmp_path / "m" / "spread.md").read_text()
    d = np.array([100 * (c - np.mean(w)) for c, w in zip(cast, draws)])
    assert f"| {d.mean():+.1f} ({d.std(ddof=1):.1f}) [{d.min():+.1f}, {d.max():+.1f}] |" in md
    assert "`delta_draws`" in md and "| mean |" not in md and "left out" in md
    same = [_run(tmp_path / f"s{k}", {"draw_seed": k}, {"results.csv": rows(k)}) for k in range(2)]
    merge_runs(same, tmp_path / "m2")
    assert "| mean | cast_mean_diff | 40.0 (0.0) [40.0, 40.0] |" in (tmp_path / "m2" / "spread.md").read_text()
