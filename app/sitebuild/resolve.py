"""The site's whole install plan, resolved offline against Pyodide's lock file and pure-Python wheels.

What the worker installs is a list of requirements (app.js's ``const requirements``): wheel URLs or
paths (Panel's Bokeh and Panel wheels, ours as ``emfs:…``) and PEP 508 specs, plus micropip, which the
worker loads first. micropip takes a package from Pyodide's distribution (``pyodide-lock.json``) when
the lock has a version that fits, and otherwise fetches a pure-Python wheel from the package index;
Pyodide cannot load a compiled wheel that it did not build. This module follows that rule
transitively: the lock's ``depends`` for lock packages, ``Requires-Dist`` (markers evaluated for
Pyodide: emscripten, wasm32, the lock's Python) for wheels. Offline, the wheels micropip would fetch
are stood in for by the distributions installed here (same name, their version; the local pins make
it the same one for the pinned packages). Anything that neither source can satisfy is reported.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import metadata as md
from pathlib import Path
from typing import Callable, Iterable

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from .base import SiteError

LOCK_NAME = "pyodide-lock.json"


@dataclass(frozen=True)
class Wheel:
    """A wheel's name, version and requirements, wherever they were read from."""

    name: str
    version: str
    requires: tuple[str, ...] = ()
    requires_python: str | None = None
    pure: bool = True
    origin: str = ""                  # where its metadata came from, for messages


@dataclass(frozen=True)
class Resolved:
    name: str
    version: str
    source: str                       # "pyodide" (from the lock) or "wheel" (a pure-Python wheel)
    file: str | None                  # the lock's file name, or the wheel's origin
    needed_by: str


@dataclass(frozen=True)
class Missing:
    requirement: str
    needed_by: str
    reason: str

    def __str__(self) -> str:
        return f"{self.requirement} (needed by {self.needed_by}): {self.reason}"


@dataclass
class Resolution:
    resolved: dict[str, Resolved] = field(default_factory=dict)
    missing: list[Missing] = field(default_factory=list)

    def names(self) -> list[str]:
        return sorted(r.name for r in self.resolved.values())


