"""Does the parallel-direction observation hold? Collect difference vectors with controls, summarize, report.

CAST (arXiv 2507.13236) observes that the shift in-context examples cause at the last token (few-shot minus
zero-shot, residual stream) points in nearly the same direction across very different tasks. This module
measures that claim and the controls that could explain it away, per layer:

* ``few``      : [instruction] + k demonstrations + query   minus   [instruction] + query   (the signal)
* ``filler``   : the demonstrations replaced by unrelated text of the same token count      (a longer context)
* ``shuffled`` : the demonstrations with shuffled answers                                   (format, no mapping)
* random directions in the same space (cosine about 0, spread 1/sqrt(d_model)).

All variants share queries, instruction and demonstration inputs, so they differ only in what the
demonstration block holds. :func:`collect` runs the model (one batched pass per task), :func:`summarize` is pure
(tensors in, numbers out, through :mod:`castlens.geometry`), :func:`write_report` writes figures and tables.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from castlens import geometry as geo
from castlens.files import atomic_write
from castlens.models import model_name, tokenizer_of
from castlens.prompts import contrastive_pairs, default_format, filler_prompt, shuffled_label_prompt
from castlens.tasks import Task, load_task
from castlens.vectors import SteeringVector, contrastive_activations

VARIANTS = ("few", "filler", "shuffled")


@dataclass
class Collected:
    """Per-sample difference vectors for each variant and task, plus the raw zero-/few-shot activations."""

    model: str
    tasks: list[str]
    n: int
    shots: int
    seed: int
    diffs: dict[str, dict[str, Float[Tensor, "n layer d"]]]  # variant -> task -> samples
    zero: dict[str, Float[Tensor, "n layer d"]] = field(default_factory=dict)
    few: dict[str, Float[Tensor, "n layer d"]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        return next(iter(self.diffs["few"].values())).shape[1]

    @property
    def d_model(self) -> int:
        return next(iter(self.diffs["few"].values())).shape[2]

    def to_vectors(self) -> dict[str, SteeringVector]:
        """One :class:`SteeringVector` per task and variant (keys ``task``, ``task@filler``, ``task@shuffled``)."""
        out = {}
        for variant, by_task in self.diffs.items():
            for task, d in by_task.items():
                key = task if variant == "few" else f"{task}@{variant}"
                out[key] = SteeringVector(d.mean(0), model=self.model, task=task, n_samples=d.shape[0],
                                          shots=self.shots, seed=self.seed, samples=d,
                                          method="mean_difference" if variant == "few" else f"control:{variant}")
        return out

    @classmethod
    def from_vectors(cls, vectors: dict[str, SteeringVector]) -> "Collected":
        """Back from a vector file written by :meth:`to_vectors` (needs the per-sample tensors)."""
        diffs: dict[str, dict[str, Tensor]] = {}
        for key, v in vectors.items():
            if v.samples is None:
                raise ValueError(f"vector {key!r} has no per-sample differences; the analysis needs them "
                                 "(write vector files with keep_samples=True)")
            variant = key.split("@", 1)[1] if "@" in key else "few"
            diffs.setdefault(variant, {})[v.task] = v.samples
        if "few" not in diffs:
            raise ValueError("the vector file holds no few-shot (signal) vectors")
        first = next(iter(vectors.values()))
        return cls(first.model, list(diffs["few"]), first.n_samples, first.shots, first.seed, diffs)


def variant_prompts(model, task: Task, n: int, shots: int, seed: int = 0) -> tuple[dict[str, list[str]], list[str]]:
    """One task's ``n`` zero-shot prompts and their few-shot, filler and shuffled-label variants (same queries,
    instruction and demonstration inputs), keyed ``"zero"`` and by :data:`VARIANTS`; and notes on the split."""
    tok = tokenizer_of(model)

    def n_tokens(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    fmt = default_format(task)
    split = "train" if task.train else "test"
    notes = [] if split == "train" else [
        f"{task.name}: no train split; queries and demonstrations both come from its test split (no labels are "
        "fitted here, so this is not tuning on test)"]
    pairs = contrastive_pairs(task, n, shots, seed=seed, fmt=fmt, split=split, demo_split=split)
    return {"zero": [p.zero for p in pairs], "few": [p.few for p in pairs],
            "filler": [filler_prompt(p, fmt, n_tokens) for p in pairs],
            "shuffled": [shuffled_label_prompt(p, fmt, seed, task.labels) for p in pairs]}, notes


def collect_task(model, name: str, n: int, shots: int, seed: int = 0, batch_size: int = 16,
                 data_dir: str | None = None, progress: bool = True) -> Collected:
    """One task's zero-shot, few-shot, filler and shuffled-label prompts of ``n`` queries; last tokens kept."""
    task = load_task(name, data_dir)
    prompts, notes = variant_prompts(model, task, n, shots, seed)
    out = Collected(model_name(model), [task.name], n, shots, seed, {v: {} for v in VARIANTS}, notes=notes)
    acts = contrastive_activations(model, prompts["zero"], *(prompts[v] for v in VARIANTS),
                                   batch_size=batch_size, progress=progress)
    zero = acts[0]
    out.zero[task.name], out.few[task.name] = zero, acts[1]
    for j, variant in enumerate(VARIANTS, 1):
        out.diffs[variant][task.name] = acts[j] - zero
    return out


