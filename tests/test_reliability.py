"""Reliability: property tests, real interruptions, failing writes, long prompts and no unsafe loading."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from castlens.activations import PromptTooLongError, last_token_resid
from castlens.steering import steering
from castlens.tasks import TaskError
from castlens.vectors import SteeringVector, load_vectors, save_vectors

ROOT = Path(__file__).parents[1]
PROPS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
PROMPTS = [list(range(30, 30 + n)) for n in (3, 17, 1, 40, 9, 25)]


@pytest.fixture(scope="module")
def one_by_one(tiny):
    return torch.cat([last_token_resid(tiny, [p]) for p in PROMPTS])


# ---------------------------------------------------------------- properties
@PROPS
@given(order=st.permutations(range(len(PROMPTS))), batch_size=st.integers(1, 7),
       side=st.sampled_from(["left", "right"]))
def test_extraction_is_invariant_to_batch_composition(tiny, one_by_one, order, batch_size, side):
    out = last_token_resid(tiny, [PROMPTS[i] for i in order], batch_size=batch_size, padding_side=side)
    assert (out - one_by_one[list(order)]).abs().max() < 1e-4


@PROPS
@given(layer=st.integers(0, 3), read=st.integers(0, 3), strength=st.floats(-4, 4, allow_nan=False),
       seed=st.integers(0, 10 ** 6))
def test_steering_zero_later_layers_and_linearity(tiny, one_by_one, layer, read, strength, seed):
    v = torch.randn(4, 64, generator=torch.Generator().manual_seed(seed))
    base = one_by_one[:, read]
    with steering(tiny, v, layer, 0.0):
        assert (last_token_resid(tiny, PROMPTS, layers=[read])[:, 0] - base).abs().max() < 1e-4
    with steering(tiny, v, layer, strength):
        got = last_token_resid(tiny, PROMPTS, layers=[read])[:, 0]
    if layer > read:  # a vector injected after the layer read cannot reach it
        assert (got - base).abs().max() < 1e-4
    elif layer == read:  # at the injection layer the change is exactly strength * v
        assert (got - base - strength * v[layer]).abs().max() < 1e-4 * (1 + abs(strength) * v.abs().max())


text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)


@PROPS
@given(names=st.lists(text, min_size=1, max_size=6, unique=True),
       prompts=st.lists(st.dictionaries(text, text, max_size=3), max_size=4), method=text)
def test_vector_files_round_trip_arbitrary_metadata(tmp_path_factory, names, prompts, method):
    g = torch.Generator().manual_seed(len(names))
    vecs = {n: SteeringVector(directions=torch.randn(4, 8, generator=g), model="m", task=n, n_samples=3, shots=2,
                              seed=0, method=method, prompts=prompts) for n in names}
    path = save_vectors(tmp_path_factory.mktemp("v") / "vecs", vecs)
    back = load_vectors(path)
    assert list(back) == names
    for n in names:
        assert torch.equal(back[n].directions, vecs[n].directions)
        assert back[n].prompts == prompts and back[n].method == method and back[n].task == n


@PROPS
@given(name=text, inp=st.one_of(text, st.integers(), st.none()), out=st.one_of(text, st.none()),
       labels=st.one_of(st.none(), st.lists(text, max_size=3)),
       kind=st.sampled_from(["classification", "generation", "x"]),
       instruction=st.one_of(st.none(), text, st.integers()))
def test_task_files_with_arbitrary_content_load_or_fail_with_task_error(tmp_path_factory, name, inp, out, labels,
                                                                         kind, instruction):
    from castlens.tasks import load_task

    raw = {"name": name, "kind": kind, "labels": labels, "instruction": instruction,
           "train": [{"input": inp, "output": out}], "test": [{"input": inp, "output": out}]}
    path = tmp_path_factory.mktemp("t") / "task.json"
    path.write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8")
    try:
        task = load_task(path)
    except TaskError as err:
        assert str(err)  # the documented error, with a message
    else:
        assert task.name == name and task.train[0].input == inp


# ---------------------------------------------------------------- interruptions and failing writes
ARGS = ["transfer", "--model", "tiny-llama", "--sources", "uppercase,first_item", "--targets",
        "last_item,plural,antonym", "--n", "6", "--shots", "2", "--dev", "6", "--limit", "12", "--layers", "1,2",
        "--strengths", "1,4", "--n-boot", "100", "--no-png"]


def _cli(out: Path, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "castlens.cli", *ARGS, "--out", str(out)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def _visible_files_are_whole(out: Path) -> None:
    for f in out.rglob("*"):
        if f.is_file() and not f.name.startswith("."):
            if f.suffix == ".json":
                json.loads(f.read_text())  # a half-written JSON would not parse
    if (out / "vectors.json").exists():
        load_vectors(out / "vectors.safetensors")


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume_gives_identical_results(tmp_path):
    ref = tmp_path / "ref"
    assert _cli(ref).wait(timeout=600) == 0
    expected = (ref / "results.csv").read_text()
    out = tmp_path / "killed"
    kills = 0
    for marker in ("config.json", "vectors.safetensors", "parts/last_item.part.json", "parts/plural.part.json"):
        p = _cli(out)
        while not (out / marker).exists() and p.poll() is None:
            time.sleep(0.01)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += p.wait() == -signal.SIGKILL
        _visible_files_are_whole(out)
    assert kills >= 3 and not (out / "results.csv").exists()  # really interrupted, before the end
    assert _cli(out).wait(timeout=600) == 0
    assert (out / "results.csv").read_text() == expected
    for part in ("last_item", "plural", "antonym"):
        assert json.loads((out / "parts" / f"{part}.part.json").read_text())["gold"] == \
            json.loads((ref / "parts" / f"{part}.part.json").read_text())["gold"]
    assert not list(out.rglob(".*.tmp"))


def test_a_full_disk_is_a_clear_error_and_loses_nothing(tmp_path, tiny, monkeypatch, capsys):
    from castlens import files
    from castlens.experiments import transfer as tr

    cfg = tr.TransferConfig(model="tiny-llama", sources=("uppercase", "first_item"), targets=("last_item", "plural"),
                            n=6, shots=2, dev=6, limit=8, layers=(1,), strengths=(1.0,), n_boot=50)
    real = files.atomic_write

    def full_disk(path, data):
        if path.name == "plural.part.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(files, "atomic_write", full_disk)
    with pytest.raises(OSError, match="No space"):
        tr.run_transfer(tiny, cfg, tmp_path, png=False, log=lambda *a: None)
    first = (tmp_path / "parts" / "last_item.part.json").read_bytes()
    assert not (tmp_path / "parts" / "plural.part.json").exists() and not (tmp_path / "results.csv").exists()
    monkeypatch.setattr(files, "atomic_write", real)
    tr.run_transfer(tiny, cfg, tmp_path, png=False, log=lambda *a: None)
    assert (tmp_path / "parts" / "last_item.part.json").read_bytes() == first


def test_atomic_write_failure_leaves_no_partial_file(tmp_path, monkeypatch):
    from castlens import files

    target = tmp_path / "x.json"
    target.write_text("old")
    monkeypatch.setattr(files.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "disk full")))
    with pytest.raises(OSError):
        files.atomic_write(target, b"new content")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_cli_reports_an_unwritable_output_in_one_line(tmp_path, capsys):
    from castlens.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = main([*ARGS, "--out", str(blocker / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and "cannot read or write" in err[0] and str(blocker) in err[0]


# ---------------------------------------------------------------- long prompts
def test_long_prompts_error_by_default_and_truncate_demonstrations_on_request(tiny):
    from castlens.prompts import default_format
    from castlens.tasks import Example, Task
    from castlens.vectors import task_vector

    long = [Example("word " * 40 + str(i), f"out{i}") for i in range(20)]  # ~200 byte tokens each
    task = Task("long", "generation", train=long, test=long[:3], instruction="Copy.")
    with pytest.raises(PromptTooLongError, match="more than the model's context of 512"):
        task_vector(tiny, task, n=3, shots=4)
    v = task_vector(tiny, task, n=3, shots=4, truncate_demos=True)
    fmt = default_format(task)
    for rec in v.prompts:
        few = rec["few"]
        assert rec["few_tokens"] <= 512
        assert few.startswith("Copy.") and few.endswith(fmt.render(Example(rec["query"], ""), False))
        assert 0 < few.count("Answer: out") < 4  # some demonstrations kept, the earliest ones dropped


def test_fit_demonstrations_drops_the_earliest_first():
    from castlens.prompts import PromptFormat, fit_demonstrations
    from castlens.tasks import Example

    demos = [Example(f"d{i} " * 5, f"o{i}") for i in range(4)]
    fmt = PromptFormat(instruction="I")
    prompt, kept = fit_demonstrations(Example("q", ""), demos, fmt, len, 60)
    assert kept == demos[-len(kept):] and 0 < len(kept) < 4 and len(prompt) <= 60
    with pytest.raises(TaskError, match="zero-shot prompt alone"):
        fit_demonstrations(Example("q" * 100, ""), demos, fmt, len, 60)


# ---------------------------------------------------------------- nothing unsafe is loaded
def test_no_pickle_or_torch_load_in_the_package():
    pattern = re.compile(r"\bimport pickle\b|\bpickle\.|torch\.load\(|\bdill\b|\bjoblib\.load|allow_pickle=True")
    hits = [f"{p}:{i}" for p in (ROOT / "castlens").rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits
