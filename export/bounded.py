"""Bounded reads of untrusted runs: the one place where ``validate``, the reader, the dashboard and the bridge
open files, parse JSON and unpack ``.npz`` archives.

Every function checks what it is about to do against ``export.contract``'s caps before doing it, and fails
with :class:`export.contract.DatasetError` (one line):

* :func:`open_regular` opens only regular files that resolve inside the run, without blocking (a FIFO is
  refused, not waited on), and checks the size before a byte is read;
* :func:`parse_json` refuses what ``json`` would accept but a run must not hold: numbers that overflow to
  infinity, ``NaN``/``Infinity``, duplicate keys, nesting deeper than ``MAX_JSON_DEPTH``;
* :func:`npz_arrays` reads the zip directory and each member's ``.npy`` header before decompressing data;
* :func:`metadata_bounds` checks counts, ranks, dimensions and string lengths of ``metadata.json`` before
  any other work looks at it.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import stat
import zipfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping, Sequence

import numpy as np

from . import contract
from .contract import DatasetError, shown

CHUNK = 1 << 20


class MissingFile(DatasetError):
    """The file does not exist (a DatasetError like every other failure here)."""
_FILE_TYPES = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


# ============================================================================ files
def _what(mode: int) -> str:
    return next((name for test, name in _FILE_TYPES if test(mode)), "not a plain file")


@contextlib.contextmanager
def open_regular(root: str | os.PathLike, relpath: str, *, limit: int, expect: int | None = None) -> Iterator[BinaryIO]:
    """``root/relpath`` opened for reading, if it is a regular file inside ``root`` of at most ``limit`` bytes
    (and exactly ``expect`` bytes when given). Symlinks inside the run are followed; links out are refused."""
    try:
        full = contract.resolve_inside(root, relpath)
    except (RuntimeError, OSError) as exc:  # Path.resolve raises RuntimeError on a symlink loop
        raise DatasetError(f"{relpath}: unreadable ({'a symlink loop' if 'loop' in str(exc).lower() else exc})") from None
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(full, flags)
    except FileNotFoundError:
        raise MissingFile(f"{relpath}: missing") from None
    except OSError as exc:
        raise DatasetError(f"{relpath}: unreadable ({exc.strerror or type(exc).__name__})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DatasetError(f"{relpath}: not a regular file ({_what(st.st_mode)})")
        if st.st_size > limit:
            raise DatasetError(f"{relpath}: {st.st_size} bytes, over the cap of {limit}")
        if expect is not None and st.st_size != expect:
            raise DatasetError(f"{relpath}: size {st.st_size} bytes != manifest bytes {expect} (truncated or changed)")
        os.set_blocking(fd, True)
        fh = os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise
    with fh:
        yield fh


def read_limited(fh: BinaryIO, relpath: str, limit: int) -> bytes:
    """All of ``fh``, refusing more than ``limit`` bytes (a file that grows while it is read)."""
    parts, total = [], 0
    while chunk := fh.read(min(CHUNK, limit + 1 - total)):
        parts.append(chunk)
        total += len(chunk)
        if total > limit:
            raise DatasetError(f"{relpath}: grew past the cap of {limit} bytes while being read")
    return b"".join(parts)


def read_file(root: str | os.PathLike, relpath: str, *, limit: int, expect: int | None = None) -> bytes:
    """The bytes of a regular file inside ``root`` (see :func:`open_regular`); never more than ``limit``."""
    with open_regular(root, relpath, limit=limit, expect=expect) as fh:
        data = read_limited(fh, relpath, limit)
    if expect is not None and len(data) != expect:
        raise DatasetError(f"{relpath}: read {len(data)} bytes != manifest bytes {expect} (changed while read)")
    return data


def sha256_file(root: str | os.PathLike, relpath: str, *, limit: int, expect: int) -> str:
    """The sha256 of a regular file of exactly ``expect`` bytes, hashed in 1 MiB chunks."""
    digest, total = hashlib.sha256(), 0
    with open_regular(root, relpath, limit=limit, expect=expect) as fh:
        while chunk := fh.read(min(CHUNK, expect + 1 - total)):
            digest.update(chunk)
            total += len(chunk)
            if total > expect:
                break
    if total != expect:
        raise DatasetError(f"{relpath}: read {total} bytes != manifest bytes {expect} (changed while read)")
    return digest.hexdigest()


# ============================================================================ JSON
def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} overflows to infinity")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {shown(dup, 60)}")
    return out


#: bytes scanned at a time by :func:`json_structure_problem` (its arrays stay a few times this size)
SCAN_CHUNK = 1 << 20


def json_structure_problem(data: bytes, depth: int = contract.MAX_JSON_DEPTH,
                           max_string: int = contract.MAX_STRING_CHARS, max_items: int | None = None) -> str | None:
    """What is wrong with the nesting, string lengths or item count of JSON text (UTF-8 bytes), or None.

    Vectorised over the bytes, chunk by chunk (memory a few MB whatever the size), so it costs milliseconds on the
    largest allowed document: real quotes are those not escaped by an odd run of backslashes; brackets and commas
    between a pair of them are inside a string. ``max_items`` bounds the values the parser would build (commas
    and opening brackets outside strings, an upper bound of the values and keys less one), since a parsed value
    costs 50-100 bytes where its text may cost two.
    """
    b = np.frombuffer(data, np.uint8)
    quotes_before = 0           # real quotes before the chunk: odd while a string is open
    open_start = -1             # where the open string started
    plain_before = -1           # the last byte before the chunk that is not a backslash
    level = items = 0
    for at in range(0, b.size, SCAN_CHUNK):
        chunk = b[at:at + SCAN_CHUNK]
        quotes = np.flatnonzero(chunk == 34)
        backslash = chunk == 92
        if quotes.size and (backslash.any() or plain_before != at - 1):  # a backslash here or just before
            # a quote is escaped by an odd run of backslashes before it: the run's length is the distance to the
            # last byte that is not a backslash (carried over from the chunks before)
            plain = np.where(backslash, -1, np.arange(at, at + chunk.size))
            plain[0] = max(int(plain[0]), plain_before)
            plain = np.maximum.accumulate(plain)
            last_plain = np.where(quotes > 0, plain[np.maximum(quotes - 1, 0)], plain_before)
            quotes = quotes[(quotes + at - 1 - last_plain) % 2 == 0]
        if not backslash[-1]:
            plain_before = at + chunk.size - 1
        elif not backslash.all():
            plain_before = at + int(np.flatnonzero(~backslash)[-1])
        odd = quotes_before % 2

        def outside(positions: np.ndarray) -> np.ndarray:
            return (np.searchsorted(quotes, positions, side="right") + odd) % 2 == 0

        brackets = np.flatnonzero((chunk == 91) | (chunk == 123) | (chunk == 93) | (chunk == 125))
        brackets = brackets[outside(brackets)]
        if brackets.size:
            opening = (chunk[brackets] == 91) | (chunk[brackets] == 123)
            levels = np.cumsum(np.where(opening, 1, -1).astype(np.int32)) + level
            if int(levels.max()) > depth:
                return f"nested deeper than {depth} levels"
            level = int(levels[-1])
            items += int(np.count_nonzero(opening))
        if max_items is not None:
            commas = np.flatnonzero(chunk == 44)
            items += int(np.count_nonzero(outside(commas)))
            if items > max_items:
                return f"more than {max_items} values, over the cap"
        marks = quotes.astype(np.int64) + at
        if odd:
            marks = np.concatenate(([open_start], marks))
        starts, ends = marks[0::2], marks[1::2]
        open_start = int(marks[-1]) if marks.size % 2 else -1
        quotes_before += quotes.size
        for i in np.flatnonzero(ends - starts[:ends.size] - 1 > max_string):  # raw length bounds the decoded one
            raw = int(ends[i] - starts[i] - 1)
            if raw > 12 * max_string:  # no character takes more than 12 bytes (an escaped surrogate pair)
                return f"a string of {raw} bytes, over the cap of {max_string} characters"
            try:
                length = len(json.loads(data[starts[i]:ends[i] + 1]))
            except ValueError:
                continue  # the parser names it
            if length > max_string:
                return f"a string of {length} characters, over the cap of {max_string}"
    return None


def parse_json(name: str, data: bytes | str, *, depth: int = contract.MAX_JSON_DEPTH,
               max_items: int | None = None) -> Any:
    """``data`` as JSON, or DatasetError naming what is wrong (see the module docstring); ``max_items``: see
    :func:`json_structure_problem`."""
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    # the bytes are scanned before they are decoded: a decoded string may take four times their size
    raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
    problem = json_structure_problem(raw, depth, max_items=max_items)
    del raw
    if problem:
        raise DatasetError(f"{name}: not valid JSON ({problem})")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError:
        raise DatasetError(f"{name}: not UTF-8 text") from None
    try:
        return json.loads(text, parse_float=_finite_float, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{name}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise DatasetError(f"{name}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # our hooks, and ints past Python's digit limit
        raise DatasetError(f"{name}: not valid JSON ({exc})") from None


def read_json(root: str | os.PathLike, relpath: str, limit: int | None = None) -> Any:
    """A JSON file of a run, read within its cap (``contract.MAX_JSON_BYTES`` by name) and parsed by :func:`parse_json`."""
    cap = limit if limit is not None else contract.MAX_JSON_BYTES.get(relpath, contract.MAX_OTHER_JSON_BYTES)
    return parse_json(relpath, read_file(root, relpath, limit=cap))


# ============================================================================ .npz
#: The most members a .npz may list before its directory is parsed.
MAX_NPZ_MEMBERS = 16


def _zip_entry_count(fh: BinaryIO) -> int | None:
    """The member count from the zip's end-of-central-directory record (None if there is none)."""
    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    tail_len = min(size, 65535 + 22)
    fh.seek(size - tail_len)
    tail = fh.read(tail_len)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + 22 > len(tail):
        return None
    fh.seek(0)
    return int.from_bytes(tail[at + 10:at + 12], "little")


