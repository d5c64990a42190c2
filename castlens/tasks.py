"""Tasks: labelled input/output pairs with train and test splits. Knows no model.

Two sources:

* the JSON task collection of ``../shared/data`` (134 tasks, one schema: ``name``, ``language``, ``kind``,
  ``labels``, ``train``, ``test``, optional per-example ``choices``), found through ``data_dir=``,
  ``$CASTLENS_DATA`` or ``../shared/data`` beside the repository; a path to one task file works too;
* built-in tasks that castlens generates itself with a fixed seed (letter case, first/last list item, next number,
  sum, word reversal, plural, antonym): the embedded default that ``make demo`` uses, needing no file.

Bad input raises :class:`TaskError` naming the task and the item; nothing is skipped silently.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

KINDS = ("classification", "generation")
# How a multiple-choice item's answer is written and scored: its label (a letter) or its option text.
MC_SCORING = ("letter", "text")
# The cross-task ICL setup CAST compares against (Chatterjee et al. 2024): high-resource sources, low-resource targets.
CAST_SOURCES = ("ag_news", "arc_easy", "boolq", "commonsense_qa", "mnli", "qqp", "race", "sst2")
CAST_TARGETS = ("arc_challenge", "financial_phrasebank", "medmcqa", "sciq", "social_i_qa")


class TaskError(ValueError):
    """Task data that cannot be used as it is; the message names the task and the item."""


@dataclass(frozen=True)
class Example:
    input: str
    output: str
    choices: tuple[str, ...] | None = None


@dataclass
class Task:
    """A task: ``kind`` is ``classification`` (outputs drawn from ``labels``) or ``generation`` (free text)."""

    name: str
    kind: str
    train: list[Example]
    test: list[Example]
    labels: tuple[str, ...] | None = None
    language: str = "en"
    description: str = ""
    instruction: str | None = None  # an explicit task definition; None lets the prompt format choose one
    source: str = field(default="builtin")
    mc_scoring: str = "letter"      # MC_SCORING: answers as labels, or as each item's option text (with_mc_scoring)

    @property
    def multiple_choice(self) -> bool:
        """A classification task whose items carry their option texts (``choices``)."""
        return self.kind == "classification" and bool(self.labels) and any(
            e.choices for e in (*self.train, *self.test))

    def split(self, name: str) -> list[Example]:
        """The examples of split ``name`` (``train`` or ``test``); an empty or unknown split is an error."""
        if name not in ("train", "test"):
            raise TaskError(f"task {self.name!r}: unknown split {name!r} (use 'train' or 'test')")
        items = getattr(self, name)
        if not items:
            raise TaskError(f"task {self.name!r}: the {name} split is empty")
        return items


@dataclass(frozen=True)
class TaskInfo:
    """A task at a glance, as ``castlens tasks`` lists it: ``n_labels`` is the label count of a classification
    task (``None`` for generation), ``n_train``/``n_test`` the split sizes, ``source`` ``builtin`` or the file."""

    name: str
    kind: str
    n_labels: int | None
    n_train: int
    n_test: int
    language: str = "en"
    source: str = "builtin"


def task_info(task: Task | str | os.PathLike, data_dir: str | os.PathLike | None = None) -> TaskInfo:
    """The :class:`TaskInfo` of ``task``: a loaded :class:`Task`, or a name or path for :func:`load_task`."""
    t = task if isinstance(task, Task) else load_task(task, data_dir)
    return TaskInfo(name=t.name, kind=t.kind, n_labels=None if t.labels is None else len(t.labels),
                    n_train=len(t.train), n_test=len(t.test), language=t.language, source=t.source)


def task_infos(data_dir: str | os.PathLike | None = None) -> list[TaskInfo]:
    """:func:`task_info` of every task :func:`list_tasks` names (the built-in ones, then the collection's, each
    file loaded and validated: a broken file is a :class:`TaskError` naming it)."""
    folder = None
    try:
        folder = find_data_dir(data_dir)
    except TaskError:
        pass
    return [task_info(name, folder) for name in list_tasks(folder)]


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def find_data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The task collection: ``explicit``, else ``$CASTLENS_DATA``, else ``../shared/data`` beside the repository."""
    candidates = [Path(explicit)] if explicit else []
    if not candidates and os.environ.get("CASTLENS_DATA"):
        candidates = [Path(os.environ["CASTLENS_DATA"])]
    if not candidates:
        candidates = [_repo_root().parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for c in candidates:
        if (c / "tasks").is_dir():
            return c
    raise TaskError(
        f"no task collection found (looked in {', '.join(str(c) for c in candidates)}); "
        "pass --data-dir or set CASTLENS_DATA to a folder holding tasks/*.json"
    )


def list_tasks(data: str | os.PathLike | None = None) -> list[str]:
    """Names of all tasks: the built-in ones and, if a collection is found, those in it."""
    names = list(BUILTIN_TASKS)
    try:
        names += sorted(p.stem for p in (find_data_dir(data) / "tasks").glob("*.json"))
    except TaskError:
        pass
    return names


def _example(task: str, split: str, i: int, raw: object, labels: tuple[str, ...] | None) -> Example:
    where = f"task {task!r}, {split}[{i}]"
    if not isinstance(raw, dict):
        raise TaskError(f"{where}: expected an object with 'input' and 'output', got {type(raw).__name__}")
    for key in ("input", "output"):
        if not isinstance(raw.get(key), str):
            raise TaskError(f"{where}: field {key!r} is missing or not a string")
    if labels is not None and raw["output"] not in labels:
        raise TaskError(f"{where}: output {raw['output']!r} is not one of the labels {list(labels)}")
    choices = raw.get("choices")
    if choices is not None:
        if not (isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)):
            raise TaskError(f"{where}: 'choices' must be a non-empty list of strings")
        choices = tuple(choices)
    return Example(raw["input"], raw["output"], choices)


