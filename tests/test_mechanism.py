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
