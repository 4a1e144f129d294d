"""The TensorBoard dashboard as a user sees it: a real TensorBoard server, opened in headless Chromium.

A real fit (a learning rate far too high, every monitor and the probe attached) writes the run's event files;
``tensorboard --logdir`` serves them; Chromium loads the Text tab (one row per finding, worst first, severity,
code, layer and step on one line that never wraps a name at 1400 px), the Custom Scalars tab (the charts with data,
and only those) and the Images tab (the probe's sweep). Screenshots go to the test's tmp dir and, when
``DIAG_SCREENSHOT_DIR`` is set, there too.

Needs the Debian packages ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them); skips, saying so,
where they are missing. Run as a script to screenshot any log dir::

    python -m tests.test_dashboard LOG_DIR OUT.png [text|custom_scalars|images [WIDTH,HEIGHT]]

(``tests/benchmarks/screenshots.py`` regenerates the README's pictures in docs/.)
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable, Optional

import pytest

from diag.sinks.tensorboard import OVERVIEW_CHARTS

pytestmark = pytest.mark.browser

WAIT_S = 60  # every wait is bounded: server start, page load, rendered content
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage"]

# The text of the page, shadow roots included: TensorBoard's Text and Custom Scalars dashboards are Polymer
# elements inside the Angular app, and their content lives in shadow DOM that WebDriver's element text skips.
DEEP_TEXT_JS = """
function walk(node) {
  if (node.nodeType === Node.TEXT_NODE) return node.textContent;
  if (node.nodeType === Node.ELEMENT_NODE && ['STYLE', 'SCRIPT', 'NOSCRIPT', 'TEMPLATE'].includes(node.tagName)) return '';
  let text = '';
  if (node.shadowRoot) text += walk(node.shadowRoot);
  for (const child of node.childNodes) text += walk(child);
  return text + ' ';
}
return walk(document.body).replace(/\\s+/g, ' ');
"""


def _find(name: str, *fallbacks: str) -> Optional[str]:
    return shutil.which(name) or next((p for p in fallbacks if os.path.exists(p)), None)


CHROMIUM = _find("chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMEDRIVER = _find("chromedriver", "/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")


def _require_browser() -> None:
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
    if CHROMIUM is None or CHROMEDRIVER is None:
        missing = " and ".join(n for n, p in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if p is None)
        pytest.skip(f"headless Chromium is not installed ({missing} not found): "
                    f"`apt-get install chromium chromium-driver` (.ci/run does this where it can)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(condition: Callable[[], bool], what: str, timeout: float = WAIT_S, on_timeout: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.25)
    raise AssertionError(f"waited {timeout:.0f} s for {what}. {on_timeout()}")


class TensorBoardServer:
    """``tensorboard --logdir LOG_DIR --host 127.0.0.1 --port FREE --samples_per_plugin=text=100`` in a subprocess."""

    def __init__(self, log_dir: str, out_dir: str) -> None:
        self.log_dir, self.out_path = log_dir, os.path.join(out_dir, "tensorboard.log")
        self.proc: Optional[subprocess.Popen] = None
        self.url = ""

    def start(self) -> "TensorBoardServer":
        for _ in range(3):  # the free port may be taken between our probe and TensorBoard's bind: try another
            port = _free_port()
            self.url = f"http://127.0.0.1:{port}"
            with open(self.out_path, "w") as out:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "tensorboard.main", "--logdir", self.log_dir, "--host", "127.0.0.1",
                     "--port", str(port), "--samples_per_plugin=text=100", "--reload_interval=0"],
                    stdout=out, stderr=subprocess.STDOUT)
            try:
                _wait(self._answers, f"TensorBoard at {self.url}", on_timeout=self.output)
                return self
            except AssertionError:
                if self.proc.poll() is None:
                    raise
                self.stop()
        raise AssertionError(f"TensorBoard did not start: {self.output()}")

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"TensorBoard exited with {self.proc.returncode}: {self.output()}")
        try:
            with urllib.request.urlopen(self.url + "/data/plugins_listing", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def output(self) -> str:
        try:
            return Path(self.out_path).read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


def start_browser(user_data_dir: str, window_size: str = "1400,900"):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS + [f"--user-data-dir={user_data_dir}", f"--window-size={window_size}"]:
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager (which would go online to find one) is never started.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    return driver


def page_text(driver) -> str:
    return driver.execute_script(DEEP_TEXT_JS)


def open_tab(driver, url: str, plugin: str, expected: list) -> str:
    """Open ``url/#plugin`` and wait until every string in ``expected`` is rendered; returns the page text."""
    driver.get(f"{url}/#{plugin}")
    seen = {"text": ""}

    def rendered() -> bool:
        seen["text"] = page_text(driver)
        return all(e in seen["text"] for e in expected)

    _wait(rendered, f"the {plugin} tab to show {expected}",
          on_timeout=lambda: "Missing: " + str([e for e in expected if e not in seen["text"]]) +
          f". The page read: {seen['text'][:1500]!r}")
    return seen["text"]


def save_screenshot(driver, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(path)), f"could not save {path}"
    extra = os.environ.get("DIAG_SCREENSHOT_DIR")
    if extra:
        os.makedirs(extra, exist_ok=True)
        shutil.copy(path, os.path.join(extra, path.name))
    return path