def npz_arrays(name: str, data: bytes | BinaryIO, want: Mapping[str, tuple[str, Sequence[int]]]) -> dict[str, np.ndarray]:
    """The arrays ``want`` names (``{member: (dtype, shape)}``) from ``.npz`` bytes or a seekable file.

    The zip directory is read first (exactly the wanted members, once each, stored or deflated), then each
    member's ``.npy`` header (dtype, shape, C order) before its data; decompression stops at the expected size.
    """
    fh = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    count = _zip_entry_count(fh)
    if count is None:
        raise DatasetError(f"{name}: is not a .npz (zip) archive")
    if count > MAX_NPZ_MEMBERS:  # 0xFFFF (zip64) included: ours never need it
        raise DatasetError(f"{name}: the zip lists {count} members, over the cap of {MAX_NPZ_MEMBERS}")
    try:
        zf = zipfile.ZipFile(fh)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError):
        raise DatasetError(f"{name}: is not a .npz (zip) archive") from None
    with zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        expected = {m + ".npy": (np.dtype(d), [int(n) for n in s]) for m, (d, s) in want.items()}
        if len(names) != len(set(names)):
            raise DatasetError(f"{name}: the zip lists a member twice")
        if set(names) != set(expected):
            raise DatasetError(f"{name}: zip members {sorted(names)[:6]} are not {sorted(expected)}")
        out = {}
        for info in infos:
            dtype, shape = expected[info.filename]
            body = math.prod(shape) * dtype.itemsize
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise DatasetError(f"{name}: {info.filename} uses zip compression {info.compress_type}, not deflate")
            if info.flag_bits & 0x1:
                raise DatasetError(f"{name}: {info.filename} is encrypted")
            # a .npy header is at most 64 KiB in format 1.0 and 2.0 as numpy writes them
            if info.file_size > body + 65536 or body > contract.MAX_LATENTS_BYTES:
                raise DatasetError(f"{name}: {info.filename} unpacks to {info.file_size} bytes, over the cap of "
                                   f"{min(body + 65536, contract.MAX_LATENTS_BYTES)} for shape {shape}")
            out[info.filename[:-4]] = _npy_member(name, zf, info, dtype, shape, body)
        return out


