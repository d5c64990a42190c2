"""Bad input to the library (issue #14): each case is refused with a message that says what is wrong and what to
do, before any forward pass where the check can be made up front; the now-accepted inputs give the right result."""

import pickle
import random

import pytest
import torch

from castlens.activations import PromptTooLongError, check_lengths, last_token_resid, prompt_ends
from castlens.evaluation import option_logprobs
from castlens.prompts import PromptFormat, contrastive_pairs, fit_demonstrations, sample_demos
from castlens.steering import generate, steering
from castlens.tasks import Example, Task, TaskError, TaskInfo, load_task, task_info, task_infos

V = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def forwards(tiny):
    """How many forward passes the model ran (a pre-hook on the embedding, the first module of every pass)."""
    calls = []
    handle = tiny.embed.register_forward_pre_hook(lambda *_: calls.append(1))
    yield calls
    handle.remove()


# ---------------------------------------------------------------- strengths and layers (item 3)
@pytest.mark.parametrize("strength", [float("nan"), float("inf"), -float("inf"), torch.tensor(float("nan"))])
def test_non_finite_strength_is_refused_before_any_forward(tiny, forwards, strength):
    with pytest.raises(ValueError, match="strength must be a finite number, got (nan|inf|-inf)"):
        with steering(tiny, V, layers=1, strength=strength):
            tiny(torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="strength must be a finite number"):
        generate(tiny, [1, 2, 3], 4, V, layers=1, strength=strength)
    assert forwards == []
    with pytest.raises(ValueError, match="strength must be a finite number, got 'strong'"):
        with steering(tiny, V, layers=1, strength="strong"):
            pass


@pytest.mark.parametrize("layers", [4, -1, [0, 7], []])
def test_out_of_range_layers_name_the_valid_range(tiny, forwards, layers):
    with pytest.raises(ValueError, match=r"out of range: layers must be in 0\.\.3 \(the model has 4 layers\)"):
        with steering(tiny, V, layers=layers):
            pass
    with pytest.raises(ValueError, match=r"layers must be in 0\.\.3"):
        generate(tiny, [1, 2, 3], 4, V, layers=layers)
    assert forwards == []


def test_non_integer_layers_and_bad_attention_are_refused(tiny):
    with pytest.raises(ValueError, match=r"steering layers must be integers in 0\.\.3, got 1\.5"):
        with steering(tiny, V, layers=1.5):
            pass
    with pytest.raises(ValueError, match=r"attention must be one of \('auto', 'sdpa', 'eager'\), got 'flash'"):
        with steering(tiny, V, layers=1, attention="flash"):
            pass


