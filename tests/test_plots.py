"""Tests for castlens.plots: figure structure, captions, and save_figure's HTML/PNG/atomic behaviour."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest

from castlens import plots as P

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYERS = list(range(6))
LONG_CAPTION = (
    "Mean off-diagonal cosine between task-mean difference vectors (few-shot minus zero-shot, last token) "
    "per layer, with 95% bootstrap bands; controls are random vectors, a length-matched prefix without "
    "demonstrations, and shuffled labels."
)


def _caption(fig: go.Figure):
    caps = [a for a in fig.layout.annotations if a.name == "caption"]
    assert len(caps) == 1, "exactly one caption annotation"
    return caps[0]


def _check_common(fig: go.Figure, title: str, x_title: str, y_title: str, caption: str | None = None) -> None:
    assert fig.layout.title.text == title
    assert fig.layout.xaxis.title.text == x_title
    assert fig.layout.yaxis.title.text == y_title
    if caption is not None:
        cap = _caption(fig)
        assert cap.text.replace("<br>", " ") == caption
        assert cap.yref == "paper" and cap.y == 0 and cap.yshift < 0  # under the x axis
        assert cap.font.size <= 12


def _curve(offset: float, band: bool = True):
    m = np.linspace(0, 0.8, len(LAYERS)) + offset
    return {"mean": m, "lo": m - 0.05 if band else None, "hi": m + 0.05 if band else None}


# ----------------------------------------------------------------------------- figures


def test_cosine_by_layer_traces_bands_titles_caption():
    import torch  # plots must also accept tensors

    curves = {
        "ICL": {**_curve(0.1), "bias": np.zeros(6)},  # extra keys (from the geometry CI dict) are ignored
        "random": {"mean": torch.zeros(6), "lo": None, "hi": None},
        "shuffled labels": _curve(0.0),
    }
    fig = P.cosine_by_layer(LAYERS, curves, title="Cross-task cosine", caption=LONG_CAPTION)
    assert len(fig.data) == 5  # 2 bands + 3 lines
    bands = [t for t in fig.data if t.fill == "toself"]
    lines = [t for t in fig.data if t.fill != "toself"]
    assert len(bands) == 2 and [t.name for t in lines] == ["ICL", "random", "shuffled labels"]
    band = bands[0]
    np.testing.assert_allclose(band.y, np.concatenate([curves["ICL"]["hi"], curves["ICL"]["lo"][::-1]]))
    assert band.showlegend is False and band.legendgroup == "ICL"
    _check_common(fig, "Cross-task cosine", "layer", "mean cross-task cosine", LONG_CAPTION)
    cap = _caption(fig).text
    assert "<br>" in cap and all(len(line) <= 110 for line in cap.split("<br>"))


def test_cosine_by_layer_rejects_bad_curves():
    with pytest.raises(ValueError, match=r"curves\['x'\]\['mean'\]: expected 6 values"):
        P.cosine_by_layer(LAYERS, {"x": {"mean": [0.1, 0.2]}})
    with pytest.raises(ValueError, match=r"'lo' and 'hi' must both"):
        P.cosine_by_layer(LAYERS, {"x": {"mean": np.zeros(6), "lo": np.zeros(6), "hi": None}})
    with pytest.raises(ValueError, match="curves"):
        P.cosine_by_layer(LAYERS, {})


def test_cosine_heatmap():
    rng = np.random.default_rng(0)
    names = ["antonym", "capital", "translate"]
    stack = rng.uniform(-1, 1, size=(4, 3, 3))
    fig = P.cosine_heatmap(stack, names, layer=2, title="Layer 2", caption="Cosines at layer 2.")
    assert len(fig.data) == 1
    hm = fig.data[0]
    assert isinstance(hm, go.Heatmap)
    np.testing.assert_allclose(np.asarray(hm.z, dtype=float), stack[2])  # picks the layer from [layer, task, task]
    assert (hm.zmin, hm.zmax, hm.zmid) == (-1, 1, 0)
    assert "%{text:.2f}" in hm.texttemplate
    assert list(hm.x) == names and list(hm.y) == names
    low, high = hm.colorscale[0][1], hm.colorscale[-1][1]
    assert low != high  # diverging: blue for -1, red for +1
    _check_common(fig, "Layer 2", "task", "task", "Cosines at layer 2.")
    fig2 = P.cosine_heatmap(stack[1], names, layer=1)
    assert "layer 1" in fig2.layout.title.text and fig2.layout.xaxis.title.text == "task"
    with pytest.raises(ValueError, match="mat: expected shape"):
        P.cosine_heatmap(stack[0, :2], names, layer=0)


def test_pca_scatter_with_view_dropdown():
    pts = np.arange(12.0).reshape(6, 2)
    labels = ["a", "a", "b", "b", "c", "c"]
    zf = np.arange(16.0).reshape(8, 2)
    zf_labels = ["zero-shot"] * 4 + ["few-shot"] * 4
    fig = P.pca_scatter(pts, labels, title="PCA", caption="PC1 vs PC2.",
                        extra_views={"zero-shot / few-shot": (zf, zf_labels)})
    assert [t.name for t in fig.data] == ["a", "b", "c", "zero-shot", "few-shot"]
    assert [t.visible for t in fig.data] == [True, True, True, False, False]
    np.testing.assert_allclose(fig.data[1].x, [4.0, 6.0])  # points of label "b"
    menu = fig.layout.updatemenus[0]
    assert [b.label for b in menu.buttons] == ["difference vectors", "zero-shot / few-shot"]
    assert menu.buttons[0].args[0]["visible"] == [True, True, True, False, False]
    assert menu.buttons[1].args[0]["visible"] == [False, False, False, True, True]
    _check_common(fig, "PCA", "PC1", "PC2", "PC1 vs PC2.")
    plain = P.pca_scatter(pts, labels, title="PCA", caption="x")
    assert len(plain.data) == 3 and not plain.layout.updatemenus
    with pytest.raises(ValueError, match=r"points: expected shape \[n, 2\] with n = 5"):
        P.pca_scatter(pts, labels[:5])


def test_pca_scatter_keeps_label_colour_across_views():
    fig = P.pca_scatter(np.zeros((2, 2)), ["a", "b"], extra_views={"v": (np.ones((2, 2)), ["b", "a"])})
    colour = {}
    for t in fig.data:
        colour.setdefault(t.name, set()).add(t.marker.color)
    assert all(len(c) == 1 for c in colour.values()) and colour["a"] != colour["b"]


def test_explained_variance_by_layer():
    evr = np.tile(np.array([0.5, 0.2, 0.1, 0.05, 0.03, 0.02, 0.01]), (6, 1))
    fig = P.explained_variance_by_layer(LAYERS, evr, title="EVR", caption="Explained variance.", k_show=3)
    assert [t.name for t in fig.data] == ["PC1", "PC2", "PC3", "PC1-3 cumulative"]
    np.testing.assert_allclose(fig.data[-1].y, np.full(6, 0.8))
    _check_common(fig, "EVR", "layer", "explained variance ratio", "Explained variance.")
    assert len(P.explained_variance_by_layer(LAYERS, evr[:, :2], title="t", caption="c").data) == 3  # k < k_show
    with pytest.raises(ValueError, match="evr: expected shape"):
        P.explained_variance_by_layer(LAYERS, evr[:3])


def test_accuracy_sweep_with_baselines():
    curves = {"alpha=1": np.linspace(0.2, 0.6, 6), "alpha=4": list(np.linspace(0.2, 0.8, 6))}
    fig = P.accuracy_sweep(LAYERS, curves, title="Steering", caption="Accuracy by layer.",
                           baselines={"zero-shot": 0.2, "few-shot": 0.85})
    assert len(fig.data) == 4
    assert [t.name for t in fig.data] == ["alpha=1", "alpha=4", "zero-shot", "few-shot"]
    base = fig.data[3]
    assert base.line.dash == "dash" and list(base.y) == [0.85, 0.85] and list(base.x) == [0, 5]
    _check_common(fig, "Steering", "layer", "accuracy", "Accuracy by layer.")
    assert len(P.accuracy_sweep(LAYERS, curves, title="t", caption="c").data) == 2


def _hand_grid():
    """Two strengths x 3 layers for one added construction, one row for a patched one; NaN: a setting not swept."""
    return {"cast_mean_diff": {2.0: [0.30, 0.50, 0.40], 0.5: [0.20, 0.25, float("nan")]},
            "task_vector": {"patch": [0.10, 0.20, 0.15]}}


def test_sweep_heatmaps_grid_chosen_cells_and_shared_scale():
    fig = P.sweep_heatmaps([3, 6, 9], _hand_grid(), {"cast_mean_diff": (6, 2.0), "task_vector": (9, "patch")},
                           title="Sweep", caption="Dev sweep.", baselines={"zero-shot (dev)": 0.25, "chance": 0.2})
    cast, patch = fig.data
    assert isinstance(cast, go.Heatmap) and isinstance(patch, go.Heatmap)
    assert list(cast.x) == ["3", "6", "9"] and list(cast.y) == ["x0.5", "x2"]  # strengths ascending, bottom up
    np.testing.assert_allclose(np.asarray(cast.z, dtype=float), [[0.20, 0.25, np.nan], [0.30, 0.50, 0.40]])
    assert list(patch.y) == ["patch"] and np.asarray(patch.z, dtype=float).shape == (1, 3)  # a one-row heatmap
    np.testing.assert_allclose(np.asarray(patch.z, dtype=float), [[0.10, 0.20, 0.15]])
    assert cast.coloraxis == patch.coloraxis == "coloraxis"  # one colour scale for all
    ax = fig.layout.coloraxis
    assert (ax.cmin, ax.cmax) == pytest.approx((0.10, 0.50))
    white = [pos for pos, colour in ax.colorscale if colour == "#f7f7f7"]
    assert white == [pytest.approx((0.25 - 0.10) / 0.40)]  # white at zero-shot
    assert "zero-shot (dev) 0.25" in ax.colorbar.title.text and "chance 0.20" in ax.colorbar.title.text
    marks = {s.name: s for s in fig.layout.shapes}
    assert set(marks) == {"chosen cast_mean_diff", "chosen task_vector"}
    m = marks["chosen cast_mean_diff"]  # layer 6 is column 1, strength 2 is row 1 (category indices)
    assert (m.x0, m.x1, m.y0, m.y1) == (0.5, 1.5, 0.5, 1.5) and (m.xref, m.yref) == ("x", "y")
    t = marks["chosen task_vector"]
    assert (t.x0, t.x1, t.y0, t.y1) == (1.5, 2.5, -0.5, 0.5) and (t.xref, t.yref) == ("x2", "y2")
    assert fig.layout.title.text == "Sweep" and fig.layout.xaxis2.title.text == "layer"
    cap = _caption(fig).text.replace("<br>", " ")
    assert cap.startswith("Dev sweep.") and "outlined cell: the setting chosen on dev" in cap


def test_sweep_heatmaps_without_baselines_or_choice_and_bad_input():
    fig = P.sweep_heatmaps([3, 6, 9], {"a": {1.0: [0.1, 0.2, 0.3]}})
    assert len(fig.data) == 1 and not fig.layout.shapes
    assert (fig.layout.coloraxis.cmin, fig.layout.coloraxis.cmax) == pytest.approx((0.1, 0.3))
    with pytest.raises(ValueError, match=r"grids\['a'\]: expected 3 values per row"):
        P.sweep_heatmaps([3, 6, 9], {"a": {1.0: [0.1, 0.2]}})
    with pytest.raises(ValueError, match=r"chosen\['a'\]: \(12, 1.0\) is not a cell"):
        P.sweep_heatmaps([3, 6, 9], {"a": {1.0: [0.1, 0.2, 0.3]}}, {"a": (12, 1.0)})
    with pytest.raises(ValueError, match="grids"):
        P.sweep_heatmaps([3, 6, 9], {})


def test_transfer_sweep_figure_draws_the_part_sweep():
    from castlens.experiments.results import Setting, SweepPoint, TargetResult
    from castlens.experiments.transfer import sweep_figure

    def pt(c: str, layer: int | None, s: float | None, acc: float) -> SweepPoint:
        return SweepPoint(Setting(c, layer, s), acc)

    sweep = [pt("unsteered", None, None, 0.3), pt("cast_mean_diff", 3, 1.0, 0.4), pt("cast_mean_diff", 6, 1.0, 0.6),
             pt("cast_mean_diff", 3, 4.0, 0.2), pt("cast_mean_diff", 6, 4.0, 0.1), pt("task_vector", 3, 1.0, 0.35),
             pt("task_vector", 6, 1.0, 0.25)]
    part = TargetResult("t", 10, [0] * 10, 0.5, 0.5, {}, n_dev=8, layers=[3, 6], sweep=sweep,
                        chosen={"cast_mean_diff": sweep[2], "task_vector": sweep[5]})
    fig = sweep_figure(part, "cap")
    cast, patch = fig.data
    np.testing.assert_allclose(np.asarray(cast.z, dtype=float), [[0.4, 0.6], [0.2, 0.1]])
    assert list(patch.y) == ["patch"] and list(np.asarray(patch.z, dtype=float)[0]) == [0.35, 0.25]
    marks = {s.name: (s.x0, s.y0) for s in fig.layout.shapes}
    assert marks == {"chosen cast_mean_diff": (0.5, -0.5), "chosen task_vector": (-0.5, -0.5)}
    assert "zero-shot (dev) 0.30" in fig.layout.coloraxis.colorbar.title.text

def test_caption_wrapping_and_no_caption():
    fig = P.accuracy_sweep(LAYERS, {"a": np.zeros(6)}, title="t", caption="line one\nline two " + "x " * 80)
    lines = _caption(fig).text.split("<br>")
    assert lines[0] == "line one" and len(lines) >= 3
    fig = P.accuracy_sweep(LAYERS, {"a": np.zeros(6)}, title="t", caption="")
    assert not [a for a in fig.layout.annotations if a.name == "caption"]


# ----------------------------------------------------------------------------- save_figure


def _fig():
    return P.accuracy_sweep(LAYERS, {"a": np.linspace(0, 1, 6)}, title="Save test", caption="A caption.")


def _png_export_works() -> bool:
    """Independent probe of plotly's own PNG export (kaleido + a Chrome/Chromium binary)."""
    try:
        return go.Figure().to_image(format="png", width=50, height=50).startswith(PNG_MAGIC)
    except Exception:  # noqa: BLE001 - any failure means export is unavailable here
        return False