def collect(model, tasks: Sequence[str], n: int, shots: int, seed: int = 0, batch_size: int = 16,
            data_dir: str | None = None, progress: bool = True) -> Collected:
    """:func:`collect_task` for each task, merged (:func:`merge`)."""
    parts = []
    for i, name in enumerate(tasks, 1):
        t0 = time.perf_counter()
        parts.append(collect_task(model, name, n, shots, seed, batch_size, data_dir, progress))
        if progress:
            print(f"[{i}/{len(tasks)}] {name}: {4 * n} prompts in {time.perf_counter() - t0:.1f}s", flush=True)
    return merge(parts)


def merge(parts: Sequence[Collected]) -> Collected:
    """One :class:`Collected` from per-task ones of the same run (model, ``n``, ``shots``, seed), in their order."""
    first = parts[0]
    for c in parts:
        if (c.model, c.n, c.shots, c.seed) != (first.model, first.n, first.shots, first.seed):
            raise ValueError(f"cannot merge collections of different runs: {c.tasks} ({c.model}, n={c.n}, "
                             f"shots={c.shots}, seed={c.seed}) and {first.tasks} ({first.model}, n={first.n}, "
                             f"shots={first.shots}, seed={first.seed})")
    return Collected(first.model, [t for c in parts for t in c.tasks], first.n, first.shots, first.seed,
                     {v: {t: d for c in parts for t, d in c.diffs[v].items()} for v in first.diffs},
                     {t: z for c in parts for t, z in c.zero.items()}, {t: f for c in parts for t, f in c.few.items()},
                     [note for c in parts for note in c.notes])


def save_part(c: Collected, path: str | os.PathLike) -> Path:
    """One task's collection as safetensors (every tensor, the run's identity and notes in its metadata),
    written atomically: the part a resumed or multi-process analysis reads back with :func:`load_part`."""
    from safetensors.torch import save

    (task,) = c.tasks
    tensors = {f"diff.{v}": c.diffs[v][task] for v in c.diffs} | {"zero": c.zero[task], "few": c.few[task]}
    meta = {"model": c.model, "task": task, "n": str(c.n), "shots": str(c.shots), "seed": str(c.seed),
            "notes": json.dumps(c.notes)}
    return atomic_write(path, save({k: t.contiguous() for k, t in tensors.items()}, metadata=meta))


