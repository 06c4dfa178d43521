"""An adversarial corpus for ``diffviz validate`` (issue 14), built on the fly from one synthetic run.

Nothing here is shipped: every case is a function that damages a fresh copy of a tiny valid run
(schema 2, 3 steps, 2 layers, latents included). Big cases stay cheap to build: sparse files
(``os.truncate``), a zip bomb made by repeating one full-flushed deflate block (a few MB on disk,
GBs when inflated, CRC computed by ``crc32_combine`` arithmetic, never by inflating), FIFOs, device
nodes and symlinks to ``/dev/zero``.

    from tests import hostile
    corpus = hostile.build_all(tmp_dir)            # {case name: run folder | BuildFailure | Skip}
    with hostile.Zygote() as zygote:              # forks one capped child per case
        result = zygote.run("validate", corpus["fifo_metadata"], hostile.CASES_BY_NAME["fifo_metadata"].args)
    hostile.judge(case, result)                    # [] when handled as expected, else what went wrong

The sweep section (issue 25) damages copies of a tiny sweep instead (four synthetic runs, one pending): numbers,
labels, caps, the index file itself, the runs against their index entries, and ``file://`` URLs. Each case runs
``diffviz validate SWEEP`` (or ``export-figure``) and ``export.sweep.read_index``.

``python -m tests.hostile`` builds everything into a temporary folder, runs each case exactly as
``tests/test_validate_hostile.py`` does (memory cap, 10 s, strict UTF-8 stdout) with this checkout's code and
with the code of the commit before issue 25 (``--before REF``, extracted with ``git archive``), and prints a
markdown table per section: case | expected | before | after | exit | seconds | peak RSS | reader before |
reader after; then the worst time and memory of each group.

Expected messages use the keyword table of the hardening spec (case-insensitive substrings);
an ``expect`` element that is a tuple means "any one of these".
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]

#: Address-space cap for each validator subprocess (numpy imports fine under it with one BLAS thread).
MEMORY_CAP = 1536 << 20
#: Wall-clock limit for each validator subprocess (the issue's bound).
TIMEOUT_S = 10.0
#: At most 20 problem lines + "... and N more problems" + slack (the "ok:"/summary line).
MAX_STDOUT_LINES = 22
#: One line per problem, not a dump: the whole of stdout stays small even for a 200 MB prompt.
MAX_STDOUT_BYTES = 64 * 1024

# the synthetic run every case starts from
STEPS, LAYERS, TOKENS = 3, 2, 5
TEMPLATE_KW = dict(steps=STEPS, layers=LAYERS, tokens=TOKENS, r=4, s=2, image_size=8, latent_shape=(4, 2, 2),
                   save_latents=True, schema_version=2, seed=14)
LATENTS = "latents_noise_fp16.npz"
CROSS = "attention/cross/layer_0_step_001.bin"
IMAGE = "images/step_001.png"
IMAGE0 = "images/step_000.png"


class Skip(Exception):
    """This case cannot be built here (e.g. no permission to create a device node)."""


@dataclass
class BuildFailure:
    """The builder itself raised: the case is reported as failing, the rest of the corpus still runs."""
    error: str


@dataclass(frozen=True)
class Case:
    name: str
    damage: Callable[[Path], None]
    exit: int                                   # expected exit code of `validate`
    expect: tuple = ()                          # each: a keyword, or a tuple of alternatives
    forbid: tuple = ()                          # keywords that must not appear
    args: tuple[str, ...] = ()                  # e.g. ("--strict",)
    reader: bool = False                        # also: the section's reader must answer `reader_expect`
    note: str = ""
    section: str = "run"                        # "run": a damaged run; "sweep": a damaged sweep folder
    group: str = ""                             # the sweep section's groups (worst time and memory per group)
    kind: str = "validate"                      # the command judged: "validate" (diffviz validate) or "figure"
    reader_expect: str = "DatasetError"         # "DatasetError" or "OK"
    url: bool = False                           # the reader is given a file:// URL, not the path

    @property
    def expected(self) -> str:
        words = " + ".join("|".join(k) if isinstance(k, tuple) else k for k in self.expect)
        flags = " ".join(self.args)
        what = "" if self.kind == "validate" else f"{self.kind} "
        return f"{what}exit {self.exit}{' ' + flags if flags else ''}{': ' + words if words else ''}"


# ============================================================================ small helpers
def load_meta(root: Path) -> dict:
    return json.loads((root / "metadata.json").read_text())


def save_meta(root: Path, meta: dict) -> None:
    (root / "metadata.json").write_text(json.dumps(meta))


def load_json(root: Path, rel: str) -> Any:
    return json.loads((root / rel).read_text())


def rehash(root: Path, rel: str, meta: dict | None = None) -> None:
    """Make the manifest entry of ``rel`` match the file now on disk (bytes, sha256)."""
    own = meta is None
    meta = load_meta(root) if own else meta
    data = (root / rel).read_bytes()
    meta["files"][rel].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    if own:
        save_meta(root, meta)


def replace_file(root: Path, rel: str, data: bytes) -> None:
    """New content for a listed file, manifest re-hashed, so only the content checks can object."""
    p = root / rel
    if p.is_symlink() or p.exists():
        p.unlink()
    p.write_bytes(data)
    rehash(root, rel)


def with_raw(doc: Any, marker: str, raw: str) -> str:
    """``json.dumps(doc)`` with the string value ``marker`` replaced by raw JSON text ``raw``."""
    text = json.dumps(doc)
    token = json.dumps(marker)
    assert text.count(token) == 1, marker
    return text.replace(token, raw)


def mangle_listed_json(root: Path, rel: str, mutate: Callable[[Any], None], raw: str | None = None) -> None:
    """Mutate a listed JSON file (``metrics.json``/``latent_pca.json``), optionally splice raw text, re-hash."""
    doc = load_json(root, rel)
    mutate(doc)
    text = with_raw(doc, "__RAW__", raw) if raw is not None else json.dumps(doc)
    replace_file(root, rel, text.encode())


def replace_with(root: Path, rel: str, make: Callable[[Path], None]) -> None:
    p = root / rel
    if p.is_symlink() or p.is_file():
        p.unlink()
    make(p)


def png_with_ihdr(data: bytes, height: int, width: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` (CRC fixed), the rest unchanged."""
    assert data[12:16] == b"IHDR"
    body = bytearray(data[12:29])  # type + 13 bytes of IHDR data
    body[4:12] = struct.pack(">II", width, height)
    return data[:12] + bytes(body) + struct.pack(">I", zlib.crc32(bytes(body))) + data[33:]


# ============================================================================ zip / npz construction
def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=a.dtype == object)
    return buf.getvalue()


def npy_header(dtype: str, shape: Sequence[int], fortran: bool = False) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": fortran, "shape": tuple(shape)})
    return buf.getvalue()


_CRC_POLY = 0xEDB88320


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the CRC-32 polynomial (zlib's reflected bit order)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1


_X2N = [1 << 30]
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A||B from crc(A), crc(B) and len(B) (zlib's crc32_combine)."""
    p, k, n = 1 << 31, 3, len2
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return _multmodp(p, crc1) ^ crc2


@dataclass
class Member:
    name: str
    data: bytes                  # what is stored (already deflated when method == 8)
    crc: int
    usize: int                   # true (or claimed) uncompressed size
    method: int = 0


def stored(name: str, payload: bytes) -> Member:
    return Member(name, payload, zlib.crc32(payload), len(payload), 0)


def deflated(name: str, payload: bytes) -> Member:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return Member(name, c.compress(payload) + c.flush(), zlib.crc32(payload), len(payload), 8)


def deflated_zeros(name: str, prefix: bytes, zeros: int, chunk: int = 4 << 20) -> Member:
    """``prefix`` + ``zeros`` zero bytes, deflated without ever holding or inflating them: one full-flushed
    block of ``chunk`` zeros repeated (identical bytes after a full flush), CRC by arithmetic."""
    assert zeros % chunk == 0
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    z = bytes(chunk)
    block = c.compress(z) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(z) + c.flush(zlib.Z_FULL_FLUSH)
    assert block == again, "deflate blocks differ after a full flush"
    tail = c.flush()
    crc, zcrc = zlib.crc32(prefix), zlib.crc32(z)
    count = zeros // chunk
    for _ in range(count):
        crc = crc32_combine(crc, zcrc, chunk)
    return Member(name, head + block * count + tail, crc, len(prefix) + zeros, 8)


def zip_bytes(members: Sequence[Member]) -> bytes:
    """A plain zip (no zip64, no data descriptors) with exactly these members, duplicates allowed."""
    out, central = bytearray(), bytearray()
    for m in members:
        name = m.name.encode()
        offset = len(out)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, m.method, 0, 0x21, m.crc, len(m.data), m.usize,
                           len(name), 0) + name + m.data
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, m.method, 0, 0x21, m.crc, len(m.data),
                               m.usize, len(name), 0, 0, 0, 0, 0, offset) + name
    cd_offset = len(out)
    out += central
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), cd_offset, 0)
    return bytes(out)