@pytest.fixture(scope="module")
def png_available() -> bool:
    return _png_export_works()


def test_save_html_is_self_contained(tmp_path: Path):
    paths = P.save_figure(_fig(), tmp_path / "sub" / "fig", png=False)
    assert paths == [tmp_path / "sub" / "fig.html"]
    html = paths[0].read_text(encoding="utf-8")
    assert paths[0].stat().st_size > 1_000_000  # plotly.js inlined
    assert "plotly.js v" in html and "Save test" in html and "A caption." in html
    assert '<script src="http' not in html
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["fig.html"]  # no temp files left
    assert P.save_figure(_fig(), tmp_path / "sub" / "fig.html", png=False) == paths  # suffix is dropped


def test_save_png_or_clear_error(tmp_path: Path, png_available: bool):
    """Real export: a valid PNG where kaleido + Chromium work, else the RuntimeError with the fix."""
    if png_available:
        paths = P.save_figure(_fig(), tmp_path / "fig")
        assert paths == [tmp_path / "fig.html", tmp_path / "fig.png"]
        data = (tmp_path / "fig.png").read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000
    else:
        with pytest.raises(RuntimeError, match=r"apt-get install -y chromium") as err:
            P.save_figure(_fig(), tmp_path / "fig")
        assert 'pip install "kaleido>=1"' in str(err.value)
        assert list(tmp_path.iterdir()) == []


