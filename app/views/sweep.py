"""The Sweep tab: the runs of a sweep as small multiples laid out along two swept parameters, and the index's
headline figures against a parameter.

* Small multiples: each cell is one run (rows = one axis, columns = another, every other axis held at one value
  by its own selector), showing its final image, or one word's DAAM map (the run's aggregate over all layers and
  steps, on one colour scale for the cells shown). Only the cells shown are read (``app.sweepstore``).
* Headline figures: the final latent norm, and the chosen word's share of the last step's cross attention, of
  every finished run against the chosen parameter (a dot per run, a line through the means).
* Click a cell to pick its run; picking a second opens the two in Compare (``State.dataset`` and
  ``State.compare``) and switches to that tab. "Open picked run" shows a single pick in the other tabs.

* A long axis is paged: 12 values at a time, chosen by "Rows shown" / "Columns shown"; the plots take an axis's
  first 100 values. A cell whose run disagrees with its index entry is not drawn (``Sweep.check``).

Everything is one figure per panel, built once: the cells are glyphs of one figure whose sources and ranges are
replaced when the layout changes. Named models: ``sweep-grid-figure``, ``sweep-cells`` (one row per cell: row,
col, run, status, centre x/y), ``sweep-thumbs`` (image_rgba), ``sweep-maps`` (image), ``sweep-cell-borders``,
``sweep-picked``, ``sweep-norm``/``sweep-share`` (dots) and ``sweep-norm-mean``/``sweep-share-mean``.
"""
from __future__ import annotations

import html
import math
from typing import Any, Callable

import numpy as np
import panel as pn
import param
from bokeh.events import Tap
from bokeh.models import ColorBar, ColumnDataSource, FactorRange, FixedTicker, HoverTool, LinearColorMapper, Range1d
from bokeh.plotting import figure
from panel.io.document import hold

from app.store import one_line
from app.sweepstore import MAX_COLS, MAX_ROWS, NO_AXIS, Layout, Sweep, SweepStore, release_memory, value_text
from app.views.common import CSS, PALETTES, RUN_COLOURS, View, display_image, guarded, held, rgba, style, with_save
from export.contract import DatasetError

HELP = ("<b>How to read this.</b> Each cell is one run of the sweep: rows and columns are two of the swept "
        "parameters, and every other parameter is held at the value its selector shows. <b>Word map</b> shows the "
        "chosen word's DAAM map (all layers, all steps) on one colour scale for every cell. The plots give each "
        "finished run's final latent norm and the word's share of the last step's cross attention against a "
        "parameter (a dot per run, the line through the means). <b>Click a cell</b> to pick its run; a second "
        "pick opens both in Compare runs.")
#: Space between cells, as a fraction of a cell.
GAP = 0.08
#: The grid's frame width on screen (px; with its axis it fits the main column at 1280 px) and the bounds of one
#: cell's side.
GRID_PX, CELL_MIN_PX, CELL_MAX_PX = 840, 60, 180
SHOW = {"final image": "image", "word map": "word map"}
NONE_LABEL = "(none)"
#: Cell borders: white images on a white page still read as separate cells.
BORDER = "#8c8c8c"


def _centre(k: int) -> float:
    return k * (1 + GAP) + 0.5


def _extent(n: int) -> tuple[float, float]:
    return -GAP / 2, max(n, 1) * (1 + GAP) - GAP / 2


def cell_at(x: float, y: float) -> tuple[int, int]:
    """``(row, col)`` of the cell under data point ``(x, y)`` (the grid's y axis points down)."""
    return int(math.floor((y + GAP / 2) / (1 + GAP))), int(math.floor((x + GAP / 2) / (1 + GAP)))


def fit_in_cell(row: int, col: int, h: int, w: int) -> tuple[float, float, float, float]:
    """``(x, y, dw, dh)`` of an ``h`` x ``w`` image in cell ``(row, col)``: its long side fills the cell, centred."""
    side = max(h, w, 1)
    dw, dh = w / side, h / side
    return col * (1 + GAP) + (1 - dw) / 2, row * (1 + GAP) + (1 - dh) / 2, dw, dh


