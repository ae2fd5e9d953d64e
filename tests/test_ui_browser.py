"""End to end in a real browser: Debian's headless Chromium driven by Playwright against ``clic ui`` on the tiny
model (the command itself, in a subprocess on a free localhost port).

One user session, as a person would click it: the page lists the shipped examples; an uploaded image
without a mask, over an example a click put in the editor, gives the error message in the page; a click on an example loads both images with their masks;
learning shows its loss terms live (status line and plot) and can be cancelled; learn 3 steps, get the concept file;
upload a target, Find region, paint more, transfer, and see each result whole, at a readable size, beside v*'s
attention. ``CLIC_UI_SCREENSHOT=docs/ui.png`` also saves a screenshot of the page after the transfer;
``CLIC_UI_MODEL=src/clic/assets/toymodel`` runs it on another model (the README's screenshot uses the toy model).

Playwright cannot download its own browsers here: it always runs /usr/bin/chromium (``apt-get install chromium``).
"""

import contextlib
import io
import os
import re
import shutil
import socket
import time
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
EXAMPLES = Path(__file__).resolve().parent.parent / "src" / "clic" / "assets" / "examples"
TIMEOUT_MS = 120_000
# Headless in a container with a closed network: no sandbox (root), no GPU, a small /dev/shm is common, and none of
# Chromium's own background connections (refused or hanging on a closed network).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                 reason=f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium)"),
              pytest.mark.filterwarnings("ignore:::gradio.*")]   # pandas deprecations inside Gradio's queue


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ui_server(model_dir, log_path):
    """``clic ui`` on ``model_dir`` in a subprocess on a free port (one torch thread: the browser needs the other
    core); yields its URL. Each attempt of the test gets its own server, so a job left running by a failed attempt
    cannot hold the model for the next one."""
    import subprocess
    import sys
    import urllib.request

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "clic", "ui", "--model", model_dir, "--device", "cpu",
                                   "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"clic ui did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(1)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


# ---------------------------------------------------------------------------------------------- page helpers


def paint(page, editor: str, rows: int = 3) -> None:
    """Drag the mouse over the middle of the editor's canvas in a zig-zag (the brush is the active tool). Few
    mouse events: the editor redraws its canvas on each, slowly in a software-rendered headless browser."""
    box = page.locator(f"{editor} canvas").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - 50, cy - 20)
    page.mouse.down()
    for k in range(rows):
        y = cy - 20 + 12 * k
        page.mouse.move(cx + 50, y, steps=2)
        page.mouse.move(cx - 50, y + 6, steps=2)
    page.mouse.up()


def set_number(page, selector: str, value) -> None:
    """Type into a number field; Gradio takes the value when the field loses focus. A field in an accordion that
    was just opened may still be reset to its initial value as it mounts: then type again."""
    field = page.locator(f"{selector} input").first
    for _ in range(5):
        field.fill(str(value))
        field.press("Tab")
        page.wait_for_timeout(300)
        if field.input_value() == str(value):
            return
    raise AssertionError(f"{selector} keeps {field.input_value()!r}, not {value}")


def status(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} textarea").input_value()


