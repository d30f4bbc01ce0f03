"""The web page and the API docs in a real browser (Chromium through Playwright), against
``meddiag serve`` started from the command line, with no internet."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import SHARED_DATA

CHROMIUM = "/usr/bin/chromium"
TOKEN = "page-token-5678"
XRAY = SHARED_DATA / "xray" / "chest_xray_pneumonia_kermany_224" / "test" / "PNEUMONIA"
RADIOGRAPH_DICOM = SHARED_DATA / "dicom" / "pydicom_data" / "RG1_J2KR.dcm"  # a JPEG 2000 compressed radiograph



@pytest.fixture(scope="module", autouse=True)
def _chromium() -> None:
    # Never skipped: a machine without Chromium must fail here, not pass with the page untested.
    if not Path(CHROMIUM).exists():
        pytest.fail(f"the browser tests need Chromium at {CHROMIUM}; the README's test command installs it "
                    "(Debian: apt-get install chromium)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, base: Path):
    """``meddiag serve RUN`` with the token in MEDDIAG_TOKEN; yields (base url, run, log file)."""
    env = {**os.environ, "MEDDIAG_DATA": "/nonexistent", "MEDDIAG_TOKEN": TOKEN}
    port = free_port()
    log = open(base / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "meddiag", "serve", str(run), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if urllib.request.urlopen(url + "/readyz", timeout=2).status == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            log.close()
            pytest.fail("meddiag serve did not become ready:\n" + (base / "server.log").read_text())
        time.sleep(0.3)
    yield url, run, base / "server.log"
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def server(small_run, tmp_path_factory):
    """``meddiag serve`` on a small trained run."""
    yield from start_server(small_run, tmp_path_factory.mktemp("page"))


@pytest.fixture(scope="module")
def fused_server(fused_run, tmp_path_factory):
    """``meddiag serve`` on a model fused with age, sex and site."""
    yield from start_server(fused_run, tmp_path_factory.mktemp("fused-page"))


@pytest.fixture
def browser_page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        outside: list[str] = []

        def only_local(route):  # the page must work offline: anything not from this server is refused
            if route.request.url.startswith(("http://127.0.0.1", "data:", "blob:")):
                route.continue_()
            else:
                outside.append(route.request.url)
                route.abort()

        page.route("**/*", only_local)
        yield page, outside
        browser.close()


def test_the_server_listens_on_localhost_only(server):
    url, _, log = server
    assert "http://127.0.0.1:" in log.read_text()
    probe = socket.socket()
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1"}
        for address in addresses:  # every other interface of this machine must refuse the connection
            assert probe.connect_ex((address, int(url.rsplit(":", 1)[1]))) != 0
    finally:
        probe.close()


def test_upload_an_x_ray_and_a_dicom_and_see_prediction_and_heatmap(server, browser_page, tmp_path):
    from meddiag.serving.predictor import Predictor

    url, run, log = server
    page, outside = browser_page
    xray = sorted(XRAY.glob("*.jpeg"))[0] if XRAY.is_dir() else None
    uploads = [p for p in (xray, RADIOGRAPH_DICOM) if p is not None and p.exists()]
    if not uploads:
        pytest.skip("the shared chest X-ray folder and DICOM files are missing")
    expected, failures = Predictor.from_run(run).predict(uploads)
    assert not failures

    page.goto(url + "/")
    page.wait_for_selector("#token-box", state="visible")  # the API answered 401: the page asks for the token
    page.fill("#token", TOKEN)
    page.click("#token-save")
    page.wait_for_selector("#card dl")
    assert "seed_cnn" in page.inner_text("#card") and "test AUC" in page.inner_text("#card")

    page.set_input_files("#files", [str(p) for p in uploads])
    page.wait_for_function(f"document.querySelectorAll('.result .prediction').length === {len(uploads)}", timeout=60_000)
    for path, want in zip(uploads, expected):
        card = page.locator(".result", has=page.locator(f"h3:text-is('{path.name}')"))
        assert card.locator(".prediction").inner_text() == want.predicted
        shown = float(card.locator(f".bar[data-class='{want.predicted}'] .prob").inner_text())
        assert abs(shown - want.probabilities[want.predicted]) < 1e-3
        overlay = card.locator("img.overlay")
        assert overlay.evaluate("img => img.complete && img.naturalWidth > 0")
        assert card.locator("img.original").evaluate("img => img.naturalWidth > 0")
    shot = Path(os.environ.get("MEDDIAG_SCREENSHOTS", tmp_path)) / "web_page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert outside == []
    assert not any(p.name in log.read_text() for p in uploads)  # file names are never logged


def test_a_bad_file_shows_its_error_on_the_page(server, browser_page, tmp_path):
    url, _, _ = server
    page, _ = browser_page
    page.add_init_script(f"sessionStorage.setItem('meddiag-token', '{TOKEN}')")
    page.goto(url + "/")
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image\n" * 10)
    page.set_input_files("#files", str(bad))
    page.wait_for_selector(".result .error")
    assert "415" in page.inner_text(".result .error") and "not a PNG, JPEG" in page.inner_text(".result .error")


def test_the_interactive_api_docs_render_offline(server, browser_page):
    url, _, _ = server
    page, outside = browser_page
    page.goto(url + "/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=30_000)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert any("/v1/predict" in p for p in paths) and any("/v1/model" in p for p in paths)
    assert page.locator(".btn.authorize").count() == 1  # the bearer token can be entered in the docs
    assert outside == []


def test_the_page_asks_for_each_covariate_and_sends_what_is_filled_in(fused_server, browser_page):
    url, run, _ = fused_server
    page, outside = browser_page
    page.add_init_script(f"sessionStorage.setItem('meddiag-token', '{TOKEN}')")
    page.goto(url + "/")
    page.wait_for_selector("#patient:not([hidden]) [data-covariate='age']")
    assert [e.get_attribute("data-covariate") for e in page.query_selector_all("[data-covariate]")] == ["age", "sex", "site"]
    assert page.eval_on_selector("[data-covariate='sex']", "s => [...s.options].map(o => o.value)") == ["", "female", "male"]
    assert "patient data" in page.inner_text("#card") and "late fusion" in page.inner_text("#card")
    image = sorted((run.parent / "img").glob("*.png"))[0]
    page.set_input_files("#files", str(image))  # nothing filled in: diagnosed without patient data
    page.wait_for_selector(".result .missing-covariates")
    assert "without: age, sex, site" in page.inner_text(".result .missing-covariates")
    page.fill("[data-covariate='age']", "85")
    page.select_option("[data-covariate='sex']", "male")
    page.set_input_files("#files", str(image))
    page.wait_for_function("document.querySelectorAll('.result .missing-covariates').length == 2")
    newest = page.query_selector(".result")  # results are prepended
    assert "without: site" in newest.inner_text()
    assert "patient data moved P(" in newest.inner_text() and "age" in newest.query_selector(".attributions").inner_text()
    assert not outside


def test_an_input_unlike_the_training_data_gets_a_banner_not_a_confident_bar(server, browser_page, tmp_path):
    import numpy as np
    from PIL import Image

    url, _, _ = server
    page, outside = browser_page
    page.add_init_script(f"sessionStorage.setItem('meddiag-token', '{TOKEN}')")
    page.goto(url + "/")
    page.wait_for_selector("#card dl")
    assert "flags unfamiliar input" in page.inner_text("#card") and "combined" in page.inner_text("#card")
    flat = tmp_path / "flat.png"
    Image.fromarray(np.full((64, 64), 120, np.uint8)).save(flat)
    page.set_input_files("#files", str(flat))
    page.wait_for_selector(".result .ood")
    banner = page.inner_text(".result .ood")
    assert "Outside what this model was trained on" in banner and "constant" in banner
    assert "distrusted" in page.get_attribute(".result .bars", "class")
    assert not page.query_selector(".result .abstain")  # the banner replaces the 'uncertain' note
    assert not outside
