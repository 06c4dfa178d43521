"""Pieces the views share: the view base class, image figures and colour palettes.

Views are built once. Their Bokeh figures keep their models for the whole session and are
updated in place (``source.data = ...``, ``span.location = ...``), so nothing is rebuilt
or re-laid-out when the state changes. Every model a test or the benchmark reads has a
``name`` (``timeline-image``, ``attention-heat``, ...), looked up in the browser with
``Bokeh.documents[0].get_model_by_name(name)``.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import Any, Callable

import numpy as np
import panel as pn
import param
from bokeh import palettes
from bokeh.core.property.validation import validate
from bokeh.models import ColumnDataSource, CustomJS, FactorRange, HoverTool, Range1d, SaveTool
from bokeh.plotting import figure

from panel.io.document import hold
from panel.io.state import set_curdoc

from app.state import State
from app.store import IN_BROWSER, Store, one_line

PALETTES: dict[str, tuple[str, ...]] = {
    "inferno": palettes.Inferno256,
    "viridis": palettes.Viridis256,
    "magma": palettes.Magma256,
    "plasma": palettes.Plasma256,
    "cividis": palettes.Cividis256,
    "turbo": palettes.Turbo256,
    "greys": tuple(reversed(palettes.Greys256)),
}
#: A − B maps: blue where B attends more, white at zero, red where A attends more.
DIVERGING = tuple(palettes.interp_palette(tuple(reversed(palettes.RdBu11)), 256))

#: Colours of run A and run B wherever the two are drawn together.
RUN_COLOURS = ("#1f77b4", "#d62728")
ACCENT = "#e4572e"
FONT_SIZE = "12pt"

#: Styles of our HTML panes (Panel renders each in its own shadow root: pass as ``stylesheets``).
CSS = """
.dv-banner { font-size: 12pt; }
.dv-error { color: #842029; background: #f8d7da; border: 1px solid #f5c2c7; border-radius: 6px;
  padding: 10px 14px; margin: 4px 0; }