def load_lock(path: Path) -> dict:
    try:
        lock = json.loads(Path(path).read_text(encoding="utf-8"))
        lock["packages"], lock["info"]["python"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SiteError(f"{path}: not a readable Pyodide lock file ({exc.__class__.__name__}: {exc})") from None
    return lock


def pyodide_environment(lock: dict) -> dict[str, str]:
    """PEP 508 marker values inside the Pyodide that ``lock`` describes."""
    python = lock["info"]["python"]
    platform = lock["info"].get("platform", "emscripten")
    release = ".".join(re.findall(r"\d+", platform)[:3])
    return {
        "implementation_name": "cpython", "implementation_version": python,
        "os_name": "posix", "platform_machine": "wasm32", "platform_python_implementation": "CPython",
        "platform_release": release, "platform_system": "Emscripten", "platform_version": "",
        "python_full_version": python, "python_version": ".".join(python.split(".")[:2]),
        "sys_platform": "emscripten", "extra": "",
    }


def is_pure(dist: md.Distribution) -> bool:
    """Whether an installed distribution came from a pure-Python wheel (every tag ``…-none-any``)."""
    text = dist.read_text("WHEEL") or ""
    tags = re.findall(r"(?m)^Tag:\s*(\S+)", text)
    return bool(re.search(r"(?m)^Root-Is-Purelib:\s*true", text)) and bool(tags) and all(t.endswith("-none-any") for t in tags)


def installed_wheel(name: str) -> Wheel | None:
    """The wheel micropip would fetch for ``name``, stood in for by the distribution installed here."""
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        return None
    return Wheel(name=dist.metadata["Name"], version=dist.version, requires=tuple(dist.requires or ()),
                 requires_python=dist.metadata.get("Requires-Python"), pure=is_pure(dist),
                 origin=f"{dist.metadata['Name']} {dist.version} installed here")


def wheel_from_file(path: Path) -> Wheel:
    """A wheel file's own metadata."""
    import zipfile
    from email.parser import Parser

    with zipfile.ZipFile(path) as zf:
        meta = next(n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        wheel_txt = zf.read(meta.rsplit("/", 1)[0] + "/WHEEL").decode("utf-8")
        msg = Parser().parsestr(zf.read(meta).decode("utf-8"))
    tags = re.findall(r"(?m)^Tag:\s*(\S+)", wheel_txt)
    return Wheel(name=msg["Name"], version=msg["Version"], requires=tuple(msg.get_all("Requires-Dist") or ()),
                 requires_python=msg.get("Requires-Python"), pure=bool(tags) and all(t.endswith("-none-any") for t in tags),
                 origin=path.name)


def wheel_file_name(requirement: str) -> str | None:
    """The file name when ``requirement`` is a wheel URL or path (``emfs:…``, ``./vendor/…``, ``https://…``)."""
    base = requirement.split("?")[0].rsplit("/", 1)[-1]
    return base if base.endswith(".whl") else None


def _name_version(wheel_name: str) -> tuple[str, str]:
    parts = wheel_name[:-4].split("-")
    return parts[0], parts[1] if len(parts) > 1 else ""


def resolve(requirements: Iterable[str], lock: dict, *, wheel_files: dict[str, Wheel] | None = None,
            find_wheel: Callable[[str], Wheel | None] = installed_wheel, preloaded: Iterable[str] = ("micropip",),
            no_deps: Callable[[str], bool] = lambda req: req.startswith("emfs:")) -> Resolution:
    """Resolve the worker's ``requirements`` (and ``preloaded``, loaded from the lock) transitively.

    ``wheel_files`` maps a wheel's file name to its metadata (our wheel, Panel's); a wheel not in it is
    looked up by name and version with ``find_wheel``. ``no_deps`` marks the wheels installed with
    ``deps=False`` (ours: its requirements are listed beside it).
    """
    env = pyodide_environment(lock)
    python = Version(env["python_full_version"])
    by_key = {}
    for key, entry in lock["packages"].items():
        by_key[canonicalize_name(key)] = entry
        by_key.setdefault(canonicalize_name(entry.get("name", key)), entry)
    wheel_files = wheel_files or {}
    out = Resolution()
    todo: list[tuple[Requirement, frozenset[str], str]] = []

    def follow(wheel: Wheel, extras: Iterable[str]) -> None:
        for line in wheel.requires:
            try:
                todo.append((Requirement(line), frozenset({"", *extras}), wheel.name))
            except InvalidRequirement:
                out.missing.append(Missing(line, wheel.name, "not a valid requirement"))

    def take_wheel(wheel: Wheel, spec: SpecifierSet, why: str, extras: Iterable[str], needed_by: str,
                   follow_deps: bool = True) -> str | None:
        """Accept ``wheel`` for a requirement, or say why not."""
        if not wheel.pure:
            return f"only a compiled wheel ({wheel.origin}), which Pyodide cannot load{why}"
        try:
            if not spec.contains(wheel.version, prereleases=True):
                return f"the wheel is {wheel.version}, which does not satisfy {spec}{why}"
        except InvalidVersion:
            return f"the wheel's version {wheel.version!r} is not a valid version"
        if wheel.requires_python and not SpecifierSet(wheel.requires_python).contains(python, prereleases=True):
            return f"{wheel.name} {wheel.version} requires Python {wheel.requires_python}; Pyodide has {python}"
        out.resolved[canonicalize_name(wheel.name)] = Resolved(wheel.name, wheel.version, "wheel", wheel.origin, needed_by)
        if follow_deps:
            follow(wheel, extras)
        return None

    for name in preloaded:
        todo.append((Requirement(name), frozenset({""}), "the worker (loadPackage)"))
    for text in requirements:
        file_name = wheel_file_name(text)
        if file_name is None:
            try:
                todo.append((Requirement(text), frozenset({""}), "the site"))
            except InvalidRequirement:
                out.missing.append(Missing(text, "the site", "not a valid requirement"))
            continue
        name, version = _name_version(file_name)
        wheel = wheel_files.get(file_name)
        if wheel is None:
            found = find_wheel(name)
            wheel = found if found is not None and found.version == version else None
        if wheel is None:
            out.missing.append(Missing(file_name, "the site", f"no metadata for {name} {version} here"))
            continue
        problem = take_wheel(wheel, SpecifierSet(f"=={wheel.version}"), "", (), "the site", not no_deps(text))
        if problem:
            out.missing.append(Missing(file_name, "the site", problem))

    while todo:
        req, extras, needed_by = todo.pop(0)
        if req.marker is not None and not any(req.marker.evaluate({**env, "extra": e}) for e in extras):
            continue
        key = canonicalize_name(req.name)
        done = out.resolved.get(key)
        if done is not None:
            if not req.specifier.contains(done.version, prereleases=True):
                out.missing.append(Missing(str(req), needed_by, f"the plan has {done.name} {done.version} "
                                           f"(from {done.needed_by}), which does not satisfy it"))
            continue
        entry = by_key.get(key)
        why = ""
        if entry is not None:
            if req.specifier.contains(entry["version"], prereleases=True):
                out.resolved[key] = Resolved(entry.get("name", req.name), entry["version"], "pyodide",
                                             entry.get("file_name"), needed_by)
                for dep in entry.get("depends", []):
                    todo.append((Requirement(dep), frozenset({""}), entry.get("name", req.name)))
                continue
            why = f" (Pyodide's lock has {entry['version']})"
        wheel = find_wheel(req.name)
        if wheel is None:
            reason = (f"Pyodide's lock has {entry['version']}, which does not satisfy it, and there is no pure-Python wheel"
                      if entry is not None else "in neither Pyodide's lock nor the pure-Python wheels")
            out.missing.append(Missing(str(req), needed_by, reason))
            continue
        problem = take_wheel(wheel, req.specifier, why, req.extras, needed_by)
        if problem:
            out.missing.append(Missing(str(req), needed_by, problem))
    return out
