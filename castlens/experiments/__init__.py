"""Experiments: each module says *what* it compares; the protocol, the run folder and the results live once.

=====================  =====================================================================================
``protocol``           :func:`tune_and_test`: dev sweep, chosen setting, test scores (and :func:`prompted` for
                       methods that change the prompt instead)
``run``                :class:`Run`: a run folder (config checked on resume, parts written once, figures)
``results``            frozen result records, bootstrap statistics (every delta paired) and tables
``sources``            source samples, their contrastive differences, the vector constructions
``transfer``           CAST against zero-shot, in-task and cross-task ICL, ICV, task and random vectors
``selection_study``    which source samples and how many (ablation and scaling against cross-task ICL)
``compose``            Steer2Adapt against its baselines
``analyze``            the parallel-direction analysis and the vectors command
=====================  =====================================================================================

Adding an experiment: write a frozen config dataclass (subclass :class:`ProtocolConfig`; ``to_dict``), a
``compute(target, done)`` that prepares the target, builds candidate vectors and calls :func:`tune_and_test`,
and a ``report`` that turns parts into tables; :class:`Run` does the rest::

    @dataclass(frozen=True)
    class MyConfig(ProtocolConfig):
        model: str = ""
        targets: tuple[str, ...] = ()
        def to_dict(self): return asdict(self)

    def run_mine(model, cfg, out, vector):
        run = Run(out, cfg)
        def compute(name, done):
            target = prepare(model, load_task(name), cfg)
            return tune_and_test(model, target, grid({"mine": vector}, [3, 6], [1.0, 4.0]), donors=done)
        parts = run.parts(list(cfg.targets), compute, TargetResult.from_dict, TargetResult.to_dict)
        rows = summarize(list(parts.values()), ["zero_shot", "mine"], {"zero": "zero_shot"})
        run.write("results.csv", to_csv(rows, ["target", "method", "accuracy", "delta_zero"]))
"""

from __future__ import annotations

import json
from pathlib import Path

from castlens.experiments.protocol import Candidate, ProtocolConfig, grid, prepare, prompted, tune_and_test
from castlens.experiments.results import (MethodResult, Row, Setting, SweepPoint, TargetResult, paired_delta, summarize,
                                          to_csv)
from castlens.experiments.run import Run, RunError

__all__ = ["Candidate", "ProtocolConfig", "grid", "prepare", "prompted", "tune_and_test", "MethodResult", "Row",
           "Setting", "SweepPoint", "TargetResult", "paired_delta", "summarize", "to_csv", "Run", "RunError",
           "regenerate"]


def _config(cls: type, path: Path):
    raw = json.loads(path.read_text())
    raw.pop("inputs", None)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def regenerate(out: str | Path, png: bool | None = None, compare_to: str | Path | None = None) -> list[Path]:
    """Rewrite a finished run's tables and figures from its ``config.json`` and parts alone (no model): the
    check that committed results follow from their committed parts. Returns the files the run folder holds."""
    from castlens.experiments import compose, selection_study, transfer
    from castlens.experiments.sources import SourceRecord

    out = Path(out)
    if not (out / "config.json").is_file():
        raise RunError(f"{out} is not a run folder (no config.json)")
    keys = set(json.loads((out / "config.json").read_text()))
    kind = next((k for k, mark in (("compose", "examples"), ("study", "ablation_n"), ("transfer", "select"))
                 if mark in keys), None)
    if kind is None:
        raise RunError(f"{out}/config.json is not the config of a transfer, selection-study or compose run")
    cls = {"compose": compose.ComposeConfig, "study": selection_study.StudyConfig,
           "transfer": transfer.TransferConfig}[kind]
    cfg = _config(cls, out / "config.json")
    run = Run(out, cfg, png=png)
    from castlens.tasks import load_task

    names = [load_task(t).name if t.endswith(".json") else t for t in cfg.targets]  # a target given by its file
    missing = [t for t in names if not run.part_path(t).exists()]
    if missing:
        raise RunError(f"{out} has no finished part for {missing}; rerun the experiment to finish it")
    parts = [TargetResult.from_dict(json.loads(run.part_path(t).read_text())) for t in names]
    if kind == "compose":
        compose.report(run, cfg, parts, compare_to)
    elif kind == "study":
        selection_study.report(run, cfg, parts)
    else:
        recs = [out / "sources.json"] if cfg.select == "random" else sorted((out / "vectors").glob("*.sources.json"))
        transfer.report(run, cfg, parts, [SourceRecord.from_dict(json.loads(p.read_text())) for p in recs])
    return sorted(p for p in out.iterdir() if p.is_file())
