import json
import os
import subprocess
import sys

from castlens.cli import main
from castlens.vectors import load_vectors, task_vector


def test_vectors_command_writes_file_matching_the_library(tmp_path, tiny, capsys):
    out = tmp_path / "v.safetensors"
    assert main(["vectors", "--model", "tiny-llama", "--tasks", "add,antonym", "--n", "4", "--shots", "2",
                 "--out", str(out)]) == 0
    vs = load_vectors(out, model=tiny)
    assert set(vs) == {"add", "antonym"} and vs["add"].directions.shape == (4, 64)
    ref = task_vector(tiny, "add", n=4, shots=2)
    assert (vs["add"].directions - ref.directions).abs().max() < 1e-5
    assert not (tmp_path / "v.safetensors.parts").exists()
    assert "wrote 2 vectors" in capsys.readouterr().out


def test_vectors_command_resumes_finished_tasks(tmp_path, tiny, capsys):
    out = tmp_path / "v.safetensors"
    from castlens.vectors import save_vectors

    done = task_vector(tiny, "add", n=3, shots=1)
    done.directions = done.directions + 1000.0  # a marker: a reused part is not recomputed
    save_vectors(tmp_path / "v.safetensors.parts" / "add", done)
    assert main(["vectors", "--model", "tiny-llama", "--tasks", "add,plural", "--n", "3", "--shots", "1",
                 "--out", str(out)]) == 0
    assert "add: reusing the finished part" in capsys.readouterr().out
    assert load_vectors(out)["add"].directions.min() > 900


def test_bad_task_is_one_clear_line():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "castlens.cli", "vectors", "--model", "tiny-llama", "--tasks",
                        "add,sst3", "--out", "/nonexistent/x"], capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert "unknown task 'sst3'; did you mean sst2" in r.stderr and "Traceback" not in r.stderr


def test_json_lists_the_exact_prompt_pairs(tmp_path, tiny):
    out = tmp_path / "v"
    assert main(["vectors", "--model", "tiny-llama", "--tasks", "first_item", "--n", "2", "--shots", "1",
                 "--out", str(out)]) == 0
    doc = json.loads((tmp_path / "v.json").read_text())
    rec = doc["vectors"]["first_item"]["prompts"][0]
    instruction, query = rec["zero"].split("\n\n")
    assert rec["few"].startswith(instruction + "\n\n") and rec["few"].endswith("\n\n" + query)
    assert rec["few"].count("\nAnswer:") == 2 and rec["few_tokens"] > rec["zero_tokens"]


def test_selection_study_command_and_its_bad_options(tmp_path, tiny, capsys):
    args = ["selection-study", "--model", "tiny-llama", "--sources", "uppercase,first_item", "--targets", "plural",
            "--ablation-n", "2", "--ns", "2,4", "--dev", "4", "--limit", "6", "--icl-limit", "3", "--layers", "1",
            "--strengths", "2", "--pool", "6", "--n-boot", "50", "--no-png", "--out", str(tmp_path / "s")]
    assert main(args) == 0
    head = (tmp_path / "s" / "ablation.csv").read_text().splitlines()[0]
    assert head.startswith("target,method,accuracy")
    assert "cast@2" in capsys.readouterr().out
    assert main([*args[:-1], str(tmp_path / "t"), "--methods", "cast,nearest"]) == 2
    assert "unknown selection methods ['nearest']" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()  # refused before anything was written


def test_data_dir_reaches_the_run_without_the_environment(tmp_path, monkeypatch):
    """--data-dir is passed down to every task load of the run; nothing is written to the environment."""
    from castlens.tasks import load_task

    monkeypatch.delenv("CASTLENS_DATA", raising=False)
    (tmp_path / "tasks").mkdir()
    up = load_task("uppercase")
    task = {"name": "shout", "kind": "generation", "instruction": up.instruction,
            "train": [{"input": e.input, "output": e.output} for e in up.train[:8]],
            "test": [{"input": e.input, "output": e.output} for e in up.test[:4]]}
    (tmp_path / "tasks" / "shout.json").write_text(json.dumps(task))
    assert main(["tasks", "--data-dir", str(tmp_path)]) == 0
    out = tmp_path / "run"
    assert main(["transfer", "--model", "tiny-llama", "--data-dir", str(tmp_path), "--sources", "first_item",
                 "--targets", "shout", "--n", "2", "--shots", "1", "--dev", "3", "--limit", "3", "--layers", "1",
                 "--strengths", "1", "--n-boot", "20", "--no-png", "--out", str(out)]) == 0
    assert "CASTLENS_DATA" not in os.environ
    assert (out / "parts" / "shout.part.json").exists() and "shout,zero_shot" in (out / "results.csv").read_text()