def latents_arrays(root: Path) -> dict[str, np.ndarray]:
    with np.load(root / LATENTS) as z:
        return {k: z[k].copy() for k in z.files}


def npz_case(make: Callable[[dict[str, np.ndarray]], bytes]) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        replace_file(root, LATENTS, make(latents_arrays(root)))
    damage.__doc__ = make.__doc__
    return damage


# ============================================================================ the damage
# ---- FIFOs, devices, symlinks, folders, sparse files
def fifo_metadata(root: Path) -> None:
    replace_with(root, "metadata.json", lambda p: os.mkfifo(p))


def fifo_validation(root: Path) -> None:
    replace_with(root, "validation.json", lambda p: os.mkfifo(p))


def fifo_metrics(root: Path) -> None:
    replace_with(root, "metrics.json", lambda p: os.mkfifo(p))


def fifo_listed_map(root: Path) -> None:
    replace_with(root, CROSS, lambda p: os.mkfifo(p))


def fifo_unlisted(root: Path) -> None:
    os.mkfifo(root / "images" / "pipe")


def zero_symlink_listed_map(root: Path) -> None:
    replace_with(root, CROSS, lambda p: p.symlink_to("/dev/zero"))


def zero_symlink_metadata(root: Path) -> None:
    replace_with(root, "metadata.json", lambda p: p.symlink_to("/dev/zero"))


def zero_symlink_metrics(root: Path) -> None:
    replace_with(root, "metrics.json", lambda p: p.symlink_to("/dev/zero"))


def zero_symlink_validation(root: Path) -> None:
    replace_with(root, "validation.json", lambda p: p.symlink_to("/dev/zero"))


def symlink_inside(root: Path) -> None:
    """A listed preview that is a relative symlink to another preview of the run (fine: it stays inside)."""
    replace_with(root, IMAGE, lambda p: p.symlink_to(Path(IMAGE0).name))
    rehash(root, IMAGE)


def symlink_dir_outside(root: Path) -> None:
    (root / "attention" / "evil").symlink_to("/", target_is_directory=True)


def symlink_loop(root: Path) -> None:
    (root / "images" / "loop").symlink_to("loop")


def device_node_listed(root: Path) -> None:
    """A character device (1, 5) = /dev/zero's numbers, as a listed map, inside the run."""
    def make(p: Path) -> None:
        try:
            os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 5))
        except (PermissionError, OSError) as exc:
            raise Skip(f"cannot create a device node here: {exc}") from None
    replace_with(root, CROSS, make)


def folder_as_listed_file(root: Path) -> None:
    replace_with(root, CROSS, lambda p: p.mkdir())


def folder_as_metadata(root: Path) -> None:
    replace_with(root, "metadata.json", lambda p: p.mkdir())


def sparse_3gb_listed(root: Path) -> None:
    """The .npz grown to a sparse 3 GB, manifest bytes saying so (sha256 cannot match without reading it)."""
    p = root / LATENTS
    os.truncate(p, 3 * 10**9)
    meta = load_meta(root)
    meta["files"][LATENTS].update(bytes=3 * 10**9, sha256="0" * 64)
    save_meta(root, meta)


def sparse_3gb_image(root: Path) -> None:
    """A preview grown to a sparse 3 GB with the manifest agreeing on the size: the image byte cap refuses it."""
    os.truncate(root / IMAGE, 3 * 10**9)
    meta = load_meta(root)
    meta["files"][IMAGE].update(bytes=3 * 10**9, sha256="0" * 64)
    save_meta(root, meta)


def sparse_3gb_size_mismatch(root: Path) -> None:
    """A listed map grown to a sparse 3 GB, manifest unchanged: a size mismatch found without reading."""
    os.truncate(root / CROSS, 3 * 10**9)


# ---- npz
@npz_case
def npz_bomb_trailing(a):
    """The right .npy header and data for latents, then 3 GB of deflated zeros in the same member
    (numpy reads only what the header needs, so this one used to be accepted)."""
    prefix = npy_bytes(a["latents"])
    bomb = deflated_zeros("latents.npy", prefix, 3 * 10**9 - (3 * 10**9) % (4 << 20))
    return zip_bytes([bomb, stored("noise.npy", npy_bytes(a["noise"]))])


@npz_case
def npz_bomb_shape(a):
    """latents.npy claims [4, 4, 8192, 8192] float16 (2 GiB) and inflates to all of it."""
    shape = (a["latents"].shape[0], a["latents"].shape[1], 8192, 8192)
    bomb = deflated_zeros("latents.npy", npy_header("<f2", shape), int(np.prod(shape)) * 2)
    return zip_bytes([bomb, stored("noise.npy", npy_bytes(a["noise"]))])


@npz_case
def npz_size_liar(a):
    """A small member whose zip headers claim 3 GB uncompressed."""
    m = deflated("latents.npy", npy_bytes(a["latents"]))
    m.usize = 3 * 10**9
    return zip_bytes([m, stored("noise.npy", npy_bytes(a["noise"]))])


@npz_case
def npz_npy_header_huge_shape(a):
    """A tiny stored member whose .npy header claims [10^6, 10^6] float16."""
    return zip_bytes([stored("latents.npy", npy_header("<f2", (10**6, 10**6)) + bytes(64)),
                      stored("noise.npy", npy_bytes(a["noise"]))])


@npz_case
def npz_extra_member(a):
    """latents, noise, and an extra array."""
    return zip_bytes([stored(f"{k}.npy", npy_bytes(v)) for k, v in a.items()]
                     + [stored("extra.npy", npy_bytes(np.zeros(3, "<f2")))])


@npz_case
def npz_duplicate_member(a):
    """latents.npy twice (both valid); readers disagree on which one counts."""
    return zip_bytes([stored("latents.npy", npy_bytes(a["latents"])),
                      stored("latents.npy", npy_bytes(a["latents"] + 1)),
                      stored("noise.npy", npy_bytes(a["noise"]))])


@npz_case
def npz_missing_member(a):
    """Only latents, no noise."""
    return zip_bytes([stored("latents.npy", npy_bytes(a["latents"]))])


@npz_case
def npz_wrong_dtype(a):
    """latents stored as float32."""
    return zip_bytes([stored("latents.npy", npy_bytes(a["latents"].astype("<f4"))),
                      stored("noise.npy", npy_bytes(a["noise"]))])


@npz_case
def npz_fortran_order(a):
    """latents in Fortran order (the contract says C order)."""
    return zip_bytes([stored("latents.npy", npy_bytes(np.asfortranarray(a["latents"]))),
                      stored("noise.npy", npy_bytes(a["noise"]))])


@npz_case
def npz_object_dtype(a):
    """latents as a pickled object array."""
    obj = np.empty(a["latents"].shape, dtype=object)
    obj[...] = 0.0
    return zip_bytes([stored("latents.npy", npy_bytes(obj)), stored("noise.npy", npy_bytes(a["noise"]))])


@npz_case
def npz_random_bytes(a):
    """Random bytes where the .npz should be (must say "not a .npz (zip)", never "pickled")."""
    return np.random.default_rng(14).integers(0, 256, 734, dtype=np.uint8).tobytes()


@npz_case
def npz_empty(a):
    """A 0-byte .npz."""
    return b""


@npz_case
def npz_nan(a):
    """NaN in noise (an ordinary content check, through the new bounded path)."""
    a["noise"][0, 0, 0, 0] = np.nan
    return zip_bytes([stored(f"{k}.npy", npy_bytes(v)) for k, v in a.items()])


# ---- metadata counts and sizes (big lists are written as JSON text: json.dumps of 200k dicts is slow)
def _splice_meta(root: Path, edit: Callable[[dict], None], raws: dict[str, str], compact: bool = False) -> None:
    """Save metadata after ``edit``, each marker in ``raws`` replaced by raw JSON text (a bare marker is a
    string value; one starting with a quote is literal text of the default-separator dump)."""
    meta = load_meta(root)
    edit(meta)
    text = json.dumps(meta, separators=(",", ":") if compact else None)
    for marker, raw in raws.items():
        token = marker if marker.startswith('"') else json.dumps(marker)  # a bare marker is a string value
        assert text.count(token) == 1, marker
        text = text.replace(token, raw)
    (root / "metadata.json").write_text(text)


def _int_list(values: range) -> str:
    return "[" + ",".join(map(str, values)) + "]"


