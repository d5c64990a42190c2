import json
import re

import pytest

from castlens.tasks import BUILTIN_TASKS, CAST_SOURCES, CAST_TARGETS, TaskError, list_tasks, load_task


def test_shared_collection_loads_cast_tasks():
    for name in CAST_SOURCES + CAST_TARGETS:
        t = load_task(name)
        assert t.test and t.kind == "classification"
        assert all(ex.output in t.labels for ex in t.test)
    arc = load_task("arc_challenge")
    assert arc.test[0].choices is not None and len(arc.test[0].choices) >= 3
    assert len(list_tasks()) == len(BUILTIN_TASKS) + 134


@pytest.mark.parametrize("name", list(BUILTIN_TASKS))
def test_builtin_tasks_are_correct_and_deterministic(name):
    t = load_task(name)
    assert len(t.train) >= 30 and len(t.test) >= 20
    inputs = [e.input for e in t.train + t.test]
    assert len(set(inputs)) == len(inputs), "inputs repeat (a demo could equal a query)"
    assert load_task(name) == t  # same seed, same task
    check = {
        "uppercase": lambda x: x.upper(),
        "first_item": lambda x: x.split(", ")[0],
        "last_item": lambda x: x.split(", ")[-1],
        "next_number": lambda x: str(int(x) + 1),
        "add": lambda x: str(sum(int(p) for p in x.split(" + "))),
        "reverse_word": lambda x: x[::-1],
    }.get(name)
    if check:
        assert all(e.output == check(e.input) for e in t.train + t.test)
    if name == "plural":
        assert {e.input: e.output for e in t.train + t.test}.get("bottle", "bottles") == "bottles"
    if name == "antonym":
        pairs = {e.input: e.output for e in t.train + t.test}
        assert all(pairs.get(v, k) == k for k, v in pairs.items()), "antonym is not symmetric"


def _write(tmp_path, obj, name="bad"):
    p = tmp_path / f"{name}.json"
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return p


GOOD = {"name": "toy", "kind": "classification", "labels": ["yes", "no"],
        "train": [{"input": "a", "output": "yes"}], "test": [{"input": "b", "output": "no"}]}


def test_file_path_and_data_dir(tmp_path):
    assert load_task(_write(tmp_path, GOOD)).labels == ("yes", "no")
    (tmp_path / "tasks").mkdir()
    _write(tmp_path / "tasks", GOOD, "toy")
    assert load_task("toy", data_dir=tmp_path).name == "toy"


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("kind"), "missing field"),
    (lambda d: d.pop("test"), "missing field"),
    (lambda d: d["test"].append({"input": "c", "output": "maybe"}), "test[1]: output 'maybe' is not one of"),
    (lambda d: d["train"].append({"input": "c"}), "train[1]: field 'output'"),
    (lambda d: d.update(labels=[]), "non-empty list"),
    (lambda d: d.update(kind="regression"), "kind 'regression'"),
    (lambda d: d.update(train=[], test=[]), "both splits are empty"),
    (lambda d: d["test"].append("just a string"), "test[1]: expected an object"),
])
def test_bad_task_files_name_the_task_and_item(tmp_path, mutate, message):
    d = json.loads(json.dumps(GOOD))
    mutate(d)
    with pytest.raises(TaskError, match=re.escape(message)) as err:
        load_task(_write(tmp_path, d))
    assert "toy" in str(err.value) or "bad.json" in str(err.value)


def test_corrupt_file_and_unknown_name_and_empty_split(tmp_path):
    with pytest.raises(TaskError, match="not valid UTF-8 JSON"):
        load_task(_write(tmp_path, '{"name": "toy", "kind": '))
    with pytest.raises(TaskError, match="unknown task 'sst3'; did you mean sst2"):
        load_task("sst3")
    with pytest.raises(TaskError, match="'medmcqa': the train split is empty"):
        load_task("medmcqa").split("train")
