"""Prompts: zero-shot, few-shot and cross-task few-shot text for a task. Knows no model.

A prompt is plain text; the chat template, if any, is applied when the text is tokenized
(:func:`castlens.activations.tokenize`). Layout, with ``fmt`` a :class:`PromptFormat`::

    zero-shot   = [instruction] + query
    few-shot    = [instruction] + k demonstrations + query
    cross-task  = [source instruction] + k source demonstrations + [target instruction] + target query

each block separated by ``fmt.separator``; a demonstration is ``input\\nAnswer: output`` and the query ends at
``\\nAnswer:``, so the zero- and few-shot prompts of one query end with the same tokens (CAST Sec. 3 reads the
last token). Demonstrations are drawn with a seeded RNG and never include the query itself.

Two controls replace the demonstrations of a few-shot prompt, keeping instruction and query:

* ``filler``: unrelated text with the same token count as the demonstrations (a longer context, no examples);
* ``shuffled``: the same demonstrations with their answers shuffled (format without the input-label mapping).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from castlens.files import as_json
from castlens.tasks import Example, Task, TaskError


@dataclass(frozen=True)
class PromptFormat:
    """How one task's examples become text. ``verbalizers`` maps a label to the text the model should produce."""

    instruction: str | None = None
    input_template: str = "{input}"
    answer_prefix: str = "Answer:"
    separator: str = "\n\n"
    verbalizers: dict[str, str] = field(default_factory=dict)
    choice_labels: tuple[str, ...] = ()   # set: an item's answer is its option text, choices[labels.index(output)]

    def verbalize(self, label: str) -> str:
        return self.verbalizers.get(label, label)

    def answer(self, ex: Example) -> str:
        """The text of ``ex``'s answer: its verbalised label, or (option-text scoring) its option's text."""
        if not self.choice_labels:
            return self.verbalize(ex.output)
        i = self.choice_labels.index(ex.output)
        if ex.choices is None or i >= len(ex.choices):
            raise TaskError(f"the answer {ex.output!r} of item {ex.input[:60]!r} has no option text")
        return ex.choices[i]

    def render(self, ex: Example, with_answer: bool) -> str:
        text = self.input_template.format(input=ex.input) + "\n" + self.answer_prefix
        return text + " " + self.answer(ex) if with_answer else text

    def to_dict(self) -> dict:
        """Plain JSON types (``choice_labels`` as a list), so a saved format compares equal to a loaded one."""
        return as_json(asdict(self))


def default_format(task: Task) -> PromptFormat:
    """The task's own instruction, else for classification a list of the allowed answers; a task scored by option
    text (:func:`castlens.tasks.with_mc_scoring`) answers with the option's text and has no default instruction
    (the item lists its options; lm-evaluation-harness's prompts have none either)."""
    instruction = task.instruction
    if task.mc_scoring == "text" and task.multiple_choice:
        assert task.labels is not None
        return PromptFormat(instruction=instruction, choice_labels=task.labels)
    if instruction is None and task.kind == "classification" and task.labels:
        instruction = "Answer with one of: " + ", ".join(task.labels) + "."
    return PromptFormat(instruction=instruction)


def _join(fmt: PromptFormat, blocks: list[str | None]) -> str:
    return fmt.separator.join(b for b in blocks if b)


def zero_shot_prompt(query: Example, fmt: PromptFormat) -> str:
    return _join(fmt, [fmt.instruction, fmt.render(query, False)])


def few_shot_prompt(query: Example, demos: list[Example], fmt: PromptFormat) -> str:
    return _join(fmt, [fmt.instruction, *(fmt.render(d, True) for d in demos), fmt.render(query, False)])


def cross_task_blocks(demos: Sequence[tuple[Example, PromptFormat]], target_fmt: PromptFormat) -> list[str | None]:
    """The blocks before a cross-task query (Chatterjee et al. 2024): each source demonstration rendered with
    its answer in its own task's format, then the target's instruction. Joined by the target's separator and
    followed by the query they make the cross-task ICL prompt; castlens' runners hand them, as a shared prefix,
    to :func:`castlens.vectors.prefix_ids`."""
    return [*(fmt.render(d, True) for d, fmt in demos), target_fmt.instruction]


def cross_task_prompt(query: Example, demos: list[Example], source_fmt: PromptFormat,
                      target_fmt: PromptFormat) -> str:
    """One source task's instruction and demonstrations, then the target instruction and query."""
    return _join(target_fmt, [source_fmt.instruction, *cross_task_blocks([(d, source_fmt) for d in demos],
                                                                         target_fmt), target_fmt.render(query, False)])


