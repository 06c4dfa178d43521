"""``diffviz build-site`` (``python -m app.sitebuild.cli``)."""
from __future__ import annotations

import argparse
import sys

from .base import DEFAULT_DATASET, SiteError
from .build import build_site


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="diffviz build-site",
        description="Build the static Pyodide site: the converted dashboard, our wheel and the datasets.")
    parser.add_argument("--out", default="site", help="output folder (default: site); replaced only if it is an earlier build")
    parser.add_argument("--dataset", action="append", metavar="PATH",
                        help=f"a run folder to ship, copied to datasets/<folder name>/ (repeatable; default: {DEFAULT_DATASET})")
    parser.add_argument("--self-hosted", metavar="DIR_OR_URL",
                        help="load Pyodide, Panel's and Bokeh's JS and wheels, and the pure-Python packages from here "
                             "instead of the CDNs and PyPI (BASE/pyodide/, BASE/panel/, BASE/bokeh/, BASE/pypi/); "
                             "a folder is copied into the site as vendor/")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the conversion's own output")
    args = parser.parse_args(argv)
    try:
        report = build_site(args.out, args.dataset, args.self_hosted, verbose=args.verbose)
    except SiteError as exc:
        print(f"diffviz build-site: error: {exc}", file=sys.stderr)
        return 2 if exc.usage else 1
    except KeyboardInterrupt:
        print("diffviz build-site: interrupted; nothing was replaced", file=sys.stderr)
        return 130
    print(f"wrote {args.out}/ (open index.html through a web server; datasets: {', '.join(report['datasets'])})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
