"""The built static site in Chromium, offline: nothing may leave 127.0.0.1 (every other request is aborted
and recorded).

* The default build: ``index.html`` opens ``app.html`` keeping the query, the Pyodide worker starts and
  asks for exactly Panel's Pyodide URL; that is unreachable here, and the page says so.
* ``--self-hosted`` with the npm ``pyodide`` core package (plus the micropip wheel the core lacks; both
  installed by ``make test``): Pyodide boots in the worker from the local server, installs our wheel, then
  stops at the first package the host does not have, and the page names it. The test reports which.

Uses ``static_server`` and the Chromium launch settings from ``tests/browser/conftest.py``.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from app.sitebuild.base import VENDOR
from app.sitebuild.build import build_site
from app.sitebuild.page import external_references, index_html
from app.sitebuild.worker import parse_worker_requirements
from diffviz import __version__ as VERSION
from tests.synthetic import write_synthetic_run

ROOT = Path(__file__).resolve().parents[2]
NPM_PYODIDE = ROOT / "node_modules" / "pyodide"
SELFHOST_WHEELS = ROOT / "node_modules" / ".diffviz-wheels"
BOOT_TIMEOUT_MS = 240_000  # Pyodide's wasm compiles on 2 shared cores


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def offline(context: Any) -> list[str]:
    """Abort every request that is not for 127.0.0.1 (pages and workers alike); return the list of them."""
    blocked: list[str] = []

    def handle(route: Any) -> None:
        url = route.request.url
        if url.startswith("http://127.0.0.1:") or url.startswith("data:"):
            route.continue_()
        else:
            blocked.append(url)
            route.abort()

    context.route("**/*", handle)
    return blocked


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    write_synthetic_run(root / "default", steps=2, layers=1, tokens=3, r=4, s=2)
    return root


@pytest.fixture(scope="module")
def cdn_site(runs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cdn") / "site"
    build_site(out, [runs / "default"], log=lambda _msg: None)
    return out


@pytest.fixture(scope="module")
def pyodide_host(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A partial Pyodide host: the npm core package, plus micropip (the lock file's version) from PyPI."""
    import panel.io.convert as convert

    if not (NPM_PYODIDE / "pyodide.js").is_file():
        pytest.fail("node_modules/pyodide is missing: `make test` installs it (npm install, see package.json)")
    version = json.loads((NPM_PYODIDE / "package.json").read_text())["version"]
    assert f"v{version}" == convert.PYODIDE_VERSION, (
        f"package.json pins pyodide {version}, Panel converts for {convert.PYODIDE_VERSION}: update package.json")
    host = tmp_path_factory.mktemp("host")
    shutil.copytree(NPM_PYODIDE, host / "pyodide")
    lock_path = host / "pyodide" / "pyodide-lock.json"
    lock = json.loads(lock_path.read_text())
    entry = lock["packages"]["micropip"]
    wheel = SELFHOST_WHEELS / entry["file_name"]
    if not wheel.is_file():
        pytest.fail(f"{wheel.relative_to(ROOT)} is missing: `make test` downloads it (pip download micropip)")
    shutil.copy2(wheel, host / "pyodide" / entry["file_name"])
    # Pyodide rebuilt micropip; the one from PyPI is the same version with another hash
    entry["sha256"] = hashlib.sha256(wheel.read_bytes()).hexdigest()
    lock_path.write_text(json.dumps(lock))
    return host


