import pytest

from castlens.prompts import PromptFormat, contrastive_pairs, cross_task_prompt, default_format, few_shot_prompt
from castlens.tasks import Example, TaskError, load_task


def test_formats_and_shared_ending():
    fmt = PromptFormat(instruction="Do it.", verbalizers={"1": "one"})
    q, demos = Example("q", "1"), [Example("d1", "1"), Example("d2", "0")]
    assert few_shot_prompt(q, demos, fmt) == "Do it.\n\nd1\nAnswer: one\n\nd2\nAnswer: 0\n\nq\nAnswer:"
    src = PromptFormat(instruction="Source.")
    assert cross_task_prompt(q, demos[:1], src, fmt) == "Source.\n\nd1\nAnswer: 1\n\nDo it.\n\nq\nAnswer:"
    assert default_format(load_task("sst2")).instruction == "Answer with one of: negative, positive."


def test_pairs_never_show_the_query_and_are_seeded():
    task = load_task("antonym")
    pairs = contrastive_pairs(task, n=20, k=5, seed=3)
    for p in pairs:
        assert p.few.endswith(p.zero.split("\n\n")[-1])  # same query block at the end
        demo_inputs = [b.split("\nAnswer:")[0] for b in p.few.split("\n\n")[1:-1]]
        assert len(demo_inputs) == 5 and p.query not in demo_inputs
    assert pairs == contrastive_pairs(task, n=20, k=5, seed=3)
    assert pairs != contrastive_pairs(task, n=20, k=5, seed=4)
    fixed = contrastive_pairs(task, n=10, k=3, seed=0, fixed_demos=True)
    assert len({p.few.split("\n\n", 1)[1].rsplit("\n\n", 1)[0] for p in fixed}) == 1


def test_too_many_queries_or_demos():
    task = load_task("plural")
    with pytest.raises(TaskError, match="queries asked for"):
        contrastive_pairs(task, n=31, k=2)
    with pytest.raises(TaskError, match="demonstrations asked for"):
        contrastive_pairs(task, n=2, k=40)
    with pytest.raises(TaskError, match="train split is empty"):
        contrastive_pairs(load_task("medmcqa"), n=2, k=2)