def _npy_member(name: str, zf: zipfile.ZipFile, info: zipfile.ZipInfo, dtype: np.dtype,
                shape: list[int], body: int) -> np.ndarray:
    member = info.filename
    try:
        with zf.open(info) as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                got_shape, fortran, got_dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                got_shape, fortran, got_dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                raise DatasetError(f"{name}: {member} has .npy format {version}, not 1.0 or 2.0")
            if got_dtype.hasobject:
                raise DatasetError(f"{name}: {member} holds Python objects (pickled data), not numbers")
            if got_dtype != dtype:
                raise DatasetError(f"{name}: {member} is {got_dtype}, not {dtype}")
            if list(got_shape) != shape:
                raise DatasetError(f"{name}: {member} has shape {list(got_shape)[:8]}, expected {shape}")
            if fortran:
                raise DatasetError(f"{name}: {member} is stored in Fortran order, not C order")
            raw = fh.read(body + 1)
    except DatasetError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{name}: {member} does not unpack ({type(exc).__name__}: {str(exc)[:80]})") from None
    if len(raw) != body:
        raise DatasetError(f"{name}: {member} holds {len(raw)} data bytes, shape {shape} needs {body}")
    return np.frombuffer(raw, dtype).reshape(shape)


# ============================================================================ PNG
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(name: str, data: bytes, want: Sequence[int] | None = None) -> tuple[int, int]:
    """``(height, width)`` from a PNG's IHDR chunk, checked against ``MAX_IMAGE_SIDE`` (and ``want``, the
    manifest's ``[H, W, ...]``) before any pixel is unpacked: a small file can claim 60000 x 60000."""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise DatasetError(f"{name}: does not decode as an image (no PNG signature and IHDR chunk)")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if max(height, width) > contract.MAX_IMAGE_SIDE:
        raise DatasetError(f"{name}: its header says {height}x{width}, over the cap of {contract.MAX_IMAGE_SIDE} a side")
    if want is not None and [height, width] != [int(v) for v in list(want)[:2]]:
        raise DatasetError(f"{name}: decodes to {height}x{width} but the manifest says {want[0]}x{want[1]}")
    return height, width