def _layers_raw(meta: dict, count: int) -> str:
    rec = dict(meta["layers"][0], index=-12345, name="b.-12345", block="b")
    pattern = json.dumps(rec, separators=(",", ":")).replace("-12345", "{i}").replace("{", "{{").replace("}", "}}")
    pattern = pattern.replace("{{i}}", "{i}")
    return "[" + ",".join(pattern.format(i=i) for i in range(count)) + "]"


def _steps(meta: dict, steps: int) -> dict:
    meta["run"]["num_steps"] = steps
    meta["timesteps"] = "__TIMESTEPS__"
    return {"__TIMESTEPS__": _int_list(range(steps, 0, -1))}


def timesteps_1e6(root: Path) -> None:
    raws: dict[str, str] = {}
    _splice_meta(root, lambda m: raws.update(_steps(m, 10**6)), raws)


def _grown(root: Path, steps: int, layers: int, compact: bool = False) -> None:
    raws: dict[str, str] = {}

    def edit(meta: dict) -> None:
        raws.update(_steps(meta, steps))
        raws["__LAYERS__"] = _layers_raw(meta, layers)
        meta["layers"] = "__LAYERS__"
    _splice_meta(root, edit, raws, compact)


def layers_200k(root: Path) -> None:
    """200k layers x 50 steps (compact JSON, under the metadata byte cap: the count cap must act)."""
    _grown(root, 50, 200_000, compact=True)


def shape_300k_dims_manifest(root: Path) -> None:
    meta = load_meta(root)
    meta["files"][CROSS]["shape"] = [1] * 300_000
    save_meta(root, meta)


def shape_300k_dims_layer(root: Path) -> None:
    meta = load_meta(root)
    meta["layers"][0]["cross_shape"] = [1] * 300_000
    save_meta(root, meta)


def missing_entries_within_caps(root: Path) -> None:
    """1000 steps x 48 layers (97,003 expected files, under MAX_FILES) with only the original 19 listed."""
    _grown(root, 1000, 48)


def missing_entries_over_cap(root: Path) -> None:
    """1000 steps x 100 layers: an expected layout of 201,003 files, over MAX_FILES."""
    _grown(root, 1000, 100)


def _wrong_entries(root: Path, count: int) -> None:
    raw = ",".join(f'"extra/f{i}.bin":{{"bytes":"many","kind":7}}' for i in range(count))

    def edit(meta: dict) -> None:
        meta["files"]["__X__"] = "__ENTRIES__"
    _splice_meta(root, edit, {'"__X__": "__ENTRIES__"': raw})


def manifest_99k_wrong_types(root: Path) -> None:
    """99,000 extra manifest entries (under MAX_FILES), each with a string `bytes` and a numeric `kind`."""
    _wrong_entries(root, 99_000)


def manifest_200k_wrong_types(root: Path) -> None:
    _wrong_entries(root, 200_000)


def metrics_1e6_schema_errors(root: Path) -> None:
    """latent_norm: 10^6 strings in metrics.json (a million schema errors, 6 MB)."""
    mangle_listed_json(root, "metrics.json", lambda m: m.update(latent_norm=["x"] * 10**6))


def metrics_1e6_valid_floats(root: Path) -> None:
    """latent_norm: 10^6 valid numbers (the schema would take ~12 s to walk them)."""
    mangle_listed_json(root, "metrics.json", lambda m: m.update(latent_norm=[0.5] * 10**6))


def tokens_100k(root: Path) -> None:
    def edit(meta: dict) -> None:
        tok = dict(meta["tokens"][1], index=-12345)
        pattern = json.dumps(tok).replace("-12345", "%d")
        raws["__TOKENS__"] = "[" + ",".join(pattern % i for i in range(100_000)) + "]"
        meta["tokens"] = "__TOKENS__"
    raws: dict[str, str] = {}
    _splice_meta(root, edit, raws)


def heads_1e6(root: Path) -> None:
    meta = load_meta(root)
    for layer in meta["layers"]:
        layer["heads"] = 10**6
    save_meta(root, meta)


def grid_side_100k(root: Path) -> None:
    meta = load_meta(root)
    meta["layers"][0]["cross_shape"] = [TOKENS, 100_000, 100_000]
    meta["layers"][0]["native"] = [100_000, 100_000]
    save_meta(root, meta)


def image_side_1e6(root: Path) -> None:
    meta = load_meta(root)
    meta["run"]["height"] = meta["run"]["width"] = 10**6
    save_meta(root, meta)


def model_id_10k(root: Path) -> None:
    meta = load_meta(root)
    meta["run"]["model"]["id"] = "m" * 10_000
    save_meta(root, meta)


def prompt_200mb(root: Path) -> None:
    meta = load_meta(root)
    meta["run"]["prompt"] = "__RAW__"
    with open(root / "metadata.json", "w") as f:
        head, tail = json.dumps(meta).split('"__RAW__"')
        f.write(head + '"')
        chunk = "a" * (1 << 20)
        for _ in range(200):
            f.write(chunk)
        f.write('"' + tail)


def prompt_30mb(root: Path) -> None:
    """30 MB prompt: under the metadata byte cap, so the prompt cap must act."""
    meta = load_meta(root)
    meta["run"]["prompt"] = "a" * (30 << 20)
    save_meta(root, meta)


def prompt_2001(root: Path) -> None:
    meta = load_meta(root)
    meta["run"]["prompt"] = "a" * 2001
    save_meta(root, meta)


def negative_prompt_2001(root: Path) -> None:
    meta = load_meta(root)
    meta["run"]["negative_prompt"] = "b" * 2001
    save_meta(root, meta)


# ---- JSON syntax and numbers
def _meta_raw(field_path: Sequence[str], raw: str) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        meta = load_meta(root)
        d = meta
        for k in field_path[:-1]:
            d = d[k]
        d[field_path[-1]] = "__RAW__"
        (root / "metadata.json").write_text(with_raw(meta, "__RAW__", raw))
    return damage


overflow_metadata = _meta_raw(("run", "cfg_scale"), "1e999")
overflow_negative_metadata = _meta_raw(("run", "seed"), "-1e999")
digits_400_height = _meta_raw(("run", "height"), "1" + "0" * 399)
digits_5000_seed = _meta_raw(("run", "seed"), "9" * 5000)
nan_literal_metadata = _meta_raw(("run", "cfg_scale"), "NaN")


def overflow_metrics(root: Path) -> None:
    mangle_listed_json(root, "metrics.json", lambda m: m["latent_norm"].__setitem__(0, "__RAW__"), "1e999")


def overflow_pca(root: Path) -> None:
    mangle_listed_json(root, "latent_pca.json", lambda p: p["coords"][0].__setitem__(0, "__RAW__"), "1e999")


def digits_400_metrics(root: Path) -> None:
    mangle_listed_json(root, "metrics.json", lambda m: m["latent_norm"].__setitem__(0, "__RAW__"),
                         "1" + "0" * 399)


def duplicate_manifest_key(root: Path) -> None:
    """metrics.json listed twice with identical entries: only duplicate-key detection can object."""
    meta = load_meta(root)
    entry = json.dumps(meta["files"]["metrics.json"])
    meta["files"]["__DUP__"] = "__RAW__"
    text = with_raw(meta, "__RAW__", entry).replace('"__DUP__"', '"metrics.json"')
    (root / "metadata.json").write_text(text)


def duplicate_key_metrics(root: Path) -> None:
    m = load_json(root, "metrics.json")
    text = json.dumps(m)
    text = '{"steps": ' + json.dumps(m["steps"]) + ", " + text[1:]
    replace_file(root, "metrics.json", text.encode())


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def deep_nesting_metadata(root: Path) -> None:
    meta = load_meta(root)
    meta["generator"]["extra"] = "__RAW__"
    (root / "metadata.json").write_text(with_raw(meta, "__RAW__", _deep(100_000)))


def deep_nesting_metrics(root: Path) -> None:
    mangle_listed_json(root, "metrics.json", lambda m: m.update(extra="__RAW__"), _deep(100_000))


def deep_nesting_65(root: Path) -> None:
    """Just past MAX_JSON_DEPTH (64), in latent_pca.json."""
    mangle_listed_json(root, "latent_pca.json", lambda p: p.update(extra="__RAW__"), _deep(65))


def metadata_empty(root: Path) -> None:
    (root / "metadata.json").write_bytes(b"")


def metadata_array(root: Path) -> None:
    (root / "metadata.json").write_text(json.dumps([load_meta(root)]))


def metadata_missing(root: Path) -> None:
    (root / "metadata.json").unlink()


def metadata_not_utf8(root: Path) -> None:
    meta = load_meta(root)
    meta["run"]["prompt"] = "__RAW__"
    text = json.dumps(meta).encode()
    (root / "metadata.json").write_bytes(text.replace(b'"__RAW__"', b'"\xff\xfe red"'))


def metadata_bom(root: Path) -> None:
    (root / "metadata.json").write_bytes(b"\xef\xbb\xbf" + (root / "metadata.json").read_bytes())


