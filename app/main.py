"""The dashboard's entry point: ``panel serve app/main.py`` and ``panel convert app/main.py``.

Served, the default run is ``DIFFVIZ_DATASET`` or ``datasets/default`` (a folder); in the static
site (``panel convert --to pyodide-worker``) it is the relative URL ``datasets/default``.
``?dataset=…&compare=…&step=…&layer=…&token=…`` in the page address selects what is shown.
The cache bound of each open run is ``DIFFVIZ_CACHE_MB`` (default 256 MB).
"""
import panel as pn

from app.shell import Dashboard

pn.extension(notifications=False)

Dashboard().template().servable(title="diffviz")
