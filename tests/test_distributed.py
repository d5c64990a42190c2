"""Data-parallel runs (issue #17): the same command under torchrun, 2 processes on CPU with gloo, gives the files
of a single process; a killed rank loses only its unfinished unit; a failing rank fails the launch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from castlens.cli import main
from castlens.distributed import share
from castlens.tasks import load_task
from castlens.vectors import load_vectors

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
VECTORS = ["vectors", "--model", "tiny-llama", "--tasks", "uppercase,first_item,next_number,plural", "--n", "4",
           "--shots", "2"]
TRANSFER = ["transfer", "--model", "tiny-llama", "--sources", "uppercase,first_item", "--targets",
            "last_item,plural,quiz", "--n", "4", "--shots", "2", "--dev", "4", "--limit", "6", "--layers", "1,2",
            "--strengths", "1,4", "--n-boot", "50", "--n-random", "2", "--no-png"]


def _launch(args, fault: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2`` of the castlens command (``--`` keeps torchrun from reading castlens' ``--n``
    as an abbreviation of its own options), or of tests/dist_fault.py with a planted fault on rank 1."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if fault:
        env["CASTLENS_TEST_FAULT"] = fault
    target = [str(ROOT / "tests" / "dist_fault.py")] if fault else ["-m", "castlens"]
    return subprocess.run([*TORCHRUN, *target, "--", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _without_timings(obj):
    """A part or record with its wall-clock fields dropped (the only thing two identical runs may differ in)."""
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if k not in ("seconds", "ms_per_query")}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def _same_run(a: Path, b: Path) -> None:
    assert (a / "results.csv").read_text() == (b / "results.csv").read_text()
    assert (a / "config.json").read_text() == (b / "config.json").read_text()
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*.json") if "pieces" not in p.parts)
    assert names == sorted(p.relative_to(b).as_posix() for p in b.rglob("*.json") if "pieces" not in p.parts)
    for name in names:
        assert _without_timings(json.loads((a / name).read_text())) == \
            _without_timings(json.loads((b / name).read_text())), name
    for f in a.rglob("*.safetensors"):
        va, vb = load_vectors(f), load_vectors(b / f.relative_to(a))
        for k in va:
            torch.testing.assert_close(vb[k].directions, va[k].directions, rtol=1e-6, atol=1e-7)
    assert not list(b.rglob(".*.tmp"))


def test_share_balances_by_size_and_is_the_same_everywhere():
    sizes = {"a": 10, "b": 1, "c": 1, "d": 9, "e": 1}
    assert share(list(sizes), 2, sizes) == [["a", "c"], ["b", "d", "e"]]  # loads 11 and 11, the given order kept
    assert share(["x", "y", "z"], 2) == [["x", "z"], ["y"]]
    assert share(["x"], 3) == [["x"], [], []]


def test_vectors_on_two_processes_equal_one(tmp_path):
    assert main([*VECTORS, "--out", str(tmp_path / "one")]) == 0
    r = _launch([*VECTORS, "--out", str(tmp_path / "two")])
    assert r.returncode == 0, r.stdout + r.stderr
    one, two = load_vectors(tmp_path / "one.safetensors"), load_vectors(tmp_path / "two.safetensors")
    assert list(one) == list(two) == ["uppercase", "first_item", "next_number", "plural"]
    for k in one:
        torch.testing.assert_close(two[k].directions, one[k].directions, rtol=1e-6, atol=1e-7)
        assert two[k].metadata() == one[k].metadata()
    assert not (tmp_path / "two.parts").exists()
    assert "[rank 1]" in r.stdout and r.stdout.count("wrote 4 vectors") == 1  # rank 0 reports, rank 1 is labelled
    assert "activations:" in r.stderr and "[rank 1] activations" not in r.stderr  # progress bars from rank 0 only


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A folder with one test-only task (no train split, like MedMCQA): it borrows its settings from the others."""
    d = tmp_path_factory.mktemp("data")
    (d / "tasks").mkdir()
    src = load_task("antonym")
    task = {"name": "quiz", "kind": "generation", "instruction": src.instruction, "train": [],
            "test": [{"input": e.input, "output": e.output} for e in src.test[:8]]}
    (d / "tasks" / "quiz.json").write_text(json.dumps(task))
    return d


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_dir):
    """The single-process run, on one thread like each torchrun rank: a CPU matmul's sum order depends on the thread
    count, so two thread counts differ in the last float bit, and a dev sweep's near-ties may then pick another
    setting. Same threads, same bits."""
    out = tmp_path_factory.mktemp("single") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*TRANSFER, "--data-dir", str(data_dir), "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_transfer_on_two_processes_equals_one(tmp_path, data_dir, single):
    out = tmp_path / "two"
    r = _launch([*TRANSFER, "--data-dir", str(data_dir), "--out", str(out)])
    assert r.returncode == 0, r.stdout + r.stderr
    _same_run(single, out)
    pieces = sorted(p.name for p in (out / "parts" / "pieces").glob("*.part.json"))  # each target split over ranks
    assert [p for p in pieces if ".sweep." not in p] == [f"{t}.{b}.part.json" for t in ("last_item", "plural", "quiz")
                                                         for b in ("calibration", "icl")]
    for t in ("last_item", "plural"):  # 4 pieces (2 per rank) that hold every construction once
        mine = [p[len(t) + 7:-10].split("+") for p in pieces if p.startswith(f"{t}.sweep.")]
        assert len(mine) == 4 and sorted(sum(mine, [])) == sorted(
            ["cast_mean_diff", "icv_pc1", "task_vector", "random_vector", "random_vector_1"])
    quiz = json.loads((out / "parts" / "quiz.part.json").read_text())  # it borrowed from the others' sweeps
    assert quiz["sweep"] == [] and '"borrowed_from": [\n' in (out / "parts" / "quiz.part.json").read_text()


