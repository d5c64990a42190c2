"""Vectors that travel: llama.cpp control-vector GGUF files, repeng and steering-vectors.

A castlens :class:`~castlens.vectors.SteeringVector` holds ``v[L]`` for every decoder block ``L`` (0-based), the
vector that :func:`castlens.steering.steering` adds to ``blocks.{L}.hook_resid_post``, the *output* of block
``L``. This module writes and reads the same directions in three other tools' terms, with no layer shifted.

llama.cpp control vectors (``llama-cli --control-vector FILE``)
---------------------------------------------------------------
A control vector is a GGUF file whose metadata says ``general.architecture = "controlvector"`` and whose tensors
are 1-D float32 arrays of ``n_embd`` values named ``direction.N``. What ``N`` means is settled by llama.cpp's
source, read here from the copy vendored in the PyPI sdist ``llama-cpp-python==0.3.36`` (llama.cpp 0.5.0-dev)
and checked against ``ggml-org/llama.cpp`` (``src/llama-adapter.cpp`` at commit 0650ea8c, same code):

1. ``common/common.cpp:1887`` ``common_control_vector_load_one``: a tensor ``direction.N`` needs ``N >= 1``
   (``N == 0`` is refused, line 1925: "invalid (zero) direction tensor layer index"), must be F32 and 1-D, and
   is summed into a flat buffer at offset ``n_embd * (N - 1)`` (line 1954: ``// layer 1 at [0]``).
2. ``src/llama-adapter.cpp:67``: ``tensors.push_back(nullptr); // there's never a tensor for layer 0``, and
   ``llama_adapter_cvec::apply`` (lines 126-132) fills ``tensors[il]`` from buffer offset ``n_embd * (il - 1)``
   for ``il = 1 .. n_layer - 1``. The two ``- 1`` cancel: ``direction.N`` lands in ``tensors[N]``.
   ``include/llama.h:734-735`` says the same: the buffer holds ``n_embd x n_layers`` "starting from layer 1".
3. ``src/models/llama.cpp:126`` loops ``for (int il = 0; il < n_layer; ++il)`` and, at lines 220-223, after the
   block's second residual add (``cur = ggml_add(ctx0, cur, ffn_inp)``), calls ``cur = build_cvec(cur, il)``,
   i.e. ``llama_adapter_cvec::apply_to`` (``src/llama-adapter.cpp:24``) adds ``tensors[il]`` to the output of
   block ``il`` (0-based), the tensor llama.cpp calls ``l_out``, before it becomes the next block's input.
4. ``common/common.cpp:1368-1369``: without ``--control-vector-layer-range`` the range is ``1 .. n_layer``.

So **llama.cpp ``direction.N`` is castlens ``blocks.{N}.hook_resid_post``, the same number**, for
``N = 1 .. n_layers - 1``. castlens' block 0 has no llama.cpp counterpart: :func:`export_gguf` refuses it when
asked for and leaves it out by default. (llama.cpp's own ``llama-cvector-generator`` reads ``l_out`` of block
``il`` but names it ``direction.{il + 1}``, ``tools/cvector-generator/pca.hpp:305``, so its vectors are applied
one block later than where they were measured; castlens imports any file where llama.cpp *applies* it.)

This reading was also checked by running it: ``llama-eval-callback`` from the same source, on SmolLM2-135M
(30 blocks), with a file from :func:`export_gguf` holding only ``direction.N`` = 0.25 everywhere. For N = 1, 7
and 29, the first ``l_out`` tensor that changed was ``l_out-N``, by exactly 0.25 per value (``l_out-(N-1)``
stayed the same), and a file holding ``direction.0`` was refused. Also, the ``l_out-K`` sums matched castlens'
``blocks.{K}.hook_resid_post`` on the same tokens to within quantization error, and not ``K - 1`` or ``K + 1``.

The metadata keys follow repeng's ``ControlVector.export_gguf`` (``repeng/extract.py``, vgel/repeng 0.4.0 and
main at 0ba7196): ``controlvector.model_hint`` (a string) and ``controlvector.layer_count`` (uint32, the number of
direction tensors). llama.cpp reads neither. castlens adds ``castlens.*`` keys (provenance JSON, the exported
layers, the strength baked in) that other readers ignore.

repeng and steering-vectors
---------------------------
Both key their directions by the 0-based index of the Hugging Face decoder layer whose *output* they steer,
which is castlens' index too (castlens runs on raw, unprocessed weights, so ``blocks.{L}.hook_resid_post``
equals that layer's output):

* repeng ``ControlVector.directions: dict[int, np.ndarray]``: ``ControlModel`` wraps ``model_layer_list(model)
  [layer_id]`` (``model.layers`` for Llama) in a ``ControlModule`` whose ``forward`` adds the control to the
  wrapped block's output (``repeng/control.py``, ``ControlModule.forward``); training reads
  ``hidden_states[layer + 1]``, the output of layer ``layer`` (``repeng/extract.py``, ``batched_get_hiddens``).
  Its own ``export_gguf`` writes ``direction.{layer}`` with that index, consistent with the mapping above.
  (One repeng quirk, not a numbering question: for the last layer, ``hidden_states[n_layers]`` is the output
  *after* the final norm in transformers, so a repeng vector trained there was read post-norm but is applied,
  by repeng as by llama.cpp and castlens, before it.)
* steering-vectors ``SteeringVector.layer_activations: dict[int, Tensor]`` with ``layer_type="decoder_block"``:
  ``patch_activations`` registers a forward hook that adds the vector to the output of the module
  ``model.layers.{num}`` (the guessed ``decoder_block`` matcher; ``steering_vectors/steering_vector.py`` and
  ``layer_matching.py``, steering-vectors 0.12.2). Other ``layer_type`` values (``mlp``, ``self_attn`` ...)
  steer something other than the residual stream and are refused by :func:`from_steering_vectors`.

Both packages are optional and imported only by the function that needs them.

Example::

    from castlens.export import export_gguf, import_gguf
    export_gguf(vector, "antonym.gguf", layers=[6], strength=4.0)   # llama-cli ... --control-vector antonym.gguf
    back = import_gguf("antonym.gguf", n_layers=30, d_model=576)     # zero except block 6
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from castlens.activations import HOOK
from castlens.vectors import SteeringVector, VectorFileError

if TYPE_CHECKING:  # optional packages, for type checkers only
    import repeng
    import steering_vectors

__all__ = [
    "export_file",
    "ARCH",
    "ControlVectorFileError",
    "export_gguf",
    "from_repeng",
    "from_steering_vectors",
    "import_gguf",
    "llama_cpp_layers",
    "tensor_name",
    "to_repeng",
    "to_steering_vectors",
]

ARCH = "controlvector"
"""``general.architecture`` of a llama.cpp control-vector file (as llama.cpp's cvector-generator and repeng write)."""

TENSOR_PREFIX = "direction."
FIRST_LLAMA_CPP_LAYER = 1  # llama.cpp never steers block 0 (src/llama-adapter.cpp:67)
MetaValue = str | int | float | list[int]
LAYER_CONVENTION = ("direction.N is added to the output of decoder block N (0-based), llama.cpp l_out N, "
                    "castlens blocks.N.hook_resid_post")


class ControlVectorFileError(VectorFileError):
    """A control-vector GGUF file that cannot be used: the message names the file and the problem."""


# ---------------------------------------------------------------- layer numbering
def tensor_name(layer: int) -> str:
    """The GGUF tensor name llama.cpp adds to the output of castlens block ``layer``: ``direction.{layer}``."""
    return f"{TENSOR_PREFIX}{layer}"


def llama_cpp_layers(n_layers: int) -> list[int]:
    """The castlens blocks a llama.cpp control vector can steer in an ``n_layers``-block model: ``1 .. n-1``."""
    return list(range(FIRST_LLAMA_CPP_LAYER, n_layers))


def _check_layers(layers: Iterable[int], n_layers: int, first: int, what: str) -> list[int]:
    out = [int(x) for x in layers]
    if not out:
        raise ValueError(f"{what}: no layers given")
    if len(set(out)) != len(out):
        raise ValueError(f"{what}: layers {out} repeat a layer")
    if 0 in out and first == FIRST_LLAMA_CPP_LAYER:
        raise ValueError(f"{what}: layer 0 cannot be exported: llama.cpp never steers the output of block 0 "
                         "(common_control_vector_load_one refuses direction.0); use layers 1 .. n_layers-1")
    bad = [x for x in out if not first <= x < n_layers]
    if bad:
        raise ValueError(f"{what}: layers {bad} out of range {first} .. {n_layers - 1} for {n_layers} blocks")
    return sorted(out)


def _directions_of(vector: SteeringVector, what: str) -> Tensor:
    d = vector.directions
    if not isinstance(d, Tensor) or d.ndim != 2:
        raise ValueError(f"{what}: directions must be a [n_layers, d_model] tensor, got "
                         f"{tuple(d.shape) if isinstance(d, Tensor) else type(d).__name__}")
    if not torch.isfinite(d).all():
        raise ValueError(f"{what}: directions have NaN or inf values")
    return d.detach().float().cpu()


# ---------------------------------------------------------------- GGUF export
def export_gguf(vector: SteeringVector, path: str | os.PathLike, layers: int | Sequence[int] | None = None,
                strength: float = 1.0, model_hint: str | None = None) -> Path:
    """Write ``vector`` as a llama.cpp control-vector GGUF file and return its path.

    ``layers``: the castlens blocks to write (``direction.L`` for each ``L``); default every block llama.cpp can
    steer, ``1 .. n_layers-1`` (block 0 is left out). ``strength`` is multiplied in, so llama.cpp's
    ``--control-vector FILE`` steers like ``steering(model, vector, layers, strength)``; ``--control-vector-scaled
    FILE S`` scales it further. ``model_hint`` (default ``vector.model``) fills ``controlvector.model_hint``.

    The file is written under a temporary name in the same folder and renamed, so a failed export leaves no
    partial file (and an existing file at ``path`` untouched).
    """
    what = f"export of vector {getattr(vector, 'task', '?')!r} to {path}"
    directions = _directions_of(vector, what)
    n_layers = directions.shape[0]
    chosen = llama_cpp_layers(n_layers) if layers is None else \
        _check_layers([layers] if isinstance(layers, int) else layers, n_layers, FIRST_LLAMA_CPP_LAYER, what)
    if not chosen:
        raise ValueError(f"{what}: a {n_layers}-block model has no layer llama.cpp can steer (it skips block 0)")
    if not math.isfinite(strength):
        raise ValueError(f"{what}: strength must be finite, got {strength}")
    tensors = {tensor_name(L): (strength * directions[L]).numpy().astype(np.float32) for L in chosen}
    meta: dict[str, MetaValue] = {
        f"{ARCH}.model_hint": model_hint if model_hint is not None else str(vector.model),
        f"{ARCH}.layer_count": len(tensors),  # as repeng writes it (uint32): the number of direction tensors
        "castlens.vector": json.dumps(vector.metadata(), ensure_ascii=False),
        "castlens.layers": chosen,
        "castlens.strength": float(strength),
        "castlens.layer_convention": LAYER_CONVENTION,
    }
    return _write_gguf_atomic(Path(path), tensors, meta)


def export_file(vectors: str | os.PathLike, out: str | os.PathLike, vector: str | None = None,
                layers: Sequence[int] | None = None, strength: float = 1.0, model_hint: str | None = None
                ) -> tuple[Path, str, list[int]]:
    """:func:`export_gguf` of one vector of a castlens vector file (``vector``: its key; may be left out when the
    file holds one). Returns the written path, the key and the llama.cpp blocks written."""
    from castlens.vectors import load_vectors

    found = load_vectors(vectors)
    if vector is None and len(found) > 1:
        raise ValueError(f"{vectors} holds {len(found)} vectors ({', '.join(found)}); choose one with --vector")
    key = vector or next(iter(found))
    if key not in found:
        raise ValueError(f"{vectors} has no vector {key!r} (it has: {', '.join(found)})")
    path = export_gguf(found[key], out, layers=layers, strength=strength, model_hint=model_hint)
    return path, key, list(layers) if layers else llama_cpp_layers(found[key].n_layers)


def _add_metadata(writer: Any, key: str, value: MetaValue) -> None:
    if isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float64(key, value)
    else:
        writer.add_array(key, list(value))


def _write_gguf_atomic(path: Path, tensors: Mapping[str, np.ndarray], meta: Mapping[str, MetaValue]) -> Path:
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    writer = gguf.GGUFWriter(tmp, ARCH)  # writes general.architecture = "controlvector"
    try:
        for key, value in meta.items():
            _add_metadata(writer, key, value)
        for name, array in tensors.items():
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------- GGUF import
def import_gguf(path: str | os.PathLike, n_layers: int, d_model: int, *, model: str | None = None,
                task: str | None = None, scale: float = 1.0) -> SteeringVector:
    """Read a llama.cpp control-vector GGUF file into a ``[n_layers, d_model]`` :class:`SteeringVector`.

    ``direction.N`` becomes block ``N`` (see the module docstring); blocks absent from the file are zero, and
    several tensors for one block are summed, as llama.cpp does. ``scale`` multiplies everything (like
    ``--control-vector-scaled``); a strength baked in at export is *not* undone. The file is checked the way
    llama.cpp's loader checks it (names ``direction.N`` with ``N >= 1``, F32, 1-D, one width), plus the model's
    width and depth. Provenance written by :func:`export_gguf` is restored; ``model``/``task`` override it.
    """
    path = Path(path)
    reader = _open_reader(path)
    _check_architecture(reader, path)
    directions = _read_directions(reader, path, n_layers, d_model) * scale
    meta = _castlens_metadata(reader, path)
    hint = _string_field(reader, f"{ARCH}.model_hint", path)
    fields = {k: v for k, v in meta.get("vector", {}).items() if k in SteeringVector.__dataclass_fields__
              and k not in ("directions", "samples")}
    fields.setdefault("model", hint or "unknown")
    fields.setdefault("task", path.stem)
    fields.setdefault("method", f"imported from llama.cpp control vector {path.name}")
    for key in ("n_samples", "shots", "seed"):
        fields.setdefault(key, 0)
    fields.setdefault("position", "unknown")
    if model is not None:
        fields["model"] = model
    if task is not None:
        fields["task"] = task
    return SteeringVector(directions=directions, **fields)


def _open_reader(path: Path) -> Any:
    import gguf

    if not path.is_file():
        raise ControlVectorFileError(f"{path}: file not found")
    try:
        return gguf.GGUFReader(path)
    except Exception as err:  # noqa: BLE001 - a bad file raises ValueError, IndexError, struct/numpy errors ...
        raise ControlVectorFileError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err})") from None


