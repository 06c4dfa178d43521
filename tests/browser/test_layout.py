"""The dashboard's layout, measured in Chromium at 1280x720 and 1440x900, on every tab.

One ``panel serve`` of ``app/main.py`` opens ``datasets/default`` with ``datasets/compare`` as the comparison run
(one page per viewport), and a schema-2 run with non-square (32x48) images (one more page). Each check is a
measurement of the rendered page, never of the Python models:

* nothing overflows sideways: the page and every visible scroll container are no wider than their box, and every
  visible canvas (Bokeh draws in shadow roots) ends inside the viewport;
* images keep their aspect ratio: for each visible ``*-figure`` drawing an ``image_rgba``, the plot frame (BokehJS's
  ``view.frame.bbox``, without title or colour bar) has the aspect of the image's ``dw``/``dh``, and the image as drawn
  on screen has the aspect of its pixel array, within 2 %;
* hidden tabs leave no blank space: each visible scroll container (the page, the template's ``#main``) is no taller
  than the bottom of the visible content in it plus :data:`SLACK_PX`.

A screenshot of every tab at 1280x720 goes to ``test-artifacts/layout-<tab>-1280x720.png`` and each tab's
measurements to ``layout-<tab>-<viewport>.json`` beside it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.browser.conftest import ROOT
from tests.synthetic import write_synthetic_run

DEFAULT = ROOT / "datasets" / "default"
COMPARE = ROOT / "datasets" / "compare"
VIEWPORTS = [(1280, 720), (1440, 900)]
TABS = ["Timeline", "Attention", "Trajectory", "Compare runs"]
#: Relative tolerance on aspect ratios.
ASPECT_RTOL = 0.02
#: Blank space allowed below the last visible content (margins and padding).
SLACK_PX = 40
#: The non-square run's image (height, width) and attention grid: the same 2:3 aspect.
WIDE_HW, WIDE_GRID = (32, 48), (4, 6)
TIMEOUT = 60_000

MEASURE_JS = r"""
() => {
  const vis = (el) => el.checkVisibility({checkOpacity: true, checkVisibilityCSS: true});
  const all = [];
  const walk = (root) => { for (const el of root.querySelectorAll('*')) { all.push(el); if (el.shadowRoot) walk(el.shadowRoot); } };
  walk(document);
  const parent = (el) => el.parentElement || (el.getRootNode() instanceof ShadowRoot ? el.getRootNode().host : null);
  // the name of the nearest named Bokeh model drawing ``el`` (climbing out of shadow roots)
  const names = new Map();
  for (const v of Bokeh.index.all_views()) if (v.el && v.model.name) names.set(v.el, v.model.name);
  const owner = (el) => { for (let n = el; n; n = parent(n)) if (names.has(n)) return names.get(n); return null; };
  const tag = (el) => el.tagName.toLowerCase() + (el.className && typeof el.className === 'string' ? '.' + el.className.split(' ')[0] : '');
  const label = (el) => owner(el) || (el.id ? '#' + el.id : el.tagName.toLowerCase() + '.' + String(el.className).split(' ')[0]);

  const se = document.scrollingElement;
  const scrollers = [{el: se, name: 'page', top: -scrollY, scrollTop: 0, bottom: 0,
                      scrollWidth: se.scrollWidth, clientWidth: innerWidth, scrollHeight: se.scrollHeight, clientHeight: innerHeight}];
  for (const el of all) {
    const cs = getComputedStyle(el);
    const scrolls = (o) => o === 'auto' || o === 'scroll';
    if (!(scrolls(cs.overflowX) || scrolls(cs.overflowY)) || !vis(el) || el.clientHeight === 0) continue;
    scrollers.push({el, name: label(el), top: el.getBoundingClientRect().top + el.clientTop, scrollTop: el.scrollTop, bottom: 0,
                    scrollWidth: el.scrollWidth, clientWidth: el.clientWidth, scrollHeight: el.scrollHeight, clientHeight: el.clientHeight});
  }
  const byEl = new Map(scrollers.map((s) => [s.el, s]));
  for (const s of scrollers) { s.left = s === scrollers[0] ? -scrollX : s.el.getBoundingClientRect().left + s.el.clientLeft; s.widest = null; }
  const canvases = new Map();
  const LEAVES = new Set(['CANVAS', 'IMG', 'INPUT', 'SELECT', 'TEXTAREA', 'BUTTON', 'svg']);
  for (const el of all) {
    const leaf = LEAVES.has(el.tagName) || [...el.childNodes].some((c) => c.nodeType === 3 && c.textContent.trim());
    const nested = byEl.has(el);  // a scroll container's own box is content of the ones around it
    if (!leaf && !nested) continue;
    const r = el.getBoundingClientRect();
    if (!(r.width > 0 && r.height > 0)) continue;
    const shown = vis(el);
    if (el.tagName === 'CANVAS' && shown) {
      const c = {name: label(el), left: r.left, right: r.right, width: r.width};
      canvases.set(JSON.stringify(c), c);  // Bokeh stacks several canvases per plot
    }
    for (let n = parent(el); n; n = parent(n)) {
      const s = byEl.get(n);
      if (!s || s === scrollers[0]) continue;
      // what reaches furthest right in it, shown or not (a hidden tab still takes its width)
      const right = r.right - s.left + s.el.scrollLeft;
      if (leaf && (!s.widest || right > s.widest.right)) s.widest = {name: label(el), tag: tag(el), right, shown};
      // the bottom of the visible content, in its scroll coordinates
      if (shown) s.bottom = Math.max(s.bottom, r.bottom - s.top + s.scrollTop);
    }
    if (leaf && (!scrollers[0].widest || r.right + scrollX > scrollers[0].widest.right))
      scrollers[0].widest = {name: label(el), tag: tag(el), right: r.right + scrollX, shown};
    if (shown) scrollers[0].bottom = Math.max(scrollers[0].bottom, r.bottom + scrollY);
  }

  const figures = [];
  for (const v of Bokeh.index.all_views()) {
    const m = v.model;
    if (!m.name || !m.name.endsWith('-figure') || !m.renderers || !vis(v.el)) continue;
    const img = m.renderers.find((g) => g.glyph && g.glyph.constructor.__name__ === 'ImageRGBA');
    if (!img) continue;
    const d = img.data_source.data;
    const col = (k) => (d instanceof Map ? d.get(k) : d[k]);
    const image = col('image')[0];
    const shape = image && image.shape ? Array.from(image.shape) : [image.length, image[0].length];
    const f = v.frame.bbox, xs = v.frame.x_scale, ys = v.frame.y_scale;
    const x = col('x')[0], y = col('y')[0], dw = col('dw')[0], dh = col('dh')[0];
    figures.push({name: m.name, source: img.data_source.name, frame: [f.width, f.height], dw, dh, shape,
                  step: col('step') ? col('step')[0] : null,
                  // the image's extent on screen, through the frame's own scales (its ranges may not be the image's)
                  drawn: [Math.abs(xs.compute(x + dw) - xs.compute(x)), Math.abs(ys.compute(y + dh) - ys.compute(y))],
                  ranges: [[m.x_range.start, m.x_range.end], [m.y_range.start, m.y_range.end]]});
  }
  return {viewport: [innerWidth, innerHeight], canvases: [...canvases.values()], figures,
          scrollers: scrollers.map(({el, ...s}) => s)};
}
"""


def measure(page) -> dict:
    """The layout once it has settled: two measurements 300 ms apart that agree (Bokeh lays out in steps)."""
    last, deadline = None, time.monotonic() + 15
    while True:
        now = page.evaluate(MEASURE_JS)
        if now == last or time.monotonic() > deadline:
            return now
        last = now
        page.wait_for_timeout(300)


def problems(m: dict, *, sideways: bool = True, blank: bool = True) -> list[str]:
    """Every layout fault in the measurement ``m``, each as one line naming the element and the excess."""
    width = m["viewport"][0]
    out = []
    for f in m["figures"]:
        frame, want = f["frame"][0] / f["frame"][1], f["dw"] / f["dh"]
        if abs(frame / want - 1) > ASPECT_RTOL:
            out.append(f"{f['name']}: frame {f['frame'][0]:.0f}x{f['frame'][1]:.0f} = {frame:.3f}, image dw/dh = "
                       f"{f['dw']}/{f['dh']} = {want:.3f} (off by {100 * (frame / want - 1):+.1f} %)")
        rows, cols = f["shape"]
        drawn, pixels = f["drawn"][0] / f["drawn"][1], cols / rows
        if abs(drawn / pixels - 1) > ASPECT_RTOL:
            out.append(f"{f['name']}: drawn {f['drawn'][0]:.0f}x{f['drawn'][1]:.0f} = {drawn:.3f}, pixel array "
                       f"{cols}x{rows} = {pixels:.3f} (off by {100 * (drawn / pixels - 1):+.1f} %)")
    if sideways:
        for c in m["canvases"]:
            if c["right"] > width + 0.5:
                out.append(f"canvas of {c['name']}: right edge {c['right']:.0f} > viewport {width} (by {c['right'] - width:.0f} px)")
        for s in m["scrollers"]:
            if s["scrollWidth"] > s["clientWidth"] + 1:
                w = s["widest"] or {}
                out.append(f"{s['name']}: scrolls sideways, {s['scrollWidth']} wide in {s['clientWidth']} "
                           f"(by {s['scrollWidth'] - s['clientWidth']} px; furthest right: {w.get('name')} "
                           f"({w.get('tag')}, {'shown' if w.get('shown') else 'hidden'}))")
    if blank:
        for s in m["scrollers"]:
            if s["scrollHeight"] > max(s["clientHeight"], s["bottom"] + SLACK_PX) + 1:
                out.append(f"{s['name']}: {s['scrollHeight']} px tall, visible content ends at {s['bottom']:.0f} "
                           f"({s['scrollHeight'] - s['bottom']:.0f} px below it blank)")
    return out


def slug(tab: str) -> str:
    return tab.lower().replace(" ", "-")


def show_tab(bp, tab: str) -> None:
    bp.page.get_by_text(tab, exact=True).first.click()


def wait_images(bp, sources: list[str], width: int | None = None) -> None:
    """Wait until each ``image_rgba`` source holds an image (not the 1-pixel placeholder), ``width`` wide if given."""
    for name in sources:
        bp.wait_column(name, "dw", "v[0] > 1" if width is None else f"v[0] === {width}")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    return write_synthetic_run(tmp_path_factory.mktemp("layout") / "wide", steps=3, layers=2, tokens=5, seed=3,
                               grid=WIDE_GRID, image_hw=WIDE_HW)


@pytest.fixture(scope="module")
def layout_server(panel_server):
    if not (DEFAULT / "metadata.json").exists() or not (COMPARE / "metadata.json").exists():
        pytest.fail(f"the layout tests need the shipped runs {DEFAULT} and {COMPARE}")
    return panel_server(env={"DIFFVIZ_DATASET": str(DEFAULT)})


@pytest.fixture(scope="module")
def pages(browser, bokeh, layout_server):
    """``pages(key, query, viewport)``: one page per key, opened on first use and kept for the module."""
    opened: dict[str, tuple] = {}

    def get(key: str, query: str, viewport: tuple[int, int], width: int | None = None):
        if key not in opened:
            context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
            opened[key] = (context, None)
            page = context.new_page()
            page.set_default_timeout(TIMEOUT)
            response = page.goto(layout_server.url + query, wait_until="domcontentloaded")
            if response is None or response.status != 200:  # fail at once, not after every wait times out
                tail = "\n".join(layout_server.log_text().splitlines()[-8:])
                raise AssertionError(f"{layout_server.url + query} answered {response and response.status}:\n{tail}")
            bp = bokeh(page)
            bp.wait_model("timeline-image")
            wait_images(bp, ["timeline-image"], width)  # the run asked for, not the default one opened before it
            opened[key] = (context, bp)
        if opened[key][1] is None:
            pytest.fail(f"the page {key} did not open (see the first failure)")
        return opened[key][1]

    yield get
    for context, _bp in opened.values():
        context.close()


#: The image sources each tab shows (of the main and comparison runs).
TAB_IMAGES = {"Timeline": ["timeline-image"], "Attention": ["attention-image"], "Trajectory": ["trajectory-preview"],
              "Compare runs": ["compare-image-a", "compare-image-b"]}


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("viewport", VIEWPORTS, ids=lambda v: f"{v[0]}x{v[1]}")
@pytest.mark.parametrize("tab", TABS)
def test_tab_fits_the_viewport(pages, tab, viewport, artifacts):
    bp = pages(f"{viewport}", "?compare=datasets/compare", viewport)
    show_tab(bp, tab)
    wait_images(bp, TAB_IMAGES[tab])
    m = measure(bp.page)
    name = f"layout-{slug(tab)}-{viewport[0]}x{viewport[1]}"
    (artifacts / f"{name}.json").write_text(json.dumps(m, indent=1))
    if viewport == (1280, 720):
        bp.screenshot(artifacts / f"{name}.png")
    shown = {f["source"] for f in m["figures"]}
    assert set(TAB_IMAGES[tab]) <= shown, f"{tab}: image figures shown {sorted(shown)}"
    assert m["canvases"], f"{tab}: no visible canvas"
    found = problems(m)
    assert not found, f"{tab} at {viewport[0]}x{viewport[1]}:\n" + "\n".join(found)


@pytest.mark.parametrize("tab", ["Timeline", "Attention"])
def test_non_square_images_keep_their_aspect(pages, wide, tab, artifacts):
    bp = pages("wide", f"?dataset={wide}", VIEWPORTS[0], WIDE_HW[1])
    show_tab(bp, tab)
    sources = TAB_IMAGES[tab] + (["timeline-final"] if tab == "Timeline" else [])
    wait_images(bp, sources, WIDE_HW[1])
    m = measure(bp.page)
    (artifacts / f"layout-wide-{slug(tab)}-1280x720.json").write_text(json.dumps(m, indent=1))
    figures = {f["source"]: f for f in m["figures"]}
    assert set(sources) <= set(figures), f"{tab}: image figures shown {sorted(figures)}"
    for source in sources:  # the run's own non-square images are what is drawn
        assert figures[source]["shape"] == list(WIDE_HW), figures[source]
    found = problems(m, sideways=False, blank=False)
    if tab == "Attention":  # the word grid: one picture of every word's map, drawn in its own aspect
        bp.set_widget("dv:grid", True, "active")
        try:
            bp.wait_column("attention-grid", "dw", "v[0] > 1")
            grid = measure(bp.page)
        finally:
            bp.set_widget("dv:grid", False, "active")
        assert "attention-grid" in {f["source"] for f in grid["figures"]}, "the word grid is not shown"
        found += problems({**grid, "figures": [f for f in grid["figures"] if f["source"] == "attention-grid"]},
                          sideways=False, blank=False)
    assert not found, f"non-square run, {tab}:\n" + "\n".join(found)


def test_the_checks_flag_each_fault_and_pass_a_clean_layout():
    """:func:`problems` on hand-made measurements (no browser): one clean layout, then one fault of each kind."""
    figure = {"name": "x-figure", "source": "x", "frame": [300, 200], "dw": 48, "dh": 32, "shape": [32, 48], "drawn": [300, 200]}
    page = {"name": "page", "scrollWidth": 1280, "clientWidth": 1280, "scrollHeight": 720, "clientHeight": 720, "bottom": 700,
            "widest": None}
    main = {"name": "#main", "scrollWidth": 960, "clientWidth": 963, "scrollHeight": 900, "clientHeight": 656, "bottom": 880,
            "widest": {"name": "x-figure", "right": 960, "shown": True}}
    clean = {"viewport": [1280, 720], "canvases": [{"name": "x-figure", "left": 400, "right": 1270, "width": 870}],
             "figures": [figure], "scrollers": [page, main]}
    assert problems(clean) == []
    cases = {
        "frame 300x250": {"figures": [{**figure, "frame": [300, 250]}]},  # each aspect check on its own
        "drawn 450x200": {"figures": [{**figure, "drawn": [450, 200]}]},  # ranges of another image
        "by 20 px)": {"canvases": [{"name": "x-figure", "left": 400, "right": 1300, "width": 900}]},
        "scrolls sideways, 1065 wide in 963 (by 102 px; furthest right: y-figure (canvas, hidden))":
            {"scrollers": [page, {**main, "scrollWidth": 1065,
                                  "widest": {"name": "y-figure", "tag": "canvas", "right": 1065, "shown": False}}]},
        "1400 px tall, visible content ends at 880 (520 px below it blank)": {"scrollers": [page, {**main, "scrollHeight": 1400}]},
    }
    for expected, change in cases.items():
        found = problems({**clean, **change})
        assert len(found) == 1 and expected in found[0], (expected, found)
    # each kind of check can be left out
    assert problems({**clean, **cases["by 20 px)"]}, sideways=False) == []
    assert problems({**clean, "scrollers": [page, {**main, "scrollHeight": 1400}]}, blank=False) == []
