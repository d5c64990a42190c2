import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    from castlens.models import load_model

    return load_model("tiny-llama", device="cpu")


@pytest.fixture(scope="session")
def smollm2():
    from castlens.models import load_model

    return load_model("smollm2-135m-instruct", device="cpu")


def hf_last_token_states(hf_model, ids: list[int]) -> torch.Tensor:
    """Independent reference: the output of every plain Hugging Face decoder layer at the last token of one
    unpadded prompt, read with torch forward hooks (no TransformerLens involved). Shape [n_layers, d_model]."""
    outs = []

    def grab(module, inputs, output):
        outs.append((output[0] if isinstance(output, tuple) else output)[0, -1].float())

    handles = [layer.register_forward_hook(grab) for layer in hf_model.model.layers]
    try:
        with torch.no_grad():
            hf_model.model(torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return torch.stack(outs)