def _string_field(reader: Any, key: str, path: Path) -> str | None:
    field = reader.get_field(key)
    if field is None:
        return None
    try:
        value = field.contents()
    except Exception as err:  # noqa: BLE001 - corrupt string bytes
        raise ControlVectorFileError(f"{path}: metadata {key!r} cannot be read ({err})") from None
    if not isinstance(value, str):
        raise ControlVectorFileError(f"{path}: metadata {key!r} should be a string, got {value!r}")
    return value


def _check_architecture(reader: Any, path: Path) -> None:
    arch = _string_field(reader, "general.architecture", path)
    if arch is not None and arch != ARCH:
        raise ControlVectorFileError(f"{path}: not a control vector: general.architecture is {arch!r}, "
                                     f"expected {ARCH!r}")


def _layer_of(name: str, path: Path) -> int:
    index = name[len(TENSOR_PREFIX):] if name.startswith(TENSOR_PREFIX) else ""
    if not index.isdigit():
        raise ControlVectorFileError(f"{path}: not a control vector: tensor {name!r} is not named direction.N")
    if int(index) < FIRST_LLAMA_CPP_LAYER:
        raise ControlVectorFileError(f"{path}: tensor {name!r}: llama.cpp refuses layer index 0 (it never steers "
                                     "block 0)")
    return int(index)


