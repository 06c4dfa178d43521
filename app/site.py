"""``diffviz build-site``: the dashboard as a static site that any web server can host.

    diffviz build-site --out site/ [--dataset datasets/default ...] [--self-hosted DIR_OR_URL]

The site is ``app/main.py`` converted by ``panel convert``'s machinery to the ``pyodide-worker``
target: the page (``app.html``) renders Bokeh, and a web worker (``app.js``) runs the very same
Python code in Pyodide. What goes into ``--out``:

    index.html             opens app.html, keeping ?dataset=… (and adding the first run when it is not "default")
    app.html, app.js       the converted app: the page and its Pyodide worker
    app.resources.zip      our own pure-Python wheel (app, analysis, export; no capture, no torch),
                           unpacked into the worker's file system and installed from there
    datasets/<name>/       each --dataset, copied (validated first); the app opens datasets/default
    vendor/                --self-hosted DIR, copied
    .nojekyll              GitHub Pages serves the folder as is
    diffviz-site.json      what was built: versions, requirements, datasets, where Pyodide comes from

The worker installs our wheel first (``deps=False``), then the rest in one ``micropip.install``,
and checks that every distribution they need is really there (``micropip`` does not notice when
Pyodide fails to load one of its own packages such as numpy). Any failure stops it with a message
in the page naming what failed, instead of Panel's generic "Error while installing packages".

``--self-hosted BASE`` makes the site fetch nothing from CDNs or PyPI: ``BASE/pyodide/`` (a full
Pyodide distribution of the version Panel targets), ``BASE/panel/`` (a mirror of Panel's CDN root:
``<panel version>/dist/…`` with ``dist/wheels/panel-….whl``, and ``wheels/bokeh-….whl``),
``BASE/bokeh/`` (``bokeh-<version>.min.js`` and friends) and ``BASE/pypi/`` (a PEP 503 simple index
of the pure-Python wheels micropip needs, such as holoviews and param). Panel's resources move with
``PANEL_CDN_ROOT`` (set in the conversion and in the worker), Bokeh's JS by rewriting its CDN folder
in app.html, and the template's web-font stylesheet is left out. A folder is copied to ``vendor/``
and used by relative URL (build-site warns about files it lacks); an http(s) URL is used as it is
(it must send CORS headers).
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

#: The site's entry point (``app/main.py``, converted under this name: app.html, app.js).
ENTRY = Path(__file__).with_name("main.py")
APP_NAME = "app"
DEFAULT_DATASET = Path("datasets") / "default"
MARKER = "diffviz-site.json"
ERROR_TAG = "diffviz-site-error: "  # the conversion child's one-line reason for failing, on stderr
VENDOR = "vendor"
#: What the browser wheel may hold at its top level, and what none of its modules may import.
WHEEL_TOP_LEVEL = {"app", "analysis", "export", "diffviz.py"}
WHEEL_FORBIDDEN_IMPORTS = {"capture", "torch", "diffusers", "transformers", "safetensors", "accelerate"}
#: Pure-Python dependencies that micropip fetches from the package index: pinned to the versions
#: installed here, the ones Panel's pinned wheel was tested with (numpy, pillow, jsonschema come
#: from Pyodide's own distribution, whose versions are Pyodide's).
PIN_TO_LOCAL = ("holoviews", "param")
#: Fetched as the CDN wheels panel.io.convert names, whatever our requirement says.
PANEL_PROVIDED = {"panel", "bokeh"}


class SiteError(Exception):
    """A build problem, reported as one line; ``usage`` marks bad input (exit status 2)."""

    def __init__(self, message: str, usage: bool = False):
        super().__init__(message)
        self.usage = usage


# ============================================================================ inputs
@dataclass
class SelfHosted:
    """Where Pyodide, the Panel/Bokeh wheels and Bokeh's JS come from instead of the CDNs."""

    base: str                      # URL prefix ending in "/", relative to the site or absolute
    folder: Path | None = None     # a local folder copied to site/vendor/, or None for a URL

    @property
    def pyodide_url(self) -> str:
        return f"{self.base}pyodide/pyodide.js"

    @property
    def panel_cdn_root(self) -> str:
        return f"{self.base}panel/"

    @property
    def bokeh_base(self) -> str:
        return f"{self.base}bokeh/"

    @property
    def index_url(self) -> str:
        """A PEP 503 simple index (BASE/pypi/<project>/) of the pure-Python wheels micropip needs."""
        return f"{self.base}pypi"


