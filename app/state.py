"""The one state of the dashboard: parameters only, no data and no UI.

Every view reads these parameters and writes the ones its controls own, so selecting a
step (or layer, token, ...) anywhere moves every view. ``dataset``, ``compare``, ``step``,
``layer`` and ``token`` are mirrored in the page URL (see :func:`app.shell.sync_url`).

``layer`` is a string so that the URL stays readable: a layer index (``"3"``) or
:data:`ALL_LAYERS` (``"mean"``) for the mean over all layers brought to one resolution.
``token`` is an index into ``metadata.tokens``; with ``merge_words`` the view shows the
whole word that token belongs to (sub-word maps summed).

``head`` is :data:`MEAN_HEAD` (``"mean"``: the maps averaged over heads, all a schema-1 run has) or
a head number as a string (``"0"``): head k of each layer, in runs recorded per head.
"""
from __future__ import annotations

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

    opacity = param.Number(default=0.6, bounds=(0.0, 1.0))
    cmap = param.Selector(default="inferno", objects=list(CMAPS))
    color_scale = param.Selector(default="per map", objects=["per map", "shared"],
                                 doc="shared: one range for every token map of this step/layer (and both runs); per map: each map's own range")

    fps = param.Integer(default=8, bounds=(1, 60))
    playing = param.Boolean(default=False)
