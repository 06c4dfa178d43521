"""The one state of the dashboard: parameters only, no data and no UI.

Every view reads these parameters and writes the ones its controls own, so selecting a
step (or layer, token, ...) anywhere moves every view. ``dataset``, ``compare``, ``step``,
``layer`` and ``token`` are mirrored in the page URL (see :func:`app.shell.sync_url`).

``layer`` is a string so that the URL stays readable: a layer index (``"3"``) or
:data:`ALL_LAYERS` (``"mean"``) for the mean over all layers brought to one resolution.
``token`` is an index into ``metadata.tokens``; with ``merge_words`` the view shows the
whole word that token belongs to (sub-word maps summed).

:meth:`State.fit` brings step, layer, head, token and step range inside a newly opened run; the shell calls
it, once per run, before the views see that run. Nothing else writes these parameters on a load.

``head`` is :data:`MEAN_HEAD` (``"mean"``: the maps averaged over heads, all a schema-1 run has) or
a head number as a string (``"0"``): head k of each layer, in runs recorded per head.
"""
from __future__ import annotations

from typing import Any

import param

#: ``State.layer`` value meaning "all layers, mean".
ALL_LAYERS = "mean"
#: ``State.head`` value meaning "the mean over heads".
MEAN_HEAD = "mean"
#: The default dataset: a folder under ``panel serve``, a relative URL in the static site.
DEFAULT_DATASET = "datasets/default"

CMAPS = ("inferno", "viridis", "magma", "plasma", "cividis", "turbo", "greys")


class State(param.Parameterized):
    """What the user is looking at. Views never store their own copy of these."""

    dataset = param.String(default=DEFAULT_DATASET, doc="run shown: a folder, an http(s) or relative URL, or 'upload:NAME'")
    compare = param.String(default="", doc="second run for the comparison view (same forms as dataset); '' for none")

    step = param.Integer(default=0, bounds=(0, None), doc="denoising step index, 0..N-1")
    layer = param.String(default=ALL_LAYERS, doc="layer index as a string, or 'mean' for all layers")
    token = param.Integer(default=None, allow_None=True, bounds=(0, None),
                          doc="index into metadata.tokens; None: the run's first content word")
    head = param.String(default=MEAN_HEAD, doc="attention head: 'mean' (over heads) or a head number as a string (per-head runs)")
    merge_words = param.Boolean(default=True, doc="merge sub-word tokens into their word")
    kind = param.Selector(default="cross", objects=["cross", "self"], doc="heat map: cross (token) or self (probe) attention")

    aggregate = param.Boolean(default=False, doc="DAAM word map: mean over all layers and a step range")
    step_range = param.Range(default=(0, 0), doc="inclusive step range for aggregate mode; (0, 0) means the whole run")

    probe_x = param.Number(default=0.5, bounds=(0.0, 1.0), doc="self-attention query, fraction of image width")
    probe_y = param.Number(default=0.5, bounds=(0.0, 1.0), doc="self-attention query, fraction of image height (top = 0)")

    grid = param.Boolean(default=False, doc="word grid: every content word's aggregated map, one small overlay each")
    grey = param.Boolean(default=False, doc="draw the image under a map in greyscale, so the colour map stands out")

    opacity = param.Number(default=0.6, bounds=(0.0, 1.0))
    cmap = param.Selector(default="inferno", objects=list(CMAPS))
    color_scale = param.Selector(default="per map", objects=["per map", "shared"],
                                 doc="shared: one range for every token map of this step/layer (and both runs); per map: each map's own range")

    fps = param.Integer(default=8, bounds=(1, 60))
    playing = param.Boolean(default=False)

    def fitted(self, run: Any, *, last_step: bool = False) -> dict[str, Any]:
        """The parameter values that change to bring this state inside ``run`` (a ``app.store.RunData``):
        step clamped (or the last step, with ``last_step``: where a new session opens, attention has formed),
        an unknown layer or head back to the mean, the token on its word's first token (or the run's first
        content word), the step range inside the run (the whole run when unset)."""
        n = run.n_steps
        updates: dict[str, Any] = {}
        step = n - 1 if last_step else min(max(int(self.step), 0), n - 1)
        if step != self.step:
            updates["step"] = step
        if self.layer not in run.layer_values():
            updates["layer"] = ALL_LAYERS
        head = run.fit_head(self.head)
        if head != self.head:
            updates["head"] = head
        token = self.token if self.token is not None and 0 <= self.token < len(run.tokens) else run.default_token()
        token = run.canonical_token(token, self.merge_words)
        if token != self.token:
            updates["token"] = token
        first, last = self.step_range
        if not 0 <= first <= last < n or (first, last) == (0, 0):
            updates["step_range"] = (0, n - 1)
        return updates

    def fit(self, run: Any, *, last_step: bool = False) -> list[str]:
        """Apply :meth:`fitted` in one update; returns the names of the parameters that changed."""
        updates = self.fitted(run, last_step=last_step)
        if updates:
            self.param.update(**updates)
        return list(updates)

    # ---- the Sweep tab (app/views/sweep.py); ``sweep`` is mirrored in the page URL
    sweep = param.String(default="", doc="sweep of the Sweep tab: a folder or URL holding sweep.json; '' for none")
    sweep_rows = param.String(default=None, allow_None=True, doc="swept axis along the rows; '': one row; None: the sweep's default")
    sweep_cols = param.String(default=None, allow_None=True, doc="swept axis along the columns; None: the sweep's default")
    sweep_fixed = param.Dict(default={}, doc="the value each other swept axis is held at, {axis: value}; missing: its first")
    sweep_show = param.Selector(default="image", objects=["image", "word map"], doc="small multiples: final images or one word's DAAM map")
    sweep_word = param.String(default="", doc="word of the word maps and of the share plot; '': the sweep's default")
    sweep_x = param.String(default="", doc="parameter on the headline plots' x axis; '': the columns' axis")
