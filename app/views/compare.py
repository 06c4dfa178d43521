"""View 4, comparison of two runs (A = the main run, B = ``State.compare``).

* JS divergence per step x layer as a heat map (mean over the prompt's word tokens of each token's
  spatial-map divergence, ``analysis.divergence.map_js_divergence``); click a cell to select that step and layer.
* Per-token JS divergence at the current step and layer ("all layers": the mean over layers).
* Both PCA trajectories in one frame, on a basis fit on both runs' latents when both ship
  ``latents_noise_fp16.npz`` (otherwise each run's own PCA, and the note says so).
* Per-step latent deltas, and both images side by side at the current step.
* When the runs are not comparable, the reader's ``compatible`` verdict is shown: what differs.
"""
from __future__ import annotations

import html
from typing import Any

import numpy as np
import panel as pn
from bokeh.events import Tap
from bokeh.models import ColorBar, ColumnDataSource, FactorRange, HoverTool, LinearColorMapper, Span
from bokeh.plotting import figure

from app.state import ALL_LAYERS
from app.views.common import (ACCENT, CSS, PALETTES, RUN_COLOURS, View, bar_figure, held, reported, curve_figure, guarded, image_figure, rgba,
                              rgba_source, set_image_extent, style)


class CompareView(View):
    def __init__(self, **params: Any):
        super().__init__(**params)
        # ---- loading the second run
        self.url = pn.widgets.TextInput(label="Second run (URL or folder)", placeholder="datasets/compare or https://…/run/", width=380,
                                     tags=["dv:compare-url"])
        self.load = pn.widgets.Button(label="Compare", color="primary", width=100, margin=(23, 5, 5, 5),
                                      tags=["dv:compare-load"])
        self.folder = pn.widgets.FileInput(directory=True, label="…or pick a run folder", width=260, margin=(23, 5, 5, 5),
                                         tags=["dv:compare-folder"])
        self.clear = pn.widgets.Button(label="Clear", width=80, margin=(23, 5, 5, 5))
        self.load.on_click(lambda _e: self._submit(self.url.value))
        self.url.param.watch(lambda _e: self._submit(self.url.value), "enter_pressed")
        self.folder.param.watch(self._on_folder, "value")
        self.clear.on_click(lambda _e: setattr(self.state, "compare", ""))
        self.status = pn.pane.HTML("", sizing_mode="stretch_width", styles={"font-size": "11pt"}, stylesheets=[CSS])

        # ---- JS heat map (step x layer)
        self.js_mapper = LinearColorMapper(name="compare-js-cmap", palette=PALETTES["viridis"], low=0, high=1, nan_color="#eeeeee")
        self.js_source = ColumnDataSource(name="compare-js", data={"step": [], "layer": [], "layer_index": [], "js": []})
        self.js_fig = figure(name="compare-js-figure", title="JS divergence A vs B (bits), step × layer", width=560, height=300,
                             y_range=FactorRange(), tools="tap", toolbar_location=None)
        self.js_fig.rect("step", "layer", width=1, height=1, source=self.js_source, line_color=None,
                         fill_color={"field": "js", "transform": self.js_mapper})
        self.js_fig.add_tools(HoverTool(tooltips=[("step", "@step"), ("layer", "@layer"), ("JS", "@js{0.0000}")]))
        self.js_fig.add_layout(ColorBar(color_mapper=self.js_mapper, width=12, major_label_text_font_size="10pt"), "right")
        self.js_marker = Span(location=0, dimension="height", line_color=ACCENT, line_width=2, name="compare-js-marker")
        self.js_fig.add_layout(self.js_marker)
        self.js_fig.xaxis.axis_label = "step"
        self.js_fig.yaxis.axis_label = "layer"
        self.js_fig.grid.visible = False
        style(self.js_fig)
        self.js_fig.on_event(Tap, held(self._on_js_tap))

        # ---- per-token JS at the current step/layer
        self.token_source = ColumnDataSource(name="compare-token-js", data={"token": [], "js": []})
        self.token_fig = bar_figure("compare-token-js-figure", "Per-token JS divergence", self.token_source,
                                    x="token", top="js", y_label="JS (bits)", fmt="0.0000", color="#8172b3", height=300)

        # ---- trajectories on a shared basis
        self.pca_sources = [ColumnDataSource(name=f"compare-pca-{k}", data={"x": [], "y": [], "step": []}) for k in "ab"]
        self.pca_current = ColumnDataSource(name="compare-pca-current", data={"x": [], "y": [], "color": []})
        self.pca_fig = figure(name="compare-pca-figure", title="Latent trajectories", width=480, height=360,
                              tools="pan,wheel_zoom,reset", toolbar_location="right")
        for source, colour, label in zip(self.pca_sources, RUN_COLOURS, ("A", "B")):
            self.pca_fig.line("x", "y", source=source, color=colour, line_width=2, legend_label=f"run {label}")
            self.pca_fig.scatter("x", "y", source=source, color=colour, size=6)
        self.pca_fig.scatter("x", "y", source=self.pca_current, size=16, fill_alpha=0, line_color="color", line_width=3)
        self.pca_fig.legend.location = "top_left"
        self.pca_fig.toolbar.active_scroll = None
        style(self.pca_fig)
        self.pca_note = pn.pane.HTML("", styles={"font-size": "10.5pt", "color": "#555"}, width=360, margin=(40, 10))

        # ---- latent deltas
        self.delta_source = ColumnDataSource(name="compare-delta", data={"step": [], "delta": []})
        self.delta_fig = curve_figure("compare-delta-figure", "Per-step latent delta", "Δ", height=300, width=460)
        self.delta_fig.line("step", "delta", source=self.delta_source, line_width=2, color="#dd8452")
        self.delta_fig.scatter("step", "delta", source=self.delta_source, size=5, color="#dd8452")
        self.delta_marker = Span(location=0, dimension="height", line_color=ACCENT, line_width=2, line_dash="dashed", name="compare-delta-marker")
        self.delta_fig.add_layout(self.delta_marker)
        self.delta_fig.on_event(Tap, held(self._on_curve_tap))

        # ---- images side by side
        self.image_sources = [rgba_source(f"compare-image-{k}") for k in "ab"]
        self.image_figs = [image_figure(f"compare-image-{k}-figure", f"run {k.upper()}", px=260, tools="") for k in "ab"]
        for fig, source, colour in zip(self.image_figs, self.image_sources, RUN_COLOURS):
            fig.image_rgba(image="image", x="x", y="y", dw="dw", dh="dh", source=source)
            fig.outline_line_color = colour
            fig.outline_line_width = 3

        # shown only while a second run is loaded
        self.figures = pn.Column(
            pn.Row(*[pn.pane.Bokeh(f) for f in self.image_figs], pn.pane.Bokeh(self.token_fig)),
            pn.Row(pn.pane.Bokeh(self.js_fig), pn.pane.Bokeh(self.delta_fig)),
            pn.Row(pn.pane.Bokeh(self.pca_fig), self.pca_note),
            visible=False,
        )

        self.state.param.watch(self._on_step, "step")
        self.state.param.watch(self._on_layer, ["layer", "token", "merge_words"])
        self.store.param.watch(self._on_comparison, ["comparison", "other"])
        self._on_comparison()

    def __panel__(self) -> Any:
        return pn.Column(
            pn.Row(self.url, self.load, self.folder, self.clear),
            self.status,
            self.figures,
        )

    # ---- loading ---------------------------------------------------------------------------------

    def _submit(self, text: str) -> None:
        text = (text or "").strip()
        if text:
            self.state.compare = text

    @reported
    def _on_folder(self, event: Any) -> None:
        if not event.new:
            return
        names = self.folder.filename if isinstance(self.folder.filename, list) else [self.folder.filename]
        values = event.new if isinstance(event.new, list) else [event.new]
        self.state.compare = self.store.add_upload(names, values)

    # ---- updates --------------------------------------------------------------------------------

    def refresh(self) -> None:
        self._on_comparison()

    @guarded
    def _on_comparison(self, *_: Any) -> None:
        comparison = self.store.comparison
        other = self.store.other
        if other is not None and self.url.value != self.state.compare and not self.state.compare.startswith("upload:"):
            self.url.value = self.state.compare
        if comparison is None:
            self.status.object = ("<div class='dv-note'>Load a second run to compare it with the current one: type its URL or "
                                  "folder, pick a folder, or open the page with <code>?compare=URL</code>.</div>")
            self._clear()
            self.figures.visible = False
            return
        self.figures.visible = True
        a, b = comparison.a, comparison.b
        head = (f"<b style='color:{RUN_COLOURS[0]}'>A</b> {html.escape(a.label)} — “{html.escape(a.prompt)}” &nbsp;·&nbsp; "
                f"<b style='color:{RUN_COLOURS[1]}'>B</b> {html.escape(b.label)} — “{html.escape(b.prompt)}”")
        if comparison.ok:
            self.status.object = f"<div class='dv-ok dv-compare-status'>{head}<br>Comparable ({html.escape(comparison.pairing)}).</div>"
        else:
            items = "".join(f"<li>{html.escape(d)}</li>" for d in comparison.differences)
            self.status.object = (f"<div class='dv-warn dv-compare-status'>{head}<br><b>These runs cannot be compared step by step:</b>"
                                  f"<ul>{items}</ul></div>")
        self._update_js()
        self._update_trajectories()
        self._update_delta()
        self._on_step()

    def _clear(self) -> None:
        self.js_source.data = {"step": [], "layer": [], "layer_index": [], "js": []}
        self.token_source.data = {"token": [], "js": []}
        for source in self.pca_sources:
            source.data = {"x": [], "y": [], "step": []}
        self.pca_current.data = {"x": [], "y": [], "color": []}
        self.delta_source.data = {"step": [], "delta": []}
        self.pca_note.object = ""

    def _update_js(self) -> None:
        comparison = self.store.comparison
        a = comparison.a
        labels = [f"L{i}" for i in a.cross_layers]
        self.js_fig.y_range.factors = labels[::-1]  # L0 at the top
        if not comparison.ok or not labels:
            self.js_source.data = {"step": [], "layer": [], "layer_index": [], "js": []}
            self.js_fig.title.text = "JS divergence: not comparable"
            return
        _per_token, grid = comparison.js()
        n, nl = grid.shape
        steps, layers = np.meshgrid(np.arange(n), np.arange(nl), indexing="ij")
        self.js_source.data = {"step": steps.ravel(), "layer": [labels[i] for i in layers.ravel()],
                               "layer_index": np.asarray(a.cross_layers)[layers.ravel()], "js": grid.ravel()}
        finite = grid[np.isfinite(grid)]
        self.js_mapper.update(low=0.0, high=float(finite.max()) if finite.size and finite.max() > 0 else 1.0)
        self.js_fig.title.text = "JS divergence A vs B (bits, mean over words), step × layer"

    def _update_token_js(self) -> None:
        comparison = self.store.comparison
        if comparison is None or not comparison.ok or not comparison.pairs:
            self.token_source.data = {"token": [], "js": []}
            return
        per_token, _grid = comparison.js()
        step = min(self.state.step, per_token.shape[0] - 1)
        layer = self.state.layer
        a = comparison.a
        if layer != ALL_LAYERS and int(layer) in a.cross_layers:
            values = per_token[step, a.cross_layers.index(int(layer))]
            where = f"L{layer}"
        else:
            values = per_token[step].mean(axis=0)
            where = "mean over layers"
        labels = [f"{i}:{text}" for i, _j, text in comparison.pairs]
        self.token_fig.x_range.factors = labels
        self.token_source.data = {"token": labels, "js": np.asarray(values, np.float64)}
        self.token_fig.title.text = f"Per-token JS · {where} · step {step}"

    def _update_trajectories(self) -> None:
        comparison = self.store.comparison
        ca, cb, (v1, v2), how = comparison.trajectories()
        for source, coords in zip(self.pca_sources, (ca, cb)):
            source.data = {"x": coords[:, 0], "y": coords[:, 1], "step": np.arange(len(coords))}
        if np.isfinite(v1):
            self.pca_fig.xaxis.axis_label = f"PC1 ({100 * v1:.1f}% of variance)"
            self.pca_fig.yaxis.axis_label = f"PC2 ({100 * v2:.1f}% of variance)"
        else:
            self.pca_fig.xaxis.axis_label = "PC1 (own basis per run)"
            self.pca_fig.yaxis.axis_label = "PC2 (own basis per run)"
        self.pca_note.object = html.escape(how)

    def _update_delta(self) -> None:
        values, label, how = self.store.comparison.latent_delta()
        self.delta_source.data = {"step": np.arange(len(values)), "delta": np.asarray(values, np.float64)}
        self.delta_fig.yaxis.axis_label = label
        self.delta_fig.title.text = "Per-step latent delta"
        self.pca_note.object = f"{self.pca_note.object}<br><br>Latent delta: {html.escape(how)}."

    @guarded
    def _on_layer(self, *_: Any) -> None:
        self._update_token_js()

    @guarded
    def _on_step(self, *_: Any) -> None:
        comparison = self.store.comparison
        if comparison is None:
            return
        step = self.state.step
        self.js_marker.location = step
        self.delta_marker.location = step
        currents = {"x": [], "y": [], "color": []}
        for source, colour in zip(self.pca_sources, RUN_COLOURS):
            xs, ys = source.data["x"], source.data["y"]
            if len(xs):
                k = min(step, len(xs) - 1)
                currents["x"].append(float(xs[k]))
                currents["y"].append(float(ys[k]))
                currents["color"].append(colour)
        self.pca_current.data = currents
        for data, source, fig, name in zip((comparison.a, comparison.b), self.image_sources, self.image_figs, "AB"):
            k = min(step, data.n_steps - 1)
            image = data.image(k)
            h, w = image.shape[:2]
            set_image_extent(fig, h, w)
            source.data = {"image": [rgba(image)], "x": [0], "y": [0], "dw": [w], "dh": [h], "step": [k]}
            fig.title.text = f"run {name} · step {k}"
        self._update_token_js()

    def _on_js_tap(self, event: Any) -> None:
        comparison = self.store.comparison
        if comparison is None or event.x is None or event.y is None:
            return
        step = int(np.clip(round(event.x), 0, comparison.a.n_steps - 1))
        row = int(np.floor(event.y))  # categorical axis: factor k spans [k, k+1]; factors run L_last .. L0
        layers = comparison.a.cross_layers[::-1]
        updates: dict[str, Any] = {"step": step}
        if 0 <= row < len(layers):
            updates["layer"] = str(layers[row])
        self.state.param.update(**updates)

    def _on_curve_tap(self, event: Any) -> None:
        comparison = self.store.comparison
        if comparison is not None and event.x is not None:
            self.state.step = int(np.clip(round(event.x), 0, comparison.a.n_steps - 1))
