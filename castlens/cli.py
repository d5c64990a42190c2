"""The ``castlens`` command. It parses arguments and calls the library; every number it prints comes from there.

    castlens tasks                                   list the built-in and collection tasks
    castlens vectors --model M --tasks a,b --n N --shots K --out FILE
    castlens analyze --model M --tasks a,b,c --n N --shots K --out DIR   parallel-direction analysis
    castlens transfer --model M --sources a,b --targets x,y --n N --shots K --out DIR   CAST vs baselines
    castlens explain --sources a,b --targets x,y --tasks c,d --out DIR   which heads write the shared direction
    castlens compose --library FILES --targets x,y --examples 12 --out DIR   Steer2Adapt
    castlens selection-study --sources a,b --targets x,y --out DIR   selection ablation and sample scaling
    castlens report DIR                              rewrite a finished run's tables and figures from its parts
    castlens merge DIR DIR ... --out DIR             the tables of independent runs (a sweep) as one
    castlens export VECTORS.safetensors [--vector TASK] --out FILE.gguf   llama.cpp control vector
    castlens demo --out DIR                          the main job on the embedded default model
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from castlens.tasks import BUILTIN_TASKS, TaskError, load_task

DEMO_SOURCES = ("uppercase", "first_item", "next_number")
DEMO_TARGETS = ("last_item", "plural", "antonym")


def _names(s: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in s.split(",") if t.strip())
    if not names:
        raise argparse.ArgumentTypeError("no names given")
    return names


def _numbers(kind: type, empty: bool = False) -> Callable[[str], tuple]:
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


def _device_map(s: str) -> str | dict:
    """An argparse type: a strategy accelerate knows, or a JSON file mapping module names to devices."""
    if s in ("auto", "balanced", "balanced_low_0", "sequential"):
        return s
    try:
        return dict(json.loads(Path(s).read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise argparse.ArgumentTypeError(f"expected auto, balanced, balanced_low_0, sequential or a JSON file "
                                         f"{{module: device}}, got {s!r} ({err})") from None


def _max_memory(s: str) -> dict:
    """An argparse type: ``0=60GiB,cpu=100GiB`` as accelerate's ``max_memory`` (GPU indices as integers)."""
    try:
        pairs = [item.split("=", 1) for item in s.split(",") if item.strip()]
        return {int(k) if k.strip().isdigit() else k.strip(): v.strip() for k, v in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected device=size pairs such as 0=60GiB,cpu=100GiB, got {s!r}") from None


def _load(a: argparse.Namespace, tasks: Sequence[str] = ()) -> Any:
    """The model named by ``--model``, after every task name was checked (a typo fails before the load)."""
    from castlens.models import load_model

    for name in tasks:
        load_task(name, a.data_dir)
    from castlens.distributed import world

    placed = {k: getattr(a, k) for k in ("device_map", "max_memory", "offload_folder") if getattr(a, k, None)}
    device = getattr(a, "device", None) or (None if "device_map" in placed else world().device)  # torchrun: own GPU
    # Rank 0 first: a first load converts the model into the cache, and transformers writes weights on rank 0 only.
    return world().once(lambda: load_model(a.model, device=device, dtype=getattr(a, "dtype", None), **placed))


def _result(text: str) -> None:
    """A run's final lines: printed by rank 0 only under torchrun (the other ranks' logs are labelled)."""
    from castlens.distributed import world

    if world().main:
        print(text)


def _print_means(rows: Sequence[Any]) -> None:
    for r in (r for r in rows if r.mean):
        d = r.deltas.get("zero")
        _result(f"  {r.method:<15} mean accuracy {100 * r.accuracy:5.1f}% [{100 * r.ci_lo:.1f}, {100 * r.ci_hi:.1f}]"
              + ("" if d is None else f"   vs zero-shot {100 * d.point:+.1f} pts"
                 f"{' (inside the noise)' if d.noise else ''}"))


def cmd_vectors(a: argparse.Namespace) -> int:
    from castlens.experiments.analyze import check_vector_run, run_vectors

    check_vector_run(a.n, a.shots, a.out, a.overwrite)  # before the model loads
    model = _load(a, a.tasks)
    path, vectors = run_vectors(model, a.tasks, a.n, a.shots, a.out, a.seed, a.chat, a.batch_size, a.data_dir,
                                a.truncate_demos, a.overwrite)
    _result(f"wrote {len(vectors)} vectors [{model.cfg.n_layers} layers x {model.cfg.d_model}] to {path} "
          f"(+ {path.with_suffix('.json').name})")
    return 0


def _analyze(a: argparse.Namespace, tasks: Sequence[str], out: Path, n_boot: int, vectors: str | None) -> None:
    from castlens.experiments.analyze import run_analysis

    res = run_analysis(lambda: _load(a), a.model, tasks, a.n, a.shots, out, a.seed, False if a.no_png else None,
                       n_boot, a.data_dir, vectors)
    if not res.summary:  # another rank than 0 of a multi-process launch: rank 0 writes the report
        return
    s, b = res.summary, res.summary["best_layer"]
    cc = s["cross_task_cosine"]
    controls = ", ".join(f"{v} control {cc[v]['mean'][b]:.3f}" for v in cc if v != "few")
    _result(f"\nbest layer {b}: mean cross-task cosine few-shot {cc['few']['mean'][b]:.3f} [{cc['few']['lo'][b]:.3f}, "
          f"{cc['few']['hi'][b]:.3f}]{', ' + controls if controls else ''}, random {s['random_cosine'][b]:+.3f}")
    _result(f"wrote {len(res.files)} files to {out}/ (summary.md, summary.json, figures as .html"
          f"{' and .png' if any(f.suffix == '.png' for f in res.files) else ''}, vectors.safetensors)")


def cmd_analyze(a: argparse.Namespace) -> int:
    _analyze(a, a.tasks, Path(a.out), a.n_boot, a.vectors)
    return 0


def _transfer(a: argparse.Namespace, sources: Sequence[str], targets: Sequence[str], out: Path, **kw: Any) -> None:
    from castlens.experiments.transfer import TransferConfig, run_transfer
    from castlens.models import model_name

    cfg = TransferConfig(model=a.model, sources=tuple(sources), targets=tuple(targets), n=a.n, shots=a.shots,
                         seed=a.seed, **kw)  # bad options fail here, before the model loads
    model = _load(a, [*sources, *targets])
    t0 = time.perf_counter()
    rows = run_transfer(model, dataclasses.replace(cfg, model=model_name(model)), out, a.data_dir,
                        getattr(a, "batch_size", 16), False if a.no_png else None)
    _result(f"transfer finished in {time.perf_counter() - t0:.0f}s; table: {out / 'results.md'}")
    _print_means(rows)


def cmd_transfer(a: argparse.Namespace) -> int:
    _transfer(a, a.sources, a.targets, Path(a.out), dev=a.dev, limit=a.limit, layers=a.layers, strengths=a.strengths,
              select=a.select, n_boot=a.n_boot, pool=a.pool, embedder=a.embedder, n_random=a.n_random,
              mc_scoring=a.mc_scoring, function_vector=a.function_vector, fv_heads=a.fv_heads,
              draw_seed=a.draw_seed, staged_sweep=a.staged_sweep)
    return 0


def cmd_explain(a: argparse.Namespace) -> int:
    from castlens.experiments.explain import ExplainConfig, run_explain
    from castlens.models import model_name

    cfg = ExplainConfig(model=a.model, tasks=tuple(a.tasks or ()), sources=tuple(a.sources), targets=tuple(a.targets),
                        n=a.n, shots=a.shots, seed=a.seed, layer=a.layer, strengths=a.strengths, dev=a.dev,
                        limit=a.limit, n_boot=a.n_boot, n_random=a.n_random, fv_heads=a.fv_heads)
    model = _load(a, cfg.all_tasks)
    t0 = time.perf_counter()
    run_explain(model, dataclasses.replace(cfg, model=model_name(model)), Path(a.out), a.data_dir, a.batch_size,
                False if a.no_png else None)
    _result(f"explain finished in {time.perf_counter() - t0:.0f}s; summary: {Path(a.out) / 'summary.md'}")
    return 0


def cmd_compose(a: argparse.Namespace) -> int:
    from castlens.compose import random_library
    from castlens.experiments.compose import ComposeConfig, run_compose
    from castlens.models import model_name
    from castlens.vectors import load_vectors

    model = _load(a, a.targets)
    lib: dict = {}
    for f in a.library:
        lib.update(load_vectors(f, model))
    if a.random_library:
        lib = random_library(lib, a.seed)
    cfg = ComposeConfig(model=model_name(model), library=tuple(lib), targets=tuple(a.targets), layer=a.layer,
                        examples=a.examples, basis=a.basis, k=a.k, trials=a.trials, random_library=a.random_library,
                        leave_out_family=not a.keep_family, limit=a.limit, seed=a.seed, n_boot=a.n_boot)
    t0 = time.perf_counter()
    rows = run_compose(model, lib, cfg, Path(a.out), a.data_dir, a.compare_to, a.batch_size,
                       False if a.no_png else None)
    _result(f"compose finished in {time.perf_counter() - t0:.0f}s; table: {Path(a.out) / 'results.md'}")
    _print_means(rows)
    return 0


def cmd_selection_study(a: argparse.Namespace) -> int:
    from castlens.experiments.selection_study import StudyConfig, run_study
    from castlens.models import model_name

    cfg = StudyConfig(model=a.model, sources=a.sources, targets=a.targets, methods=a.methods,
                      ablation_n=a.ablation_n, ns=a.ns, scale_methods=a.scale_methods, shots=a.shots, dev=a.dev,
                      limit=a.limit, icl_limit=a.icl_limit or None, strengths=a.strengths, pool=a.pool, seed=a.seed,
                      n_boot=a.n_boot, layers=a.layers, embedder=a.embedder, mc_scoring=a.mc_scoring)
    model = _load(a, [*a.sources, *a.targets])
    t0 = time.perf_counter()
    ablation, _ = run_study(model, dataclasses.replace(cfg, model=model_name(model)), Path(a.out), a.data_dir,
                            a.batch_size, False if a.no_png else None)
    _result(f"selection study finished in {time.perf_counter() - t0:.0f}s; tables: {Path(a.out) / 'results.md'}")
    _print_means(ablation)
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from castlens.experiments import regenerate

    files = regenerate(a.run, png=False if a.no_png else None, compare_to=a.compare_to)
    print(f"rewrote {len(files)} files in {a.run} from its parts")
    return 0


def cmd_merge(a: argparse.Namespace) -> int:
    from castlens.experiments.merge import merge_runs

    m = merge_runs(a.runs, a.out)
    print(f"merged {len(m.runs)} runs into {m.out}: {', '.join(m.tables)}; columns from their configs: "
          f"{', '.join(m.keys) or 'none (the runs have the same config)'}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from castlens.export import export_file

    path, key, blocks = export_file(a.vectors, a.out, a.vector, a.layers, a.strength, a.model_hint)
    print(f"wrote {path}: vector {key!r} as a llama.cpp control vector, blocks {blocks}, strength {a.strength:g} "
          f"(llama-cli -m MODEL.gguf --control-vector {path})")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    print(f"castlens demo: {a.model}, built-in tasks {', '.join(BUILTIN_TASKS)}; {a.n} queries x {a.shots} shots "
          "each, with length-matched and shuffled-label controls")
    _analyze(a, list(BUILTIN_TASKS), Path(a.out), 500, None)
    _result(f"\ncastlens demo: transfer from {', '.join(DEMO_SOURCES)} to {', '.join(DEMO_TARGETS)} "
          f"({a.n} source samples, {a.shots} shots)")
    _transfer(a, DEMO_SOURCES, DEMO_TARGETS, Path(a.out) / "transfer", dev=24, n_boot=500)
    _result(f"demo finished in {time.perf_counter() - t0:.0f}s; open {Path(a.out) / 'cosine_by_layer.html'} and "
          f"{Path(a.out) / 'transfer' / 'results.md'}")
    return 0


def cmd_tasks(a: argparse.Namespace) -> int:
    from castlens.tasks import task_infos

    rows = task_infos(a.data_dir)
    print(f"{'task':<24} {'kind':<15} {'labels':>6} {'train':>7} {'test':>6}  language")
    for t in rows:
        print(f"{t.name:<24} {t.kind:<15} {'' if t.n_labels is None else t.n_labels:>6} {t.n_train:>7} {t.n_test:>6}"
              f"  {t.language}")
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    from castlens.models import list_models

    for m in list_models():
        state = "installed" if m.installed else f"not installed ({m.install})" if m.install else "built in code"
        print(f"{m.name:<24} {m.kind:<9} {state:<48} licence: {m.licence}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from castlens.models import DEFAULT_MODEL
    from castlens.selection import SELECTION_METHODS

    class Fmt(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    p = argparse.ArgumentParser(prog="castlens", description=__doc__, formatter_class=Fmt)
    sub = p.add_subparsers(dest="cmd", required=True)

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str, model: bool = True
                ) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help, formatter_class=Fmt)
        sp.set_defaults(func=func)
        if model:
            sp.add_argument("--model", default=DEFAULT_MODEL, help="castlens model name (tiny-llama: a 4-layer "
                            "random test model, 512-token context), a local folder or a Hugging Face id")
            sp.add_argument("--data-dir", default=None, help="task collection (default: $CASTLENS_DATA or "
                            "../shared/data)")
            sp.add_argument("--seed", type=int, default=0)
            sp.add_argument("--no-png", action="store_true", help="write HTML figures only (PNG needs Chromium)")
            sp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when available; "
                            "under torchrun each rank's own GPU)")
            sp.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                            help="model weights and activations (default float32)")
            sp.add_argument("--device-map", default=None, type=_device_map, help="place the model with accelerate: "
                            "auto, balanced, sequential, or a JSON file {module: device} ('cpu', 'disk', 0, ...)")
            sp.add_argument("--max-memory", default=None, type=_max_memory,
                            help="with --device-map: per-device limits, e.g. 0=60GiB,1=60GiB,cpu=100GiB")
            sp.add_argument("--offload-folder", default=None, help="with --device-map: where 'disk' weights go")
        return sp

    def add(sp: argparse.ArgumentParser, *names: str) -> None:
        spec: dict[str, tuple[tuple, dict]] = {
            "tasks": (("--tasks",), dict(type=_names, required=True, help="comma-separated task names")),
            "sources": (("--sources",), dict(type=_names, required=True, help="comma-separated source tasks")),
            "targets": (("--targets",), dict(type=_names, required=True, help="comma-separated target tasks")),
            "shots": (("--shots",), dict(type=int, default=4, help="demonstrations per few-shot prompt")),
            "dev": (("--dev",), dict(type=int, default=64, help="dev items per target, from its train split")),
            "limit": (("--limit",), dict(type=int, default=None, help="test items per target (default: all)")),
            "n_boot": (("--n-boot",), dict(type=int, default=1000, help="bootstrap draws")),
            "out": (("--out",), dict(required=True, help="output folder (an interrupted run resumes in it)")),
            "layers": (("--layers",), dict(type=_numbers(int), default=None,
                                           help="layers to sweep (default: every ceil(n_layers/10)-th, at most 9)")),
            "pool": (("--pool",), dict(type=int, default=200, help="candidates per source for graph selection")),
            "embedder": (("--embedder",), dict(default="model", choices=["model", "minilm"], help="embeddings for "
                         "the graph search: the model's middle-layer residual stream, or all-MiniLM-L6-v2")),
            "batch_size": (("--batch-size",), dict(type=int, default=16)),
            "mc_scoring": (("--mc-scoring",), dict(default="letter", choices=["letter", "text"], help="multiple-"
                           "choice tasks: score each option's letter, or its text (lm-evaluation-harness; acc and "
                           "acc_norm), in demonstrations and answers alike")),
        }
        for n in names:
            args, kw = spec[n]
            sp.add_argument(*args, **kw)

    v = command("vectors", cmd_vectors, "few-shot minus zero-shot vectors, one per task, into one file")
    add(v, "tasks", "batch_size")
    v.add_argument("--n", type=int, default=32, help="queries per task")
    v.add_argument("--shots", type=int, default=5, help="demonstrations per few-shot prompt")
    v.add_argument("--out", required=True, help="output file (.safetensors; a .json is written beside it)")
    v.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    v.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    v.add_argument("--truncate-demos", action="store_true", help="drop the earliest demonstrations of a prompt "
                   "longer than the model's context (default: refuse with an error)")

    an = command("analyze", cmd_analyze, "parallel-direction analysis with controls, figures and summary")
    add(an, "tasks", "n_boot")
    an.add_argument("--n", type=int, default=24, help="queries per task")
    an.add_argument("--shots", type=int, default=5)
    an.add_argument("--out", required=True, help="output folder")
    an.add_argument("--vectors", default=None, help="analyze this vector file (with per-sample tensors) instead")

    tr = command("transfer", cmd_transfer, "CAST steering against zero-shot, in-task and cross-task ICL on targets")
    add(tr, "sources", "targets", "shots", "dev", "limit", "n_boot", "out", "layers", "pool", "embedder",
        "batch_size", "mc_scoring")
    tr.add_argument("--strengths", type=_numbers(float), default=(0.5, 1.0, 2.0, 4.0), help="strengths to sweep")
    tr.add_argument("--n", type=int, default=32, help="source samples behind every vector")
    tr.add_argument("--staged-sweep", action="store_true", help="dev sweep in two passes: every layer at the middle "
                    "strength, then every strength at each construction's 2 best layers (16 of 36 points for 9 x 4)")
    tr.add_argument("--draw-seed", type=int, default=None, help="seed of the source-sample draw alone (default: "
                    "--seed); runs that differ only in it give the spread between draws (castlens merge)")
    tr.add_argument("--function-vector", action="store_true", help="add a function vector (Todd et al. 2024): the "
                    "top-k heads by causal effect on the sources, their mean few-shot writes summed")
    tr.add_argument("--fv-heads", type=_numbers(int), default=(1, 3, 5, 10), help="function-vector sizes k, "
                    "chosen on dev")
    tr.add_argument("--n-random", type=int, default=1, help="norm-matched random control vectors, each tuned by the "
                    "same sweep (their mean, spread and CAST's rank among them are reported when > 1)")
    tr.add_argument("--select", default="random", choices=list(SELECTION_METHODS),
                    help="source-sample selection: random (shared by all targets) or a graph search per target")

    ex = command("explain", cmd_explain, "which components write the shared few-shot direction (attribution, "
                 "head patching), and which part of a CAST vector transfers")
    add(ex, "sources", "targets", "dev", "limit", "n_boot", "out")
    ex.add_argument("--tasks", type=_names, default=None, help="more tasks for the shared direction and the "
                    "per-head tables (the sources and targets are always included)")
    ex.add_argument("--n", type=int, default=8, help="queries per task (attribution; as many again for patching)")
    ex.add_argument("--shots", type=int, default=4, help="demonstrations per few-shot prompt")
    ex.add_argument("--layer", type=int, default=None, help="the layer explained and steered (default: "
                    "round(0.45 x n_layers))")
    ex.add_argument("--strengths", type=_numbers(float), default=(0.5, 1.0, 2.0, 4.0, 8.0), help="strengths to sweep")
    ex.add_argument("--fv-heads", type=_numbers(int), default=(1, 3, 5, 10), help="function-vector sizes "
                    "(top-k heads) to choose from on dev")
    ex.add_argument("--n-random", type=int, default=5, help="norm-matched random controls, each tuned the same way")
    ex.add_argument("--batch-size", type=int, default=8)

    c = command("compose", cmd_compose, "Steer2Adapt: adapt to targets with a combination of library vectors")
    add(c, "targets", "limit", "n_boot", "out")
    c.add_argument("--library", type=_names, required=True, help="comma-separated vector files")
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

    ss = command("selection-study", cmd_selection_study, "CAST source-sample selection ablation and scaling "
                 "against cross-task ICL")
    add(ss, "sources", "targets", "shots", "dev", "limit", "n_boot", "out", "layers", "pool", "embedder",
        "batch_size", "mc_scoring")
    ss.add_argument("--strengths", type=_numbers(float), default=(0.5, 1.0, 2.0, 4.0, 8.0), help="strengths to sweep")
    ss.add_argument("--methods", type=_names, default=SELECTION_METHODS, help="selection methods of the ablation")
    ss.add_argument("--ablation-n", type=int, default=32, help="source samples per vector in the ablation")
    ss.add_argument("--ns", type=_numbers(int, empty=True), default=(4, 8, 16, 32, 64, 128),
                    help="sample counts to scale over ('' for the ablation alone, without ICL)")
    ss.add_argument("--scale-methods", type=_names, default=("cast", "random"),
                    help="selection methods with a scaling curve")
    ss.add_argument("--icl-limit", type=int, default=200, help="test items of the scaling comparison with "
                    "cross-task ICL (0: all)")

    r = command("report", cmd_report, "rewrite a finished run's tables and figures from its parts (no model)",
                model=False)
    r.add_argument("run", help="a run folder (transfer, selection-study or compose)")
    r.add_argument("--compare-to", default=None, help="compose runs: the run to compare with (comparison.md)")
    r.add_argument("--no-png", action="store_true", help="write HTML figures only")

    mg = command("merge", cmd_merge, "the tables of independent runs (a sweep's folders) as one table each",
                 model=False)
    mg.add_argument("runs", nargs="+", help="finished run folders of one kind (transfer, selection-study, compose)")
    mg.add_argument("--out", required=True, help="output folder: the merged CSVs and runs.md")

    ex = command("export", cmd_export, "write one vector as a llama.cpp control-vector GGUF (--control-vector)",
                 model=False)
    ex.add_argument("vectors", help="a vector file written by `castlens vectors` (.safetensors, .json beside it)")
    ex.add_argument("--vector", default=None, help="which vector of the file, by task name (default: its only one)")
    ex.add_argument("--out", required=True, help="output .gguf file (written to a temporary name, then renamed)")
    ex.add_argument("--layers", type=_numbers(int), default=None,
                    help="blocks to write (default: 1 .. n_layers-1; llama.cpp never steers block 0)")
    ex.add_argument("--strength", type=float, default=1.0, help="multiplied into the file")
    ex.add_argument("--model-hint", default=None, help="controlvector.model_hint (default: the vector's model name)")

    d = command("demo", cmd_demo, "the analysis and a small transfer on the built-in tasks")
    d.add_argument("--out", default="outputs/demo")
    d.add_argument("--n", type=int, default=16)
    d.add_argument("--shots", type=int, default=4)

    t = command("tasks", cmd_tasks, "list the available tasks: kind, label count, split sizes", model=False)
    t.add_argument("--data-dir", default=None)
    command("models", cmd_models, "list the embedded models and whether each is installed", model=False)
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line; under ``torchrun`` every rank runs it (:mod:`castlens.distributed`): rank 0 prints as a
    single process does, the other ranks' logs are labelled ``[rank r]`` and their progress bars are off."""
    from castlens.distributed import world

    args = build_parser().parse_args(argv)
    w = world()
    if not w.main:
        sys.stdout, sys.stderr = w.labelled(sys.stdout), w.labelled(sys.stderr)
    try:
        return int(args.func(args))
    except (TaskError, ValueError) as err:  # bad input: one clear line, no traceback
        print(f"castlens {args.cmd}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a read-only folder, a full disk: finished files stay as they were
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        print(f"castlens {args.cmd}: error: cannot read or write{where}: {err.strerror or err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        print(f"\ncastlens {args.cmd}: interrupted" + (f"; finished parts are kept in {out}, rerun the same command "
              "to resume" if out else ""), file=sys.stderr)
        return 130
    finally:
        w.close()


if __name__ == "__main__":
    sys.exit(main())
