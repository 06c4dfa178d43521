"""``diffviz validate DIR [--strict]``: check a run folder against the dataset contract.

Problems (the run is invalid; exit 1):
  * ``metadata.json``, ``metrics.json`` or ``latent_pca.json`` missing, not a regular file, over its cap,
    not JSON (``1e999``, duplicate keys and deep nesting included), or failing ``export/schema.json``;
    ``schema_version`` unknown; counts, shapes or strings over the caps;
  * values outside their definition: entropy outside [0, 1], KL below 0, token shares that do not sum to 1;
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
Everything is bounded before work starts (``export.bounded``, the caps in CONTRACT.md): oversized counts,
files, archives and documents are refused, not worked through, and at most ``contract.MAX_PROBLEMS``
lines are printed, then one counting the rest.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import math
import os
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from . import bounded, contract
from .contract import DatasetError

STRICT_RULE = (
    "--strict also fails on warnings: unlisted files, manifest entries outside the layout, "
    "a missing or failing validation.json, maps stored above their native or requested resolution"
)
MAX_SCHEMA_LINES = contract.MAX_PROBLEMS
#: Schema errors counted past the ones shown (counting them all could take minutes on a hostile document).
MAX_SCHEMA_COUNT = 1_000
#: Entries of the run folder walked for unlisted files and symlinks before the walk gives up.
MAX_WALK_ENTRIES = 2 * contract.MAX_FILES


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
    generator = contract.generator()
    return {
        "validator": f"{generator['name']} {generator['version']}",
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


def schema_errors(document: Any, part: str, limit: int = MAX_SCHEMA_LINES) -> list[str]:
    """Lines describing where ``document`` breaks ``schema.json``'s ``$defs/<part>`` (metadata, metrics, latent_pca).

    At most ``limit`` lines, in document order, then one line counting the rest (up to ``MAX_SCHEMA_COUNT``)."""
    import jsonschema

    schema = _schema()
    validator = jsonschema.Draft202012Validator({"$ref": f"#/$defs/{part}", "$defs": schema["$defs"]})
    groups: dict[str, list[str]] = {}
    if part == "metadata" and isinstance(document, dict) and isinstance(document.get("files"), dict):
        document, groups = _manifest_forms(document, schema["$defs"]["metadata"]["properties"]["files"])
    errors = (_path(err, groups, i) for err in validator.iter_errors(document) for i in range(len(_group(err, groups))))
    shown = sorted(itertools.islice(errors, limit), key=lambda e: e[0])
    lines = []
    for path, err in shown:
        where = "/".join(map(str, path)) or "(top level)"
        where = where if len(where) <= 120 else where[:117] + "..."
        message = err.message if len(err.message) <= 160 else err.message[:157] + "..."
        lines.append(f"{where}: {message}")
    more = sum(1 for _ in itertools.islice(errors, MAX_SCHEMA_COUNT))
    if more:
        lines.append(f"… and {'more than ' if more == MAX_SCHEMA_COUNT else ''}{more} more schema errors")
    return lines


# The manifest is most of metadata.json (thousands of entries) and jsonschema takes ~0.4 ms per entry. Entries
# that differ only in a valid sha256 and a valid byte count have the same errors, so one of each form is
# validated and its errors stand for the whole group. Validity of those two values comes from the schema itself.
_FORM_KEYS = ("sha256", "bytes")


def _manifest_forms(meta: dict[str, Any], files_schema: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[str]]]:
    import jsonschema

    entry_schema = files_schema.get("additionalProperties", {})
    checks = {k: jsonschema.Draft202012Validator(entry_schema.get("properties", {}).get(k, {})) for k in _FORM_KEYS}
    forms: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    known: dict[tuple[str, Any], bool] = {}  # byte counts repeat across entries
    for rel, entry in meta["files"].items():
        form = rel
        if isinstance(entry, dict) and all(k in entry and _valid_scalar(checks[k], k, entry[k], known) for k in _FORM_KEYS):
            form = json.dumps({k: v for k, v in entry.items() if k not in _FORM_KEYS}, sort_keys=True)
        first = forms.setdefault(form, rel)
        groups.setdefault(first, []).append(rel)
    compact = dict(meta, files={first: meta["files"][first] for first in groups})
    return compact, groups


def _valid_scalar(validator: Any, key: str, value: Any, known: dict[tuple[str, Any], bool]) -> bool:
    """``validator.is_valid(value)``; a string is checked by the schema's own ``type``/``pattern`` when that is all
    the schema says (the sha256s: all different, so a cache would not help)."""
    sub = validator.schema
    if isinstance(value, str) and set(sub) <= {"type", "pattern"} and sub.get("type") == "string":
        return "pattern" not in sub or _pattern(sub["pattern"]).search(value) is not None
    if isinstance(value, int) and not isinstance(value, bool):
        if (key, value) not in known:
            known[(key, value)] = validator.is_valid(value)
        return known[(key, value)]
    return validator.is_valid(value)


@lru_cache(maxsize=16)
def _pattern(pattern: str) -> "re.Pattern[str]":
    import re

    return re.compile(pattern)


def _group(err: Any, groups: dict[str, list[str]]) -> list[str]:
    """The manifest keys an error at a representative entry stands for ([None] outside the manifest)."""
    path = list(err.absolute_path)
    if groups and len(path) >= 2 and path[0] == "files" and path[1] in groups:
        return groups[path[1]]
    return [None]


def _path(err: Any, groups: dict[str, list[str]], i: int) -> tuple[list[str], Any]:
    path = list(map(str, err.absolute_path))
    keys = _group(err, groups)
    if keys[i] is not None:
        path[1] = keys[i]
    return path, err


class _Checker:
    def __init__(self, root: Path, expect_validation_file: bool):
        self.root = root
        self.expect_validation_file = expect_validation_file
        self.report = Report()
        self._problems = bounded.Problems()
        self._warnings = bounded.Problems()

    def problem(self, line: str) -> None:
        self._problems.add(line)

    def warning(self, line: str) -> None:
        self._warnings.add(line)

    def finish(self) -> Report:
        self.report.problems = self._problems.report()
        self.report.warnings = [line.replace("more problem", "more warning") for line in self._warnings.report()]
        return self.report

    # ------------------------------------------------------------------ top level
    def run(self) -> None:
        try:
            meta = bounded.read_json(self.root, contract.METADATA_FILE)
            if not isinstance(meta, dict):
                raise DatasetError(f"{contract.METADATA_FILE}: not a JSON object")
            self.version = self.report.schema_version = contract.known_schema_version(meta)
        except DatasetError as exc:
            self.problem(str(exc))
            return
        over = bounded.metadata_bounds(meta)
        if over:
            for line in over:
                self.problem(line)
            return
        errors = schema_errors(meta, "metadata")
        if errors:
            for line in errors:
                self.problem(f"{contract.METADATA_FILE}: {line}")
            return
        self.meta = meta
        self.check_layout_consistency()
        self.layout = self.expected_layout()   # every file's kind, shape and layer, from the metadata alone
        listed = self.check_files()
        self.check_completeness(listed)
        self.check_json_files(listed)
        self.check_folder(listed)
        if self.expect_validation_file:
            self.check_validation_file()

    # ------------------------------------------------------------------ metadata consistency
    def check_layout_consistency(self) -> None:
        m = self.meta
        n = len(m["timesteps"])
        self.n = n
        if m["run"]["num_steps"] != n:
            self.problem(f"metadata.json: run.num_steps is {m['run']['num_steps']} but there are {n} timesteps")
        self.t = len(m["tokens"])
        previous = -1
        for i, tok in enumerate(m["tokens"]):
            # Schema 1: row i is key i. Schema 2: rows follow the text sequence (token sets may start past 0).
            if tok["index"] != i if self.version == 1 else not previous < tok["index"] < m["context_length"]:
                self.problem(f"metadata.json: tokens[{i}].index is {tok['index']}")
                break
            previous = tok["index"]
            if tok["word"] is not None and tok["word"] >= len(m["words"]):
                self.problem(f"metadata.json: tokens[{i}].word {tok['word']} is past the {len(m['words'])} words")
                break
        names = set()
        cross_on = self_on = False
        extra_on = {contract.KIND_TEXT: False, contract.KIND_CONCEPT: False}
        att = m["attention"]
        for i, layer in enumerate(m["layers"]):
            where = f"metadata.json: layers[{i}]"
            if layer["index"] != i:
                self.problem(f"{where}.index is {layer['index']}")
            if layer["name"] in names:
                self.problem(f"{where}.name {layer['name']!r} appears twice")
            names.add(layer["name"])
            self.check_kind_and_mask(where, layer)
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
            for kind in (contract.KIND_TEXT, contract.KIND_CONCEPT):
                shape = layer.get(contract.shape_key(kind))
                extra_on[kind] |= shape is not None
                if shape is not None and (cs is None or list(shape) != contract.cross_shape(self.t, cs[-2:])):
                    self.problem(f"{where}.{contract.shape_key(kind)} {shape} is not [T, h, w] of its cross_shape {cs}")
        if cross_on != att["cross"]["enabled"]:
            self.problem(f"metadata.json: attention.cross.enabled is {att['cross']['enabled']} but layers say {cross_on}")
        if self_on != att["self"]["enabled"]:
            self.problem(f"metadata.json: attention.self.enabled is {att['self']['enabled']} but layers say {self_on}")
        for kind, on in extra_on.items():
            if on != bool(att.get(kind, {}).get("enabled")):
                self.problem(f"metadata.json: attention.{kind}.enabled is {bool(att.get(kind, {}).get('enabled'))} "
                             f"but layers say {on}")
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
        """Warn about a grid above the requested resolution (long side) or above the native grid (either side), and
        about a native grid that the stored grid does not divide (uneven pooling windows, CONTRACT.md "Pooling")."""
        shown = str(grid[0]) if grid[0] == grid[1] else f"{grid[0]}x{grid[1]}"
        if max(grid) > resolution or (native and (grid[0] > native[0] or grid[1] > native[1])):
            self.warning(f"{where}: {kind} maps stored at {shown}, above the requested resolution or native grid (pooled up)")
        elif native and (native[0] % grid[0] or native[1] % grid[1]):
            self.warning(f"{where}: {kind} maps pool the native {native[0]}x{native[1]} grid into {shown} cells of "
                         f"uneven size (uneven pooling, CONTRACT.md 'Pooling')")

    def check_kind_and_mask(self, where: str, layer: dict[str, Any]) -> None:
        """The layer's kind is one the contract knows, with the rules the contract gives it (where the run states
        them); its ``computed`` step mask, when present, has one flag per step."""
        kind = contract.layer_kind(layer)
        known = contract.LAYER_KINDS.get(kind)
        if known is None:
            self.problem(f"{where}.kind {kind!r} is not a layer kind this diffviz knows ({', '.join(contract.LAYER_KINDS)})")
        stated = self.meta["attention"].get("kinds")
        if known is not None and isinstance(stated, dict):
            if kind not in stated:
                self.problem(f"{where}.kind {kind!r} is not described in attention.kinds")
            elif stated[kind].get("sum_rules") != known.rules:
                self.problem(f"metadata.json: attention.kinds[{kind!r}].sum_rules differ from the contract's for that "
                             f"kind (export/contract.py LAYER_KINDS)")
        computed = layer.get("computed")
        if computed is not None and len(computed) != len(self.meta["timesteps"]):
            self.problem(f"{where}.computed has {len(computed)} flags for {len(self.meta['timesteps'])} steps")

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
            span = ts.get("sequence_length", ts["length"])
            if ts["offset"] + span > m["context_length"]:
                self.problem(f"{where}: offset {ts['offset']} + {'sequence_length' if 'sequence_length' in ts else 'length'} "
                             f"{span} exceeds context_length {m['context_length']}")
            if ts["length"] > span:
                self.problem(f"{where}: length {ts['length']} (the prompt's tokens) exceeds sequence_length {span}")
        spans = {ts["encoder"]: range(ts["offset"], ts["offset"] + ts["length"]) for ts in m["token_sets"]}
        for i, tok in enumerate(m["tokens"]):
            if "set" in tok and tok["index"] not in spans.get(tok["set"], range(0)):
                self.problem(f"metadata.json: tokens[{i}] (index {tok['index']}) is not inside its token set "
                             f"{tok['set']!r}")
                break

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
                self.check_file(rel, entry)
            except bounded.MissingFile:
                self.problem(f"{rel}: listed in the manifest but missing")
                self.bad_files.add(rel)
            except DatasetError as exc:
                named = str(exc).startswith((f"{rel}:", "path "))
                self.problem(str(exc) if named else f"{rel}: {exc}")
                self.bad_files.add(rel)
            except Exception as exc:  # never a traceback for bad data
                self.problem(f"{rel}: could not be checked: {type(exc).__name__}: {exc}")
                self.bad_files.add(rel)
        return listed

    def check_file(self, rel: str, entry: dict[str, Any]) -> None:
        kind = entry["kind"]
        if kind in contract.MAP_KINDS:
            if entry["dtype"] != contract.BIN_DTYPE:
                raise DatasetError(f"dtype {entry['dtype']!r} is not {contract.BIN_DTYPE!r}")
            if entry["bytes"] != contract.shape_bytes(entry["shape"]):
                raise DatasetError(f"manifest says {entry['bytes']} bytes but shape {entry['shape']} needs {contract.shape_bytes(entry['shape'])}")
        cap = contract.kind_byte_cap(kind, rel)
        if entry["bytes"] > cap:
            raise DatasetError(f"manifest says {entry['bytes']} bytes, over the cap of {cap} for a {kind} file")
        if kind == contract.KIND_LATENTS:  # the largest kind: hashed in a stream, unpacked from the file
            digest = bounded.sha256_file(self.root, rel, limit=cap, expect=entry["bytes"])
            self.check_digest(digest, entry)
            with bounded.open_regular(self.root, rel, limit=cap, expect=entry["bytes"]) as fh:
                self.check_latents(fh, entry)
            return
        data = bounded.read_file(self.root, rel, limit=cap, expect=entry["bytes"])
        self.check_digest(hashlib.sha256(data).hexdigest(), entry)
        if kind in contract.MAP_KINDS:
            a = np.frombuffer(data, contract.BIN_DTYPE).reshape(entry["shape"])
            layer = self.layout.get(rel, (None, None, None))[2]
            rule = None if layer is None else contract.LAYER_KINDS.get(contract.layer_kind(layer), None)
            rule = None if rule is None else rule.rules.get(kind)
            if rule is None:  # outside the layout (its own line says so) or a kind that stores no such map
                self._finite_nonneg(a)
            else:
                RULE_CHECKS[rule](self, a)
        elif kind == contract.KIND_IMAGE:
            self.check_image(rel, data, entry)

    @staticmethod
    def check_digest(digest: str, entry: dict[str, Any]) -> None:
        if digest != entry["sha256"]:
            raise DatasetError(f"sha256 mismatch (file {digest[:12]}…, manifest {entry['sha256'][:12]}…)")

    @staticmethod
    def _finite_nonneg(a: np.ndarray) -> np.ndarray:
        a64 = a.astype(np.float64)
        bad = int(np.count_nonzero(~np.isfinite(a64)))
        if bad:
            raise DatasetError(f"{bad} non-finite values (NaN/Inf)")
        if a64.size and a64.min() < -contract.SUM_TOLERANCE:
            raise DatasetError(f"negative attention values (min {a64.min():.3g})")
        return a64

    def check_cross(self, a: np.ndarray, *, full_allowed: bool = True) -> None:
        a64 = self._finite_nonneg(a)
        if a64.ndim not in (3, 4):
            raise DatasetError(f"cross map shape {list(a.shape)} is not [T, h, w] or [heads, T, h, w]")
        # Per-head maps: each head is its own distribution, so the rule holds head by head (a head-mean
        # within the rule could hide a head outside it). A [T, h, w] map is checked as one "head".
        heads = a64.reshape((-1,) + a64.shape[-3:])
        tol = contract.SUM_TOLERANCE
        full = full_allowed and self.meta["attention"]["cross"]["full_distribution"]
        rule = contract.CROSS_SUM_RULE if full_allowed else contract.JOINT_CROSS_SUM_RULE
        for k, head in enumerate(heads):
            sums = head.sum(axis=0)
            if not sums.size:
                continue
            which = f"head {k}: " if a64.ndim == 4 else ""
            if sums.max() > 1 + tol:
                raise DatasetError(f"{which}sum over tokens reaches {sums.max():.4f} > 1 + {tol:g} ({rule})")
            if full and np.abs(sums - 1).max() > tol:
                raise DatasetError(f"{which}full_distribution is true but sums over tokens range {sums.min():.4f}..{sums.max():.4f}, not 1 ± {tol:g}")

    def check_joint_cross(self, a: np.ndarray) -> None:
        self.check_cross(a, full_allowed=False)

    def check_self(self, a: np.ndarray) -> None:
        a64 = self._finite_nonneg(a)
        rows = a64.sum(axis=1)
        tol = contract.SUM_TOLERANCE
        if rows.size and np.abs(rows - 1).max() > tol:
            raise DatasetError(f"rows sum to {rows.min():.4f}..{rows.max():.4f}, not 1 ± {tol:g} ({contract.SELF_SUM_RULE})")

    def check_joint_self(self, a: np.ndarray) -> None:
        rows = self._finite_nonneg(a).sum(axis=1)
        tol = contract.SUM_TOLERANCE
        if rows.size and rows.max() > 1 + tol:
            raise DatasetError(f"rows reach {rows.max():.4f} > 1 + {tol:g} ({contract.JOINT_SELF_SUM_RULE})")

    def check_linear_self(self, a: np.ndarray) -> None:
        rows = self._finite_nonneg(a).sum(axis=1)
        tol = contract.SUM_TOLERANCE
        if rows.size and rows.max() > 1 + tol:
            raise DatasetError(f"rows reach {rows.max():.4f} > 1 + {tol:g} ({contract.LINEAR_SELF_SUM_RULE})")

    def check_text(self, a: np.ndarray) -> None:
        a64 = self._finite_nonneg(a)
        sums = a64.reshape(a64.shape[0], -1).sum(axis=1)
        if sums.size and sums.max() > 1 + contract.SUM_TOLERANCE:
            raise DatasetError(f"a token's sum over the image reaches {sums.max():.4f} ({contract.TEXT_SUM_RULE})")

    def check_concept(self, a: np.ndarray) -> None:
        sums = self._finite_nonneg(a).sum(axis=0)
        tol = contract.SUM_TOLERANCE
        if sums.size and np.abs(sums - 1).max() > tol and sums.max() > tol:
            raise DatasetError(f"sums over tokens range {sums.min():.4f}..{sums.max():.4f} ({contract.CONCEPT_SUM_RULE})")

    def check_image(self, rel: str, data: bytes, entry: dict[str, Any]) -> None:
        from PIL import Image

        want = list(entry["shape"][:2])
        bounded.png_size(rel, data, want)  # the header's size first: no decompression bomb is unpacked
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                mode = im.mode
        except Exception as exc:
            raise DatasetError(f"does not decode as an image ({type(exc).__name__})") from None
        if mode != "RGB":
            raise DatasetError(f"mode {mode}, not RGB")

    def check_latents(self, fh: Any, entry: dict[str, Any]) -> None:
        want = contract.latents_members(self.n, self.meta["latent_shape"])
        for name, (_dtype, shape) in want.items():
            declared = entry.get("arrays", {}).get(name)
            if declared is not None and list(declared["shape"]) != shape:
                raise DatasetError(f"manifest shape of {name} {declared['shape']} != {shape}")
        arrays = bounded.npz_arrays(contract.LATENTS_FILE, fh, want)
        for name, a in arrays.items():
            if not np.isfinite(a).all():
                raise DatasetError(f"{name} has non-finite values (NaN/Inf)")

    # ------------------------------------------------------------------ completeness
    def expected_layout(self) -> dict[str, tuple[str, list[int] | None, dict[str, Any] | None]]:
        """Every file the metadata implies: ``{path: (manifest kind, shape or None, its layer or None)}``. A layer
        step whose ``computed`` flag is false has no maps (a caching hook skipped the block)."""
        expected: dict[str, tuple[str, list[int] | None, dict[str, Any] | None]] = {}
        if self.version >= 2:
            run = self.meta["run"]
            final = run.get("output_size") or [run["height"], run["width"]]
            expected[contract.FINAL_IMAGE] = (contract.KIND_IMAGE, [final[0], final[1], 3], None)
        for s in range(self.n):
            expected[contract.image_path(s)] = (contract.KIND_IMAGE, None, None)
            for layer in self.meta["layers"]:
                computed = layer.get("computed")
                if computed is not None and s < len(computed) and not computed[s]:
                    continue
                for kind in contract.MAP_KINDS:
                    shape = layer.get(contract.shape_key(kind))
                    if shape is not None:
                        expected[contract.map_path(kind, layer["index"], s)] = (kind, shape, layer)
        for name in contract.JSON_FILES:
            expected[name] = (contract.KIND_JSON, None, None)
        return expected

    def check_completeness(self, listed: dict[str, dict[str, Any]]) -> None:
        expected = self.layout
        missing = [p for p in expected if p not in listed]
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            self.problem(f"metadata.json files: {len(missing)} expected files not in the manifest: {shown}")
        image_shapes = set()
        for rel, entry in listed.items():
            if rel in self.bad_files:
                continue  # one line per file: its own problem is already reported
            if rel not in expected:
                if entry["kind"] in contract.MAP_KINDS and self._skipped_step(rel):
                    self.problem(f"{rel}: a map for a step its layer did not compute (layers[].computed is false)")
                elif rel != contract.LATENTS_FILE:
                    self.warning(f"{rel}: listed in the manifest but not part of the run layout")
                elif entry["kind"] != contract.KIND_LATENTS:
                    self.problem(f"{rel}: kind {entry['kind']!r}, expected 'latents'")
                continue
            kind, shape, _layer = expected[rel]
            if entry["kind"] != kind:
                self.problem(f"{rel}: kind {entry['kind']!r}, expected {kind!r}")
            elif shape is not None and list(entry["shape"]) != list(shape):
                whose = "[run.height, run.width, 3]" if kind == contract.KIND_IMAGE else "its layer's"
                self.problem(f"{rel}: shape {entry['shape']} differs from {whose} {shape}")
            elif kind == contract.KIND_IMAGE and rel != contract.FINAL_IMAGE:
                image_shapes.add(tuple(entry["shape"]))
        if len(image_shapes) > 1:
            self.problem(f"images: previews have different sizes {sorted(image_shapes)}")

    def _skipped_step(self, rel: str) -> bool:
        """Whether ``rel`` is the path of a map of a (layer, step) whose ``computed`` flag is false."""
        for layer in self.meta["layers"]:
            computed = layer.get("computed") or []
            for s, done in enumerate(computed):
                if not done and any(rel == contract.map_path(k, layer["index"], s) for k in contract.MAP_KINDS):
                    return True
        return False

    # ------------------------------------------------------------------ metrics / pca
    def check_json_files(self, listed: dict[str, dict[str, Any]]) -> None:
        for name, part, check in (
            (contract.METRICS_FILE, "metrics", self.check_metrics),
            (contract.PCA_FILE, "latent_pca", self.check_pca),
        ):
            if name not in listed or name in self.bad_files:
                continue  # already reported (missing, wrong size, unreadable, not JSON)
            try:
                doc = bounded.read_json(self.root, name)
            except DatasetError as exc:
                self.problem(str(exc))
                continue
            over = bounded.list_bounds(name, doc)
            errors = [] if over else schema_errors(doc, part)
            if over or errors:
                for line in [over] if over else [f"{name}: {line}" for line in errors]:
                    self.problem(line)
                continue
            try:
                for line in check(doc):
                    self.problem(f"{name}: {line}")
            except (OverflowError, ValueError, TypeError) as exc:
                self.problem(f"{name}: values that are not numbers in range ({type(exc).__name__})")

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
            # a step at which no recorded layer was computed (a caching hook) has null share and ranking rows
            rows = [(a, b) for a, b in zip(d["share"], d["ranking"]) if a is not None or b is not None]
            if len(d["share"]) != n or any(r is not None and len(r) != t for r in d["share"]):
                yield f"token_dominance.share must be [{n}][{t}]"
            elif len(d["ranking"]) != n or any(a is None or b is None or sorted(b) != list(range(t)) for a, b in rows):
                yield f"token_dominance.ranking must be {n} permutations of 0..{t - 1}"
            elif rows and t:
                yield from self.check_shares(np.array([a for a, _ in rows], dtype=np.float64))
        yield from self.check_metric_values(m)

    @staticmethod
    def check_shares(share: np.ndarray) -> Iterable[str]:
        """Each step's token shares lie in [0, 1] and sum to 1 (``analysis.metrics.token_dominance``)."""
        tol = contract.SUM_TOLERANCE
        if share.min() < -tol or share.max() > 1 + tol:
            yield f"token_dominance.share has values outside [0, 1] ({share.min():.4g}..{share.max():.4g})"
        sums = share.sum(axis=1)
        bad = np.flatnonzero(np.abs(sums - 1) > tol)
        if bad.size:
            yield (f"token_dominance.share of step {int(bad[0])} sums to {sums[bad[0]]:.4f}, not 1 ± {tol:g} "
                   f"({bad.size} step{'s' if bad.size > 1 else ''})")

    @staticmethod
    def check_metric_values(m: dict[str, Any]) -> Iterable[str]:
        """Ranges the metrics have by definition (CONTRACT.md "metrics.json")."""
        ranges = [("entropy", 0.0, 1.0, ("per_layer", "mean")), ("kl_consecutive", 0.0, math.inf, ("per_layer", "mean"))]
        for key, low, high, parts in ranges:
            section = m.get(key)
            if section is None:
                continue
            for part in parts:
                a = np.array(section[part], dtype=np.float64).ravel()  # null (a layer without cross maps) -> nan
                a = a[~np.isnan(a)]
                if a.size and (a.min() < low - 1e-6 or a.max() > high + 1e-6):
                    span = f"[{low:g}, {high:g}]" if math.isfinite(high) else f"[{low:g}, ∞)"
                    yield f"{key}.{part} has values outside {span} ({a.min():.4g}..{a.max():.4g})"
        norms = np.array(m["latent_norm"], dtype=np.float64)
        if norms.size and norms.min() < 0:
            yield f"latent_norm has negative values (min {norms.min():.4g})"
        cos = np.array(m["latent_cosine_prev"], dtype=np.float64)
        cos = cos[~np.isnan(cos)]
        if cos.size and (cos.min() < -1 - 1e-6 or cos.max() > 1 + 1e-6):
            yield f"latent_cosine_prev has values outside [-1, 1] ({cos.min():.4g}..{cos.max():.4g})"

    def check_pca(self, p: dict[str, Any]) -> Iterable[str]:
        if len(p["coords"]) != self.n:
            yield f"coords has {len(p['coords'])} points, expected {self.n}"

    # ------------------------------------------------------------------ folder
    def check_folder(self, listed: dict[str, dict[str, Any]]) -> None:
        """Unlisted files (warnings) and symlinks out of the folder (problems), walking at most ``MAX_WALK_ENTRIES``."""
        base = self.root.resolve()
        seen = 0
        for dirpath, dirs, files in os.walk(self.root):
            for name in dirs + files:
                seen += 1
                if seen > MAX_WALK_ENTRIES:
                    self.problem(f"{bounded.folder_name(self.root)}: more than {MAX_WALK_ENTRIES} entries in the run folder")
                    return
                p = Path(dirpath, name)
                rel = p.relative_to(self.root).as_posix()
                if name in files and rel not in listed and rel not in contract.UNLISTED_FILES:
                    self.warning(f"{rel}: not listed in the manifest")
                if p.is_symlink() and rel not in self.meta["files"]:
                    target = p.resolve()
                    if target != base and base not in target.parents:
                        self.problem(f"{rel}: symlink pointing outside the run folder")

    def check_validation_file(self) -> None:
        try:
            v = bounded.read_json(self.root, contract.VALIDATION_FILE)
        except DatasetError as exc:
            self.warning(str(exc))
            return
        if not isinstance(v, dict) or v.get("valid") is not True:
            self.warning(f"{contract.VALIDATION_FILE}: records the run as not valid")


