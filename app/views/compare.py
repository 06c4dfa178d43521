"""View 4, comparison of two runs (A = the main run, B = ``State.compare``).

* JS divergence per step x layer as a heat map (mean over the prompt's word tokens of each token's
  spatial-map divergence, ``analysis.divergence.map_js_divergence``); click a cell to select that step and layer.
* Per-token JS divergence at the current step and layer ("all layers": the mean over layers).
* Both PCA trajectories in one frame, on a basis fit on both runs' latents when both ship
  ``latents_noise_fp16.npz`` (otherwise each run's own PCA, and the note says so).
* Per-step latent deltas, and both images side by side at the current step.
* The verdict: the reader's ``compatible`` (what stops a step-by-step comparison), every run setting that
  differs (``reader.run_differences``), and every file that could not be read.

Each panel reads only what it needs (JS: the cross maps; images: ``images/step_*.png``; trajectories and
delta: latents, metrics, PCA). A file that cannot be read blanks only the panels that need it; their titles
name the file, and the verdict lists it.
"""
from __future__ import annotations

import contextlib
import html
from typing import Any

import numpy as np
import panel as pn
from bokeh.events import Tap
from bokeh.models import ColorBar, ColumnDataSource, FactorRange, HoverTool, Legend, LegendItem, LinearColorMapper, Range1d, Span
from bokeh.plotting import figure

from app.state import ALL_LAYERS
from app.store import one_line
from app.views.common import (ACCENT, CSS, PALETTES, RUN_COLOURS, View, bar_figure, curve_figure, fit_to_data, guarded, held,
                              image_figure, reported, rgba, rgba_data, rgba_source, set_image_extent, style, with_save)

HELP = ("<b>How to read this.</b> <b>JS divergence</b> (Jensen–Shannon, in bits) compares, token by token, A's and "
        "B's spatial attention maps at the same step and layer: 0 = the same map, 1 bit = maps with no overlap. "
        "The heat map is its mean over the prompt's words for every step and layer (click a cell to select it); the "
        "bars show each token at the current step. <b>Latent delta</b>: how far apart the two latents are after each "
        "step. <b>Trajectories</b>: both runs' latents projected on one PCA basis.")
#: Said when the seeds differ: the divergence then measures more than the change of words.
SEED_NOTE = ("The seeds differ, so the runs also start from different noise: the divergence mixes the change of "
             "words with a different starting image, and shows where the objects were laid out, not only what the "
             "changed word does.")
#: Frame side (px) of the two images.
IMAGE_PX = 260


