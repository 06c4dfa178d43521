"""View 2, the attention explorer.

* Controls: layer (grouped by block and resolution, plus "all layers, mean"), token (prompt tokens,
  optionally merged into words), head (runs recorded per head: the mean or one head; hidden
  otherwise), cross/self, aggregate (DAAM) with its step range, opacity,
  colormap and a shared or per-map colour scale.
* The heat map is drawn over the step's x̂0 image. The stored map (``raw`` column of the
  ``attention-heat`` source, exactly the file's values for one layer and token) is upsampled
  bilinearly for display (``image`` column), because stored maps may be coarser than the image.
* Entropy per layer and each token's share of the attention mass at the current step/layer, as bars;
  the KL-across-steps curve beside them.
* Self-attention probe: click the image; the probe figure shows where that query location
  attends (its row of the pooled self map). With kind = self the main overlay shows it too.
* Aggregate mode: the token's map averaged over all layers (at one resolution) and a step range,
  drawn over the final image of that range.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import panel as pn
from bokeh.events import Tap
from bokeh.models import BasicTickFormatter, ColorBar, ColumnDataSource, LinearColorMapper, Span

from app.state import ALL_LAYERS, MEAN_HEAD
from app.store import one_line, query_cell, resize
from app.views.common import (ACCENT, PALETTES, View, bar_figure, curve_figure, guarded, held, image_figure, later, reported, rgba,
                              rgba_source, set_image_extent)
from app.views.frames import FrameFiller, StepFrames

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


class AttentionView(View):
    def __init__(self, **params: Any):
        super().__init__(**params)
        state = self.state
        # ---- controls
        self.layer = pn.widgets.Select(label="Layer", groups={"All layers": {"all layers (mean)": ALL_LAYERS}}, width=280,
                                      tags=["dv:layer"])
        self.token = pn.widgets.Select(label="Token", options={"-": 0}, width=280, tags=["dv:token"])
        self.head = pn.widgets.Select(label="Head", options={"mean": MEAN_HEAD}, width=280, visible=False, tags=["dv:head"])
        self.merge = pn.widgets.Checkbox.from_param(state.param.merge_words, label="merge sub-word tokens into words", tags=["dv:merge"])
        self.kind = pn.widgets.RadioButtonGroup.from_param(state.param.kind, options={"cross (token)": "cross", "self (probe)": "self"},
                                                           color="default", variant="outline", width=280, tags=["dv:kind"])
        self.aggregate = pn.widgets.Checkbox.from_param(state.param.aggregate, label="aggregate: DAAM word map (all layers, step range)",
                                                     tags=["dv:aggregate"])
        self.range = pn.widgets.IntRangeSlider(label="Steps averaged", start=0, end=1, value=(0, 1), width=280, disabled=True,
                                                tags=["dv:range"])
        self.opacity = pn.widgets.FloatSlider.from_param(state.param.opacity, label="Opacity", step=0.05, width=280)
        self.cmap = pn.widgets.Select.from_param(state.param.cmap, label="Colormap", width=280)
        self.scale = pn.widgets.RadioButtonGroup.from_param(state.param.color_scale, label="Colour scale",
                                                            color="default", variant="outline", width=280,
                                                            tags=["dv:scale"])
        self.layer.param.watch(held(lambda e: setattr(state, "layer", str(e.new))), "value")
        self.token.param.watch(held(self._on_token_widget), "value")
        self.head.param.watch(held(lambda e: setattr(state, "head", str(e.new))), "value")
        self.range.param.watch(lambda e: setattr(state, "step_range", tuple(int(v) for v in e.new)), "value_throttled")
        self.controls = pn.Column(
            self.layer, self.token, self.merge, self.head, pn.pane.HTML("<b>Heat map</b>", margin=(8, 10, 0, 10)), self.kind,
            self.aggregate, self.range, self.opacity, self.cmap,
            pn.pane.HTML("Colour scale", margin=(6, 10, 0, 10)), self.scale, width=310,
        )

        # ---- overlay: image + heat map + probe marker
        self.mapper = LinearColorMapper(name="attention-cmap", palette=PALETTES[state.cmap], low=0, high=1)
        self.overlay = image_figure("attention-overlay-figure", "attention", px=400)
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
        self.overlay.scatter("x", "y", source=self.point_source, marker="circle_cross", size=16, fill_alpha=0,
                             line_color="white", line_width=2.5)
        self.overlay.scatter("x", "y", source=self.point_source, marker="circle_cross", size=16, fill_alpha=0,
                             line_color="black", line_width=1)
        self.overlay.add_layout(ColorBar(color_mapper=self.mapper, width=12, label_standoff=6,
                                         major_label_text_font_size="10pt"), "right")
        self.overlay.on_event(Tap, held(self._on_tap))

        # ---- self-attention probe
        self.probe_mapper = LinearColorMapper(name="attention-probe-cmap", palette=PALETTES[state.cmap], low=0, high=1)
        self.probe_fig = image_figure("attention-probe-figure", "self-attention probe", px=240)
        self.probe_source = ColumnDataSource(name="attention-probe", data={"image": [np.zeros((1, 1), np.float32)], "raw": [np.zeros((1, 1), np.float32)],
                                                                           "x": [0], "y": [0], "dw": [1], "dh": [1], "query": [[0, 0]],
                                                                           "step": [-1]})
        self.probe_fig.image(image="image", x="x", y="y", dw="dw", dh="dh", source=self.probe_source, color_mapper=self.probe_mapper)
        self.probe_fig.scatter("x", "y", source=self.point_source, marker="circle_cross", size=14, fill_alpha=0,
                               line_color="#00e5ff", line_width=2)
        self.probe_fig.on_event(Tap, held(self._on_tap))
        # StaticText, not an HTML pane: panes re-send their stylesheets, which recomputes the document's models
        self.probe_note = pn.widgets.StaticText(value="", styles={"font-size": "10.5pt", "color": "#555"}, width=250)

        # ---- bars: token share and entropy per layer; KL across steps
        self.share_source = ColumnDataSource(name="attention-share", data={"token": [], "share": [], "color": [], "index": []})
        self.share_fig = bar_figure("attention-share-figure", "Token share of attention", self.share_source,
                                    x="token", top="share", y_label="share of prompt tokens' mass", fmt="0.000")

        self.entropy_source = ColumnDataSource(name="attention-entropy", data={"layer": [], "entropy": [], "color": []})
        self.entropy_fig = bar_figure("attention-entropy-figure", "Entropy per layer (normalised)", self.entropy_source,
                                      x="layer", top="entropy", y_label="H / ln K", fmt="0.000", rotate=False,
                                      y_range=(0, 1.02))

        self.kl_source = ColumnDataSource(name="attention-kl", data={"step": [], "kl": []})
        self.kl_fig = curve_figure("attention-kl-figure", "KL between consecutive steps", "KL(p_s ‖ p_s−1), nats", height=230, width=420)
        self.kl_fig.yaxis.formatter = BasicTickFormatter(precision=1, power_limit_low=-2)
        self.kl_fig.line("step", "kl", source=self.kl_source, line_width=2, color="#9467bd")
        self.kl_fig.scatter("step", "kl", source=self.kl_source, size=5, color="#9467bd")
        self.kl_marker = Span(location=0, dimension="height", line_color=ACCENT, line_width=2, line_dash="dashed", name="attention-kl-marker")
        self.kl_fig.add_layout(self.kl_marker)
        self.kl_fig.on_event(Tap, held(self._on_kl_tap))

        # ---- wiring: each part updates only on what it depends on
        state.param.watch(self._on_step, "step")
        state.param.watch(self._on_selection, ["layer", "token", "head", "merge_words", "kind", "aggregate", "step_range", "color_scale"])
        state.param.watch(self._on_probe, ["probe_x", "probe_y"])
        state.param.watch(self._on_opacity, "opacity")
        state.param.watch(self._on_cmap, "cmap")
        self.store.param.watch(self._on_run_controls, "run")
        self.store.param.watch(self._on_run, "run")
        self._on_run()

    def __panel__(self) -> Any:
        return pn.Row(
            self.controls,
            pn.Column(
                pn.Row(pn.pane.Bokeh(self.overlay),
                       pn.Column(pn.pane.Bokeh(self.probe_fig), self.probe_note)),
                pn.Row(pn.pane.Bokeh(self.share_fig), pn.pane.Bokeh(self.entropy_fig)),
                pn.pane.Bokeh(self.kl_fig),
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

    def _on_cmap(self, event: Any) -> None:
        self.mapper.palette = PALETTES[event.new]
        self.probe_mapper.palette = PALETTES[event.new]

    # ---- updates -------------------------------------------------------------------------------

    def refresh(self) -> None:
        self._on_run()

    def shown(self) -> None:
        if self.data is not None:
            self._fill_frames()

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
        for fig in (self.overlay, self.probe_fig):
            set_image_extent(fig, data.height, data.width)
        self._update_all()

    def _sync_controls(self) -> None:
        data, state = self.data, self.state
        groups = data.layer_groups()
        if state.layer not in data.layer_values():
            state.layer = "mean"
        self.layer.param.update(groups=groups, value=state.layer)
        self._sync_token_widget()
        self._sync_head_widget()
        n = data.n_steps
        first, last = state.step_range
        if not (0 <= first <= last < n) or (first, last) == (0, 0):
            first, last = 0, n - 1
        self.range.param.update(start=0, end=max(n - 1, 1), value=(first, last))
        if tuple(state.step_range) != (first, last):
            state.step_range = (first, last)
        self.range.disabled = not state.aggregate

    def _sync_token_widget(self) -> None:
        data, state = self.data, self.state
        options = data.token_options(state.merge_words)
        token = state.token if state.token is not None and 0 <= state.token < len(data.tokens) else data.default_token()
        token = data.canonical_token(token, state.merge_words)
        self.token.param.update(options=options, value=token)
        if state.token != token:
            state.token = token

    def _head(self) -> str:
        """The head shown: ``State.head`` (the shell fits it to each run), the mean where the run has no such head."""
        return self.data.fit_head(self.state.head)

    def _sync_head_widget(self) -> None:
        data = self.data
        self.head.param.update(options=data.head_options(), value=self._head(), visible=data.per_head)

    @guarded
    def _on_selection(self, *events: Any) -> None:
        if self.data is None:
            return
        names = {e.name for e in events}
        if "layer" in names and self.layer.value != self.state.layer:
            if self.state.layer in self.data.layer_values():
                self.layer.value = self.state.layer
            else:
                self.state.layer = ALL_LAYERS
                return
        if names & {"token", "merge_words"}:
            self._sync_token_widget()
        if "head" in names:
            self._sync_head_widget()
        self.range.disabled = not self.state.aggregate
        if "step_range" in names and tuple(self.range.value) != tuple(self.state.step_range):
            self.range.value = tuple(self.state.step_range)
        self._update_all()

    @guarded
    def _on_step(self, *_: Any) -> None:
        if self.data is None:
            return
        if not (self.state.aggregate and self.state.kind == "cross"):  # the DAAM map does not depend on the step
            self._update_image()
            self._update_heat()
        self._update_probe()
        self._update_bars()
        self.kl_marker.location = self.state.step

    @guarded
    def _on_probe(self, *_: Any) -> None:
        if self.data is None:
            return
        self._update_probe()
        if self.state.kind == "self":
            self._update_heat()

    def _update_all(self) -> None:
        self._update_image()
        self._update_heat()
        self._update_probe()
        self._update_bars()
        self._update_kl()

    def _step(self) -> int:
        return int(min(self.state.step, self.data.n_steps - 1))

    def _range(self) -> tuple[int, int]:
        first, last = self.state.step_range
        n = self.data.n_steps
        first, last = int(np.clip(first, 0, n - 1)), int(np.clip(last, 0, n - 1))
        return min(first, last), max(first, last)

    def _update_image(self) -> None:
        data, state = self.data, self.state
        fixed = state.aggregate and state.kind == "cross"  # the DAAM map is drawn over its range's last image
        step = self._range()[1] if fixed else self._step()
        image = data.image(step)
        h, w = image.shape[:2]
        packed = rgba(image)
        self.image_source.data = {"image": [packed], "x": [0], "y": [0], "dw": [w], "dh": [h], "step": [step]}
        if self.image_frames.reset(None if fixed else id(data), data.n_steps, 4 * h * w):
            self.image_frames.put(step, {"image": packed})

    def _layer_for(self, kind: str) -> str:
        """The selected layer if it has maps of ``kind``, else all layers."""
        layer = self.state.layer
        layers = self.data.cross_layers if kind == "cross" else self.data.self_layers
        return layer if layer == ALL_LAYERS or int(layer) in layers else ALL_LAYERS

    def _heat_key(self) -> Any:
        """What the heat map of a step depends on besides the step; None when it does not depend on the step."""
        s = self.state
        if s.aggregate and s.kind == "cross":
            return None
        probe = (s.probe_x, s.probe_y) if s.kind == "self" else None
        head = self._head() if s.kind == "cross" else None
        return (id(self.data), self._layer_for(s.kind), s.token, s.merge_words, s.kind, s.color_scale, probe, head)

    def _heat(self, step: int) -> tuple[np.ndarray, float, float, str]:
        """The heat map shown at ``step`` for the current selection: ``(raw map, colour low, high, title)``."""
        data, state = self.data, self.state
        layer = self._layer_for(state.kind)
        label = data.token_label(state.token, state.merge_words)
        layer_text = "all layers (mean)" if layer == ALL_LAYERS else data.layer_label(int(layer))
        head = self._head()
        head_text = f" · {data.head_label(head)}" if data.per_head else ""
        shared = state.color_scale == "shared"
        if state.kind == "self":
            raw = data.probe_map(layer, step, state.probe_x, state.probe_y)
            title = f"self · {layer_text} · query ({state.probe_x:.2f}, {state.probe_y:.2f}) · step {step}"
            shared_high = self._self_max(layer, step) if shared else 0.0
        elif state.aggregate:
            first, last = self._range()
            raw = data.aggregate_map(state.token, state.merge_words, first, last, head)
            title = f"DAAM · '{label}' · all {len(data.cross_layers)} layers{head_text} · steps {first}–{last}"
            shared_high = float(data.aggregate_all(first, last, head).max()) if shared else 0.0
        else:
            raw = data.cross_map(layer, step, state.token, state.merge_words, head)
            title = f"cross · '{label}' · {layer_text}{head_text} · step {step}"
            shared_high = float(data.cross_all_tokens(layer, step, head).max()) if shared else 0.0
        low, high = (0.0, shared_high) if shared else (float(np.min(raw)), float(np.max(raw)))
        if not high > low:
            high = low + 1e-6
        return raw, low, high, title

    def _update_heat(self) -> None:
        data, state = self.data, self.state
        step = self._step()
        if not (data.cross_layers if state.kind == "cross" else data.self_layers):
            self.heat_frames.reset(None, data.n_steps, 0)
            self.heat_source.data = _heat_data(np.zeros((1, 1), np.float32), data.height, data.width, step)
            self.overlay.title.text = f"this run recorded no {state.kind}-attention maps"
            return
        raw, low, high, title = self._heat(step)
        shown_step = self._range()[1] if state.aggregate and state.kind == "cross" else step
        heat = _heat_data(raw, data.height, data.width, shown_step)
        self.heat_source.data = heat
        self.mapper.update(low=low, high=high)
        self.overlay.title.text = title
        if self.heat_frames.reset(self._heat_key(), data.n_steps, 4 * (heat["image"][0].size + raw.size)):
            self.heat_frames.put(step, {"image": heat["image"][0], "raw": heat["raw"][0]}, low, high)
        self._fill_frames()

    def _frames_key(self) -> Any:
        if not self.active:
            return None
        return (self.image_frames.key if self.image_frames.enabled else None,
                self.heat_frames.key if self.heat_frames.enabled else None)

    def _frames_todo(self) -> list[int]:
        step = self._step()
        return sorted(set(self.image_frames.missing(step)) | set(self.heat_frames.missing(step)),
                      key=lambda s: (s - step) % max(self.data.n_steps, 1))

    def _fill_frames(self) -> None:
        if self._frames_key() not in (None, (None, None)):
            self.filler.start(self._frames_todo, self._fill_frame, self._frames_key)

    def _fill_frame(self, step: int) -> None:
        data = self.data
        try:
            if self.image_frames.enabled and not self.image_frames.has(step):
                self.image_frames.put(step, {"image": rgba(data.image(step))})
            if self.heat_frames.enabled and not self.heat_frames.has(step):
                raw, low, high, _title = self._heat(step)
                heat = _heat_data(raw, data.height, data.width, step)
                self.heat_frames.put(step, {"image": heat["image"][0], "raw": heat["raw"][0]}, low, high)
        except Exception as exc:  # noqa: BLE001 - a broken file shows in the banner now, not only when its step is shown
            self.image_frames.skip(step)
            self.heat_frames.skip(step)
            self.report(one_line(exc))

    def _self_max(self, layer: str, step: int) -> float:
        data = self.data
        layers = data.self_layers if layer == ALL_LAYERS else [int(layer)]
        return float(max(np.max(data.run.self_attention(i, step)) for i in layers))

    def _update_probe(self) -> None:
        data, state = self.data, self.state
        qx, qy = state.probe_x, state.probe_y
        self.point_source.data = {"x": [qx * data.width], "y": [qy * data.height]}
        if not data.self_layers:
            self.probe_note.value = "This run has no self-attention maps."
            return
        layer = self._layer_for("self")
        step = self._step()
        raw = data.probe_map(layer, step, qx, qy)
        row, col = query_cell(qx, qy, raw.shape)
        dh, dw = display_shape(data.height, data.width)
        self.probe_source.data = {"image": [resize(raw, dh, dw)], "raw": [raw], "x": [0], "y": [0],
                                  "dw": [data.width], "dh": [data.height], "query": [[row, col]], "step": [step]}
        self.probe_mapper.update(low=float(raw.min()), high=float(max(raw.max(), raw.min() + 1e-6)))
        where = "all self layers (mean)" if layer == ALL_LAYERS else data.layer_label(int(layer))
        self.probe_fig.title.text = f"self-attention probe · step {step}"
        self.probe_note.value = (f"Where query pixel (row {row}, col {col}) of the {raw.shape[0]}×{raw.shape[1]} pooled map attends, "
                                  f"{where}. Click the image to move the query.")

    def _update_bars(self) -> None:
        data, state = self.data, self.state
        step = self._step()
        if not data.cross_layers:
            return
        layer = self._layer_for("cross")
        share = data.token_share(layer, step, self._head())
        selected = set(data.token_indices(state.token, state.merge_words))
        labels = [f"{i}:{data.token_text(i)}" for i in range(len(share))]
        colours = [ACCENT if i in selected else "#4c72b0" for i in range(len(share))]
        self.share_fig.x_range.factors = labels
        self.share_source.data = {"token": labels, "share": np.asarray(share, np.float64), "color": colours,
                                  "index": list(range(len(share)))}
        where = "all layers" if layer == ALL_LAYERS else f"L{layer}"
        if data.per_head:
            where += f" · {data.head_label(self._head())}"
        self.share_fig.title.text = f"Token share of attention · {where} · step {step}"
        names, values = data.entropy_by_layer(step)
        current = f"L{state.layer}"
        self.entropy_fig.x_range.factors = names
        self.entropy_source.data = {"layer": names, "entropy": values,
                                    "color": [ACCENT if n == current else "#55a868" for n in names]}
        self.entropy_fig.title.text = f"Entropy per layer (normalised) · step {step}"

    def _update_kl(self) -> None:
        data = self.data
        layer = self._layer_for("cross")
        curve = data.kl_curve(layer)
        if curve is None:
            self.kl_source.data = {"step": [], "kl": []}
            self.kl_fig.title.text = "KL across steps: not in this run's metrics"
        else:
            self.kl_source.data = {"step": np.arange(1, len(curve) + 1), "kl": curve}
            where = "layer mean" if layer == ALL_LAYERS else f"L{layer}"
            self.kl_fig.title.text = f"KL between consecutive steps · {where}"
        self.kl_marker.location = self._step()
