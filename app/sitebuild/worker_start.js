// diffviz's start of the Pyodide worker, in place of the importScripts line and startApplication of
// Panel's pyodide_worker.js template; Panel's sendPatch and its message protocol (self.onmessage) follow
// verbatim (app/sitebuild/worker.py joins them). Jinja fills Panel's variables in double braces;
// worker.py fills the two placeholders in capitals with JSON values (null when not self-hosted).

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

