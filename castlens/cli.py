"""The ``castlens`` command. It only calls the library; every number it prints comes from there.

    castlens tasks                                   list the built-in and collection tasks
    castlens vectors --model M --tasks a,b --n N --shots K --out FILE
    castlens analyze --model M --tasks a,b,c --n N --shots K --out DIR   parallel-direction analysis
    castlens transfer --model M --sources a,b --targets x,y --n N --shots K --out DIR   CAST vs baselines
    castlens compose --library FILES --targets x,y --examples 12 --out DIR   Steer2Adapt
    castlens selection-study --sources a,b --targets x,y --out DIR   selection ablation and sample scaling
    castlens demo --out DIR                          the main job on the embedded default model
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from castlens.tasks import BUILTIN_TASKS, TaskError, load_task


def _task_list(s: str) -> list[str]:
    names = [t.strip() for t in s.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no task names given")
    return names


def _vectors_resumable(model, tasks: list[str], n: int, shots: int, seed: int, out: Path, chat: bool,
                       batch_size: int, data_dir: str | None, truncate_demos: bool = False):
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
                        truncate_demos=truncate_demos,
                        progress=True)
        save_vectors(part, v)
        print(f"[{i}/{len(tasks)}] {name}: {n} pairs in {time.perf_counter() - t0:.1f}s", flush=True)
        vectors[name] = v
    return vectors, parts


def cmd_vectors(a: argparse.Namespace) -> int:
    from castlens.models import load_model
    from castlens.vectors import save_vectors

    for name in a.tasks:  # fail on a bad task name before loading the model
        load_task(name, a.data_dir)
    model = load_model(a.model, device=a.device, dtype=a.dtype)
    out = Path(a.out)
    vectors, parts = _vectors_resumable(model, a.tasks, a.n, a.shots, a.seed, out, a.chat, a.batch_size,
                                        a.data_dir, a.truncate_demos)
    path = save_vectors(out, vectors)
    shutil.rmtree(parts, ignore_errors=True)
    print(f"wrote {len(vectors)} vectors [{model.cfg.n_layers} layers x {model.cfg.d_model}] to {path} "
          f"(+ {path.with_suffix('.json').name})")
    return 0


def _analyze(model_name_: str, tasks: list[str], n: int, shots: int, seed: int, out: Path, png: bool | None,
             n_boot: int, data_dir: str | None, vectors: str | None = None) -> dict:
    from castlens.analysis import Collected, collect, summarize, write_report
    from castlens.vectors import load_vectors, save_vectors

    out.mkdir(parents=True, exist_ok=True)
    vec_file = out / "vectors.safetensors"
    if vectors:
        data = Collected.from_vectors(load_vectors(vectors))
    elif vec_file.exists() and (out / "vectors.json").exists():  # resume: the model work is already done
        data = Collected.from_vectors(load_vectors(vec_file))
        if (data.model, sorted(data.tasks), data.n, data.shots, data.seed) != (model_name_, sorted(tasks), n, shots,
                                                                                seed):
            raise ValueError(f"{vec_file} holds a different run ({data.model}, {len(data.tasks)} tasks, n={data.n}, "
                             f"shots={data.shots}); use another --out or delete it")
        print(f"reusing {vec_file} (delete it to recompute)")
    else:
        from castlens.models import load_model

        for name in tasks:
            load_task(name, data_dir)
        data = collect(load_model(model_name_), tasks, n, shots, seed=seed, data_dir=data_dir)
        save_vectors(vec_file, data.to_vectors())
    summary = summarize(data, n_boot=n_boot, seed=seed)
    files = write_report(data, summary, out, png=png)
    b = summary["best_layer"]
    cc = summary["cross_task_cosine"]
    print(f"\nbest layer {b}: mean cross-task cosine few-shot {cc['few']['mean'][b]:.3f} "
          f"[{cc['few']['lo'][b]:.3f}, {cc['few']['hi'][b]:.3f}], filler control {cc['filler']['mean'][b]:.3f}, "
          f"shuffled-label control {cc['shuffled']['mean'][b]:.3f}, random {summary['random_cosine'][b]:+.3f}")
    print(f"wrote {len(files)} files to {out}/ (summary.md, summary.json, figures as .html"
          f"{' and .png' if any(f.suffix == '.png' for f in files) else ''}, vectors.safetensors)")
    return summary


def cmd_analyze(a: argparse.Namespace) -> int:
    _analyze(a.model, a.tasks, a.n, a.shots, a.seed, Path(a.out), False if a.no_png else None, a.n_boot,
             a.data_dir, a.vectors)
    return 0


DEMO_SOURCES = ("uppercase", "first_item", "next_number")
DEMO_TARGETS = ("last_item", "plural", "antonym")


def cmd_demo(a: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    tasks = list(BUILTIN_TASKS)
    print(f"castlens demo: {a.model}, built-in tasks {', '.join(tasks)}; {a.n} queries x {a.shots} shots each, "
          "with length-matched and shuffled-label controls")
    _analyze(a.model, tasks, a.n, a.shots, a.seed, Path(a.out), False if a.no_png else None, 500, None)
    print(f"\ncastlens demo: transfer from {', '.join(DEMO_SOURCES)} to {', '.join(DEMO_TARGETS)} "
          f"({a.n} source samples, {a.shots} shots)")
    _transfer(a.model, DEMO_SOURCES, DEMO_TARGETS, a.n, a.shots, Path(a.out) / "transfer", dev=24,
              png=False if a.no_png else None, n_boot=500)
    print(f"demo finished in {time.perf_counter() - t0:.0f}s; open {Path(a.out) / 'cosine_by_layer.html'} and "
          f"{Path(a.out) / 'transfer' / 'results.md'}")
    return 0


def _numbers(kind: type, empty: bool = False):
    """An argparse type: comma-separated numbers of ``kind`` (int or float); none only if ``empty``."""
    def parse(s: str) -> tuple:
        try:
            vals = tuple(kind(x) for x in s.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {s!r}") from None
        if not vals and not empty:
            raise argparse.ArgumentTypeError("no numbers given")
        return vals
    return parse


def _transfer(model_name_: str, sources, targets, n, shots, out: Path, dev=64, limit=None, layers=None,
              strengths=(0.5, 1.0, 2.0, 4.0), select="random", seed=0, batch_size=16, png=None, n_boot=1000,
              data_dir=None, pool=200, embedder="model"):
    from castlens.models import load_model, model_name
    from castlens.transfer import TransferConfig, run_transfer

    for name in [*sources, *targets]:  # a bad task name fails before the model loads
        load_task(name, data_dir)
    model = load_model(model_name_)
    cfg = TransferConfig(model=model_name(model), sources=tuple(sources), targets=tuple(targets), n=n, shots=shots,
                         dev=dev, limit=limit, layers=None if layers is None else tuple(layers),
                         strengths=tuple(strengths), select=select, seed=seed, n_boot=n_boot, pool=pool,
                         embedder=embedder)
    t0 = time.perf_counter()
    rows = run_transfer(model, cfg, out, batch_size=batch_size, png=png)
    print(f"transfer finished in {time.perf_counter() - t0:.0f}s; table: {out / 'results.md'}")
    _print_means(rows)
    return rows


def _print_means(rows) -> None:
    """The rows averaged over targets: accuracy, interval and the difference to zero-shot where there is one."""
    for r in rows:
        if r["target"].startswith("mean"):
            d = r.get("delta_zero")
            print(f"  {r['method']:<15} mean accuracy {100 * r['accuracy']:5.1f}% "
                  f"[{100 * r['ci_lo']:.1f}, {100 * r['ci_hi']:.1f}]"
                  + ("" if d is None else f"   vs zero-shot {100 * d:+.1f} pts"
                     f"{' (inside the noise)' if r['delta_zero_noise'] else ''}"))


def cmd_transfer(a: argparse.Namespace) -> int:
    _transfer(a.model, a.sources, a.targets, a.n, a.shots, Path(a.out), a.dev, a.limit, a.layers, a.strengths,
              a.select, a.seed, a.batch_size, False if a.no_png else None, a.n_boot, a.data_dir, a.pool,
              a.embedder)
    return 0


def cmd_compose(a: argparse.Namespace) -> int:
    from castlens.compose import run_compose
    from castlens.models import load_model
    from castlens.vectors import load_vectors

    targets = [load_task(t, a.data_dir) for t in a.targets]
    model = load_model(a.model)
    lib = {}
    for f in a.library:
        lib.update(load_vectors(f, model))
    note = ""
    if a.random_library:
        from castlens.compose import random_library

        lib, note = random_library(lib, a.seed), "control: every library vector replaced by a norm-matched random one"
    t0 = time.perf_counter()
    rows = run_compose(model, lib, targets, Path(a.out), leave_out_family=not a.keep_family, n_boot=a.n_boot, note=note,
                       layer=a.layer, examples=a.examples, kind=a.basis, k=a.k, n_trials=a.trials, seed=a.seed,
                       limit=a.limit, batch_size=a.batch_size, compare_to=a.compare_to)
    print(f"compose finished in {time.perf_counter() - t0:.0f}s; table: {Path(a.out) / 'results.md'}")
    _print_means(rows)
    return 0


def cmd_selection_study(a: argparse.Namespace) -> int:
    from castlens.models import load_model, model_name
    from castlens.source_samples import StudyConfig, run_study

    for t in [*a.sources, *a.targets]:  # a bad task name fails before the model loads
        load_task(t, a.data_dir)
    kw = dict(methods=tuple(a.methods), ablation_n=a.ablation_n, ns=a.ns, scale_methods=tuple(a.scale_methods),
              shots=a.shots, dev=a.dev, limit=a.limit, icl_limit=a.icl_limit or None, strengths=a.strengths,
              pool=a.pool, seed=a.seed, n_boot=a.n_boot, layers=a.layers, embedder=a.embedder)
    StudyConfig(model="", sources=tuple(a.sources), targets=tuple(a.targets), **kw)  # bad options: before loading
    model = load_model(a.model)
    cfg = StudyConfig(model=model_name(model), sources=tuple(a.sources), targets=tuple(a.targets), **kw)
    t0 = time.perf_counter()
    ablation, scaling = run_study(model, cfg, Path(a.out), batch_size=a.batch_size, png=False if a.no_png else None)
    print(f"selection study finished in {time.perf_counter() - t0:.0f}s; tables: {Path(a.out) / 'results.md'}")
    _print_means(ablation)
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
    v.add_argument("--truncate-demos", action="store_true", help="drop the earliest demonstrations of a prompt "
                   "longer than the model's context (default: refuse with an error)")
    v.add_argument("--device", default=None)
    v.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16", "float16"])
    v.set_defaults(func=cmd_vectors)

    an = sub.add_parser("analyze", help="parallel-direction analysis with controls, figures and summary")
    common(an)
    an.add_argument("--tasks", type=_task_list, required=True, help="comma-separated task names")
    an.add_argument("--n", type=int, default=24, help="queries per task")
    an.add_argument("--shots", type=int, default=5)
    an.add_argument("--out", required=True, help="output folder")
    an.add_argument("--vectors", default=None, help="analyze this vector file (with per-sample tensors) instead")
    an.add_argument("--n-boot", type=int, default=1000, help="bootstrap draws")
    an.add_argument("--no-png", action="store_true", help="write HTML figures only (PNG needs Chromium)")
    an.set_defaults(func=cmd_analyze)

    def targets_and_output(sp: argparse.ArgumentParser) -> None:  # shared by transfer and compose
        sp.add_argument("--targets", type=_task_list, required=True, help="comma-separated target tasks")
        sp.add_argument("--limit", type=int, default=None, help="test items per target (default: all)")
        sp.add_argument("--n-boot", type=int, default=1000, help="bootstrap draws")
        sp.add_argument("--out", required=True, help="output folder (an interrupted run resumes in it)")

    def sources_and_sweep(sp: argparse.ArgumentParser, strengths: tuple) -> None:  # transfer, selection-study
        sp.add_argument("--sources", type=_task_list, required=True, help="comma-separated source tasks")
        sp.add_argument("--shots", type=int, default=4, help="demonstrations per few-shot prompt")
        sp.add_argument("--dev", type=int, default=64, help="dev items per target, from its train split")
        sp.add_argument("--layers", type=_numbers(int), default=None,
                        help="layers to sweep (default every n_layers/10-th)")
        sp.add_argument("--strengths", type=_numbers(float), default=strengths, help="strengths to sweep")
        sp.add_argument("--pool", type=int, default=200, help="candidates per source task for graph selection")
        sp.add_argument("--embedder", default="model", choices=["model", "minilm"], help="embeddings for the "
                        "graph search: the model's middle-layer residual stream, or all-MiniLM-L6-v2")
        sp.add_argument("--batch-size", type=int, default=16)
        sp.add_argument("--no-png", action="store_true", help="write HTML figures only (PNG needs Chromium)")

    tr = sub.add_parser("transfer", help="CAST steering against zero-shot, in-task and cross-task ICL on targets")
    common(tr)
    targets_and_output(tr)
    sources_and_sweep(tr, strengths=(0.5, 1.0, 2.0, 4.0))
    tr.add_argument("--n", type=int, default=32, help="source samples behind every vector")
    tr.add_argument("--select", default="random", choices=["random", "cast", "relevance", "diversity"],
                    help="source-sample selection: random (shared by all targets) or a graph search per target")
    tr.set_defaults(func=cmd_transfer)

    c = sub.add_parser("compose", help="Steer2Adapt: adapt to targets with a combination of library vectors")
    common(c)
    targets_and_output(c)
    c.add_argument("--library", type=_task_list, required=True, help="comma-separated vector files")
    c.add_argument("--examples", type=int, default=12, help="labelled target examples for the search")
    c.add_argument("--layer", type=int, default=None, help="steering layer (default: the middle one)")
    c.add_argument("--basis", default="raw", choices=["raw", "orthonormal", "pca"])
    c.add_argument("--k", type=int, default=None, help="PCA components (basis pca)")
    c.add_argument("--trials", type=int, default=60, help="search budget (objective evaluations)")
    c.add_argument("--keep-family", action="store_true", help="keep library vectors of the target's own family")
    c.add_argument("--random-library", action="store_true", help="control: replace every library vector by a "
                   "random one with the same norm per layer")
    c.add_argument("--compare-to", default=None, help="a finished compose run on the same targets: write the "
                   "paired difference of its accuracy minus this run's (comparison.md)")
    c.add_argument("--batch-size", type=int, default=32)
    c.set_defaults(func=cmd_compose)

    ss = sub.add_parser("selection-study", help="CAST source-sample selection ablation and scaling against "
                        "cross-task ICL")
    common(ss)
    targets_and_output(ss)
    sources_and_sweep(ss, strengths=(0.5, 1.0, 2.0, 4.0, 8.0))
    ss.add_argument("--methods", type=_task_list, default=("random", "relevance", "diversity", "cast"),
                    help="selection methods of the ablation")
    ss.add_argument("--ablation-n", type=int, default=32, help="source samples per vector in the ablation")
    ss.add_argument("--ns", type=_numbers(int, empty=True), default=(4, 8, 16, 32, 64, 128),
                    help="sample counts to scale over ('' for the ablation alone, without ICL)")
    ss.add_argument("--scale-methods", type=_task_list, default=("cast", "random"),
                    help="selection methods with a scaling curve")
    ss.add_argument("--icl-limit", type=int, default=200, help="test items of the scaling comparison with "
                    "cross-task ICL (0: all)")
    ss.set_defaults(func=cmd_selection_study)

    d = sub.add_parser("demo", help="the analysis on the built-in tasks with small settings")
    common(d)
    d.add_argument("--out", default="outputs/demo")
    d.add_argument("--n", type=int, default=16)
    d.add_argument("--shots", type=int, default=4)
    d.add_argument("--no-png", action="store_true", help="write HTML figures only (PNG needs Chromium)")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("tasks", help="list the available tasks")
    t.add_argument("--data-dir", default=None)
    t.set_defaults(func=cmd_tasks)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "data_dir", None):  # every later load_task, inside the library too, reads this collection
        os.environ["CASTLENS_DATA"] = args.data_dir
    try:
        return args.func(args)
    except (TaskError, ValueError) as err:  # bad input: one clear line, no traceback
        print(f"castlens {args.cmd}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a read-only folder, a full disk: finished files stay as they were
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        print(f"castlens {args.cmd}: error: cannot read or write{where}: {err.strerror or err}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
