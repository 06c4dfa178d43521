"""View 1, the denoising timeline: step slider, play/pause, the x̂0 preview (and beside it the
pipeline's own final image, where the run has one), latent-norm and cosine-to-previous curves with
a current-step marker (click a curve to jump to that step).

The step slider changes ``State.step`` without Panel's 50 ms change debounce (``_debounce = 0``)
so a step change reaches the views at once. Playback is a periodic callback at ``State.fps``
that advances the step and then prefetches the next one into the reader's cache.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import panel as pn
from bokeh.events import Tap
from bokeh.models import ColumnDataSource, CustomJSTickFormatter, HoverTool, Span
from panel.io.document import hold

from app.store import one_line
from app.views.common import (ACCENT, CSS, View, curve_figure, display_image, guarded, held, image_figure, later, reported, rgba,
                              rgba_data, rgba_source, set_image_extent)
from app.views.frames import FrameFiller, StepFrames


#: The step slider's label: "12 / 29 · t = 581" (``tick`` is the step; ``t`` the run's timesteps).
STEP_FORMAT = "return tick + ' / ' + last + '  ·  t = ' + (t[tick] === undefined ? '?' : t[tick]);"
#: BokehJS redraws a slider's label when its value changes, not when its ``format`` does: a run with another step
#: count (a new formatter) at the same step would keep the old run's "5 / 29 · t = …" until the slider moved.
REDRAW_LABEL = """
const view = Bokeh.index.find_one(cb_obj);
if (view != null && typeof view._update_title === 'function') view._update_title();
"""
#: The Play toggle's labels; the pause sign U+23F8 is missing from common fonts (it draws as a box).
PLAY, PAUSE = "▶ Play", "❚❚ Pause"
HELP = ("<b>How to read this.</b> <b>x̂₀</b> is the model's current guess of the final image, decoded from the "
        "latent at this step; beside it, where the run has one, the pipeline's final image. The curves follow the "
        "latent x_s after each step: its L2 norm, and its cosine similarity to the previous step's latent (near 1: "
        "the step changed little). Click a curve to jump to that step.")


#: Frame sides (px) of the x̂0 preview and the final image, and the narrowest the curves beside them get:
#: 370 + 210 + 350 px (with margins) fit the 940 px a 1280 px window leaves beside the sidebar.
IMAGE_PX, FINAL_PX, CURVE_MIN_WIDTH = 360, 200, 340


class StepSlider(pn.widgets.IntSlider):
    """An ``IntSlider`` whose value reaches Python at once (Panel debounces changes by 50 ms by default).

    ``DIFFVIZ_STEP_DEBOUNCE_MS`` sets another debounce (the benchmark uses it to measure Panel's default)."""

    _debounce = int(os.environ.get("DIFFVIZ_STEP_DEBOUNCE_MS", "0")) if os.environ.get("DIFFVIZ_STEP_DEBOUNCE_MS", "").isdigit() else 0


class TimelineView(View):
    """Step controls (``controls``) and the timeline panel (``__panel__``)."""

    def __init__(self, **params: Any):
        super().__init__(**params)
        state = self.state
        self.slider = StepSlider(label="Step", start=0, end=1, value=0, sizing_mode="stretch_width", margin=(5, 12),
                                 tags=["dv:step"])
        self.play = pn.widgets.Toggle(label=PLAY, color="primary", width=90, margin=(18, 6, 5, 6), tags=["dv:play"])
        self.fps = pn.widgets.IntInput(label="fps", start=1, end=60, value=state.fps, width=70, tags=["dv:fps"])
        # The slider's label shows the step and its timestep, formatted in the browser, so a step change
        # costs no extra text update on the server.
        self.controls = pn.Row(self.play, self.fps, self.slider, sizing_mode="stretch_width")
        self.slider.jscallback(format=REDRAW_LABEL)
        self.help = pn.pane.HTML(f"<p class='dv-help'>{HELP}</p>", sizing_mode="stretch_width", stylesheets=[CSS], margin=(0, 10))

        self.slider.param.watch(held(lambda e: setattr(state, "step", int(e.new))), "value")
        self.play.param.watch(lambda e: setattr(state, "playing", bool(e.new)), "value")
        self.fps.param.watch(lambda e: setattr(state, "fps", int(e.new)), "value")
        self._callback = None
        self._formatted_for = None

        # x̂0 preview (and its per-step frames in the browser, see app.views.frames)
        self.image_source = rgba_source("timeline-image")
        self.frames = StepFrames("timeline-image", ["image"], np.zeros((1, 1), np.uint32))
        self.filler = FrameFiller(later)
        self.image_fig = image_figure("timeline-image-figure", "x̂₀ preview", px=IMAGE_PX)
        self.image_fig.image_rgba(image="image", x="x", y="y", dw="dw", dh="dh", source=self.image_source)
        # the pipeline's output (schema 2: images/final.png), shown only where the run has it
        self.final_source = rgba_source("timeline-final")
        self.final_fig = image_figure("timeline-final-figure", "final image (pipeline output)", px=FINAL_PX, tools="save")
        self.final_fig.image_rgba(image="image", x="x", y="y", dw="dw", dh="dh", source=self.final_source)
        # shown and hidden through a layout: toggling a rendered ``pn.pane.Bokeh``'s own ``visible`` fails in
        # Panel 1.9 (it copies the figure's stylesheet objects into a list of strings: TypeError)
        self.final_pane = pn.Column(pn.pane.Bokeh(self.final_fig, sizing_mode="fixed"), visible=False, margin=0, sizing_mode="fixed")

        # curves, with the current step marked
        self.curve_source = ColumnDataSource(name="timeline-curves", data={"step": [], "norm": [], "cosine": [], "t": []})
        self.current_source = ColumnDataSource(name="timeline-current", data={"step": [0], "norm": [np.nan], "cosine": [np.nan]})
        # the curves take the width the images leave (at least CURVE_MIN_WIDTH), so the tab fits a 1280 px window
        curve = dict(height=220, width=CURVE_MIN_WIDTH, min_width=CURVE_MIN_WIDTH, sizing_mode="stretch_width")
        self.norm_fig = curve_figure("timeline-norm-figure", "Latent L2 norm ‖x_s‖₂", "‖x‖₂", **curve)
        self.cos_fig = curve_figure("timeline-cosine-figure", "Cosine to previous latent", "cos(x_s, x_s−1)",
                                    x_range=self.norm_fig.x_range, **curve)
        self.markers = []
        for fig, column, colour in ((self.norm_fig, "norm", "#1f77b4"), (self.cos_fig, "cosine", "#2ca02c")):
            line = fig.line("step", column, source=self.curve_source, line_width=2, color=colour)
            fig.scatter("step", column, source=self.curve_source, size=5, color=colour)
            fig.scatter("step", column, source=self.current_source, size=11, color=ACCENT, line_color="white")
            marker = Span(location=0, dimension="height", line_color=ACCENT, line_width=2, line_dash="dashed",
                          name=f"timeline-marker-{column}")
            fig.add_layout(marker)
            self.markers.append(marker)
            fig.add_tools(HoverTool(renderers=[line], tooltips=[("step", "@step"), ("t", "@t"), (column, f"@{column}{{0.0000}}")],
                                    mode="vline"))
            fig.on_event(Tap, held(self._on_tap))

        state.param.watch(self._sync_controls, "step")
        state.param.watch(self._on_step, "step")
        state.param.watch(self._on_playing, "playing")
        state.param.watch(self._on_fps, "fps")
        self.store.param.watch(self._sync_controls, "run")
        self.store.param.watch(self._on_run, "run")
        self._sync_controls()
        self._on_run()

    # ---- layout ------------------------------------------------------------------------------

    def __panel__(self) -> Any:
        stretch = dict(sizing_mode="stretch_width", margin=0)
        return pn.Column(
            self.help,
            pn.Row(
                pn.pane.Bokeh(self.image_fig, sizing_mode="fixed"),  # a stretching Row would widen its frame
                self.final_pane,
                pn.Column(pn.pane.Bokeh(self.norm_fig, **stretch), pn.pane.Bokeh(self.cos_fig, **stretch), **stretch),
                **stretch,
            ),
            **stretch,
        )

    # ---- updates -------------------------------------------------------------------------------

    def refresh(self) -> None:
        self._on_run()

    def shown(self) -> None:
        if self.data is not None:
            self._fill_frames()

    def _sync_controls(self, *_: Any) -> None:
        """The step controls are always on screen: keep them in step even while the figures are hidden."""
        data = self.data
        if data is None:
            return
        n = data.n_steps
        step = min(self.state.step, n - 1)
        with hold():
            if self._formatted_for is not data:
                self._formatted_for = data
                self.slider.param.update(start=0, end=max(n - 1, 1), disabled=n < 2, format=CustomJSTickFormatter(
                    args={"t": list(data.timesteps), "last": n - 1}, code=STEP_FORMAT))
            if self.slider.value != step:
                self.slider.value = step

    @guarded
    def _on_run(self, *_: Any) -> None:
        data = self.data
        if data is None:
            self.curve_source.data = {"step": [], "norm": [], "cosine": [], "t": []}
            return
        n = data.n_steps
        shown = display_image(np.zeros((data.height, data.width, 3), np.uint8)).shape  # the size each step is sent at
        self.frames.reset(id(data), n, frame_bytes=4 * shown[0] * shown[1])
        set_image_extent(self.image_fig, data.height, data.width)
        self._show_final(data.final_image())
        self.curve_source.data = {
            "step": np.arange(n), "norm": data.metric_curve("latent_norm"),
            "cosine": data.metric_curve("latent_cosine_prev"), "t": np.asarray(data.timesteps),
        }
        self._on_step()

    def _show_final(self, image: Any) -> None:
        self.final_pane.visible = image is not None
        if image is not None:
            set_image_extent(self.final_fig, *image.shape[:2])
        self.final_source.data = rgba_data(None if image is None else rgba(image))

    @guarded
    def _on_step(self, *_: Any) -> None:
        data = self.data
        if data is None:
            return
        step = min(self.state.step, data.n_steps - 1)
        image = data.image(step)
        h, w = image.shape[:2]
        packed = rgba(display_image(image))
        self.image_source.data = {"image": [packed], "x": [0], "y": [0], "dw": [w], "dh": [h], "step": [step]}
        self.frames.put(step, {"image": packed})
        self._fill_frames()
        self.image_fig.title.text = f"x̂₀ preview · step {step} · t = {data.timesteps[step]}"
        for marker in self.markers:
            marker.location = step
        curves = self.curve_source.data
        self.current_source.data = {"step": [step], "norm": [curves["norm"][step]], "cosine": [curves["cosine"][step]]}

    def _fill_frames(self) -> None:
        self.filler.start(lambda: self.frames.missing(self.state.step), self._fill_frame, self._frames_key)

    def _frames_key(self) -> Any:
        return self.frames.key if self.active and self.frames.enabled else None

    def _fill_frame(self, step: int) -> None:
        try:
            self.frames.put(step, {"image": rgba(display_image(self.data.image(step)))})
        except Exception:  # noqa: BLE001 - a step whose file is broken is reported when it is shown, not ahead
            self.frames.skip(step)

    def _on_tap(self, event: Any) -> None:
        data = self.data
        if data is None or event.x is None:
            return
        self.state.step = int(np.clip(round(event.x), 0, data.n_steps - 1))

    # ---- playback ------------------------------------------------------------------------------

    def _on_playing(self, event: Any) -> None:
        self.play.param.update(value=bool(event.new), label=PAUSE if event.new else PLAY)
        if event.new and self._callback is None:
            self._callback = pn.state.add_periodic_callback(self._tick, period=self._period())
        elif not event.new and self._callback is not None:
            self._callback.stop()
            self._callback = None

    def _on_fps(self, event: Any) -> None:
        if self.fps.value != event.new:
            self.fps.value = event.new
        if self._callback is not None:
            self._callback.period = self._period()

    def _period(self) -> int:
        return max(int(round(1000 / max(self.state.fps, 1))), 10)

    @reported
    def _tick(self) -> None:
        data = self.data
        if data is None or not self.state.playing:
            return
        self.state.step = (self.state.step + 1) % data.n_steps
        # Warm the reader's cache for the next frame once this one has been sent.
        nxt = (self.state.step + 1) % data.n_steps
        layer, kind, head = self.state.layer, self.state.kind, self.state.head
        later(lambda: self._prefetch(data, nxt, layer, kind, head))

    def _prefetch(self, data: Any, step: int, layer: str, kind: str, head: str) -> None:
        try:
            data.prefetch(step, layer, kind, data.fit_head(head))
        except Exception as exc:  # noqa: BLE001 - shown in the banner (if that run is still the one shown)
            if data is self.data:
                self.report(one_line(exc))
