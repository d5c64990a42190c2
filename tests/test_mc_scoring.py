"""Option-text multiple-choice scoring (``--mc-scoring text``): prompts, options, acc/acc_norm and calibration,
each checked against a computation written out here (every prompt scored alone in full text)."""

import dataclasses
import json

import pytest
import torch

from castlens.evaluation import option_logprobs
from castlens.experiments.protocol import CONTENT_FREE, ProtocolConfig, calibrated_zero_shot, prepare, prompted
from castlens.tasks import Example, TaskError, load_task, with_mc_scoring

CFG = ProtocolConfig(dev=4, shots=2, limit=6, mc_scoring="text")


def _full_text_scores(tiny, target, examples):
    """Each item alone: instruction (none here) + rendered query, its option texts as continuations."""
    prompts = [target.fmt.render(e, False) for e in examples]
    return option_logprobs(tiny, prompts, [list(e.choices) for e in examples], batch_size=1)


def test_text_scoring_writes_answers_as_option_texts_on_the_same_items():
    task = load_task("sciq")
    text = with_mc_scoring(task, "text")
    ex = text.train[0]
    from castlens.prompts import default_format

    fmt = default_format(text)
    gold_text = ex.choices[task.labels.index(ex.output)]
    assert fmt.render(ex, True) == ex.input + "\nAnswer: " + gold_text
    assert fmt.instruction is None and default_format(task).instruction.startswith("Answer with one of: A, B")
    assert default_format(task).render(ex, True).endswith("Answer: " + ex.output)
    assert [e.output for e in text.test] == [e.output for e in task.test]  # labels, strata, gold: unchanged
    sst2 = load_task("sst2")
    assert with_mc_scoring(sst2, "text") is sst2  # no option texts: its labels are its answers' text already


def test_prepared_text_items_are_the_choices_and_the_zero_shot_scores_match_full_prompts(tiny):
    letter = prepare(tiny, load_task("sciq"), dataclasses.replace(CFG, mc_scoring="letter"))
    target = prepare(tiny, load_task("sciq"), CFG)
    assert [e.input for e in target.test.examples] == [e.input for e in letter.test.examples]
    assert target.test.gold == letter.test.gold
    tok = tiny.tokenizer
    for ex, opts, g in zip(target.test.examples, target.test.options, target.test.gold):
        assert [tok.decode(o) for o in opts] == [" " + c for c in ex.choices]
        assert ex.choices[g] == ex.choices["ABCD".index(ex.output)]
    got = prompted(tiny, target.zero_prefix, target.test)
    manual = _full_text_scores(tiny, target, target.test.examples)
    assert got.pred == manual.argmax(-1).tolist()
    chars = torch.tensor([[len(" " + c) for c in e.choices] for e in target.test.examples], dtype=manual.dtype)
    norm_pred = (manual / chars).argmax(-1).tolist()
    assert got.correct_norm == [int(p == g) for p, g in zip(norm_pred, target.test.gold)]
    assert got.accuracy_norm == pytest.approx(sum(got.correct_norm) / len(got.correct_norm))
    assert letter.test.option_chars is None and prompted(tiny, letter.zero_prefix, letter.test).correct_norm is None


def test_text_calibration_divides_out_each_items_own_content_free_prior(tiny):
    target = prepare(tiny, load_task("sciq"), CFG)
    got = calibrated_zero_shot(tiny, target)["calibrated_zero_shot"]
    want = []
    for e in target.test.examples:
        cf = [Example(x, e.output, e.choices) for x in CONTENT_FREE]
        prior = torch.softmax(_full_text_scores(tiny, target, cf), -1).mean(0)
        own = torch.log_softmax(_full_text_scores(tiny, target, [e])[0], -1)
        want.append(int((own - prior.log()).argmax()))
    assert got.pred == want
    assert got.correct_norm is None  # calibrated scores are not log-probabilities to divide by length


def test_text_scoring_refuses_an_item_without_the_text_of_its_answer():
    task = load_task("sciq")
    bad = dataclasses.replace(task, test=[*task.test[:3], Example("Question: x?\nA. a\nB. b", "C", ("a", "b"))])
    with pytest.raises(TaskError, match=r"'sciq', test\[3\].*option 'C'.*2 choices"):
        with_mc_scoring(bad, "text")
    with pytest.raises(ValueError, match="unknown multiple-choice scoring 'words'"):
        with_mc_scoring(task, "words")


def test_transfer_with_text_scoring_reports_acc_norm_and_records_the_mode(tmp_path, tiny):
    from castlens.experiments.transfer import TransferConfig, run_transfer

    cfg = TransferConfig(model="tiny-llama", sources=("first_item", "uppercase"), targets=("sciq",), n=4, shots=1,
                         dev=4, limit=8, layers=(1,), strengths=(1.0,), n_boot=50, mc_scoring="text")
    run_transfer(tiny, cfg, tmp_path / "t", png=False, log=lambda s: None)
    md = (tmp_path / "t" / "results.md").read_text()
    assert "scored by option text" in md and "| acc_norm |" in md
    assert json.loads((tmp_path / "t" / "config.json").read_text())["mc_scoring"] == "text"
    part = json.loads((tmp_path / "t" / "parts" / "sciq.part.json").read_text())
    assert len(part["methods"]["zero_shot"]["correct_norm"]) == 8
    assert "correct_norm" not in part["methods"]["calibrated_zero_shot"]