def test_bad_positions_tensors_are_refused(tiny):
    with pytest.raises(ValueError, match="1-D integer tensor"):
        with steering(tiny, V, layers=1, positions=torch.tensor([1.0])):
            pass
    with pytest.raises(ValueError, match="non-negative"):
        with steering(tiny, V, layers=1, positions=torch.tensor([-1])):
            pass
    with steering(tiny, V, layers=1, positions=torch.tensor([5])):
        with pytest.raises(ValueError, match="positions index 5 is past the end of a forward pass of 3 positions"):
            tiny(torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        with prompt_ends(torch.tensor([[1]])):
            pass


# ---------------------------------------------------------------- generate's prompt (item 4)
def test_generate_accepts_lists_and_one_row_tensors(tiny):
    prompt = list(range(20, 32))
    want = generate(tiny, prompt, 5, V * 3, 1, 2.0)
    assert generate(tiny, torch.tensor(prompt), 5, V * 3, 1, 2.0) == want
    assert generate(tiny, torch.tensor([prompt]), 5, V * 3, 1, 2.0) == want
    assert generate(tiny, [prompt], 5, V * 3, 1, 2.0) == want
    assert generate(tiny, tuple(prompt), 5, V * 3, 1, 2.0) == want
    assert generate(tiny, prompt, 0) == []


def test_generate_refuses_bad_prompts_before_any_forward(tiny, forwards):
    with pytest.raises(ValueError, match=r"one prompt; got a batch of 2 rows \(shape \[2, 3\]; call it once per row"):
        generate(tiny, torch.tensor([[1, 2, 3], [4, 5, 6]]), 4)
    with pytest.raises(ValueError, match="one prompt; got a batch of 2 rows"):
        generate(tiny, [[1, 2], [3, 4]], 4)
    with pytest.raises(ValueError, match="integer token ids, got a torch.float32 tensor"):
        generate(tiny, torch.tensor([1.0, 2.0]), 4)
    with pytest.raises(ValueError, match=r"must be \[pos\] or \[1, pos\], got shape \[1, 1, 2\]"):
        generate(tiny, torch.tensor([[[1, 2]]]), 4)
    with pytest.raises(ValueError, match="not text: tokenize it first"):
        generate(tiny, "hello", 4)
    with pytest.raises(ValueError, match=r"prompt_ids \[259\] are not token ids of this model \(0\.\.258\)"):
        generate(tiny, [1, 259], 4)
    for empty in ([], torch.tensor([], dtype=torch.long)):
        with pytest.raises(ValueError, match="empty prompt"):
            generate(tiny, empty, 4)
    with pytest.raises(ValueError, match="max_new_tokens must be 0 or more, got -1"):
        generate(tiny, [1, 2], -1)
    with pytest.raises(PromptTooLongError, match="600 tokens, more than the model's context of 512"):
        generate(tiny, [1] * 600, 1)
    assert forwards == []


# ---------------------------------------------------------------- PromptTooLongError (item 5)
def test_prompt_too_long_names_the_task_and_blames_the_demonstrations_only_when_they_are_the_cause(tiny):
    with pytest.raises(PromptTooLongError) as err:
        check_lengths(tiny, [[1] * 10, [1] * 600], task="sst2", query_lengths=[5, 100])
    msg = str(err.value)
    assert msg.startswith("task 'sst2': prompt 1 has 600 tokens, more than the model's context of 512, because of "
                          "its demonstrations (without them it has 100)") and "fewer or shorter demonstrations" in msg
    assert (err.value.task, err.value.index, err.value.n_tokens, err.value.query_tokens) == ("sst2", 1, 600, 100)
    assert str(pickle.loads(pickle.dumps(err.value))) == msg  # survives a trip to a worker process
    with pytest.raises(PromptTooLongError) as err:
        check_lengths(tiny, [[1] * 700], task="sst2", query_lengths=[530])
    msg = str(err.value)
    assert msg.startswith("task 'sst2': prompt 0: the query itself is 18 tokens over the model's limit of 512")
    assert "fewer" not in msg and "no number of demonstrations makes it fit" in msg
    with pytest.raises(PromptTooLongError, match="^task 'long': prompt 1 has 60. tokens, more than the model's "
                                                 "context of 512: shorten it"):
        last_token_resid(tiny, ["ok", "y" * 600], task="long")


def test_option_logprobs_names_the_prompt_not_the_option_row(tiny):
    """Rows are (prompt, option) pairs; the error names the prompt index (1 here, not row 2 or 3)."""
    with pytest.raises(PromptTooLongError, match="^task 'qa': prompt 1 has 6.. tokens, more than the model's "
                                                 "context of 512"):
        option_logprobs(tiny, ["short", "y" * 600], [["a", "b"], ["a", "bb"]], task="qa")


# ---------------------------------------------------------------- --truncate-demos (item 6)
DEMOS = [Example(f"d{i} " * 5, f"o{i}") for i in range(4)]  # 26 characters each as text; len() counts characters


def test_fit_demonstrations_refuses_when_no_demonstration_fits():
    fmt = PromptFormat(instruction="I")
    # the zero-shot prompt "I\n\nq\nAnswer:" has 12 characters; each demonstration adds 28 (40, 68, 96, 124)
    with pytest.raises(TaskError, match=r"^task 'toy', query 'q': not one of the 4 demonstrations fits in the "
                                        r"30-token context .* the steering vector would be zero"):
        fit_demonstrations(Example("q", ""), DEMOS, fmt, len, 30, task="toy")
    with pytest.raises(TaskError, match=r"^task 'toy', query 'qqq.*': the zero-shot prompt alone has 111 tokens, "
                                        r"51 over the limit of 60 \(the query itself is too long"):
        fit_demonstrations(Example("q" * 100, ""), DEMOS, fmt, len, 60, task="toy")


def test_fit_demonstrations_keeps_a_configurable_fraction():
    fmt = PromptFormat(instruction="I")
    prompt, kept = fit_demonstrations(Example("q", ""), DEMOS, fmt, len, 60, task="toy")  # default: 1 of 4 is ok
    assert kept == DEMOS[-1:] and len(prompt) <= 60
    with pytest.raises(TaskError, match=r"^task 'toy', query 'q': only 1 of the 4 demonstrations fit in the "
                                        r"60-token context \(at least 2 required, min_fraction=0.5\)"):
        fit_demonstrations(Example("q", ""), DEMOS, fmt, len, 60, task="toy", min_fraction=0.5)
    prompt, kept = fit_demonstrations(Example("q", ""), DEMOS, fmt, len, 80, task="toy", min_fraction=0.5)
    assert kept == DEMOS[-2:] and len(prompt) == 68
    with pytest.raises(ValueError, match=r"min_fraction must be in \[0, 1\], got 2"):
        fit_demonstrations(Example("q", ""), DEMOS, fmt, len, 100, min_fraction=2)


# ---------------------------------------------------------------- identical or empty inputs (item 7)
def _task(inputs, name="same"):
    exs = [Example(x, "y") for x in inputs]
    return Task(name, "generation", train=exs, test=exs[:3])


def test_identical_inputs_say_why_no_demonstration_is_available():
    with pytest.raises(TaskError, match=r"^task 'same': 3 demonstrations asked for, only 0 available: all 12 train "
                                        r"inputs are identical to the query's input 'hello' \(a demonstration never "
                                        r"repeats its query's input\)"):
        contrastive_pairs(_task(["hello"] * 12), n=2, k=3)


def test_empty_inputs_say_why_no_demonstration_is_available():
    with pytest.raises(TaskError, match=r"^task 'blank': 3 demonstrations asked for, only 0 available: all 12 train "
                                        r"inputs are empty, like the query's"):
        contrastive_pairs(_task([""] * 12, "blank"), n=2, k=3)


def test_fixed_demonstrations_and_partial_overlap_say_why():
    with pytest.raises(TaskError, match=r"^task 'same': 2 queries asked for, the train split has 0 usable: 12 of "
                                        r"its 12 inputs are the input of a fixed demonstration \(all 12 train inputs "
                                        r"are identical: 'hello'\)"):
        contrastive_pairs(_task(["hello"] * 12), n=2, k=3, fixed_demos=True)
    pool = [Example("a", "y")] * 3 + [Example("b", "y")]
    with pytest.raises(TaskError, match=r"2 demonstrations asked for, only 1 available: 3 of the 4 train inputs "
                                        r"equal the query's input and are left out"):
        sample_demos(pool, 2, random.Random(0), exclude=Example("a", ""), task="mix")
    with pytest.raises(TaskError, match=r"5 demonstrations asked for, only 4 available: the train split has 4 "
                                        r"examples$"):
        sample_demos(pool, 5, random.Random(0), task="mix")


def test_sampling_is_unchanged_where_it_worked():
    """The messages changed, not the draws: committed prompt records stay reproducible."""
    pool = [Example(str(i), "y") for i in range(30)]
    got = sample_demos(pool, 5, random.Random("s"), exclude=pool[3], task="t")
    want = random.Random("s").sample([e for e in pool if e.input != "3"], 5)
    assert got == want


# ---------------------------------------------------------------- task summaries (item 8)
def test_task_info_gives_kind_label_count_and_split_sizes():
    sst2 = load_task("sst2")
    info = task_info("sst2")
    assert isinstance(info, TaskInfo)
    assert (info.name, info.kind, info.n_labels, info.n_train, info.n_test) == \
        ("sst2", "classification", len(sst2.labels), len(sst2.train), len(sst2.test))
    assert task_info(load_task("antonym")) == TaskInfo("antonym", "generation", None, 50, 22, "en", "builtin")
    with pytest.raises(AttributeError):
        info.kind = "generation"  # frozen
    infos = task_infos()
    assert [i.name for i in infos[:3]] == ["uppercase", "first_item", "last_item"]
    assert sum(i.kind == "classification" for i in infos) > 0 and len({i.name for i in infos}) == len(infos)
