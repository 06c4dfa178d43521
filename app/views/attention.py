"""View 2, the attention explorer.

* Controls: cross/self, layer (grouped by block and resolution, plus "all layers, mean"), word (prompt
  tokens, optionally merged into words; hidden in self mode), head (per-head runs only), DAAM aggregate
  with its step range, the word grid, opacity, colormap, a greyscale image under the map, colour scale.
* The heat map over the step's x̂0 (``RunData.heat``): ``raw`` is the map as computed (one layer: exactly
  the file's values), ``image`` it upsampled for display. In DAAM mode the image, the bars and the entropy
  come from the same step range as the map.
* With a second run loaded, A | B | A − B (``Comparison.heat_pair``): both maps on one colour scale, the
  difference on a symmetric one.
* Runs with text->image maps (SD3, Flux) add "word → image" beside the probe (``RunData.text_heat``): where the
  selected word's own query looks over the image, at the same step and layer (or DAAM range) as the main map.
* The word grid is ``export.figure.render_grid``'s picture, the one ``diffviz export-figure`` writes.
* A panel whose data cannot be read is blanked alone, its title naming the problem (``View.panel``).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import panel as pn
from bokeh.events import Tap
from bokeh.models import BasicTickFormatter, BoxAnnotation, ColorBar, ColumnDataSource, LinearColorMapper, Span

from dataclasses import replace

from app.state import ALL_LAYERS, MEAN_HEAD
from analysis.maps import query_cell, resize
from app.store import Heat, Selection
from app.views.common import (ACCENT, CSS, DIVERGING, PALETTES, View, bar_figure, blank_rgba, curve_figure, guarded, held,
                              display_image, image_figure, later, reported, rgba, rgba_data, rgba_source, set_image_extent,
                              with_save)
from app.views.frames import FrameFiller, StepFrames
from export import figure as _figure
from export.contract import DatasetError

#: Longest side of the upsampled heat map sent for display.
DISPLAY_MIN, DISPLAY_MAX = 64, 128


def display_shape(height: int, width: int) -> tuple[int, int]:
    """Grid the heat map is upsampled to for display: at least ``DISPLAY_MIN`` on the long side (a few
    display pixels per image pixel), at most ``DISPLAY_MAX`` (the update stays small)."""
    long_side = max(height, width, 1)
    target = min(max(long_side, DISPLAY_MIN), DISPLAY_MAX)
    scale = target / long_side
    return max(int(round(height * scale)), 1), max(int(round(width * scale)), 1)


def _heat_data(raw: np.ndarray, height: int, width: int, step: int = -1) -> dict[str, list]:
    """The heat-map source: ``raw`` the map as computed (one layer: the file's values), ``image`` it upsampled for display."""
    dh, dw = display_shape(height, width)
    return {"image": [resize(raw, dh, dw)], "raw": [np.asarray(raw, np.float32)],
            "x": [0], "y": [0], "dw": [width], "dh": [height], "step": [step]}


#: Frame side (px) of the main overlay, the probe, the A | B | A−B trio and the word grid.
OVERLAY_PX, PROBE_PX, TRIO_PX, GRID_PX = 300, 180, 160, 560

HELP = ("<b>How to read this.</b> The image is x̂₀, the model's guess of the final image at this step. "
        "<b>Cross</b>: for each image location, the share of its attention that goes to the chosen word "
        "(softmax over the prompt's tokens, conditional half of the guidance batch). <b>Self</b>: where the "
        "clicked location attends. <b>Entropy</b> (H / ln K): how spread attention is over the prompt, 0 = on one "
        "token, 1 = uniform. <b>KL</b>: how much the token distribution moved since the previous step, in nats. "
        "<b>DAAM</b>: the word's map averaged over all layers and a step range. With a second run loaded, "
        "A | B | A − B shows both runs' maps on one colour scale and their difference (red: A attends more). "
        "<b>Word → image</b> (SD3, Flux): where the word's own query looks over the image, its share per location.")


def _rgba_image(image: np.ndarray, greyscale: bool) -> np.ndarray:
    """The packed image sent for display (reduced to the frames' size, see ``display_image``)."""
    return rgba(display_image(_figure.greyscale(image) if greyscale else image))  # grey as export-figure --grey


class AttentionView(View):
    """Controls write the state; figures read the state and the store (``RunData.heat``, ``shares``,
    ``entropies``, ``word_grid``; ``Comparison.heat_pair``) and are updated in place, never written back."""

    def __init__(self, **params: Any):
        super().__init__(**params)
        state = self.state
        # ---- controls: each writes its own State parameter; State -> widget sync is in _sync_*
        self.layer = pn.widgets.Select(label="Layer", groups={"All layers": {"all layers (mean)": ALL_LAYERS}}, width=250,
                                      tags=["dv:layer"])
        self.token = pn.widgets.Select(label="Word", options={"-": 0}, width=250, tags=["dv:token"])
        self.head = pn.widgets.Select(label="Head", options={"mean": MEAN_HEAD}, width=250, visible=False, tags=["dv:head"])
        self.merge = pn.widgets.Checkbox.from_param(state.param.merge_words, label="merge sub-word tokens into words", tags=["dv:merge"])
        self.kind = pn.widgets.RadioButtonGroup.from_param(state.param.kind, options={"cross (word)": "cross", "self (probe)": "self"},
                                                           color="default", variant="outline", width=250, tags=["dv:kind"])
        self.aggregate = pn.widgets.Checkbox.from_param(state.param.aggregate, label="DAAM: all layers, mean over steps",
                                                     tags=["dv:aggregate"])
        self.grid = pn.widgets.Checkbox.from_param(state.param.grid, label="word grid: every word's DAAM map", tags=["dv:grid"])
        self.range = pn.widgets.IntRangeSlider(label="Steps averaged", start=0, end=1, value=(0, 1), width=250, disabled=True,
                                                tags=["dv:range"])
        self.opacity = pn.widgets.FloatSlider.from_param(state.param.opacity, label="Opacity", step=0.05, width=250)
        self.cmap = pn.widgets.Select.from_param(state.param.cmap, label="Colormap", width=250)
        self.grey = pn.widgets.Checkbox.from_param(state.param.grey, label="greyscale image under the map", tags=["dv:grey"])
        self.scale = pn.widgets.RadioButtonGroup.from_param(state.param.color_scale, label="Colour scale",
                                                            color="default", variant="outline", width=250,
                                                            tags=["dv:scale"])
        self.layer.param.watch(held(lambda e: setattr(state, "layer", str(e.new))), "value")
        self.token.param.watch(held(self._on_token_widget), "value")
        self.head.param.watch(held(lambda e: setattr(state, "head", str(e.new))), "value")
        self.range.param.watch(lambda e: setattr(state, "step_range", tuple(int(v) for v in e.new)), "value_throttled")
        self.word_controls = pn.Column(self.token, self.merge, self.head, margin=0, css_classes=["dv-word-controls"])
        self.controls = pn.Column(
            self.kind, self.layer, self.word_controls, self.aggregate, self.range, self.grid,
            pn.pane.HTML("<b>Drawing</b>", margin=(8, 10, 0, 10)), self.opacity, self.cmap, self.grey,
            pn.pane.HTML("Colour scale", margin=(6, 10, 0, 10)), self.scale, width=270,
        )
        self.help = pn.pane.HTML(f"<p class='dv-help'>{HELP}</p>", width=880, stylesheets=[CSS], margin=(0, 10))

        # ---- overlay: image + heat map + probe marker
        self.mapper = LinearColorMapper(name="attention-cmap", palette=PALETTES[state.cmap], low=0, high=1)
        self.overlay = image_figure("attention-overlay-figure", "attention", px=OVERLAY_PX)
        self.image_source = rgba_source("attention-image")
        self.overlay.image_rgba(image="image", x="x", y="y", dw="dw", dh="dh", source=self.image_source)
        self.heat_source = ColumnDataSource(name="attention-heat", data=_heat_data(np.zeros((1, 1), np.float32), 1, 1))
        self.heat = self.overlay.image(image="image", x="x", y="y", dw="dw", dh="dh", source=self.heat_source,
                                       color_mapper=self.mapper, global_alpha=state.opacity)
        # per-step frames of the image and the heat map in the browser (see app.views.frames)
        self.image_frames = StepFrames("attention-image", ["image"], np.zeros((1, 1), np.uint32))
        self.heat_frames = StepFrames("attention-heat", ["image", "raw"], np.zeros((1, 1), np.float32))
        self.filler = FrameFiller(later)
        self.point_source = ColumnDataSource(name="attention-probe-point", data={"x": [0.5], "y": [0.5]})
        for colour, width in (("white", 2.5), ("black", 1)):
            self.overlay.scatter("x", "y", source=self.point_source, marker="circle_cross", size=16, fill_alpha=0,
                                 line_color=colour, line_width=width)
        self.overlay.add_layout(ColorBar(color_mapper=self.mapper, width=12, label_standoff=6,
                                         major_label_text_font_size="10pt"), "right")
        self.overlay.on_event(Tap, held(self._on_tap))

        # ---- self-attention probe
        self.probe_mapper = LinearColorMapper(name="attention-probe-cmap", palette=PALETTES[state.cmap], low=0, high=1)
        self.probe_fig = image_figure("attention-probe-figure", "self-attention probe", px=PROBE_PX)
        self.probe_source = ColumnDataSource(name="attention-probe", data=self._probe_data(np.zeros((1, 1), np.float32), 1, 1, (0, 0), -1))
        self.probe_fig.image(image="image", x="x", y="y", dw="dw", dh="dh", source=self.probe_source, color_mapper=self.probe_mapper)
        self.probe_fig.scatter("x", "y", source=self.point_source, marker="circle_cross", size=14, fill_alpha=0,
                               line_color="#00e5ff", line_width=2)
        self.probe_fig.on_event(Tap, held(self._on_tap))
        # StaticText, not an HTML pane: panes re-send their stylesheets, which recomputes the document's models
        self.probe_note = pn.widgets.StaticText(value="", styles={"font-size": "10pt", "color": "#555"}, width=200)

        # ---- word -> image (runs with text->image maps): drawn over the overlay's own image source
        self.text_mapper = LinearColorMapper(name="attention-text-cmap", palette=PALETTES[state.cmap], low=0, high=1)
        self.text_fig = image_figure("attention-text-figure", "word → image", px=PROBE_PX, tools="reset,save")
        self.text_fig.title.text_font_size = "10pt"
        self.text_fig.image_rgba(image="image", x="x", y="y", dw="dw", dh="dh", source=self.image_source)
        self.text_source = ColumnDataSource(name="attention-text", data=_heat_data(np.zeros((1, 1), np.float32), 1, 1))
        self.text_heat = self.text_fig.image(image="image", x="x", y="y", dw="dw", dh="dh", source=self.text_source,
                                             color_mapper=self.text_mapper, global_alpha=state.opacity)
        self.text_note = pn.widgets.StaticText(value="", styles={"font-size": "10pt", "color": "#555"}, width=200)
        self.text_pane = pn.Column(pn.pane.Bokeh(self.text_fig), self.text_note, visible=False, margin=0,
                                   css_classes=["dv-text-map"])

        # ---- A | B | A − B (shown while a second run is loaded)
        self.pair_mapper = LinearColorMapper(name="attention-pair-cmap", palette=PALETTES[state.cmap], low=0, high=1)
        self.diff_mapper = LinearColorMapper(name="attention-diff-cmap", palette=DIVERGING, low=-1, high=1)
        # A draws the overlay's own image source (and so its frames in the browser), B its own; the difference is
        # opaque and needs no image under it. One update per step sends B's image and the three maps.
        self.image_source_b = rgba_source("attention-image-b")
        self.trio_figs, self.trio_heats = [], []
        for key, title, image in (("a", "A", self.image_source), ("b", "B", self.image_source_b), ("diff", "A − B", None)):
            fig = image_figure(f"attention-{key}-figure", title, px=TRIO_PX, tools="reset,save")
            fig.title.text_font_size = "10pt"
            if image is not None:
                fig.image_rgba(image="image", x="x", y="y", dw="dw", dh="dh", source=image)
            heat = ColumnDataSource(name=f"attention-heat-{key}", data=_heat_data(np.zeros((1, 1), np.float32), 1, 1))
            mapper = self.diff_mapper if key == "diff" else self.pair_mapper
            fig.image(image="image", x="x", y="y", dw="dw", dh="dh", source=heat, color_mapper=mapper,
                      global_alpha=1.0 if key == "diff" else state.opacity)
            if key != "a":
                fig.add_layout(ColorBar(color_mapper=mapper, width=10, major_label_text_font_size="9pt"), "right")
            self.trio_figs.append(fig)
            self.trio_heats.append(heat)
        self.trio = pn.Row(*[pn.pane.Bokeh(f) for f in self.trio_figs], visible=False, margin=0)

        # ---- word grid: every content word's DAAM map over the step range (export.figure, as in export-figure)
        self.grid_fig = image_figure("attention-grid-figure", "word grid", px=GRID_PX, tools="reset,save")
        self.grid_source = rgba_source("attention-grid")
        self.grid_fig.image_rgba(image="image", x="x", y="y", dw="dw", dh="dh", source=self.grid_source)
        self.grid_pane = pn.Column(pn.pane.Bokeh(self.grid_fig), visible=False, margin=0)

        # ---- bars: token share and entropy per layer; KL across steps
        self.share_source = ColumnDataSource(name="attention-share", data={"token": [], "share": [], "color": [], "index": []})
        self.share_fig = bar_figure("attention-share-figure", "Token share of attention", self.share_source,
                                    x="token", top="share", y_label="share of prompt tokens' mass", fmt="0.000", width=300)

        self.entropy_source = ColumnDataSource(name="attention-entropy", data={"layer": [], "entropy": [], "color": []})
        self.entropy_fig = bar_figure("attention-entropy-figure", "Entropy per layer (normalised)", self.entropy_source,
                                      x="layer", top="entropy", y_label="H / ln K", fmt="0.000", rotate=False,
                                      y_range=(0, 1.02), width=300)

        self.kl_source = ColumnDataSource(name="attention-kl", data={"step": [], "kl": []})
        self.kl_fig = curve_figure("attention-kl-figure", "KL between consecutive steps", "KL(p_s ‖ p_s−1), nats", height=220, width=600)
        self.kl_fig.yaxis.formatter = BasicTickFormatter(precision=1, power_limit_low=-2)
        self.kl_fig.line("step", "kl", source=self.kl_source, line_width=2, color="#9467bd")
        self.kl_fig.scatter("step", "kl", source=self.kl_source, size=5, color="#9467bd")
        self.kl_marker = Span(location=0, dimension="height", line_color=ACCENT, line_width=2, line_dash="dashed", name="attention-kl-marker")
        self.kl_fig.add_layout(self.kl_marker)
        self.kl_range = BoxAnnotation(left=0, right=0, fill_color=ACCENT, fill_alpha=0.08, visible=False, name="attention-kl-range")
        self.kl_fig.add_layout(self.kl_range)
        self.kl_fig.on_event(Tap, held(self._on_kl_tap))
        for fig in (self.share_fig, self.entropy_fig, self.kl_fig):
            with_save(fig)

        self.main_row = pn.Row(pn.pane.Bokeh(self.overlay),
                               pn.Column(pn.pane.Bokeh(self.probe_fig), self.probe_note, self.text_pane, margin=0), margin=0,
                               css_classes=["dv-main-row"])

        # ---- wiring: each part updates only on what it depends on
        state.param.watch(self._on_step, "step")
        state.param.watch(self._on_selection, ["layer", "token", "head", "merge_words", "kind", "aggregate", "step_range",
                                               "color_scale", "grid", "grey"])
        state.param.watch(self._on_probe, ["probe_x", "probe_y"])
        state.param.watch(self._on_opacity, "opacity")
        state.param.watch(self._on_cmap, "cmap")
        self.store.param.watch(self._on_run_controls, "run")
        self.store.param.watch(self._on_run, ["run", "comparison"])
        self._on_run()

    def __panel__(self) -> Any:
        return pn.Column(
            self.help,
            pn.Row(
                self.controls,
                pn.Column(self.main_row, self.grid_pane, self.trio,
                          pn.Row(pn.pane.Bokeh(self.share_fig), pn.pane.Bokeh(self.entropy_fig), margin=0),
                          pn.pane.Bokeh(self.kl_fig), margin=0),
            ),
        )

    # ---- events -------------------------------------------------------------------------------

    def _on_token_widget(self, event: Any) -> None:
        if event.new is not None:
            self.state.token = int(event.new)

    def _on_tap(self, event: Any) -> None:
        data = self.data
        if data is None or event.x is None or event.y is None:
            return
        self.state.param.update(probe_x=float(np.clip(event.x / max(data.width, 1), 0, 1)),
                                probe_y=float(np.clip(event.y / max(data.height, 1), 0, 1)))

    def _on_kl_tap(self, event: Any) -> None:
        data = self.data
        if data is not None and event.x is not None:
            self.state.step = int(np.clip(round(event.x), 0, data.n_steps - 1))

    def _on_opacity(self, event: Any) -> None:
        self.heat.glyph.global_alpha = float(event.new)
        self.text_heat.glyph.global_alpha = float(event.new)
        for fig in self.trio_figs[:2]:
            fig.renderers[1].glyph.global_alpha = float(event.new)

    def _on_cmap(self, event: Any) -> None:
        for mapper in (self.mapper, self.probe_mapper, self.pair_mapper, self.text_mapper):
            mapper.palette = PALETTES[event.new]
        if self.state.grid:
            self._on_selection()

    # ---- updates -------------------------------------------------------------------------------

    def refresh(self) -> None:
        self._on_run()

    def shown(self) -> None:
        if self.data is not None:
            self._fill_frames()

    def _selection(self) -> Selection:
        return self.data.fit_selection(Selection.of(self.state))

    @reported
    def _on_run_controls(self, *_: Any) -> None:
        """The controls follow a new run even while the tab is hidden (the figures catch up when shown)."""
        if self.data is not None and not self.active:
            self._sync_controls()

    @guarded
    def _on_run(self, *_: Any) -> None:
        data = self.data
        if data is None:
            return
        self._sync_controls()
        for fig in (self.overlay, self.probe_fig, self.text_fig, *self.trio_figs):
            set_image_extent(fig, data.height, data.width)
        self._update_all()

    def _sync_controls(self) -> None:
        """Widgets show the state (the shell fitted it to the run); nothing here writes the state."""
        data, state = self.data, self.state
        self.layer.param.update(groups=data.layer_groups(), value=state.layer)  # the shell fitted it to this run
        self._sync_token_widget()
        self._sync_head_widget()
        n = data.n_steps
        first, last = sorted(int(v) for v in state.step_range)
        self.range.param.update(start=0, end=max(n - 1, 1), value=(min(first, n - 1), min(last, n - 1)))
        self._sync_modes()

    def _sync_modes(self) -> None:
        state = self.state
        self.range.disabled = not (state.aggregate or state.grid)
        self.word_controls.visible = state.kind == "cross"
        self.head.visible = bool(self.data is not None and self.data.per_head)
        self.text_pane.visible = bool(self.data is not None and self.data.text_layers and state.kind == "cross")

    def _sync_token_widget(self) -> None:
        data, state = self.data, self.state
        token = self._selection().token
        self.token.param.update(options=data.token_options(state.merge_words), value=token)

    def _sync_head_widget(self) -> None:
        data = self.data
        self.head.param.update(options=data.head_options(), value=data.fit_head(self.state.head), visible=data.per_head)

    @guarded
    def _on_selection(self, *events: Any) -> None:
        if self.data is None:
            return
        names = {e.name for e in events}
        if "layer" in names and self.layer.value != self.state.layer and self.state.layer in self.data.layer_values():
            self.layer.value = self.state.layer
        if names & {"token", "merge_words"}:
            self._sync_token_widget()
        if "head" in names:
            self._sync_head_widget()
        if "step_range" in names and tuple(self.range.value) != tuple(self.state.step_range):
            self.range.value = tuple(self.state.step_range)
        self._sync_modes()
        self._update_all()

    @guarded
    def _on_step(self, *_: Any) -> None:
        if self.data is None:
            return
        sel = self._selection()
        self._update_probe(sel)
        if not sel.daam:  # the DAAM maps do not depend on the step
            self._update_trio(sel, self._update_overlay(sel))
            self._update_text(sel)
            self._update_bars(sel)
        self.kl_marker.location = sel.step

    @guarded
    def _on_probe(self, *_: Any) -> None:
        if self.data is None:
            return
        sel = self._selection()
        self._update_probe(sel)
        if sel.kind == "self":
            self._update_trio(sel, self._update_overlay(sel))

    def _update_all(self) -> None:
        sel = self._selection()
        heat = self._update_overlay(sel)
        self._update_probe(sel)
        self._update_trio(sel, heat)
        self._update_text(sel)
        self._update_grid(sel)
        self._update_bars(sel)
        self._update_kl(sel)

    def _image(self, step: int) -> np.ndarray:
        return _rgba_image(self.data.image(step), self.state.grey)

    def _update_overlay(self, sel: Selection) -> Heat | None:
        """Draw the main heat map; returns it (None when it could not be drawn) for A | B | A − B."""
        data = self.data
        if not (data.cross_layers if sel.kind == "cross" else data.self_layers):
            self._blank_overlay()
            self.overlay.title.text = f"this run recorded no {sel.kind}-attention maps"
            return None
        drawn = None
        with self.panel(self.overlay, self._blank_overlay):
            heat = data.heat(sel)
            packed = self._image(heat.step)
            h, w = data.height, data.width
            self.image_source.data = {"image": [packed], "x": [0], "y": [0], "dw": [w], "dh": [h], "step": [heat.step]}
            shown = _heat_data(heat.map, data.height, data.width, heat.step)
            self.heat_source.data = shown
            self.mapper.update(low=heat.low, high=heat.high)
            self.overlay.title.text = heat.title
            key = None if sel.daam else (id(data), replace(sel, step=0), self.state.grey)
            if self.image_frames.reset(None if sel.daam else (id(data), self.state.grey), data.n_steps, 4 * packed.size):
                self.image_frames.put(heat.step, {"image": packed})
            if self.heat_frames.reset(key, data.n_steps, 4 * (shown["image"][0].size + heat.map.size)):
                self.heat_frames.put(heat.step, {"image": shown["image"][0], "raw": shown["raw"][0]}, heat.low, heat.high)
            self._fill_frames()
            drawn = heat
        return drawn

    def _blank_overlay(self) -> None:
        data = self.data
        self.image_frames.reset(None, data.n_steps, 0)
        self.heat_frames.reset(None, data.n_steps, 0)
        self.image_source.data = rgba_data(blank_rgba(data.height, data.width))
        self.heat_source.data = _heat_data(np.zeros((1, 1), np.float32), data.height, data.width)

    def _frames_key(self) -> Any:
        if not self.active:
            return None
        return (self.image_frames.key if self.image_frames.enabled else None,
                self.heat_frames.key if self.heat_frames.enabled else None)

    def _frames_todo(self) -> list[int]:
        step = self._selection().step
        return sorted(set(self.image_frames.missing(step)) | set(self.heat_frames.missing(step)),
                      key=lambda s: (s - step) % max(self.data.n_steps, 1))

    def _fill_frames(self) -> None:
        if self._frames_key() not in (None, (None, None)):
            self.filler.start(self._frames_todo, self._fill_frame, self._frames_key)

    def _fill_frame(self, step: int) -> None:
        data = self.data
        try:
            if self.image_frames.enabled and not self.image_frames.has(step):
                self.image_frames.put(step, {"image": self._image(step)})
            if self.heat_frames.enabled and not self.heat_frames.has(step):
                heat = data.heat(replace(self._selection(), step=step))
                shown = _heat_data(heat.map, data.height, data.width, step)
                self.heat_frames.put(step, {"image": shown["image"][0], "raw": shown["raw"][0]}, heat.low, heat.high)
        except Exception:  # noqa: BLE001 - a step whose file is broken is reported when it is shown, not ahead
            self.image_frames.skip(step)
            self.heat_frames.skip(step)

    @staticmethod
    def _probe_data(raw: np.ndarray, height: int, width: int, query: tuple[int, int], step: int) -> dict[str, list]:
        dh, dw = display_shape(height, width)
        return {"image": [resize(raw, dh, dw)], "raw": [raw], "x": [0], "y": [0], "dw": [width], "dh": [height],
                "query": [list(query)], "step": [step]}

    def _update_probe(self, sel: Selection) -> None:
        data = self.data
        self.point_source.data = {"x": [sel.qx * data.width], "y": [sel.qy * data.height]}
        if not data.self_layers:
            self.probe_note.value = "This run has no self-attention maps."
            self.probe_source.data = self._probe_data(np.zeros((1, 1), np.float32), data.height, data.width, (0, 0), sel.step)
            self.probe_fig.title.text = "no self-attention maps"
            return
        blank = lambda: self.probe_source.update(data=self._probe_data(np.zeros((1, 1), np.float32), data.height, data.width, (0, 0), sel.step))  # noqa: E731
        with self.panel(self.probe_fig, blank):
            layer = data.drawn_layer("self", sel.layer)
            raw = data.probe_map(layer, sel.step, sel.qx, sel.qy)
            row, col = query_cell(sel.qx, sel.qy, raw.shape)
            self.probe_source.data = self._probe_data(raw, data.height, data.width, (row, col), sel.step)
            self.probe_mapper.update(low=float(raw.min()), high=float(max(raw.max(), raw.min() + 1e-6)))
            where = "all self layers (mean)" if layer == ALL_LAYERS else data.layer_text(layer)
            self.probe_fig.title.text = f"probe · {'all layers' if layer == ALL_LAYERS else f'L{layer}'} · step {sel.step}"
            self.probe_note.value = (f"Where query cell (row {row}, col {col}) of the {raw.shape[0]}×{raw.shape[1]} pooled map "
                                      f"attends, {where}. Click the image to move the query.")

    def _update_text(self, sel: Selection) -> None:
        """Where the selected word looks (text->image), over the same image as the main map; only on runs with them."""
        data = self.data
        if not self.text_pane.visible:
            return
        blank = lambda: self.text_source.update(data=_heat_data(np.zeros((1, 1), np.float32), data.height, data.width))  # noqa: E731
        with self.panel(self.text_fig, blank):
            heat = data.text_heat(sel)
            self.text_source.data = _heat_data(heat.map, data.height, data.width, heat.step)
            self.text_mapper.update(low=heat.low, high=heat.high)
            label = data.token_label(sel.token, sel.merge)
            layer = "all layers" if heat.layer == ALL_LAYERS else f"L{heat.layer}"
            when = f"steps {sel.first}–{sel.last}" if sel.daam else f"step {heat.step}"
            self.text_fig.title.text = f"'{label}' → image · {layer} · {when}"
            where = (f"all {len(data.text_layers)} text layers (mean)" if heat.layer == ALL_LAYERS
                     else data.layer_text(heat.layer))
            self.text_note.value = f"Where '{label}' looks: its query's attention over the image, {where}."

    def _update_trio(self, sel: Selection, heat_a: Heat | None = None) -> None:
        comparison = self.store.comparison
        self.trio.visible = comparison is not None and not self.state.grid
        if not self.trio.visible:
            return
        data = self.data
        shown_b = [False]

        def blank() -> None:
            for source in self.trio_heats[1:]:
                source.data = _heat_data(np.zeros((1, 1), np.float32), data.height, data.width)

        with self.panel(self.trio_figs[1], blank):
            if not comparison.ok:
                raise DatasetError("run B cannot be compared step by step: " + "; ".join(comparison.differences))
            heats = comparison.heat_pair(sel, heat_a)
            b = comparison.b
            packed = rgba(display_image(_figure.greyscale(b.image(heats[1].step)) if self.state.grey else b.image(heats[1].step),
                                        max_side=2 * TRIO_PX))
            self.image_source_b.data = {"image": [packed], "x": [0], "y": [0], "dw": [b.width], "dh": [b.height],
                                        "step": [heats[1].step]}
            for fig, heat_source, heat, (h, w) in zip(self.trio_figs, self.trio_heats, heats,
                                                      ((data.height, data.width), (b.height, b.width), (data.height, data.width))):
                set_image_extent(fig, h, w)
                heat_source.data = _heat_data(heat.map, h, w, heat.step)
                fig.title.text = heat.title
            self.pair_mapper.update(low=heats[0].low, high=heats[0].high)
            self.diff_mapper.update(low=heats[2].low, high=heats[2].high)
            shown_b[0] = True
        if not shown_b[0]:
            self.trio_figs[2].title.text = "A − B: needs run B's map"

    def _update_grid(self, sel: Selection) -> None:
        self.grid_pane.visible = self.state.grid
        self.main_row.visible = not self.state.grid
        if not self.state.grid:
            return
        data, state = self.data, self.state
        with self.panel(self.grid_fig, lambda: self.grid_source.update(data=rgba_data())):
            # the same picture `diffviz export-figure` writes for these settings
            picture = _figure.render_grid(data.run, steps=(sel.first, sel.last), head=sel.head, grey=state.grey,
                                          scale="shared" if sel.shared else "per-map", palette=state.cmap,
                                          alpha=state.opacity)
            image = np.asarray(picture.convert("RGBA"))
            h, w = image.shape[:2]
            set_image_extent(self.grid_fig, h, w)
            self.grid_source.data = rgba_data(rgba(image))
            head = f" · {data.head_label(sel.head)}" if data.per_head else ""
            self.grid_fig.title.text = f"word grid · DAAM · all {len(data.cross_layers)} layers{head} · steps {sel.first}–{sel.last}"

    def _update_bars(self, sel: Selection) -> None:
        data, state = self.data, self.state
        if not data.cross_layers:
            return
        blank = lambda: self.share_source.update(data={"token": [], "share": [], "color": [], "index": []})  # noqa: E731
        with self.panel(self.share_fig, blank):
            share, where = data.shares(sel)
            selected = set(data.token_indices(sel.token, state.merge_words))
            labels = [f"{i}:{data.token_text(i)}" for i in range(len(share))]
            self.share_fig.x_range.factors = labels
            self.share_source.data = {"token": labels, "share": np.asarray(share, np.float64),
                                      "color": [ACCENT if i in selected else "#4c72b0" for i in range(len(share))],
                                      "index": list(range(len(share)))}
            self.share_fig.title.text = f"Token share · {where}"
        with self.panel(self.entropy_fig, lambda: self.entropy_source.update(data={"layer": [], "entropy": [], "color": []})):
            names, values, where = data.entropies(sel)
            current = f"L{state.layer}"
            self.entropy_fig.x_range.factors = names
            self.entropy_source.data = {"layer": names, "entropy": values,
                                        "color": [ACCENT if n == current else "#55a868" for n in names]}
            self.entropy_fig.title.text = f"Entropy per layer (H / ln K) · {where}"

    def _update_kl(self, sel: Selection) -> None:
        data = self.data
        layer = data.drawn_layer("cross", sel.layer)
        curve = data.kl_curve(layer)
        if curve is None:
            self.kl_source.data = {"step": [], "kl": []}
            self.kl_fig.title.text = "KL across steps: not in this run's metrics"
        else:
            self.kl_source.data = {"step": np.arange(1, len(curve) + 1), "kl": curve}
            where = "layer mean" if layer == ALL_LAYERS else f"L{layer}"
            self.kl_fig.title.text = f"KL between consecutive steps · {where}"
        self.kl_marker.location = sel.step
        self.kl_range.update(left=sel.first - 0.5, right=sel.last + 0.5, visible=sel.daam or self.state.grid)