# ============================================================================ metadata caps
def _count(problems: list[str], what: str, value: Any, cap: int) -> None:
    if isinstance(value, (list, dict, str)) and len(value) > cap:
        problems.append(f"{contract.METADATA_FILE}: {len(value)} {what}, over the cap of {cap}")


def _shape(problems: list[str], where: str, shape: Any, dim_cap: int) -> None:
    if shape is None or not isinstance(shape, list):
        return
    if len(shape) > contract.MAX_RANK:
        problems.append(f"{where}: a shape of {len(shape)} dimensions, over the cap of {contract.MAX_RANK}")
    elif any(isinstance(d, int) and not isinstance(d, bool) and not 0 <= d <= dim_cap for d in shape):
        problems.append(f"{where}: shape {shape} has a side outside 0..{dim_cap}")


def metadata_bounds(meta: Any) -> list[str]:
    """Problems with ``metadata.json``'s counts, shapes and strings against the caps (empty: within them).

    Runs before the schema and every other check, so none of them ever walks an oversized document."""
    if not isinstance(meta, dict):
        return []
    c = contract
    problems: list[str] = []
    _count(problems, "timesteps", meta.get("timesteps"), c.MAX_STEPS)
    _count(problems, "layers", meta.get("layers"), c.MAX_LAYERS)
    _count(problems, "tokens", meta.get("tokens"), c.MAX_TOKENS)
    _count(problems, "words", meta.get("words"), c.MAX_TOKENS)
    _count(problems, "token_sets", meta.get("token_sets"), 16)
    _count(problems, "manifest entries", meta.get("files"), c.MAX_FILES)
    run = meta.get("run")
    if isinstance(run, dict):
        for key in ("prompt", "negative_prompt"):
            if isinstance(run.get(key), str) and len(run[key]) > c.MAX_PROMPT_CHARS:
                problems.append(f"{c.METADATA_FILE}: run.{key} has {len(run[key])} characters, over the cap of {c.MAX_PROMPT_CHARS}")
        steps = run.get("num_steps")
        if isinstance(steps, int) and not isinstance(steps, bool) and not 0 <= steps <= c.MAX_STEPS:
            problems.append(f"{c.METADATA_FILE}: run.num_steps {shown(steps, 40)}, over the cap of {c.MAX_STEPS}")
        for key in ("height", "width"):
            side = run.get(key)
            if isinstance(side, int) and not isinstance(side, bool) and not 0 <= side <= c.MAX_IMAGE_SIDE:
                problems.append(f"{c.METADATA_FILE}: run.{key} {shown(side, 40)}, over the cap of {c.MAX_IMAGE_SIDE}")
    _shape(problems, f"{c.METADATA_FILE}: latent_shape", meta.get("latent_shape"), 1 << 16)
    if problems:
        return problems  # counts first: nothing below walks an oversized list
    steps, layers = meta.get("timesteps"), meta.get("layers")
    if isinstance(steps, list) and isinstance(layers, list):
        maps = sum(isinstance(la, dict) and (la.get("cross_shape") is not None) + (la.get("self_shape") is not None)
                   for la in layers)
        files = len(steps) * (maps + 1) + 1 + len(c.JSON_FILES) + 1  # maps and previews, final image, JSON, latents
        if files > c.MAX_FILES:
            return [f"{c.METADATA_FILE}: {len(steps)} steps x {maps} map layers make {files} files, over the cap of {c.MAX_FILES}"]
    for i, layer in enumerate(meta.get("layers") or []):
        if not isinstance(layer, dict):
            continue
        where = f"{c.METADATA_FILE}: layers[{i}]"
        _shape(problems, f"{where}.cross_shape", layer.get("cross_shape"), max(c.MAX_TOKENS, c.MAX_GRID_SIDE, c.MAX_HEADS))
        _shape(problems, f"{where}.self_shape", layer.get("self_shape"), c.MAX_GRID_SIDE ** 2)
        for key in ("self_grid", "native"):
            _shape(problems, f"{where}.{key}", layer.get(key), c.MAX_GRID_SIDE * 16 if key == "native" else c.MAX_GRID_SIDE)
        heads = layer.get("heads")
        if isinstance(heads, int) and not isinstance(heads, bool) and not 0 <= heads <= c.MAX_HEADS:
            problems.append(f"{where}.heads {shown(heads, 40)}, over the cap of {c.MAX_HEADS}")
        if len(problems) > c.MAX_PROBLEMS:
            return problems
    files = meta.get("files")
    if isinstance(files, dict):
        for rel, entry in files.items():
            if isinstance(entry, dict):
                _shape(problems, f"{c.METADATA_FILE}: files[{shown(rel, 60)}].shape", entry.get("shape"), 1 << 30)
                if len(problems) > c.MAX_PROBLEMS:
                    return problems
    return problems