@dataclass
class Plan:
    out: Path
    datasets: list[tuple[str, Path]]
    self_hosted: SelfHosted | None = None


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def parse_self_hosted(text: str) -> SelfHosted:
    if _is_url(text):
        return SelfHosted(base=text if text.endswith("/") else text + "/")
    folder = Path(text).expanduser()
    if not folder.is_dir():
        raise SiteError(f"--self-hosted {text}: neither an existing folder nor an http(s) URL", usage=True)
    if not (folder / "pyodide" / "pyodide.js").is_file():
        raise SiteError(f"--self-hosted {text}: no pyodide/pyodide.js in it (put a Pyodide distribution in {folder / 'pyodide'})", usage=True)
    return SelfHosted(base=f"./{VENDOR}/", folder=folder.resolve())


def check_dataset(path: Path) -> None:
    """Refuse a folder that is not a valid run (``export.validate``), with its first problem."""
    from export.validate import validate_run

    if not path.is_dir():
        raise SiteError(f"--dataset {path}: no such folder", usage=True)
    if not (path / "metadata.json").is_file():
        raise SiteError(f"--dataset {path}: not a run folder (no metadata.json)", usage=True)
    problems = validate_run(path)
    if problems:
        more = f" (and {len(problems) - 1} more; run diffviz validate {path})" if len(problems) > 1 else ""
        raise SiteError(f"--dataset {path}: invalid run: {problems[0]}{more}", usage=True)


def check_out(out: Path, inputs: Sequence[Path], project: Path | None = None) -> None:
    """Refuse an output folder that is not empty and not a previous build, or that overlaps our inputs."""
    if out.exists() and not out.is_dir():
        raise SiteError(f"--out {out}: exists and is not a folder", usage=True)
    resolved = out.resolve()
    for path in inputs:
        path = path.resolve()
        if resolved == path or resolved in path.parents or path in resolved.parents:
            raise SiteError(f"--out {out}: overlaps an input ({path}); choose another folder", usage=True)
    if project is not None and (resolved == project.resolve() or resolved in project.resolve().parents):
        raise SiteError(f"--out {out}: would replace the checkout ({project}); choose a folder inside it, such as site", usage=True)
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise SiteError(f"--out {out}: not empty and not a site built by diffviz (no {MARKER}); refusing to replace it", usage=True)


def make_plan(out: str | os.PathLike, datasets: Sequence[str | os.PathLike] | None = None,
              self_hosted: str | None = None) -> Plan:
    """Check every input before anything is written."""
    paths = [Path(d) for d in datasets] if datasets else []
    if not paths:
        if not DEFAULT_DATASET.is_dir():
            raise SiteError(f"no --dataset given and no {DEFAULT_DATASET}/ here; pass --dataset PATH (a run folder)", usage=True)
        paths = [DEFAULT_DATASET]
    named: list[tuple[str, Path]] = []
    for path in paths:
        name = path.resolve().name
        if any(name == other for other, _ in named):
            raise SiteError(f"--dataset {path}: two datasets named {name!r}; each is copied to datasets/<folder name>", usage=True)
        check_dataset(path)
        named.append((name, path))
    hosted = parse_self_hosted(self_hosted) if self_hosted else None
    out_path = Path(out)
    check_out(out_path, [p for _, p in named] + ([hosted.folder] if hosted and hosted.folder else []), project_root())
    return Plan(out=out_path, datasets=named, self_hosted=hosted)


# ============================================================================ the browser wheel
def project_root() -> Path:
    """The checkout whose ``pyproject.toml`` builds diffviz: this file's, else the working directory."""
    for candidate in (Path(__file__).resolve().parents[1], Path.cwd()):
        pyproject = candidate / "pyproject.toml"
        if pyproject.is_file() and re.search(r'(?m)^name\s*=\s*"diffviz"', pyproject.read_text(encoding="utf-8")):
            return candidate
    raise SiteError("cannot find diffviz's pyproject.toml (run build-site from the diffviz checkout)")


