"""The app shell: one :class:`State`, one :class:`Store`, the loaders, the error banner, the four
views (and the local-generator panel when ``app.views.generator`` exists), and URL sync.

Loading: ``State.dataset`` / ``State.compare`` hold what the user asked for (folder, URL or
``upload:NAME``). The shell opens it through the store; only the three JSON files are read up
front. On failure the banner names the problem, the state goes back to the run still shown, and
that run stays usable, and nothing of the half-opened run is kept (its traceback's frames are
cleared, then ``gc.collect()``).

Under ``panel serve`` the open and the schema check run in a worker thread (:func:`background_runner`),
so a slow or hostile run never stalls the server's event loop, this session's or another's; the result
is applied on the session's own loop (a Bokeh next-tick callback). One load at a time per slot (run,
comparison run): a request made meanwhile waits, the latest one wins, and an older result it replaces is
dropped (unless nothing is shown yet). In the Pyodide worker, and without a server session (tests,
scripts), a run is opened inline.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import gc
import html
import importlib
import importlib.util
import logging
import os
import traceback
from typing import Any, Callable

import panel as pn
import param
from panel.io.document import hold
from panel.io.state import set_curdoc
from panel.theme.fast import Fast

from app.state import DEFAULT_DATASET, State
from app.store import IN_BROWSER, RunData, Store, one_line
from app.sweepstore import Sweep, SweepStore, open_dataset
from app.views.attention import AttentionView
from app.views.common import CSS, View
from app.views.compare import CompareView
from app.views.sweep import SweepView
from app.views.frames import step_js
from app.views.timeline import TimelineView
from app.views.trajectory import TrajectoryView

#: What each loading slot opens, as the loading line and the banner name it.
WHAT = {"dataset": "run", "compare": "comparison run", "sweep": "sweep"}
#: Query-string names of the state parameters mirrored in the page URL.
URL_PARAMS = {"dataset": "dataset", "compare": "compare", "step": "step", "layer": "layer", "token": "token",
              "sweep": "sweep"}


def default_dataset() -> str:
    """``DIFFVIZ_DATASET`` (set by ``diffviz serve --dataset``) or ``datasets/default``."""
    return os.environ.get("DIFFVIZ_DATASET", "").strip() or DEFAULT_DATASET


#: ``runner(work, done)``: run ``work()`` somewhere, then ``done(its result)`` on the session's loop.
Runner = Callable[[Callable[[], Any], Callable[[Any], None]], None]
#: Worker threads opening runs, shared by every session of the server process.
LOAD_WORKERS = 4
_executor: concurrent.futures.ThreadPoolExecutor | None = None
log = logging.getLogger(__name__)


def _load_executor() -> concurrent.futures.ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = concurrent.futures.ThreadPoolExecutor(max_workers=LOAD_WORKERS, thread_name_prefix="diffviz-load")
    return _executor


def background_runner() -> Runner | None:
    """A :data:`Runner` using a worker thread for this session (``pn.state.curdoc``) under ``panel serve``;
    None where loads run inline: in the Pyodide worker (no threads) and outside a server session (a script,
    a test, or ``panel convert``'s prerender, whose mock session has no server: it must see the loaded run)."""
    doc = pn.state.curdoc
    if IN_BROWSER or doc is None or getattr(doc.session_context, "server_context", None) is None:
        return None

    def run(work: Callable[[], Any], done: Callable[[Any], None]) -> None:
        def finished(future: Any) -> None:
            try:
                result = future.result()
            except BaseException as exc:  # noqa: BLE001 - work catches its own errors; this is cancellation
                result = (None, one_line(exc))
            del future

            def apply() -> None:
                with set_curdoc(doc), hold(doc):
                    done(result)

            try:
                doc.add_next_tick_callback(apply)  # thread-safe; the session's loop runs it
            except Exception:  # noqa: BLE001 - the session is gone
                log.debug("diffviz: session closed before its run loaded", exc_info=True)

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # panel serve --num-threads: this callback is already off the loop
            _load_executor().submit(work).add_done_callback(finished)
        else:
            loop.run_in_executor(_load_executor(), work).add_done_callback(finished)

    return run


def _forget(exc: BaseException) -> None:
    """Drop what a failed open's exception keeps alive: the frames of its traceback (and of the
    exceptions it chains to) hold the half-opened run and the bytes it read."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if e.__traceback__ is not None:
            traceback.clear_frames(e.__traceback__)
        todo += [e.__cause__, e.__context__]
        e.__traceback__ = e.__cause__ = e.__context__ = None


def _generator_panel_class() -> Any:
    """``app.views.generator.GeneratorPanel`` if that module exists (the local-generator bridge panel)."""
    if importlib.util.find_spec("app.views.generator") is None:
        return None
    return importlib.import_module("app.views.generator").GeneratorPanel


def _fast_without_web_font() -> type:
    """Panel's Fast design without its web-font stylesheet (Open Sans from a font host): the page, served or
    static, requests nothing outside its own origin; text falls back to the system sans-serif. Panel finds a
    design's files by its class name and module, so the subclass keeps both."""
    resources = {key: value for key, value in Fast._resources.items() if key != "font"}
    return type("Fast", (Fast,), {"_resources": resources, "__module__": Fast.__module__})


LocalFast = _fast_without_web_font()


class Dashboard(pn.viewable.Viewer):
    """The whole dashboard for one session."""

    state = param.ClassSelector(class_=State)
    store = param.ClassSelector(class_=Store)

    def __init__(self, state: State | None = None, store: Store | None = None, *, cache_mb: int | None = None,
                 sync_url: bool = True, runner: Runner | None = None, **params: Any):
        """``runner`` replaces :func:`background_runner` (tests drive the deferred path with it)."""
        state = state if state is not None else State(dataset=default_dataset())
        store = store if store is not None else Store(cache_mb=cache_mb)
        super().__init__(state=state, store=store, **params)
        self.banner = pn.pane.HTML("", visible=False, sizing_mode="stretch_width", css_classes=["dv-banner"],
                                   stylesheets=[CSS], name="banner")
        self.loading = pn.pane.HTML("", visible=False, sizing_mode="stretch_width", css_classes=["dv-loading"],
                                    stylesheets=[CSS])
        self._runner = runner
        self.tabs: pn.Tabs | None = None
        #: the session's own run (before the page address), and a notice to show once it is open instead (_finish)
        self._first_dataset = state.dataset
        self._notice: str | None = None
        self._loaded: dict[str, str | None] = {"dataset": None, "compare": None, "sweep": None}
        #: per slot: the text being opened now, and the latest request made meanwhile ``(text, force)``
        self._busy: dict[str, str | None] = {"dataset": None, "compare": None, "sweep": None}
        self._queued: dict[str, tuple[str, bool] | None] = {"dataset": None, "compare": None, "sweep": None}

        # Loaders run before any view reacts to the same change (watchers fire in registration order).
        state.param.watch(self._on_dataset, "dataset")
        state.param.watch(self._on_compare, "compare")
        state.param.watch(lambda e: self._load("sweep", e.new), "sweep")
        #: the open sweep (the Sweep tab is shown while there is one)
        self.sweeps = SweepStore()

        #: the view whose failure the banner shows (None: a notice of the shell's own)
        self._banner_view: str | None = None

        def views_args(name: str) -> dict[str, Any]:
            return dict(state=state, store=store, report=functools.partial(self.show_data_error, name),
                        healthy=functools.partial(self._on_view_healthy, name))

        self.timeline = TimelineView(**views_args("timeline"))
        self.attention = AttentionView(**views_args("attention"))
        self.trajectory = TrajectoryView(**views_args("trajectory"))
        self.compare = CompareView(**views_args("compare"))
        self.sweep = SweepView(sweeps=self.sweeps, show_tab=self.show_tab, **views_args("sweep"))
        self.sweeps.param.watch(self._on_sweep_changed, "sweep")
        # a step change draws the frames already in the browser at once (app.views.frames)
        args, code = step_js([(self.timeline.frames, self.timeline.image_source, None),
                              (self.attention.image_frames, self.attention.image_source, None),
                              (self.attention.heat_frames, self.attention.heat_source, self.attention.mapper)])
        self.timeline.slider.jscallback(args=args, value=code)
        #: the first run of a session opens at its last step, unless the page address names a step
        self._open_at_last = "step" not in self._query()

        # ---- the run loader (sidebar)
        self.source_box = pn.widgets.TextInput(label="Run (folder or URL)", value=state.dataset, placeholder="datasets/default or https://…/run/",
                                               sizing_mode="stretch_width", tags=["dv:dataset-url"])
        self.load_button = pn.widgets.Button(label="Load", color="primary", sizing_mode="stretch_width", tags=["dv:dataset-load"])
        self.folder = pn.widgets.FileInput(directory=True, label="…or pick a run folder", sizing_mode="stretch_width",
                                          tags=["dv:dataset-folder"])
        self.load_button.on_click(lambda _e: self.submit(self.source_box.value))
        self.source_box.param.watch(lambda _e: self.submit(self.source_box.value), "enter_pressed")
        self.folder.param.watch(self._on_folder, "value")
        self.run_info = pn.pane.HTML("", css_classes=["dv-runinfo"], sizing_mode="stretch_width", stylesheets=[CSS])
        store.param.watch(self._on_run_changed, "run")

        if sync_url:
            self.sync_url()
        self._load("dataset", state.dataset)
        if state.compare:
            self._load("compare", state.compare)
        if state.sweep:
            self._load("sweep", state.sweep)
        self.generator = self._make_generator()  # after the loads: a successful load clears the banner
        self._on_run_changed()

    # ---- layout ---------------------------------------------------------------------------------

    def sections(self) -> list[tuple[str, Any]]:
        items = [("Timeline", self.timeline), ("Attention", self.attention), ("Trajectory", self.trajectory),
                 ("Compare runs", self.compare)]
        if self.sweeps.sweep is not None:
            items.append(("Sweep", self.sweep))
        if self.generator is not None:
            items.append(("Local generator", self.generator))
        return items

    def sidebar(self) -> list[Any]:
        return [
            pn.pane.HTML("<b>Run</b>", margin=(5, 10, 0, 10)), self.source_box, self.load_button, self.folder,
            self.loading, self.run_info,
        ]

    def main(self) -> list[Any]:
        if self.tabs is None:  # built once per session
            # Panel hides an inactive tab with visibility: hidden, so it still takes its height (a short tab then
            # scrolls into blank space); display: none takes none, and Bokeh lays a tab out again when it is shown.
            self.tabs = pn.Tabs(*self.sections(), dynamic=False, sizing_mode="stretch_width", name="views",
                                stylesheets=["[aria-hidden='true'] { display: none !important; }"])
            self.tabs.param.watch(self._on_tab, "active")
            self._on_tab()
            self._on_sweep_changed()
        return [self.banner, self.timeline.controls, self.tabs]

    def _on_tab(self, *_: Any) -> None:
        """Only the shown tab's views update on each change; the others refresh when shown."""
        with hold():
            for index, (_name, view) in enumerate(self.sections()):
                if isinstance(view, View):
                    view.active = index == self.tabs.active

    def __panel__(self) -> Any:
        return pn.Row(pn.Column(*self.sidebar(), width=300), pn.Column(*self.main(), sizing_mode="stretch_width"))

    def template(self) -> Any:
        """The page: a Fast list template with the loader in the sidebar."""
        return pn.template.FastListTemplate(
            title="diffviz — inside a diffusion run", sidebar=self.sidebar(), main=self.main(),
            sidebar_width=300, accent_base_color="#4c72b0", header_background="#2f4b7c", theme_toggle=False,
            main_layout=None, busy_indicator=None, design=LocalFast,
        )

    # ---- URL sync --------------------------------------------------------------------------------

    def sync_url(self) -> None:
        """Mirror dataset/compare/step/layer/token in the page's query string (served and in the worker)."""
        location = pn.state.location
        if location is None:
            return
        location.sync(self.state, URL_PARAMS, on_error=self._on_url_error)
        self.state.param.watch(self._on_playing_url, "playing")

    def _on_playing_url(self, event: Any) -> None:
        """During playback the address leaves out the step (one less round trip per frame); it comes back on pause."""
        location = pn.state.location
        if location is None:
            return
        if event.new:
            location.unsync(self.state, ["step"])
        else:
            location.sync(self.state, {"step": URL_PARAMS["step"]}, on_error=self._on_url_error)

    def _on_url_error(self, mapped: dict[str, Any]) -> None:
        """The query held a value the state refuses as parsed (``layer=1`` arrives as the number 1, ``step=-3``):
        apply what is valid, with numbers given back as text for text parameters, and name the rest."""
        bad = []
        for name, value in mapped.items():
            if isinstance(self.state.param[name], param.String) and value is not None and not isinstance(value, str):
                value = str(value)
            try:
                self.state.param.update(**{name: value})
            except Exception:  # noqa: BLE001 - reported below
                bad.append(f"{URL_PARAMS.get(name, name)}={value!r}")
        if bad:
            self.show_error(f"Ignored from the page address: {', '.join(bad)}")
            # the address shows what is drawn, not the refused value
            self.state.param.trigger(*[n for n in mapped if n in URL_PARAMS])

    # ---- loading ---------------------------------------------------------------------------------

    def submit(self, text: str) -> None:
        """Load ``text`` as the main run (the Load button / Enter in the box)."""
        text = (text or "").strip()
        if not text:
            self.show_error("Type a run folder or URL first.")
            return
        if text == self.state.dataset:
            self._load("dataset", text, force=True)
        else:
            self.state.dataset = text

    def _on_folder(self, event: Any) -> None:
        if not event.new:
            return
        try:
            names = self.folder.filename if isinstance(self.folder.filename, list) else [self.folder.filename]
            values = event.new if isinstance(event.new, list) else [event.new]
            self.state.dataset = self.store.add_upload(names, values)
        except Exception as exc:  # noqa: BLE001 - shown in the banner
            self.show_error(f"Could not read the picked folder: {one_line(exc)}")

    def _on_dataset(self, event: Any) -> None:
        self._load("dataset", event.new)

    def _on_compare(self, event: Any) -> None:
        self._load("compare", event.new)

    def _load(self, which: str, text: str, *, force: bool = False) -> None:
        if self._busy[which] is not None:
            self._queued[which] = (text, force)  # opened when the current load is done; the latest wins
            return
        self._begin(which, text, force=force)

    @staticmethod
    def _query() -> set[str]:
        """The names in the page address's query: from the HTTP request under ``panel serve`` (the browser's
        location reaches the session later), and from the location where it already has them."""
        names = set(getattr(pn.state, "session_args", None) or {})
        location = pn.state.location
        if location is not None:
            names |= set(getattr(location, "query_params", None) or {})
        return names

    def _begin(self, which: str, text: str, *, force: bool) -> None:
        if text == self._loaded[which] and not force:
            return
        if which == "compare" and not (text or "").strip():
            self._loaded["compare"] = ""
            with hold():
                self.store.set_other(None)
            return
        if which == "sweep" and not (text or "").strip():
            self._loaded["sweep"] = ""
            with hold():
                self.sweeps.set_sweep(None)
            return
        runner = self._runner or background_runner()
        if runner is None:
            data, message = self._open(text, which)
            with hold():
                self._finish(which, text, data, message)
            return
        self._busy[which] = text
        self._show_loading()
        runner(functools.partial(self._open, text, which), functools.partial(self._done, which, text))

    def _open(self, text: str, which: str = "dataset") -> tuple[RunData | Sweep | None, str | None]:
        """``store.open(text)`` as ``(data, None)``, or ``(None, one line)`` with nothing of the failed run kept.
        The run box may also name a sweep, the sweep slot only a sweep (``app.sweepstore``).
        Touches no Bokeh model: under ``panel serve`` it runs in a worker thread."""
        try:
            if which == "sweep":
                return self.sweeps.open(text), None
            return (open_dataset(self.store.open, text) if which == "dataset" else self.store.open(text)), None
        except Exception as exc:  # noqa: BLE001 - any failure: banner, previous run kept
            message = one_line(exc)
            _forget(exc)
        gc.collect()
        return None, message

    def _done(self, which: str, text: str, outcome: tuple[RunData | None, str | None]) -> None:
        """A deferred load finished (on the session's loop)."""
        self._busy[which] = None
        queued, self._queued[which] = self._queued[which], None
        if queued is not None and queued[0] == text:
            queued = None  # asked again for the same run meanwhile: this is it
        data, message = outcome
        del outcome
        # a newer request replaces this result, unless nothing is shown yet (it is better than nothing)
        if queued is None or (data is not None and self._loaded[which] is None):
            self._finish(which, text, data, message)
        del data
        if queued is not None:
            self._begin(which, queued[0], force=queued[1])
        self._show_loading()

    def _show_loading(self) -> None:
        busy = [(w, t) for w, t in self._busy.items() if t is not None]
        text = " · ".join(f"Loading {WHAT.get(w, 'run')} {t!r} …" for w, t in busy)
        self.loading.param.update(object=f"<p class='dv-note'>{html.escape(text)}</p>" if busy else "", visible=bool(busy))

    def _finish(self, which: str, text: str, data: RunData | None, message: str | None) -> None:
        if data is None:
            notice = f"Could not load {WHAT.get(which, 'run')} {text!r}: {message}"
            self.show_error(notice)
            previous = self._loaded[which]
            if previous is not None and getattr(self.state, which) != previous:
                setattr(self.state, which, previous)
            elif previous is None and which in ("compare", "sweep"):
                self._loaded[which] = ""
                setattr(self.state, which, "")
            elif previous is None and text != self._first_dataset:
                # the page address named a run that cannot be opened: show the session's own run, and keep saying why
                self._notice = notice
                self.state.dataset = self._first_dataset
            return
        if isinstance(data, Sweep):
            self._open_sweep(which, text, data)
            return
        self._loaded[which] = text
        self.clear_error()
        if self._notice:
            self.show_error(self._notice)
            self._notice = None
        if which == "compare":
            self.store.set_other(data)
            return
        # State.fit, silently, then the new run: every view redraws from both at once; the changed values are
        # then announced so that the page address (and any widget mirroring them) shows what is drawn.
        changed = self.state.fitted(data, last_step=self._open_at_last)
        self._open_at_last = False
        with param.parameterized.discard_events(self.state):
            self.state.param.update(**changed)
        self.store.set_run(data)
        if changed:
            self.state.param.trigger(*changed)

    # ---- the sweep ---------------------------------------------------------------------------------

    def _open_sweep(self, which: str, text: str, sweep: Sweep) -> None:
        """A sweep opened (the address's ``sweep``, or named in the run box): the Sweep tab shows it, the other
        tabs its first finished run unless they show one of its runs already."""
        self.clear_error()
        self._loaded["sweep"] = text
        self.sweeps.set_sweep(sweep)
        self.state.sweep = text  # already loaded: no second read
        if which == "dataset" or sweep.find(self.state.dataset) is None:
            first = sweep.first_done()
            if first is not None:
                if self._first_dataset == text:  # a run that fails to open falls back to this one, not the sweep
                    self._first_dataset = sweep.run_text(first)
                self.state.dataset = sweep.run_text(first)
            else:
                self.show_error(f"The sweep {text!r} has no finished run yet.")
                if which == "dataset" and self._loaded["dataset"] is not None:
                    self.state.dataset = self._loaded["dataset"]

    def _on_sweep_changed(self, *_: Any) -> None:
        """The Sweep tab comes (and is shown) with a sweep, and goes with it."""
        if self.tabs is None:
            return
        titles = [title for title, _view in self.sections()]
        if self.sweeps.sweep is not None:
            if len(self.tabs) != len(titles):
                self.tabs.insert(titles.index("Sweep"), ("Sweep", self.sweep))
            self.tabs.active = titles.index("Sweep")
        elif len(self.tabs) != len(titles):
            index, active = len(titles) - (self.generator is not None), self.tabs.active
            self.tabs.pop(index)
            self.tabs.active = 0 if active == index else active - (active > index)
        self._on_tab()

    def show_tab(self, title: str) -> None:
        titles = [name for name, _view in self.sections()]
        if self.tabs is not None and title in titles:
            self.tabs.active = titles.index(title)

    # ---- banner and run info ---------------------------------------------------------------------

    def show_error(self, message: str) -> None:
        """A notice that stays until the next successful load (a refused run or address value)."""
        self._banner(message, None)

    def show_data_error(self, view: str, message: str) -> None:
        """A panel of ``view`` could not be drawn; cleared by that view's next update that draws all its panels."""
        self._banner(message, view)

    def _banner(self, message: str, view: str | None) -> None:
        self._banner_view = view
        self.banner.object = f"<div class='dv-error' role='alert'>⚠ {html.escape(message)}</div>"
        self.banner.visible = True

    def clear_error(self) -> None:
        self._banner_view = None
        self.banner.visible = False
        self.banner.object = ""

    def _on_view_healthy(self, view: str) -> None:
        if self.banner.visible and self._banner_view == view:
            self.clear_error()

    def _on_run_changed(self, *_: Any) -> None:
        data = self.store.run
        if data is None:
            self.run_info.object = ("<p class='dv-note'>No run loaded. Type a run folder or URL above, "
                                    "or pick a run folder.</p>")
            return
        if self.source_box.value != self.state.dataset:  # a picked folder shows as upload:NAME (Load reopens it)
            self.source_box.value = self.state.dataset
        info = data.metadata.get("run", {})
        model = info.get("model", {})
        rows = [
            ("prompt", f"“{data.prompt}”"),
            ("negative", info.get("negative_prompt") or "—"),
            ("model", f"{model.get('id', '?')} ({model.get('source', '?')})"),
            ("steps", f"{data.n_steps} · {info.get('scheduler', '?')}"),
            ("cfg · seed", f"{info.get('cfg_scale', '?')} · {info.get('seed', '?')}"),
            ("image", f"{data.height}×{data.width}"),
            ("layers", data.layer_summary()),
            ("tokens", data.token_summary()),
            ("heads", f"per head (up to {data.max_heads})" if data.per_head else "mean over heads"),
            ("source", data.label),
        ]
        body = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
        self.run_info.object = f"<table class='dv-runinfo'>{body}</table>"

    # ---- local generator slot ------------------------------------------------------------------

    def _make_generator(self) -> Any:
        try:
            cls = _generator_panel_class()
            return None if cls is None else cls(state=self.state)
        except Exception as exc:  # noqa: BLE001 - the dashboard works without the generator panel
            self.show_error(f"Local generator panel unavailable: {one_line(exc)}")
            return None