def pca_over_cap(root: Path) -> None:
    """latent_pca.json of 2 MB (valid JSON padded with spaces) against its 1 MiB cap, re-hashed."""
    replace_file(root, "latent_pca.json", (root / "latent_pca.json").read_bytes() + b" " * (2 << 20))


# ---- metric values
def _metrics(mutate: Callable[[dict], None]) -> Callable[[Path], None]:
    return lambda root: mangle_listed_json(root, "metrics.json", mutate)


entropy_above_1 = _metrics(lambda m: m["entropy"]["per_layer"][0].__setitem__(0, 1.5))
entropy_below_0 = _metrics(lambda m: m["entropy"]["per_layer"][1].__setitem__(2, -0.2))
entropy_mean_above_1 = _metrics(lambda m: m["entropy"]["mean"].__setitem__(1, 1.25))
shares_not_sum_1 = _metrics(lambda m: m["token_dominance"]["share"].__setitem__(0, [0.5] * TOKENS))
shares_negative = _metrics(lambda m: m["token_dominance"]["share"].__setitem__(
    1, [1.5, -0.5] + [0.0] * (TOKENS - 2)))


# ---- manifest entries
def _entry(rel: str, **update: Any) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        meta = load_meta(root)
        meta["files"][rel].update(update)
        save_meta(root, meta)
    return damage


negative_bytes = _entry(IMAGE, bytes=-1)
huge_bytes = _entry(IMAGE, bytes=10**15)


def path_3000_segments(root: Path) -> None:
    meta = load_meta(root)
    meta["files"]["a/" * 3000 + "x.bin"] = dict(meta["files"][CROSS])
    save_meta(root, meta)


def path_component_300(root: Path) -> None:
    meta = load_meta(root)
    meta["files"]["images/" + "p" * 300 + ".png"] = dict(meta["files"][IMAGE])
    save_meta(root, meta)


def manifest_surrogate_key(root: Path) -> None:
    """A manifest key with a lone surrogate (valid JSON escape, unprintable on strict UTF-8 stdout)."""
    meta = load_meta(root)
    meta["files"]["images/__SUR__.png"] = dict(meta["files"][IMAGE])
    (root / "metadata.json").write_text(json.dumps(meta).replace("__SUR__", "\\udcff"))


# ---- images
def png_bomb_header(root: Path) -> None:
    """A small PNG whose IHDR claims 60000 x 60000; the manifest shape stays [8, 8, 3]."""
    replace_file(root, IMAGE, png_with_ihdr((root / IMAGE).read_bytes(), 60_000, 60_000))


def png_header_8000(root: Path) -> None:
    """IHDR claims 8000 x 8000 (below PIL's own bomb threshold, above MAX_IMAGE_SIDE)."""
    replace_file(root, IMAGE, png_with_ihdr((root / IMAGE).read_bytes(), 8000, 8000))