#: The longest list metrics.json and latent_pca.json can hold: one value per step, layer or token.
MAX_LIST = max(contract.MAX_STEPS, contract.MAX_LAYERS, contract.MAX_TOKENS)


def list_bounds(name: str, doc: Any, cap: int = MAX_LIST) -> str | None:
    """The first list in ``doc`` longer than ``cap``, as a problem line (None: all within it). Checked before the
    schema, which would otherwise walk a million valid numbers one by one."""
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            if len(node) > cap:
                return f"{name}: a list of {len(node)} values, over the cap of {cap}"
            stack.extend(v for v in node if isinstance(v, (list, dict)))
        elif isinstance(node, dict):
            stack.extend(v for v in node.values() if isinstance(v, (list, dict)))
    return None


# ============================================================================ problem lines
class Problems:
    """Problem lines, of which the first ``MAX_PROBLEMS`` are kept; the rest are counted."""

    def __init__(self, cap: int = contract.MAX_PROBLEMS):
        self.cap = cap
        self.lines: list[str] = []
        self.dropped = 0

    def add(self, line: str) -> None:
        if len(self.lines) < self.cap:
            self.lines.append(printable(line))
        else:
            self.dropped += 1

    def __len__(self) -> int:
        return len(self.lines) + self.dropped

    def __bool__(self) -> bool:
        return bool(self.lines)

    def report(self) -> list[str]:
        more = [f"… and {self.dropped} more problem{'s' if self.dropped != 1 else ''}"] if self.dropped else []
        return self.lines + more


def printable(line: str) -> str:
    """One line, with whitespace runs folded and undecodable file-name bytes shown as ``\\xff`` escapes."""
    text = " ".join(str(line).split())
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape" if _surrogateescaped(text) else "backslashreplace") \
            .decode("utf-8", "backslashreplace")


def _surrogateescaped(text: str) -> bool:
    return all(not (0xD800 <= ord(c) <= 0xDFFF) or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


def folder_name(path: str | os.PathLike) -> str:
    """A file or folder name as printable text (``os.fsdecode`` with undecodable bytes escaped)."""
    return printable(os.fsdecode(Path(path)))
