"""Write one run atomically, streaming each step to disk as it arrives.

    with RunWriter("datasets/my_run", overwrite=False) as w:
        for step in range(n):
            w.write_step(step, image=img, cross={0: cross_map}, self_={0: self_map})
        w.write_final_image(final)   # the pipeline's own output (schema 2)
        w.finish(metadata, metrics, latent_pca, latents=latents, noise=noise)

* Everything is written into a temporary folder beside the target
  (``.<name>.partial-<pid>-<random>``), so the final rename stays on one filesystem.
* ``write_step`` writes its files at once (float16 LE C-order ``.bin`` and PNG) and keeps only the
  manifest entry (bytes + sha256), so memory does not grow with the number of steps.
* ``finish`` fills ``schema_version`` (``contract.SCHEMA_VERSION``, 2) unless the caller gave one,
  writes the JSON files, the manifest in ``metadata.json``, runs the validator on the
  new folder, writes ``validation.json`` and only then moves the folder into place. An existing
  run is replaced only at that point: on Linux with one atomic exchange (``renameat2``), elsewhere
  with two renames whose in-between state is recovered by the next writer.
* An exception, ``KeyboardInterrupt`` or a failed validation removes the temporary folder and
  leaves the target as it was. A process killed outright leaves a stale temporary folder that the
  next writer for the same target removes.
"""
from __future__ import annotations

import ctypes
import datetime as _dt
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from . import contract
from .contract import DatasetError



#: The writer's folders beside a target: ``.<name>.partial-<pid>-<hex>`` while a run is written (``open``) and
#: ``.<name>.old-<pid>-<hex>`` for the replaced run during a swap (``_install``).
STALE_FOLDER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)-[0-9a-f]+$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, ValueError):
        return False  # no such process can exist
    except OSError:
        return True  # it exists, but is not ours
    return True


def tidy_stale(parent: str | os.PathLike, name: str | None = None, log: Any = None) -> list[str]:
    """Tidy what killed writers left in ``parent`` (for target ``name`` only, or for every target): remove their
    partial folders, and put a backup left by a killed swap back when its run is missing. Folders of live
    processes and anything else are left alone. Returns the folder names it removed or restored."""
    done: list[str] = []
    try:
        entries = sorted(Path(parent).iterdir())
    except OSError:
        return done
    for entry in entries:
        m = STALE_FOLDER.match(entry.name)
        if not m or (name is not None and m.group("name") != name) or _pid_alive(int(m.group("pid"))):
            continue
        try:
            if entry.is_symlink() or not entry.is_dir():
                continue
            target = entry.parent / m.group("name")
            if m.group("kind") == "old" and not target.exists() and not target.is_symlink():
                os.rename(entry, target)
                what = f"restored {entry.name} as {target.name}: a backup left by a killed process while it replaced the run"
            else:
                shutil.rmtree(entry)
                what = f"removed {entry.name}: a partial run left by a process that no longer runs"
            done.append(entry.name)
            if log is not None:
                log(what)
        except OSError as exc:
            if log is not None:
                log(f"could not tidy {entry.name}: {exc.strerror or type(exc).__name__}")
    return done


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False if unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    return fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def _json_bytes(name: str, obj: Any) -> bytes:
    try:
        text = json.dumps(obj, indent=1, allow_nan=False, default=_json_default)
    except ValueError as exc:  # NaN / Infinity
        raise DatasetError(f"{name}: {exc}") from None
    except TypeError as exc:
        raise DatasetError(f"{name}: not JSON-serialisable: {exc}") from None
    return (text + "\n").encode("utf-8")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


