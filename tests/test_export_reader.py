"""export.reader: folder, uploaded bytes and URL sources (CPython urllib and the Pyodide code path),
the bounded LRU cache, one-line DatasetErrors, and compatible()."""
from __future__ import annotations

import functools
import http.server
import json
import shutil
import sys
import types
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from export import contract, reader
from export.contract import DatasetError
from export.reader import BytesSource, LRUCache, URLSource, compatible, open_run
from export.writer import RunWriter
from tests.loopback import serving
from tests.synthetic import write_synthetic_run

STEPS, LAYERS, TOKENS, R, S = 3, 2, 5, 8, 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    write_synthetic_run(root / "run", steps=STEPS, layers=LAYERS, tokens=TOKENS, r=R, s=S, seed=3)
    return root


@pytest.fixture
def run_dir(runs):
    return runs / "run"


@pytest.fixture(scope="module")
def server(runs):
    with serving(functools.partial(_QuietHandler, directory=str(runs))) as base:
        yield base


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        _QuietHandler.requests.append(self.path)
        if "Range" in self.headers:  # the reader must never rely on range requests
            self.send_error(416)
            return
        super().do_GET()


def files_of(run_dir: Path, prefix: str = "") -> dict[str, bytes]:
    return {prefix + p.relative_to(run_dir).as_posix(): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def raw_map(run_dir: Path, rel: str, shape) -> np.ndarray:
    return np.frombuffer((run_dir / rel).read_bytes(), "<f2").reshape(shape).astype(np.float32)


def assert_same_run(run, run_dir: Path):
    meta = json.loads((run_dir / "metadata.json").read_text())
    assert run.metadata == meta
    assert run.metrics == json.loads((run_dir / "metrics.json").read_text())
    assert run.pca == json.loads((run_dir / "latent_pca.json").read_text())
    assert (run.num_steps, run.num_layers, run.num_tokens) == (STEPS, LAYERS, TOKENS)
    for layer in range(LAYERS):
        for step in range(STEPS):
            c = run.cross(layer, step)
            assert c.dtype == np.float32 and c.shape == (TOKENS, R, R)
            np.testing.assert_array_equal(c, raw_map(run_dir, contract.cross_path(layer, step), (TOKENS, R, R)))
            np.testing.assert_array_equal(run.self_attention(layer, step),
                                          raw_map(run_dir, contract.self_path(layer, step), (S * S, S * S)))
    from PIL import Image

    img = run.image(1)
    assert img.dtype == np.uint8 and img.shape == (16, 16, 3)
    np.testing.assert_array_equal(img, np.asarray(Image.open(run_dir / contract.image_path(1)).convert("RGB")))
    latents, noise = run.latents()
    assert latents.shape == (STEPS + 1, 4, 4, 4) and noise.shape == (STEPS, 4, 4, 4) and latents.dtype == np.float32


# ---------------------------------------------------------------- sources
def test_folder_source(run_dir):
    run = open_run(run_dir)
    assert_same_run(run, run_dir)
    assert run.name == "run" and open_run(str(run_dir)).metadata == run.metadata


def test_written_values_round_trip_through_float16(tmp_path):
    """What the writer got as float64 comes back as float32 of its float16 rounding."""
    cross = np.random.default_rng(0).random((2, 4, 4)) / 2
    with RunWriter(tmp_path / "r", validate=False) as w:
        w.write_step(0, cross={0: cross})
        w.finish({"schema_version": 1, "run": {}, "tokens": [], "timesteps": [0], "layers": [{"name": "l0"}], "attention": {}},
                 {"m": 1}, {"p": 2})
    run = open_run(tmp_path / "r")
    np.testing.assert_array_equal(run.cross(0, 0), cross.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("prefix", ["", "run/", "./", "uploads/run/"])
def test_bytes_source_with_or_without_the_folder_prefix(run_dir, prefix):
    run = open_run(files_of(run_dir, prefix))
    assert_same_run(run, run_dir)
    if prefix.endswith("run/"):
        assert run.name == "run"


def test_bytes_source_errors(run_dir):
    with pytest.raises(DatasetError, match="no metadata.json"):
        BytesSource({"a.txt": b"x"})
    both = {**files_of(run_dir, "a/"), **files_of(run_dir, "b/")}
    with pytest.raises(DatasetError, match="several runs"):
        BytesSource(both)
    files = files_of(run_dir)
    del files[contract.cross_path(0, 1)]
    run = open_run(files)
    with pytest.raises(DatasetError, match="not among the uploaded files"):
        run.cross(0, 1)


def test_url_source_with_urllib(run_dir, server):
    _QuietHandler.requests.clear()
    run = open_run(f"{server}/run")
    assert isinstance(run.source, URLSource) and run.name == "run"
    # lazy: only the three JSON files are fetched up front
    assert sorted(_QuietHandler.requests) == ["/run/latent_pca.json", "/run/metadata.json", "/run/metrics.json"]
    assert_same_run(run, run_dir)
    n = len(_QuietHandler.requests)
    run.cross(0, 0)  # cached now: no new request
    assert len(_QuietHandler.requests) == n
    with pytest.raises(DatasetError, match="HTTP 404") as err:
        open_run(f"{server}/no-such-run")
    assert "\n" not in str(err.value)


def _fake_js_module(base: str, opened: list[str]):
    """A stand-in for Pyodide's ``js`` module: a synchronous XMLHttpRequest backed by urllib that
    resolves relative URLs against ``base`` (the worker's URL), as the browser does."""

    class Buffer:
        def __init__(self, data: bytes):
            self.data = data

        def to_py(self):
            return memoryview(self.data)

    class XHR:
        @classmethod
        def new(cls):
            return cls()

        def open(self, method, url, is_async):
            assert method == "GET" and is_async is False
            self.url = urllib.request.urljoin(base, url)
            opened.append(url)

        def send(self):
            self.response, self.status, self.statusText = None, 0, ""
            try:
                with urllib.request.urlopen(self.url) as resp:
                    self.response, self.status = Buffer(resp.read()), resp.status
            except urllib.error.HTTPError as exc:
                self.response, self.status, self.statusText = Buffer(exc.read()), exc.code, exc.reason

    return types.SimpleNamespace(XMLHttpRequest=XHR)


def test_url_source_under_pyodide_uses_xhr_and_relative_urls(run_dir, server, monkeypatch):
    opened: list[str] = []
    monkeypatch.setattr(sys, "platform", "emscripten")
    monkeypatch.setitem(sys.modules, "js", _fake_js_module(f"{server}/app.js", opened))
    run = open_run("run")  # under Pyodide a plain string is a URL relative to the worker
    assert isinstance(run.source, URLSource) and run.source.fetch is reader.fetch_pyodide
    assert opened[0] == "run/metadata.json"
    assert_same_run(run, run_dir)
    with pytest.raises(DatasetError, match="HTTP 404"):
        open_run("missing-run")  # a 404 page is an error, not data


def test_never_uses_range_requests(run_dir, server):
    """The test server answers 416 to any Range header, so every read here is a whole-file GET."""
    run = open_run(f"{server}/run", cache_mb=0)
    want = raw_map(run_dir, contract.cross_path(1, 2), (TOKENS, R, R))
    np.testing.assert_array_equal(run.cross(1, 2), want)
    np.testing.assert_array_equal(run.cross(1, 2), want)  # cache_mb=0: fetched again, whole
    assert run.cache_stats()["items"] == 0 and run.cache_stats()["misses"] == 2


# ---------------------------------------------------------------- the cache
def test_lru_cache_unit():
    c = LRUCache(100)
    c.put("a", "A", 40)
    c.put("b", "B", 40)
    assert c.get("a") == "A"  # a is now most recent
    c.put("c", "C", 40)  # evicts b, the least recently used
    assert c.get("b") is None and c.get("a") == "A" and c.get("c") == "C"
    assert c.bytes == 80 and c.evictions == 1
    c.put("huge", "H", 101)  # bigger than the cache: not stored, nothing evicted
    assert c.get("huge") is None and c.bytes == 80
    c.put("a", "A2", 60)  # replacing a key accounts its new size
    assert c.bytes <= 100 and c.get("a") == "A2"
    assert c.stats()["hits"] == 4 and c.stats()["max_bytes"] == 100


def test_run_cache_stays_within_its_bound(run_dir):
    one_map = TOKENS * R * R * 4  # float32 bytes of one decoded cross map
    cap_mb = 3.5 * one_map / 2**20
    run = open_run(run_dir, cache_mb=cap_mb)
    cap = run.cache_stats()["max_bytes"]
    rng = np.random.default_rng(0)
    for _ in range(60):
        run.cross(int(rng.integers(LAYERS)), int(rng.integers(STEPS)))
        assert run.cache_stats()["bytes"] <= cap
    stats = run.cache_stats()
    assert stats["items"] == 3 and stats["evictions"] > 0 and stats["hits"] > 0
    assert stats["hits"] + stats["misses"] == 60
    before = run.cache_stats()["hits"]
    a = run.cross(0, 0)
    b = run.cross(0, 0)
    assert a is b and run.cache_stats()["hits"] == before + 1
    with pytest.raises(ValueError):
        a[0, 0, 0] = 1.0  # cached arrays are read-only


def test_index_errors(run_dir):
    run = open_run(run_dir)
    with pytest.raises(IndexError):
        run.cross(0, STEPS)
    with pytest.raises(IndexError):
        run.self_attention(LAYERS, 0)


# ---------------------------------------------------------------- bad data: one-line DatasetErrors
def corrupt(run_dir: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "bad"
    shutil.copytree(run_dir, copy)
    edit(copy)
    return copy


def edit_meta(change):
    def edit(root: Path):
        meta = json.loads((root / "metadata.json").read_text())
        change(meta)
        (root / "metadata.json").write_text(json.dumps(meta))
    return edit


CASES = {
    "missing folder": (None, "no such folder", "open"),
    "bad JSON": (lambda r: (r / "metadata.json").write_text("{not json"), "not valid JSON", "open"),
    "unknown schema": (edit_meta(lambda m: m.update(schema_version=99)), "schema_version 99 is not known", "open"),
    "path escape": (edit_meta(lambda m: m["files"].update({"../outside.bin": {"bytes": 2}})), "'..'", "open"),
    "URL path": (edit_meta(lambda m: m["files"].update({"http://evil/x.bin": {"bytes": 2}})), "URLs", "open"),
    "missing file": (lambda r: (r / contract.cross_path(1, 1)).unlink(), "missing", "cross"),
    "truncated bin": (lambda r: (r / contract.cross_path(1, 1)).write_bytes(b"\0" * 10), "10 bytes", "cross"),
    "missing metrics": (lambda r: (r / "metrics.json").unlink(), "metrics.json: missing", "open"),
    "not an object": (lambda r: (r / "metadata.json").write_text("[1, 2]"), "not a JSON object", "open"),
    "bad image": (lambda r: (r / contract.image_path(0)).write_bytes(b"x" * (r / contract.image_path(0)).stat().st_size),
                  "does not decode", "image"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_raises_one_line_dataset_error(run_dir, tmp_path, case):
    edit, message, when = CASES[case]
    path = tmp_path / "nope" if edit is None else corrupt(run_dir, tmp_path, edit)
    with pytest.raises(DatasetError) as err:
        run = open_run(path)
        if when == "cross":
            run.cross(1, 1)
        elif when == "image":
            run.image(0)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_symlink_escape_is_refused(run_dir, tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes((run_dir / contract.cross_path(0, 0)).read_bytes())
    bad = corrupt(run_dir, tmp_path, lambda r: None)
    (bad / contract.cross_path(0, 0)).unlink()
    (bad / contract.cross_path(0, 0)).symlink_to(secret)
    with pytest.raises(DatasetError, match="outside the run folder"):
        open_run(bad).cross(0, 0)


# ---------------------------------------------------------------- compatible()
def test_compatible(tmp_path, run_dir):
    a = open_run(run_dir)
    assert compatible(a, a) == []
    same_shape = open_run(write_synthetic_run(tmp_path / "same", steps=STEPS, layers=LAYERS, tokens=TOKENS, r=R, s=S,
                                              seed=9, prompt="another prompt"))
    assert compatible(a, same_shape) == []
    other = open_run(write_synthetic_run(tmp_path / "other", steps=STEPS + 1, layers=LAYERS + 1, tokens=TOKENS + 2,
                                         r=R, s=S, layer_resolutions=[4, R, R], image_size=8))
    diffs = compatible(a, other)
    text = "\n".join(diffs)
    assert "step count differs: 3 vs 4" in text
    assert "token count differs: 5 vs 7" in text
    assert "layers only in the second run: down_blocks.2" in text
    assert "layer down_blocks.0.attentions.0.transformer_blocks.0: cross maps stored at [8, 8] vs [4, 4]" in text
    assert "image size differs: 16x16 vs 8x8" in text
    no_self = open_run(write_synthetic_run(tmp_path / "noself", steps=STEPS, layers=LAYERS, tokens=TOKENS, r=R, s=S,
                                           self_attention=False))
    assert compatible(a, no_self) == ["self attention recorded in the first run only"]
    with pytest.raises(DatasetError, match="not in this run's manifest"):
        no_self.self_attention(0, 0)


# ---------------------------------------------------------------- run_differences()
def test_run_differences_lists_every_changed_setting(tmp_path, run_dir):
    a = open_run(run_dir).metadata
    assert reader.run_differences(a, a) == []
    # a run written with another seed and prompt: exactly those two lines, with both runs' values
    b = open_run(write_synthetic_run(tmp_path / "b", steps=STEPS, layers=LAYERS, tokens=TOKENS, r=R, s=S, seed=9,
                                     prompt="a blue square")).metadata
    assert reader.run_differences(a, b) == [f"prompt: “{a['run']['prompt']}” (A) vs “a blue square” (B)",
                                            f"seed: {a['run']['seed']} (A) vs 9 (B)"]
    # every other setting, changed one at a time in a copy of A's metadata
    changes = {"negative_prompt": ("blurry", "negative prompt: — (A) vs “blurry” (B)"),
               "cfg_scale": (3.0, "cfg: 7.5 (A) vs 3.0 (B)"),
               "num_steps": (50, f"steps: {STEPS} (A) vs 50 (B)"),
               "scheduler": ("EulerDiscreteScheduler", "scheduler: DDIMScheduler (A) vs EulerDiscreteScheduler (B)"),
               "model": ({"source": "hub", "id": "sd-1.5"}, "model: synthetic (default) (A) vs sd-1.5 (hub) (B)"),
               "height": (32, "size: 16×16 (A) vs 32×16 (B)"),
               "dtype": ("float16", "dtype: float32 (A) vs float16 (B)"),
               "device": ("cuda", "device: cpu (A) vs cuda (B)")}
    for key, (value, line) in changes.items():
        other = json.loads(json.dumps(a))
        other["run"][key] = value
        assert reader.run_differences(a, other) == [line], key
    # a setting one run does not record, and metadata without a run block, give lines instead of errors
    unrecorded = json.loads(json.dumps(a))
    del unrecorded["run"]["scheduler"]
    assert reader.run_differences(a, unrecorded) == ["scheduler: DDIMScheduler (A) vs — (B)"]
    assert f"seed: {a['run']['seed']} (A) vs — (B)" in reader.run_differences(a, {})


# ---------------------------------------------------------------- schema 2
def test_v2_per_head_run_reads_head_means_and_heads(tmp_path):
    root = write_synthetic_run(tmp_path / "v2", steps=2, per_head=True, heads=3, grid=(4, 8), self_grid=(2, 4),
                               image_hw=(16, 24))
    run = open_run(root)
    assert (run.schema_version, run.per_head, run.num_heads(1)) == (2, True, 3)
    assert run.family["name"] == "sd" and run.family == run.metadata["family"]
    assert run.cross_grid(0) == (4, 8) and run.self_grid(0) == (2, 4) and run.image_size == (16, 24)
    heads = run.cross_heads(1, 1)
    assert heads.dtype == np.float32 and heads.shape == (3, TOKENS, 4, 8)
    np.testing.assert_array_equal(heads, raw_map(root, contract.cross_path(1, 1), (3, TOKENS, 4, 8)))
    mean = run.cross(1, 1)
    assert mean.dtype == np.float32 and mean.shape == (TOKENS, 4, 8) and not mean.flags.writeable
    np.testing.assert_allclose(mean, heads.mean(axis=0), rtol=2**-10, atol=1e-4)  # float16 precision
    assert not np.allclose(heads[0], heads[1])  # the heads are distinct, so the mean is not any one of them
    assert run.self_attention(0, 0).shape == (8, 8)
    from PIL import Image

    final = run.final_image()
    assert final.dtype == np.uint8 and final.shape == (16, 24, 3)
    np.testing.assert_array_equal(final, np.asarray(Image.open(root / contract.FINAL_IMAGE).convert("RGB")))


def test_v2_mean_run_has_no_heads(run_dir):
    run = open_run(run_dir)
    assert run.schema_version == 2 and not run.per_head and run.num_heads(0) is None
    with pytest.raises(DatasetError, match="head-mean"):
        run.cross_heads(0, 0)
    with pytest.raises(IndexError):
        run.num_heads(LAYERS)


@pytest.mark.parametrize("ds", ["default", "compare"])
def test_shipped_schema_1_runs_read(ds):
    run = open_run(Path(__file__).resolve().parents[1] / "datasets" / ds)
    assert run.schema_version == 1 and not run.per_head and run.family == contract.V1_FAMILY
    assert run.final_image() is None and run.num_heads(0) is None
    t, h, w = run.metadata["layers"][0]["cross_shape"]
    assert run.cross(0, run.num_steps - 1).shape == (t, h, w) and run.cross_grid(0) == (h, w)
    sh, sw = run.self_grid(0)
    assert sh == sw and [sh * sw] * 2 == run.metadata["layers"][0]["self_shape"]
    assert run.image(0).shape == (*run.image_size, 3)
