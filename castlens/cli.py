"""The ``castlens`` command. It only calls the library; every number it prints comes from there.

    castlens tasks                                   list the built-in and collection tasks
    castlens vectors --model M --tasks a,b --n N --shots K --out FILE
    castlens demo --out DIR                          the main job on the embedded default model
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from castlens.tasks import BUILTIN_TASKS, TaskError


def _task_list(s: str) -> list[str]:
    names = [t.strip() for t in s.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no task names given")
    return names


def _vectors_resumable(model, tasks: list[str], n: int, shots: int, seed: int, out: Path, chat: bool,
                       batch_size: int, data_dir: str | None):
    """Compute one vector per task, keeping each finished task in ``<out>.parts/`` so a killed run resumes."""
    from castlens.models import model_name
    from castlens.vectors import VectorFileError, load_vectors, save_vectors, task_vector

    parts = out.with_name(out.name + ".parts")
    want = {"model": model_name(model), "n_samples": n, "shots": shots, "seed": seed, "chat": chat}
    vectors = {}
    for i, name in enumerate(tasks, 1):
        part = parts / name
        try:
            (v,) = load_vectors(part, model).values()
            if all(getattr(v, k) == val for k, val in want.items()):
                print(f"[{i}/{len(tasks)}] {name}: reusing the finished part {part}.safetensors", flush=True)
                vectors[name] = v
                continue
        except VectorFileError:
            pass
        t0 = time.perf_counter()
        v = task_vector(model, name, n, shots, seed=seed, chat=chat, batch_size=batch_size, data_dir=data_dir,
                        progress=True)
        save_vectors(part, v)
        print(f"[{i}/{len(tasks)}] {name}: {n} pairs in {time.perf_counter() - t0:.1f}s", flush=True)
        vectors[name] = v
    return vectors, parts


def cmd_vectors(a: argparse.Namespace) -> int:
    from castlens.models import load_model
    from castlens.tasks import load_task
    from castlens.vectors import save_vectors

    for name in a.tasks:  # fail on a bad task name before loading the model
        load_task(name, a.data_dir)
    model = load_model(a.model, device=a.device, dtype=a.dtype)
    out = Path(a.out)
    vectors, parts = _vectors_resumable(model, a.tasks, a.n, a.shots, a.seed, out, a.chat, a.batch_size,
                                        a.data_dir)
    path = save_vectors(out, vectors)
    shutil.rmtree(parts, ignore_errors=True)
    print(f"wrote {len(vectors)} vectors [{model.cfg.n_layers} layers x {model.cfg.d_model}] to {path} "
          f"(+ {path.with_suffix('.json').name})")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    import torch

    from castlens.models import load_model
    from castlens.vectors import save_vectors

    t0 = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = list(BUILTIN_TASKS)
    print(f"castlens demo: {a.model}, built-in tasks {', '.join(tasks)}; {a.n} queries x {a.shots} shots each")
    model = load_model(a.model)
    vectors, parts = _vectors_resumable(model, tasks, a.n, a.shots, a.seed, out / "vectors.safetensors", False,
                                        16, None)
    path = save_vectors(out / "vectors.safetensors", vectors)
    shutil.rmtree(parts, ignore_errors=True)

    stack = torch.stack([v.directions for v in vectors.values()]).double()  # [task, layer, d]
    unit = stack / stack.norm(dim=-1, keepdim=True)
    cos = torch.einsum("tld,sld->lts", unit, unit)
    k = len(tasks)
    off = (cos.sum((1, 2)) - k) / (k * (k - 1))
    rows = ["layer,mean_cross_task_cosine"] + [f"{layer},{c:.4f}" for layer, c in enumerate(off.tolist())]
    (out / "cross_task_cosine.csv").write_text("\n".join(rows) + "\n")
    best = int(off.argmax())
    print(f"\nmean cosine between the {k} task vectors (few-shot minus zero-shot, last token), by layer:")
    print("  " + " ".join(f"L{layer}:{c:.2f}" for layer, c in enumerate(off.tolist())))
    print(f"highest at layer {best}: {off[best]:.3f} (random directions in d={model.cfg.d_model}: about "
          f"+-{1 / model.cfg.d_model ** 0.5:.3f})")
    print(f"\nwrote {path} (+ .json with every prompt pair) and {out / 'cross_task_cosine.csv'}")
    print(f"demo finished in {time.perf_counter() - t0:.0f}s")
    return 0


def cmd_tasks(a: argparse.Namespace) -> int:
    from castlens.tasks import list_tasks

    print("\n".join(list_tasks(a.data_dir)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from castlens.models import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="castlens", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", default=DEFAULT_MODEL, help=f"castlens or Hugging Face model name "
                        f"(default {DEFAULT_MODEL})")
        sp.add_argument("--data-dir", default=None, help="task collection (default: $CASTLENS_DATA or "
                        "../shared/data)")
        sp.add_argument("--seed", type=int, default=0)

    v = sub.add_parser("vectors", help="few-shot minus zero-shot vectors, one per task, into one file")
    common(v)
    v.add_argument("--tasks", type=_task_list, required=True, help="comma-separated task names")
    v.add_argument("--n", type=int, default=32, help="queries per task")
    v.add_argument("--shots", type=int, default=5, help="demonstrations per few-shot prompt")
    v.add_argument("--out", required=True, help="output file (.safetensors; a .json is written beside it)")
    v.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    v.add_argument("--batch-size", type=int, default=16)
    v.add_argument("--device", default=None)
    v.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16", "float16"])
    v.set_defaults(func=cmd_vectors)

    d = sub.add_parser("demo", help="vectors and cross-task cosines for the built-in tasks")
    common(d)
    d.add_argument("--out", default="outputs/demo")
    d.add_argument("--n", type=int, default=24)
    d.add_argument("--shots", type=int, default=5)
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("tasks", help="list the available tasks")
    t.add_argument("--data-dir", default=None)
    t.set_defaults(func=cmd_tasks)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (TaskError, ValueError) as err:  # bad input: one clear line, no traceback
        print(f"castlens {args.cmd}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
