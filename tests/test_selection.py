import pytest

from castlens.selection import select
from castlens.tasks import load_task


def test_random_selection_is_round_robin_seeded_and_respects_exclusions():
    tasks = [load_task("plural"), load_task("antonym"), load_task("add")]
    a = select("random", tasks, 7, seed=3)
    assert [t for t, _ in a] == ["plural", "antonym", "add"] * 2 + ["plural"]
    assert a == select("random", tasks, 7, seed=3)
    assert a != select("random", tasks, 7, seed=4)
    assert len({(t, e.input) for t, e in a}) == 7
    banned = {e.input for e in tasks[0].train[:25]}
    b = select("random", tasks, 30, seed=3, exclude={"plural": banned})
    assert not [e for t, e in b if t == "plural" and e.input in banned]
    # a small task runs out; the others fill the remaining places
    c = select("random", tasks, 120, seed=0)
    assert sum(t == "plural" for t, _ in c) == 30 and len(c) == 120


def test_selection_bad_input():
    with pytest.raises(ValueError, match="unknown selection method"):
        select("magic", [load_task("plural")], 3)
    with pytest.raises(ValueError, match="asked for"):
        select("random", [load_task("plural")], 31)
