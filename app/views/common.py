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
from bokeh.models import ColumnDataSource, FactorRange, HoverTool, Range1d
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
        try:
            with hold(), quiet_bokeh():
                return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure is shown, one line, in the banner
            self.report(one_line(exc))
            return None

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
    active = param.Boolean(default=True, doc="shown on the page; hidden views refresh when shown")

    def __init__(self, **params: Any):
        super().__init__(**params)
        self._stale = False
        if self.report is None:
            self.report = lambda message: None
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


def image_figure(name: str, title: str, px: int = 320, height: int = 32, width: int = 32, tools: str = "tap,reset,save") -> Any:
    """A square-pixel figure for an image, y pointing down (row 0 at the top), axes in pixels.

    ``px`` is the long side of the plot frame (the drawn area, without title or colour bar); the frame
    takes the image's aspect ratio and keeps that long side (see :func:`set_image_extent`)."""
    fig = figure(name=name, title=title, tools=tools, toolbar_location=None, frame_width=px, frame_height=px,
                 x_range=Range1d(0, width, bounds=(0, width)), y_range=Range1d(height, 0, bounds=(0, height)))
    fig.axis.visible = False
    fig.grid.visible = False
    set_image_extent(fig, height, width)
    return style(fig)


def frame_size(px: int, height: int, width: int) -> tuple[int, int]:
    """``(frame width, frame height)`` in screen pixels: the long side ``px``, the image's aspect ratio."""
    height, width = max(int(height), 1), max(int(width), 1)
    scale = px / max(height, width)
    return max(int(round(width * scale)), 1), max(int(round(height * scale)), 1)


def set_image_extent(fig: Any, height: int, width: int) -> None:
    """Axes of ``height`` x ``width`` image pixels on a frame of the same aspect ratio (square pixels)."""
    fig.x_range.update(start=0, end=width, bounds=(0, width))
    fig.y_range.update(start=height, end=0, bounds=(0, height))
    frame_width, frame_height = frame_size(max(fig.frame_width, fig.frame_height), height, width)
    fig.update(frame_width=frame_width, frame_height=frame_height)


def rgba_data(packed: np.ndarray | None = None, step: int = -1) -> dict[str, list]:
    """An ``image_rgba`` source's data for one packed image (see :func:`rgba`) at the origin; a blank pixel for None."""
    packed = blank_rgba() if packed is None else packed
    h, w = packed.shape[:2]
    return {"image": [packed], "x": [0], "y": [0], "dw": [w], "dh": [h], "step": [step]}


def rgba_source(name: str) -> ColumnDataSource:
    return ColumnDataSource(name=name, data=rgba_data())


def curve_figure(name: str, title: str, y_label: str, height: int = 180, width: int = 560, **kwargs: Any) -> Any:
    fig = figure(name=name, title=title, height=height, width=width, tools="tap,xpan,xwheel_zoom,reset",
                 toolbar_location=None, **kwargs)
    fig.xaxis.axis_label = "step"
    fig.yaxis.axis_label = y_label
    fig.grid.grid_line_alpha = 0.4
    return style(fig)


def bar_figure(name: str, title: str, source: ColumnDataSource, *, x: str, top: str, y_label: str, fmt: str,
               color: str = "color", height: int = 230, width: int = 420, rotate: bool = True, **kwargs: Any) -> Any:
    """A categorical bar chart over ``source[x]`` with a hover on ``top`` (bokeh number format ``fmt``)."""
    fig = figure(name=name, title=title, x_range=FactorRange(), height=height, width=width, tools="",
                 toolbar_location=None, **kwargs)
    fig.vbar(x=x, top=top, width=0.8, source=source, color=color)
    fig.add_tools(HoverTool(tooltips=[(x, f"@{x}"), (top, f"@{top}{{{fmt}}}")]))
    fig.yaxis.axis_label = y_label
    if rotate:
        fig.xaxis.major_label_orientation = 0.7
    return style(fig)