def task_from_dict(d: object, origin: str = "dict") -> Task:
    """Validate one task object of the shared JSON schema and build a :class:`Task`."""
    if not isinstance(d, dict):
        raise TaskError(f"{origin}: a task file must hold one JSON object")
    name = d.get("name")
    if not isinstance(name, str) or not name:
        raise TaskError(f"{origin}: field 'name' is missing or empty")
    missing = [k for k in ("kind", "train", "test") if k not in d]
    if missing:
        raise TaskError(f"task {name!r} ({origin}): missing field(s) {missing}")
    if d["kind"] not in KINDS:
        raise TaskError(f"task {name!r}: kind {d['kind']!r} is not one of {KINDS}")
    labels = d.get("labels")
    if d["kind"] == "classification":
        if not (isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels)):
            raise TaskError(f"task {name!r}: a classification task needs a non-empty list of string 'labels'")
        if len(set(labels)) != len(labels):
            raise TaskError(f"task {name!r}: duplicate labels in {labels}")
        labels = tuple(labels)
    else:
        labels = None
    splits = {}
    for split in ("train", "test"):
        if not isinstance(d[split], list):
            raise TaskError(f"task {name!r}: split {split!r} must be a list")
        splits[split] = [_example(name, split, i, raw, labels) for i, raw in enumerate(d[split])]
    if not splits["train"] and not splits["test"]:
        raise TaskError(f"task {name!r}: both splits are empty")
    if d.get("instruction") is not None and not isinstance(d["instruction"], str):
        raise TaskError(f"task {name!r}: 'instruction' must be a string")
    return Task(name=name, kind=d["kind"], labels=labels, language=str(d.get("language", "en")),
                description=str(d.get("description", "")), instruction=d.get("instruction"), source=origin,
                train=splits["train"], test=splits["test"])


def with_mc_scoring(task: Task, mode: str) -> Task:
    """``task`` with its multiple-choice answers written and scored as ``mode``::

        letter   Question ... A. x  B. y ...  Answer: B          options: the labels A, B, ...
        text     Question ... A. x  B. y ...  Answer: y          options: the item's choices (lm-evaluation-harness)

    The label stays the stored output (splits, strata and gold indices do not change); only the answer text
    does. A task without option texts is the same under both modes (its labels are its answers' text) and comes
    back unchanged. Every item of a text-scored task must have a choice for its label."""
    if mode not in MC_SCORING:
        raise ValueError(f"unknown multiple-choice scoring {mode!r}; available: {', '.join(MC_SCORING)}")
    if mode == task.mc_scoring or not task.multiple_choice:
        return task
    if mode == "text":
        assert task.labels is not None
        for split in ("train", "test"):
            for i, e in enumerate(getattr(task, split)):
                if e.choices is None or task.labels.index(e.output) >= len(e.choices):
                    have = "no choices" if e.choices is None else f"{len(e.choices)} choices"
                    raise TaskError(f"task {task.name!r}, {split}[{i}]: option-text scoring needs the text of "
                                    f"option {e.output!r}, but the item has {have}")
    return dataclasses.replace(task, mc_scoring=mode)


