"""Analyze and vectors: the two runs that produce vectors rather than test them.

* :func:`run_analysis`: the parallel-direction analysis (:mod:`castlens.analysis`) into a folder. The model work
  (per-sample differences of the signal and both controls) is kept in ``vectors.safetensors`` and reused by a
  rerun with the same tasks, ``n``, ``shots`` and seed; any vector file with per-sample tensors can be analysed
  instead (``vectors=``), without controls if it has none.
* :func:`run_vectors`: one few-minus-zero-shot vector per task into one file; each finished task is kept in
  ``<out>.parts/`` so a killed run resumes, and an existing output is refused unless ``overwrite``.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from castlens.analysis import Collected, collect_task, load_part, merge, save_part, summarize, write_report
from castlens.distributed import world
from castlens.models import model_name
from castlens.tasks import load_task
from castlens.vectors import SteeringVector, VectorFileError, load_vectors, save_vectors, task_vector

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["run_analysis", "run_vectors", "check_vector_run", "AnalysisResult"]


@dataclass(frozen=True)
class AnalysisResult:
    summary: dict
    files: list[Path]


def run_analysis(load: Callable[[], TransformerBridge], model: str, tasks: Sequence[str], n: int, shots: int,
                 out: str | Path, seed: int = 0, png: bool | None = None, n_boot: int = 1000,
                 data_dir: str | None = None, vectors: str | Path | None = None) -> AnalysisResult:
    """The analysis into ``out``; ``load()`` gives the model and is called only if model work is needed."""
    out, w = Path(out), world()
    vec_file = out / "vectors.safetensors"
    if vectors:
        data = Collected.from_vectors(load_vectors(vectors))
    elif vec_file.exists() and (out / "vectors.json").exists():  # resume: the model work is already done
        data = Collected.from_vectors(load_vectors(vec_file))
        if (data.model, sorted(data.tasks), data.n, data.shots, data.seed) != (model, sorted(tasks), n, shots, seed):
            raise ValueError(f"{vec_file} holds a different run ({data.model}, {len(data.tasks)} tasks, n={data.n}, "
                             f"shots={data.shots}); use another --out or delete it")
        print(f"reusing {vec_file} (delete it to recompute)")
    else:
        for name in tasks:
            load_task(name, data_dir)
        data = _collect(load, model, tasks, n, shots, seed, data_dir, out / "parts")
        if w.main:
            save_vectors(vec_file, data.to_vectors())
            shutil.rmtree(out / "parts", ignore_errors=True)
    if not w.main:  # one rank writes the report
        return AnalysisResult({}, [])
    summary = summarize(data, n_boot=n_boot, seed=seed)  # may refuse (fewer than 2 tasks): before any figure
    return AnalysisResult(summary, write_report(data, summary, out, png=png))


def _collect(load: Callable[[], TransformerBridge], model: str, tasks: Sequence[str], n: int, shots: int, seed: int,
             data_dir: str | None, parts: Path) -> Collected:
    """The model work, one part per task in ``parts`` (a killed run keeps its finished tasks; in a multi-process
    launch each rank collects its share), merged in ``tasks`` order."""
    w = world()
    want = (model, n, shots, seed)

    def finished(name: str) -> bool:
        path = parts / f"{name}.safetensors"
        if not path.exists():
            return False
        c = load_part(path)
        return (c.model, c.n, c.shots, c.seed) == want

    todo = [t for t in tasks if not finished(t)]
    w.barrier()  # every rank has listed the unfinished tasks before any rank writes one
    mine = w.mine(todo)
    bridge = load() if mine else None
    for i, name in enumerate(mine, 1):
        t0 = time.perf_counter()
        save_part(collect_task(bridge, name, n, shots, seed=seed, data_dir=data_dir), parts / f"{name}.safetensors")
        print(f"[{i}/{len(mine)}] {name}: {4 * n} prompts in {time.perf_counter() - t0:.1f}s", flush=True)
    w.barrier()  # every part is on disk
    data = merge([load_part(parts / f"{name}.safetensors") for name in tasks])
    w.barrier()  # every rank has read the parts before rank 0 removes them
    return data


def check_vector_run(n: int, shots: int, out: str | Path, overwrite: bool = False) -> None:
    """Refuse what would write a meaningless or unwanted file: no queries, no demonstrations (a few-shot prompt
    equal to the zero-shot one gives an all-zero vector), an existing output without ``overwrite``."""
    if n < 1 or shots < 1:
        raise ValueError(f"--n and --shots must be at least 1 (got n={n}, shots={shots}): with no demonstrations "
                         "the few-shot prompt is the zero-shot prompt and the vector is zero")
    st = vector_path(out)
    if st.exists() and not overwrite:
        raise ValueError(f"{st} exists; pass --overwrite to replace it (or choose another --out)")


def run_vectors(model: TransformerBridge, tasks: Sequence[str], n: int, shots: int, out: str | Path, seed: int = 0,
                chat: bool = False, batch_size: int = 16, data_dir: str | None = None, truncate_demos: bool = False,
                overwrite: bool = False, log: Callable[[str], None] = print) -> tuple[Path, dict[str, SteeringVector]]:
    """One vector per task into ``out`` (see the module docstring); returns the file and the vectors. In a
    multi-process launch each rank computes its share of the unfinished tasks and rank 0 writes the file."""
    out, w = Path(out), world()
    check_vector_run(n, shots, out, overwrite)
    parts = out.with_name(out.name + ".parts")
    want = {"model": model_name(model), "n_samples": n, "shots": shots, "seed": seed, "chat": chat}

    def finished(name: str) -> SteeringVector | None:
        try:
            (v,) = load_vectors(parts / name, model).values()
        except VectorFileError:
            return None
        return v if all(getattr(v, k) == val for k, val in want.items()) else None

    kept = {name: v for name in tasks if (v := finished(name)) is not None}
    for name in kept:
        log(f"{name}: reusing the finished part {parts / name}.safetensors")
    todo = [name for name in tasks if name not in kept]
    w.barrier()  # every rank has listed the unfinished tasks before any rank writes one
    mine = w.mine(todo)
    for i, name in enumerate(mine, 1):
        t0 = time.perf_counter()
        v = task_vector(model, name, n, shots, seed=seed, chat=chat, batch_size=batch_size, data_dir=data_dir,
                        truncate_demos=truncate_demos, progress=True)
        save_vectors(parts / name, v)
        log(f"[{i}/{len(mine)}] {name}: {n} pairs in {time.perf_counter() - t0:.1f}s")
    w.barrier()  # every part is on disk

    def read(name: str) -> SteeringVector:
        v = kept.get(name) or finished(name)
        if v is None:
            raise VectorFileError(f"the part of {name!r} in {parts} was not written or cannot be read")
        return v

    vectors = {name: read(name) for name in tasks}
    w.barrier()  # every rank has read the parts before rank 0 removes them
    if not w.main:
        return vector_path(out), vectors
    path = save_vectors(out, vectors)
    shutil.rmtree(parts, ignore_errors=True)
    return path, vectors


def vector_path(out: str | Path) -> Path:
    """The safetensors file that ``--out`` names (``.safetensors`` added unless given)."""
    out = Path(out)
    return out if out.suffix == ".safetensors" else out.with_name(out.name + ".safetensors")
