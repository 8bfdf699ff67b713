"""The web page end to end in a real headless Chromium: upload a real Omniglot drawing, read the rendered gallery,
predicted class, ranking and verification, and compare them with the Python API's answers for the same image.

Needs Debian's `chromium` + `chromium-driver` (`.ci/run` installs them) and selenium; skips, saying which is missing,
only when they are absent, and fails instead under CI=true. Saves a screenshot of the page to
test-artifacts/web-page.png (or $SIAMESEDB_ARTIFACTS).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import free_port, missing, unpack  # tests/helpers.py

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("SIAMESEDB_ARTIFACTS") or ROOT / "test-artifacts")


def find_browser() -> tuple[str, str]:
    """(chromium binary, chromedriver binary), or skip naming what is missing (fail under CI=true: helpers.missing)."""
    for module, extra in (("selenium", "dev"), ("uvicorn", "serve")):
        if importlib.util.find_spec(module) is None:
            missing(f"{module} is not installed", f"pip install -e '.[{extra}]'")
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        absent = " and ".join(name for name, found in (("chromium", browser), ("chromedriver", driver)) if not found)
        missing(f"no headless browser: {absent} not on PATH",
                "apt-get install chromium chromium-driver (Debian's packages; .ci/run installs them)")
    return browser, driver


@pytest.fixture(scope="module")
def omniglot_index(tmp_path_factory):
    """Support set: 2 evaluation alphabets x 10 characters x drawers 01-03; queries: drawer 04 of each character."""
    from siamesedb.db import SiameseDB

    support = tmp_path_factory.mktemp("support")
    queries = tmp_path_factory.mktemp("queries")
    unpack(lambda alphabet, character, filename, drawer: support / alphabet / character / filename if drawer <= 3
           else queries / f"{alphabet}__{character}__{filename}")
    path = tmp_path_factory.mktemp("index") / "omniglot"
    with SiameseDB.build(support, path=path, device="cpu") as db:
        db.calibrate()
    return path, sorted(queries.iterdir())


@pytest.fixture(scope="module")
def server(omniglot_index):
    """The app served by uvicorn on a free port in a background thread (the same app `siamesedb serve` runs)."""
    find_browser()
    import uvicorn

    from siamesedb.serve import create_app

    port = free_port()
    app = create_app(omniglot_index[0], device="cpu")
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/info", timeout=2):
                break
        except OSError:
            time.sleep(0.1)
    else:
        pytest.fail("server did not start")
    yield url, app.state.db
    instance.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    chromium, chromedriver = find_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1200,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    yield driver
    driver.quit()


def test_upload_a_real_omniglot_drawing_and_read_the_rendered_answer(server, browser, omniglot_index):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, db = server
    query = omniglot_index[1][0]  # drawer 04's drawing of the first character: never indexed
    true_label = "/".join(query.name.split("__")[:2])
    expected_hits = db.search(query, k=5)
    expected_class = db.classify(query)

    browser.get(url + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(EC.text_to_be_present_in_element((By.ID, "index-info"), "60 items in 20 classes"))
    Select(browser.find_element(By.ID, "k")).select_by_visible_text("5")
    browser.find_element(By.ID, "file").send_keys(str(query))  # what picking a file in the dialog does
    wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"))
    assert browser.find_element(By.ID, "error").text == ""

    cards = browser.find_elements(By.CSS_SELECTOR, "#gallery .hit")
    assert [c.get_attribute("data-label") for c in cards] == [h.label for h in expected_hits]
    shown_scores = [c.find_element(By.CLASS_NAME, "hit-score").text for c in cards]
    assert shown_scores == [f"{h.score:.4f}" for h in expected_hits]
    # Every thumbnail actually loaded from /items/{id}/image (naturalWidth is 0 for a broken image).
    wait.until(lambda b: all(b.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)
                             for img in b.find_elements(By.CSS_SELECTOR, "#gallery img")))
    assert browser.find_element(By.ID, "predicted-label").text == expected_class.label
    rows = browser.find_elements(By.CSS_SELECTOR, "#ranking tbody tr")
    assert [r.find_elements(By.TAG_NAME, "td")[1].text for r in rows] == [lab for lab, _ in expected_class.ranking[:5]]
    # The default encoder never saw these alphabets; still, the true character should rank in the top 5 of 20.
    assert true_label in [lab for lab, _ in expected_class.ranking[:5]]

    # Verify against the true class through the form.
    field = browser.find_element(By.ID, "verify-label")
    field.clear()
    field.send_keys(true_label)
    browser.find_element(By.ID, "verify-button").click()
    wait.until(lambda b: "threshold" in b.find_element(By.ID, "verify-result").text)
    expected_verdict = db.verify(query, true_label)
    text = browser.find_element(By.ID, "verify-result").text
    assert text.startswith("ACCEPTED" if expected_verdict.accepted else "REJECTED")
    assert f"score {expected_verdict.score:.4f}" in text

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "web-page.png"
    browser.execute_script("window.scrollTo(0, 0)")
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


def test_an_upload_the_server_refuses_shows_its_one_line_reason(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = server
    fake = tmp_path / "not-an-image.png"
    fake.write_text("hello")
    browser.get(url + "/")
    browser.find_element(By.ID, "file").send_keys(str(fake))
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state"))
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed() and "not-an-image.png" in error.text and "not an image" in error.text
    assert not browser.find_element(By.ID, "results").is_displayed()


def test_dropping_an_image_and_changing_k(server, browser, omniglot_index):
    import base64

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, db = server
    query = omniglot_index[1][7]
    browser.get(url + "/")
    WebDriverWait(browser, 30).until(lambda b: "items" in b.find_element(By.ID, "index-info").text)
    # What a drag from the desktop delivers: a drop event whose DataTransfer holds the file.
    browser.execute_script(
        """
        const [b64, name] = arguments;
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, { type: "image/png" }));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true }));
        """,
        base64.b64encode(query.read_bytes()).decode(), query.name,
    )
    wait = WebDriverWait(browser, 30)
    wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")
    assert browser.find_element(By.ID, "predicted-label").text == db.classify(query).label
    assert len(browser.find_elements(By.CSS_SELECTOR, "#gallery .hit")) == 5
    browser.execute_script("document.body.dataset.state = ''")
    Select(browser.find_element(By.ID, "k")).select_by_visible_text("3")  # a new k re-runs the search
    wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")
    cards = browser.find_elements(By.CSS_SELECTOR, "#gallery .hit")
    assert [c.get_attribute("data-label") for c in cards] == [h.label for h in db.search(query, k=3)]
    assert query.name in browser.find_element(By.ID, "status").text
