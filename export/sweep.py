"""A sweep: many runs over a grid of settings in one folder, indexed by ``sweep.json``.

    OUT/
      sweep.json      the index: template, grid axes, shared settings, one entry per run (grid order)
      <name>/         one run, exactly as ``diffviz generate`` writes it

    doc = read_index("sweeps/colours")        # a folder, sweep.json itself, a URL, or a reader Source
    doc["grid"], doc["runs"][0]["params"], doc["runs"][0]["status"]
    run = reader.open_run(run_location("sweeps/colours", doc["runs"][0]["name"]))

:func:`check_index` bounds everything before anyone looks at it (counts, lengths, names that are safe
folder names, thumbnails inside their run) and raises :class:`DatasetError` with one line.
:func:`write_index` writes atomically (temp file beside, then ``os.replace``). :func:`headline` reads
the small summary of a finished run (final latent norm, cross-attention share per content word) that
the index carries so a grid of runs can be shown without opening each one. Plain Python + numpy.
"""
from __future__ import annotations

import json
import math
import os
import re
import secrets
import string
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import quote, urljoin, urlsplit

from . import bounded, contract
from .contract import DatasetError, shown

SWEEP_FILE = "sweep.json"
SWEEP_VERSION = 1
KNOWN_SWEEP_VERSIONS = frozenset({SWEEP_VERSION})

STATUS_DONE, STATUS_PENDING, STATUS_FAILED = "done", "pending", "failed"
STATUSES = (STATUS_DONE, STATUS_PENDING, STATUS_FAILED)

#: caps checked before any other work (a sweep.json is untrusted input like any run). They are chosen so that the
#: whole chain (read_index, the dashboard server and its Sweep view, build-site) holds the largest index they
#: allow within 10 s and 1 GB (CONTRACT.md, "sweep.json caps").
MAX_RUNS = 10_000
MAX_AXES = 16
MAX_AXIS_VALUES = 10_000
MAX_INDEX_BYTES = 32 * contract.MiB
#: JSON values (commas and opening brackets) counted in the text before it is parsed: a parsed value costs
#: 50-100 bytes where its text may cost two, so the byte cap alone would allow a parse of several GB
MAX_INDEX_ITEMS = 1_000_000
MAX_RUN_NAME_CHARS = 120
MAX_ERROR_CHARS = 1_000
MAX_VALUE_CHARS = 200
MAX_BASE_KEYS = 64
#: a list among the shared settings (``--layers`` patterns)
MAX_BASE_LIST = 1024
#: words with a share in one run's headline (its largest shares are kept), and distinct words over all runs
MAX_HEADLINE_WORDS = 64
MAX_SWEEP_WORDS = 1024
#: an integer anywhere in the index (seeds are below 2**63); a longer one is refused before any float() sees it
MAX_INT = 2**64
#: sweep.json nests: doc > runs > run > headline > word_share, base > a list value
MAX_INDEX_DEPTH = 8

#: a run's folder name: no leading dot (temp folders and hidden files start with one) or dash
RUN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,%d}$" % (MAX_RUN_NAME_CHARS - 1))
#: an axis name: a placeholder name from --set, or a GenerateConfig field (seed, cfg_scale, num_steps)
AXIS_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")

_TOP_KEYS = {"sweep_version", "generator", "template", "grid", "base", "runs"}
_RUN_KEYS = {"name", "params", "prompt", "status", "error", "headline", "thumbnail"}


# ============================================================================ checking
def _fail(where: str, message: str) -> DatasetError:
    return DatasetError(f"{SWEEP_FILE}: {where}: {message}")


def _is_number(value: Any) -> bool:
    """A finite number: a float that is finite, or an int of at most :data:`MAX_INT` in size (``math.isfinite``
    raises OverflowError on an int past a float's range, so ints are compared, never converted)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -MAX_INT < value < MAX_INT
    return isinstance(value, float) and math.isfinite(value)


def _shown(value: Any, limit: int = 40) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and not -MAX_INT < value < MAX_INT:
        return f"an integer of {len(str(abs(value)))} digits"
    return shown(value, limit)


def value_label(value: Any) -> str:
    """An axis value as people read it (and as the dashboard labels rows, columns and plot ticks): ``7.5``, ``3``,
    ``red``. Two values of one axis must not read the same (``1`` and ``1.0``, ``"1"`` and ``1``)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return f"{value:g}" if "e" not in f"{value:g}" else str(value)
    return str(value)