# ---- the test ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_log_dir(tmp_path_factory):
    """A real fit with findings of every severity, per-layer curves and probe figures: plain SGD at a learning rate
    far too high (tests/test_tensorboard_view.py), every monitor attached."""
    _require_browser()
    from tests.test_tensorboard_view import too_high_lr_run

    trainer, _ = too_high_lr_run(tmp_path_factory.mktemp("dashboard_run"))
    return trainer.log_dir


@pytest.fixture(scope="module")
def tensorboard_url(run_log_dir, tmp_path_factory):
    server = TensorBoardServer(run_log_dir, str(tmp_path_factory.mktemp("tensorboard")))
    try:
        yield server.start().url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    _require_browser()
    driver = start_browser(str(tmp_path_factory.mktemp("chromium_profile")), "1400,1000")
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


# Every row of the findings table, shadow roots included: [text of the row, [rects per <code> element]].
ROWS_JS = """
function tables(root) {
  let found = [...root.querySelectorAll('table')];
  for (const el of root.querySelectorAll('*')) if (el.shadowRoot) found = found.concat(tables(el.shadowRoot));
  return found;
}
const table = tables(document).find(t => t.tHead && t.tHead.innerText.includes('lightning-diag:'));
if (!table) return null;
return [...table.tBodies[0].rows].map(tr => [tr.innerText,
  [...tr.querySelectorAll('code')].map(c => c.getClientRects().length)]);
"""


def read_events(log_dir: str):
    from tests.test_tensorboard_view import read_events as read

    return read(log_dir)


def test_text_tab_shows_one_entry_per_finding_worst_first(browser, tensorboard_url, run_log_dir, shots):
    from diag.report import load_runs

    (run,) = load_runs(run_log_dir)
    open_tab(browser, tensorboard_url, "text", ["diag/findings", "lr_too_high", "Advice:", "worst first"])
    rows = browser.execute_script(ROWS_JS)
    assert rows and len(rows) == len(run.findings), rows
    severities = [text.split(" ", 1)[0] for text, _ in rows]
    rank = {"ERROR": 2, "WARNING": 1, "INFO": 0}
    assert [rank[s] for s in severities] == sorted((rank[s] for s in severities), reverse=True), severities
    for text, code_rects in rows:
        heading, message = text.split("\n")[:2]
        finding = next(f for f in run.findings if f" {f.code} " in heading and (f.layer is None or f.layer in heading))
        assert heading.startswith(finding.severity.value.upper()) and finding.code in heading
        assert f"step {finding.step}" in heading and (finding.layer is None or finding.layer in heading)
        assert message.strip() == finding.message and "Advice: " + finding.advice in text
        assert all(n == 1 for n in code_rects), f"a code or layer name wraps at 1400 px: {text[:120]}"
    path = save_screenshot(browser, shots / "dashboard_text.png")
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one


def test_custom_scalars_shows_the_charts_with_data(browser, tensorboard_url, run_log_dir, shots):
    from tests.test_tensorboard_view import read_layout

    layout = read_layout(read_events(run_log_dir))  # tests/test_tensorboard_view.py checks it holds only charts with data
    overview = [title for category, _, charts in layout if category == "lightning-diag" for title, _ in charts]
    families = [category for category, _, _ in layout[1:]]
    text = open_tab(browser, tensorboard_url, "custom_scalars", ["lightning-diag", *overview, *families])
    absent = [title for title, _ in OVERVIEW_CHARTS if title not in overview]
    assert absent and not [title for title in absent if title in text]  # charts without data are not drawn
    save_screenshot(browser, shots / "dashboard_custom_scalars.png")


def test_images_tab_shows_the_probe_figure(browser, tensorboard_url, run_log_dir, shots):
    images = read_events(run_log_dir).Tags()["images"]
    assert "diag/lr_probe/1" in images
    open_tab(browser, tensorboard_url, "images", ["diag/lr_probe/1"])

    def decoded() -> bool:
        sizes = browser.execute_script(IMAGES_JS)
        return bool(sizes) and all(width >= 600 for width in sizes)

    _wait(decoded, "the probe figures to load", on_timeout=lambda: str(browser.execute_script(IMAGES_JS)))
    save_screenshot(browser, shots / "dashboard_images.png")


IMAGES_JS = """
function images(root) {
  let found = [...root.querySelectorAll('img')];
  for (const el of root.querySelectorAll('*')) if (el.shadowRoot) found = found.concat(images(el.shadowRoot));
  return found;
}
return images(document).filter(i => i.complete && i.naturalWidth > 0).map(i => i.naturalWidth);
"""


def screenshot(log_dir: str, out: str, plugin: str = "text", window_size: str = "1400,900",
               expected: tuple = ("diag/findings",)) -> None:
    """Serve ``log_dir`` with TensorBoard and save a screenshot of one tab (used for docs/dashboard.png)."""
    with tempfile.TemporaryDirectory() as tmp:
        server = TensorBoardServer(log_dir, tmp).start()
        driver = None
        try:
            driver = start_browser(os.path.join(tmp, "profile"), window_size)
            open_tab(driver, server.url, plugin, list(expected))
            time.sleep(1.0)  # let fonts and layout settle
            driver.save_screenshot(out)
        finally:
            if driver is not None:
                driver.quit()
            server.stop()


if __name__ == "__main__":  # python -m tests.test_dashboard LOG_DIR OUT.png [PLUGIN [WIDTH,HEIGHT]]
    screenshot(*sys.argv[1:5])