def fit_demonstrations(query: Example, demos: list[Example], fmt: PromptFormat, n_tokens, limit: int,
                       task: str | None = None, min_fraction: float = 0.25) -> tuple[str, list[Example]]:
    """The few-shot prompt with as many of the *last* demonstrations as fit in ``limit`` tokens: left truncation,
    the earliest demonstrations are dropped first; instruction and query are never cut. ``n_tokens(str) -> int``
    counts tokens (this module knows no model). Returns the prompt and the demonstrations kept.

    Raises :class:`TaskError` (naming ``task`` and the query) when the zero-shot prompt alone is too long, and
    when too few demonstrations fit: fewer than one (a prompt with none would make a zero steering vector, its
    "few-shot" side being the zero-shot prompt itself), or fewer than ``min_fraction`` of those given (rounded
    up). The default 0.25 lets 1 of 4 through; raise it (0.5: keep at least half) to refuse heavier cuts."""
    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in [0, 1], got {min_fraction}")
    where = (f"task {task!r}, " if task else "") + f"query {query.input[:60]!r}"
    zero = n_tokens(few_shot_prompt(query, [], fmt))
    if zero > limit:
        raise TaskError(f"{where}: the zero-shot prompt alone has {zero} tokens, {zero - limit} over the limit of "
                        f"{limit} (the query itself is too long; no number of demonstrations fits)")
    if not demos:
        return few_shot_prompt(query, [], fmt), []
    need = max(1, math.ceil(min_fraction * len(demos) - 1e-9))
    for k in range(len(demos), 0, -1):
        kept = demos[len(demos) - k:]
        prompt = few_shot_prompt(query, kept, fmt)
        if n_tokens(prompt) <= limit:
            break
    else:
        one = n_tokens(few_shot_prompt(query, demos[-1:], fmt))
        raise TaskError(f"{where}: not one of the {len(demos)} demonstrations fits in the {limit}-token context "
                        f"beside the query (the zero-shot prompt has {zero} tokens, with the last demonstration "
                        f"{one}); with none the few-shot prompt would equal the zero-shot one and the steering "
                        "vector would be zero. Use shorter demonstrations or a model with a longer context")
    if k < need:
        raise TaskError(f"{where}: only {k} of the {len(demos)} demonstrations fit in the {limit}-token context "
                        f"(at least {need} required, min_fraction={min_fraction}); use shorter or fewer "
                        "demonstrations, or a lower min_fraction")
    return prompt, kept


def _sameness(examples: list[Example], split: str) -> str:
    """Why a pool of examples offers so few distinct inputs: ``" (all 12 train inputs are empty)"`` etc."""
    inputs = {e.input for e in examples}
    if len(examples) > 1 and inputs == {""}:
        return f" (all {len(examples)} {split} inputs are empty)"
    if len(examples) > 1 and len(inputs) == 1:
        return f" (all {len(examples)} {split} inputs are identical: {next(iter(inputs))[:60]!r})"
    return ""


def sample_demos(pool: list[Example], k: int, rng: random.Random, exclude: Example | None = None,
                 task: str = "?", split: str = "train") -> list[Example]:
    """``k`` distinct demonstrations from ``pool`` (the ``split`` split, for messages); never one whose input
    equals ``exclude``'s input. Too few candidates is an error that says why (e.g. every input equals the
    query's)."""
    candidates = [e for e in pool if exclude is None or e.input != exclude.input]
    if k > len(candidates):
        raise TaskError(f"task {task!r}: {k} demonstrations asked for, only {len(candidates)} available"
                        + _why_too_few(pool, len(candidates), exclude, split))
    return rng.sample(candidates, k)


def _why_too_few(pool: list[Example], n_candidates: int, exclude: Example | None, split: str) -> str:
    n, left_out = len(pool), len(pool) - n_candidates
    if exclude is not None and left_out == n and n:
        what = "are empty, like the query's" if exclude.input == "" else \
            f"are identical to the query's input {exclude.input[:60]!r}"
        return f": all {n} {split} inputs {what} (a demonstration never repeats its query's input)"
    if left_out:
        return (f": {left_out} of the {n} {split} inputs equal the query's input and are left out"
                + _sameness(pool, split))
    return f": the {split} split has {n} examples" + _sameness(pool, split)


@dataclass(frozen=True)
class PromptPair:
    """The zero- and few-shot prompt of one query, as the exact text given to the tokenizer (before any chat
    template), with the demonstrations used."""

    task: str
    query: str
    zero: str
    few: str
    demos: tuple[Example, ...] = ()


