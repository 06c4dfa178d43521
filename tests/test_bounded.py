"""export.bounded: the one place runs are opened, parsed and unpacked within the contract's caps."""
from __future__ import annotations

import io
import re
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from export import bounded, contract
from export.contract import DatasetError
from export.reader import BytesSource, open_run
from tests.synthetic import write_synthetic_run


# ---------------------------------------------------------------------------- files
def test_open_regular_refuses_fifos_devices_folders_and_links_out(tmp_path: Path) -> None:
    (tmp_path / "ok.bin").write_bytes(b"12345")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    os.symlink("/dev/zero", tmp_path / "zero")
    os.symlink("ok.bin", tmp_path / "inside")
    assert bounded.read_file(tmp_path, "ok.bin", limit=5, expect=5) == b"12345"
    assert bounded.read_file(tmp_path, "inside", limit=5) == b"12345"  # a link inside the run is fine
    cases = {"fifo": "not a regular file (a FIFO)", "dir": "not a regular file (a folder)",
             "zero": "outside the run folder", "gone": "missing"}
    for rel, message in cases.items():
        with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace(")", r"\)")):
            bounded.read_file(tmp_path, rel, limit=1 << 20)
    with pytest.raises(DatasetError, match="5 bytes, over the cap of 4"):
        bounded.read_file(tmp_path, "ok.bin", limit=4)
    with pytest.raises(DatasetError, match="size 5 bytes != manifest bytes 6"):
        bounded.read_file(tmp_path, "ok.bin", limit=10, expect=6)