def _empty(*columns: str) -> dict[str, list]:
    return {c: [] for c in columns}


CELL_COLUMNS = ("x", "y", "row", "col", "run", "params", "status", "note")
IMAGE_COLUMNS = ("image", "x", "y", "dw", "dh", "run")


class SweepView(View):
    """The Sweep tab. ``sweeps`` holds the open sweep; ``show_tab(name)`` brings a tab of the shell to the front."""

    sweeps = param.ClassSelector(class_=SweepStore)
    show_tab = param.Callable(default=None, doc="called with a tab's title to show it (Compare runs)")

    def __init__(self, **params: Any):
        super().__init__(**params)
        state = self.state
        if self.show_tab is None:
            self.show_tab = lambda name: None
        #: True while the view sets its widgets from the state (their watchers then write nothing back)
        self._syncing = False
        #: picked run names, oldest first (two open Compare)
        self.picked: list[str] = []
        self._layout: Layout | None = None
        #: why cells of the last layout drawn could not be (one line each)
        self._problems: list[str] = []

        self.help = pn.pane.HTML(f"<p class='dv-help'>{HELP}</p>", sizing_mode="stretch_width", stylesheets=[CSS], margin=(0, 10))
        self.status = pn.pane.HTML("", sizing_mode="stretch_width", stylesheets=[CSS], css_classes=["dv-sweep-status"])
        self.rows = pn.widgets.Select(label="Rows", options=[NONE_LABEL], width=140, tags=["dv:sweep-rows"])
        self.cols = pn.widgets.Select(label="Columns", options=[NONE_LABEL], width=140, tags=["dv:sweep-cols"])
        self.show = pn.widgets.RadioButtonGroup(label="Show", options=SHOW, value=state.sweep_show, width=200,
                                                margin=(23, 10, 5, 10), color="default", variant="outline", tags=["dv:sweep-show"])
        self.word = pn.widgets.Select(label="Word", options=[""], width=140, tags=["dv:sweep-word"])
        self.x_axis = pn.widgets.Select(label="Plot against", options=[""], width=160, tags=["dv:sweep-x"])
        self._fixed: dict[str, pn.widgets.Select] = {}
        # pages of a long axis (shown only when it has more values than a page holds)
        self.row_page = pn.widgets.Select(label="Rows shown", options={"": 0}, width=150, visible=False,
                                          tags=["dv:sweep-row-page"])
        self.col_page = pn.widgets.Select(label="Columns shown", options={"": 0}, width=150, visible=False,
                                          tags=["dv:sweep-col-page"])
        self.open_one = pn.widgets.Button(label="Open picked run", width=140, margin=(23, 5, 5, 5), disabled=True,
                                          tags=["dv:sweep-open"])
        self.close = pn.widgets.Button(label="Close sweep", width=110, margin=(23, 5, 5, 5), tags=["dv:sweep-close"])
        self.rows.param.watch(self._on_widget("sweep_rows"), "value")
        self.cols.param.watch(self._on_widget("sweep_cols"), "value")
        self.word.param.watch(self._on_widget("sweep_word"), "value")
        self.x_axis.param.watch(self._on_widget("sweep_x"), "value")
        self.show.param.watch(self._on_widget("sweep_show"), "value")
        for page in (self.row_page, self.col_page):
            page.param.watch(self._on_page, "value")
        self.open_one.on_click(held(lambda _e: self._open_picked()))
        self.close.on_click(lambda _e: setattr(self.state, "sweep", ""))
        # wraps: a sweep of many axes has one selector per held axis (set with the sweep, see _controls)
        self.controls = pn.FlexBox(*self._controls(), flex_wrap="wrap", align_items="flex-start",
                                   sizing_mode="stretch_width", margin=0)

        # ---- small multiples: one figure, every cell a glyph
        self.cell_source = ColumnDataSource(name="sweep-cells", data=_empty(*CELL_COLUMNS))
        self.thumb_source = ColumnDataSource(name="sweep-thumbs", data=_empty(*IMAGE_COLUMNS))
        self.map_source = ColumnDataSource(name="sweep-maps", data=_empty(*IMAGE_COLUMNS))
        self.picked_source = ColumnDataSource(name="sweep-picked", data=_empty("x", "y", "color", "label"))
        self.mapper = LinearColorMapper(name="sweep-cmap", palette=PALETTES["inferno"], low=0, high=1)
        self.grid_fig = figure(name="sweep-grid-figure", title="sweep", tools="tap", toolbar_location=None,
                               frame_width=GRID_PX, frame_height=CELL_MAX_PX, width=None, height=None,
                               width_policy="fixed", height_policy="fixed",
                               x_range=Range1d(*_extent(1)), y_range=Range1d(_extent(1)[1], _extent(1)[0]),
                               x_axis_location="above")
        cells = self.grid_fig.rect("x", "y", width=1, height=1, source=self.cell_source, fill_color="#eeeeee",
                                   line_color=None)
        self.grid_fig.image_rgba(image="image", x="x", y="y", dw="dw", dh="dh", source=self.thumb_source)
        self.grid_fig.image(image="image", x="x", y="y", dw="dw", dh="dh", source=self.map_source, color_mapper=self.mapper)
        self.grid_fig.text("x", "y", text="note", source=self.cell_source, text_align="center", text_baseline="middle",
                           text_font_size="10pt", text_color="#555555")
        self.grid_fig.rect("x", "y", width=1, height=1, source=self.cell_source, fill_alpha=0, line_color=BORDER,
                           line_width=1, name="sweep-cell-borders")
        self.grid_fig.rect("x", "y", width=1 + GAP / 2, height=1 + GAP / 2, source=self.picked_source, fill_alpha=0,
                           line_color="color", line_width=4)
        self.grid_fig.text("x", "y", text="label", source=self.picked_source, text_color="color", text_font_style="bold",
                           text_font_size="14pt", x_offset=-2, y_offset=-2, text_align="right", text_baseline="top")
        self.grid_fig.add_tools(HoverTool(renderers=[cells], tooltips=[("run", "@run"), ("", "@params"), ("status", "@status")]))
        self.grid_fig.add_layout(ColorBar(color_mapper=self.mapper, width=12, major_label_text_font_size="10pt",
                                          name="sweep-colorbar", visible=False), "right")
        self.grid_fig.grid.visible = False
        for axis in self.grid_fig.axis:
            axis.major_tick_line_color = None
            axis.minor_tick_line_color = None
            axis.axis_line_color = None
        with_save(style(self.grid_fig))
        self.grid_fig.on_event(Tap, self._on_tap)

        # ---- headline figures against one parameter
        self.norm_source = ColumnDataSource(name="sweep-norm", data=_empty("x", "y", "run", "params"))
        self.share_source = ColumnDataSource(name="sweep-share", data=_empty("x", "y", "run", "params"))
        self.norm_mean = ColumnDataSource(name="sweep-norm-mean", data=_empty("x", "y"))
        self.share_mean = ColumnDataSource(name="sweep-share-mean", data=_empty("x", "y"))
        self.norm_fig = self._headline_figure("sweep-norm-figure", "Final latent norm", "‖x‖₂", self.norm_source, self.norm_mean, "#1f77b4")
        self.share_fig = self._headline_figure("sweep-share-figure", "Word share", "share", self.share_source, self.share_mean, "#dd8452")

        self.sweeps.param.watch(self._on_sweep, "sweep")
        if pn.state.curdoc is not None:  # under panel serve: a closed session's index goes back to the system
            pn.state.on_session_destroyed(self._forget)
        state.param.watch(self._on_layout, ["sweep_rows", "sweep_cols", "sweep_fixed", "sweep_show", "sweep_word"])
        state.param.watch(self._on_headline, ["sweep_x", "sweep_word"])
        state.param.watch(self._on_runs_shown, ["dataset", "compare"])
        self._on_sweep()

    @staticmethod
    def _headline_figure(name: str, title: str, y_label: str, source: ColumnDataSource, mean: ColumnDataSource,
                         colour: str) -> Any:
        fig = figure(name=name, title=title, x_range=FactorRange(), height=260, width=420, min_width=320,
                     sizing_mode="stretch_width", tools="", toolbar_location=None)
        fig.line("x", "y", source=mean, color=colour, line_width=2, alpha=0.7)
        dots = fig.scatter("x", "y", source=source, size=8, color=colour, alpha=0.8)
        fig.add_tools(HoverTool(renderers=[dots], tooltips=[("run", "@run"), ("", "@params"), ("value", "@y{0.0000}")]))
        fig.yaxis.axis_label = y_label
        fig.grid.grid_line_alpha = 0.4
        fig.y_range = Range1d(0, 1)
        return with_save(style(fig))

    def __panel__(self) -> Any:
        stretch = dict(sizing_mode="stretch_width", margin=0)
        return pn.Column(
            self.help,
            self.status,
            self.controls,
            pn.pane.Bokeh(self.grid_fig, sizing_mode="fixed"),
            pn.Row(self.x_axis, margin=0),
            pn.Row(pn.pane.Bokeh(self.norm_fig, **stretch), pn.pane.Bokeh(self.share_fig, **stretch), **stretch),
            **stretch,
        )

    def _controls(self) -> list[Any]:
        return [self.rows, self.cols, self.row_page, self.col_page, *self._fixed.values(), self.show, self.word,
                self.open_one, self.close]

    @property
    def sweep(self) -> Sweep | None:
        return self.sweeps.sweep

    # ---- widgets -> state ------------------------------------------------------------------------

    def _on_widget(self, name: str) -> Callable[[Any], None]:
        def write(event: Any) -> None:
            if self._syncing:
                return
            value = event.new
            if name in ("sweep_rows", "sweep_cols"):
                value = NO_AXIS if value == NONE_LABEL else value
            with hold():
                setattr(self.state, name, value)
        return write

    def _on_fixed_widget(self, axis: str) -> Callable[[Any], None]:
        def write(event: Any) -> None:
            if not self._syncing:
                with hold():
                    self.state.sweep_fixed = {**self.state.sweep_fixed, axis: event.new}
        return write

    def _forget(self, session_context: Any) -> None:  # Bokeh checks the callback's one argument
        """The session is gone: drop its sweep (no view update) and return the freed memory (``release_memory``)."""
        with param.parameterized.discard_events(self.sweeps):
            self.sweeps.sweep = None
        self._layout, self.picked = None, []
        release_memory()

    def _on_page(self, _event: Any) -> None:
        if not self._syncing:
            self._on_layout()

    # ---- updates ----------------------------------------------------------------------------------

    def refresh(self) -> None:
        self._on_sweep()

    @guarded
    def _on_sweep(self, *_: Any) -> None:
        """A new sweep: its selectors, then everything drawn."""
        sweep = self.sweep
        self.picked = []
        self._layout = None
        if sweep is None:
            self.status.object = "<p class='dv-note'>No sweep open. Open a folder or URL holding a sweep.json.</p>"
            self._blank()
            return
        self._syncing = True
        try:
            names = sweep.axis_names
            self.rows.options = [NONE_LABEL, *names]
            self.cols.options = [NONE_LABEL, *names]
            self.x_axis.options = names
            self.word.options = sweep.words() or [""]
            self._fixed = {}
            for name, values in sweep.axes:
                widget = pn.widgets.Select(label=name, options={value_text(v): v for v in values}, value=values[0], width=120,
                                           tags=[f"dv:sweep-fixed-{name}"])
                widget.param.watch(self._on_fixed_widget(name), "value")
                self._fixed[name] = widget
            self.controls.objects = self._controls()
        finally:
            self._syncing = False
        self._draw_layout()
        self._draw_headline()

    @guarded
    def _on_layout(self, *_: Any) -> None:
        if self.sweep is not None:
            self._draw_layout()

    @guarded
    def _on_headline(self, *_: Any) -> None:
        if self.sweep is not None:
            self._draw_headline()

    @guarded
    def _on_runs_shown(self, *_: Any) -> None:
        if self.sweep is not None and self._layout is not None:
            self._draw_picked()
            self._show_status()

    def _blank(self) -> None:
        self._layout = None
        self._problems = []
        for source, columns in ((self.cell_source, CELL_COLUMNS), (self.thumb_source, IMAGE_COLUMNS),
                                (self.map_source, IMAGE_COLUMNS)):
            source.data = _empty(*columns)
        self.picked_source.data = _empty("x", "y", "color", "label")
        for source in (self.norm_source, self.share_source):
            source.data = _empty("x", "y", "run", "params")
        for source in (self.norm_mean, self.share_mean):
            source.data = _empty("x", "y")
        self._fixed = {}
        self.controls.objects = self._controls()
        self.grid_fig.title.text = "sweep"

    def _word(self) -> str:
        sweep = self.sweep
        words = sweep.words()
        return self.state.sweep_word if self.state.sweep_word in words else sweep.default_word()

    def _draw_layout(self) -> None:
        sweep, state = self.sweep, self.state
        rows = state.sweep_rows if state.sweep_rows is not None else sweep.default_axes()[0]
        cols = state.sweep_cols if state.sweep_cols is not None else sweep.default_axes()[1]
        old = self._layout
        same = old is not None and (old.rows, old.cols) == (rows, cols)  # a new axis starts at its first page
        layout = self._layout = sweep.layout(rows, cols, state.sweep_fixed, self.row_page.value if same else 0,
                                             self.col_page.value if same else 0)
        word = self._word()
        self._syncing = True
        try:
            self.rows.value = layout.rows or NONE_LABEL
            self.cols.value = layout.cols or NONE_LABEL
            for widget, axis, page, pages, cap in (
                    (self.row_page, layout.rows, layout.row_page, layout.row_pages, MAX_ROWS),
                    (self.col_page, layout.cols, layout.col_page, layout.col_pages, MAX_COLS)):
                if pages > 1:
                    n = len(sweep.values(axis))
                    widget.options = {f"{k * cap + 1}–{min((k + 1) * cap, n)} of {n}": k for k in range(pages)}
                widget.value = page if pages > 1 else 0
                widget.visible = pages > 1
            self.show.value = state.sweep_show
            self.word.value = word if word in self.word.options else self.word.options[0]
            for name, widget in self._fixed.items():
                widget.visible = name not in (layout.rows, layout.cols)
                if name in layout.fixed:
                    widget.value = layout.fixed[name]
        finally:
            self._syncing = False
        self.word.visible = bool(sweep.words())

        n_rows, n_cols = max(len(layout.row_values), 1), max(len(layout.col_values), 1)
        cell_px = int(min(CELL_MAX_PX, max(CELL_MIN_PX, GRID_PX / (n_cols * (1 + GAP)))))  # the gaps count too
        fig = self.grid_fig
        x0, x1 = _extent(n_cols)
        y0, y1 = _extent(n_rows)
        if (fig.x_range.start, fig.x_range.end) != (x0, x1):  # new ranges: see common.set_image_extent
            fig.x_range = Range1d(x0, x1, bounds=(x0, x1))
        if (fig.y_range.start, fig.y_range.end) != (y1, y0):
            fig.y_range = Range1d(y1, y0, bounds=(y0, y1))
        fig.update(frame_width=int(round(cell_px * (x1 - x0))), frame_height=int(round(cell_px * (y1 - y0))))
        fig.xaxis.ticker = FixedTicker(ticks=[_centre(c) for c in range(len(layout.col_values))])
        fig.xaxis.major_label_overrides = {_centre(c): value_text(v) for c, v in enumerate(layout.col_values)}
        fig.xaxis.axis_label = layout.cols
        fig.yaxis.ticker = FixedTicker(ticks=[_centre(r) for r in range(len(layout.row_values))])
        fig.yaxis.major_label_overrides = {_centre(r): value_text(v) for r, v in enumerate(layout.row_values)}
        fig.yaxis.axis_label = layout.rows

        word_maps = state.sweep_show == "word map" and bool(word)
        cells = _empty(*CELL_COLUMNS)
        images = _empty(*IMAGE_COLUMNS)
        problems: list[str] = []
        for cell in layout.cells:
            note = "" if cell.done else cell.run["status"]
            if cell.done:
                try:
                    sweep.check(cell.run)
                    picture = sweep.word_map(cell.run, word) if word_maps else sweep.thumbnail(cell.run)
                except Exception as exc:  # noqa: BLE001 - this cell only; the banner names the file
                    problems.append(one_line(exc))
                    picture, note = None, "unreadable"
                if picture is None and not note:
                    note = f"no '{word}'" if word_maps else "no image"
                if picture is not None:
                    if not word_maps:
                        picture = rgba(display_image(picture, max_side=cell_px))
                    h, w = picture.shape[:2]
                    x, y, dw, dh = fit_in_cell(cell.row, cell.col, h, w)
                    for key, value in zip(IMAGE_COLUMNS, (picture, x, y, dw, dh, cell.name)):
                        images[key].append(value)
            for key, value in zip(CELL_COLUMNS, (_centre(cell.col), _centre(cell.row), cell.row, cell.col, cell.name,
                                                 sweep.params_text(cell.run), cell.run["status"], note)):
                cells[key].append(value)
        self.cell_source.data = cells
        if word_maps:
            high = max([float(np.max(m)) for m in images["image"]] + [0.0])
            self.mapper.update(low=0.0, high=high if high > 0 else 1.0)
            self.map_source.data = images
            self.thumb_source.data = _empty(*IMAGE_COLUMNS)
        else:
            self.thumb_source.data = images
            self.map_source.data = _empty(*IMAGE_COLUMNS)
        fig.select(name="sweep-colorbar")[0].visible = word_maps
        held_at = " · ".join(f"{k}={value_text(v)}" for k, v in layout.fixed.items() if len(sweep.values(k)) > 1)
        what = f"DAAM map of '{word}' (all layers, all steps)" if word_maps else "final images"
        fig.title.text = f"{what}" + (f" · {held_at}" if held_at else "")
        self._problems = problems
        self._draw_picked()
        self._show_status()
        if problems:
            if self._failures is not None:
                self._failures += 1
            self.report(f"{len(problems)} cell(s) of the sweep could not be drawn: {problems[0]}")

    def _draw_picked(self) -> None:
        layout = self._layout
        data = _empty("x", "y", "color", "label")
        marks = [(name, RUN_COLOURS[k] if len(self.picked) > 1 else "#2ca02c", "AB"[k] if len(self.picked) > 1 else "✓")
                 for k, name in enumerate(self.picked)]
        for name, colour, label in marks:
            cell = next((c for c in layout.cells if c.name == name), None) if layout else None
            if cell is not None:
                for key, value in zip(("x", "y", "color", "label"), (_centre(cell.col), _centre(cell.row), colour, label)):
                    data[key].append(value)
        self.picked_source.data = data
        self.open_one.disabled = len(self.picked) != 1

    def _show_status(self) -> None:
        sweep, layout = self.sweep, self._layout
        counts = sweep.counts()
        parts = [f"{counts['done']} of {len(sweep.runs)} runs finished"]
        if counts["pending"]:
            parts.append(f"{counts['pending']} pending")
        if counts["failed"]:
            parts.append(f"{counts['failed']} failed")
        shown = sweep.find(self.state.dataset)
        other = sweep.find(self.state.compare) if self.state.compare else None
        lines = [f"<b>Sweep</b> {html.escape(sweep.text)} — “{html.escape(sweep.template)}” · {', '.join(parts)}."]
        if shown is not None:
            lines.append(f"Shown in the other tabs: <code>{html.escape(str(shown['name']))}</code>"
                         + (f" · compared with <code>{html.escape(str(other['name']))}</code>" if other else ""))
        if self.picked:
            lines.append("Picked: " + ", ".join(f"<code>{html.escape(p)}</code>" for p in self.picked)
                         + (" — pick another run to compare" if len(self.picked) == 1 else ""))
        if layout is not None and layout.clipped:
            lines.append(f"Showing {html.escape(layout.clipped)}.")
        if self._problems:  # kept here too: the banner clears when the next run opens
            lines.append(f"{len(self._problems)} cell(s) not drawn: {html.escape(self._problems[0])}")
        self.status.object = "<div class='dv-note'>" + "<br>".join(lines) + "</div>"

    def _draw_headline(self) -> None:
        sweep, state = self.sweep, self.state
        layout = self._layout
        default_x = layout.cols if layout is not None and layout.cols else sweep.axis_names[-1]
        axis = state.sweep_x if state.sweep_x in sweep.axis_names else default_x
        word = self._word()
        self._syncing = True
        try:
            self.x_axis.value = axis
        finally:
            self._syncing = False
        values = sweep.values(axis)
        factors = [value_text(v) for v in sweep.plot_values(axis)]
        more = f" (its first {len(factors)} of {len(values)} values)" if len(factors) < len(values) else ""
        for fig, source, mean, metric, title in (
                (self.norm_fig, self.norm_source, self.norm_mean, "final_latent_norm", "Final latent norm"),
                (self.share_fig, self.share_source, self.share_mean, "word_share", f"Share of '{word}'")):
            series = sweep.series(axis, metric, word) if metric == "final_latent_norm" or word else _empty("x", "y", "run", "params")
            fig.x_range.factors = factors
            source.data = series
            mean.data = sweep.means(axis, series)
            ys = [y for y in series["y"] if math.isfinite(y)]
            low, high = (min(ys), max(ys)) if ys else (0.0, 1.0)
            pad = (high - low) * 0.08 if high > low else max(abs(high) * 0.05, 0.05)
            fig.y_range.update(start=low - pad, end=high + pad)
            fig.xaxis.axis_label = axis
            fig.title.text = f"{title} vs {axis}{more}"

    # ---- picking ----------------------------------------------------------------------------------

    @guarded
    def _on_tap(self, event: Any) -> None:
        layout = self._layout
        if layout is None or event.x is None or event.y is None:
            return
        cell = layout.cell(*cell_at(event.x, event.y))
        if cell is not None:
            self.pick(cell.name)

    def pick(self, name: str) -> None:
        """Pick run ``name`` (a finished run of the layout); the second pick opens both in Compare."""
        sweep = self.sweep
        run = next((r for r in sweep.runs if r["name"] == name), None) if sweep else None
        if run is None:
            raise DatasetError(f"{name!r} is not a run of this sweep")
        if run["status"] != "done":
            self.report(f"run {name} is {run['status']}: pick a finished run")
            return
        if name in self.picked:
            self.picked.remove(name)
        else:
            self.picked.append(name)
        if len(self.picked) == 2:
            a, b = (next(r for r in sweep.runs if r["name"] == n) for n in self.picked)
            self.picked = []
            self.state.param.update(dataset=sweep.run_text(a), compare=sweep.run_text(b))
            # the page address names the sweep too (a reload then opens all three), even where its first
            # announcement came before the page could take it
            self.state.param.trigger("sweep")
            self._draw_picked()
            self._show_status()
            self.show_tab("Compare runs")
            return
        self._draw_picked()
        self._show_status()

    def _open_picked(self) -> None:
        if len(self.picked) == 1 and self.sweep is not None:
            run = next(r for r in self.sweep.runs if r["name"] == self.picked[0])
            self.picked = []
            self.state.dataset = self.sweep.run_text(run)
            self.state.param.trigger("sweep")
            self._draw_picked()
            self._show_status()
            self.show_tab("Timeline")
