"""Bad input to the commands and runs, fed exactly as a new user would (issue #14): each is refused with a line
that names the problem, before any model work and with nothing half-written, or now gives the right result."""

import json

import pytest

from castlens.cli import main

TINY = ["--model", "tiny-llama", "--no-png"]
SMALL = ["--n", "2", "--shots", "1", "--dev", "3", "--limit", "3", "--layers", "1", "--strengths", "1",
         "--n-boot", "20"]


def _transfer(out, *extra, sources="first_item", targets="plural"):
    return main(["transfer", *TINY, "--sources", sources, "--targets", targets, *SMALL, *extra, "--out", str(out)])


@pytest.mark.parametrize("bad, says", [(["--strengths", "nan"], "finite"), (["--strengths", "1,inf"], "finite"),
                                       (["--limit", "-5"], "--limit must be at least 1"),
                                       (["--limit", "0"], "--limit must be at least 1"),
                                       (["--shots", "0"], "--shots must be at least 1"),
                                       (["--layers", "7"], "layers 0..3")])
def test_transfer_refuses_before_writing_anything(tmp_path, capsys, bad, says):
    out = tmp_path / "run"
    assert _transfer(out, *bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0]
    assert not out.exists()


def test_vectors_refuses_zero_shots_and_an_existing_output(tmp_path, capsys):
    out = tmp_path / "v.safetensors"
    assert main(["vectors", "--model", "tiny-llama", "--tasks", "add", "--n", "2", "--shots", "0",
                 "--out", str(out)]) == 2
    assert "zero" in capsys.readouterr().err and not out.exists()
    args = ["vectors", "--model", "tiny-llama", "--tasks", "add", "--n", "2", "--shots", "1", "--out", str(out)]
    assert main(args) == 0
    before = out.read_bytes()
    assert main([*args[:4], "plural", *args[5:]]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert main([*args[:4], "plural", *args[5:], "--overwrite"]) == 0 and out.read_bytes() != before


def _task_dir(tmp_path, flip=False):
    from castlens.tasks import load_task

    up = load_task("sst2")
    test = [{"input": e.input, "output": e.output} for e in up.test[:6]]
    if flip:
        test[0]["output"] = "positive" if test[0]["output"] == "negative" else "negative"
    task = {"name": "mysent", "kind": "classification", "instruction": up.instruction, "labels": list(up.labels),
            "train": [{"input": e.input, "output": e.output} for e in up.train[:12]], "test": test}
    (tmp_path / "tasks").mkdir(exist_ok=True)
    path = tmp_path / "tasks" / "mysent.json"
    path.write_text(json.dumps(task))
    return path


def test_a_resume_after_the_test_labels_changed_is_refused(tmp_path, capsys):
    _task_dir(tmp_path)
    out = tmp_path / "run"
    assert _transfer(out, "--data-dir", str(tmp_path), targets="mysent") == 0
    _task_dir(tmp_path, flip=True)
    assert _transfer(out, "--data-dir", str(tmp_path), targets="mysent") == 2
    assert "inputs changed" in capsys.readouterr().err


def test_a_target_given_by_its_file_path_works_to_the_end(tmp_path):
    path = _task_dir(tmp_path)
    out = tmp_path / "run"
    assert _transfer(out, targets=str(path)) == 0
    assert (out / "parts" / "mysent.part.json").exists()
    assert "mysent,zero_shot" in (out / "results.csv").read_text()
    assert main(["report", str(out), "--no-png"]) == 0


def test_generation_targets_say_how_they_are_scored_and_report_no_macro_f1(tmp_path):
    out = tmp_path / "run"
    assert _transfer(out) == 0
    md = (out / "results.md").read_text()
    assert "Generation targets (plural)" in md and "| plural | zero_shot |" in md
    row = next(line for line in md.splitlines() if line.startswith("| plural | zero_shot |"))
    assert row.split("|")[4].strip() == "n/a"
    csv = (out / "results.csv").read_text().splitlines()
    head, first = csv[0].split(","), csv[1].split(",")
    assert first[head.index("macro_f1")] == "" and first[head.index("majority")] == ""


def test_analyze_a_plain_vectors_file_without_controls(tmp_path, capsys):
    vec = tmp_path / "v.safetensors"
    assert main(["vectors", "--model", "tiny-llama", "--tasks", "add,antonym", "--n", "3", "--shots", "1",
                 "--out", str(vec)]) == 0
    out = tmp_path / "an"
    assert main(["analyze", *TINY, "--tasks", "add,antonym", "--vectors", str(vec), "--n-boot", "20",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["cross_task_cosine"]) == {"few"} and "n/a" in (out / "summary.md").read_text()


def test_ctrl_c_is_one_line_with_how_to_resume(tmp_path, capsys, monkeypatch):
    from castlens.experiments import transfer

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(transfer, "run_transfer", interrupted)
    assert _transfer(tmp_path / "run") == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rerun the same command to resume" in err[0] and "Traceback" not in err[0]


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["transfer", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 32)", "(default: 4)", "(default: 64)", "(default: (0.5, 1.0, 2.0, 4.0))",
                    "(default: None)", "tiny-llama"):
        assert default in text, default


def test_tasks_lists_kind_labels_and_split_sizes(capsys):
    from castlens.tasks import load_task

    assert main(["tasks"]) == 0
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    fpb = load_task("financial_phrasebank")
    assert lines["financial_phrasebank"][1:5] == ["classification", "3", str(len(fpb.train)), str(len(fpb.test))]
    assert lines["plural"][1] == "generation"


def test_export_command_writes_a_control_vector_and_names_an_ambiguous_file(tmp_path, capsys):
    import gguf

    vec = tmp_path / "v.safetensors"
    assert main(["vectors", "--model", "tiny-llama", "--tasks", "add,antonym", "--n", "2", "--shots", "1",
                 "--out", str(vec)]) == 0
    assert main(["export", str(vec), "--out", str(tmp_path / "x.gguf")]) == 2
    assert "choose one with --vector" in capsys.readouterr().err and not (tmp_path / "x.gguf").exists()
    assert main(["export", str(vec), "--vector", "antonym", "--layers", "2", "--out", str(tmp_path / "a.gguf")]) == 0
    names = [t.name for t in gguf.GGUFReader(str(tmp_path / "a.gguf")).tensors]
    assert names == ["direction.2"]