def test_sparse_file_is_refused_by_its_size_before_a_byte_is_read(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    with open(big, "wb") as fh:
        fh.truncate(3 << 30)  # 3 GiB, sparse: no disk used
    with pytest.raises(DatasetError, match=f"{3 << 30} bytes, over the cap of {contract.MAX_IMAGE_BYTES}"):
        bounded.read_file(tmp_path, "big.png", limit=contract.MAX_IMAGE_BYTES)


def test_sha256_streams_and_matches_hashlib(tmp_path: Path) -> None:
    import hashlib

    data = os.urandom(3 * bounded.CHUNK + 17)
    (tmp_path / "f").write_bytes(data)
    assert bounded.sha256_file(tmp_path, "f", limit=len(data), expect=len(data)) == hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------- JSON
@pytest.mark.parametrize("text, message", [
    ('{"a": 1e999}', "number 1e999 overflows to infinity"),
    ('{"a": -1e400}', "overflows to infinity"),
    ('{"a": NaN}', "NaN is not allowed"),
    ('{"a": Infinity}', "Infinity is not allowed"),
    ('{"a": 1, "a": 2}', "duplicate key 'a'"),
    ('{"x": {"b": 1, "b": 1}}', "duplicate key 'b'"),
    ("[" * 65 + "]" * 65, "nested deeper than 64 levels"),
    ("[" * 100_000 + "]" * 100_000, "nested deeper than 64 levels"),
    ('{"a": ' + "9" * 5000 + "}", "not valid JSON"),  # past Python's int digit limit
    ('{"model": "' + "m" * 4097 + '"}', "a string of 4097 characters, over the cap of 4096"),
    ('{"' + "k" * 5000 + '": 1}', "a string of 5000 characters"),
    ('["\\", "' + "[" * 70 + '", ' + "[" * 65 + "]" * 65 + "]", "nested deeper than 64 levels"),
    ("{", "not valid JSON"),
])
def test_parse_json_refuses(text: str, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        bounded.parse_json("doc.json", text.encode())


def test_parse_json_accepts_what_json_does_otherwise() -> None:
    text = '{"a": [1, 2.5, -3e-7, "[{not brackets}]", {"b": null}], "c": "\\"[", "d": "\\\\", "e": "' + "[" * 99 + '"}'
    assert bounded.parse_json("doc.json", text.encode()) == json.loads(text)
    assert bounded.parse_json("doc.json", ("[" * 64 + "]" * 64).encode()) is not None
    escaped = '"' + "\\u00e9" * 1000 + '"'  # 6000 raw bytes, 1000 characters
    assert bounded.parse_json("doc.json", escaped.encode()) == "é" * 1000
    with pytest.raises(DatasetError, match="not UTF-8"):
        bounded.parse_json("doc.json", b'{"a": "\xff"}')


# ---------------------------------------------------------------------------- .npz
def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


WANT = {"latents": ("<f2", [3, 2, 2]), "noise": ("<f2", [2, 2, 2])}


def test_npz_arrays_reads_what_numpy_wrote() -> None:
    lat, noise = np.arange(12, dtype="<f2").reshape(3, 2, 2), np.ones((2, 2, 2), "<f2")
    out = bounded.npz_arrays("l.npz", _npz(latents=lat, noise=noise), WANT)
    np.testing.assert_array_equal(out["latents"], lat)
    np.testing.assert_array_equal(out["noise"], noise)


def test_npz_arrays_checks_members_headers_and_sizes_before_data() -> None:
    lat, noise = np.zeros((3, 2, 2), "<f2"), np.zeros((2, 2, 2), "<f2")
    cases = {
        "is not a .npz (zip) archive": os.urandom(4096),
        "are not": _npz(latents=lat, noise=noise, extra=noise),
        "is float32, not float16": _npz(latents=lat.astype("<f4"), noise=noise),
        "has shape": _npz(latents=np.zeros((4, 2, 2), "<f2"), noise=noise),
        "Python objects": _npz(latents=np.array([None] * 12, dtype=object).reshape(3, 2, 2), noise=noise),
    }
    # the same member twice (zipfile warns, numpy would read one of them)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf, pytest.warns(UserWarning):
        for name in ("latents.npy", "noise.npy", "noise.npy"):
            zf.writestr(name, b"x")
    cases["lists a member twice"] = buf.getvalue()
    # a bomb: a deflated member whose header claims far more than the shape needs
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("latents.npy", b"\0" * (64 << 20))
        zf.writestr("noise.npy", b"\0" * 10)
    cases["unpacks to 67108864 bytes, over the cap"] = buf.getvalue()
    assert len(cases["unpacks to 67108864 bytes, over the cap"]) < 200_000
    for message, data in cases.items():
        with pytest.raises(DatasetError, match=re.escape(message)):
            bounded.npz_arrays("l.npz", data, WANT)


# ---------------------------------------------------------------------------- metadata caps, problem lines
def test_metadata_bounds_names_each_cap() -> None:
    assert bounded.metadata_bounds({"timesteps": [0] * 10, "layers": [], "run": {"prompt": "a" * 2000}}) == []
    over = bounded.metadata_bounds({"timesteps": [0] * 1001, "layers": [{}] * 257, "files": {},
                                    "run": {"prompt": "a" * 2001}})
    assert over == ["metadata.json: 1001 timesteps, over the cap of 1000",
                    "metadata.json: 257 layers, over the cap of 256",
                    "metadata.json: run.prompt has 2001 characters, over the cap of 2000"]
    over = bounded.metadata_bounds({"layers": [{"cross_shape": [1] * 300_000}]})
    assert over == ["metadata.json: layers[0].cross_shape: a shape of 300000 dimensions, over the cap of 4"]


def test_problems_keep_twenty_lines_and_count_the_rest() -> None:
    p = bounded.Problems()
    for i in range(1_000):
        p.add(f"problem {i}\nsecond line")
    assert len(p) == 1_000
    assert p.report()[:2] == ["problem 0 second line", "problem 1 second line"]
    assert len(p.report()) == 21 and p.report()[-1] == "… and 980 more problems"
    assert bounded.printable("caf\udcc3\udca9 \udcff.png") == "café \\xff.png"


# ---------------------------------------------------------------------------- the reader uses all of it
def test_reader_refuses_nan_maps_and_bad_latents(tmp_path: Path) -> None:
    root = write_synthetic_run(tmp_path / "run", steps=2, save_latents=True)
    rel = contract.cross_path(0, 1)
    data = bytearray((root / rel).read_bytes())
    data[0:2] = np.array([np.nan], "<f2").tobytes()
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    run = open_run(BytesSource({**files, rel: bytes(data), contract.LATENTS_FILE: os.urandom(len(files[contract.LATENTS_FILE]))}))
    run.cross(0, 0)
    with pytest.raises(DatasetError, match=f"{rel}: 1 non-finite values"):
        run.cross(0, 1)
    with pytest.raises(DatasetError, match="is not a .npz"):
        run.latents()
    with pytest.raises(DatasetError, match="over the cap"):
        BytesSource(files).read_bytes(contract.METADATA_FILE, 10)


def test_schema_errors_over_a_manifest_match_jsonschema_entry_by_entry(tmp_path: Path) -> None:
    """schema_errors validates one manifest entry per form; its lines must be jsonschema's own."""
    import jsonschema

    from export import validate

    meta = json.loads((write_synthetic_run(tmp_path / "run", steps=3) / contract.METADATA_FILE).read_text())
    entries = list(meta["files"].items())
    rel, good = entries[0]
    meta["files"].update({
        f"x/{i}.bin": dict(good, bytes=bad_bytes, sha256=bad_sha)
        for i, (bad_bytes, bad_sha) in enumerate([(-1, good["sha256"]), (good["bytes"], "F" * 64), ("1", 7)])})
    meta["files"][entries[1][0]] = dict(entries[1][1], kind="nope")
    schema = validate._schema()
    plain = jsonschema.Draft202012Validator({"$ref": "#/$defs/metadata", "$defs": schema["$defs"]})
    expected = sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in plain.iter_errors(meta))
    assert len(expected) == 5
    assert sorted(validate.schema_errors(meta, "metadata")) == expected


def test_list_bounds_stops_a_million_valid_numbers_before_the_schema() -> None:
    assert bounded.list_bounds("metrics.json", {"entropy": {"per_layer": [[0.5] * 1000] * 256}}) is None
    assert bounded.list_bounds("metrics.json", {"latent_norm": [1.0] * 1_000_000}) == \
        "metrics.json: a list of 1000000 values, over the cap of 1024"
    assert bounded.list_bounds("latent_pca.json", {"coords": [[[0.0] * 1025]]}).endswith("a list of 1025 values, over the cap of 1024")


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64])
def test_json_structure_scan_is_the_same_in_any_chunks(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = [
        '{"a": [1, 2.5, "[{x}]", {"b": null}], "c": "\\"[", "d": "\\\\", "e": "' + "[" * 9 + '"}',
        '["\\\\\\"", "a,b", [[[]]], {"k": "v\\\\"}, ",,,"]',
        "[" * 9 + "]" * 9,
        "[" * 11 + "]" * 11,
        '{"s": "' + "x" * 40 + '", "t": "' + "\\u00e9" * 12 + '"}',
        '[1,2,3,4,5,6,7,8,9,10,11,12]',
    ]
    # one check at a time (with several problems, the chunk where each shows decides which is named first)
    checks = [dict(depth=10), dict(max_string=30), dict(max_items=5), dict(max_items=11), dict(max_items=100)]
    for text in docs:
        data = text.encode()
        whole = [bounded.json_structure_problem(data, **kw) for kw in checks]
        monkeypatch.setattr(bounded, "SCAN_CHUNK", chunk)
        assert [bounded.json_structure_problem(data, **kw) for kw in checks] == whole, text
        monkeypatch.undo()
    assert bounded.json_structure_problem(docs[3].encode(), depth=10) == "nested deeper than 10 levels"
    assert bounded.json_structure_problem(docs[4].encode(), max_string=30) == "a string of 40 characters, over the cap of 30"
    assert bounded.json_structure_problem(docs[5].encode(), max_items=11) == "more than 11 values, over the cap"
    assert bounded.json_structure_problem(docs[5].encode(), max_items=12) is None  # 11 commas + 1 bracket
    assert bounded.json_structure_problem(docs[1].encode(), max_items=9) is None   # commas in strings do not count