def load_task(name_or_path: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> Task:
    """A task by name (built-in or in the collection) or by path to a JSON task file."""
    key = str(name_or_path)
    if key in BUILTIN_TASKS:
        return BUILTIN_TASKS[key]()
    path = Path(key)
    if not (path.suffix == ".json" and path.is_file()):
        folder = find_data_dir(data_dir)
        path = folder / "tasks" / f"{key}.json"
        if not path.is_file():
            known = list_tasks(folder)
            hint = difflib.get_close_matches(key, known, n=3)
            raise TaskError(f"unknown task {key!r}" + (f"; did you mean {', '.join(hint)}?" if hint else "")
                            + f" ({len(known)} tasks known: built-in ones and {folder / 'tasks'})")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TaskError(f"task file {path} is not valid UTF-8 JSON: {err}") from None
    return task_from_dict(raw, origin=str(path))


# ---------------------------------------------------------------- built-in tasks
_WORDS = (
    "apple river stone cloud garden window pencil mirror candle bottle forest rocket button jacket ladder "
    "basket dragon island lemon market needle orange planet rabbit silver tiger violin wagon yellow zebra anchor "
    "bridge castle desert engine feather guitar hammer jungle kettle lantern meadow notebook ocean pillow "
    "quilt saddle tunnel umbrella valley whistle"
).split()
_ANTONYMS = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("open", "closed"), ("light", "dark"),
    ("happy", "sad"), ("early", "late"), ("hard", "soft"), ("high", "low"), ("old", "new"), ("rich", "poor"),
    ("strong", "weak"), ("wet", "dry"), ("full", "empty"), ("loud", "quiet"), ("thick", "thin"), ("long", "short"),
    ("clean", "dirty"), ("near", "far"), ("wide", "narrow"), ("true", "false"), ("first", "last"), ("win", "lose"),
    ("push", "pull"), ("buy", "sell"), ("give", "take"), ("love", "hate"), ("begin", "end"), ("inside", "outside"),
    ("above", "below"), ("before", "after"), ("day", "night"), ("good", "bad"), ("left", "right"), ("yes", "no"),
)


def _plural(word: str) -> str:
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _builtin(name: str, instruction: str, make: Callable[[random.Random], tuple[str, str]],
             n_train: int = 200, n_test: int = 100, description: str = "") -> Callable[[], Task]:
    def build() -> Task:
        rng = random.Random(f"castlens:{name}")  # fixed seed per task: the same task on every machine
        seen: set[str] = set()
        pairs: list[Example] = []
        for _ in range(100 * (n_train + n_test)):
            x, y = make(rng)
            if x not in seen:
                seen.add(x)
                pairs.append(Example(x, y))
            if len(pairs) == n_train + n_test:
                break
        else:
            raise TaskError(f"built-in task {name!r}: could not generate {n_train + n_test} distinct inputs")
        return Task(name=name, kind="generation", train=pairs[:n_train], test=pairs[n_train:],
                    instruction=instruction, description=description or instruction, source="builtin")

    return build


def _words(rng: random.Random, k: int) -> list[str]:
    return rng.sample(_WORDS, k)


BUILTIN_TASKS: dict[str, Callable[[], Task]] = {
    "uppercase": _builtin("uppercase", "Write the word in capital letters.",
                          lambda r: (w := r.choice(_WORDS) + r.choice(["", "s", "y"]), w.upper()),
                          n_train=100, n_test=50),
    "first_item": _builtin("first_item", "Give the first item of the list.",
                           lambda r: (", ".join(ws := _words(r, r.randint(3, 5))), ws[0])),
    "last_item": _builtin("last_item", "Give the last item of the list.",
                          lambda r: (", ".join(ws := _words(r, r.randint(3, 5))), ws[-1])),
    "next_number": _builtin("next_number", "Give the number that comes next.",
                            lambda r: (str(n := r.randint(0, 998)), str(n + 1))),
    "add": _builtin("add", "Add the two numbers.",
                    lambda r: (f"{(a := r.randint(0, 49))} + {(b := r.randint(0, 49))}", str(a + b))),
    "reverse_word": _builtin("reverse_word", "Write the word backwards.",
                             lambda r: (w := r.choice(_WORDS), w[::-1]), n_train=30, n_test=20),
    "plural": _builtin("plural", "Give the plural of the noun.",
                       lambda r: (w := r.choice(_WORDS), _plural(w)), n_train=30, n_test=20),
    "antonym": _builtin("antonym", "Give the opposite of the word.",
                        lambda r: r.choice(_ANTONYMS + tuple((b, a) for a, b in _ANTONYMS)), n_train=50, n_test=22),
}