def click_and_wait(page, button: str, elem_id: str, pattern: str, timeout: int = TIMEOUT_MS) -> str:
    """Click ``button``, then wait until the status box says something new that matches the regular expression
    ``pattern`` (from its start); return its text. On a timeout the assertion shows what the box says."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    before = status(page, elem_id)
    page.locator(button).click()
    try:
        page.wait_for_function(
            "([id, pattern, before]) => { const t = document.querySelector('#' + id + ' textarea');"
            "  return t && t.value !== before && new RegExp('^(' + pattern + ')').test(t.value); }",
            arg=[elem_id, pattern, before], timeout=timeout)
    except PlaywrightTimeout:
        raise AssertionError(f"#{elem_id} still says {status(page, elem_id)!r} after {timeout / 1000:.0f} s, "
                             f"waiting for {pattern!r}") from None
    return status(page, elem_id)


def upload(page, editor: str, path) -> None:
    """Upload into an ImageEditor and wait until the editor shows it. The editor selects the brush by itself once
    the image is on its canvas; if it has not after a while, select it by hand (and then it must take).

    The editor must have mounted its canvas first: a file given to it before (a fresh page's first upload) is
    dropped with a page error ("reading 'reset_layers'") and the editor's value stays empty."""
    page.locator(f"{editor} canvas").first.wait_for()
    page.locator(f"{editor} input[type=file]").set_input_files(str(path))
    page.locator(f"{editor} canvas").first.wait_for()
    brush = page.locator(f"{editor} button[aria-label='Brush']")
    try:
        page.locator(f"{editor} button[aria-label='Brush'].highlight").wait_for(timeout=20_000)
    except Exception:  # noqa: BLE001 - playwright's TimeoutError
        brush.click()
        page.locator(f"{editor} button[aria-label='Brush'].highlight").wait_for()
    page.wait_for_timeout(300)


# Gradio's error toasts close by themselves: record every toast's text as it appears, so that a check made after a
# slow step still sees it.
RECORD_TOASTS = """
window.__clicToasts = [];
new MutationObserver(() => {
  for (const t of document.querySelectorAll('.toast-body')) {
    if (!window.__clicToasts.includes(t.innerText)) window.__clicToasts.push(t.innerText);
  }
}).observe(document, {childList: true, subtree: true, characterData: true});
"""


def served_images(page, selector: str) -> list:
    """Fetch every <img> under ``selector`` from the server as the page would, and decode it: the results are
    really there (independent of whether the browser has painted a lazily loaded image yet)."""
    images = []
    for src in page.eval_on_selector_all(f"{selector} img", "els => els.map(e => e.src)"):
        response = page.request.get(src)
        assert response.ok, f"{src}: HTTP {response.status}"
        images.append(Image.open(io.BytesIO(response.body())).convert("RGB"))
    return images


def open_advanced(page, index: int) -> None:
    page.get_by_text("Advanced", exact=True).nth(index).click()
    page.wait_for_timeout(500)


# ---------------------------------------------------------------------------------------------- the test


def whole_and_readable(page, selector: str) -> list[dict]:
    """The rendered <img> elements under ``selector``: each must show its whole picture (object-fit contain, its box
    inside the gallery's, nothing cut at the bottom) at a readable size."""
    boxes = page.eval_on_selector_all(
        f"{selector} img",
        """(els, sel) => { const g = document.querySelector(sel).getBoundingClientRect();
             return els.map(e => { const r = e.getBoundingClientRect();
               return {fit: getComputedStyle(e).objectFit, w: r.width, h: r.height, nw: e.naturalWidth,
                       nh: e.naturalHeight, inside: r.top >= g.top - 1 && r.bottom <= g.bottom + 1}; }); }""",
        selector)
    for box in boxes:
        assert box["fit"] == "contain" and box["inside"], boxes
        assert min(box["nw"], box["nh"]) >= 200, boxes          # scaled up from the model's 64 or 128 px
    return boxes


def _learn_and_transfer(page, page_url, tmp_path, lap):
    from playwright.sync_api import expect

    page.goto(page_url)
    page.locator("#source-editor").wait_for()

    # 0. The shipped examples are listed (the editors start empty: see build_app).
    page.locator("#examples img").nth(1).wait_for()
    assert page.locator("#examples img").count() >= 2

    # 1. An image without a mask, uploaded over an example a click put in the editor (the upload is what is sent,
    #    not the example's image and mask): the message is in the page (status box and Gradio's error toast), not a
    #    trace.
    page.locator("#examples img").nth(1).click()       # chair.png and its mask
    page.wait_for_function("() => document.querySelector('#learn-status textarea')?.value.startsWith('Example')")
    upload(page, "#source-editor", EXAMPLES / "toy_source.png")
    text = click_and_wait(page, "#learn-btn", "learn-status", "Error")
    assert text.startswith("Error: the source mask is empty: paint the region"), text
    page.wait_for_function("() => window.__clicToasts.some(t => t.includes('the source mask is empty'))")
    assert "Traceback" not in page.content()

    lap("error")
    # 2. A click on an example puts its source and target, masks included, in the editors again; a long run shows the
    #    loss terms live (the status line, and the plot: not under a progress overlay) and can be cancelled.
    page.locator("#examples img").nth(0).click()
    page.wait_for_function("() => document.querySelector('#learn-status textarea')?.value.startsWith('Example')")
    open_advanced(page, 0)
    set_number(page, "#learn-steps", 5000)
    text = click_and_wait(page, "#learn-btn", "learn-status", "step|Error")
    assert re.match(r"step \d+/5000  loss [\d.]+  \(l_con [\d.]+, l_att [\d.]+, l_roi [\d.]+\)$", text), text
    page.wait_for_function("() => ['l_con', 'l_att', 'l_roi'].every(t => "
                           "document.querySelector('#loss-plot').innerText.includes(t))")
    # ...its three lines are drawn (a line with no colour is in the page, but invisible) and its legend is inside
    # the plot's box (not cut off below it)
    page.wait_for_function("() => { const lines = [...document.querySelectorAll('#loss-plot .mark-line path')];"
                           "  return lines.length === 3 && lines.every(p => getComputedStyle(p).stroke !== 'none'"
                           "    && (p.getAttribute('d') || '').includes('L')); }")
    legend = page.evaluate("() => { const box = document.querySelector('#loss-plot').getBoundingClientRect();"
                           "  return [...document.querySelectorAll('#loss-plot .role-legend-label text')].map(t =>"
                           "    [t.textContent, t.getBoundingClientRect().bottom <= box.bottom]); }")
    assert sorted(legend) == [["l_att", True], ["l_con", True], ["l_roi", True]], legend
    assert status(page, "learn-status").startswith("step "), status(page, "learn-status")   # still learning
    page.locator("#loss-plot").screenshot(path=str(tmp_path / "loss-live.png"))
    expect(page.locator("#learn-status textarea")).to_be_visible()
    assert click_and_wait(page, "#cancel-btn", "learn-status", "Stopped|Error").startswith("Stopped: cancelled at step")

    lap("cancel")
    # 3. Learn 3 steps on the example: the concept file is offered for download.
    set_number(page, "#learn-steps", 3)
    text = click_and_wait(page, "#learn-btn", "learn-status", "Learned|Error")
    assert text.startswith("Learned chair-") and "step 3/3" in text, text
    assert page.locator("#concept-file a", has_text=".safetensors").count() >= 1 or \
        ".safetensors" in page.locator("#concept-file").inner_text()
    page.locator("#learn-preview img").nth(1).wait_for()
    whole_and_readable(page, "#learn-preview")

    lap("learn")
    # 4. Target (the example's, loaded in step 2): Find region (w* for 3 steps), then paint more by hand,
    #    transfer 5 of 10 steps.
    open_advanced(page, 1)
    set_number(page, "#match-steps", 3)
    set_number(page, "#t-steps", 10)
    set_number(page, "#t-start", 5)
    assert click_and_wait(page, "#find-btn", "transfer-status", "Region found|Error").startswith("Region found")
    page.wait_for_timeout(500)
    page.locator("#target-editor button[aria-label='Brush']").click()
    page.locator("#target-editor button[aria-label='Brush'].highlight").wait_for()
    paint(page, "#target-editor", rows=2)
    text = click_and_wait(page, "#transfer-btn", "transfer-status", "Transferred|Error")
    assert text == "Transferred: 1 result(s)", text
    page.locator("#transfer-results img").nth(1).wait_for()
    # the result (the 64 px target's size, scaled up whole), v*'s attention beside it on the same row
    results = served_images(page, "#transfer-results")
    assert [im.size for im in results] == [(384, 384)] * 2, [im.size for im in results]
    boxes = whole_and_readable(page, "#transfer-results")
    tops = [b for b in page.eval_on_selector_all("#transfer-results img", "els => els.map(e => "
                                                 "Math.round(e.getBoundingClientRect().top))")]
    assert len(set(tops)) == 1, (tops, boxes)

    lap("transfer")
    shot = tmp_path / "ui.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("CLIC_UI_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["CLIC_UI_SCREENSHOT"])