def test_missing_kaleido_raises_clear_error(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(P, "_kaleido_version", lambda: None)
    with pytest.raises(RuntimeError) as err:
        P.save_figure(_fig(), tmp_path / "fig")
    msg = str(err.value)
    assert "kaleido is not installed" in msg
    assert "apt-get install -y chromium" in msg and 'pip install "kaleido>=1"' in msg and "png=False" in msg
    assert list(tmp_path.iterdir()) == []


def test_missing_browser_raises_clear_error_and_cleans_up(tmp_path: Path, monkeypatch):
    """Simulated: plotly's own message when kaleido finds no Chrome."""
    monkeypatch.setattr(P, "_kaleido_version", lambda: "1.5.0")

    def no_chrome(self, *args, **kwargs):
        raise RuntimeError("\n\nKaleido requires Google Chrome to be installed.\n\n    $ plotly_get_chrome\n")

    monkeypatch.setattr(go.Figure, "to_image", no_chrome)
    with pytest.raises(RuntimeError, match=r"apt-get install -y chromium") as err:
        P.save_figure(_fig(), tmp_path / "fig")
    assert "Kaleido requires Google Chrome" in str(err.value) and err.value.__cause__ is not None
    assert list(tmp_path.iterdir()) == []


def test_real_export_with_unusable_browser_path_raises_clear_error(tmp_path: Path, monkeypatch):
    """Real kaleido (when installed) pointed at a browser that does not exist."""
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chromium"))
    with pytest.raises(RuntimeError, match=r"apt-get install -y chromium"):
        P.save_figure(_fig(), tmp_path / "fig")
    assert [p for p in tmp_path.iterdir()] == []


def test_failed_png_render_writes_nothing(tmp_path: Path, monkeypatch):
    """A non-export failure while rendering the PNG propagates unchanged; old files stay intact, no temp file."""
    (tmp_path / "fig.html").write_text("OLD HTML")
    (tmp_path / "fig.png").write_bytes(b"OLD PNG")
    monkeypatch.setattr(P, "_kaleido_version", lambda: "1.5.0")

    def disk_full(self, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(go.Figure, "to_image", disk_full)
    with pytest.raises(OSError, match="No space left"):
        P.save_figure(_fig(), tmp_path / "fig")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.html", "fig.png"]
    assert (tmp_path / "fig.html").read_text() == "OLD HTML" and (tmp_path / "fig.png").read_bytes() == b"OLD PNG"


def test_failed_write_leaves_no_partial_file(tmp_path: Path, monkeypatch):
    """The disk fills while the HTML is being written: the temp file is removed and nothing appears."""
    import castlens.files as files

    monkeypatch.setattr(P, "_kaleido_version", lambda: "1.5.0")
    monkeypatch.setattr(go.Figure, "to_image", lambda self, *a, **k: PNG_MAGIC)

    def full(fd):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(OSError, match="disk full"):
        P.save_figure(_fig(), tmp_path / "fig")
    assert list(tmp_path.iterdir()) == []


def test_successful_write_replaces_old_files_without_temp_leftovers(tmp_path: Path, monkeypatch):
    (tmp_path / "fig.png").write_bytes(b"OLD")
    monkeypatch.setattr(P, "_kaleido_version", lambda: "1.5.0")
    monkeypatch.setattr(go.Figure, "to_image", lambda self, *a, **k: PNG_MAGIC + b"new")
    paths = P.save_figure(_fig(), tmp_path / "fig")
    assert [p.name for p in paths] == ["fig.html", "fig.png"]
    assert (tmp_path / "fig.png").read_bytes() == PNG_MAGIC + b"new"
    assert sorted(os.listdir(tmp_path)) == ["fig.html", "fig.png"]


def test_cost_accuracy_points_and_error_bars():
    fig = P.cost_accuracy(["zero", "icl"], [50, 400], [0.3, 0.6], [0.25, 0.5], [0.35, 0.7], caption="c")
    assert [t.name for t in fig.data] == ["zero", "icl"]
    icl = fig.data[1]
    assert list(icl.x) == [400] and list(icl.y) == [0.6]
    assert icl.error_y.array[0] == pytest.approx(0.1) and icl.error_y.arrayminus[0] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="tokens"):
        P.cost_accuracy(["a"], [1, 2], [0.5], [0.4], [0.6])


def test_method_bars_groups_intervals_and_chance():
    fig = P.method_bars(["t1", "t2"], {"a": [0.5, 0.7], "b": [0.4, float("nan")]},
                            {"a": [(0.4, 0.6), (0.6, 0.9)]}, chance=[0.25, 0.33])
    a, b, chance = fig.data
    assert list(a.y) == [0.5, 0.7] and a.error_y.array[1] == pytest.approx(0.2)
    assert b.error_y.array is None and list(chance.y) == [0.25, 0.33]
    with pytest.raises(ValueError, match="values"):
        P.method_bars(["t1"], {"a": [0.1, 0.2]})


def test_coefficient_heatmap_shape_and_symmetric_scale():
    fig = P.coefficient_heatmap([[1.0, -3.0], [0.5, 2.0]], ["t1", "t2"], ["a", "b"])
    h = fig.data[0]
    assert h.zmin == -3 and h.zmax == 3 and list(h.x) == ["a", "b"]
    with pytest.raises(ValueError, match="expected shape"):
        P.coefficient_heatmap([[1.0, 2.0]], ["t1", "t2"], ["a", "b"])


def test_scaling_curves_bands_points_labels_and_log_axis():
    fig = P.scaling_curves([4, 8, 16], {"a": [(0.3, 0.2, 0.4), (0.5, 0.4, 0.6), (0.6, 0.5, 0.7)]},
                               baselines={"zero": 0.25}, labels={"a": ["4", "8", "9"]})
    band, line, base = fig.data
    assert band.fill == "toself" and band.mode == "lines"  # an outline only: no stray markers at the bounds
    assert list(band.x) == [4, 8, 16, 16, 8, 4] and list(band.y) == [0.4, 0.6, 0.7, 0.5, 0.4, 0.2]
    assert list(line.y) == [0.3, 0.5, 0.6] and list(line.text) == ["4", "8", "9"]
    assert list(base.y) == [0.25, 0.25] and fig.layout.xaxis.type == "log"
    with pytest.raises(ValueError, match="positive"):
        P.scaling_curves([0, 1], {"a": [(0.1, 0, 0.2)] * 2})
    with pytest.raises(ValueError, match="value, lo, hi"):
        P.scaling_curves([1, 2], {"a": [0.1, 0.2]})
