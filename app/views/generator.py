"""The "Local generator" panel: start a generation on a local ``diffviz bridge``, watch it, open the result.

* The bridge address (default ``http://127.0.0.1:8765``) and whether it answers (checked when the
  page loads, on "Check" and whenever the address changes).
* A form with the generator's settings: prompt, negative prompt, CFG scale, steps, seed, layer
  patterns, attention resolutions and model (the bridge's allow-list). The bridge checks them with the
  CLI's own rules; a refusal is shown with the name of the setting.
* For the toy model the bridge lists its vocabulary (``GET /``, ``models[].vocabulary``); it is shown
  under the prompt, and a prompt with other words is refused here, as you type, before it is sent
  (the bridge refuses it too, with the same line).
* "Generate" submits the job and polls ``GET /jobs/{id}`` with a periodic callback: a progress bar and
  the stage (loading model, step k/N with an ETA, analysis, writing, validating). "Cancel" stops it.
* When the job is done, ``State.dataset`` becomes the run's URL on the bridge
  (``http://127.0.0.1:8765/runs/<name>/``), so the dashboard opens the new run as it opens any URL.

It talks to the bridge only through :mod:`app.bridge_client` (HTTP); it never imports ``capture``.
"""
from __future__ import annotations

import html
from typing import Any

import panel as pn
import param

from app.bridge_client import DEFAULT_BRIDGE_URL, FINAL_STATES, BridgeClient, BridgeError, describe
from app.state import State
from app.views.common import CSS
from export import words as _words
from export.words import unknown_words

#: How often a running job is polled, in milliseconds.
POLL_MS = 400
#: Steps of the progress bar (the bridge reports a fraction 0..1).
BAR_MAX = 1000


def refusal(flag: str, unknown: list[str], vocabulary: list[str]) -> str:
    """The bridge's one line for ``unknown`` words of setting ``flag`` (``--prompt``)."""
    return f"{flag}: {_words.refusal(unknown, vocabulary)}"


GENERATOR_CSS = CSS + """
.dv-gen-status { font-size: 11pt; }
.dv-gen-stage { font-size: 11pt; color: #333; }
.dv-gen-words { font-size: 10pt; }
"""