.dv-note { color: #444; font-size: 11pt; }
.dv-help { color: #555; font-size: 10.5pt; margin: 2px 0 6px 0; max-width: 980px; line-height: 1.35; }
.dv-ok { border-left: 4px solid #55a868; padding: 6px 10px; background: #f3faf4; }
.dv-warn { border-left: 4px solid #c44e52; padding: 6px 10px; background: #fdf3f3; }
table.dv-runinfo { font-size: 10.5pt; border-collapse: collapse; }
table.dv-runinfo td { padding: 1px 6px 1px 0; vertical-align: top; }
table.dv-runinfo td:first-child { color: #666; white-space: nowrap; }
"""


@contextlib.contextmanager
def quiet_bokeh() -> Any:
    """Skip Bokeh's per-property type validation for our own updates (the values are built here, with
    known types; validation costs ~0.5 ms per ``source.data`` assignment)."""
    with validate(False):
        yield


def held(fn: Callable) -> Callable:
    """Run ``fn`` holding the document's change events, so everything it changes (in every view)
    reaches the browser as one message. Panel does not hold while it processes a widget change,
    and unheld, Bokeh sends one websocket message per property change (~25 per step)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with hold(), quiet_bokeh():
            return fn(*args, **kwargs)

    return wrapper


def later(fn: Callable[[], Any]) -> None:
    """Run ``fn`` (held, with this session's document current) on a later turn of the event loop, after
    pending messages are written: the server's loop under ``panel serve``, the browser's in the Pyodide
    worker; at once where there is neither (tests)."""
    doc = pn.state.curdoc

    def run() -> None:
        with set_curdoc(doc), hold(doc), quiet_bokeh():
            fn()

    if doc is not None and doc.session_context is not None:
        doc.add_next_tick_callback(run)
    elif IN_BROWSER:
        asyncio.get_event_loop().call_soon(run)
    else:
        fn()


def _guard(method: Callable, lazy: bool) -> Callable:
    @functools.wraps(method)
    def wrapper(self: "View", *args: Any, **kwargs: Any) -> Any:
        if lazy and not self.active:
            self._stale = True
            return None
        outer = self._failures is None
        if outer:
            self._failures = 0
        try:
            with hold(), quiet_bokeh():
                return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure is shown, one line, in the banner
            self._failures += 1
            self.report(one_line(exc))
            return None
        finally:
            if outer:
                failed, self._failures = self._failures, None
                if not failed:
                    self.healthy()

    return wrapper


def guarded(method: Callable) -> Callable:
    """A view update: skipped while the view is hidden (it refreshes when shown), held (see
    :func:`held`), and a data problem goes to the banner instead of the page as a traceback."""
    return _guard(method, lazy=True)


def reported(method: Callable) -> Callable:
    """Like :func:`guarded` but runs whether or not the view is shown (playback, controls)."""
    return _guard(method, lazy=False)


class View(pn.viewable.Viewer):
    """A view over the shared :class:`State` and :class:`Store`.

    While ``active`` is False (its tab is hidden) the view's updates are skipped and it is marked
    stale; becoming active runs :meth:`refresh`. Every view still follows the one state: it shows
    the current step/layer/token whenever it is on screen, and hidden figures cost nothing per step.
    """

    state = param.ClassSelector(class_=State)
    store = param.ClassSelector(class_=Store)
    report = param.Callable(default=None, doc="called with a one-line message when an update fails")
    healthy = param.Callable(default=None, doc="called after an update in which every panel drew its data")
    active = param.Boolean(default=True, doc="shown on the page; hidden views refresh when shown")

    def __init__(self, **params: Any):
        super().__init__(**params)
        self._stale = False
        self._failures: int | None = None
        if self.report is None:
            self.report = lambda message: None
        if self.healthy is None:
            self.healthy = lambda: None
        self.param.watch(self._on_active, "active")

    def _on_active(self, event: Any) -> None:
        if event.new and self._stale:
            self._stale = False
            self.refresh()
        elif event.new:
            self.shown()

    def shown(self) -> None:
        """Called when the view is shown again and nothing changed meanwhile (resume background work)."""

    def refresh(self) -> None:
        """Bring every figure of the view up to date with the store and the state."""
        raise NotImplementedError

    @property
    def data(self):
        return self.store.run

    @contextlib.contextmanager
    def panel(self, fig: Any, blank: Callable[[], None]) -> Any:
        """One panel's update: if it fails, only this panel is blanked (``blank()``), its title names the
        problem (the reader's messages name the file), the banner shows it, and the other panels go on."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - shown in the panel's title and the banner
            message = one_line(exc)
            with contextlib.suppress(Exception):
                blank()
            fig.title.text = f"⚠ {message}"[:160]
            if self._failures is not None:
                self._failures += 1
            self.report(message)


#: Longest side of a step image as sent to the browser: about the frames' size (a 512² x̂0 is 1 MB a step,
#: 30 steps then exceed the browser-frame budget); images no larger are sent exactly as stored.
DISPLAY_IMAGE_MAX = 320


def display_image(image: np.ndarray, max_side: int = DISPLAY_IMAGE_MAX) -> np.ndarray:
    """``image`` reduced (PIL's box filter) so its long side is at most ``max_side``; unchanged when it already is.
    The glyph still spans the image's own pixel extent (``dw``/``dh``), so coordinates are unchanged."""
    image = np.asarray(image, dtype=np.uint8)
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image
    from PIL import Image

    scale = max_side / max(h, w)
    size = (max(int(round(w * scale)), 1), max(int(round(h * scale)), 1))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


def rgba(image: np.ndarray) -> np.ndarray:
    """``uint8[H, W, 3|4]`` -> ``uint32[H, W]`` packed RGBA, as Bokeh's ``image_rgba`` wants it."""
    image = np.asarray(image, dtype=np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.shape[2] == 3:
        image = np.concatenate([image, np.full(image.shape[:2] + (1,), 255, np.uint8)], axis=2)
    return np.ascontiguousarray(image).view(np.uint32).reshape(image.shape[:2])


def blank_rgba(height: int = 1, width: int = 1) -> np.ndarray:
    return np.full((max(height, 1), max(width, 1)), 0xFFEEEEEE, dtype=np.uint32)


def style(fig: Any) -> Any:
    """Legible defaults for a researcher's figure."""
    fig.title.text_font_size = FONT_SIZE
    fig.title.text_font_style = "normal"
    for axis in fig.axis:
        axis.axis_label_text_font_size = "11pt"
        axis.axis_label_text_font_style = "normal"
        axis.major_label_text_font_size = "10pt"
    fig.toolbar.logo = None
    fig.border_fill_color = None
    fig.outline_line_color = "#bbbbbb"
    return fig


def with_save(fig: Any) -> Any:
    """A PNG save tool on ``fig``, its toolbar shown while the pointer is over the figure."""
    if not any(isinstance(t, SaveTool) for t in fig.tools):
        fig.add_tools(SaveTool())
    fig.toolbar_location = "above"
    fig.toolbar.autohide = True
    return fig


def image_figure(name: str, title: str, px: int = 320, height: int = 32, width: int = 32, tools: str = "tap,reset,save") -> Any:
    """A square-pixel figure for an image, y pointing down (row 0 at the top), axes in pixels.

    ``px`` is the long side of the plot frame (the drawn area, without title or colour bar); the frame
    takes the image's aspect ratio and keeps that long side (see :func:`set_image_extent`)."""
    # no outer width/height: Bokeh's default 600 would count towards Panel's minimum row width, and a flexible
    # width lets a stretching row widen the frame (the image then loses its aspect ratio)
    fig = figure(name=name, title=title, tools=tools, toolbar_location=None, frame_width=px, frame_height=px,
                 width=None, height=None, width_policy="fixed", height_policy="fixed",
                 x_range=Range1d(0, width, bounds=(0, width)), y_range=Range1d(height, 0, bounds=(0, height)))
    fig.axis.visible = False
    fig.grid.visible = False
    set_image_extent(fig, height, width)
    return with_save(style(fig))


def frame_size(px: int, height: int, width: int) -> tuple[int, int]:
    """``(frame width, frame height)`` in screen pixels: the long side ``px``, the image's aspect ratio."""
    height, width = max(int(height), 1), max(int(width), 1)
    scale = px / max(height, width)
    return max(int(round(width * scale)), 1), max(int(round(height * scale)), 1)


def set_image_extent(fig: Any, height: int, width: int) -> None:
    """Axes of ``height`` x ``width`` image pixels on a frame of the same aspect ratio (square pixels)."""
    # new ranges, not updated ones: BokehJS clamps a new end to the old bounds when both change in one message
    if (fig.x_range.start, fig.x_range.end, fig.x_range.bounds) != (0, width, (0, width)):
        fig.x_range = Range1d(0, width, bounds=(0, width))
    if (fig.y_range.start, fig.y_range.end, fig.y_range.bounds) != (height, 0, (0, height)):
        fig.y_range = Range1d(height, 0, bounds=(0, height))
    frame_width, frame_height = frame_size(max(fig.frame_width, fig.frame_height), height, width)
    fig.update(frame_width=frame_width, frame_height=frame_height)


def rgba_data(packed: np.ndarray | None = None, step: int = -1) -> dict[str, list]:
    """An ``image_rgba`` source's data for one packed image (see :func:`rgba`) at the origin; a blank pixel for None."""
    packed = blank_rgba() if packed is None else packed
    h, w = packed.shape[:2]
    return {"image": [packed], "x": [0], "y": [0], "dw": [w], "dh": [h], "step": [step]}


def rgba_source(name: str) -> ColumnDataSource:
    return ColumnDataSource(name=name, data=rgba_data())


#: Glyph properties whose values give a renderer's extent along each axis.
_EXTENT_FIELDS = {"x": ("x", "left", "right"), "y": ("y", "top", "bottom")}

#: The browser's half of :func:`fit_to_data`, run on every change of a watched source's data (from the server or
#: the browser). It computes what :func:`_fit_range` computes, and sets a range only when the extent moved.
FIT_JS = """
const col = (d, c) => (d instanceof Map ? d.get(c) : d[c]);
for (const axis of ['x', 'y']) {
  const r = ranges[axis];
  if (r == null) continue;
  let lo = Infinity, hi = -Infinity;
  for (const [source, fields, consts] of items[axis]) {
    const d = source.data;
    for (const f of fields) {
      const v = col(d, f);
      if (v == null) continue;
      for (const x of v) if (typeof x === 'number' && isFinite(x)) { if (x < lo) lo = x; if (x > hi) hi = x; }
    }
    const first = (d instanceof Map ? [...d.values()] : Object.values(d))[0];
    if (first != null && first.length) for (const x of consts) { if (x < lo) lo = x; if (x > hi) hi = x; }
  }
  const key = lo <= hi ? lo + ',' + hi : 'none';
  if (r.__dv_fitted === key) continue;
  r.__dv_fitted = key;
  if (!(lo <= hi)) { lo = 0; hi = 1; }
  const margin = hi > lo ? (hi - lo) * pad : 0.5;
  const start = from_zero && lo === 0 ? lo : lo - margin, end = hi + margin;
  r.setv({start, end, reset_start: start, reset_end: end});
}
"""


def _extent_items(fig: Any, axis: str) -> list[list[Any]]:
    """``[source, [column names], [constants]]`` of each glyph renderer of ``fig`` along ``axis``."""
    items = []
    for renderer in fig.renderers:
        glyph, source = getattr(renderer, "glyph", None), getattr(renderer, "data_source", None)
        if glyph is None or not isinstance(source, ColumnDataSource):
            continue
        fields, consts = [], []
        for prop in _EXTENT_FIELDS[axis]:
            if prop in glyph.properties():
                spec = getattr(glyph, prop)
                if isinstance(spec, str):
                    fields.append(spec)
                elif isinstance(spec, (int, float)) and not isinstance(spec, bool):
                    consts.append(float(spec))  # e.g. the bars' bottom (0)
        if fields or consts:
            items.append([source, fields, consts])
    return items


def data_extent(items: list[list[Any]]) -> tuple[float, float] | None:
    """``(min, max)`` of the finite numbers in ``items`` (see :func:`_extent_items`), or None."""
    lo, hi = np.inf, -np.inf
    for source, fields, consts in items:
        values = []
        for name in fields:
            try:
                column = np.asarray(source.data.get(name, []), dtype=np.float64).ravel()
            except (TypeError, ValueError):
                continue  # categorical
            values.append(column[np.isfinite(column)])
        if source.data and len(next(iter(source.data.values()))):
            values.append(np.asarray(consts, np.float64))
        for v in values:
            if v.size:
                lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
    return (lo, hi) if lo <= hi else None


def _fit_range(extent: tuple[float, float] | None, pad: float, from_zero: bool) -> tuple[float, float]:
    lo, hi = extent if extent is not None else (0.0, 1.0)
    margin = (hi - lo) * pad if hi > lo else 0.5
    return (lo if from_zero and lo == 0 else lo - margin), hi + margin


def fit_to_data(fig: Any, x: bool = True, y: bool = True, pad: float = 0.05, from_zero: bool = False) -> Any:
    """Give ``fig`` numeric ``Range1d`` axes fitted to its glyphs' data, wherever that data changes.

    BokehJS's auto ranges (``DataRange1d``) have no extent while every source is empty (a hidden view not yet
    drawn, a blanked panel), and it logs "could not set initial ranges" on each paint; these ranges are (0, 1)
    then. The browser refits on every data change and on the first layout (:data:`FIT_JS`: Panel's held updates
    skip Python's ``on_change`` callbacks), Python on changes made before the page exists. A range moves only when the data's
    extent does, so a user's zoom survives a step change. ``from_zero``: data starting at 0 (bars) get no
    margin below it. Call it once all renderers are added (later ones are picked up while there is no page)."""
    ranges = {}
    for axis, on in (("x", x), ("y", y)):
        if on:
            if not isinstance(getattr(fig, f"{axis}_range"), Range1d):
                setattr(fig, f"{axis}_range", Range1d(0, 1))
            ranges[axis] = getattr(fig, f"{axis}_range")
    callback = CustomJS(code=FIT_JS)
    fitted: dict[str, Any] = {}
    watched: set[int] = set()

    def refit(attr: str, old: Any, new: Any) -> None:
        for axis, rng in ranges.items():
            extent = data_extent(_extent_items(fig, axis))
            if axis in fitted and extent == fitted[axis]:
                continue
            fitted[axis] = extent
            start, end = _fit_range(extent, pad, from_zero)
            rng.update(start=start, end=end, reset_start=start, reset_end=end)

    def watch(attr: str, old: Any, new: Any) -> None:
        items = {axis: _extent_items(fig, axis) if axis in ranges else [] for axis in ("x", "y")}
        callback.args = {"ranges": {axis: ranges.get(axis) for axis in ("x", "y")}, "items": items, "pad": pad,
                         "from_zero": from_zero}
        for source, _fields, _consts in items["x"] + items["y"]:
            if id(source) not in watched:
                watched.add(id(source))
                source.on_change("data", refit)
                for event in ("data", "patching", "streaming"):
                    source.js_on_change(event, callback)
        refit("data", None, None)

    fig.on_change("renderers", watch)
    watch("renderers", None, None)
    # and once the figure is laid out in the page: data already there when the page was sent never "changes"
    fig.js_on_change("inner_width", callback)
    return fig


def curve_figure(name: str, title: str, y_label: str, height: int = 180, width: int = 560, **kwargs: Any) -> Any:
    """A curve over the steps, its axes fitted to its data (:func:`fit_to_data`; a range passed in is left alone)."""
    fit = {"x": "x_range" not in kwargs, "y": "y_range" not in kwargs}
    fig = figure(name=name, title=title, height=height, width=width, tools="tap,xpan,xwheel_zoom,reset",
                 toolbar_location=None, **kwargs)
    fig.xaxis.axis_label = "step"
    fig.yaxis.axis_label = y_label
    fig.grid.grid_line_alpha = 0.4
    fit_to_data(fig, **fit)
    return with_save(style(fig))


def bar_figure(name: str, title: str, source: ColumnDataSource, *, x: str, top: str, y_label: str, fmt: str,
               color: str = "color", height: int = 230, width: int = 420, rotate: bool = True, **kwargs: Any) -> Any:
    """A categorical bar chart over ``source[x]`` with a hover on ``top`` (bokeh number format ``fmt``); its value
    axis is fitted to the bars (:func:`fit_to_data`) unless a ``y_range`` is passed."""
    fit = "y_range" not in kwargs
    fig = figure(name=name, title=title, x_range=FactorRange(), height=height, width=width, tools="",
                 toolbar_location=None, **kwargs)
    fig.vbar(x=x, top=top, width=0.8, source=source, color=color)
    fig.add_tools(HoverTool(tooltips=[(x, f"@{x}"), (top, f"@{top}{{{fmt}}}")]))
    fig.yaxis.axis_label = y_label
    if rotate:
        fig.xaxis.major_label_orientation = 0.7
    if fit:
        fit_to_data(fig, x=False, from_zero=True)
    return with_save(style(fig))