def load_part(path: str | os.PathLike) -> Collected:
    """A part written by :func:`save_part`."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    task = meta["task"]
    return Collected(meta["model"], [task], int(meta["n"]), int(meta["shots"]), int(meta["seed"]),
                     {k.split(".", 1)[1]: {task: v} for k, v in t.items() if k.startswith("diff.")},
                     {task: t["zero"]}, {task: t["few"]}, json.loads(meta["notes"]))


def _ci(d: dict[str, Tensor]) -> dict[str, list[float]]:
    return {k: d[k].tolist() for k in ("mean", "lo", "hi")}


def summarize(c: Collected, n_boot: int = 1000, seed: int = 0) -> dict:
    """Every number of the analysis, JSON-ready, lists indexed by layer (pure: tensors in, numbers out)."""
    L, k = c.n_layers, len(c.tasks)
    if k < 2:
        raise ValueError("the cross-task analysis needs at least 2 tasks")
    curves = {v: _ci(geo.mean_cross_task_cosine_ci(c.diffs[v], n_boot=n_boot, seed=seed)) for v in c.diffs}
    rnd = geo.random_cosine_baseline(c.d_model, k, L, seed=seed)
    controls = torch.tensor([curves[v]["mean"] for v in curves if v != "few"])
    strongest = controls.max(0).values if len(controls) else rnd
    signal = torch.tensor(curves["few"]["mean"])
    best = geo.best_layer(signal, strongest)

    means = torch.stack([c.diffs["few"][t].mean(0) for t in c.tasks])  # [task, layer, d]
    cos = geo.cosine_matrix(means)  # [layer, task, task]
    loo = geo.leave_one_out_cosine(means)  # [layer, task]
    pair_cos = geo.sample_cosines(c.diffs["few"], seed=seed)
    within = [geo.bootstrap_mean_ci(pair_cos["within"][layer], n_boot=n_boot, seed=seed) for layer in range(L)]
    across = [geo.bootstrap_mean_ci(pair_cos["across"][layer], n_boot=n_boot, seed=seed) for layer in range(L)]
    all_samples = torch.cat([c.diffs["few"][t] for t in c.tasks])  # [N, layer, d]
    pca = geo.pca_by_layer(all_samples, n_components=10)
    share = geo.shared_component_share(means, pca["components"][:, 0])  # [layer, task]
    shared = geo.uncentred_first_component(all_samples)
    shared_share = geo.shared_component_share(means, shared["direction"])  # [layer, task]
    margins = {v: (signal - torch.tensor(curves[v]["mean"])).tolist() for v in curves if v != "few"}
    best_per_control = {v: int(torch.tensor(m).argmax()) for v, m in margins.items()}
    return {
        "model": c.model, "tasks": c.tasks, "n_per_task": c.n, "shots": c.shots, "seed": c.seed,
        "n_layers": L, "d_model": c.d_model, "n_boot": n_boot, "notes": c.notes,
        "best_layer": best,
        "best_layer_rule": "argmax over layers of signal mean minus the strongest control mean",
        "cross_task_cosine": curves,  # variant -> {mean, lo, hi} per layer, from task-mean vectors
        "random_cosine": rnd.tolist(),
        "random_abs_cosine_expected": geo.expected_random_abs_cosine(c.d_model),
        "margin_over_controls": (signal - strongest).tolist(),
        "margin_over_each_control": margins,  # control -> per layer
        "best_layer_over_each_control": best_per_control,
        "cosine_matrix_best_layer": cos[best].tolist(),
        "leave_one_out_best_layer": dict(zip(c.tasks, loo[best].tolist())),
        "leave_one_out": loo.tolist(),
        "sample_cosine_within": [[float(x) for x in w] for w in within],  # [layer] -> (mean, lo, hi)
        "sample_cosine_across": [[float(x) for x in a] for a in across],
        "pca_explained_variance_ratio": pca["explained_variance_ratio"].tolist(),  # [layer, k]
        "pc1_share_best_layer": dict(zip(c.tasks, share[best].tolist())),
        "pc1_share": share.tolist(),
        "shared_component_energy": shared["energy"].tolist(),  # uncentred first component, per layer
        "shared_component_share_best_layer": dict(zip(c.tasks, shared_share[best].tolist())),
        "shared_component_share": shared_share.tolist(),
    }


def _markdown(s: dict) -> str:
    b, cc = s["best_layer"], s["cross_task_cosine"]

    def f(v: str, layer: int) -> str:
        return f"{cc[v]['mean'][layer]:.3f} [{cc[v]['lo'][layer]:.3f}, {cc[v]['hi'][layer]:.3f}]" if v in cc else "n/a"

    def row(layer: int) -> str:
        w, a = s["sample_cosine_within"][layer], s["sample_cosine_across"][layer]
        return (f"| {layer}{' (best)' if layer == b else ''} | {f('few', layer)} | {f('filler', layer)} | "
                f"{f('shuffled', layer)} | "
                f"{s['random_cosine'][layer]:+.3f} | {w[0]:.3f} | {a[0]:.3f} | "
                f"{s['shared_component_energy'][layer]:.3f} | {s['pca_explained_variance_ratio'][layer][0]:.3f} |")

    lines = [
        f"# Parallel directions: {s['model']}", "",
        f"{len(s['tasks'])} tasks, {s['n_per_task']} queries each, {s['shots']} demonstrations; last-token "
        f"`blocks.{{L}}.hook_resid_post`; 95% bootstrap intervals over samples ({s['n_boot']} draws).", "",
        "| layer | few - zero | filler - zero | shuffled - zero | random | sample cos within task | "
        "sample cos across tasks | shared comp. energy | centred PC1 var. share |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    step = max(1, s["n_layers"] // 10)
    shown = sorted(set(range(0, s["n_layers"], step)) | {b, s["n_layers"] - 1})
    lines += [row(layer) for layer in shown]
    lines += ["", f"Best layer {b} (largest margin of the signal over the strongest control: "
              f"{s['margin_over_controls'][b]:+.3f})."]
    for v, layer in s["best_layer_over_each_control"].items():
        lines.append(f"Largest margin over the {v} control alone: {s['margin_over_each_control'][v][layer]:+.3f} "
                     f"at layer {layer}.")
    lines += ["", f"At layer {b}:", "",
              "| task | cosine with the mean of the other tasks | share along the shared (uncentred) component | "
              "share along centred PC1 |", "|---|---|---|---|"]
    lines += [f"| {t} | {s['leave_one_out_best_layer'][t]:.3f} | {s['shared_component_share_best_layer'][t]:.3f} | "
              f"{s['pc1_share_best_layer'][t]:.3f} |" for t in s["tasks"]]
    if s["notes"]:
        lines += ["", "Notes:"] + [f"- {n}" for n in s["notes"]]
    return "\n".join(lines) + "\n"


def write_report(c: Collected, s: dict, out: str | os.PathLike, png: bool | None = None) -> list[Path]:
    """Figures (HTML + PNG), ``summary.json`` and ``summary.md`` into ``out``; returns the files written.

    ``png=None`` writes PNGs when export works here (kaleido and a Chromium binary) and says so when not."""
    from castlens import plots

    if png is None:
        png = plots.png_export_available()
        if not png:
            print(f"note: writing HTML figures only; for PNGs: {plots.PNG_EXPORT_FIX}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    b, layers = s["best_layer"], list(range(s["n_layers"]))
    who = (f"{s['model']}; {len(s['tasks'])} tasks ({', '.join(s['tasks'])}); {s['n_per_task']} queries per task, "
           f"{s['shots']} demonstrations; last token, blocks.L.hook_resid_post")
    cc = s["cross_task_cosine"]
    names = {"few": "few-shot minus zero-shot", "filler": "control: length-matched filler minus zero-shot",
             "shuffled": "control: shuffled-label demos minus zero-shot"}
    curves = {names[v]: cc[v] for v in cc}
    curves["control: random directions"] = {"mean": s["random_cosine"], "lo": None, "hi": None}
    files = []
    figs = {
        "cosine_by_layer": plots.cosine_by_layer(
            layers, curves, title="Mean cross-task cosine of task difference vectors, by layer",
            caption=f"{who}. Bands: 95% bootstrap intervals over samples. Random: {len(s['tasks'])} Gaussian "
                    f"vectors in d={s['d_model']}."),
        "cosine_heatmap": plots.cosine_heatmap(
            s["cosine_matrix_best_layer"], s["tasks"], b,
            title=f"Cosine between task vectors (few minus zero-shot) at layer {b}",
            caption=f"{who}. Layer {b}: largest margin over the controls."),
        "pca_explained_variance": plots.explained_variance_by_layer(
            layers, s["pca_explained_variance_ratio"],
            title="PCA of all per-sample difference vectors: explained variance by layer",
            caption=f"{who}. {len(s['tasks']) * s['n_per_task']} difference vectors per layer, centred."),
    }
    few = torch.cat([c.diffs["few"][t][:, b] for t in c.tasks])
    pca = geo.pca_by_layer(few[:, None], n_components=2)
    pts = geo.pca_project(few, pca["components"][0], pca["mean"][0])
    labels = [t for t in c.tasks for _ in range(c.diffs["few"][t].shape[0])]
    extra = None
    if c.zero:
        acts = torch.cat([torch.cat([c.zero[t][:, b] for t in c.tasks]), torch.cat([c.few[t][:, b] for t in c.tasks])])
        p2 = geo.pca_by_layer(acts[:, None], n_components=2)
        extra = {"zero-shot and few-shot activations": (
            geo.pca_project(acts, p2["components"][0], p2["mean"][0]).numpy(),
            [f"{t} (zero)" for t in labels] + [f"{t} (few)" for t in labels])}
    figs["pca_scatter"] = plots.pca_scatter(
        pts.numpy(), labels, title=f"Per-sample difference vectors at layer {b}, first two principal components",
        caption=f"{who}. Dropdown: the zero- and few-shot activations themselves.", extra_views=extra)
    for name, fig in figs.items():
        files += plots.save_figure(fig, out / name, png=png)
    js = out / "summary.json"
    atomic_write(js, json.dumps(s, indent=1))
    md = out / "summary.md"
    atomic_write(md, _markdown(s))
    return files + [js, md]