def png_truncated(root: Path) -> None:
    data = (root / IMAGE).read_bytes()
    replace_file(root, IMAGE, data[: len(data) // 2])


def png_random(root: Path) -> None:
    replace_file(root, IMAGE, np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes())


# ---- maps
def nan_in_cross(root: Path) -> None:
    meta = load_meta(root)
    a = np.frombuffer((root / CROSS).read_bytes(), "<f2").reshape(meta["files"][CROSS]["shape"]).copy()
    a[0, 1, 1] = np.nan
    replace_file(root, CROSS, a.tobytes())


# ---- names in the folder
def _bytes_name(root: Path, rel_dir: str, name: bytes) -> None:
    fd = os.open(os.fsencode(root / rel_dir) + b"/" + name, os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"x")
    os.close(fd)


def non_utf8_unlisted_name(root: Path) -> None:
    _bytes_name(root, "images", b"\xff\xfe.png")


def many_unlisted_files(root: Path) -> None:
    d = root / "images" / "junk"
    d.mkdir()
    for i in range(100):
        (d / f"{i}.txt").touch()


def validation_json_garbage(root: Path) -> None:
    (root / "validation.json").write_bytes(b"\x00" * 100)


def _noop(root: Path) -> None:
    pass


# ============================================================================ the cases
S = ("--strict",)
ZIP = ("zip", ".npz")
CAP = "over the cap"
REG = "not a regular file"
OUT = "outside the run folder"

CASES: list[Case] = [
    Case("valid_template", _noop, 0, ("ok",), args=S, note="control: the untouched run, strict"),
    # --- issue: FIFOs
    Case("fifo_metadata", fifo_metadata, 1, (REG,), reader=True),
    Case("fifo_validation", fifo_validation, 0, (REG,), note="warning only; must still finish"),
    Case("fifo_validation_strict", fifo_validation, 1, (REG,), args=S),
    Case("fifo_metrics", fifo_metrics, 1, (REG,), reader=True),
    Case("fifo_listed_map", fifo_listed_map, 1, (REG,)),
    Case("fifo_unlisted_strict", fifo_unlisted, 1, ("images/pipe",), args=S, note="listed by name, never opened"),
    # --- issue: /dev/zero symlinks
    Case("zero_symlink_listed_map", zero_symlink_listed_map, 1, ((OUT, REG),)),
    Case("zero_symlink_metadata", zero_symlink_metadata, 1, ((OUT, REG),), reader=True),
    Case("zero_symlink_metrics", zero_symlink_metrics, 1, ((OUT, REG),), reader=True),
    Case("zero_symlink_validation", zero_symlink_validation, 1, ((OUT, REG),),
         note="a symlink out of the run is a problem wherever it is"),
    Case("symlink_inside_strict", symlink_inside, 0, ("ok",), args=S, note="symlinks inside the run are fine"),
    Case("symlink_dir_outside", symlink_dir_outside, 1, (OUT,)),
    Case("symlink_loop_strict", symlink_loop, 1, ("images/loop",), args=S),
    # --- devices, folders, sparse
    Case("device_node_listed", device_node_listed, 1, (REG,)),
    Case("folder_as_listed_file", folder_as_listed_file, 1, (REG,)),
    Case("folder_as_metadata", folder_as_metadata, 1, (REG,), reader=True),
    Case("sparse_3gb_listed", sparse_3gb_listed, 1, (CAP,), note="the .npz, manifest bytes 3e9"),
    Case("sparse_3gb_image", sparse_3gb_image, 1, (CAP,)),
    Case("sparse_3gb_size_mismatch", sparse_3gb_size_mismatch, 1, ("size",)),
    # --- issue: npz
    Case("npz_bomb_trailing", npz_bomb_trailing, 1, (ZIP,), note="3 GB deflated member, right header; was accepted"),
    Case("npz_bomb_shape", npz_bomb_shape, 1, (ZIP,), note="header claims 2 GiB, inflates to it"),
    Case("npz_size_liar", npz_size_liar, 1, (ZIP,), note="zip headers claim 3 GB"),
    Case("npz_npy_header_huge_shape", npz_npy_header_huge_shape, 1, (ZIP,)),
    Case("npz_extra_member", npz_extra_member, 1, (ZIP,)),
    Case("npz_duplicate_member", npz_duplicate_member, 1, (ZIP,)),
    Case("npz_missing_member", npz_missing_member, 1, (ZIP, "noise")),
    Case("npz_wrong_dtype", npz_wrong_dtype, 1, (ZIP, ("float16", "<f2", "dtype", "float32"))),
    Case("npz_fortran_order", npz_fortran_order, 1, (ZIP,)),
    Case("npz_object_dtype", npz_object_dtype, 1, (ZIP, ("object", "pickle", "dtype"))),
    Case("npz_random_bytes", npz_random_bytes, 1, ("zip",), forbid=("pickle",)),
    Case("npz_empty", npz_empty, 1, ("zip",), forbid=("pickle",)),
    Case("npz_nan", npz_nan, 1, ("non-finite",)),
    # --- issue: huge metadata
    Case("timesteps_1e6", timesteps_1e6, 1, (CAP, "timesteps"), reader=True),
    Case("layers_200k", layers_200k, 1, (CAP,), reader=True),
    Case("shape_300k_dims_manifest", shape_300k_dims_manifest, 1, (CAP,)),
    Case("shape_300k_dims_layer", shape_300k_dims_layer, 1, (CAP,)),
    Case("missing_entries_within_caps", missing_entries_within_caps, 1, ("not in the manifest",),
         note="97,003 expected, 19 listed: one line, not 97k"),
    Case("missing_entries_over_cap", missing_entries_over_cap, 1, (CAP,)),
    Case("manifest_99k_wrong_types", manifest_99k_wrong_types, 1, ("more problem",)),
    Case("manifest_200k_wrong_types", manifest_200k_wrong_types, 1, (CAP,)),
    Case("metrics_1e6_schema_errors", metrics_1e6_schema_errors, 1, ("metrics.json",)),
    Case("metrics_1e6_valid_floats", metrics_1e6_valid_floats, 1, ("over the cap",), reader=True),
    Case("tokens_100k", tokens_100k, 1, (CAP,)),
    Case("heads_1e6", heads_1e6, 1, (CAP,)),
    Case("grid_side_100k", grid_side_100k, 1, ((CAP, "outside 0.."),)),
    Case("image_side_1e6", image_side_1e6, 1, (CAP,)),
    Case("model_id_10k", model_id_10k, 1, ((CAP, "4096"),)),
    # --- issue: prompts
    Case("prompt_200mb", prompt_200mb, 1, ((CAP, "2000"),), forbid=("a" * 3000,), reader=True),
    Case("prompt_30mb", prompt_30mb, 1, ((CAP, "2000"),), forbid=("a" * 3000,), reader=True),
    Case("prompt_2001", prompt_2001, 1, ("prompt", "2000")),
    Case("negative_prompt_2001", negative_prompt_2001, 1, ("prompt", "2000")),
    # --- issue: numbers and keys
    Case("overflow_metadata", overflow_metadata, 1, ("overflows",), reader=True),
    Case("overflow_negative_metadata", overflow_negative_metadata, 1, ("overflows",), reader=True),
    Case("overflow_metrics", overflow_metrics, 1, ("overflows",), reader=True),
    Case("overflow_pca", overflow_pca, 1, ("overflows",), reader=True),
    Case("nan_literal_metadata", nan_literal_metadata, 1, ("nan",), reader=True),
    Case("digits_400_height", digits_400_height, 1, ((CAP, "overflows", "height"),)),
    Case("digits_400_metrics", digits_400_metrics, 1, ("metrics.json",), note="10^399: no float holds it"),
    Case("digits_5000_seed", digits_5000_seed, 1, ("metadata.json",), reader=True),
    Case("duplicate_manifest_key", duplicate_manifest_key, 1, ("duplicate key",), reader=True),
    Case("duplicate_key_metrics", duplicate_key_metrics, 1, ("duplicate key",), reader=True),
    Case("deep_nesting_metadata", deep_nesting_metadata, 1, ("nested deeper",), reader=True),
    Case("deep_nesting_metrics", deep_nesting_metrics, 1, ("nested deeper",), reader=True),
    Case("deep_nesting_65_pca", deep_nesting_65, 1, ("nested deeper",), reader=True),
    Case("metadata_empty", metadata_empty, 1, ("metadata.json",), reader=True),
    Case("metadata_array", metadata_array, 1, ("metadata.json",), reader=True),
    Case("metadata_missing", metadata_missing, 1, ("metadata.json",), reader=True),
    Case("metadata_not_utf8", metadata_not_utf8, 1, ("metadata.json",), reader=True),
    Case("metadata_bom", metadata_bom, 1, ("metadata.json",), reader=True),
    Case("pca_over_cap", pca_over_cap, 1, (CAP,), reader=True),
    # --- issue: metric values
    Case("entropy_above_1", entropy_above_1, 1, ("entropy", "outside [0, 1]")),
    Case("entropy_below_0", entropy_below_0, 1, ("entropy", "outside [0, 1]")),
    Case("entropy_mean_above_1", entropy_mean_above_1, 1, ("entropy", "outside [0, 1]")),
    Case("shares_not_sum_1", shares_not_sum_1, 1, ("share", "sum")),
    Case("shares_negative", shares_negative, 1, ("share",)),
    # --- manifest entries
    Case("negative_bytes", negative_bytes, 1, ("bytes",)),
    Case("huge_bytes", huge_bytes, 1, ((CAP, "size"),)),
    Case("path_3000_segments", path_3000_segments, 1, ((CAP, "1024"),)),
    Case("path_component_300", path_component_300, 1, ((CAP, "255"),)),
    Case("manifest_surrogate_key", manifest_surrogate_key, 1, ()),
    # --- images and maps
    Case("png_bomb_header", png_bomb_header, 1, ((CAP, "60000"),)),
    Case("png_header_8000", png_header_8000, 1, ((CAP, "8000"),)),
    Case("png_truncated", png_truncated, 1, (("decode", "truncated"),)),
    Case("png_random", png_random, 1, (("decode", "not a png", "signature"),)),
    Case("nan_in_cross", nan_in_cross, 1, ("non-finite",)),
    # --- issue: names
    Case("non_utf8_unlisted_name", non_utf8_unlisted_name, 0, ("not listed",), note="warning only"),
    Case("non_utf8_unlisted_name_strict", non_utf8_unlisted_name, 1, ("not listed",), args=S),
    Case("many_unlisted_files_strict", many_unlisted_files, 1, (("more problem", "more warning"),), args=S),
    Case("validation_json_garbage", validation_json_garbage, 0, ("validation.json",), note="warning only"),
]
CASES_BY_NAME = {c.name: c for c in CASES}
assert len(CASES_BY_NAME) == len(CASES), "duplicate case names"


# ============================================================================ the sweep section (issue 25)
# A sweep of four synthetic runs (colour red/green x seed 0/1; run 1 pending), each case damaging a copy of it.
SWEEP_GRID = {"colour": ["red", "green"], "seed": [0, 1]}
SWEEP_FILE = "sweep.json"
BIG_INT = "9" * 4000


def load_index(root: Path) -> dict:
    return json.loads((root / SWEEP_FILE).read_text())


def save_index(root: Path, doc: Any) -> None:
    (root / SWEEP_FILE).write_text(json.dumps(doc))


def _index_raw(edit: Callable[[dict], None], raw: str) -> Callable[[Path], None]:
    """Edit the index, then replace the string "__RAW__" in it with raw JSON text."""
    def damage(root: Path) -> None:
        doc = load_index(root)
        edit(doc)
        (root / SWEEP_FILE).write_text(json.dumps(doc).replace('"__RAW__"', raw))
    return damage


def _entries(names_params: Sequence[tuple[str, dict]], template: str, **extra: Any) -> list[dict]:
    out = []
    for name, params in names_params:
        entry = {"name": name, "params": params, "prompt": template.format(**params), "status": "done", "error": None,
                 "headline": {"final_latent_norm": 1.0, "word_share": {}}, "thumbnail": None}
        entry.update(extra)
        out.append(entry)
    return out


def _seed_grid(root: Path, seeds: int, words: Callable[[int], dict] | None = None) -> None:
    """An index (no run folders) of one colour and ``seeds`` seeds, every run done."""
    doc = load_index(root)
    doc["grid"] = [{"name": "colour", "values": ["red"]}, {"name": "seed", "values": list(range(seeds))}]
    doc["runs"] = _entries([(f"r{i:05d}-seed-{i}", {"colour": "red", "seed": i}) for i in range(seeds)],
                           doc["template"])
    if words is not None:
        for i, run in enumerate(doc["runs"]):
            run["headline"]["word_share"] = words(i)
    for name in os.listdir(root):
        if name != SWEEP_FILE:
            shutil.rmtree(root / name)
    (root / SWEEP_FILE).write_text(json.dumps(doc, separators=(",", ":")))


def sweep_int_4000_headline(root: Path) -> None:
    _index_raw(lambda d: d["runs"][0]["headline"].update(final_latent_norm="__RAW__"), BIG_INT)(root)


def sweep_int_4000_axis(root: Path) -> None:
    def edit(d: dict) -> None:
        d["grid"][1]["values"][1] = "__RAW__"
    _index_raw(edit, BIG_INT)(root)


def sweep_int_4000_base(root: Path) -> None:
    _index_raw(lambda d: d["base"].update(height="__RAW__"), BIG_INT)(root)


def sweep_int_5000_share(root: Path) -> None:
    _index_raw(lambda d: d["runs"][0]["headline"]["word_share"].update(red="__RAW__"), "9" * 5000)(root)


def sweep_overflow_norm(root: Path) -> None:
    _index_raw(lambda d: d["runs"][0]["headline"].update(final_latent_norm="__RAW__"), "1e999")(root)


def sweep_nan_share(root: Path) -> None:
    _index_raw(lambda d: d["runs"][0]["headline"]["word_share"].update(red="__RAW__"), "NaN")(root)


def sweep_duplicate_key(root: Path) -> None:
    _index_raw(lambda d: d["runs"][0].update(status="__RAW__"), '"done", "status": "done"')(root)


def sweep_deep_nesting(root: Path) -> None:
    _index_raw(lambda d: d["base"].update(layers="__RAW__"), _deep(100_000))(root)


def _same_labels(values: list) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        doc = load_index(root)
        doc["grid"][1]["values"] = values
        for run in doc["runs"]:
            run["params"]["seed"] = values[run["params"]["seed"]]
        save_index(root, doc)
    return damage


def sweep_runs_over_cap(root: Path) -> None:
    """Two colours x 5,001 seeds: 10,002 runs, each axis under its own cap."""
    doc = load_index(root)
    doc["grid"] = [{"name": "colour", "values": ["red", "green"]}, {"name": "seed", "values": list(range(5001))}]
    doc["runs"] = _entries([(f"r{i:05d}", {"colour": c, "seed": k}) for i, (c, k) in
                            enumerate((c, k) for c in ("red", "green") for k in range(5001))], doc["template"])
    save_index(root, doc)


def sweep_2m_entries(root: Path) -> None:
    """Two million small objects in a shared setting (16 MB, under the old 128 MiB cap)."""
    _index_raw(lambda d: d["base"].update(layers="__RAW__"), "[" + ",".join(['{"n":1}'] * 2_000_000) + "]")(root)


def sweep_1m_runs(root: Path) -> None:
    """A million small run entries (8 MB)."""
    _index_raw(lambda d: d.update(runs="__RAW__"), "[" + ",".join(['{"n":1}'] * 1_000_000) + "]")(root)


def sweep_over_byte_cap(root: Path) -> None:
    with open(root / SWEEP_FILE, "r+b") as fh:
        fh.truncate(200 << 20)  # sparse


def sweep_words_per_run(root: Path) -> None:
    """500 runs x 1024 distinct words (7.6 MB): took a minute to open and built a 512,000-option selector."""
    _seed_grid(root, 500, lambda i: {f"w{i}-{k}": 0.0005 for k in range(1024)})


def sweep_words_across_runs(root: Path) -> None:
    """100 runs x 64 words each, all distinct: 6,400 words, over the index's 1,024."""
    _seed_grid(root, 100, lambda i: {f"w{i}-{k}": 0.01 for k in range(64)})


def sweep_cap_10k_index_only(root: Path) -> None:
    """The run cap, every run done (no folders): the index reads; validate names the missing folders."""
    _seed_grid(root, 10_000, lambda i: {"red": 0.3, "circle": 0.2})


def sweep_json_fifo(root: Path) -> None:
    (root / SWEEP_FILE).unlink()
    os.mkfifo(root / SWEEP_FILE)


def sweep_json_dev_zero(root: Path) -> None:
    (root / SWEEP_FILE).unlink()
    os.symlink("/dev/zero", root / SWEEP_FILE)


def sweep_json_loop(root: Path) -> None:
    (root / SWEEP_FILE).unlink()
    os.symlink(SWEEP_FILE, root / SWEEP_FILE)


def sweep_json_folder(root: Path) -> None:
    (root / SWEEP_FILE).unlink()
    (root / SWEEP_FILE).mkdir()


def sweep_json_not_utf8(root: Path) -> None:
    (root / SWEEP_FILE).write_bytes((root / SWEEP_FILE).read_bytes().replace(b"a {colour}", b"a \xff {colour}", 1))


def sweep_json_empty(root: Path) -> None:
    (root / SWEEP_FILE).write_bytes(b"")


def _run_names(root: Path) -> list[str]:
    return [r["name"] for r in load_index(root)["runs"]]


def run_folder_links_out(root: Path) -> None:
    name = _run_names(root)[3]
    outside = root.parent / f".{root.name}-outside"
    if outside.exists():
        shutil.rmtree(outside)
    os.rename(root / name, outside)
    os.symlink(outside, root / name)


def run_folders_swapped(root: Path) -> None:
    a, _b, c, _d = _run_names(root)
    os.rename(root / a, root / "swap")
    os.rename(root / c, root / a)
    os.rename(root / "swap", root / c)


def run_overwritten(root: Path) -> None:
    """Another job wrote a run of seed 7 into a sweep's run folder."""
    name = _run_names(root)[3]
    meta = load_meta(root / name)
    meta["run"]["seed"] = 7
    save_meta(root / name, meta)


def run_folder_missing(root: Path) -> None:
    shutil.rmtree(root / _run_names(root)[2])


def run_map_truncated(root: Path) -> None:
    run = root / _run_names(root)[2]
    with open(run / "attention/cross/layer_0_step_001.bin", "r+b") as fh:
        fh.truncate(10)


def run_metadata_fifo(root: Path) -> None:
    run = root / _run_names(root)[0]
    (run / "metadata.json").unlink()
    os.mkfifo(run / "metadata.json")


def pending_run_garbage(root: Path) -> None:
    run = root / _run_names(root)[1]  # the pending run: its folder is not checked
    run.mkdir()
    (run / "metadata.json").write_text("{")


def _edit_index(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        doc = load_index(root)
        edit(doc)
        save_index(root, doc)
    return damage


prompt_not_template = _edit_index(lambda d: d["runs"][2].update(prompt="a blue circle"))
template_attribute = _edit_index(lambda d: d.update(template="a {colour.__class__} circle"))
run_name_traversal = _edit_index(lambda d: d["runs"][0].update(name="../outside"))
thumbnail_outside = _edit_index(lambda d: d["runs"][0].update(thumbnail=d["runs"][2]["thumbnail"]))


def run_fifo_for_figure(root: Path) -> None:
    """A run folder (not a sweep) whose metadata.json is a FIFO, for export-figure on its file:// URL."""
    for name in os.listdir(root):
        p = root / name
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    os.mkfifo(root / "metadata.json")


def sweep_fifo_for_url(root: Path) -> None:
    sweep_json_fifo(root)


SW = dict(section="sweep", reader=True)
OK = dict(reader_expect="OK")
SWEEP_CASES: list[Case] = [
    Case("sweep_valid", _noop, 0, ("ok: sweep",), group="control", **SW, **OK),
    Case("sweep_valid_strict", _noop, 0, ("ok: sweep", "strict"), args=S, group="control", **SW, **OK),
    # --- defect 1: huge integers, and the other numbers and keys
    Case("sweep_int_4000_headline", sweep_int_4000_headline, 1, ("runs[0].headline.final_latent_norm", "4000 digits"),
         forbid=("9" * 100,), group="numbers", note="raised OverflowError", **SW),
    Case("sweep_int_4000_axis", sweep_int_4000_axis, 1, ("grid[1].values[1]", "4000 digits"), group="numbers", **SW),
    Case("sweep_int_4000_base", sweep_int_4000_base, 1, ("base.height", "4000 digits"), group="numbers", **SW),
    Case("sweep_int_5000_share", sweep_int_5000_share, 1, ("not valid json",), group="numbers", **SW),
    Case("sweep_overflow_norm", sweep_overflow_norm, 1, ("overflows",), group="numbers", **SW),
    Case("sweep_nan_share", sweep_nan_share, 1, ("nan",), group="numbers", **SW),
    Case("sweep_duplicate_key", sweep_duplicate_key, 1, ("duplicate key",), group="numbers", **SW),
    Case("sweep_deep_nesting", sweep_deep_nesting, 1, ("nested deeper",), group="numbers", **SW),
    # --- defect 2: values that read the same
    Case("sweep_labels_int_float", _same_labels([0, 0.0]), 1, ("read the same",), group="labels",
         note="Bokeh refused the duplicate factor; the session died", **SW),
    Case("sweep_labels_str_int", _same_labels(["1", 1]), 1, ("read the same",), group="labels", **SW),
    # --- defects 3, 4, 5: sizes
    Case("sweep_runs_over_cap", sweep_runs_over_cap, 1, ("more than 10000 runs",), group="caps", **SW),
    Case("sweep_2m_entries", sweep_2m_entries, 1, ("values, over the cap",), group="caps",
         note="parsed whole before the caps were checked", **SW),
    Case("sweep_1m_runs", sweep_1m_runs, 1, ("values, over the cap",), group="caps",
         note="parsed whole before the caps were checked", **SW),
    Case("sweep_over_byte_cap", sweep_over_byte_cap, 1, ("over the cap",), group="caps", **SW),
    Case("sweep_words_per_run", sweep_words_per_run, 1, ("at most 64 words",), group="caps",
         note="the dashboard built a 512,000-option selector", **SW),
    Case("sweep_words_across_runs", sweep_words_across_runs, 1, ("1024 distinct words",), group="caps", **SW),
    Case("sweep_cap_10k_index_only", sweep_cap_10k_index_only, 1, ("its folder is missing", "more problem"),
         group="caps", note="the index at the run cap reads; its 10,000 runs have no folders", **SW, **OK),
    # --- the index file itself
    Case("sweep_json_fifo", sweep_json_fifo, 1, (REG,), group="files", **SW),
    Case("sweep_json_dev_zero", sweep_json_dev_zero, 1, ((OUT, REG),), group="files", **SW),
    Case("sweep_json_loop", sweep_json_loop, 1, ("symlink loop",), forbid=("RuntimeError",), group="files", **SW),
    Case("sweep_json_folder", sweep_json_folder, 1, (REG,), group="files", **SW),
    Case("sweep_json_not_utf8", sweep_json_not_utf8, 1, ("not utf-8",), group="files", **SW),
    Case("sweep_json_empty", sweep_json_empty, 1, ("not valid json",), group="files", **SW),
    # --- the runs against the index (defect 9 and "nothing compares the index with the runs")
    Case("run_folder_links_out", run_folder_links_out, 1, ("symlink",), group="runs",
         note="build-site published it byte for byte", **SW, **OK),
    Case("run_folders_swapped", run_folders_swapped, 1, ("sweep.json says prompt",), group="runs", **SW, **OK),
    Case("run_overwritten", run_overwritten, 1, ("sweep.json says seed 1, its metadata.json 7",), group="runs", **SW, **OK),
    Case("run_folder_missing", run_folder_missing, 1, ("its folder is missing",), group="runs", **SW, **OK),
    Case("run_map_truncated", run_map_truncated, 1, ("r0002", "size"), group="runs", **SW, **OK),
    Case("run_metadata_fifo", run_metadata_fifo, 1, ("r0000", REG), group="runs", **SW, **OK),
    Case("pending_run_garbage", pending_run_garbage, 0, ("ok: sweep",), group="runs",
         note="a pending run's folder is not a finished run", **SW, **OK),
    Case("prompt_not_template", prompt_not_template, 1, ("runs[2].prompt", "template"), group="runs", **SW),
    Case("template_attribute", template_attribute, 1, ("template",), group="runs", **SW),
    Case("run_name_traversal", run_name_traversal, 1, ("runs[0].name",), group="runs", **SW),
    Case("thumbnail_outside", thumbnail_outside, 1, ("not inside the run's folder",), group="runs", **SW),
    # --- defect 10: file:// URLs go through the bounded reader
    Case("sweep_file_url_fifo", sweep_fifo_for_url, 1, (REG,), group="file urls", url=True,
         note="read_index('file://...') hung on the FIFO", **SW),
    Case("figure_file_url_fifo", run_fifo_for_figure, 2, (REG,), group="file urls", kind="figure", url=True,
         note="export-figure file:///run/ hung on the FIFO", section="sweep"),
]
CASES_BY_NAME.update({c.name: c for c in SWEEP_CASES})
assert len(CASES_BY_NAME) == len(CASES) + len(SWEEP_CASES), "duplicate case names"
ALL_CASES = CASES + SWEEP_CASES


# ============================================================================ building
def make_template(dest: Path) -> Path:
    from tests.synthetic import write_synthetic_run

    return write_synthetic_run(Path(dest), **TEMPLATE_KW)


def make_sweep_template(dest: Path) -> Path:
    from tests.test_app_sweep import write_sweep

    return write_sweep(Path(dest), SWEEP_GRID, pending=(1,), steps=2)


TEMPLATES = {"run": (".template", make_template), "sweep": (".sweep-template", make_sweep_template)}


def build(case: Case, dest_dir: str | os.PathLike, template: Path | None = None) -> Path:
    """A fresh copy of the section's template (a run or a sweep) in ``dest_dir/<case.name>``, damaged by ``case``.
    May raise :class:`Skip`."""
    dest_dir = Path(dest_dir)
    if template is None:
        folder, make = TEMPLATES[case.section]
        template = dest_dir / folder
        if not template.is_dir():
            make(template)
    root = dest_dir / case.name
    if root.exists() or root.is_symlink():
        shutil.rmtree(root)
    shutil.copytree(template, root, symlinks=True, copy_function=shutil.copyfile)
    case.damage(root)
    return root


def build_all(dest_dir: str | os.PathLike, cases: Sequence[Case] = ALL_CASES) -> dict[str, Path | Skip | BuildFailure]:
    """Build every case; a case whose builder fails is recorded (not raised) so the rest still run."""
    dest_dir = Path(dest_dir)
    templates = {section: make(dest_dir / folder) for section, (folder, make) in TEMPLATES.items()
                 if any(c.section == section for c in cases)}
    out: dict[str, Path | Skip | BuildFailure] = {}
    for case in cases:
        try:
            out[case.name] = build(case, dest_dir, templates[case.section])
        except Skip as exc:
            out[case.name] = exc
        except Exception as exc:  # noqa: BLE001 - reported per case
            out[case.name] = BuildFailure(f"{type(exc).__name__}: {exc}")
    return out


# ============================================================================ running
def child_env(root: Path = REPO) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONIOENCODING="utf-8:strict", PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONUTF8", None)
    env["PYTHONPATH"] = str(root)  # only that checkout's packages, never this one's through an inherited path
    return env


@dataclass
class Result:
    rc: int | None               # None when it was killed for running past the timeout
    stdout: str
    stderr: str
    seconds: float
    peak_rss_kb: int | None
    timed_out: bool
    stdout_bytes: int = 0

    @property
    def lines(self) -> list[str]:
        return self.stdout.splitlines()


# Each case runs in its own process under the memory cap, but starting ~90 Pythons costs a minute on two
# cores. A "zygote" process imports the validator and the reader once, then forks one capped child per case
# (a fork is milliseconds); the child inherits nothing of pytest's memory (torch, Chromium drivers), which
# would count against its address-space cap.
ZYGOTE = r"""
import importlib, io, json, os, resource, sys, time, traceback
import export.validate, export.reader
from export.contract import DatasetError
from PIL import Image  # noqa: F401 - imported before the fork, as a real `validate` has it on first use
cap = int(sys.argv[1])

def child(job, out, err):
    os.dup2(out, 1)
    os.dup2(err, 2)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    # strict UTF-8, as PYTHONIOENCODING=utf-8:strict gives a fresh `diffviz validate`
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="strict")
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="strict")
    code = 70
    reading = job["kind"] in ("reader", "sweep_index")
    try:
        if job["kind"] == "validate":
            code = export.validate.main([job["path"], *job["args"]])
        elif job["kind"] == "figure":
            figure = importlib.import_module("export.figure")
            code = figure.main([job["path"], "--out", job["out"] + ".png", *job["args"]])
        else:
            try:
                if job["kind"] == "reader":
                    export.reader.open_run(job["path"])
                else:
                    importlib.import_module("export.sweep").read_index(job["path"])
                print("OK")
            except DatasetError as exc:
                print("DatasetError: " + str(exc)[:300])
            code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:
        if not reading:
            traceback.print_exc()
        else:
            print("OTHER " + type(exc).__name__ + ": " + str(exc)[:300])
            code = 0
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
    os._exit(code)

for line in sys.stdin:
    job = json.loads(line)
    out, err = os.open(job["out"], os.O_WRONLY | os.O_TRUNC), os.open(job["err"], os.O_WRONLY | os.O_TRUNC)
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        child(job, out, err)
    os.close(out)
    os.close(err)
    timed_out = False
    while True:
        got, status, usage = os.wait4(pid, os.WNOHANG)
        if got:
            break
        if time.monotonic() - start > job["timeout"]:
            timed_out = True
            os.kill(pid, 9)
            _, status, usage = os.wait4(pid, 0)
            break
        time.sleep(0.005)
    print(json.dumps({"rc": None if timed_out else os.waitstatus_to_exitcode(status), "timed_out": timed_out,
                      "seconds": time.monotonic() - start, "maxrss": usage.ru_maxrss}), flush=True)
"""


class Zygote:
    """One process that forks a capped child per case (see ZYGOTE); ``run(kind, path, args)``."""

    def __init__(self, cap: int = MEMORY_CAP, root: Path = REPO):
        """``root``: the checkout whose code runs (this one, or an older commit's for the "before" column)."""
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE, str(cap)], cwd=root, env=child_env(root),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.tmp = tempfile.TemporaryDirectory(prefix="hostile-zygote-")
        self.out, self.err = Path(self.tmp.name, "out"), Path(self.tmp.name, "err")
        self.out.touch()
        self.err.touch()

    def run(self, kind: str, path: Path, args: Sequence[str] = (), timeout: float = TIMEOUT_S) -> Result:
        job = {"kind": kind, "path": os.fsdecode(path), "args": list(args), "timeout": timeout,
               "out": str(self.out), "err": str(self.err)}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the zygote died (exit {self.proc.poll()})")
        got = json.loads(line)
        stdout = self.out.read_bytes()[: 4 << 20]
        stderr = self.err.read_bytes()[-(4 << 20):]
        return Result(got["rc"], stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace"),
                      got["seconds"], got["maxrss"], got["timed_out"], len(stdout))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.tmp.cleanup()

    def __enter__(self) -> "Zygote":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def judge_reader_result(r: Result) -> str:
    """The reader child's one-line answer: "DatasetError: ..." | "OK" | "OTHER ..." | "HUNG" | "NO RESULT ..."."""
    if r.timed_out:
        return "HUNG"
    text = r.stdout.strip()
    return text if text else f"NO RESULT (child exit {r.rc}: {r.stderr.strip()[-200:]})"


# ============================================================================ judging
def _has(text: str, keyword: Any) -> bool:
    alts = keyword if isinstance(keyword, tuple) else (keyword,)
    return any(a.lower() in text for a in alts)


def judge(case: Case, r: Result) -> list[str]:
    """What is wrong with ``r`` for ``case``: [] when it was handled as expected."""
    why = []
    both = (r.stdout + "\n" + r.stderr)
    low = both.lower()
    if r.timed_out:
        why.append(f"hung: no exit within {TIMEOUT_S:g} s")
    if "Traceback" in both:
        why.append("traceback: " + r.stderr.strip().splitlines()[-1][:200] if r.stderr.strip() else "traceback")
    if not r.timed_out and r.rc != case.exit:
        why.append(f"exit {r.rc}, expected {case.exit}")
    for k in case.expect:
        if not _has(low, k):
            why.append(f"missing keyword {k!r}")
    for k in case.forbid:
        if _has(low, k):
            why.append(f"forbidden text {k[:20]!r}")
    if len(r.lines) > MAX_STDOUT_LINES:
        why.append(f"{len(r.lines)} stdout lines > {MAX_STDOUT_LINES}")
    if r.stdout_bytes > MAX_STDOUT_BYTES:
        why.append(f"{r.stdout_bytes} bytes of stdout > {MAX_STDOUT_BYTES}")
    return why


def outcome(case: Case, r: Result) -> str:
    if r.timed_out:
        return "hung"
    both = r.stdout + r.stderr
    if "Traceback" in both or r.rc not in (0, 1, 2):
        return "crashed"
    return "handled" if not judge(case, r) else "wrong"


def judge_reader(result: str, expect: str = "DatasetError") -> list[str]:
    """[] when the reader answered as expected: raised DatasetError (``expect`` "DatasetError"), or read it ("OK")."""
    ok = result.startswith("DatasetError:") if expect == "DatasetError" else result == "OK"
    return [] if ok else [f"the reader gave {result[:200]!r}, not {expect}"]


READER_KIND = {"run": "reader", "sweep": "sweep_index"}


def target(case: Case, built: Path, reader: bool = False) -> str:
    """What the command (or the reader) is given: the folder, or for ``url`` cases its file:// URL (``validate``
    takes folders only)."""
    return built.as_uri() + "/" if case.url and (reader or case.kind != "validate") else os.fsdecode(built)


def run_case(zygote: "Zygote", case: Case, built: Path) -> tuple[Result, Result | None, str | None]:
    """The command's result, the reader's, and the reader's one-line answer (None: the case has no reader check)."""
    r = zygote.run(case.kind, target(case, built), case.args)
    if not case.reader:
        return r, None, None
    rr = zygote.run(READER_KIND[case.section], target(case, built, reader=True))
    return r, rr, judge_reader_result(rr)


# ============================================================================ __main__
#: The commit before issue 25's hardening (sweeps under hostile input): the "before" column runs its code.
BEFORE_REF = "a2a8f8ce3c34abfdce84f80f7c05fc165ba5fcc0"


def _fmt_rss(kb: int | None) -> str:
    return "" if kb is None else f"{kb / 1024:.0f} MB"


def checkout(ref: str, dest: Path) -> Path | str:
    """The packages of commit ``ref`` of this repository, extracted into ``dest`` (a path), or why not (a str)."""
    try:
        data = subprocess.run(["git", "-C", str(REPO), "archive", ref, "export", "analysis"], capture_output=True,
                              check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"no git history with {ref[:12]} here ({type(exc).__name__})"
    import tarfile

    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def _cell(case: Case, r: Result, reader: str | None) -> tuple[str, str]:
    """``(outcome with its reason, reader's answer)`` for one run of a case."""
    o = outcome(case, r)
    why = judge(case, r) + (judge_reader(reader, case.reader_expect) if reader is not None else [])
    if o == "handled" and why:
        o = "wrong"
    text = o + (f" ({'; '.join(why)[:140]})" if why and o != "handled" else "")
    answer = "" if reader is None else ("DatasetError" if reader.startswith("DatasetError:") else reader[:60])
    return text.replace("|", "/").replace("\n", " "), answer.replace("|", "/").replace("\n", " ")


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Build the hostile corpus and run the validator (and the readers) on "
                                             "every case, with this checkout's code and, for comparison, an older one's.")
    ap.add_argument("names", nargs="*", help="only these cases")
    ap.add_argument("--keep", help="build into this folder and keep it")
    ap.add_argument("--details", action="store_true", help="also print each case's output")
    ap.add_argument("--before", default=BEFORE_REF, help="the commit of the 'before' column (default: the one "
                                                         "before issue 25's hardening); 'none' to leave it out")
    ns = ap.parse_args(argv)
    cases = [CASES_BY_NAME[n] for n in ns.names] if ns.names else ALL_CASES
    tmp = None if ns.keep else tempfile.TemporaryDirectory(prefix="hostile-")
    dest = Path(ns.keep or tmp.name)
    dest.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    corpus = build_all(dest / "corpus", cases)
    print(f"built {len(cases)} cases in {time.monotonic() - t0:.1f} s under {dest}")
    before_root = None if ns.before == "none" else checkout(ns.before, dest / "before")
    if isinstance(before_root, str):
        print(f"before: {before_root}; the 'before' column is left empty")
        before_root = None
    elif before_root is not None:
        print(f"before: the code of commit {ns.before[:12]}; after: this checkout")
    zygotes = {"after": Zygote()}
    if before_root is not None:
        zygotes["before"] = Zygote(root=before_root)
    tally: dict[str, int] = {}
    worst: dict[tuple[str, str], dict[str, tuple[float, str]]] = {}
    details = []
    for section in ("run", "sweep"):
        chosen = [c for c in cases if c.section == section]
        if not chosen:
            continue
        print(f"\n## {section} section ({len(chosen)} cases)\n")
        print("| case | expected | before | after | exit | seconds | peak RSS | reader before | reader after |")
        print("|---|---|---|---|---|---|---|---|---|")
        for case in chosen:
            built = corpus[case.name]
            if isinstance(built, (Skip, BuildFailure)):
                kind = "skipped" if isinstance(built, Skip) else "build failed"
                print(f"| {case.name} | {case.expected} | | {kind}: {built} | | | | | |")
                tally[kind] = tally.get(kind, 0) + 1
                continue
            cells = {}
            for which, zygote in zygotes.items():
                r, rr, reader = run_case(zygote, case, built)
                # the case's cost: its slowest and largest job (the command, or the reader of the index)
                seconds = max(r.seconds, rr.seconds if rr else 0.0)
                mb = max(r.peak_rss_kb or 0, (rr.peak_rss_kb or 0) if rr else 0) / 1024
                cells[which] = (r, seconds, mb, *_cell(case, r, reader))
                group = worst.setdefault((section, case.group or section), {})
                for metric, value in (("seconds", seconds), ("rss", mb)):
                    key = f"{which} {metric}"
                    if value >= group.get(key, (-1.0, ""))[0]:
                        group[key] = (value, case.name)
            r, seconds, mb, after, reader_after = cells["after"]
            tally[after.split(" ")[0]] = tally.get(after.split(" ")[0], 0) + 1
            before, reader_before = "", ""
            if "before" in cells:
                _r, b_seconds, b_mb, before, reader_before = cells["before"]
                before += f" · {b_seconds:.1f} s, {b_mb:.0f} MB"
            print(f"| {case.name} | {case.expected} | {before} | {after} | {'' if r.rc is None else r.rc} | "
                  f"{seconds:.1f} | {mb:.0f} MB | {reader_before} | {reader_after} |", flush=True)
            if ns.details:
                details.append((case.name, r))
    print("\nafter: " + ", ".join(f"{k}: {v}" for k, v in sorted(tally.items())))
    print("\nThe worst case of each group (time and peak RSS of its slowest and largest job):\n")
    print("| section | group | seconds, after | peak RSS, after | seconds, before | peak RSS, before |")
    print("|---|---|---|---|---|---|")
    for (section, group), w in worst.items():
        cols = [f"{w[k][0]:.1f} s ({w[k][1]})" if k.endswith("seconds") else f"{w[k][0]:.0f} MB ({w[k][1]})"
                if k in w else "" for k in ("after seconds", "after rss", "before seconds", "before rss")]
        print(f"| {section} | {group} | {' | '.join(cols)} |")
    for name, r in details:
        print(f"\n### {name}\n```\n{r.stdout[:2000]}{r.stderr[-2000:]}\n```")
    for zygote in zygotes.values():
        zygote.close()
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