def _stage_sources(root: Path, stage: Path) -> None:
    """Copy what the browser wheel is built from: pyproject.toml as it is, and only the browser's packages.

    ``[tool.setuptools.packages.find]`` includes ``capture*``; it finds nothing here because
    ``capture/`` is not copied. That is the filter: one pyproject, no second wheel config.
    """
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    stage.mkdir(parents=True)
    shutil.copy2(root / "pyproject.toml", stage / "pyproject.toml")
    readme = root / "README.md"
    if readme.is_file():
        shutil.copy2(readme, stage / "README.md")
    else:  # pyproject names it; a checkout without one still builds
        (stage / "README.md").write_text("# diffviz\n", encoding="utf-8")
    for name in sorted(WHEEL_TOP_LEVEL):
        src = root / name
        if src.is_dir():
            shutil.copytree(src, stage / name, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, stage / name)
        else:
            raise SiteError(f"{src}: missing from the checkout")


def _not_plain(folder: str, names: list[str]) -> set[str]:
    """For ``copytree``: skip what is neither a regular file nor a folder (a FIFO would block the copy)."""
    skip = set()
    for name in names:
        try:
            mode = os.stat(os.path.join(folder, name)).st_mode
        except OSError:
            skip.add(name)
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            skip.add(name)
    return skip


def _can_build_offline() -> bool:
    """True when this Python's setuptools builds wheels by itself (70.1+ has bdist_wheel built in)."""
    from importlib import metadata

    try:
        version = metadata.version("setuptools")
    except metadata.PackageNotFoundError:
        return False
    major, minor = (int(x) for x in re.findall(r"\d+", version)[:2])
    return (major, minor) >= (70, 1)