def _check_value(where: str, value: Any) -> None:
    """An axis value: a short string or a finite number (never a bool, list or object)."""
    if isinstance(value, str):
        if len(value) > MAX_VALUE_CHARS:
            raise _fail(where, f"a value of {len(value)} characters, over the cap of {MAX_VALUE_CHARS}")
    elif not _is_number(value):
        raise _fail(where, f"must be a string or a finite number, got {_shown(value)}")


def _check_text(where: str, value: Any, cap: int, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise _fail(where, f"must be a string, got {type(value).__name__}")
    if len(value) > cap:
        raise _fail(where, f"{len(value)} characters, over the cap of {cap}")


def _check_setting(where: str, value: Any) -> None:
    """A shared setting: null, a bool, a finite number, a string, or a short list of those."""
    if isinstance(value, list):
        if len(value) > MAX_BASE_LIST:
            raise _fail(where, f"a list of {len(value)} values, over the cap of {MAX_BASE_LIST}")
        for k, item in enumerate(value):
            if isinstance(item, (list, dict)):
                raise _fail(f"{where}[{k}]", "must be a plain value, not a list or object")
            _check_setting(f"{where}[{k}]", item)
    elif isinstance(value, str):
        _check_text(where, value, contract.MAX_STRING_CHARS)
    elif not (value is None or isinstance(value, bool) or _is_number(value)):
        raise _fail(where, f"must be null, a bool, a finite number, a string or a list of them, got {_shown(value)}")


def check_run_name(name: Any, where: str = "name") -> str:
    """``name`` if it is a safe folder name for a run inside OUT, else DatasetError (one line)."""
    if not isinstance(name, str) or not RUN_NAME.match(name) or name in (SWEEP_FILE, ".", ".."):
        raise _fail(where, f"{_shown(name, 60)} is not a run folder name ([A-Za-z0-9_.-], not starting with "
                           f"'.' or '-', at most {MAX_RUN_NAME_CHARS} characters)")
    return name


def _check_grid(grid: Any) -> list[str]:
    if not isinstance(grid, list) or not 1 <= len(grid) <= MAX_AXES:
        raise _fail("grid", f"must be a list of 1 to {MAX_AXES} axes")
    names: list[str] = []
    size = 1
    for i, axis in enumerate(grid):
        where = f"grid[{i}]"
        if not isinstance(axis, dict) or set(axis) != {"name", "values"}:
            raise _fail(where, "must be an object with exactly 'name' and 'values'")
        name, values = axis["name"], axis["values"]
        if not isinstance(name, str) or not AXIS_NAME.match(name):
            raise _fail(f"{where}.name", f"{_shown(name, 60)} is not an axis name ([A-Za-z_][A-Za-z0-9_]*)")
        if name in names:
            raise _fail(f"{where}.name", f"axis {name!r} appears twice")
        if not isinstance(values, list) or not 1 <= len(values) <= MAX_AXIS_VALUES:
            raise _fail(f"{where}.values", f"must be a list of 1 to {MAX_AXIS_VALUES} values")
        labels: dict[str, Any] = {}
        for j, value in enumerate(values):
            _check_value(f"{where}.values[{j}]", value)
            label = value_label(value)
            if label in labels:
                same = "repeats a value" if json.dumps(labels[label]) == json.dumps(value) else \
                    f"has two values that read the same ({_shown(labels[label])} and {_shown(value)})"
                raise _fail(f"{where}.values[{j}]", f"axis {name!r} {same}")
            labels[label] = value
        names.append(name)
        size *= len(values)
        if size > MAX_RUNS:
            raise _fail("grid", f"the grid has more than {MAX_RUNS} runs")
    return names


def _check_headline(where: str, headline: Any, words: set[str]) -> None:
    if headline is None:
        return
    if not isinstance(headline, dict) or not set(headline) <= {"final_latent_norm", "word_share"}:
        raise _fail(where, "must be null or an object with final_latent_norm and word_share")
    norm = headline.get("final_latent_norm")
    if norm is not None and not (_is_number(norm) and norm >= 0):
        raise _fail(f"{where}.final_latent_norm", f"must be a finite number >= 0, got {_shown(norm)}")
    share = headline.get("word_share")
    if share is None:
        return
    if not isinstance(share, dict) or len(share) > MAX_HEADLINE_WORDS:
        raise _fail(f"{where}.word_share", f"must be an object of at most {MAX_HEADLINE_WORDS} words")
    for word, value in share.items():
        if len(word) > MAX_VALUE_CHARS:
            raise _fail(f"{where}.word_share", f"a word of {len(word)} characters, over the cap of {MAX_VALUE_CHARS}")
        if not (_is_number(value) and 0 <= value <= 1 + contract.SUM_TOLERANCE):
            raise _fail(f"{where}.word_share[{shown(word, 40)}]", f"must be a share in [0, 1], got {_shown(value)}")
        if word not in words:
            if len(words) >= MAX_SWEEP_WORDS:
                raise _fail(f"{where}.word_share[{shown(word, 40)}]",
                            f"the runs' headlines name more than {MAX_SWEEP_WORDS} distinct words")
            words.add(word)


def _check_run(i: int, run: Any, axes: list[str], allowed: list[set[str]], words: set[str]) -> str:
    where = f"runs[{i}]"
    if not isinstance(run, dict):
        raise _fail(where, "must be an object")
    missing = {"name", "params", "prompt", "status"} - set(run)
    extra = set(run) - _RUN_KEYS
    if missing or extra:
        what = f"missing {', '.join(sorted(missing))}" if missing else f"unknown keys {', '.join(sorted(extra))}"
        raise _fail(where, what)
    name = check_run_name(run["name"], f"{where}.name")
    params = run["params"]
    if not isinstance(params, dict) or list(params) != axes:
        raise _fail(f"{where}.params", f"must hold exactly the grid's axes in order ({', '.join(axes)})")
    for axis, seen, value in zip(axes, allowed, params.values()):
        _check_value(f"{where}.params.{axis}", value)
        if json.dumps(value) not in seen:
            raise _fail(f"{where}.params.{axis}", f"{_shown(value)} is not one of the axis's values")
    _check_text(f"{where}.prompt", run["prompt"], contract.MAX_PROMPT_CHARS)
    if not isinstance(run["status"], str) or run["status"] not in STATUSES:
        raise _fail(f"{where}.status", f"must be one of {', '.join(STATUSES)}, got {_shown(run['status'])}")
    error = run.get("error")
    _check_text(f"{where}.error", error, MAX_ERROR_CHARS, optional=True)
    if error is not None and ("\n" in error or "\r" in error):
        raise _fail(f"{where}.error", "must be one line")
    _check_headline(f"{where}.headline", run.get("headline"), words)
    thumb = run.get("thumbnail")
    if thumb is not None:
        try:
            contract.check_relative_path(thumb)
        except DatasetError as exc:
            raise _fail(f"{where}.thumbnail", str(exc)) from None
        if not thumb.startswith(name + "/"):
            raise _fail(f"{where}.thumbnail", f"{shown(thumb, 60)} is not inside the run's folder {name}/")
    return name


def template_fields(template: str, axes: list[str]) -> list[str]:
    """The ``{NAME}`` fields of the prompt template (each an axis; ``{{`` and ``}}`` are literal braces)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise _fail("template", f"not a prompt template ({exc})") from None
    fields: list[str] = []
    for _literal, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in axes or spec or conversion:
            raise _fail("template", f"{{{shown(field, 40)[1:-1]}}} is not one of the grid's axes")
        if field not in fields:
            fields.append(field)
    return fields


def fill_template(template: str, values: Mapping[str, Any]) -> str:
    """The prompt of a run: the template with each field replaced by its value (as ``str.format`` does)."""
    return template.format_map(dict(values))


def check_index(doc: Any) -> dict[str, Any]:
    """``doc`` if it is a sweep index this diffviz can read, else :class:`DatasetError` (one line).

    The runs are the whole grid, in grid order (``itertools.product`` over the axes, last fastest):
    run ``i``'s params are the grid's ``i``-th combination, and every name is unique.
    """
    if not isinstance(doc, dict):
        raise DatasetError(f"{SWEEP_FILE}: must be a JSON object")
    version = doc.get("sweep_version")
    if isinstance(version, bool) or not isinstance(version, int) or version not in KNOWN_SWEEP_VERSIONS:
        raise DatasetError(f"{SWEEP_FILE}: sweep_version {_shown(version, 20)} is not known to this diffviz "
                           f"(it reads {', '.join(map(str, sorted(KNOWN_SWEEP_VERSIONS)))})")
    extra = set(doc) - _TOP_KEYS
    missing = _TOP_KEYS - set(doc) - {"generator"}
    if missing or extra:
        what = f"missing {', '.join(sorted(missing))}" if missing else f"unknown keys {', '.join(sorted(extra))}"
        raise DatasetError(f"{SWEEP_FILE}: {what}")
    generator = doc.get("generator")
    if generator is not None:
        if not isinstance(generator, dict) or not set(generator) <= {"name", "version"}:
            raise _fail("generator", "must be an object with name and version")
        for key, value in generator.items():
            _check_text(f"generator.{key}", value, MAX_VALUE_CHARS)
    _check_text("template", doc["template"], contract.MAX_STRING_CHARS)
    axes = _check_grid(doc["grid"])
    fields = template_fields(doc["template"], axes)
    base = doc["base"]
    if not isinstance(base, dict) or len(base) > MAX_BASE_KEYS:
        raise _fail("base", f"must be an object of at most {MAX_BASE_KEYS} settings")
    for key, value in base.items():
        _check_setting(f"base.{shown(key, 40) if not AXIS_NAME.match(key) else key}", value)
    runs = doc["runs"]
    values = [axis["values"] for axis in doc["grid"]]
    expected = math.prod(len(v) for v in values)
    if not isinstance(runs, list) or len(runs) != expected:
        raise _fail("runs", f"must list every run of the grid ({expected}), got "
                            f"{len(runs) if isinstance(runs, list) else type(runs).__name__}")
    allowed = [{json.dumps(v) for v in vs} for vs in values]
    names: set[str] = set()
    words: set[str] = set()
    for i, run in enumerate(runs):
        name = _check_run(i, run, axes, allowed, words)
        if name in names:
            raise _fail(f"runs[{i}].name", f"{name!r} appears twice")
        names.add(name)
        # grid order: decode i in mixed radix, last axis fastest
        rest = i
        for axis, vs in zip(reversed(axes), reversed(values)):
            rest, k = divmod(rest, len(vs))
            if json.dumps(run["params"][axis]) != json.dumps(vs[k]):
                raise _fail(f"runs[{i}].params.{axis}", "runs are not in grid order (last axis fastest)")
        if fill_template(doc["template"], {k: run["params"][k] for k in fields}) != run["prompt"]:
            raise _fail(f"runs[{i}].prompt", f"{shown(run['prompt'], 60)} is not the template filled with the run's params")
    return doc


# ============================================================================ reading
def _sweep_source(source: Any) -> Any:
    """A reader Source whose root holds sweep.json: a folder, sweep.json's own path, a URL, or a Source."""
    from . import reader

    if isinstance(source, (str, os.PathLike)) and not _is_url(source):
        path = Path(source)
        if path.name == SWEEP_FILE and path.is_file():
            path = path.parent
        return reader.FolderSource(path)
    if isinstance(source, str) and source.rstrip("/").endswith("/" + SWEEP_FILE):
        source = source.rstrip("/")[: -len(SWEEP_FILE)]
    return reader.as_source(source)


def _is_url(source: Any) -> bool:
    from . import reader

    if not isinstance(source, str):
        return False
    scheme = urlsplit(source).scheme.lower()
    return scheme in ("http", "https", "file") or (reader.in_pyodide() and len(scheme) != 1)


def parse_index(data: bytes | str) -> dict[str, Any]:
    """sweep.json's bytes, parsed within the caps and checked (:func:`check_index`)."""
    if len(data) > MAX_INDEX_BYTES:
        raise DatasetError(f"{SWEEP_FILE}: {len(data)} bytes, over the cap of {MAX_INDEX_BYTES}")
    return check_index(bounded.parse_json(SWEEP_FILE, data, depth=MAX_INDEX_DEPTH, max_items=MAX_INDEX_ITEMS))


def read_index(source: Any) -> dict[str, Any]:
    """The checked index of a sweep (see the module docstring for what ``source`` may be)."""
    src = _sweep_source(source)
    return parse_index(src.read_bytes(SWEEP_FILE, MAX_INDEX_BYTES))


def is_sweep(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding a sweep.json (a cheap test, before :func:`read_index`)."""
    p = Path(path)
    return p.is_dir() and (p / SWEEP_FILE).is_file()


def run_location(source: Any, name: str) -> Any:
    """Where run ``name`` of a sweep lives, in a form ``reader.open_run`` takes (a folder path or a URL)."""
    check_run_name(name)
    src = _sweep_source(source)
    if hasattr(src, "root"):
        return str(Path(src.root) / name)
    if hasattr(src, "base"):
        return urljoin(src.base, quote(name) + "/")
    raise DatasetError(f"cannot locate run {name!r} of a sweep read from {type(src).__name__}")


def by_status(doc: Mapping[str, Any], status: str) -> list[dict[str, Any]]:
    return [run for run in doc["runs"] if run["status"] == status]


#: the swept settings that a run's own metadata.json records under ``run`` (the --set axes are in its prompt)
RUN_FIELDS = ("seed", "cfg_scale", "num_steps")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def disagreement(entry: Mapping[str, Any], meta: Any) -> str | None:
    """How index entry ``entry`` and its run's own ``metadata.json`` (``meta``) disagree, or None: the prompt, the
    seed and every swept setting the run records. A swapped folder, or a run another job wrote over, is caught
    here before its cell is labelled with the index's values."""
    run = meta.get("run") if isinstance(meta, dict) else None
    if not isinstance(run, dict):
        return "its metadata.json has no run settings"
    if run.get("prompt") != entry["prompt"]:
        return f"sweep.json says prompt {shown(entry['prompt'], 60)}, its metadata.json {shown(run.get('prompt'), 60)}"
    for axis, value in entry["params"].items():
        if axis in RUN_FIELDS and not _same(run.get(axis), value):
            return f"sweep.json says {axis} {value_label(value)}, its metadata.json {_shown(run.get(axis))}"
    return None


# ============================================================================ writing
def index_document(template: str, grid: list[dict[str, Any]], base: Mapping[str, Any],
                   runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A checked index from its parts (``generator`` filled in)."""
    return check_index({"sweep_version": SWEEP_VERSION, "generator": contract.generator(), "template": template,
                        "grid": grid, "base": dict(base), "runs": runs})


TEMP_PREFIX = f".{SWEEP_FILE}.tmp-"


def index_text(doc: Mapping[str, Any]) -> str:
    """The index as written: the settings indented, then one run per line (readable, diffable, and about a
    third of the bytes of an indented run list)."""
    head = json.dumps({k: v for k, v in doc.items() if k != "runs"}, indent=1, allow_nan=False)
    runs = ",\n".join(json.dumps(run, allow_nan=False) for run in doc["runs"])
    return f'{head[:-2]},\n "runs": [\n{runs}\n ]\n}}\n'


def write_index(out: str | os.PathLike, doc: Mapping[str, Any]) -> Path:
    """Check ``doc`` and write it as ``out/sweep.json`` atomically: a temp file beside it, flushed to disk, then
    ``os.replace`` and the folder flushed. A reader never sees half a file; a failed or killed write leaves the
    old index as it was (and at worst a temp file, which :func:`tidy_temps` removes). ``OSError`` (a full disk)
    and ``DatasetError`` (over the caps) are raised after the temp file is removed."""
    check_index(doc)
    data = index_text(doc).encode("utf-8")
    if len(data) > MAX_INDEX_BYTES:
        raise DatasetError(f"{SWEEP_FILE}: {len(data)} bytes, over the cap of {MAX_INDEX_BYTES}")
    folder = Path(out)
    target = folder / SWEEP_FILE
    tmp = folder / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(folder)
    return target


def _fsync_folder(folder: Path) -> None:
    """Flush the rename itself to disk (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tidy_temps(out: str | os.PathLike) -> list[str]:
    """Remove the temp files killed index writes left in ``out`` (only plain files named like ours); their names.
    Call it only while holding the sweep's lock: then no other writer's temp file can be in flight."""
    removed = []
    try:
        entries = list(os.scandir(out))
    except OSError:
        return removed
    for entry in entries:
        if entry.name.startswith(TEMP_PREFIX) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
                removed.append(entry.name)
            except OSError:
                pass
    return removed


# ============================================================================ headline
def headline(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A finished run's summary for the index: ``final_latent_norm`` (metrics' latent norm at the last step)
    and ``word_share`` (each content word's share of the last step's cross attention, mean over layers: the
    sum of its tokens' ``token_dominance.share``), at most :data:`MAX_HEADLINE_WORDS` of them (the largest
    shares, in prompt order). ``word_share`` is {} when cross attention was off."""
    from .words import words

    meta = bounded.read_json(run_dir, contract.METADATA_FILE)
    metrics = bounded.read_json(run_dir, contract.METRICS_FILE)
    norms = metrics.get("latent_norm") if isinstance(metrics, dict) else None
    norm = float(norms[-1]) if isinstance(norms, list) and norms and _is_number(norms[-1]) else None
    share: dict[str, float] = {}
    dominance = metrics.get("token_dominance") if isinstance(metrics, dict) else None
    last = dominance.get("share", [])[-1:] if isinstance(dominance, dict) else []
    if last and isinstance(last[0], list):
        shares = last[0]
        for word in words(meta.get("tokens") or [], meta.get("words") or []):
            if word.content and all(0 <= r < len(shares) for r in word.rows):
                share[word.label] = round(share.get(word.label, 0.0) + sum(float(shares[r]) for r in word.rows), 6)
    if len(share) > MAX_HEADLINE_WORDS:
        kept = set(sorted(share, key=lambda w: -share[w])[:MAX_HEADLINE_WORDS])
        share = {w: v for w, v in share.items() if w in kept}
    return {"final_latent_norm": None if norm is None else round(norm, 6), "word_share": share}