class GeneratorPanel(pn.viewable.Viewer):
    """The local-generator panel of one dashboard session."""

    state = param.ClassSelector(class_=State)
    bridge_url = param.String(default=DEFAULT_BRIDGE_URL, doc="where diffviz bridge listens")
    reachable = param.Boolean(default=None, allow_None=True, doc="None: not checked yet")
    job = param.Dict(default=None, allow_None=True, doc="the latest snapshot of the job of this session")
    poll_ms = param.Integer(default=POLL_MS, bounds=(50, None))

    def __init__(self, state: State, *, check_on_load: bool = True, **params: Any):
        super().__init__(state=state, **params)
        self._callback = None
        self._defaults_applied = False
        self._polling = False
        #: model value -> the only words it takes (the bridge lists them for the toy model)
        self._vocabularies: dict[str, list[str]] = {}
        self._words_refused = False  # the message says a prompt was not sent for its words

        # ---- bridge address and status
        self.url_box = pn.widgets.TextInput(label="Bridge address", value=self.bridge_url, sizing_mode="stretch_width",
                                            tags=["dv:gen-url"], css_classes=["dv-gen-url"])
        self.check_button = pn.widgets.Button(label="Check", width=90, align="end", tags=["dv:gen-check"])
        self.status = pn.pane.HTML("<span class='dv-note'>Bridge not checked yet.</span>", sizing_mode="stretch_width",
                                   stylesheets=[GENERATOR_CSS], css_classes=["dv-gen-status"], tags=["dv:gen-status"])
        self.url_box.param.watch(self._on_url, "value")
        self.check_button.on_click(self._on_check_click)

        # ---- the form (defaults are replaced by the bridge's own when it first answers)
        # resizable=False: a resizable widget's host draws a grey resize grip beside the box
        self.prompt = pn.widgets.TextAreaInput(label="Prompt", placeholder="a red circle and a blue square", rows=2,
                                               sizing_mode="stretch_width", resizable=False, tags=["dv:gen-prompt"],
                                               css_classes=["dv-gen-prompt"])
        self.negative = pn.widgets.TextInput(label="Negative prompt", sizing_mode="stretch_width",
                                             tags=["dv:gen-negative"], css_classes=["dv-gen-negative"])
        # the toy model's vocabulary, and the words of the prompt it does not know (as they are typed)
        self.words = pn.pane.HTML("", sizing_mode="stretch_width", stylesheets=[GENERATOR_CSS], visible=False,
                                  css_classes=["dv-gen-words"], tags=["dv:gen-words"])
        self.cfg = pn.widgets.FloatInput(label="CFG scale", value=7.5, step=0.5, start=0, width=120,
                                         tags=["dv:gen-cfg"], css_classes=["dv-gen-cfg"])
        self.steps = pn.widgets.IntInput(label="Steps", value=30, start=1, width=120, tags=["dv:gen-steps"],
                                         css_classes=["dv-gen-steps"])
        self.seed = pn.widgets.IntInput(label="Seed", value=0, start=0, width=120, tags=["dv:gen-seed"],
                                        css_classes=["dv-gen-seed"])
        self.layers = pn.widgets.TextInput(label="Layers (glob patterns, comma-separated; empty = all)",
                                           placeholder="down_blocks.*, mid_block.*", sizing_mode="stretch_width",
                                           tags=["dv:gen-layers"], css_classes=["dv-gen-layers"])
        self.max_layers = pn.widgets.IntInput(label="Max layers (0 = no cap)", value=0, start=0, width=160,
                                              tags=["dv:gen-max-layers"], css_classes=["dv-gen-max-layers"])
        self.cross_res = pn.widgets.IntInput(label="Cross-attention resolution", value=32, start=1, width=180,
                                             tags=["dv:gen-cross-res"], css_classes=["dv-gen-cross-res"])
        self.self_res = pn.widgets.IntInput(label="Self-attention resolution", value=16, start=1, width=180,
                                            tags=["dv:gen-self-res"], css_classes=["dv-gen-self-res"])
        self.model = pn.widgets.Select(label="Model", options={"toyworld (embedded default)": "default"},
                                       value="default", width=260, tags=["dv:gen-model"])
        # the latest text of each box: value_input follows each keystroke, value the committed text
        self._texts: dict[Any, str] = {}
        for widget in (self.prompt, self.negative):
            widget.param.watch(self._on_text, ["value_input", "value"])
        self.model.param.watch(self._on_words, "value")
        self.run_name = pn.widgets.TextInput(label="Run name (optional)", placeholder="a new name is made up",
                                             width=260, tags=["dv:gen-name"], css_classes=["dv-gen-name"])

        # ---- actions and progress
        self.generate_button = pn.widgets.Button(label="Generate", color="primary", width=140,
                                                 tags=["dv:gen-generate"], css_classes=["dv-gen-generate"])
        self.cancel_button = pn.widgets.Button(label="Cancel", color="warning", width=140, disabled=True,
                                               tags=["dv:gen-cancel"], css_classes=["dv-gen-cancel"])
        self.generate_button.on_click(self._on_generate_click)
        self.cancel_button.on_click(self._on_cancel_click)
        self.progress = pn.indicators.Progress(value=0, max=BAR_MAX, bar_color="primary",
                                               sizing_mode="stretch_width", tags=["dv:gen-progress"],
                                               css_classes=["dv-gen-progress"])
        self.stage = pn.pane.HTML("", sizing_mode="stretch_width", stylesheets=[GENERATOR_CSS],
                                  css_classes=["dv-gen-stage"], tags=["dv:gen-stage"])
        self.message = pn.pane.HTML("", sizing_mode="stretch_width", stylesheets=[GENERATOR_CSS],
                                    tags=["dv:gen-message"], css_classes=["dv-gen-message"])

        self._layout = pn.Column(
            pn.pane.HTML("<p class='dv-note'>Start a generation on this computer with <code>diffviz bridge</code> "
                         "running in a terminal; the finished run opens here.</p>", stylesheets=[GENERATOR_CSS],
                         sizing_mode="stretch_width"),
            pn.Row(self.url_box, self.check_button, sizing_mode="stretch_width"),
            self.status,
            self.prompt, self.negative, self.words,
            pn.Row(self.cfg, self.steps, self.seed, self.max_layers),
            self.layers,
            pn.Row(self.cross_res, self.self_res),
            pn.Row(self.model, self.run_name),
            pn.Row(self.generate_button, self.cancel_button),
            self.progress, self.stage, self.message,
            sizing_mode="stretch_width", max_width=900,
        )
        if check_on_load and pn.state.curdoc is not None:
            pn.state.onload(self.check)

    def __panel__(self) -> Any:
        return self._layout

    # ---- bridge ----------------------------------------------------------------------------------

    @property
    def client(self) -> BridgeClient:
        return BridgeClient(self.bridge_url)

    def _on_url(self, event: Any) -> None:
        self.bridge_url = (event.new or "").strip()
        self._defaults_applied = False
        if pn.state.curdoc is not None:
            pn.state.execute(self.check)

    async def _on_check_click(self, _event: Any = None) -> None:
        await self.check()

    async def check(self) -> bool:
        """Ask the bridge what it is; show reachable/unreachable; fill the models (and defaults, once)."""
        try:
            info = await self.client.info()
        except BridgeError as exc:
            self._show_unreachable(exc)
            return False
        self.reachable = True
        self.status.object = (f"<div class='dv-ok'>✓ Bridge reachable at {html.escape(self.client.base)} "
                              f"(diffviz {html.escape(str(info.get('version', '?')))}; runs go to "
                              f"<code>{html.escape(str(info.get('datasets', '?')))}</code>)</div>")
        self._apply_info(info)
        return True

    def _show_unreachable(self, exc: BridgeError) -> None:
        """The status line for a bridge that does not answer (or is no bridge): the client's own message,
        which already says what failed, so the word "unreachable" is not said twice."""
        self.reachable = False
        text = str(exc)
        text = text[:1].upper() + text[1:]
        self.status.object = (f"<div class='dv-warn'>✗ {html.escape(text)}<br><span class='dv-note'>Start it in a "
                              "terminal: <code>diffviz bridge</code></span></div>")

    def _apply_info(self, info: dict[str, Any]) -> None:
        listed = [m for m in info.get("models", []) if isinstance(m, dict) and m.get("value")]
        models = {m.get("label") or m["value"]: m["value"] for m in listed}
        self._vocabularies = {m["value"]: [str(w) for w in m["vocabulary"]] for m in listed
                              if isinstance(m.get("vocabulary"), list) and m["vocabulary"]}
        if models:
            value = self.model.value if self.model.value in models.values() else next(iter(models.values()))
            self.model.param.update(options=models, value=value)
        limits = info.get("limits", {})
        if limits.get("max_steps"):
            self.steps.end = int(limits["max_steps"])
        if limits.get("max_resolution"):
            self.cross_res.end = self.self_res.end = int(limits["max_resolution"])
        if limits.get("max_cfg_scale") is not None:
            self.cfg.end = float(limits["max_cfg_scale"])
        defaults = info.get("defaults") or {}
        if defaults and not self._defaults_applied:
            self._defaults_applied = True
            for widget, key in ((self.cfg, "cfg_scale"), (self.steps, "num_steps"), (self.seed, "seed"),
                                (self.cross_res, "attention_resolution"), (self.self_res, "self_attention_resolution")):
                if defaults.get(key) is not None:
                    widget.value = defaults[key]
        self._on_words()

    # ---- the toy model's words ---------------------------------------------------------------------

    @property
    def vocabulary(self) -> list[str] | None:
        """The only words the chosen model takes (the toy model's), or None when it is not restricted."""
        return self._vocabularies.get(self.model.value)

    def word_problems(self) -> list[str]:
        """One line per field (prompt, negative prompt) whose words the chosen model does not know."""
        vocabulary = self.vocabulary
        if not vocabulary:
            return []
        out = []
        for flag, widget in (("--prompt", self.prompt), ("--negative-prompt", self.negative)):
            unknown = unknown_words(self._texts.get(widget, widget.value) or "", vocabulary)
            if unknown:
                out.append(refusal(flag, unknown, vocabulary))
        return out

    def _on_text(self, event: Any) -> None:
        self._texts[event.obj] = event.new or ""
        self._on_words()
        if self._words_refused and not self.word_problems():  # the "Not sent" below is out of date
            self._say("")

    def _on_words(self, *_: Any) -> None:
        vocabulary = self.vocabulary
        if not vocabulary:
            self.words.param.update(object="", visible=False)
            return
        lines = [f"<div class='dv-warn'>{html.escape(line)}</div>" for line in self.word_problems()]
        if not lines:  # the refusal already lists the words; otherwise say them here
            lines = [f"<span class='dv-note'>This model knows only these words: {html.escape(', '.join(vocabulary))}"
                     "</span>"]
        self.words.param.update(object="".join(lines), visible=True)

    # ---- the form ----------------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """The request body of ``POST /jobs`` from the form (empty optional fields are left out)."""
        body: dict[str, Any] = {
            "prompt": self.prompt.value or "",
            "negative_prompt": self.negative.value or "",
            "cfg_scale": self.cfg.value,
            "num_steps": self.steps.value,
            "seed": self.seed.value,
            "attention_resolution": self.cross_res.value,
            "self_attention_resolution": self.self_res.value,
            "model": self.model.value,
        }
        if (self.layers.value or "").strip():
            body["layers"] = self.layers.value
        if self.max_layers.value:
            body["max_layers"] = self.max_layers.value
        if (self.run_name.value or "").strip():
            body["name"] = self.run_name.value.strip()
        return body

    # ---- generate, poll, cancel -------------------------------------------------------------------

    async def _on_generate_click(self, _event: Any = None) -> None:
        await self.generate()

    async def generate(self) -> dict[str, Any] | None:
        """Submit the form; on success start polling. Returns the job snapshot (None if refused)."""
        if self.job is not None and self.job.get("state") not in FINAL_STATES:
            self._say("A job of this page is still running; cancel it or wait.", error=True)
            return None
        if not (self.prompt.value or "").strip():
            self._say("Type a prompt first.", error=True)
            return None
        self._on_words()
        if self.word_problems():  # the line under the prompt names the words
            self._say("Not sent: the model does not know some words of the prompt (see under the prompt).",
                      error=True)
            self._words_refused = True
            return None
        self.generate_button.disabled = True
        self._say("")
        try:
            job = await self.client.submit(self.settings())
        except BridgeError as exc:
            self.generate_button.disabled = False
            if exc.unreachable:  # said once, in the status line
                self._show_unreachable(exc)
                self._say("Not sent: the bridge does not answer (see its status above).", error=True)
                return None
            where = f" (setting <b>{html.escape(exc.field)}</b>)" if exc.field else ""
            self._say(f"The bridge refused the job{where}: {html.escape(str(exc))}", error=True, raw=True)
            return None
        self.cancel_button.disabled = False
        self._show(job)
        self._start_polling()
        return job

    def _start_polling(self) -> None:
        self._stop_polling()
        if pn.state.curdoc is not None:  # a served session or the Pyodide worker (tests call poll() themselves)
            self._callback = pn.state.add_periodic_callback(self.poll, period=self.poll_ms)

    def _stop_polling(self) -> None:
        if self._callback is not None:
            self._callback.stop()
            self._callback = None

    async def poll(self) -> dict[str, Any] | None:
        """One ``GET /jobs/{id}``: update the bar and the stage; at the end, open the run (or say why not)."""
        if self.job is None or self._polling:
            return self.job
        self._polling = True
        try:
            job = await self.client.job(self.job["id"])
        except BridgeError as exc:
            if exc.status == 404:  # the bridge restarted and forgot the job
                self._finish()
                self._say(f"The bridge no longer knows this job: {html.escape(str(exc))}", error=True, raw=True)
            else:  # keep polling: the bridge may be busy or restarting
                self.stage.object = f"<span class='dv-note'>waiting for the bridge… ({html.escape(str(exc))})</span>"
            return None
        finally:
            self._polling = False
        self._show(job)
        if job["state"] in FINAL_STATES:
            self._finish()
            if job["state"] == "done":
                self.open_run(job)
            elif job["state"] == "failed":
                self._say(f"The generation failed: {html.escape(job.get('error') or '?')}", error=True, raw=True)
            else:
                self._say("Cancelled; nothing was written.")
        return job

    def _finish(self) -> None:
        self._stop_polling()
        self.generate_button.disabled = False
        self.cancel_button.disabled = True

    def open_run(self, job: dict[str, Any]) -> str:
        """Load the job's run into the dashboard (``State.dataset`` = its URL on the bridge)."""
        url = self.client.run_url(job["run"])
        warnings = job.get("warnings") or []
        note = "".join(f"<br><span class='dv-note'>warning: {html.escape(w)}</span>" for w in warnings)
        self._say(f"Done: run <b>{html.escape(job['run'])}</b> opened from <code>{html.escape(url)}</code>{note}",
                  raw=True)
        self.state.dataset = url
        return url

    async def _on_cancel_click(self, _event: Any = None) -> None:
        await self.cancel()

    async def cancel(self) -> dict[str, Any] | None:
        if self.job is None or self.job.get("state") in FINAL_STATES:
            return None
        try:
            job = await self.client.cancel(self.job["id"])
        except BridgeError as exc:
            self._say(f"Could not cancel: {html.escape(str(exc))}", error=True, raw=True)
            return None
        self._show(job)
        return job

    # ---- display -----------------------------------------------------------------------------------

    def _show(self, job: dict[str, Any]) -> None:
        self.job = job
        self.progress.value = int(round(float(job.get("fraction") or 0.0) * BAR_MAX))
        self.stage.object = f"<span class='dv-gen-stage'>{html.escape(describe(job))}</span>"

    def _say(self, text: str, *, error: bool = False, raw: bool = False) -> None:
        self._words_refused = False
        if not text:
            self.message.object = ""
            return
        body = text if raw else html.escape(text)
        self.message.object = f"<div class='{'dv-warn' if error else 'dv-ok'}'>{body}</div>"
