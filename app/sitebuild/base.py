"""What every part of the site builder shares: the error type, file names and the project root."""
from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

APP_NAME = "app"  # app/main.py is converted under this name: app.html, app.js
DEFAULT_DATASET = Path("datasets") / "default"
MARKER = "diffviz-site.json"
ERROR_TAG = "diffviz-site-error: "  # the conversion child's one-line reason for failing, on stderr
VENDOR = "vendor"
#: What the datasets may add up to, checked before anything is copied: GitHub Pages publishes sites of at most
#: 1 GB and refuses files over 100 MB; a site of more files than this is a sweep that wants paging, not copying.
MAX_SITE_DATA_BYTES = 1_000_000_000
MAX_SITE_FILE_BYTES = 100_000_000
MAX_SITE_DATA_FILES = 50_000


class SiteError(Exception):
    """A build problem, reported as one line; ``usage`` marks bad input (exit status 2)."""

    def __init__(self, message: str, usage: bool = False):
        super().__init__(message)
        self.usage = usage


def asset(name: str) -> str:
    """The text of one of this package's JavaScript/HTML files (package data, so it works installed too)."""
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def project_root() -> Path:
    """The checkout whose ``pyproject.toml`` builds diffviz: this package's, else the working directory."""
    for candidate in (Path(__file__).resolve().parents[2], Path.cwd()):
        pyproject = candidate / "pyproject.toml"
        if pyproject.is_file() and re.search(r'(?m)^name\s*=\s*"diffviz"', pyproject.read_text(encoding="utf-8")):
            return candidate
    raise SiteError("cannot find diffviz's pyproject.toml (run build-site from the diffviz checkout)")