class CompareView(View):
    def __init__(self, **params: Any):
        super().__init__(**params)
        # ---- loading the second run
        self.url = pn.widgets.TextInput(label="Second run (URL or folder)", placeholder="datasets/compare or https://…/run/", width=360,
                                        tags=["dv:compare-url"])
        self.load = pn.widgets.Button(label="Compare", color="primary", width=100, margin=(23, 5, 5, 5),
                                      tags=["dv:compare-load"])
        # a FileInput's own label sits above its box, as the URL box's does: same top margin, so the labels and
        # the boxes line up (the buttons, without labels, are pushed down by one label height)
        self.folder = pn.widgets.FileInput(directory=True, label="…or pick a run folder", width=250, margin=(5, 10),
                                           tags=["dv:compare-folder"])
        self.clear = pn.widgets.Button(label="Clear", width=80, margin=(23, 5, 5, 5), tags=["dv:compare-clear"])
        self.load.on_click(lambda _e: self._submit(self.url.value))
        self.url.param.watch(lambda _e: self._submit(self.url.value), "enter_pressed")
        self.folder.param.watch(self._on_folder, "value")
        self.clear.on_click(lambda _e: setattr(self.state, "compare", ""))
        self.help = pn.pane.HTML(f"<p class='dv-help'>{HELP}</p>", sizing_mode="stretch_width", stylesheets=[CSS], margin=(0, 10))
        self.status = pn.pane.HTML("", sizing_mode="stretch_width", styles={"font-size": "11pt"}, stylesheets=[CSS])

        # ---- JS heat map (step x layer)
        self.js_mapper = LinearColorMapper(name="compare-js-cmap", palette=PALETTES["viridis"], low=0, high=1, nan_color="#eeeeee")
        self.js_source = ColumnDataSource(name="compare-js", data={"step": [], "layer": [], "layer_index": [], "js": []})
        # cells span step ± 0.5: the x range is set with the data (an auto range has no extent while empty)
        self.js_fig = figure(name="compare-js-figure", title="JS divergence A vs B (bits), step × layer", height=300,
                             min_width=380, sizing_mode="stretch_width", x_range=Range1d(-0.5, 0.5), y_range=FactorRange(),
                             tools="tap", toolbar_location=None)
        self.js_fig.rect("step", "layer", width=1, height=1, source=self.js_source, line_color=None,
                         fill_color={"field": "js", "transform": self.js_mapper})
        self.js_fig.add_tools(HoverTool(tooltips=[("step", "@step"), ("layer", "@layer"), ("JS", "@js{0.0000}")]))
        self.js_fig.add_layout(ColorBar(color_mapper=self.js_mapper, width=12, major_label_text_font_size="10pt"), "right")
        self.js_marker = Span(location=0, dimension="height", line_color=ACCENT, line_width=2, name="compare-js-marker")
        self.js_fig.add_layout(self.js_marker)
        self.js_fig.xaxis.axis_label = "step"
        self.js_fig.yaxis.axis_label = "layer"
        self.js_fig.grid.visible = False
        with_save(style(self.js_fig))
        self.js_fig.on_event(Tap, held(self._on_js_tap))

        # ---- per-token JS at the current step/layer
        self.token_source = ColumnDataSource(name="compare-token-js", data={"token": [], "js": []})
        self.token_fig = bar_figure("compare-token-js-figure", "Per-token JS divergence", self.token_source,
                                    x="token", top="js", y_label="JS (bits)", fmt="0.0000", color="#8172b3", height=300,
                                    min_width=300, sizing_mode="stretch_width")

        # ---- trajectories on a shared basis
        self.pca_sources = [ColumnDataSource(name=f"compare-pca-{k}", data={"x": [], "y": [], "step": []}) for k in "ab"]
        self.pca_current = ColumnDataSource(name="compare-pca-current", data={"x": [], "y": [], "color": []})
        self.pca_fig = figure(name="compare-pca-figure", title="Latent trajectories", width=540, height=360,
                              tools="pan,wheel_zoom,reset,save", toolbar_location="right")
        items = []
        for source, colour, label in zip(self.pca_sources, RUN_COLOURS, ("A", "B")):
            line = self.pca_fig.line("x", "y", source=source, color=colour, line_width=2)
            dots = self.pca_fig.scatter("x", "y", source=source, color=colour, size=6)
            items.append(LegendItem(label=f"run {label}", renderers=[line, dots]))
        self.pca_fig.scatter("x", "y", source=self.pca_current, size=16, fill_alpha=0, line_color="color", line_width=3)
        # outside the frame, so it never covers a trajectory
        self.pca_fig.add_layout(Legend(items=items, name="compare-pca-legend", location="top_left"), "right")
        self.pca_fig.toolbar.active_scroll = None
        style(self.pca_fig)
        fit_to_data(self.pca_fig)
        self.pca_note = pn.pane.HTML("", styles={"font-size": "10.5pt", "color": "#555"}, width=340, margin=(40, 10))

        # ---- latent deltas
        self.delta_source = ColumnDataSource(name="compare-delta", data={"step": [], "delta": []})
        self.delta_fig = curve_figure("compare-delta-figure", "Per-step latent delta", "Δ", height=300, width=420,
                                      min_width=320, sizing_mode="stretch_width")
        self.delta_fig.line("step", "delta", source=self.delta_source, line_width=2, color="#dd8452")
        self.delta_fig.scatter("step", "delta", source=self.delta_source, size=5, color="#dd8452")
        self.delta_marker = Span(location=0, dimension="height", line_color=ACCENT, line_width=2, line_dash="dashed", name="compare-delta-marker")
        self.delta_fig.add_layout(self.delta_marker)
        self.delta_fig.on_event(Tap, held(self._on_curve_tap))

        # ---- images side by side
        self.image_sources = [rgba_source(f"compare-image-{k}") for k in "ab"]
        self.image_figs = [image_figure(f"compare-image-{k}-figure", f"run {k.upper()}", px=IMAGE_PX, tools="save") for k in "ab"]
        for fig, source, colour in zip(self.image_figs, self.image_sources, RUN_COLOURS):
            fig.image_rgba(image="image", x="x", y="y", dw="dw", dh="dh", source=source)
            fig.outline_line_color = colour
            fig.outline_line_width = 3

        #: files found unreadable for the comparison shown: one line each -> the panels blanked for it
        self._unreadable: dict[str, set[str]] = {}

        stretch = dict(sizing_mode="stretch_width", margin=0)
        # shown only while a second run is loaded
        self.figures = pn.Column(
            # image panes fixed: a stretching Row would widen their frames and distort the images
            pn.Row(*[pn.pane.Bokeh(f, sizing_mode="fixed") for f in self.image_figs], pn.pane.Bokeh(self.token_fig, **stretch),
                   **stretch),
            pn.Row(pn.pane.Bokeh(self.js_fig, **stretch), pn.pane.Bokeh(self.delta_fig, **stretch), **stretch),
            pn.Row(pn.pane.Bokeh(self.pca_fig, sizing_mode="fixed"), self.pca_note, margin=0),
            visible=False, **stretch,
        )

        self.state.param.watch(self._on_step, "step")
        self.state.param.watch(self._on_layer, ["layer", "token", "merge_words"])
        self.store.param.watch(self._on_comparison, ["comparison", "other"])
        self._on_comparison()

    def __panel__(self) -> Any:
        return pn.Column(
            self.help,
            pn.Row(self.url, self.load, self.folder, self.clear),
            self.status,
            self.figures,
            sizing_mode="stretch_width",
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

    # ---- one panel's failure ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _part(self, what: str, fig: Any, blank: Any) -> Any:
        """One panel's update (``View.panel``: blanked and titled with the problem on failure); an unreadable
        file is also kept for the verdict, with the panel it blanked (``what``)."""
        with self.panel(fig, blank):
            try:
                yield
            except Exception as exc:
                self._unreadable.setdefault(one_line(exc), set()).add(what)
                raise

    # ---- updates --------------------------------------------------------------------------------

    def refresh(self) -> None:
        self._on_comparison()

    @guarded
    def _on_comparison(self, *_: Any) -> None:
        comparison = self.store.comparison
        other = self.store.other
        self._unreadable = {}
        if other is not None and self.url.value != self.state.compare and not self.state.compare.startswith("upload:"):
            self.url.value = self.state.compare
        if comparison is None:
            self.status.object = ("<div class='dv-note'>Load a second run to compare it with the current one: type its URL or "
                                  "folder, pick a folder, or open the page with <code>?compare=URL</code>.</div>")
            self._clear()
            self.figures.visible = False
            return
        self.figures.visible = True
        self.pca_note.object = ""
        self._update_js()
        self._update_trajectories()
        self._update_delta()
        self._on_step()
        self._show_status()

    def _show_status(self) -> None:
        """The verdict: comparable or not, the run settings that differ, and the files that cannot be read."""
        comparison = self.store.comparison
        if comparison is None:
            return
        a, b = comparison.a, comparison.b
        head = (f"<b style='color:{RUN_COLOURS[0]}'>A</b> {html.escape(a.label)} — “{html.escape(a.prompt)}” &nbsp;·&nbsp; "
                f"<b style='color:{RUN_COLOURS[1]}'>B</b> {html.escape(b.label)} — “{html.escape(b.prompt)}”")
        ul = lambda lines: "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>"  # noqa: E731
        if not comparison.ok:
            kind, verdict = "dv-warn", f"<b>These runs cannot be compared step by step:</b>{ul(comparison.differences)}"
        elif self._unreadable:
            n = len(self._unreadable)
            lines = [f"{problem} (blanks: {', '.join(sorted(panels))})" for problem, panels in self._unreadable.items()]
            kind = "dv-warn"
            verdict = (f"Shapes, steps and tokens match ({html.escape(comparison.pairing)}), but {n} "
                       f"file{'s' if n > 1 else ''} cannot be read; the panels that need "
                       f"{'them' if n > 1 else 'it'} are blank:{ul(lines)}")
        else:
            kind, verdict = "dv-ok", f"Comparable ({html.escape(comparison.pairing)})."
        settings = comparison.settings
        if settings:
            seeds = any(line.startswith("seed:") for line in settings)
            verdict += (f"<br><b>Run settings that differ:</b>{ul(settings)}"
                        + (f"<span class='dv-seed-note'>{html.escape(SEED_NOTE)}</span>" if seeds else ""))
        else:
            verdict += "<br>Same run settings (prompt, seed, cfg, steps, scheduler, model, size)."
        self.status.object = f"<div class='{kind} dv-compare-status'>{head}<br>{verdict}</div>"

    def _clear(self) -> None:
        self._blank_js()
        self._blank_token_js()
        self._blank_trajectories()
        self._blank_delta()
        for source in self.image_sources:
            source.data = rgba_data()
        self.pca_note.object = ""

    def _blank_js(self) -> None:
        self.js_source.data = {"step": [], "layer": [], "layer_index": [], "js": []}

    def _blank_token_js(self) -> None:
        self.token_source.data = {"token": [], "js": []}

    def _blank_trajectories(self) -> None:
        for source in self.pca_sources:
            source.data = {"x": [], "y": [], "step": []}
        self.pca_current.data = {"x": [], "y": [], "color": []}

    def _blank_delta(self) -> None:
        self.delta_source.data = {"step": [], "delta": []}

    def _update_js(self) -> None:
        comparison = self.store.comparison
        a = comparison.a
        labels = [f"L{i}" for i in a.cross_layers]
        self.js_fig.y_range.factors = labels[::-1]  # L0 at the top
        end = max(a.n_steps, 1) - 0.5
        if (self.js_fig.x_range.end, self.js_fig.x_range.bounds) != (end, (-0.5, end)):  # new: see set_image_extent
            self.js_fig.x_range = Range1d(-0.5, end, bounds=(-0.5, end))
        if not comparison.ok or not labels:
            self._blank_js()
            self.js_fig.title.text = "JS divergence: not comparable" if not comparison.ok else "JS divergence: no cross-attention maps"
            return
        with self._part("JS heat map", self.js_fig, self._blank_js):
            _per_token, grid = comparison.js()  # a failure is kept there: not read again per step
            n, nl = grid.shape
            steps, layers = np.meshgrid(np.arange(n), np.arange(nl), indexing="ij")
            self.js_source.data = {"step": steps.ravel(), "layer": [labels[i] for i in layers.ravel()],
                                   "layer_index": np.asarray(a.cross_layers)[layers.ravel()], "js": grid.ravel()}
            finite = grid[np.isfinite(grid)]
            self.js_mapper.update(low=0.0, high=float(finite.max()) if finite.size and finite.max() > 0 else 1.0)
            self.js_fig.title.text = "JS divergence A vs B (bits), mean over words"

    def _update_token_js(self) -> None:
        comparison = self.store.comparison
        if comparison is None or not comparison.ok or not comparison.pairs:
            self._blank_token_js()
            self.token_fig.title.text = "Per-token JS divergence" + ("" if comparison is None or comparison.ok else ": not comparable")
            return
        with self._part("per-token JS", self.token_fig, self._blank_token_js):
            per_token, _grid = comparison.js()
            step = min(self.state.step, per_token.shape[0] - 1)
            layer = self.state.layer
            a = comparison.a
            if layer != ALL_LAYERS and layer.isdigit() and int(layer) in a.cross_layers:
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
        with self._part("trajectories", self.pca_fig, self._blank_trajectories):
            ca, cb, (v1, v2), how = self.store.comparison.trajectories()
            for source, coords in zip(self.pca_sources, (ca, cb)):
                source.data = {"x": coords[:, 0], "y": coords[:, 1], "step": np.arange(len(coords))}
            if np.isfinite(v1):
                self.pca_fig.xaxis.axis_label = f"PC1 ({100 * v1:.1f}% of variance)"
                self.pca_fig.yaxis.axis_label = f"PC2 ({100 * v2:.1f}% of variance)"
            else:
                self.pca_fig.xaxis.axis_label = "PC1 (own basis per run)"
                self.pca_fig.yaxis.axis_label = "PC2 (own basis per run)"
            self.pca_fig.title.text = "Latent trajectories"
            self.pca_note.object = f"Trajectories: {html.escape(how)}."

    def _update_delta(self) -> None:
        with self._part("latent delta", self.delta_fig, self._blank_delta):
            values, label, how = self.store.comparison.latent_delta()
            self.delta_source.data = {"step": np.arange(len(values)), "delta": np.asarray(values, np.float64)}
            self.delta_fig.yaxis.axis_label = label
            self.delta_fig.title.text = "Per-step latent delta"
            self.pca_note.object = f"{self.pca_note.object}<br><br>Latent delta: {html.escape(how)}."

    @guarded
    def _on_layer(self, *_: Any) -> None:
        known = len(self._unreadable)
        self._update_token_js()
        if len(self._unreadable) != known:
            self._show_status()

    @guarded
    def _on_step(self, *_: Any) -> None:
        comparison = self.store.comparison
        if comparison is None:
            return
        known = {k: set(v) for k, v in self._unreadable.items()}
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
            with self._part(f"run {name} image", fig, lambda source=source: source.update(data=rgba_data(step=k))):
                image = data.image(k)
                h, w = image.shape[:2]
                set_image_extent(fig, h, w)
                source.data = {"image": [rgba(image)], "x": [0], "y": [0], "dw": [w], "dh": [h], "step": [k]}
                fig.title.text = f"run {name} · step {k}"
        self._update_token_js()
        if self._unreadable != known:
            self._show_status()

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
