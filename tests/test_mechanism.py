import torch

from conftest import hf_last_token_states

import castlens
from castlens.models import tiny_hf_model
from castlens.mechanism import component_contributions, difference_attribution


def test_llama_components_sum_to_difference():
    model = castlens.load_model("tiny-llama")
    few, zero = [[5, 6, 7, 8, 9]], [[3, 9]]
    diff = difference_attribution(model, few, zero, 2)
    ref = tiny_hf_model(seed=0)  # independent: the plain Hugging Face decoder layers' outputs
    want = hf_last_token_states(ref, few[0])[2] - hf_last_token_states(ref, zero[0])[2]
    assert torch.allclose(diff.total()[0], want, atol=1e-5)
    # one head by hand: its hook_z at the last token through its slice of the plain model's o_proj
    _, cache = model.run_with_cache(torch.tensor(few))
    dh = model.cfg.d_model // model.cfg.n_heads
    z = cache["blocks.1.attn.hook_z"][0, -1, 2]
    head = ref.model.layers[1].self_attn.o_proj.weight[:, 2 * dh:3 * dh] @ z
    c = component_contributions(model, few, 2)
    assert torch.allclose(c.values[0, c.labels.index("L1H2")], head, atol=1e-5)
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
