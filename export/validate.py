"""``diffviz validate DIR [--strict]``: check a run folder against the dataset contract.

Problems (the run is invalid; exit 1):
  * ``metadata.json``, ``metrics.json`` or ``latent_pca.json`` missing, not JSON, or failing
    ``export/schema.json``; ``schema_version`` unknown;
  * a manifest path that is absolute, has ``..``, a backslash or a URL, or that resolves outside
    the folder (symlink); a symlink anywhere in the folder that points outside it;
  * a listed file that is missing, whose size differs from ``bytes``, whose sha256 differs, or
    (``.bin``) whose ``bytes`` is not ``prod(shape) * 2`` or whose dtype is not ``<f2``;
  * non-finite values (NaN/Inf) or negative values in a map or in the latents file;
  * cross maps whose sum over tokens exceeds ``1 + tol`` anywhere, or (only where
    ``attention.cross.full_distribution`` is true) differs from 1 by more than ``tol``; in a
    per-head run each head's map on its own;
    self maps whose rows do not sum to 1 within ``tol`` (``tol`` = ``contract.SUM_TOLERANCE``);
  * a PNG that does not decode, or decodes to a size other than its manifest ``shape``;
  * an incomplete or inconsistent run: a map or preview missing for some layer/step, shapes that
    differ from ``metadata.layers``, token counts, step counts and metric lengths that disagree;
  * schema 1: grids that are not square. Schema 2: ``self_shape`` other than ``[sh*sw, sh*sw]`` of
    ``self_grid``, a per-head ``cross_shape`` whose heads differ from ``layers[].heads``, a token set
    past ``context_length``, ``family.tokens_from`` naming no listed tokenizer, ``images/final.png``
    missing or not ``[run.height, run.width, 3]``.

Warnings (reported; problems only under ``--strict``):
  * files in the folder that the manifest does not list (``metadata.json`` and
    ``validation.json`` excepted) and manifest entries that are not part of the layout;
  * ``validation.json`` missing, unreadable, or recording problems;
  * a map stored larger than its layer's native grid (either side) or the requested resolution
    (long side) (pooled up).

Each file gets at most one problem line (the first check it fails), so one corruption gives one line.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from . import contract
from .contract import DatasetError

STRICT_RULE = (
    "--strict also fails on warnings: unlisted files, manifest entries outside the layout, "
    "a missing or failing validation.json, maps stored above their native or requested resolution"
)
MAX_SCHEMA_LINES = 20


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    files_checked: int = 0
    #: The checked run's schema_version (None when it could not be read).
    schema_version: int | None = None

    @property
    def valid(self) -> bool:
        return not self.problems


def report_json(report: Report) -> dict[str, Any]:
    """The content of ``validation.json``."""
    from .writer import GENERATOR

    return {
        "validator": f"{GENERATOR['name']} {GENERATOR['version']}",
        "schema_version": report.schema_version if report.schema_version is not None else contract.SCHEMA_VERSION,
        "valid": report.valid,
        "problems": list(report.problems),
        "warnings": list(report.warnings),
        "files_checked": report.files_checked,
        "sum_tolerance": contract.SUM_TOLERANCE,
        "strict_rule": STRICT_RULE,
    }


@lru_cache(maxsize=1)
def _schema() -> dict[str, Any]:
    return json.loads((Path(__file__).with_name("schema.json")).read_text(encoding="utf-8"))


def schema_errors(document: Any, part: str) -> list[str]:
    """Lines describing where ``document`` breaks ``schema.json``'s ``$defs/<part>`` (metadata, metrics, latent_pca)."""
    import jsonschema

    schema = _schema()
    validator = jsonschema.Draft202012Validator({"$ref": f"#/$defs/{part}", "$defs": schema["$defs"]})
    lines = []
    for err in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path))):
        where = "/".join(map(str, err.absolute_path)) or "(top level)"
        message = err.message if len(err.message) <= 160 else err.message[:157] + "..."
        lines.append(f"{where}: {message}")
    return lines


