"""``diffviz build-site``: the dashboard as a static site that any web server can host.

    diffviz build-site --out site/ [--dataset datasets/default ...] [--self-hosted DIR_OR_URL]

The site is ``app/main.py`` converted by ``panel convert``'s machinery to the ``pyodide-worker``
target: the page (``app.html``) renders Bokeh, and a web worker (``app.js``) runs the very same
Python code in Pyodide. What goes into ``--out``:

    index.html             opens app.html, keeping ?dataset=… (and adding the first run when it is not "default")
    app.html, app.js       the converted app: the page and its Pyodide worker
    app.resources.zip      our own pure-Python wheel (app, analysis, export; no capture, no torch, and
                           not this package), unpacked into the worker's file system and installed from there
    datasets/<name>/       each --dataset, copied (validated first); the app opens datasets/default
    vendor/                --self-hosted DIR, copied
    .nojekyll              GitHub Pages serves the folder as is
    diffviz-site.json      what was built: versions, requirements, datasets, where Pyodide comes from,
                           and what a first visit downloads

The worker installs our wheel first (``deps=False``), then the rest in one ``micropip.install``,
and checks that every distribution they need is really there (``micropip`` does not notice when
Pyodide fails to load one of its own packages such as numpy). Any failure stops it with a message
in the page naming what failed, instead of Panel's generic "Error while installing packages".

``--self-hosted BASE`` makes the site fetch nothing from CDNs or PyPI: ``BASE/pyodide/`` (a full
Pyodide distribution of the version Panel targets), ``BASE/panel/`` (a mirror of Panel's CDN root:
``<panel version>/dist/…`` with ``dist/wheels/panel-….whl``, and ``wheels/bokeh-….whl``),
``BASE/bokeh/`` (``bokeh-<version>.min.js`` and friends) and ``BASE/pypi/`` (a PEP 503 simple index
of the pure-Python wheels micropip needs, such as param). Panel's resources move with
``PANEL_CDN_ROOT`` (set in the conversion and in the worker), Bokeh's JS by rewriting its CDN folder
in app.html, and the template's web-font stylesheet is left out. A folder is copied to ``vendor/``
and used by relative URL (build-site warns about files it lacks); an http(s) URL is used as it is
(it must send CORS headers).

Modules: ``inputs`` (checking --out, --dataset, --self-hosted), ``wheel`` (the browser wheel),
``worker`` (our start of Panel's worker, ``worker_start.js``), ``convert`` (panel convert in a
child Python), ``page`` (index.html and the page's links), ``resolve`` (the install plan against
Pyodide's lock), ``download`` (what a first visit fetches), ``build`` (the whole build), ``cli``.
This package builds the site and is not part of it: the browser wheel leaves it out.
"""