@pytest.fixture(scope="module")
def hosted_site(runs: Path, pyodide_host: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hosted") / "site"
    build_site(out, [runs / "default"], self_hosted=str(pyodide_host), log=lambda _msg: None)
    return out


def test_index_opens_the_app_and_the_worker_asks_for_pyodide(cdn_site: Path, static_server: Any, context: Any) -> None:
    import panel.io.convert as convert

    base = static_server(cdn_site)
    blocked = offline(context)
    page = context.new_page()
    workers: list[str] = []
    console: list[str] = []
    page.on("worker", lambda worker: workers.append(worker.url))
    page.on("console", lambda msg: console.append(msg.text))
    page.goto(f"{base}/index.html?dataset=datasets/default&step=1#attention")
    page.wait_for_url(f"{base}/app.html?dataset=datasets/default&step=1#attention")
    message = page.locator(".diffviz-error")
    message.wait_for(state="visible", timeout=60_000)
    assert workers == [f"{base}/app.js"]
    assert "Loading pyodide..." in console  # logged by the worker itself
    text = message.inner_text()
    assert text.startswith(f"Failed to load Pyodide from {convert.PYODIDE_URL}: "), text
    # the worker asked for Panel's Pyodide; the page only for what app.html links; nothing else went out
    assert convert.PYODIDE_URL in blocked
    expected = {convert.PYODIDE_URL} | set(external_references(cdn_site, None))
    assert {unquote(url) for url in blocked} <= expected
    scripts = re.findall(r'<script\b[^>]*\bsrc="(https?://[^"]+)"', (cdn_site / "app.html").read_text())
    assert scripts and {unquote(url) for url in blocked} >= set(scripts)


@pytest.mark.parametrize("query, expected", [
    ("", "?dataset=datasets%2Ffirst"),
    ("?step=2", "?step=2&dataset=datasets%2Ffirst"),
    ("?dataset=https://example.invalid/run/&step=2", "?dataset=https://example.invalid/run/&step=2"),
])
def test_index_adds_the_first_dataset_only_when_none_is_asked_for(query: str, expected: str, tmp_path: Path,
                                                                  static_server: Any, context: Any) -> None:
    """A site whose first run is not "default": index.html names it unless the query names one."""
    (tmp_path / "index.html").write_text(index_html("datasets/first"))
    (tmp_path / "app.html").write_text("<!doctype html><title>app</title>")
    base = static_server(tmp_path)
    offline(context)
    page = context.new_page()
    page.goto(f"{base}/index.html{query}#x")
    page.wait_for_url(f"{base}/app.html{expected}#x")
    assert page.title() == "app"


def project_name(requirement: str) -> str:
    if requirement.endswith(".whl"):
        return requirement.rsplit("/", 1)[-1].split("-")[0]
    return re.match(r"[A-Za-z0-9._-]+", requirement).group(0)


def host_has(host: Path, requirement: str) -> bool:
    """Whether the self-hosted folder provides ``requirement``: a wheel under vendor/, a Pyodide package, an index entry."""
    vendor = f"./{VENDOR}/"
    if requirement.startswith(vendor):
        return (host / requirement[len(vendor):]).is_file()
    entry = json.loads((host / "pyodide" / "pyodide-lock.json").read_text())["packages"].get(project_name(requirement).lower())
    if entry is not None:
        return (host / "pyodide" / entry["file_name"]).is_file()
    return (host / "pypi" / project_name(requirement)).is_dir()


def test_self_hosted_pyodide_boots_installs_our_wheel_and_names_what_fails(
        hosted_site: Path, pyodide_host: Path, static_server: Any, context: Any, artifacts: Path) -> None:
    base = static_server(hosted_site)
    blocked = offline(context)
    page = context.new_page()
    console: list[str] = []
    requests: list[str] = []
    page.on("console", lambda msg: console.append(msg.text))
    context.on("request", lambda request: requests.append(request.url))
    page.goto(f"{base}/index.html")
    message = page.locator(".diffviz-error")
    message.wait_for(state="visible", timeout=BOOT_TIMEOUT_MS)
    text = message.inner_text()
    (artifacts / "site-selfhosted-first-failure.txt").write_text(text + "\n")
    print(f"\nself-hosted site, first install failure: {text}")

    # Pyodide came from the site's vendor/ folder and booted; micropip installed our wheel from the resources zip
    for name in ("pyodide.js", "pyodide.asm.wasm", "python_stdlib.zip", "pyodide-lock.json"):
        assert f"{base}/vendor/pyodide/{name}" in requests, name
    assert f"{base}/app.resources.zip" in requests
    assert "Loaded pyodide!" in console
    assert f"diffviz: installed diffviz-{VERSION}-py3-none-any.whl" in console
    assert blocked == [], "with --self-hosted nothing may be fetched from anywhere else"
    # not even another port on this machine: every request is for the page's own origin
    fetched = [url for url in requests if not url.startswith(("data:", "blob:"))]
    assert fetched and {origin(url) for url in fetched} == {base}, sorted({origin(url) for url in fetched})

    match = re.fullmatch(r"Failed to install (.+?): (.+)", text)
    assert match, text
    failed = [name.strip() for name in re.sub(r"\(for .*?\)", "", match.group(1)).split(",")]
    requirements = parse_worker_requirements((hosted_site / "app.js").read_text())
    by_name = {project_name(r): r for r in requirements if not r.startswith("emfs:")}
    first = failed[0]
    assert first not in ("diffviz", "micropip", "Pyodide")
    if first in by_name:  # one of our requirements: the host must really lack it
        assert not host_has(pyodide_host, by_name[first]), (first, by_name[first])
    else:  # a dependency of one of them that Pyodide could not load
        assert "Pyodide could not load" in text
    assert message.is_visible()
