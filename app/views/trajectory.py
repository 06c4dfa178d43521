"""View 3, the latent PCA trajectory: one point per step, coloured by step, explained variance in
the axis labels. Hovering a point shows that step's image in the preview beside the plot (read
lazily through the reader's cache); clicking a point selects the step everywhere.

Hover reaches Python without flooding it: a ``CustomJS`` hover callback writes the hovered step
into the ``trajectory-hover`` source only when it changes.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import panel as pn
from bokeh.events import Tap
from bokeh.models import ColorBar, ColumnDataSource, CustomJS, HoverTool
from bokeh.plotting import figure
from bokeh.transform import linear_cmap

from app.views.common import (ACCENT, CSS, PALETTES, View, fit_to_data, guarded, held, image_figure, rgba, rgba_source,
                              set_image_extent, style)

HOVER_JS = """
const hit = cb_data.index.indices;
if (hit.length === 0) return;
const step = points.data.step[hit[0]];
if (hover.data.step[0] !== step) { hover.data = {step: [step]}; }
"""
HELP = ("<b>How to read this.</b> Each point is the latent after one step, projected on the two directions along "
        "which this run's latents vary most (PCA; each axis says how much of the variance it keeps). Close points: "
        "steps that changed the latent little. Hover a point to preview its step; click it to select that step.")


class TrajectoryView(View):
    def __init__(self, **params: Any):
        super().__init__(**params)
        self.points = ColumnDataSource(name="trajectory-points", data={"x": [], "y": [], "step": [], "t": []})
        self.current = ColumnDataSource(name="trajectory-current", data={"x": [], "y": [], "step": []})
        self.hover = ColumnDataSource(name="trajectory-hover", data={"step": [-1]})

        self.fig = figure(name="trajectory-figure", title="Latent trajectory (PCA of the latent after each step)",
                          width=560, height=480, tools="tap,pan,wheel_zoom,reset,save", toolbar_location="right",
                          match_aspect=False)
        self.cmap = linear_cmap("step", PALETTES["viridis"], 0, 1)
        self.fig.line("x", "y", source=self.points, color="#999999", line_width=1.5)
        dots = self.fig.scatter("x", "y", source=self.points, size=11, color=self.cmap, line_color="white")
        self.fig.scatter("x", "y", source=self.current, size=20, fill_alpha=0, line_color=ACCENT, line_width=3)
        self.fig.add_tools(HoverTool(renderers=[dots], tooltips=[("step", "@step"), ("t", "@t"), ("PC1", "@x{0.000}"), ("PC2", "@y{0.000}")],
                                     callback=CustomJS(args={"points": self.points, "hover": self.hover}, code=HOVER_JS)))
        self.fig.add_layout(ColorBar(color_mapper=self.cmap["transform"], title="step", width=12,
                                     major_label_text_font_size="10pt"), "right")
        self.fig.toolbar.active_scroll = None
        style(self.fig)
        fit_to_data(self.fig)
        self.fig.on_event(Tap, held(self._on_tap))

        self.preview_source = rgba_source("trajectory-preview")
        self.preview = image_figure("trajectory-preview-figure", "selected step", px=240)
        self.preview.image_rgba(image="image", x="x", y="y", dw="dw", dh="dh", source=self.preview_source)
        self.note = pn.pane.HTML("", styles={"font-size": "10.5pt", "color": "#555"}, width=250)
        self.help = pn.pane.HTML(f"<p class='dv-help'>{HELP}</p>", sizing_mode="stretch_width", stylesheets=[CSS], margin=(0, 10))

        self.hover.on_change("data", held(self._on_hover))
        self.state.param.watch(self._on_step, "step")
        self.store.param.watch(self._on_run, "run")
        self._on_run()

    def __panel__(self) -> Any:
        return pn.Column(self.help, pn.Row(pn.pane.Bokeh(self.fig), pn.Column(pn.pane.Bokeh(self.preview), self.note)),
                         sizing_mode="stretch_width")

    def refresh(self) -> None:
        self._on_run()

    @guarded
    def _on_run(self, *_: Any) -> None:
        data = self.data
        if data is None:
            return
        coords = data.pca_coords()
        n = len(coords)
        self.cmap["transform"].update(low=0, high=max(n - 1, 1))
        self.points.data = {"x": coords[:, 0], "y": coords[:, 1], "step": np.arange(n), "t": np.asarray(data.timesteps[:n])}
        v1, v2 = data.pca_variance()
        self.fig.xaxis.axis_label = f"PC1 ({100 * v1:.1f}% of variance)"
        self.fig.yaxis.axis_label = f"PC2 ({100 * v2:.1f}% of variance)"
        set_image_extent(self.preview, data.height, data.width)
        self.note.object = (f"{n} steps, coloured from first (dark) to last (yellow). "
                            f"Fit: {data.pca.get('fit_on', 'latents')}. Click a point to select its step.")
        self._on_step()

    @guarded
    def _on_step(self, *_: Any) -> None:
        data = self.data
        if data is None:
            return
        coords = data.pca_coords()
        step = min(self.state.step, len(coords) - 1)
        if step < 0:
            return
        self.current.data = {"x": [coords[step, 0]], "y": [coords[step, 1]], "step": [step]}
        self._show_preview(step)  # the preview shows the selected step until a point is hovered

    def _on_hover(self, attr: str, old: Any, new: Any) -> None:
        steps = new.get("step") or [-1]
        self._show_preview(int(steps[0]))

    @guarded
    def _show_preview(self, step: int) -> None:
        data = self.data
        if data is None or not 0 <= step < data.n_steps:
            return
        image = data.image(step)
        h, w = image.shape[:2]
        self.preview_source.data = {"image": [rgba(image)], "x": [0], "y": [0], "dw": [w], "dh": [h], "step": [step]}
        self.preview.title.text = f"step {step} · t = {data.timesteps[step]}"

    def _on_tap(self, event: Any) -> None:
        """Select the step of the point nearest the click (in screen-independent, axis-normalised units)."""
        data = self.data
        if data is None or event.x is None or event.y is None:
            return
        coords = data.pca_coords()
        if not len(coords):
            return
        span = np.ptp(coords, axis=0)
        span[span == 0] = 1.0
        d = np.hypot((coords[:, 0] - event.x) / span[0], (coords[:, 1] - event.y) / span[1])
        nearest = int(np.argmin(d))
        if d[nearest] < 0.05:
            self.state.step = nearest