#: sum rule (``contract.LayerKind.rules``' values) -> the check of one stored map under it
RULE_CHECKS = {
    contract.CROSS_SUM_RULE: _Checker.check_cross,
    contract.JOINT_CROSS_SUM_RULE: _Checker.check_joint_cross,
    contract.SELF_SUM_RULE: _Checker.check_self,
    contract.JOINT_SELF_SUM_RULE: _Checker.check_joint_self,
    contract.LINEAR_SELF_SUM_RULE: _Checker.check_linear_self,
    contract.TEXT_SUM_RULE: _Checker.check_text,
    contract.CONCEPT_SUM_RULE: _Checker.check_concept,
}
assert {rule for kind in contract.LAYER_KINDS.values() for rule in kind.rules.values()} <= set(RULE_CHECKS)


def check_run(path: str | os.PathLike, *, expect_validation_file: bool = True) -> Report:
    """Check a run folder; problems and warnings separately (see the module docstring)."""
    root = Path(path)
    if not root.is_dir():
        return Report(problems=[f"{root}: no such folder" if not root.exists() else f"{root}: not a folder"])
    checker = _Checker(root, expect_validation_file)
    try:
        checker.run()
    except Exception as exc:  # never a traceback for bad data
        checker.problem(f"{bounded.folder_name(root)}: could not be checked: {type(exc).__name__}: {str(exc)[:200]}")
    return checker.finish()


def validate_run(path: str | os.PathLike, strict: bool = False) -> list[str]:
    """One line per problem (warnings too under ``strict``); an empty list means valid."""
    report = check_run(path)
    return report.problems + (report.warnings if strict else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="diffviz validate",
        description="Check a run folder, or a sweep folder (sweep.json and its finished runs), against the dataset "
                    "contract. One line per problem; exit 0 if valid, 1 if not.",
        epilog=STRICT_RULE,
    )
    parser.add_argument("dir", help="the run folder, or a sweep folder")
    parser.add_argument("--strict", action="store_true", help="treat warnings as problems")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing when the run is valid")
    args = parser.parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # file names that are not UTF-8 print as escapes, never a traceback
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    root = Path(args.dir)
    if not root.is_dir():
        why = "no such folder" if not root.exists() else "not a folder"
        print(f"diffviz validate: error: {args.dir}: {why}", file=sys.stderr)
        return 2
    from export import validate_sweep

    if validate_sweep.looks_like_sweep(root):  # a sweep folder: its index, its finished runs, their agreement
        return validate_sweep.main(root, args.dir, strict=args.strict, quiet=args.quiet)
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