def _read_directions(reader: Any, path: Path, n_layers: int, d_model: int) -> Tensor:
    from gguf import GGMLQuantizationType

    if not reader.tensors:
        raise ControlVectorFileError(f"{path}: not a control vector: it holds no direction tensors")
    out = torch.zeros(n_layers, d_model)
    for t in reader.tensors:
        layer = _layer_of(t.name, path)
        if t.tensor_type != GGMLQuantizationType.F32:
            raise ControlVectorFileError(f"{path}: tensor {t.name!r} is {t.tensor_type.name}, llama.cpp needs F32")
        if len(t.shape) != 1:
            raise ControlVectorFileError(f"{path}: tensor {t.name!r} has shape {list(t.shape)}, llama.cpp needs 1-D")
        if int(t.n_elements) != d_model:
            raise ControlVectorFileError(f"{path}: tensor {t.name!r} has {int(t.n_elements)} values, the model's "
                                         f"d_model is {d_model}")
        if layer >= n_layers:
            raise ControlVectorFileError(f"{path}: tensor {t.name!r} is for block {layer}, the model has only "
                                         f"{n_layers} blocks (0 .. {n_layers - 1})")
        try:
            values = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(d_model))
        except Exception as err:  # noqa: BLE001 - truncated data
            raise ControlVectorFileError(f"{path}: tensor {t.name!r} cannot be read ({err})") from None
        if not torch.isfinite(values).all():
            raise ControlVectorFileError(f"{path}: tensor {t.name!r} has NaN or inf values")
        out[layer] += values  # llama.cpp sums several directions for one layer
    return out