def contrastive_pairs(task: Task, n: int, k: int, seed: int = 0, split: str = "train",
                      fmt: PromptFormat | None = None, fixed_demos: bool = False, demo_split: str = "train"
                      ) -> list[PromptPair]:
    """``n`` queries from ``split`` with their zero-shot and ``k``-shot prompts (demos from ``demo_split``).

    ``fixed_demos=True`` uses one demonstration set for every query (then no query is one of the demos).
    """
    fmt = fmt or default_format(task)
    if n < 1 or k < 0:
        raise TaskError(f"task {task.name!r}: need n >= 1 and k >= 0, got n={n}, k={k}")
    rng = random.Random(f"{seed}:{task.name}:{split}:{n}:{k}")
    full = pool = task.split(split)
    train = task.split(demo_split) if k else []
    shared = sample_demos(train, k, rng, task=task.name, split=demo_split) if fixed_demos else None
    if shared is not None:
        banned = {d.input for d in shared}
        pool = [e for e in pool if e.input not in banned]
    if n > len(pool):
        why = f": {len(full) - len(pool)} of its {len(full)} inputs are the input of a fixed demonstration" \
            if len(pool) < len(full) else ""
        raise TaskError(f"task {task.name!r}: {n} queries asked for, the {split} split has {len(pool)} usable"
                        + why + _sameness(full, split))
    pairs = []
    for q in rng.sample(pool, n):
        demos = shared if shared is not None else sample_demos(train, k, rng, exclude=q, task=task.name,
                                                               split=demo_split)
        pairs.append(PromptPair(task.name, q.input, zero_shot_prompt(q, fmt), few_shot_prompt(q, demos, fmt),
                                tuple(demos)))
    return pairs


# ---------------------------------------------------------------- controls
FILLER_TEXT = (
    "The river runs slowly through the valley in late summer, and the fields on either side turn from green to "
    "gold. Farmers bring in the hay before the rain, and the roads fill with carts. In the evening the light "
    "falls low across the hills, the swallows gather on the wires, and the village square grows quiet. Old "
    "stone walls divide the pastures, and sheep move between them in small groups. A bell rings from the "
    "church tower on the hour. Far to the north the mountains keep a little snow even in August, and the air "
    "that comes down from them is cool at night. Travellers stop at the inn by the bridge, where the windows "
    "look out over the water and the garden is full of roses. "
)


def _fmt_blocks(fmt: PromptFormat, middle: list[str], query: str) -> str:
    return _join(fmt, [fmt.instruction, *middle, fmt.render(Example(query, ""), False)])


def shuffled_label_prompt(pair: PromptPair, fmt: PromptFormat, seed: int = 0,
                          labels: tuple[str, ...] | None = None) -> str:
    """The few-shot prompt with its demonstrations' answers shuffled: drawn at random from ``labels`` for a
    classification task, else permuted among the demonstrations (no demo keeps its answer when avoidable)."""
    rng = random.Random(f"{seed}:shuffle:{pair.task}:{pair.query}")
    outs = [d.output for d in pair.demos]
    if labels:
        new = [rng.choice(labels) for _ in outs]
    else:
        new = outs[:]
        for _ in range(20):
            rng.shuffle(new)
            if len(new) < 2 or all(a != b for a, b in zip(new, outs)):
                break
    demos = [Example(d.input, o) for d, o in zip(pair.demos, new)]
    return _fmt_blocks(fmt, [fmt.render(d, True) for d in demos], pair.query)


def filler_prompt(pair: PromptPair, fmt: PromptFormat, n_tokens, text: str = FILLER_TEXT) -> str:
    """The few-shot prompt with its demonstrations replaced by unrelated text of the same token count.

    ``n_tokens(str) -> int`` counts tokens (the model's tokenizer; this module knows no model). The filler is
    the longest prefix of ``text`` (repeated as needed), cut at a word, whose token count does not exceed that
    of the demonstration block."""
    demo_block = _join(fmt, [fmt.render(d, True) for d in pair.demos])
    target = n_tokens(demo_block)
    words = (text * (1 + 4 * target // max(1, len(text.split())))).split()
    lo, hi = 0, len(words)
    while lo < hi:  # the most words whose text fits in `target` tokens
        mid = (lo + hi + 1) // 2
        if n_tokens(" ".join(words[:mid])) <= target:
            lo = mid
        else:
            hi = mid - 1
    return _fmt_blocks(fmt, [" ".join(words[:lo])], pair.query)