def test_a_killed_rank_then_the_same_launch_gives_the_same_files(tmp_path, data_dir, single):
    out = tmp_path / "killed"
    r = _launch([*TRANSFER, "--data-dir", str(data_dir), "--out", str(out)], fault="kill")
    assert r.returncode != 0 and not (out / "results.csv").exists()
    kept = sorted(p.name for p in (out / "parts").rglob("*.part.json"))
    assert kept  # rank 1's first part was written before it was killed
    r = _launch([*TRANSFER, "--data-dir", str(data_dir), "--out", str(out)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("finished earlier, kept") + r.stderr.count("finished earlier, kept") >= len(kept)
    _same_run(single, out)


def test_a_failing_rank_fails_the_launch_with_its_error_and_no_half_file(tmp_path, data_dir):
    out = tmp_path / "failed"
    r = _launch([*TRANSFER, "--data-dir", str(data_dir), "--out", str(out)], fault="raise")
    assert r.returncode != 0
    assert "planted failure on rank 1" in r.stdout + r.stderr
    assert not (out / "results.csv").exists() and not list(out.rglob(".*.tmp"))
    for f in out.rglob("*.json"):
        json.loads(f.read_text())  # whatever was written is whole


EXPLAIN = ["explain", "--model", "tiny-llama", "--tasks", "last_item", "--sources", "uppercase,first_item,next_number",
           "--targets", "plural,antonym", "--n", "4", "--shots", "2", "--dev", "8", "--limit", "12", "--layer", "2",
           "--strengths", "1,4", "--fv-heads", "1,3", "--n-random", "2", "--n-boot", "200", "--no-png"]


def test_explain_on_two_processes_equals_one(tmp_path):
    """The mechanism run splits its task parts and its target parts over the ranks; the tables, the per-task
    tensors and every part equal a single process's (one thread, as each rank)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*EXPLAIN, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    r = _launch([*EXPLAIN, "--out", str(tmp_path / "two")])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[rank 1] [" in r.stdout  # rank 1 computed parts of its own
    one, two = tmp_path / "one", tmp_path / "two"
    for name in ("summary.md", "attribution.csv", "patching.csv", "split_steering.csv", "logit_lens.md", "config.json"):
        assert (two / name).read_text() == (one / name).read_text(), name
    names = sorted(p.relative_to(one).as_posix() for p in one.rglob("*.json"))
    assert "parts/target_plural.part.json" in names and "patching/antonym.effects.json" in names
    assert names == sorted(p.relative_to(two).as_posix() for p in two.rglob("*.json"))
    for name in names:
        assert _without_timings(json.loads((one / name).read_text())) == \
            _without_timings(json.loads((two / name).read_text())), name
    tensors = sorted(p.name for p in (one / "parts" / "tensors").glob("*.safetensors"))
    assert len(tensors) == 6 and tensors == sorted(p.name for p in (two / "parts" / "tensors").glob("*.safetensors"))
    for name in tensors:
        a, b = load_file(one / "parts" / "tensors" / name), load_file(two / "parts" / "tensors" / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    assert not list(two.rglob(".*.tmp"))