def _castlens_metadata(reader: Any, path: Path) -> dict:
    """The provenance :func:`export_gguf` wrote (``{}`` for files from other tools), with a ``method`` that
    says which blocks and strength the file holds."""
    raw = _string_field(reader, "castlens.vector", path)
    if raw is None:
        return {}
    try:
        vector = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ControlVectorFileError(f"{path}: metadata 'castlens.vector' is not valid JSON ({err})") from None
    if not isinstance(vector, dict):
        raise ControlVectorFileError(f"{path}: metadata 'castlens.vector' is not a JSON object")
    layers, strength = reader.get_field("castlens.layers"), reader.get_field("castlens.strength")
    if layers is not None and strength is not None:
        vector["method"] = (f"{vector.get('method', 'unknown')} (via llama.cpp GGUF {path.name}: blocks "
                            f"{layers.contents()}, strength {strength.contents():g})")
    return {"vector": vector}


# ---------------------------------------------------------------- repeng and steering-vectors
def _require(module: str, package: str, for_what: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{for_what} needs the package {package} (pip install {package}): {err}") from None


def _import_repeng() -> Any:
    """Import repeng; 0.4.0 names ``np.float_`` (gone in NumPy 2) in annotations evaluated at import only."""
    shim = not hasattr(np, "float_")
    if shim:
        setattr(np, "float_", np.float64)
    try:
        return _require("repeng", "repeng", "to_repeng")
    finally:
        if shim:
            delattr(np, "float_")


def _per_layer(vector: SteeringVector, layers: int | Sequence[int] | None, what: str) -> dict[int, Tensor]:
    d = _directions_of(vector, what)
    chosen = range(d.shape[0]) if layers is None else \
        _check_layers([layers] if isinstance(layers, int) else layers, d.shape[0], 0, what)
    return {int(L): d[L].clone() for L in chosen}


def _from_layer_dict(directions: Mapping[int, Any], n_layers: int, model: str, task: str, method: str,
                     what: str) -> SteeringVector:
    if not directions:
        raise ValueError(f"{what}: no directions")
    rows = {}
    for key, value in directions.items():
        layer = int(key) + n_layers if int(key) < 0 else int(key)  # both libraries accept negative indices
        if not 0 <= layer < n_layers:
            raise ValueError(f"{what}: layer {key} out of range for {n_layers} blocks")
        row = value.detach().float().cpu().reshape(-1) if isinstance(value, Tensor) else \
            torch.as_tensor(np.asarray(value, dtype=np.float32)).reshape(-1)
        if layer in rows:
            raise ValueError(f"{what}: layer {key} given twice (as {layer})")
        rows[layer] = row
    widths = {r.shape[0] for r in rows.values()}
    if len(widths) != 1:
        raise ValueError(f"{what}: directions have different widths {sorted(widths)}")
    out = torch.zeros(n_layers, widths.pop())
    for layer, row in rows.items():
        out[layer] = row
    if not torch.isfinite(out).all():
        raise ValueError(f"{what}: directions have NaN or inf values")
    return SteeringVector(directions=out, model=model, task=task, n_samples=0, shots=0, seed=0, method=method,
                          hook=HOOK, position="unknown")


def to_repeng(vector: SteeringVector, layers: int | Sequence[int] | None = None,
              model_type: str | None = None) -> repeng.ControlVector:
    """A repeng ``ControlVector`` with ``directions[L] = vector.directions[L]`` (float32 numpy) for ``layers``
    (default every block); ``model_type`` defaults to ``vector.model``. Needs the package repeng."""
    rp = _import_repeng()
    dirs = {L: t.numpy().astype(np.float32) for L, t in _per_layer(vector, layers, "to_repeng").items()}
    return rp.ControlVector(model_type=model_type if model_type is not None else str(vector.model),
                            directions=dirs)


def from_repeng(control: Any, n_layers: int, *, model: str | None = None, task: str = "repeng") -> SteeringVector:
    """A castlens vector from a repeng ``ControlVector`` (anything with ``directions: dict[int, array]`` and
    optionally ``model_type``); blocks it lacks are zero. repeng itself is not imported."""
    directions = getattr(control, "directions", None)
    if not isinstance(directions, Mapping):
        raise TypeError(f"from_repeng: expected a repeng ControlVector, got {type(control).__name__}")
    return _from_layer_dict(directions, n_layers, model or str(getattr(control, "model_type", "unknown")), task,
                            "imported from repeng ControlVector", "from_repeng")


def to_steering_vectors(vector: SteeringVector,
                        layers: int | Sequence[int] | None = None) -> steering_vectors.SteeringVector:
    """A steering-vectors ``SteeringVector`` (``layer_type="decoder_block"``) with ``layer_activations[L] =
    vector.directions[L]`` for ``layers`` (default every block). Needs the package steering-vectors."""
    sv = _require("steering_vectors", "steering-vectors", "to_steering_vectors")
    return sv.SteeringVector(layer_activations=_per_layer(vector, layers, "to_steering_vectors"),
                             layer_type="decoder_block")


def from_steering_vectors(vector: Any, n_layers: int, *, model: str = "unknown",
                          task: str = "steering-vectors") -> SteeringVector:
    """A castlens vector from a steering-vectors ``SteeringVector`` with ``layer_type="decoder_block"`` (its
    ``layer_activations`` keyed by decoder layer); blocks it lacks are zero. steering-vectors is not imported."""
    acts = getattr(vector, "layer_activations", None)
    if not isinstance(acts, Mapping):
        raise TypeError(f"from_steering_vectors: expected a steering_vectors SteeringVector, got "
                        f"{type(vector).__name__}")
    layer_type = getattr(vector, "layer_type", "decoder_block")
    if layer_type != "decoder_block":
        raise ValueError(f"from_steering_vectors: layer_type {layer_type!r} steers the {layer_type} output, not "
                         "the residual stream after a block; only 'decoder_block' maps to castlens")
    return _from_layer_dict(acts, n_layers, model, task, "imported from steering-vectors SteeringVector",
                            "from_steering_vectors")
