"""``diffviz build-site``: the files it writes, the wheel inside them, what the worker installs, bad input,
replacing a previous build, and the reader's URL source against the built site over HTTP.

The browser side (the worker starting, Pyodide booting from a self-hosted copy) is in
``tests/browser/test_site_browser.py``; the wheel in a clean venv without torch in ``test_site_wheel.py``.
"""
from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path
from urllib.parse import urljoin

import numpy as np
import pytest

from tests.loopback import serving
from packaging.requirements import Requirement

from app.sitebuild import build, cli, page
from app.sitebuild import wheel as sitewheel
from app.sitebuild.base import MARKER, SiteError
from app.sitebuild.download import summary_line
from app.sitebuild.worker import parse_worker_requirements, worker_template_source
from diffviz import __version__ as VERSION
from export.reader import URLSource, open_run
from tests.synthetic import write_synthetic_run

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a prerendered teal hexagon"  # appears in app.html only if the prerender opened the copied run


def tree(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``folder``."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def inner_wheel(site_dir: Path) -> tuple[str, zipfile.ZipFile]:
    with zipfile.ZipFile(site_dir / "app.resources.zip") as zf:
        names = zf.namelist()
        assert len(names) == 1 and names[0].startswith("packed_wheels/"), names
        return names[0], zipfile.ZipFile(io.BytesIO(zf.read(names[0])))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    write_synthetic_run(root / "default", steps=3, layers=2, tokens=4, r=8, s=4, prompt=PROMPT)
    write_synthetic_run(root / "compare", steps=3, layers=2, tokens=4, r=8, s=4, seed=1, prompt="another run")
    return root


@pytest.fixture(scope="module")
def built(runs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default build (CDN), made through the CLI entry point exactly as ``make site`` does."""
    out = tmp_path_factory.mktemp("build") / "site"
    proc = subprocess.run([sys.executable, str(ROOT / "diffviz.py"), "build-site", "--out", str(out),
                           "--dataset", str(runs / "default")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    (out.parent / "stdout.txt").write_text(proc.stdout)
    return out


# ============================================================================ the files
def test_build_writes_the_site(built: Path, runs: Path) -> None:
    names = {p.name for p in built.iterdir()}
    assert names == {"index.html", "app.html", "app.js", "app.resources.zip", ".nojekyll", "datasets", "favicon.ico",
                     MARKER}
    assert (built / ".nojekyll").read_bytes() == b""
    # the dataset is copied byte for byte, and only the chosen one
    assert [p.name for p in (built / "datasets").iterdir()] == ["default"]
    assert tree(built / "datasets" / "default") == tree(runs / "default")
    html = (built / "app.html").read_text(encoding="utf-8")
    assert 'new Worker("./app.js")' in html
    # the prerender ran the real app with the working directory at the new site: it opened datasets/default
    assert PROMPT in html
    report = json.loads((built / MARKER).read_text())
    assert report["datasets"] == ["datasets/default"] and report["default_dataset"] == "datasets/default"
    assert report["page_links_elsewhere"] == page.external_references(built, None) != []  # the CDNs
    assert report["panel"] == metadata.version("panel") and report["self_hosted"] is None
    assert "holoviews" not in report


def test_build_checks_the_install_plan_and_prints_the_first_visit(built: Path) -> None:
    """With the npm Pyodide of the pinned version at hand (make test), the build resolves app.js's plan
    against its lock and prints what a first visit downloads, as recorded in the report."""
    report = json.loads((built / MARKER).read_text())
    plan = report["install_plan"]
    assert plan["lock"] == str(build.project_root() / build.NPM_PYODIDE / "pyodide-lock.json")
    assert plan["missing"] == []
    assert {"panel", "bokeh", "numpy", "diffviz", "micropip"} <= {n.lower() for n in plan["resolved"]}
    visit = report["first_visit"]
    sized = [i for i in visit["items"] if i["bytes"] is not None]
    assert round(sum(i["bytes"] for i in sized) / 1e6, 2) == pytest.approx(visit["total_mb"], abs=0.02)
    core = {i["name"]: i["bytes"] for i in visit["items"] if i["category"] == "pyodide"}
    npm = build.project_root() / build.NPM_PYODIDE
    assert core == {name: (npm / name).stat().st_size for name in core} and "pyodide.asm.wasm" in core
    ours = next(i for i in visit["items"] if i["name"].startswith("diffviz "))
    assert ours["bytes"] == (built / "app.resources.zip").stat().st_size
    printed = (built.parent / "stdout.txt").read_text().splitlines()
    assert summary_line(visit) in printed


def test_resources_zip_holds_only_our_browser_wheel(built: Path) -> None:
    name, wheel = inner_wheel(built)
    assert name == f"packed_wheels/diffviz-{VERSION}-py3-none-any.whl"
    files = set(wheel.namelist())
    tops = {f.split("/")[0] for f in files}
    assert tops == {"app", "analysis", "export", "diffviz.py", f"diffviz-{VERSION}.dist-info"}
    assert not any(f.startswith(("capture/", "app/sitebuild/")) for f in files)
    # every module of the three packages is there, byte for byte as in the checkout (the site builder aside)
    for package in ("app", "analysis", "export"):
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith("app/sitebuild/"):
                continue
            assert wheel.read(rel) == path.read_bytes(), rel
    assert (ROOT / "app" / "sitebuild" / "worker_start.js").is_file()  # the builder exists, and stayed out
    assert wheel.read("export/schema.json") == (ROOT / "export" / "schema.json").read_bytes()
    meta = wheel.read(f"diffviz-{VERSION}.dist-info/METADATA").decode()
    assert "Requires-Dist: torch" in meta and "extra == \"capture\"" in meta  # only behind the extra
    base = [r for r in re.findall(r"(?m)^Requires-Dist: (.+)$", meta) if "extra ==" not in r]
    assert not any(Requirement(r).name in {"torch", "diffusers", "transformers"} for r in base)


def test_worker_installs_exactly_the_expected_requirements(built: Path) -> None:
    import panel.io.convert as convert

    worker = (built / "app.js").read_text(encoding="utf-8")
    requirements = parse_worker_requirements(worker)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    ours = []
    for spec in pyproject["project"]["dependencies"]:
        req = Requirement(spec)
        if req.name in ("panel", "bokeh"):
            continue  # panel convert's own pinned wheels below
        if req.name == "param":
            ours.append(f"{req.name}=={metadata.version(req.name)}")
        else:
            ours.append(str(req))
    expected = [convert.BOKEH_CDN_WHL, convert.PANEL_CDN_WHL, "pyodide-http",
                f"emfs:packed_wheels/diffviz-{VERSION}-py3-none-any.whl", *ours]
    assert requirements == expected
    assert not [r for r in requirements if r.startswith("holoviews")]  # nothing imports it: not downloaded
    # Pyodide from the CDN Panel targets, loaded once, by the worker
    assert re.findall(r'const DIFFVIZ_PYODIDE_URL = "([^"]+)";', worker) == [convert.PYODIDE_URL]
    assert worker.count("importScripts(") == 1
    assert "const data_archives = ['app.resources.zip'];" in worker


def test_worker_keeps_panels_message_protocol(built: Path) -> None:
    """Only the start is ours: sendPatch and self.onmessage are Panel's template, verbatim."""
    import panel.io.convert as convert

    env = convert.WEB_WORKER_TEMPLATE.environment
    panel_js = env.loader.get_source(env, "pyodide_worker.js")[0]
    worker = (built / "app.js").read_text(encoding="utf-8")
    protocol = panel_js[panel_js.index("self.onmessage"):]
    assert worker.rstrip().endswith(protocol.rstrip())  # (Jinja drops the final newline)
    send_patch = panel_js[panel_js.index("function sendPatch"):panel_js.index("async function startApplication")].strip()
    assert send_patch in worker
    assert "Error while installing packages" not in worker  # Panel's generic message is gone


def test_index_opens_the_app_keeping_the_query(built: Path) -> None:
    index = (built / "index.html").read_text(encoding="utf-8")
    assert 'window.location.replace("app.html" + search + window.location.hash)' in index
    assert "var fallback = null;" in index  # the first dataset is "default": the app's own default applies


def test_reader_url_source_reads_the_site_over_http(built: Path) -> None:
    """The same URL code path as in the worker: 'datasets/default' relative to app.js, whole files, lazily."""
    requests: list[tuple[str, str | None]] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(built), **kwargs)

        def do_GET(self) -> None:
            requests.append((self.path, self.headers.get("Range")))
            super().do_GET()

        def log_message(self, *args) -> None:
            pass

    with serving(Handler) as base:
        worker_url = f"{base}/app.js"
        url = urljoin(worker_url, "datasets/default")
        remote = open_run(url)
        assert isinstance(remote.source, URLSource)
        local = open_run(built / "datasets" / "default")
        up_front = sorted(p for p, _ in requests)
        assert up_front == ["/datasets/default/latent_pca.json", "/datasets/default/metadata.json",
                            "/datasets/default/metrics.json"]
        assert remote.metadata == local.metadata and remote.metrics == local.metrics and remote.pca == local.pca
        np.testing.assert_array_equal(remote.cross(1, 2), local.cross(1, 2))
        np.testing.assert_array_equal(remote.self_attention(0, 1), local.self_attention(0, 1))
        np.testing.assert_array_equal(remote.image(0), local.image(0))
        assert remote.cross(1, 2).shape == (4, 8, 8) and remote.cross(1, 2).dtype == np.float32
        fetched = [p for p, _ in requests][3:]
        assert fetched == ["/datasets/default/attention/cross/layer_1_step_002.bin",
                           "/datasets/default/attention/self/layer_0_step_001.bin",
                           "/datasets/default/images/step_000.png"]
        remote.cross(1, 2)  # cached: no new request
        assert len(requests) == 6
        assert all(rng is None for _, rng in requests), "the reader must not send Range requests"


# ============================================================================ bad input
def _cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = cli.main(argv)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("case", ["missing-dataset", "not-a-run", "invalid-run", "duplicate-names",
                                  "out-not-a-site", "out-is-a-dataset", "self-hosted-missing",
                                  "self-hosted-without-pyodide", "no-default"])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(case: str, runs: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "site"
    dataset = [str(runs / "default")]
    extra: list[str] = []
    if case == "missing-dataset":
        dataset, expect = [str(tmp_path / "nope")], "no such folder"
    elif case == "not-a-run":
        (tmp_path / "empty").mkdir()
        dataset, expect = [str(tmp_path / "empty")], "not a run folder"
    elif case == "invalid-run":
        bad = tmp_path / "bad"
        shutil.copytree(runs / "default", bad)
        with open(bad / "attention" / "cross" / "layer_0_step_000.bin", "r+b") as fh:
            fh.truncate(10)
        dataset, expect = [str(bad)], "invalid run"
    elif case == "duplicate-names":
        shutil.copytree(runs / "default", tmp_path / "x" / "default")
        dataset, expect = [str(runs / "default"), str(tmp_path / "x" / "default")], "two datasets named 'default'"
    elif case == "out-not-a-site":
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
        expect = "refusing to replace it"
    elif case == "out-is-a-dataset":
        out, expect = runs / "default", "overlaps an input"
    elif case == "self-hosted-missing":
        extra, expect = ["--self-hosted", str(tmp_path / "nowhere")], "neither an existing folder nor an http(s) URL"
    elif case == "self-hosted-without-pyodide":
        (tmp_path / "host").mkdir()
        extra, expect = ["--self-hosted", str(tmp_path / "host")], "no pyodide/pyodide.js"
    else:  # no --dataset, and no datasets/default in the working directory
        monkeypatch.chdir(tmp_path)
        dataset, expect = [], "no --dataset given"
    before = tree(tmp_path), tree(runs)
    argv = ["--out", str(out)] + [a for d in dataset for a in ("--dataset", d)] + extra
    code, err = _cli(argv, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and expect in err and "Traceback" not in err, err
    assert err.startswith("diffviz build-site: error: ")
    assert (tree(tmp_path), tree(runs)) == before  # nothing written, nothing removed


def test_cli_dispatch_exit_code(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "diffviz.py"), "build-site", "--out", str(tmp_path / "s"),
                           "--dataset", str(tmp_path / "missing")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no such folder" in proc.stderr
    assert not (tmp_path / "s").exists()


# ============================================================================ rebuilding
def test_rebuild_replaces_a_build_and_a_failed_build_keeps_it(built: Path, runs: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "site"
    shutil.copytree(built, out)
    (out / "stale.txt").write_text("from the earlier build")
    base = "https://assets.invalid/diffviz/"
    code, err = _cli(["--out", str(out), "--dataset", str(runs / "compare"), "--dataset", str(runs / "default"),
                      "--self-hosted", base], capsys)
    assert code == 0, err
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in (out / "datasets").iterdir()) == ["compare", "default"]
    assert not list(tmp_path.glob(".site.*")), "no staging or old folders left behind"
    # a run named "default" is among them: the app's own default (datasets/default) applies
    assert "var fallback = null;" in (out / "index.html").read_text()
    # --self-hosted URL: Pyodide, Panel's and Bokeh's JS and wheels all come from the base, none from a CDN
    html = (out / "app.html").read_text(encoding="utf-8")
    worker = (out / "app.js").read_text(encoding="utf-8")
    scripts = re.findall(r'<script\b[^>]*\bsrc="([^"]+)"', html)
    assert scripts and all(url.startswith(base) for url in scripts), scripts
    assert {url[len(base):].split("/")[0] for url in scripts} == {"panel", "bokeh"}
    links = re.findall(r'<link\b[^>]*\bhref="([^"]+)"', html)
    assert links and all(url.startswith(base) or not re.match(r"https?://", url) for url in links), links
    tags = scripts + links
    requirements = parse_worker_requirements(worker)
    wheels = [r for r in requirements if r.endswith(".whl") and not r.startswith("emfs:")]
    assert [w.rsplit("/", 1)[-1].split("-")[0] for w in wheels] == ["bokeh", "panel"]
    assert all(w.startswith(base + "panel/") for w in wheels)
    assert f'const DIFFVIZ_PYODIDE_URL = "{base}pyodide/pyodide.js";' in worker
    assert f'const DIFFVIZ_PANEL_CDN_ROOT = "{base}panel/";' in worker
    assert f'const DIFFVIZ_INDEX_URL = "{base}pypi";' in worker
    assert not re.search(r"https?://(?!assets\.invalid/)", "\n".join(tags + requirements))
    report = json.loads((out / MARKER).read_text())
    assert report["self_hosted"] == base and report["datasets"] == ["datasets/compare", "datasets/default"]
    assert report["default_dataset"] == "datasets/default"
    assert report["page_links_elsewhere"] == [] and report["hosts_named"] == {}

    # a build that fails (here: the app raises while being converted) leaves the last good build as it was
    before = tree(out)
    broken = tmp_path / "broken_main.py"
    broken.write_text("raise RuntimeError('the app is broken on purpose')\n")
    monkeypatch.setattr(build, "ENTRY", broken)
    code, err = _cli(["--out", str(out), "--dataset", str(runs / "default")], capsys)
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and "the app is broken on purpose" in err, err
    assert tree(out) == before
    assert not list(tmp_path.glob(".site.*"))


def test_worker_template_refuses_an_unknown_panel_template() -> None:
    with pytest.raises(SiteError, match="not the shape"):
        worker_template_source("importScripts('x');\nfunction sendPatch() {}\nstartApplication()\n")


@pytest.mark.parametrize("files, expect", [
    ({"capture/__init__.py": ""}, "holds capture"),
    ({"app/sitebuild/__init__.py": ""}, "holds app/sitebuild/"),
    ({"app/views/x.py": "def f():\n    import torch\n"}, "app/views/x.py imports torch"),
    ({"export/y.py": "from diffusers import UNet2DConditionModel\n"}, "imports diffusers"),
    ({"app/__init__.py": "from ..capture import run\n"}, "app/__init__.py imports capture,"),
    ({"app/z.py": "from .capture import x\n"}, None),  # app.capture is ours, not the capture package
])
def test_verify_wheel_refuses_torch_and_capture(files: dict[str, str], expect: str | None, tmp_path: Path) -> None:
    wheel = tmp_path / f"diffviz-{VERSION}-py3-none-any.whl"
    base = {"app/__init__.py": "", "app/main.py": "import panel\n", "analysis/__init__.py": "", "export/__init__.py": "",
            f"diffviz-{VERSION}.dist-info/METADATA": "Name: diffviz\nRequires-Dist: numpy>=1.24\n"}
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, text in {**base, **files}.items():
            zf.writestr(name, text)
    if expect is None:
        assert sitewheel.verify_wheel(wheel)["files"]
        assert sitewheel.wheel_requirements(wheel) == ["numpy>=1.24"]
    else:
        with pytest.raises(SiteError, match=re.escape(expect)):
            sitewheel.verify_wheel(wheel)


def test_pages_workflow_builds_the_site_without_torch_and_deploys_it() -> None:
    import yaml

    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "pages.yml").read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as True
    assert "push" in triggers
    assert workflow["permissions"] == {"contents": "read", "pages": "write", "id-token": "write"}
    build, deploy = workflow["jobs"]["build"]["steps"], workflow["jobs"]["deploy"]["steps"]
    commands = [line.strip() for step in build for line in step.get("run", "").splitlines()]
    installs = [c for c in commands if "pip install" in c]
    assert installs and not any("torch" in c or "capture" in c for c in installs)
    assert "diffviz build-site --out site" in commands
    upload = [s for s in build if s.get("uses", "").startswith("actions/upload-pages-artifact@")]
    assert len(upload) == 1 and upload[0]["with"]["path"] == "site"
    assert workflow["jobs"]["deploy"]["needs"] == "build"
    assert [s["uses"].split("@")[0] for s in deploy] == ["actions/deploy-pages"]


def test_foreign_hosts_names_every_other_host_in_the_sites_own_files(tmp_path: Path) -> None:
    from app.sitebuild.inputs import SelfHosted

    (tmp_path / "app.html").write_text('<svg xmlns="http://www.w3.org/2000/svg"></svg>'
                                       '<link rel="stylesheet" href="https://fonts.example.com/css?family=x">'
                                       '<script src="https://assets.invalid/bokeh/bokeh.min.js"></script>'
                                       '{"value":"http://127.0.0.1:8765"}')
    (tmp_path / "app.js").write_text('importScripts("//cdn.example.org/pyodide.js");')
    (tmp_path / "vendor").mkdir()
    (tmp_path / "vendor" / "pyodide.js").write_text('"https://vendor-only.example.net/"')  # not the site's own file
    hosted = SelfHosted(base="https://assets.invalid/")
    assert page.foreign_hosts(tmp_path, hosted) == {"cdn.example.org": ["app.js"], "fonts.example.com": ["app.html"]}
    assert "assets.invalid" in page.foreign_hosts(tmp_path, None)


# ============================================================================ a sweep
@pytest.fixture(scope="module")
def sweep_in(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.test_app_sweep import write_sweep

    # 2 colours x 2 seeds; run 3 is still pending (no folder): only the finished ones are shipped
    return write_sweep(tmp_path_factory.mktemp("sweep") / "colours", {"colour": ["red", "green"], "seed": [0, 1]},
                       pending=(3,), steps=2)


def test_a_sweep_is_published_with_its_index_and_finished_runs(built: Path, sweep_in: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """build-site --dataset SWEEP: sweep.json and every finished run are in the site, byte for byte, index.html
    opens the sweep with its first run, and the sweep reads back over HTTP as the worker reads it. The
    conversion itself (tested above) is replaced by the page and worker of the module's build."""
    from app.sweepstore import open_sweep

    info = {"pyodide_url": json.loads((built / MARKER).read_text())["pyodide_url"], "bokeh_cdn_js": [], "cdn_dist": ""}

    def convert(entry: Path, out: Path, *args: object, **kwargs: object) -> dict:
        for name in ("app.html", "app.js", "app.resources.zip"):
            shutil.copy2(built / name, out / name)
        return info

    monkeypatch.setattr(build, "convert", convert)
    out = tmp_path / "site"
    report = build.build_site(out, [sweep_in], log=lambda line: None)
    doc = json.loads((sweep_in / "sweep.json").read_text())
    done = [r["name"] for r in doc["runs"] if r["status"] == "done"]
    assert len(done) == 3
    shipped = out / "datasets" / "colours"
    assert sorted(p.name for p in shipped.iterdir()) == sorted(done + ["sweep.json"])
    assert (shipped / "sweep.json").read_bytes() == (sweep_in / "sweep.json").read_bytes()
    for name in done:
        assert tree(shipped / name) == tree(sweep_in / name)
    first = f"datasets/colours/{done[0]}"
    assert f'var fallback = {{"sweep": "datasets/colours", "dataset": "{first}"}};' in (out / "index.html").read_text()
    assert report["sweeps"] == {"datasets/colours": {"runs": 3, "first": done[0]}}
    assert (report["default_dataset"], report["default_sweep"]) == (first, "datasets/colours")
    if "first_visit" in report:  # sized where the npm Pyodide is at hand: the index and the first grid's thumbnails
        names = {i["name"] for i in report["first_visit"]["items"] if i["category"] == "site"}
        assert {"datasets/colours/sweep.json", f"{first}/metadata.json", f"{first}/images/final.png"} <= names
    with serving(functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(out))) as base:
        remote = open_sweep(f"{base}/datasets/colours")
        assert remote.doc == doc and remote.run_text(remote.runs[0]) == f"{base}/datasets/colours/{done[0]}"
        np.testing.assert_array_equal(remote.thumbnail(remote.runs[1]), open_sweep(str(shipped)).thumbnail(remote.runs[1]))


@pytest.mark.parametrize("case", ["no-finished-run", "invalid-finished-run", "over-the-file-cap"])
def test_a_bad_sweep_is_refused_in_one_line_before_anything_is_written(case: str, sweep_in: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from app.sitebuild import inputs

    bad = tmp_path / "colours"
    shutil.copytree(sweep_in, bad)
    doc = json.loads((bad / "sweep.json").read_text())
    if case == "no-finished-run":
        for run in doc["runs"]:
            run.update(status="pending", headline=None, thumbnail=None)
        (bad / "sweep.json").write_text(json.dumps(doc))
        expect = "the sweep has no finished run to publish"
    elif case == "invalid-finished-run":
        with open(bad / doc["runs"][1]["name"] / "attention" / "cross" / "layer_0_step_000.bin", "r+b") as fh:
            fh.truncate(10)
        expect = f"invalid run {doc['runs'][1]['name']}"
    else:
        monkeypatch.setattr(inputs, "MAX_SITE_DATA_FILES", 10)
        expect = "more than 10 files"
    out = tmp_path / "site"
    before = tree(tmp_path)
    code, err = _cli(["--out", str(out), "--dataset", str(bad)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and expect in err and "Traceback" not in err, err
    assert tree(tmp_path) == before and not out.exists()