def _load_json(root: Path, name: str) -> Any:
    try:
        text = (root / name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{name}: missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{name}: unreadable: {exc}") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as exc:
        raise DatasetError(f"{name}: not valid JSON: {exc}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


class _Checker:
    def __init__(self, root: Path, expect_validation_file: bool):
        self.root = root
        self.expect_validation_file = expect_validation_file
        self.report = Report()

    def problem(self, line: str) -> None:
        self.report.problems.append(" ".join(line.split()))

    def warning(self, line: str) -> None:
        self.report.warnings.append(" ".join(line.split()))

    # ------------------------------------------------------------------ top level
    def run(self) -> Report:
        try:
            meta = _load_json(self.root, contract.METADATA_FILE)
            if not isinstance(meta, dict):
                raise DatasetError(f"{contract.METADATA_FILE}: not a JSON object")
            self.version = self.report.schema_version = contract.known_schema_version(meta)
        except DatasetError as exc:
            self.problem(str(exc))
            return self.report
        errors = schema_errors(meta, "metadata")
        if errors:
            for line in errors[:MAX_SCHEMA_LINES]:
                self.problem(f"{contract.METADATA_FILE}: {line}")
            if len(errors) > MAX_SCHEMA_LINES:
                self.problem(f"{contract.METADATA_FILE}: {len(errors) - MAX_SCHEMA_LINES} more schema errors")
            return self.report
        self.meta = meta
        self.check_layout_consistency()
        listed = self.check_files()
        self.check_completeness(listed)
        self.check_json_files(listed)
        self.check_unlisted(listed)
        self.check_symlinks()
        if self.expect_validation_file:
            self.check_validation_file()
        return self.report

    # ------------------------------------------------------------------ metadata consistency
    def check_layout_consistency(self) -> None:
        m = self.meta
        n = len(m["timesteps"])
        self.n = n
        if m["run"]["num_steps"] != n:
            self.problem(f"metadata.json: run.num_steps is {m['run']['num_steps']} but there are {n} timesteps")
        self.t = len(m["tokens"])
        for i, tok in enumerate(m["tokens"]):
            if tok["index"] != i:
                self.problem(f"metadata.json: tokens[{i}].index is {tok['index']}")
                break
            if tok["word"] is not None and tok["word"] >= len(m["words"]):
                self.problem(f"metadata.json: tokens[{i}].word {tok['word']} is past the {len(m['words'])} words")
                break
        names = set()
        cross_on = self_on = False
        att = m["attention"]
        for i, layer in enumerate(m["layers"]):
            where = f"metadata.json: layers[{i}]"
            if layer["index"] != i:
                self.problem(f"{where}.index is {layer['index']}")
            if layer["name"] in names:
                self.problem(f"{where}.name {layer['name']!r} appears twice")
            names.add(layer["name"])
            native = layer.get("native")
            cs, ss = layer["cross_shape"], layer["self_shape"]
            cross_on |= cs is not None
            self_on |= ss is not None
            grid = self.check_cross_shape(where, layer, cs) if cs is not None else None
            if grid is not None:
                self.check_pooled(where, "cross", grid, att["cross"]["resolution"], native)
            grid = self.check_self_shape(where, layer, ss)
            if grid is not None:
                self.check_pooled(where, "self", grid, att["self"]["resolution"], native)
        if cross_on != att["cross"]["enabled"]:
            self.problem(f"metadata.json: attention.cross.enabled is {att['cross']['enabled']} but layers say {cross_on}")
        if self_on != att["self"]["enabled"]:
            self.problem(f"metadata.json: attention.self.enabled is {att['self']['enabled']} but layers say {self_on}")
        if self.t > m["context_length"]:
            self.problem(f"metadata.json: {self.t} tokens exceed context_length {m['context_length']}")
        if att["cross"]["full_distribution"] and self.t != m["context_length"]:
            self.problem(f"metadata.json: attention.cross.full_distribution is true but {self.t} tokens != context_length {m['context_length']}")
        if self.version >= 2:
            self.check_family_and_token_sets()

    def check_cross_shape(self, where: str, layer: dict[str, Any], cs: list[int]) -> tuple[int, int] | None:
        """Problems with a layer's cross_shape; its stored (h, w) grid when the shape makes sense."""
        per_head = self.version >= 2 and self.meta["attention"]["heads"] == contract.HEADS_PER_HEAD
        if len(cs) != (4 if per_head else 3):
            want = "[heads, T, h, w] (attention.heads is 'per_head')" if per_head else "[T, h, w]"
            self.problem(f"{where}.cross_shape {cs} is not {want}")
            return None
        if per_head and cs[0] != layer["heads"]:
            self.problem(f"{where}.cross_shape has {cs[0]} heads but layers[{layer['index']}].heads is {layer['heads']}")
        if cs[-3] != self.t:
            self.problem(f"{where}.cross_shape has {cs[-3]} tokens but metadata lists {self.t}")
        if self.version == 1 and cs[1] != cs[2]:
            self.problem(f"{where}.cross_shape {cs} is not square")
            return None
        return cs[-2], cs[-1]

    def check_self_shape(self, where: str, layer: dict[str, Any], ss: list[int] | None) -> tuple[int, int] | None:
        """Problems with a layer's self_shape (and, in schema 2, self_grid); the (sh, sw) grid when it makes sense."""
        if self.version == 1:
            if ss is None:
                return None
            side = math.isqrt(ss[0])
            if ss[0] != ss[1] or side * side != ss[0]:
                self.problem(f"{where}.self_shape {ss} is not [s*s, s*s]")
                return None
            return side, side
        sg = layer["self_grid"]
        if (sg is None) != (ss is None):
            self.problem(f"{where}: self_grid is {sg} but self_shape is {ss} (null exactly when the other is)")
            return None
        if sg is None:
            return None
        if list(ss) != contract.self_shape(sg):
            self.problem(f"{where}.self_shape {ss} is not [sh*sw, sh*sw] = {contract.self_shape(sg)} for self_grid {sg}")
            return None
        return sg[0], sg[1]

    def check_pooled(self, where: str, kind: str, grid: tuple[int, int], resolution: int, native: list[int] | None) -> None:
        """Warn about a grid above the requested resolution (long side) or above the native grid (either side)."""
        if max(grid) > resolution or (native and (grid[0] > native[0] or grid[1] > native[1])):
            shown = str(grid[0]) if grid[0] == grid[1] else f"{grid[0]}x{grid[1]}"
            self.warning(f"{where}: {kind} maps stored at {shown}, above the requested resolution or native grid (pooled up)")

    def check_family_and_token_sets(self) -> None:
        m = self.meta
        encoders = {e["name"] for e in m["family"]["text_encoders"]}
        tokenizers = {e["tokenizer"] for e in m["family"]["text_encoders"]}
        if m["family"]["tokens_from"] not in tokenizers:
            self.problem(f"metadata.json: family.tokens_from {m['family']['tokens_from']!r} is not a tokenizer of "
                         f"family.text_encoders ({', '.join(sorted(tokenizers))})")
        for i, ts in enumerate(m["token_sets"]):
            where = f"metadata.json: token_sets[{i}]"
            if ts["encoder"] not in encoders:
                self.problem(f"{where}.encoder {ts['encoder']!r} is not in family.text_encoders")
            if ts["offset"] + ts["length"] > m["context_length"]:
                self.problem(f"{where}: offset {ts['offset']} + length {ts['length']} exceeds context_length {m['context_length']}")

    # ------------------------------------------------------------------ files
    def check_files(self) -> dict[str, dict[str, Any]]:
        """Check each manifest entry; return the entries whose paths are acceptable (checked or not)."""
        listed: dict[str, dict[str, Any]] = {}
        self.bad_files: set[str] = set()
        for rel, entry in self.meta["files"].items():
            try:
                contract.check_relative_path(rel)
                if rel in contract.UNLISTED_FILES:
                    raise DatasetError(f"{rel}: must not be listed in the manifest")
            except DatasetError as exc:
                self.problem(f"metadata.json files: {exc}")
                continue
            listed[rel] = entry
            self.report.files_checked += 1
            try:
                self.check_file(rel, contract.resolve_inside(self.root, rel), entry)
            except DatasetError as exc:
                self.problem(f"{rel}: {exc}" if not str(exc).startswith(f"path {rel!r}") else str(exc))
                self.bad_files.add(rel)
            except Exception as exc:  # never a traceback for bad data
                self.problem(f"{rel}: could not be checked: {type(exc).__name__}: {exc}")
                self.bad_files.add(rel)
        return listed

    def check_file(self, rel: str, full: Path, entry: dict[str, Any]) -> None:
        kind = entry["kind"]
        if kind in (contract.KIND_CROSS, contract.KIND_SELF):
            if entry["dtype"] != contract.BIN_DTYPE:
                raise DatasetError(f"dtype {entry['dtype']!r} is not {contract.BIN_DTYPE!r}")
            if entry["bytes"] != contract.shape_bytes(entry["shape"]):
                raise DatasetError(f"manifest says {entry['bytes']} bytes but shape {entry['shape']} needs {contract.shape_bytes(entry['shape'])}")
        if not full.is_file():
            raise DatasetError("listed in the manifest but missing" if not full.exists() else "is not a file")
        size = full.stat().st_size
        if size != entry["bytes"]:
            raise DatasetError(f"size {size} bytes != manifest bytes {entry['bytes']} (truncated or changed)")
        data = full.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            raise DatasetError(f"sha256 mismatch (file {digest[:12]}…, manifest {entry['sha256'][:12]}…)")
        if kind == contract.KIND_CROSS:
            self.check_cross(np.frombuffer(data, contract.BIN_DTYPE).reshape(entry["shape"]))
        elif kind == contract.KIND_SELF:
            self.check_self(np.frombuffer(data, contract.BIN_DTYPE).reshape(entry["shape"]))
        elif kind == contract.KIND_IMAGE:
            self.check_image(data, entry)
        elif kind == contract.KIND_LATENTS:
            self.check_latents(data, entry)

    @staticmethod
    def _finite_nonneg(a: np.ndarray) -> np.ndarray:
        a64 = a.astype(np.float64)
        bad = int(np.count_nonzero(~np.isfinite(a64)))
        if bad:
            raise DatasetError(f"{bad} non-finite values (NaN/Inf)")
        if a64.size and a64.min() < -contract.SUM_TOLERANCE:
            raise DatasetError(f"negative attention values (min {a64.min():.3g})")
        return a64

    def check_cross(self, a: np.ndarray) -> None:
        a64 = self._finite_nonneg(a)
        if a64.ndim not in (3, 4):
            raise DatasetError(f"cross map shape {list(a.shape)} is not [T, h, w] or [heads, T, h, w]")
        # Per-head maps: each head is its own distribution, so the rule holds head by head (a head-mean
        # within the rule could hide a head outside it). A [T, h, w] map is checked as one "head".
        heads = a64.reshape((-1,) + a64.shape[-3:])
        tol = contract.SUM_TOLERANCE
        full = self.meta["attention"]["cross"]["full_distribution"]
        for k, head in enumerate(heads):
            sums = head.sum(axis=0)
            if not sums.size:
                continue
            which = f"head {k}: " if a64.ndim == 4 else ""
            if sums.max() > 1 + tol:
                raise DatasetError(f"{which}sum over tokens reaches {sums.max():.4f} > 1 + {tol:g} ({contract.CROSS_SUM_RULE})")
            if full and np.abs(sums - 1).max() > tol:
                raise DatasetError(f"{which}full_distribution is true but sums over tokens range {sums.min():.4f}..{sums.max():.4f}, not 1 ± {tol:g}")

    def check_self(self, a: np.ndarray) -> None:
        a64 = self._finite_nonneg(a)
        rows = a64.sum(axis=1)
        tol = contract.SUM_TOLERANCE
        if rows.size and np.abs(rows - 1).max() > tol:
            raise DatasetError(f"rows sum to {rows.min():.4f}..{rows.max():.4f}, not 1 ± {tol:g} ({contract.SELF_SUM_RULE})")

    def check_image(self, data: bytes, entry: dict[str, Any]) -> None:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                size, mode, fmt = (im.height, im.width), im.mode, im.format
        except Exception as exc:
            raise DatasetError(f"does not decode as an image ({type(exc).__name__})") from None
        if fmt != "PNG":
            raise DatasetError(f"is {fmt}, not PNG")
        if mode != "RGB":
            raise DatasetError(f"mode {mode}, not RGB")
        if list(size) != list(entry["shape"][:2]):
            raise DatasetError(f"decodes to {size[0]}x{size[1]} but the manifest says {entry['shape'][0]}x{entry['shape'][1]}")

    def check_latents(self, data: bytes, entry: dict[str, Any]) -> None:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except Exception as exc:
            raise DatasetError(f"does not load as .npz: {exc}") from None
        latent_shape = list(self.meta["latent_shape"])
        want = {"latents": [self.n + 1] + latent_shape, "noise": [self.n] + latent_shape}
        for name, shape in want.items():
            if name not in arrays:
                raise DatasetError(f"has no {name!r} array")
            a = arrays[name]
            if a.dtype != np.dtype(contract.BIN_DTYPE):
                raise DatasetError(f"{name} is {a.dtype}, not float16")
            if list(a.shape) != shape:
                raise DatasetError(f"{name} has shape {list(a.shape)}, expected {shape}")
            declared = entry.get("arrays", {}).get(name)
            if declared is not None and list(declared["shape"]) != shape:
                raise DatasetError(f"manifest shape of {name} {declared['shape']} != {shape}")
            if not np.isfinite(a).all():
                raise DatasetError(f"{name} has non-finite values (NaN/Inf)")

    # ------------------------------------------------------------------ completeness
    def expected_layout(self) -> dict[str, tuple[str, list[int] | None]]:
        expected: dict[str, tuple[str, list[int] | None]] = {}
        if self.version >= 2:
            run = self.meta["run"]
            expected[contract.FINAL_IMAGE] = (contract.KIND_IMAGE, [run["height"], run["width"], 3])
        for s in range(self.n):
            expected[contract.image_path(s)] = (contract.KIND_IMAGE, None)
            for layer in self.meta["layers"]:
                if layer["cross_shape"] is not None:
                    expected[contract.cross_path(layer["index"], s)] = (contract.KIND_CROSS, layer["cross_shape"])
                if layer["self_shape"] is not None:
                    expected[contract.self_path(layer["index"], s)] = (contract.KIND_SELF, layer["self_shape"])
        for name in contract.JSON_FILES:
            expected[name] = (contract.KIND_JSON, None)
        return expected

    def check_completeness(self, listed: dict[str, dict[str, Any]]) -> None:
        expected = self.expected_layout()
        missing = [p for p in expected if p not in listed]
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            self.problem(f"metadata.json files: {len(missing)} expected files not in the manifest: {shown}")
        image_shapes = set()
        for rel, entry in listed.items():
            if rel in self.bad_files:
                continue  # one line per file: its own problem is already reported
            if rel not in expected:
                if rel != contract.LATENTS_FILE:
                    self.warning(f"{rel}: listed in the manifest but not part of the run layout")
                elif entry["kind"] != contract.KIND_LATENTS:
                    self.problem(f"{rel}: kind {entry['kind']!r}, expected 'latents'")
                continue
            kind, shape = expected[rel]
            if entry["kind"] != kind:
                self.problem(f"{rel}: kind {entry['kind']!r}, expected {kind!r}")
            elif shape is not None and list(entry["shape"]) != list(shape):
                whose = "[run.height, run.width, 3]" if kind == contract.KIND_IMAGE else "its layer's"
                self.problem(f"{rel}: shape {entry['shape']} differs from {whose} {shape}")
            elif kind == contract.KIND_IMAGE and rel != contract.FINAL_IMAGE:
                image_shapes.add(tuple(entry["shape"]))
        if len(image_shapes) > 1:
            self.problem(f"images: previews have different sizes {sorted(image_shapes)}")

    # ------------------------------------------------------------------ metrics / pca
    def check_json_files(self, listed: dict[str, dict[str, Any]]) -> None:
        for name, part, check in (
            (contract.METRICS_FILE, "metrics", self.check_metrics),
            (contract.PCA_FILE, "latent_pca", self.check_pca),
        ):
            if name not in listed or not (self.root / name).is_file():
                continue  # already reported as missing
            try:
                doc = _load_json(self.root, name)
            except DatasetError as exc:
                self.problem(str(exc))
                continue
            errors = schema_errors(doc, part)
            if errors:
                for line in errors[:MAX_SCHEMA_LINES]:
                    self.problem(f"{name}: {line}")
                continue
            for line in check(doc):
                self.problem(f"{name}: {line}")

    def check_metrics(self, m: dict[str, Any]) -> Iterable[str]:
        n, t, nl = self.n, self.t, len(self.meta["layers"])
        cross_on = self.meta["attention"]["cross"]["enabled"]
        if m["steps"] != list(range(n)):
            yield f"steps is not 0..{n - 1}"
        for key in ("latent_norm", "latent_cosine_prev"):
            if len(m[key]) != n:
                yield f"{key} has {len(m[key])} values, expected {n}"
        for key in ("entropy", "token_dominance", "kl_consecutive"):
            if (m[key] is None) == cross_on:
                yield f"{key} is {'null' if m[key] is None else 'present'} but cross attention is {'on' if cross_on else 'off'}"
        if m["entropy"] is not None:
            e = m["entropy"]
            if len(e["per_layer"]) != nl or any(len(r) != n for r in e["per_layer"]) or len(e["mean"]) != n:
                yield f"entropy must be per_layer [{nl}][{n}] and mean [{n}]"
        if m["kl_consecutive"] is not None:
            k = m["kl_consecutive"]
            if len(k["per_layer"]) != nl or any(len(r) != max(n - 1, 0) for r in k["per_layer"]) or len(k["mean"]) != max(n - 1, 0):
                yield f"kl_consecutive must be per_layer [{nl}][{max(n - 1, 0)}] and mean [{max(n - 1, 0)}]"
        if m["token_dominance"] is not None:
            d = m["token_dominance"]
            if len(d["share"]) != n or any(len(r) != t for r in d["share"]):
                yield f"token_dominance.share must be [{n}][{t}]"
            elif len(d["ranking"]) != n or any(sorted(r) != list(range(t)) for r in d["ranking"]):
                yield f"token_dominance.ranking must be {n} permutations of 0..{t - 1}"

    def check_pca(self, p: dict[str, Any]) -> Iterable[str]:
        if len(p["coords"]) != self.n:
            yield f"coords has {len(p['coords'])} points, expected {self.n}"

    # ------------------------------------------------------------------ folder
    def check_unlisted(self, listed: dict[str, dict[str, Any]]) -> None:
        for dirpath, dirs, files in os.walk(self.root):
            for name in files:
                rel = Path(dirpath, name).relative_to(self.root).as_posix()
                if rel not in listed and rel not in contract.UNLISTED_FILES:
                    self.warning(f"{rel}: not listed in the manifest")

    def check_symlinks(self) -> None:
        base = self.root.resolve()
        for dirpath, dirs, files in os.walk(self.root):
            for name in dirs + files:
                p = Path(dirpath, name)
                if p.is_symlink() and p.relative_to(self.root).as_posix() not in self.meta["files"]:
                    target = p.resolve()
                    if target != base and base not in target.parents:
                        self.problem(f"{p.relative_to(self.root).as_posix()}: symlink pointing outside the run folder")

    def check_validation_file(self) -> None:
        try:
            v = _load_json(self.root, contract.VALIDATION_FILE)
        except DatasetError as exc:
            self.warning(str(exc))
            return
        if not isinstance(v, dict) or v.get("valid") is not True:
            self.warning(f"{contract.VALIDATION_FILE}: records the run as not valid")


def check_run(path: str | os.PathLike, *, expect_validation_file: bool = True) -> Report:
    """Check a run folder; problems and warnings separately (see the module docstring)."""
    root = Path(path)
    if not root.is_dir():
        return Report(problems=[f"{root}: no such folder" if not root.exists() else f"{root}: not a folder"])
    checker = _Checker(root, expect_validation_file)
    try:
        return checker.run()
    except Exception as exc:  # never a traceback for bad data
        checker.problem(f"{root}: could not be checked: {type(exc).__name__}: {exc}")
        return checker.report


def validate_run(path: str | os.PathLike, strict: bool = False) -> list[str]:
    """One line per problem (warnings too under ``strict``); an empty list means valid."""
    report = check_run(path)
    return report.problems + (report.warnings if strict else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="diffviz validate",
        description="Check a run folder against the dataset contract. One line per problem; exit 0 if valid, 1 if not.",
        epilog=STRICT_RULE,
    )
    parser.add_argument("dir", help="the run folder")
    parser.add_argument("--strict", action="store_true", help="treat warnings as problems")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing when the run is valid")
    args = parser.parse_args(argv)
    root = Path(args.dir)
    if not root.is_dir():
        why = "no such folder" if not root.exists() else "not a folder"
        print(f"diffviz validate: error: {args.dir}: {why}", file=sys.stderr)
        return 2
    report = check_run(root)
    problems = report.problems + (report.warnings if args.strict else [])
    for line in problems:
        print(line)
    if not args.strict:
        for line in report.warnings:
            print(f"warning: {line}")
    if problems:
        print(f"invalid: {len(problems)} problem(s) in {args.dir}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"ok: {args.dir} ({report.files_checked} files checked{', strict' if args.strict else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
