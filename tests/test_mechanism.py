import torch

import castlens
from castlens.mechanism import component_contributions, difference_attribution


def test_llama_components_sum_to_difference():
    model = castlens.load_model("tiny-llama")
    few, zero = [[5, 6, 7, 8, 9]], [[3, 9]]
    diff = difference_attribution(model, few, zero, 2)
    hs = []
    for ids in (few[0], zero[0]):
        _, cache = model.run_with_cache(torch.tensor([ids]))
        hs.append(cache["blocks.2.hook_resid_post"][0, -1])
    assert torch.allclose(diff.total()[0], hs[0] - hs[1], atol=1e-5)
    assert diff.values[0, 0].abs().max() == 0  # same last token, same embedding
    c = component_contributions(model, few, 0)
    assert c.labels[1] == "L0H0"


def test_planted_head_ranks_first():
    from castlens.mechanism import project
    model = castlens.load_model("tiny-llama")
    d = torch.zeros(model.cfg.d_model)
    d[7] = 1.0
    o = model.blocks[1].attn.o.original_component  # nn.Linear(n_heads*d_head -> d_model), weight [d_model, in]
    dh = model.cfg.d_head
    with torch.no_grad():
        o.weight[:, 2 * dh:3 * dh] = 0
        o.weight[7, 2 * dh:3 * dh] = 50.0
    c = difference_attribution(model, [[5, 6, 7, 8, 9]], [[3, 4]], 1)
    scores = project(c, d)[0].abs()
    assert c.labels[int(scores.argmax())] == "L1H2"
