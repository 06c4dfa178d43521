"""``python -m capture.bridge``: the same as ``diffviz bridge``."""
from capture.bridge.cli import main

raise SystemExit(main())