class RunWriter:
    """Build a run in a temporary folder beside ``target`` and rename it into place at ``finish``.

    ``overwrite=False`` refuses an existing non-empty ``target`` (checked in the constructor, so
    callers fail before doing any work, and again at the final rename). ``validate=True`` runs
    the validator on the finished folder and refuses to install a run with problems.
    """

    def __init__(self, target: str | os.PathLike, *, overwrite: bool = False, validate: bool = True):
        self.target = Path(target)
        self.overwrite = bool(overwrite)
        self.validate = bool(validate)
        self._check_target()
        self.tmp: Path | None = None
        self._created_dirs: list[Path] = []
        self._files: dict[str, dict[str, Any]] = {}
        self._layer_shapes: dict[tuple[str, int], tuple[int, ...]] = {}
        self._finished = False
        self.bytes_written = 0
        self.final_bytes: int | None = None
        self.report = None

    # ------------------------------------------------------------------ lifecycle
    def _check_target(self) -> None:
        t = self.target
        if t.is_symlink():
            raise DatasetError(f"{t}: is a symlink; give the real folder")
        if t.exists():
            if not t.is_dir():
                raise DatasetError(f"{t}: exists and is not a folder")
            if any(t.iterdir()) and not self.overwrite:
                raise DatasetError(f"{t}: folder exists and is not empty; pass overwrite=True (--overwrite-output) to replace it")

    def __enter__(self) -> "RunWriter":
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self._finished:
            self.abort()
        return False

    def open(self) -> Path:
        """Create the temporary folder (and any missing parents, removed again on abort)."""
        if self.tmp is not None:
            return self.tmp
        parent = self.target.absolute().parent
        missing = []
        p = parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir()
            self._created_dirs.append(d)
        tidy_stale(parent, self.target.name)
        prefix = f".{self.target.name}.partial-{os.getpid()}-"
        self.tmp = parent / (prefix + secrets.token_hex(4))
        self.tmp.mkdir()
        return self.tmp

    def abort(self) -> None:
        """Remove the temporary folder and any parent folders this writer created; the target is untouched."""
        if self.tmp is not None and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp = None
        for d in reversed(self._created_dirs):
            try:
                d.rmdir()
            except OSError:
                break
        self._created_dirs = []

    # ------------------------------------------------------------------ writing
    def _require_open(self) -> Path:
        if self._finished:
            raise DatasetError(f"{self.target}: this writer has already finished")
        return self.tmp if self.tmp is not None else self.open()

    def write_bytes(self, relpath: str, data: bytes, *, kind: str, **extra: Any) -> dict[str, Any]:
        """Write one artifact and add it to the manifest (bytes, sha256, kind and ``extra`` fields)."""
        tmp = self._require_open()
        contract.check_relative_path(relpath)
        if relpath in contract.UNLISTED_FILES:
            raise DatasetError(f"{relpath}: written by finish(), not by write_bytes()")
        if relpath in self._files:
            raise DatasetError(f"{relpath}: written twice")
        if kind not in contract.KINDS:
            raise DatasetError(f"{relpath}: unknown kind {kind!r}")
        full = tmp / relpath
        full.parent.mkdir(parents=True, exist_ok=True)
        with open(full, "wb") as fh:
            fh.write(data)
        entry = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "kind": kind, **extra}
        self._files[relpath] = entry
        self.bytes_written += len(data)
        return entry

    def write_map(self, relpath: str, array: Any, *, kind: str) -> dict[str, Any]:
        """Write an attention map as float16 LE C-order bytes; its shape goes into the manifest."""
        arr = np.ascontiguousarray(np.asarray(array), dtype=contract.BIN_DTYPE)
        return self.write_bytes(relpath, arr.tobytes(order="C"), kind=kind,
                                dtype=contract.BIN_DTYPE, shape=[int(n) for n in arr.shape])

    def write_image(self, relpath: str, image: Any) -> dict[str, Any]:
        """Write a PNG from a PIL image or a uint8 ``[H, W, 3]`` array."""
        from PIL import Image

        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise DatasetError(f"{relpath}: image array must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
            image = Image.fromarray(image, "RGB")
        elif not isinstance(image, Image.Image):
            raise DatasetError(f"{relpath}: image must be a PIL image or a uint8 array, got {type(image).__name__}")
        if image.mode != "RGB":
            image = image.convert("RGB")
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return self.write_bytes(relpath, buf.getvalue(), kind=contract.KIND_IMAGE,
                                shape=[image.height, image.width, 3])

    def _check_layer_shape(self, kind: str, layer: int, shape: tuple[int, ...]) -> None:
        # Cross: [T, h, w] (head-mean) or [heads, T, h, w] (per head); grids may be non-square.
        # Text and concept: [T, h, w]. Self: [sh*sw, sh*sw], query cells x key cells.
        if kind == contract.KIND_CROSS:
            ok, expected = len(shape) in (3, 4), "[T, h, w] or [heads, T, h, w]"
        elif kind in (contract.KIND_TEXT, contract.KIND_CONCEPT):
            ok, expected = len(shape) == 3, "[T, h, w]"
        else:
            ok, expected = len(shape) == 2 and shape[0] == shape[1], "[s*s, s*s]"
        if not ok:
            raise DatasetError(f"{kind} map for layer {layer}: shape {list(shape)} is not {expected}")
        seen = self._layer_shapes.setdefault((kind, layer), shape)
        if seen != shape:
            raise DatasetError(f"{kind} map for layer {layer}: shape {list(shape)} differs from earlier steps' {list(seen)}")

    def write_final_image(self, image: Any) -> dict[str, Any]:
        """Write the pipeline's own output (uint8 ``[H, W, 3]`` or PIL) as ``contract.FINAL_IMAGE``; required in schema 2."""
        return self.write_image(contract.FINAL_IMAGE, image)

    def write_step(
        self,
        step: int,
        *,
        image: Any = None,
        cross: Mapping[int, Any] | None = None,
        self_: Mapping[int, Any] | None = None,
        text: Mapping[int, Any] | None = None,
        concept: Mapping[int, Any] | None = None,
    ) -> None:
        """Write one denoising step now: its preview PNG and its maps ``{layer_index: array}`` of each kind."""
        if image is not None:
            self.write_image(contract.image_path(step), image)
        for kind, maps in ((contract.KIND_CROSS, cross), (contract.KIND_SELF, self_),
                           (contract.KIND_TEXT, text), (contract.KIND_CONCEPT, concept)):
            for layer, array in (maps or {}).items():
                arr = np.asarray(array)
                self._check_layer_shape(kind, int(layer), tuple(int(n) for n in arr.shape))
                self.write_map(contract.map_path(kind, layer, step), arr, kind=kind)

    # ------------------------------------------------------------------ finishing
    def finish(
        self,
        metadata: Mapping[str, Any],
        metrics: Mapping[str, Any],
        latent_pca: Mapping[str, Any],
        latents: Any = None,
        noise: Any = None,
        *,
        max_bytes: int | None = None,
    ) -> Path:
        """Write the JSON files, manifest and ``validation.json``; then move the run into place.

        Raises :class:`DatasetError` (and leaves the target as it was) when the new run fails
        validation or, with ``max_bytes``, when its real size is over that budget.
        Returns the target path.
        """
        tmp = self._require_open()
        try:
            if latents is not None or noise is not None:
                self._write_latents(latents, noise)
            self.write_bytes(contract.METRICS_FILE, _json_bytes(contract.METRICS_FILE, metrics), kind=contract.KIND_JSON)
            self.write_bytes(contract.PCA_FILE, _json_bytes(contract.PCA_FILE, latent_pca), kind=contract.KIND_JSON)
            meta = dict(metadata)
            meta.setdefault("schema_version", contract.SCHEMA_VERSION)
            meta.setdefault("generator", contract.generator())
            meta.setdefault("created", _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
            meta["files"] = {k: self._files[k] for k in sorted(self._files)}
            (tmp / contract.METADATA_FILE).write_bytes(_json_bytes(contract.METADATA_FILE, meta))

            from .validate import check_run, report_json

            self.report = check_run(tmp, expect_validation_file=False) if self.validate else None
            if self.report is not None:
                (tmp / contract.VALIDATION_FILE).write_bytes(_json_bytes(contract.VALIDATION_FILE, report_json(self.report)))
                if self.report.problems:
                    more = f" (and {len(self.report.problems) - 1} more)" if len(self.report.problems) > 1 else ""
                    raise DatasetError(f"the new run failed validation: {self.report.problems[0]}{more}")
            size = contract.dataset_bytes(tmp)
            if max_bytes is not None and size > max_bytes:
                raise DatasetError(
                    f"the run is {size / 1e6:.1f} MB, over the {max_bytes / 1e6:.1f} MB limit; not written"
                )
            self._install(tmp)
            self.final_bytes = size
        except BaseException:
            self.abort()
            raise
        self._finished = True
        self.tmp = None
        self._created_dirs = []
        return self.target

    def _write_latents(self, latents: Any, noise: Any) -> None:
        if latents is None or noise is None:
            raise DatasetError(f"{contract.LATENTS_FILE}: both latents and noise are needed")
        arrays = {
            "latents": np.ascontiguousarray(np.asarray(latents), dtype=contract.BIN_DTYPE),
            "noise": np.ascontiguousarray(np.asarray(noise), dtype=contract.BIN_DTYPE),
        }
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        self.write_bytes(
            contract.LATENTS_FILE, buf.getvalue(), kind=contract.KIND_LATENTS,
            arrays={k: {"dtype": contract.BIN_DTYPE, "shape": [int(n) for n in v.shape]} for k, v in arrays.items()},
        )

    def _install(self, tmp: Path) -> None:
        target = self.target
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            raise DatasetError(f"{target}: exists and is not a folder")
        if not target.exists():
            os.rename(tmp, target)
            return
        if not any(target.iterdir()):
            os.rmdir(target)
            os.rename(tmp, target)
            return
        if not self.overwrite:
            raise DatasetError(f"{target}: folder appeared while writing and is not empty; not replaced")
        if _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old run
            return
        backup = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(target, backup)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(backup, target)
            raise
        shutil.rmtree(backup, ignore_errors=True)