def build_wheel(dest: Path, work: Path, log: Callable[[str], None] = print) -> Path:
    """Build the browser wheel (``pip wheel --no-deps``) into ``dest`` and return its path."""
    stage = work / "wheel-src"
    _stage_sources(project_root(), stage)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q", "-w", str(dest)]
    if _can_build_offline():
        cmd += ["--no-build-isolation", "--no-index"]
    else:
        log("note: this Python's setuptools is older than 70.1; pip builds the wheel in an isolated "
            "environment, which needs the package index")
    proc = subprocess.run(cmd + [str(stage)], capture_output=True, text=True)
    wheels = sorted(dest.glob("diffviz-*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel written"]
        raise SiteError(f"building the browser wheel failed: {tail[0]}")
    verify_wheel(wheels[0])
    return wheels[0]


def _imports(source: str, module: str, is_package: bool = False) -> set[str]:
    """Absolute names of the modules that ``source`` (module ``module``) imports, anywhere in it."""
    names: set[str] = set()
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                names.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                names.add(node.module)
    return names


def verify_wheel(wheel: Path) -> dict[str, Any]:
    """Check the browser wheel: only app/analysis/export (+ diffviz.py), app/main.py present, no torch imports."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        tops = {n.split("/")[0] for n in names}
        stray = sorted(t for t in tops if t not in WHEEL_TOP_LEVEL and not t.endswith(".dist-info"))
        if stray:
            raise SiteError(f"{wheel.name}: holds {', '.join(stray)}; the browser wheel may hold only {', '.join(sorted(WHEEL_TOP_LEVEL))}")
        for required in ("app/main.py", "analysis/__init__.py", "export/__init__.py"):
            if required not in names:
                raise SiteError(f"{wheel.name}: {required} is missing")
        for name in names:
            if not name.endswith(".py"):
                continue
            module = name[:-3].replace("/", ".").removesuffix(".__init__")
            imported = _imports(zf.read(name).decode("utf-8"), module, is_package=name.endswith("/__init__.py"))
            bad = {m for m in imported if m.split(".")[0] in WHEEL_FORBIDDEN_IMPORTS}
            if bad:
                raise SiteError(f"{wheel.name}: {name} imports {', '.join(sorted(bad))}, which the browser cannot have")
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = zf.read(meta_name).decode("utf-8")
    return {"files": names, "metadata": metadata}


def wheel_requirements(wheel: Path) -> list[str]:
    """The wheel's unconditional ``Requires-Dist`` (no extras), the local pins applied."""
    from importlib import metadata as md

    from packaging.requirements import Requirement

    text = verify_wheel(wheel)["metadata"]
    out = []
    for line in re.findall(r"(?m)^Requires-Dist:\s*(.+?)\s*$", text):
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra (capture, test): not for the browser
        if req.name.lower() in PIN_TO_LOCAL:
            try:
                local = md.version(req.name)
            except md.PackageNotFoundError:
                local = None
            if local and req.specifier.contains(local, prereleases=True):
                out.append(f"{req.name}=={local}")
                continue
        out.append(str(req))
    return out


# ============================================================================ the worker
#: Replaces Panel's ``importScripts`` line and ``startApplication``; Panel's ``sendPatch`` and its
#: message protocol (``self.onmessage``) are kept verbatim. Jinja renders {{ ... }} (Panel's variables).
WORKER_START = r"""
const DIFFVIZ_PYODIDE_URL = "{{ PYODIDE_URL }}";
const DIFFVIZ_PANEL_CDN_ROOT = __PANEL_CDN_ROOT__;
const DIFFVIZ_INDEX_URL = __INDEX_URL__;
let diffvizImportError = null;
try {
  importScripts(DIFFVIZ_PYODIDE_URL);
} catch (e) {
  diffvizImportError = e;
}

function diffvizLastLine(error) {
  const lines = `${error}`.split('\n').map((line) => line.trim()).filter((line) => line.length);
  return lines.length ? lines[lines.length - 1] : 'unknown error';
}

function diffvizEscape(text) {
  return `${text}`.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

// Show what failed in the page (Panel's loading message) and stop: the app would only fail on import.
function diffvizFail(action, what, error) {
  const msg = `Failed to ${action} ${what}: ${diffvizLastLine(error)}`;
  console.error(`diffviz: ${msg}`);
  self.postMessage({type: 'status', msg: `<span class="diffviz-error">${diffvizEscape(msg)}</span>`});
  return new Error(msg);
}

// The project name of a requirement: a wheel's URL or path, or a PEP 508 spec.
function diffvizProject(req) {
  const base = req.split('/').pop();
  if (base.endsWith('.whl')) {
    return base.split('-')[0];
  }
  return req.match(/^[A-Za-z0-9._-]+/)[0];
}

// What micropip's error names: a wheel in a URL, else quoted project names, else all we asked for.
function diffvizCulprit(error, requested) {
  const line = diffvizLastLine(error);
  const wheel = line.match(/([A-Za-z0-9_.]+)-[0-9][^\s/'"]*\.whl/);
  if (wheel) {
    return wheel[1];
  }
  const quoted = [...line.matchAll(/'([A-Za-z0-9][A-Za-z0-9._-]*)'/g)].map((m) => m[1]);
  return quoted.length ? quoted.join(', ') : requested.map(diffvizProject).join(', ');
}

// Every distribution that the installed requirements need, recursively; the names of the missing ones.
const DIFFVIZ_CHECK = `
import json, re
import importlib.metadata as _md
try:
    from packaging.requirements import Requirement as _Req
except ImportError:
    from micropip._vendored.packaging.src.packaging.requirements import Requirement as _Req
_todo, _seen, _missing = list(json.loads(_diffviz_names)), set(), []
while _todo:
    _name = _todo.pop(0)
    _key = re.sub(r"[-_.]+", "-", _name).lower()
    if _key in _seen:
        continue
    _seen.add(_key)
    try:
        _dist = _md.distribution(_name)
    except _md.PackageNotFoundError:
        _missing.append(_name)
        continue
    for _line in _dist.requires or []:
        _r = _Req(_line)
        if _r.marker is None or _r.marker.evaluate({"extra": ""}):
            _todo.append(_r.name)
json.dumps(_missing)
`;

async function diffvizMissing(names) {
  self.pyodide.globals.set('_diffviz_names', JSON.stringify(names));
  return JSON.parse(await self.pyodide.runPythonAsync(DIFFVIZ_CHECK));
}

async function diffvizInstall(requirements, deps) {
  self.pyodide.globals.set('_diffviz_reqs', JSON.stringify(requirements));
  await self.pyodide.runPythonAsync(
    `import json, micropip\nawait micropip.install(json.loads(_diffviz_reqs), deps=${deps ? 'True' : 'False'})`
  );
}

// After a failed install: install the requirements one by one to name the first that fails, and why.
async function diffvizDiagnose(environment) {
  self.postMessage({type: 'status', msg: 'Finding which package failed to install'})
  for (const req of environment) {
    const name = diffvizProject(req);
    if (req.endsWith('.whl')) {  // micropip reads an HTTP error page as a broken zip: ask the server first
      let response;
      try {
        response = await fetch(new URL(req, self.location.href), {method: 'HEAD'});
      } catch (e) {
        throw diffvizFail('install', name, `${e} (${req})`);
      }
      if (!response.ok) {
        throw diffvizFail('install', name, `HTTP ${response.status} ${response.statusText} for ${req}`);
      }
    }
    try {
      await diffvizInstall([req], true);
    } catch (e) {
      throw diffvizFail('install', name, e);
    }
    const missing = await diffvizMissing([name]);
    if (missing.length) {
      const what = missing.includes(name) ? missing.join(', ') : `${missing.join(', ')} (for ${name})`;
      throw diffvizFail('install', what, 'Pyodide could not load it (see the browser console)');
    }
  }
}

async function startApplication() {
  console.log("Loading pyodide...");
  self.postMessage({type: 'status', msg: 'Loading pyodide'})
  if (diffvizImportError !== null || typeof loadPyodide === 'undefined') {
    throw diffvizFail('load', `Pyodide from ${DIFFVIZ_PYODIDE_URL}`, diffvizImportError || 'loadPyodide is not defined');
  }
  try {
    self.pyodide = await loadPyodide();
  } catch (e) {
    throw diffvizFail('start', 'Pyodide', e);
  }
  self.pyodide.globals.set("sendPatch", sendPatch);
  console.log("Loaded pyodide!");
  const data_archives = [{{ data_archives }}];
  for (const archive of data_archives) {
    let zipResponse;
    try {
      zipResponse = await fetch(archive);
    } catch (e) {
      throw diffvizFail('load', archive, e);
    }
    if (!zipResponse.ok) {
      throw diffvizFail('load', archive, `HTTP ${zipResponse.status} ${zipResponse.statusText}`);
    }
    let zipBinary = await zipResponse.arrayBuffer();
    self.postMessage({type: 'status', msg: `Unpacking ${archive}`})
    self.pyodide.unpackArchive(zipBinary, "zip");
  }
  const requirements = [{{ env_spec }}];
  const ownWheels = requirements.filter((req) => req.startsWith('emfs:'));
  const environment = requirements.filter((req) => !req.startsWith('emfs:'));

  self.postMessage({type: 'status', msg: 'Loading micropip'})
  const loadErrors = [];
  await self.pyodide.loadPackage('micropip', {errorCallback: (m) => loadErrors.push(m)});
  if (!('micropip' in self.pyodide.loadedPackages)) {
    throw diffvizFail('install', 'micropip', loadErrors.join('\n') || 'not loaded');
  }
  for (const wheel of ownWheels) {
    const name = wheel.split('/').pop();
    self.postMessage({type: 'status', msg: `Installing ${diffvizEscape(name)}`})
    try {
      await diffvizInstall([wheel], false);
    } catch (e) {
      throw diffvizFail('install', diffvizProject(wheel), e);
    }
    console.log(`diffviz: installed ${name}`);
  }
  if (DIFFVIZ_INDEX_URL !== null) {  // self-hosted: a simple index of the pure-Python wheels, no PyPI
    self.pyodide.globals.set('_diffviz_index', new URL(DIFFVIZ_INDEX_URL, self.location.href).href);
    await self.pyodide.runPythonAsync(`import micropip\nmicropip.set_index_urls([_diffviz_index])`);
  }
  self.postMessage({type: 'status', msg: `Installing environment`})
  let installError = null;
  try {
    await diffvizInstall(environment, true);
  } catch (e) {
    installError = e;
  }
  // micropip does not raise when Pyodide fails to load one of its own packages (numpy, pandas, ...).
  const missing = installError === null ? await diffvizMissing(requirements.map(diffvizProject)) : [];
  if (installError !== null || missing.length) {
    await diffvizDiagnose(environment);
    if (installError !== null) {
      throw diffvizFail('install', diffvizCulprit(installError, environment), installError);
    }
    throw diffvizFail('install', missing.join(', '), 'not installed (Pyodide could not load it; see the browser console)');
  }
  if (DIFFVIZ_PANEL_CDN_ROOT !== null) {
    self.pyodide.globals.set('_diffviz_cdn_root', DIFFVIZ_PANEL_CDN_ROOT);
    self.pyodide.runPython(`import os\nos.environ['PANEL_CDN_ROOT'] = _diffviz_cdn_root`);
  }
  console.log("Environment loaded!");
  self.postMessage({type: 'status', msg: 'Executing code'})
  try {
    const [docs_json, render_items, root_ids] = await self.pyodide.runPythonAsync(`{{ code }}`)
    self.postMessage({
      type: 'render',
      docs_json: docs_json,
      render_items: render_items,
      root_ids: root_ids
    })
  } catch(e) {
    const msg = `Failed to start the app: ${diffvizLastLine(e)}`;
    console.error(`diffviz: ${msg}`);
    self.postMessage({type: 'status', msg: `<span class="diffviz-error">${diffvizEscape(msg)}</span>`});
    throw e
  }
}

"""


def worker_template_source(panel_source: str, panel_cdn_root: str | None = None, index_url: str | None = None) -> str:
    """Panel's worker template with our start (see :data:`WORKER_START`); fails loudly if Panel's changed shape."""
    imports = re.findall(r"(?m)^importScripts\(.*\);?[ \t]*\n", panel_source)
    starts = panel_source.count("async function startApplication()")
    handlers = panel_source.count("self.onmessage")
    if len(imports) != 1 or starts != 1 or handlers != 1:
        raise SiteError("Panel's pyodide_worker.js template is not the shape app/site.py knows "
                        "(one importScripts, one startApplication, one self.onmessage); update WORKER_START")
    head, rest = panel_source.split("async function startApplication()", 1)
    head = head.replace(imports[0], "", 1)
    handlers_part = rest[rest.index("self.onmessage"):]
    start = (WORKER_START.replace("__PANEL_CDN_ROOT__", json.dumps(panel_cdn_root))
             .replace("__INDEX_URL__", json.dumps(index_url)))
    return start + head.strip() + "\n\n" + start_marker() + "\n" + handlers_part


def start_marker() -> str:
    return "// Panel's message protocol (pyodide_worker.js), unchanged:"


def parse_worker_requirements(worker_js: str) -> list[str]:
    """The requirement list a generated ``app.js`` installs (``const requirements = [...]``)."""
    found = re.findall(r"(?m)^\s*const requirements = (\[.*\]);\s*$", worker_js)
    if len(found) != 1:
        raise SiteError("app.js: no single 'const requirements = [...]' line")
    value = ast.literal_eval(found[0])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SiteError("app.js: the requirements are not a list of strings")
    return value


# ============================================================================ conversion (a child process)
def _convert_child(spec: dict[str, Any]) -> int:
    """Runs in a fresh Python: PANEL_CDN_ROOT must be set before panel is imported."""
    if spec.get("panel_cdn_root"):
        os.environ["PANEL_CDN_ROOT"] = spec["panel_cdn_root"]
    import traceback

    import jinja2
    import panel.io.convert as convert
    from bokeh.resources import CDN

    if spec.get("pyodide_url"):
        convert.PYODIDE_URL = spec["pyodide_url"]
    loader = convert.WEB_WORKER_TEMPLATE.environment.loader
    source = loader.get_source(convert.WEB_WORKER_TEMPLATE.environment, "pyodide_worker.js")[0]
    try:
        template = worker_template_source(source, spec.get("panel_cdn_root"), spec.get("index_url"))
    except SiteError as exc:
        print(f"{ERROR_TAG}{exc}", file=sys.stderr)
        return 1
    convert.WEB_WORKER_TEMPLATE = jinja2.Environment(autoescape=False).from_string(template)

    original = convert.script_to_html

    def script_to_html(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        except Exception:
            traceback.print_exc()
            raise

    convert.script_to_html = script_to_html
    built: list[Any] = []
    original_build = convert.build_single_handler_application

    def build_single_handler_application(*args: Any, **kwargs: Any) -> Any:
        built.append(original_build(*args, **kwargs))
        return built[-1]

    convert.build_single_handler_application = build_single_handler_application
    os.chdir(spec["cwd"])  # the app's prerender opens datasets/default from the new site
    result = convert.convert_app(
        spec["entry"], spec["out"], requirements=spec["requirements"], runtime="pyodide-worker",
        prerender=True, manifest=None, http_patch=True, inline=False, compiled=False, verbose=False,
    )
    if result is not None:
        favicon = Path(convert.DIST_DIR) / "images" / "favicon.ico"  # the page links ./favicon.ico
        if favicon.is_file():
            shutil.copy2(favicon, Path(spec["out"]) / "favicon.ico")
    if result is None:
        handler = built[-1]._handlers[0] if built and built[-1]._handlers else None
        if handler is not None and getattr(handler, "failed", False):  # the app itself raised: say what
            lines = str(handler.error).splitlines() or ["an error"]
            where = next((ln.strip().rstrip(":") for ln in lines[1:] if ln.strip().startswith("File ")), "")
            where = where.replace(repr(Path(spec["entry"]).name), repr(spec["name"]))
            print(f"{ERROR_TAG}{spec['name']} raised: {lines[0]}" + (f" ({where})" if where else ""), file=sys.stderr)
        return 1
    print(json.dumps({
        "pyodide_url": convert.PYODIDE_URL,
        "bokeh_cdn_js": list(CDN.js_files),
        "cdn_dist": convert.CDN_DIST,
    }))
    return 0


def convert(entry: Path, out: Path, requirements: list[str], hosted: SelfHosted | None,
            verbose: bool = False, name: str = "app/main.py") -> dict[str, Any]:
    """Convert ``entry`` into ``out`` in a child Python; returns what the child reports (URLs used)."""
    spec = {
        "entry": str(entry), "name": name, "out": str(out), "cwd": str(out), "requirements": requirements,
        "pyodide_url": hosted.pyodide_url if hosted else None,
        "panel_cdn_root": hosted.panel_cdn_root if hosted else None,
        "index_url": hosted.index_url if hosted else None,
    }
    env = dict(os.environ)
    env.pop("PANEL_CDN_ROOT", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    code = "import json, sys; from app.site import _convert_child; sys.exit(_convert_child(json.loads(sys.argv[1])))"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, env=env)
    if verbose and proc.stderr.strip():
        print(proc.stderr.rstrip(), file=sys.stderr)
    if proc.returncode != 0:
        tagged = [ln[len(ERROR_TAG):] for ln in proc.stderr.splitlines() if ln.startswith(ERROR_TAG)]
        lines = tagged or [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
        raise SiteError(f"converting {name} failed: {lines[-1] if lines else 'no output'}"
                        + ("" if verbose else " (--verbose shows the traceback)"))
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ============================================================================ the site
INDEX_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>diffviz</title>
<script>
// Open the dashboard, keeping the query (?dataset=...) and the fragment.
(function () {
  var fallback = __DEFAULT__;
  var search = window.location.search;
  if (fallback && !new URLSearchParams(search).has("dataset")) {
    search = (search ? search + "&" : "?") + "dataset=" + encodeURIComponent(fallback);
  }
  window.location.replace("app.html" + search + window.location.hash);
})();
</script>
</head>
<body>
<p>Opening <a href="app.html">the diffviz dashboard</a>…</p>
<noscript><p>The dashboard runs Python in your browser (Pyodide) and needs JavaScript.</p></noscript>
</body>
</html>
"""


def index_html(default_dataset: str | None) -> str:
    return INDEX_HTML.replace("__DEFAULT__", json.dumps(default_dataset))


def self_hosted_references(site: Path, hosted: SelfHosted) -> list[str]:
    """Paths under the self-hosted base that the built site asks for (page tags, worker, wheels)."""
    html = (site / f"{APP_NAME}.html").read_text(encoding="utf-8")
    worker = (site / f"{APP_NAME}.js").read_text(encoding="utf-8")
    urls = re.findall(r'(?:src|href)="([^"]+)"', html) + [hosted.pyodide_url] + parse_worker_requirements(worker)
    refs = []
    for url in urls:
        if url.startswith(hosted.base):
            ref = url[len(hosted.base):].split("?")[0]
            if ref not in refs:
                refs.append(ref)
    return refs


def external_references(site: Path, hosted: SelfHosted | None) -> list[str]:
    """Absolute URLs in the page's script/link tags that are not under the self-hosted base."""
    html = (site / f"{APP_NAME}.html").read_text(encoding="utf-8")
    urls = re.findall(r'<(?:script|link)\b[^>]*?(?:src|href)="(https?://[^"]+)"', html)
    base = hosted.base if hosted else None
    return sorted({u for u in urls if not (base and u.startswith(base))})


def build_site(out: str | os.PathLike, datasets: Sequence[str | os.PathLike] | None = None,
               self_hosted: str | None = None, *, verbose: bool = False,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build the site into ``out`` (replacing a previous build only once the new one is complete)."""
    plan = make_plan(out, datasets, self_hosted)
    if not ENTRY.is_file():
        raise SiteError(f"{ENTRY}: the dashboard's entry point is missing")
    out_path = plan.out
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.building-", dir=out_path.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide the site from a web server's user
    try:
        with tempfile.TemporaryDirectory(prefix="diffviz-site-") as tmp:
            work = Path(tmp)
            log("building the browser wheel (app, analysis, export)")
            wheel = build_wheel(work / "dist", work, log=log)
            requirements = [str(wheel), *wheel_requirements(wheel)]
            for name, path in plan.datasets:
                log(f"copying dataset {path} -> datasets/{name}/")
                shutil.copytree(path, staging / "datasets" / name, ignore=_not_plain)
            hosted = plan.self_hosted
            if hosted and hosted.folder:
                log(f"copying {hosted.folder} -> {VENDOR}/")
                shutil.copytree(hosted.folder, staging / VENDOR)
            entry = work / f"{APP_NAME}.py"  # app/main.py, named so that the outputs are app.html / app.js
            shutil.copy2(ENTRY, entry)
            log("converting app/main.py (pyodide-worker)")
            info = convert(entry, staging, requirements, hosted, verbose=verbose,
                           name=f"{ENTRY.parent.name}/{ENTRY.name}")
        if hosted:
            _point_bokeh_js(staging / f"{APP_NAME}.html", info["bokeh_cdn_js"], hosted)
            missing = [r for r in self_hosted_references(staging, hosted)
                       if hosted.folder and not (staging / VENDOR / r).is_file()]
            if missing:
                log(f"warning: the self-hosted folder lacks {len(missing)} file(s) the site asks for: {', '.join(missing)}")
            dropped = _drop_external_stylesheets(staging / f"{APP_NAME}.html", hosted)
            if dropped:
                log(f"note: left out the template's external stylesheet(s) {', '.join(dropped)}; the page uses system fonts")
            elsewhere = external_references(staging, hosted)
            if elsewhere:
                raise SiteError(f"--self-hosted: the page still links {', '.join(elsewhere)}; app/site.py must move it too")
        first = plan.datasets[0][0]
        default = None if any(n == DEFAULT_DATASET.name for n, _ in plan.datasets) else f"datasets/{first}"
        (staging / "index.html").write_text(index_html(default), encoding="utf-8")
        (staging / ".nojekyll").write_text("", encoding="utf-8")
        report = build_report(staging, wheel.name, plan, info, default)
        (staging / MARKER).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        _install(staging, out_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def _point_bokeh_js(html_path: Path, bokeh_js: list[str], hosted: SelfHosted) -> None:
    """Panel's PANEL_CDN_ROOT moves Panel's resources only; move Bokeh's JS (its CDN folder) to BASE/bokeh/."""
    bases = {url.rsplit("/", 1)[0] + "/" for url in bokeh_js}
    html = html_path.read_text(encoding="utf-8")
    for base in bases:
        html = html.replace(base, hosted.bokeh_base)
    html_path.write_text(html, encoding="utf-8")


def _drop_external_stylesheets(html_path: Path, hosted: SelfHosted) -> list[str]:
    """Remove ``<link rel="stylesheet">`` tags for URLs outside the base (the template's web font)."""
    html = html_path.read_text(encoding="utf-8")
    dropped: list[str] = []

    def drop(match: re.Match) -> str:
        url = match.group(1)
        if url.startswith(hosted.base):
            return match.group(0)
        dropped.append(url)
        return ""

    html = re.sub(r'<link\b(?=[^>]*\brel="stylesheet")[^>]*\bhref="(https?://[^"]+)"[^>]*>\n?', drop, html)
    html_path.write_text(html, encoding="utf-8")
    return sorted(set(dropped))


def build_report(site: Path, wheel_name: str, plan: Plan, info: dict[str, Any], default: str | None) -> dict[str, Any]:
    import diffviz
    from importlib import metadata as md

    worker = (site / f"{APP_NAME}.js").read_text(encoding="utf-8")
    return {
        "generator": f"diffviz {diffviz.__version__}",
        "panel": md.version("panel"), "bokeh": md.version("bokeh"), "holoviews": md.version("holoviews"),
        "pyodide_url": info["pyodide_url"],
        "self_hosted": plan.self_hosted.base if plan.self_hosted else None,
        "page_links_elsewhere": external_references(site, plan.self_hosted),
        "wheel": wheel_name,
        "requirements": parse_worker_requirements(worker),
        "datasets": [f"datasets/{name}" for name, _ in plan.datasets],
        "default_dataset": default or str(DEFAULT_DATASET.as_posix()),
    }


def _install(staging: Path, out: Path) -> None:
    """Swap the finished build into place; an existing build is removed only after that succeeds."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    try:
        staging.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ============================================================================ CLI
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
