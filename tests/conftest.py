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


TINY_MODELS = ["tiny-llama", "tiny-gemma3"]  # full attention; sliding window of 16 on 3 of 4 layers


@pytest.fixture(scope="session")
def tiny_gemma3():
    from castlens.models import load_model

    return load_model("tiny-gemma3", device="cpu")


@pytest.fixture(scope="session", params=TINY_MODELS)
def tiny_any(request):
    """Each random test model in turn (one bridge per model for the session): tests that must hold for full
    and for sliding-window attention alike take this instead of ``tiny``."""
    return request.getfixturevalue("tiny" if request.param == "tiny-llama" else "tiny_gemma3")


def plain_hf(model):
    """An unwrapped copy of a tiny bridge's weights (same name, same seed), for independent references."""
    from castlens.models import load_hf, model_name

    return load_hf(model_name(model))[0]


@pytest.fixture(scope="session")
def smollm2():
    from castlens.models import load_model

    return load_model("smollm2-135m-instruct", device="cpu")


@pytest.fixture(scope="session")
def gemma3():
    from castlens.models import load_model

    return load_model("gemma-3-270m", device="cpu")


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