def _attempt(browser, model_dir, tmp_path) -> None:
    """One run of the session on its own server and page. On a failure, the error names the last step passed
    and carries the page's status boxes, a screenshot path and the server log's tail."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    laps = []

    def lap(name):
        laps.append(f"{name} {time.perf_counter() - started:.0f}s")

    log_path = tmp_path / "server.log"
    with ui_server(model_dir, log_path) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        page.add_init_script(RECORD_TOASTS)
        console = []
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}"[:300]) if m.type == "error" else None)
        page.on("pageerror", lambda e: console.append(f"page error: {e}"[:300]))
        page.on("crash", lambda _: console.append("the page crashed"))
        if os.environ.get("CLIC_UI_DEBUG"):
            page.on("request", lambda r: print(f"{time.perf_counter() - started:.1f}s {r.method} {r.url}"))
        page.set_default_timeout(TIMEOUT_MS)
        try:
            _learn_and_transfer(page, url, tmp_path, lap)
        except Exception as error:  # noqa: BLE001 - playwright's errors and our assertions alike
            shot = tmp_path / "failure.png"
            boxes = {}
            with contextlib.suppress(Exception):
                page.screenshot(path=str(shot), full_page=True)
                boxes = {b: status(page, b) for b in ("learn-status", "transfer-status")}
            raise AssertionError(
                f"{str(error).splitlines()[0]}\n  steps passed: {', '.join(laps) or 'none'} "
                f"(at {time.perf_counter() - started:.0f}s)\n  status boxes: {boxes}\n  screenshot: {shot}\n"
                f"  browser errors: {console[-8:]}\n"
                f"  server log (tail):\n{log_path.read_text()[-2000:]}") from error
        finally:
            page.close()
    print(f"browser test: {', '.join(laps)}; browser errors: {console or 'none'}")


def test_learn_and_transfer_in_chromium(tiny_model_dir, browser, tmp_path):
    """One retry on a fresh server and page: a browser run on a loaded 2-core machine is occasionally slower than
    its waits; a real defect fails both attempts."""
    model = os.environ.get("CLIC_UI_MODEL", tiny_model_dir)   # e.g. the bundled toy model for the README screenshot
    try:
        _attempt(browser, model, tmp_path / "first")
    except AssertionError as first:
        print(f"first attempt failed, retrying once:\n{first}")
        _attempt(browser, model, tmp_path / "second")
