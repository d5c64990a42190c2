"""Plotly figures for castlens results (CAST, arXiv 2507.13236).

Every function takes numpy arrays, plain lists or pandas objects (torch tensors work too: they
go through ``np.asarray``), returns a ``plotly.graph_objects.Figure`` with its title, axis
titles and a caption under the plot, and does nothing else. ``save_figure`` writes the figure as
self-contained HTML (opens offline) and, optionally, PNG.

PNG export goes through kaleido>=1, which drives a Chrome/Chromium binary it cannot download
offline. On Debian: ``apt-get install -y chromium`` then ``pip install "kaleido>=1"``; kaleido
finds ``/usr/bin/chromium`` on PATH by itself (``BROWSER_PATH`` overrides the binary).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from castlens.files import atomic_write

__all__ = [
    "cosine_by_layer",
    "cosine_heatmap",
    "pca_scatter",
    "explained_variance_by_layer",
    "accuracy_sweep",
    "sweep_heatmaps",
    "head_heatmaps",
    "save_figure",
    "PNG_EXPORT_FIX",
]

PNG_EXPORT_FIX = (
    "PNG export needs kaleido>=1 and a Chrome/Chromium browser (kaleido cannot download one offline). "
    'Fix: `apt-get update && apt-get install -y chromium` and `pip install "kaleido>=1"` '
    "(kaleido then finds /usr/bin/chromium itself; set BROWSER_PATH to use another binary), "
    "or call save_figure(..., png=False) to write the HTML only."
)

_CAPTION_WIDTH = 110  # characters per caption line
_CAPTION_LINE_PX = 15
_FONT = dict(family="Arial, sans-serif", size=13)


# ----------------------------------------------------------------------------- helpers


def _arr(x: Any, name: str, ndim: int | None = None) -> np.ndarray:
    """``x`` as a float numpy array (torch tensors are detached first), checking its rank."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    try:
        a = np.asarray(x, dtype=float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected numbers, got {type(x).__name__}") from e
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {a.shape}")
    return a


def _wrap(text: str, width: int = _CAPTION_WIDTH) -> str:
    """Wrap plain text to <br>-separated lines of at most ~width characters (keeps newlines)."""
    lines: list[str] = []
    for para in str(text).split("\n"):
        lines.extend(textwrap.wrap(para, width=width) or [""])
    return "<br>".join(lines)


def _colors(n: int) -> list[str]:
    pal = qualitative.Plotly if n <= 10 else qualitative.Alphabet
    return [pal[i % len(pal)] for i in range(n)]


def _rgba(color: str, alpha: float) -> str:
    c = color.lstrip("#")
    r, g, b = (int(c[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def _finish(
    fig: go.Figure,
    title: str,
    caption: str,
    xaxis_title: str,
    yaxis_title: str,
    width: int = 900,
    height: int = 520,
    caption_shift: int = 58,
) -> go.Figure:
    """Set title, axis titles and a caption annotation under the x axis; size the bottom margin."""
    text = _wrap(caption) if caption else ""
    n_lines = text.count("<br>") + 1 if text else 0
    bottom = caption_shift + 22 + _CAPTION_LINE_PX * n_lines
    fig.update_layout(
        title=dict(text=str(title), x=0.02, xanchor="left"),
        template="plotly_white",
        font=_FONT,
        width=width,
        height=height + _CAPTION_LINE_PX * n_lines,
        margin=dict(l=70, r=30, t=70, b=bottom),
    )
    fig.update_xaxes(title_text=str(xaxis_title))
    fig.update_yaxes(title_text=str(yaxis_title))
    if text:
        fig.add_annotation(
            name="caption",
            text=text,
            xref="paper",
            yref="paper",
            x=0,
            y=0,
            xanchor="left",
            yanchor="top",
            yshift=-caption_shift,
            align="left",
            showarrow=False,
            font=dict(size=11, color="#444"),
        )
    return fig


def _check_len(values: np.ndarray, n: int, name: str) -> None:
    if values.shape != (n,):
        raise ValueError(f"{name}: expected {n} values (one per layer), got shape {values.shape}")


# ----------------------------------------------------------------------------- figures


def cosine_by_layer(
    layers: Sequence[int] | np.ndarray,
    curves: Mapping[str, Mapping[str, Any]],
    title: str = "Cross-task cosine of ICL difference vectors by layer",
    caption: str = "",
    yaxis_title: str = "mean cross-task cosine",
) -> go.Figure:
    """Mean cross-task cosine against layer, one line per curve with a shaded [lo, hi] band.

    ``curves``: {name: {"mean": [...], "lo": [...] | None, "hi": [...] | None}} (other keys are
    ignored), e.g. the signal and the random, length-matched-prefix and shuffled-label controls
    (CAST). Traces: all bands first (legend-grouped with their line), then one line per curve.
    """
    x = _arr(layers, "layers", 1)
    if not curves:
        raise ValueError("curves: expected at least one curve {name: {'mean': ...}}, got none")
    fig = go.Figure()
    colors = _colors(len(curves))
    lines = []
    for (name, cur), color in zip(curves.items(), colors):
        if "mean" not in cur:
            raise ValueError(f"curves[{name!r}]: expected a 'mean' key, got keys {sorted(cur)}")
        y = _arr(cur["mean"], f"curves[{name!r}]['mean']", 1)
        _check_len(y, len(x), f"curves[{name!r}]['mean']")
        lo, hi = cur.get("lo"), cur.get("hi")
        if (lo is None) != (hi is None):
            raise ValueError(f"curves[{name!r}]: 'lo' and 'hi' must both be given or both be None")
        if lo is not None:
            lo_a = _arr(lo, f"curves[{name!r}]['lo']", 1)
            hi_a = _arr(hi, f"curves[{name!r}]['hi']", 1)
            _check_len(lo_a, len(x), f"curves[{name!r}]['lo']")
            _check_len(hi_a, len(x), f"curves[{name!r}]['hi']")
            fig.add_trace(
                go.Scatter(
                    x=np.concatenate([x, x[::-1]]),
                    y=np.concatenate([hi_a, lo_a[::-1]]),
                    fill="toself",
                    fillcolor=_rgba(color, 0.18),
                    mode="lines",
                    line=dict(width=0),
                    hoverinfo="skip",
                    showlegend=False,
                    legendgroup=name,
                    name=f"{name} CI",
                )
            )
        lines.append(
            go.Scatter(x=x, y=y, mode="lines+markers", name=name, legendgroup=name, line=dict(color=color, width=2),
                       marker=dict(size=5))
        )
    for tr in lines:
        fig.add_trace(tr)
    fig.add_hline(y=0, line=dict(color="#999", width=1, dash="dot"))
    fig.update_xaxes(tickmode="linear", dtick=1 if len(x) <= 16 else 2)  # layers are integers
    return _finish(fig, title, caption, "layer", yaxis_title)


def cosine_heatmap(
    mat: Any,
    task_names: Sequence[str],
    layer: int,
    title: str | None = None,
    caption: str = "",
) -> go.Figure:
    """Task x task cosine heatmap at one layer (diverging colours, fixed [-1, 1], 2-decimal labels).

    ``mat`` is [task, task], or [layer, task, task] from which ``mat[layer]`` is taken.
    """
    m = _arr(mat, "mat")
    if m.ndim == 3:
        if not 0 <= layer < m.shape[0]:
            raise ValueError(f"layer: expected an index into mat's {m.shape[0]} layers, got {layer}")
        m = m[layer]
    names = [str(t) for t in task_names]
    if m.ndim != 2 or m.shape != (len(names), len(names)):
        raise ValueError(f"mat: expected shape [task, task] = ({len(names)}, {len(names)}) or [layer, task, task], "
                         f"got {np.shape(mat)}")
    n = len(names)
    fig = go.Figure(
        go.Heatmap(
            z=m,
            x=names,
            y=names,
            zmin=-1,
            zmax=1,
            zmid=0,
            colorscale="RdBu_r",
            text=m,
            texttemplate="%{text:.2f}",
            textfont=dict(size=10 if n <= 12 else 8),
            hovertemplate="%{y} vs %{x}: %{z:.3f}<extra></extra>",
            colorbar=dict(title="cosine"),
        )
    )
    fig.update_xaxes(side="top", tickangle=-45, automargin=True)
    fig.update_yaxes(autorange="reversed", automargin=True)
    side = max(520, 30 * n + 260)
    title = title if title is not None else f"Cosine between task vectors, layer {layer}"
    fig = _finish(fig, title, caption, "task", "task", width=side + 120, height=side, caption_shift=20)
    fig.update_layout(margin=dict(t=70), title=dict(y=0.985, yanchor="top"))
    return fig


def pca_scatter(
    points: Any,
    task_labels: Sequence[str],
    title: str = "Difference vectors in the PC1-PC2 plane",
    caption: str = "",
    extra_views: Mapping[str, tuple[Any, Sequence[str]]] | None = None,
    view_name: str = "difference vectors",
    axis_titles: tuple[str, str] = ("PC1", "PC2"),
) -> go.Figure:
    """2-D scatter coloured by label; extra views are chosen with a dropdown.

    ``points`` [n, 2] with one label each; ``extra_views`` {name: (points [m, 2], labels)}, e.g.
    zero-shot vs few-shot activations. Traces: one per distinct label per view (first-seen
    order), main view first; a label keeps its colour across views.
    """
    views: dict[str, tuple[Any, Sequence[str]]] = {view_name: (points, task_labels)}
    for name, v in (extra_views or {}).items():
        if name in views:
            raise ValueError(f"extra_views: view name {name!r} clashes with view_name")
        if not isinstance(v, (tuple, list)) or len(v) != 2:
            raise ValueError(f"extra_views[{name!r}]: expected a (points, labels) pair")
        views[name] = (v[0], v[1])
    parsed = []
    for name, (pts, labels) in views.items():
        where = "points" if name == view_name else f"extra_views[{name!r}]"
        p = _arr(pts, where, 2)
        labels = [str(t) for t in labels]
        if p.shape[1] != 2 or p.shape[0] != len(labels):
            raise ValueError(f"{where}: expected shape [n, 2] with n = {len(labels)} labels, got {p.shape}")
        parsed.append((name, p, labels))
    all_labels = list(dict.fromkeys(t for _, _, labels in parsed for t in labels))
    color = dict(zip(all_labels, _colors(len(all_labels))))

    fig = go.Figure()
    view_of_trace = []
    for vi, (name, p, labels) in enumerate(parsed):
        lab = np.asarray(labels, dtype=object)
        for t in dict.fromkeys(labels):
            sel = lab == t
            fig.add_trace(
                go.Scatter(
                    x=p[sel, 0], y=p[sel, 1], mode="markers", name=t, legendgroup=t, visible=vi == 0,
                    marker=dict(color=color[t], size=7, opacity=0.8, line=dict(width=0.5, color="white")),
                    hovertemplate=f"{t}<br>%{{x:.3g}}, %{{y:.3g}}<extra>{name}</extra>",
                )
            )
            view_of_trace.append(vi)
    if len(parsed) > 1:
        buttons = [
            dict(label=name, method="update", args=[{"visible": [v == vi for v in view_of_trace]}])
            for vi, (name, _, _) in enumerate(parsed)
        ]
        fig.update_layout(
            updatemenus=[dict(buttons=buttons, direction="down", active=0, x=1.0, xanchor="right", y=1.02,
                              yanchor="bottom", showactive=True)]
        )
    return _finish(fig, title, caption, axis_titles[0], axis_titles[1])


def explained_variance_by_layer(
    layers: Sequence[int] | np.ndarray,
    evr: Any,
    title: str = "PCA of difference vectors: explained variance by layer",
    caption: str = "",
    k_show: int = 5,
) -> go.Figure:
    """Explained variance ratio of PC1..PCk against layer, plus the cumulative share of the first k.

    ``evr`` [layer, k] (``pca_by_layer(...)["explained_variance_ratio"]``). Traces: min(k_show, k)
    component lines, then one dashed cumulative line. A dominant PC1 is CAST's shared direction.
    """
    x = _arr(layers, "layers", 1)
    e = _arr(evr, "evr", 2)
    if e.shape[0] != len(x) or e.shape[1] < 1:
        raise ValueError(f"evr: expected shape [layer, k] with layer = {len(x)}, got {e.shape}")
    if k_show < 1:
        raise ValueError(f"k_show: expected >= 1, got {k_show}")
    k = min(k_show, e.shape[1])
    fig = go.Figure()
    colors = _colors(k)
    for i in range(k):
        fig.add_trace(go.Scatter(x=x, y=e[:, i], mode="lines+markers", name=f"PC{i + 1}",
                                 line=dict(color=colors[i]), marker=dict(size=5)))
    fig.add_trace(go.Scatter(x=x, y=e[:, :k].sum(1), mode="lines", name=f"PC1-{k} cumulative",
                             line=dict(color="#333", dash="dash")))
    fig.update_yaxes(range=[0, 1.02])
    fig.update_xaxes(tickmode="linear", dtick=1 if len(x) <= 16 else 2)
    return _finish(fig, title, caption, "layer", "explained variance ratio")


def accuracy_sweep(
    layers: Sequence[int] | np.ndarray,
    curves: Mapping[str, Sequence[float]],
    title: str = "Steering: metric by layer",
    caption: str = "",
    baselines: Mapping[str, float] | None = None,
    yaxis_title: str = "accuracy",
    xaxis_title: str = "layer",
) -> go.Figure:
    """A metric against layer, one line per curve (e.g. per steering strength), with dashed baselines.

    Traces: one line per curve, then one horizontal dashed line per baseline (e.g. zero-shot and
    few-shot accuracy) spanning the layer range.
    """
    x = _arr(layers, "layers", 1)
    if not curves:
        raise ValueError("curves: expected at least one curve {name: values}, got none")
    fig = go.Figure()
    colors = _colors(len(curves))
    for (name, vals), color in zip(curves.items(), colors):
        y = _arr(vals, f"curves[{name!r}]", 1)
        _check_len(y, len(x), f"curves[{name!r}]")
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=str(name), line=dict(color=color),
                                 marker=dict(size=5)))
    greys = ["#444", "#888", "#bbb", "#222", "#666"]
    for i, (name, val) in enumerate((baselines or {}).items()):
        v = float(val)
        fig.add_trace(go.Scatter(x=[x.min(), x.max()], y=[v, v], mode="lines", name=str(name),
                                 line=dict(color=greys[i % len(greys)], dash="dash", width=2),
                                 hovertemplate=f"{name}: {v:.3g}<extra></extra>"))
    return _finish(fig, title, caption, xaxis_title, yaxis_title)


def _row_label(key: float | str) -> str:
    """A sweep row's label: ``x2`` for the strength 2.0, a string key (e.g. ``patch``) as it is."""
    return key if isinstance(key, str) else f"x{float(key):g}"


def _sweep_rows(name: str, grid: Mapping[Any, Sequence[float]], n_layers: int) -> tuple[list[Any], np.ndarray]:
    """One construction's grid as its row keys (numeric strengths ascending, then string keys) and its
    ``[row, layer]`` values."""
    if not grid:
        raise ValueError(f"grids[{name!r}]: expected at least one row {{strength: values per layer}}, got none")
    keys = sorted((k for k in grid if not isinstance(k, str)), key=float) + [k for k in grid if isinstance(k, str)]
    z = np.stack([_arr(grid[k], f"grids[{name!r}][{k!r}]", 1) for k in keys])
    if z.shape[1] != n_layers:
        raise ValueError(f"grids[{name!r}]: expected {n_layers} values per row (one per layer), got {z.shape[1]}")
    return keys, z


def _colour_range(values: Sequence[np.ndarray], mid: float | None) -> tuple[float, float]:
    """(cmin, cmax): the finite values' range over every grid, widened to include ``mid`` when given."""
    flat = np.concatenate([v.ravel() for v in values] + ([np.array([mid])] if mid is not None else []))
    flat = flat[np.isfinite(flat)]
    if not flat.size:
        return 0.0, 1.0
    lo, hi = float(flat.min()), float(flat.max())
    return (lo, hi) if hi > lo else (lo - 0.05, hi + 0.05)


def _diverging_at(mid: float, cmin: float, cmax: float) -> list[list[Any]]:
    """A blue-white-red colour scale over [cmin, cmax] with white at ``mid`` (only one side where ``mid`` is an end)."""
    f = min(max((mid - cmin) / (cmax - cmin), 0.0), 1.0)
    below = [[0.0, "#2166ac"], [f / 2, "#92c5de"]] if f > 0 else []
    above = [[f + (1 - f) / 2, "#f4a582"], [1.0, "#b2182b"]] if f < 1 else []
    return [*below, [f, "#f7f7f7"], *above]


def _outline_cell(fig: go.Figure, name: str, col: int, row: int, subplot: int) -> None:
    """Outline the heatmap cell at category indices (``col``, ``row``) of the ``subplot``-th stacked subplot."""
    fig.add_shape(type="rect", name=name, x0=col - 0.5, x1=col + 0.5, y0=row - 0.5, y1=row + 0.5,
                  line=dict(color="black", width=3), row=subplot, col=1)


def sweep_heatmaps(
    layers: Sequence[int] | np.ndarray,
    grids: Mapping[str, Mapping[float | str, Sequence[float]]],
    chosen: Mapping[str, tuple[int, float | str]] | None = None,
    title: str = "Dev accuracy by layer and strength",
    caption: str = "",
    baselines: Mapping[str, float] | None = None,
    colorbar_title: str = "dev accuracy",
) -> go.Figure:
    """A layer x strength sweep as one heatmap per construction, stacked over a shared layer axis.

    ``grids``: {construction: {strength: [value per layer]}}; a numeric strength is labelled ``x<strength>``
    (rows ascending), a string key (e.g. ``"patch"`` for a vector patched in at one strength) as it is, so a
    construction with one row is a one-row heatmap. ``chosen``: {construction: (layer, strength key)}, drawn as
    an outlined cell (a layout shape named ``chosen <construction>``). All heatmaps share one colour scale
    (``layout.coloraxis``, the values' range); with ``baselines`` (e.g. zero-shot dev accuracy and chance,
    listed in the colour bar's title) it is white at the first one: red cells beat it, blue cells fall below it.
    NaN cells (settings not swept) stay blank. A last caption line says how to read the figure. Traces: one
    ``go.Heatmap`` per construction, in ``grids`` order.
    """
    x = [str(int(v)) for v in _arr(layers, "layers", 1)]
    if not grids:
        raise ValueError("grids: expected at least one construction {name: {strength: values}}, got none")
    rows = {name: _sweep_rows(name, g, len(x)) for name, g in grids.items()}
    for name, (layer, key) in (chosen or {}).items():
        if name not in rows or str(layer) not in x or key not in rows[name][0]:
            raise ValueError(f"chosen[{name!r}]: ({layer!r}, {key!r}) is not a cell of grids[{name!r}]")
    base = {str(k): float(v) for k, v in (baselines or {}).items()}
    mid = next(iter(base.values()), None)
    cmin, cmax = _colour_range([z for _, z in rows.values()], mid)
    n_rows = sum(len(keys) for keys, _ in rows.values())
    inner = 36 * n_rows + 56 * len(rows)  # plot area in px: the cells and a subplot title above each heatmap
    fig = make_subplots(rows=len(rows), cols=1, shared_xaxes=True, vertical_spacing=44 / inner,
                        row_heights=[len(keys) / n_rows for keys, _ in rows.values()], subplot_titles=list(rows))
    for i, (name, (keys, z)) in enumerate(rows.items(), start=1):
        labels = [_row_label(k) for k in keys]
        fig.add_trace(go.Heatmap(z=z, x=x, y=labels, coloraxis="coloraxis", name=name, text=z,
                                 texttemplate="%{text:.2f}", textfont=dict(size=10), xgap=1, ygap=1,
                                 hovertemplate=f"{name}<br>layer %{{x}}, %{{y}}: %{{z:.3f}}<extra></extra>"),
                      row=i, col=1)
        fig.update_yaxes(type="category", categoryorder="array", categoryarray=labels, row=i, col=1)
        if name in (chosen or {}):
            layer, key = (chosen or {})[name]
            _outline_cell(fig, f"chosen {name}", x.index(str(layer)), keys.index(key), i)
    note = "<br>".join(f"{k} {v:.2f}" for k, v in base.items())
    scale = _diverging_at(mid, cmin, cmax) if mid is not None else "Viridis"
    fig.update_layout(coloraxis=dict(cmin=cmin, cmax=cmax, colorscale=scale,
                                     colorbar=dict(title=dict(text=colorbar_title + (f"<br>{note}" if note else "")),
                                                   len=1.0, y=0.5, yanchor="middle")))
    fig.update_xaxes(type="category")
    how = "Rows: steering strength" + ("; outlined cell: the setting chosen on dev" if chosen else "") + (
        f"; white: {next(iter(base))}" if base else "") + "."
    fig = _finish(fig, title, f"{caption}\n{how}" if caption else how, "", "", width=960, height=inner + 150)
    fig.update_xaxes(title_text="layer", row=len(rows), col=1)
    return fig


def cost_accuracy(
    methods: Sequence[str],
    tokens: Sequence[float],
    accuracy: Sequence[float],
    lo: Sequence[float],
    hi: Sequence[float],
    title: str = "Accuracy against prompt length",
    caption: str = "",
) -> go.Figure:
    """One labelled point per method: prompt tokens per query (x) against accuracy (y) with CI error bars."""
    x, y = _arr(tokens, "tokens", 1), _arr(accuracy, "accuracy", 1)
    lo_, hi_ = _arr(lo, "lo", 1), _arr(hi, "hi", 1)
    for arr, name in ((x, "tokens"), (lo_, "lo"), (hi_, "hi")):
        _check_len(arr, len(y), name)
    if len(methods) != len(y):
        raise ValueError(f"methods: expected {len(y)} names, got {len(methods)}")
    fig = go.Figure()
    for i, (m, color) in enumerate(zip(methods, _colors(len(methods)))):
        fig.add_trace(go.Scatter(x=[x[i]], y=[y[i]], mode="markers+text", name=str(m), text=[str(m)],
                                 textposition="top center", marker=dict(size=10, color=color),
                                 error_y=dict(type="data", symmetric=False, array=[hi_[i] - y[i]],
                                              arrayminus=[y[i] - lo_[i]])))
    return _finish(fig, title, caption, "prompt tokens per query", "accuracy")


def method_bars(
    groups: Sequence[str],
    values: Mapping[str, Sequence[float]],
    intervals: Mapping[str, Sequence[tuple[float, float]]] | None = None,
    chance: Sequence[float] | None = None,
    title: str = "Accuracy by group and method",
    caption: str = "",
    yaxis_title: str = "accuracy",
) -> go.Figure:
    """Grouped bars: one group per entry of ``groups`` (e.g. target tasks), one bar per method, optional
    (lo, hi) error bars and a dashed chance mark per group. NaN values (a method not run) are left out."""
    if not values:
        raise ValueError("values: expected at least one method {name: [value per group]}, got none")
    fig = go.Figure()
    for (m, vals), color in zip(values.items(), _colors(len(values))):
        y = _arr(vals, f"values[{m!r}]", 1)
        _check_len(y, len(groups), f"values[{m!r}]")
        err = None
        if intervals and m in intervals:
            iv = np.asarray(intervals[m], dtype=float).reshape(len(groups), 2)
            err = dict(type="data", symmetric=False, array=iv[:, 1] - y, arrayminus=y - iv[:, 0])
        fig.add_trace(go.Bar(x=list(groups), y=y, name=str(m), marker_color=color, error_y=err))
    if chance is not None:
        c = _arr(chance, "chance", 1)
        _check_len(c, len(groups), "chance")
        fig.add_trace(go.Scatter(x=list(groups), y=c, mode="markers", name="chance",
                                 marker=dict(symbol="line-ew-open", size=40, color="#444", line=dict(width=2))))
    fig.update_layout(barmode="group")
    return _finish(fig, title, caption, "", yaxis_title, width=1000)


def scaling_curves(
    x: Sequence[float],
    curves: Mapping[str, Sequence[tuple[float, float, float]]],
    baselines: Mapping[str, float] | None = None,
    labels: Mapping[str, Sequence[str]] | None = None,
    title: str = "Accuracy against the number of samples",
    caption: str = "",
    xaxis_title: str = "source samples (log scale)",
    yaxis_title: str = "accuracy",
) -> go.Figure:
    """One line per curve over ``x`` (log2 axis), each point ``(value, lo, hi)`` drawn with a shaded interval
    band; optional text per point (``labels[curve]``, e.g. how many demonstrations fit) and dashed baselines."""
    xs = _arr(x, "x", 1)
    if not curves:
        raise ValueError("curves: expected at least one curve {name: [(value, lo, hi), ...]}, got none")
    if (xs <= 0).any():
        raise ValueError(f"x: a log axis needs positive values, got {xs.tolist()}")
    fig = go.Figure()
    for (label, pts), color in zip(curves.items(), _colors(len(curves))):
        v = np.asarray(pts, dtype=float)
        if v.ndim != 2 or v.shape[1] != 3:
            raise ValueError(f"curves[{label!r}]: expected (value, lo, hi) per point, got shape {v.shape}")
        _check_len(v[:, 0], len(xs), f"curves[{label!r}]")
        fig.add_trace(go.Scatter(x=np.concatenate([xs, xs[::-1]]), y=np.concatenate([v[:, 2], v[::-1, 1]]),
                                 mode="lines", fill="toself", fillcolor=_rgba(color, 0.15), line=dict(width=0),
                                 hoverinfo="skip", showlegend=False))
        text = list((labels or {}).get(label, []))
        fig.add_trace(go.Scatter(x=xs, y=v[:, 0], name=str(label), line=dict(color=color),
                                 mode="lines+markers+text" if text else "lines+markers", text=text or None,
                                 textposition="top center", marker=dict(size=6)))
    greys = ["#444", "#888", "#bbb"]
    for i, (label, val) in enumerate((baselines or {}).items()):
        fig.add_trace(go.Scatter(x=[xs.min(), xs.max()], y=[float(val)] * 2, mode="lines", name=str(label),
                                 line=dict(color=greys[i % len(greys)], dash="dash", width=2)))
    fig.update_xaxes(type="log", tickvals=xs.tolist(), ticktext=[f"{v:g}" for v in xs])
    return _finish(fig, title, caption, xaxis_title, yaxis_title)


def coefficient_heatmap(
    coef: Any,
    rows: Sequence[str],
    cols: Sequence[str],
    title: str = "Coefficients",
    caption: str = "",
) -> go.Figure:
    """A ``[row, col]`` matrix (e.g. target x library vector coefficients), diverging colours centred on 0."""
    m = _arr(coef, "coef", 2)
    if m.shape != (len(rows), len(cols)):
        raise ValueError(f"coef: expected shape ({len(rows)}, {len(cols)}), got {m.shape}")
    lim = float(np.nanmax(np.abs(m))) if m.size and np.isfinite(m).any() else 1.0
    fig = go.Figure(go.Heatmap(z=m, x=[str(c) for c in cols], y=[str(r) for r in rows], zmid=0, zmin=-lim,
                               zmax=lim, colorscale="RdBu_r", text=m, texttemplate="%{text:.2f}",
                               hovertemplate="%{y} / %{x}: %{z:.3f}<extra></extra>"))
    fig.update_xaxes(side="top", tickangle=-45, automargin=True)
    fig.update_yaxes(autorange="reversed", automargin=True)
    return _finish(fig, title, caption, "", "", width=max(600, 60 * len(cols) + 300),
                   height=max(360, 40 * len(rows) + 260), caption_shift=20)


def head_heatmaps(
    grids: Mapping[str, Any],
    title: str = "Per-head scores",
    caption: str = "",
    colorbar_title: str = "score",
) -> go.Figure:
    """Layer x head grids side by side (e.g. each head's write along the shared direction for the signal and
    each control), one diverging colour scale centred on 0 shared by all (``layout.coloraxis``). ``grids``:
    {panel title: [layer, head] array}; layers run up the y axis. Traces: one ``go.Heatmap`` per panel."""
    if not grids:
        raise ValueError("grids: expected at least one {title: [layer, head] array}, got none")
    arrays = {k: _arr(v, f"grids[{k!r}]", 2) for k, v in grids.items()}
    shapes = {a.shape for a in arrays.values()}
    if len(shapes) != 1:
        raise ValueError(f"grids: every panel needs the same [layer, head] shape, got {sorted(shapes)}")
    n_layers, n_heads = next(iter(shapes))
    flat = np.concatenate([a.ravel() for a in arrays.values()])
    lim = float(np.nanmax(np.abs(flat))) if np.isfinite(flat).any() else 1.0
    fig = make_subplots(rows=1, cols=len(arrays), shared_yaxes=True, subplot_titles=list(arrays),
                        horizontal_spacing=0.04)
    for i, (name, a) in enumerate(arrays.items(), start=1):
        fig.add_trace(go.Heatmap(z=a, x=[str(h) for h in range(n_heads)], y=[str(layer) for layer in range(n_layers)],
                                 coloraxis="coloraxis", name=name, xgap=1, ygap=1,
                                 hovertemplate=f"{name}<br>layer %{{y}}, head %{{x}}: %{{z:.3f}}<extra></extra>"),
                      row=1, col=i)
    fig.update_layout(coloraxis=dict(cmin=-lim, cmax=lim, colorscale="RdBu_r",
                                     colorbar=dict(title=dict(text=colorbar_title))))
    fig = _finish(fig, title, caption, "", "", width=max(700, 120 + len(arrays) * max(240, 30 * n_heads + 60)),
                  height=max(420, 22 * n_layers + 200))
    fig.update_xaxes(title_text="head", type="category")
    fig.update_yaxes(type="category")
    fig.update_yaxes(title_text="layer", row=1, col=1)
    return fig


# ----------------------------------------------------------------------------- saving


def _kaleido_version() -> str | None:
    """Installed kaleido version, or None."""
    try:
        return importlib.metadata.version("kaleido")
    except importlib.metadata.PackageNotFoundError:
        return None


def _export_unavailable(e: BaseException) -> bool:
    """Does this write_image error mean 'no kaleido / no browser' rather than a real failure?"""
    if isinstance(e, ImportError):
        return True
    text = f"{type(e).__name__} {e}".lower()
    return any(k in text for k in ("kaleido", "chrome", "chromium", "browser"))


def png_export_available() -> bool:
    """True when kaleido >= 1 is installed and a Chrome/Chromium binary is on PATH (or in ``BROWSER_PATH``)."""
    v = _kaleido_version()
    if v is None or int(v.split(".")[0]) < 1:
        return False
    if os.environ.get("BROWSER_PATH"):
        return Path(os.environ["BROWSER_PATH"]).is_file()
    return any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome", "chrome"))


def save_figure(fig: go.Figure, path_stem: str | Path, png: bool = True) -> list[Path]:
    """Write ``<stem>.html`` (self-contained, plotly.js inlined) and, if ``png``, ``<stem>.png``.

    Both are rendered in memory first and then written atomically (:func:`castlens.files.atomic_write`), so no
    partial file is ever visible. Raises
    RuntimeError (with the install commands) when PNG export is unavailable; nothing is written
    then. Returns the written paths, HTML first.
    """
    stem = Path(path_stem)
    if stem.suffix in (".html", ".png"):
        stem = stem.with_suffix("")
    html_path = Path(f"{stem}.html")
    png_path = Path(f"{stem}.png")
    html_path.parent.mkdir(parents=True, exist_ok=True)

    if png:
        v = _kaleido_version()
        if v is None or int(v.split(".")[0]) < 1:
            raise RuntimeError(f"kaleido is {'not installed' if v is None else f'version {v}'}. {PNG_EXPORT_FIX}")

    blobs: list[tuple[Path, bytes | str]] = [(html_path, fig.to_html(include_plotlyjs=True, full_html=True))]
    if png:  # rendered before anything is written: a failed export leaves no file
        try:
            blobs.append((png_path, fig.to_image(format="png")))
        except Exception as e:
            if _export_unavailable(e):
                raise RuntimeError(f"PNG export failed ({type(e).__name__}: {str(e).strip()}). {PNG_EXPORT_FIX}") from e
            raise
    return [atomic_write(path, data) for path, data in blobs]

