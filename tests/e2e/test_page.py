"""The browser page at GET /: served as HTML; in real headless Chromium, an upload shows bars with the
labels and percentages, and labels are shown as text, never parsed as HTML.

One real gunicorn serves every test here: `trained_model`'s graph with a labels.txt whose first label
is an HTML injection attempt, so every page test also checks that labels stay text.
"""
import os
import shutil

import numpy as np
import pytest
import requests
from support.images import shape_image
from support.models import IMAGENET_LABELS, read_labels, third_party_scores, write_colour_model, write_third_party_model
from support.processes import Server

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
HOSTILE_LABEL = "<img src=x onerror=alert(1)>"
TIMEOUT = 30  # seconds, for every wait in the browser and every HTTP request


@pytest.fixture(scope="module")
def page_server(trained_model, tmp_path_factory):
    """(server, labels): gunicorn, 1 worker, over trained_model's graph and hostile labels."""
    root = tmp_path_factory.mktemp("page")
    model = root / "hostile_model"
    model.mkdir()
    for name in os.listdir(trained_model):
        if name != "labels.txt" and os.path.isfile(os.path.join(trained_model, name)):
            shutil.copy(os.path.join(trained_model, name), model / name)
    labels = [HOSTILE_LABEL] + read_labels(trained_model)[1:]  # as many labels as the graph has outputs
    (model / "labels.txt").write_text("".join(label + "\n" for label in labels))
    # FEEDBACK_DIR also puts the labels in the page's correction form, when the server has one.
    s = Server({"MODEL_DIR": str(model), "FEEDBACK_DIR": str(root / "feedback")}, workers=1,
               log_path=root / "gunicorn.log")
    s.feedback_dir = root / "feedback"
    try:
        yield s.wait_ready(), labels
    finally:
        s.stop()


def test_page_is_served_as_html(flask_app, page_server):
    s, _ = page_server
    for response in (flask_app.test_client().get("/"), requests.get(s.url + "/", timeout=TIMEOUT)):
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/html")
        assert response.headers.get("X-Content-Type-Options") == "nosniff"
        text = response.text
        assert "<!doctype html>" in text.lower() and 'type="file"' in text and 'id="file"' in text


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.skip(f"no browser test: {', '.join(missing)} absent (Debian packages chromium, chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="no browser test: selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--no-first-run", "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(argument)
    # Chromium also writes ~/.config/chromium and ~/.cache/dconf whatever the profile: not in $HOME (issue 20).
    home = tmp_path_factory.mktemp("chromium-home")
    service = Service(CHROMEDRIVER, env=dict(os.environ, XDG_CONFIG_HOME=str(home / "config"),
                                             XDG_CACHE_HOME=str(home / "cache")))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.set_page_load_timeout(TIMEOUT)
        driver.set_script_timeout(TIMEOUT)
        yield driver
    finally:
        driver.quit()


def upload(driver, url, path, rows):
    """Open the page, record any alert() instead of showing it, pick `path` in the file input and
    wait until `rows` result rows (or an error) are shown. Returns the rows as (label, percentage, bar width)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/")
    driver.execute_script("window.__alerts = []; window.alert = m => window.__alerts.push(String(m));")
    driver.find_element(By.ID, "file").send_keys(str(path))
    WebDriverWait(driver, TIMEOUT).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .row")) >= rows
        or d.find_element(By.ID, "error").get_attribute("textContent"))
    result = []
    for row in driver.find_elements(By.CSS_SELECTOR, "#results .row"):
        label = row.find_element(By.CSS_SELECTOR, ".label").get_attribute("textContent")
        score = row.find_element(By.CSS_SELECTOR, ".score").get_attribute("textContent")
        width = row.find_element(By.CSS_SELECTOR, ".bar").size["width"]
        result.append((label, score, width))
    return result


def test_upload_shows_bars_with_labels_and_percentages(browser, page_server, tmp_path):
    from selenium.webdriver.common.by import By

    s, labels = page_server
    data = shape_image("red_circle", 5, size=(96, 72), fmt="PNG")
    (tmp_path / "red.png").write_bytes(data)
    answer = requests.post(s.url + "/", files={"data": ("red.png", data)}, timeout=TIMEOUT).json()
    rows = upload(browser, s.url, tmp_path / "red.png", len(answer))
    assert browser.find_element(By.ID, "error").get_attribute("textContent") == ""
    assert [label for label, _, _ in rows] == [label for label, _ in answer]
    assert set(label for label, _, _ in rows) <= set(labels)
    for (_, shown, _), (_, score) in zip(rows, answer):
        assert shown.endswith("%") and float(shown[:-1]) == pytest.approx(100 * score, abs=0.051), (shown, score)
    widths = [width for _, _, width in rows]
    assert widths[0] > 0 and widths == sorted(widths, reverse=True)
    assert browser.find_element(By.ID, "preview").is_displayed()
    assert browser.execute_script("return window.__alerts") == []


def test_a_failed_upload_shows_the_error(browser, page_server, tmp_path):
    from selenium.webdriver.common.by import By

    s, _ = page_server
    (tmp_path / "fake.png").write_text("this is not an image\n")
    assert upload(browser, s.url, tmp_path / "fake.png", rows=1) == []
    error = browser.find_element(By.ID, "error").get_attribute("textContent")
    assert "image" in error, error


def test_labels_are_shown_as_text_not_html(browser, page_server, tmp_path):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    s, labels = page_server
    (tmp_path / "red.jpg").write_bytes(shape_image("red_circle", 6))
    rows = upload(browser, s.url, tmp_path / "red.jpg", len(labels))  # top 5: every label is shown
    assert sorted(label for label, _, _ in rows) == sorted(labels)  # the text, literally
    assert browser.execute_script("return document.querySelectorAll('#results img, img[src=\"x\"]').length") == 0
    assert browser.execute_script("return document.images.length") == 1  # the preview only
    assert browser.execute_script("return window.__alerts") == []
    with pytest.raises(NoAlertPresentException):
        _ = browser.switch_to.alert.text
    label_element = browser.find_elements(By.CSS_SELECTOR, "#results .label")[
        [label for label, _, _ in rows].index(HOSTILE_LABEL)]
    assert label_element.find_elements(By.XPATH, "./*") == []  # no child element at all
    options = browser.execute_script("return Array.from(document.querySelectorAll('#labels option'), o => o.value)")
    assert sorted(options) == sorted(labels)  # the correction form's choices, as text too


def test_a_correction_sent_from_the_page_is_stored(browser, page_server, tmp_path):
    """The form appears under the answer when the server collects feedback; what a person types and
    sends is stored under that label, and the page says so."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    s, labels = page_server
    data = shape_image("green_square", 7)
    (tmp_path / "green.jpg").write_bytes(data)
    browser.get(s.url + "/")
    assert not browser.find_element(By.ID, "feedback").is_displayed()  # no answer yet, nothing to correct
    upload(browser, s.url, tmp_path / "green.jpg", 1)
    form = browser.find_element(By.ID, "feedback")
    WebDriverWait(browser, TIMEOUT).until(lambda d: form.is_displayed())
    field = browser.find_element(By.ID, "label")
    field.send_keys("green_square")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    status = browser.find_element(By.ID, "feedback-status")
    WebDriverWait(browser, TIMEOUT).until(lambda d: status.get_attribute("textContent"))
    stored = s.feedback_dir / "green_square"
    names = os.listdir(stored)
    assert status.get_attribute("textContent") == f"Thanks: stored as green_square/{names[0]}"
    assert len(names) == 1 and (stored / names[0]).read_bytes() == data


def test_the_page_picks_the_model_and_shows_its_classes(browser, tmp_path):
    """With several models (MODEL_CONFIG_FILE) the page lists them; picking one shows its classes and
    classifies with it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    write_colour_model(tmp_path / "colours", ["red", "green", "blue"])
    write_third_party_model(tmp_path / "imagenet")
    (tmp_path / "models.config").write_text('model_config_list { config { name: "colours" base_path: "colours" } '
                                            'config { name: "imagenet" base_path: "imagenet" } }')
    s = Server({"MODEL_CONFIG_FILE": str(tmp_path / "models.config")}, log_path=tmp_path / "gunicorn.log")
    try:
        s.wait_ready()
        (tmp_path / "red.jpg").write_bytes(shape_image("red_circle", 8))
        browser.get(s.url + "/")
        classes = browser.find_element(By.ID, "classes")
        WebDriverWait(browser, TIMEOUT).until(lambda d: classes.text)
        picker = Select(browser.find_element(By.ID, "model"))
        assert [o.text for o in picker.options] == ["colours", "imagenet"] and picker.first_selected_option.text == \
            "colours"
        assert classes.text == "3 classes: red, green, blue"
        browser.find_element(By.ID, "file").send_keys(str(tmp_path / "red.jpg"))
        WebDriverWait(browser, TIMEOUT).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .row")) == 3)
        assert browser.find_element(By.CSS_SELECTOR, "#results .label").text == "red"
        picker.select_by_visible_text("imagenet")  # the same photo again, through the other model
        WebDriverWait(browser, TIMEOUT).until(lambda d: classes.text.startswith("6 classes"))
        assert classes.text == "6 classes: " + ", ".join(IMAGENET_LABELS)
        WebDriverWait(browser, TIMEOUT).until(
            lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, "#results .label")][:1] in
            ([label] for label in IMAGENET_LABELS))
        shown = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#results .label")]
        want = third_party_scores(shape_image("red_circle", 8))
        assert shown == [IMAGENET_LABELS[i] for i in np.argsort(-want)[:5]]
        browser.save_screenshot(str(tmp_path / "models.png"))
        if os.environ.get("PAGE_SCREENSHOT"):  # to look at it: PAGE_SCREENSHOT=path pytest -k picks_the_model
            shutil.copy(tmp_path / "models.png", os.environ["PAGE_SCREENSHOT"])
    finally:
        s.stop()


def test_the_page_shows_the_model_and_links_its_training_report(browser, report_run, tmp_path):
    """Issue 19: the page shows the served model's version, classes and test accuracy, and links its
    report.html, served read-only from the model folder: a person clicking it sees the report with every
    picture loaded. Nothing else in the folder is served."""
    import json

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    out, _ = report_run
    accuracy = json.loads((out / "model.json").read_text())["accuracy"]["test"]
    s = Server({"MODEL_DIR": str(out)}, log_path=tmp_path / "gunicorn.log")
    try:
        s.wait_ready()
        browser.get(s.url + "/")
        link = browser.find_element(By.ID, "report")
        WebDriverWait(browser, TIMEOUT).until(lambda d: link.is_displayed())
        assert browser.find_element(By.ID, "version").text == "version 1,"
        assert browser.find_element(By.ID, "accuracy").text == f"test accuracy {100 * accuracy:.1f} %"
        assert browser.find_element(By.ID, "classes").text == "3 classes: " + ", ".join(read_labels(out))
        assert link.get_attribute("href") == s.url + "/models/model/versions/1/report.html"
        browser.save_screenshot(str(tmp_path / "page.png"))
        link.click()
        WebDriverWait(browser, TIMEOUT).until(lambda d: d.find_elements(By.TAG_NAME, "h1"))
        WebDriverWait(browser, TIMEOUT).until(
            lambda d: d.execute_script("return [...document.images].every(i => i.complete)"))
        assert browser.find_element(By.TAG_NAME, "h1").text == "Retrained mobilenet_v2 on 3 classes"
        pictures = browser.execute_script("return [...document.images].map(i => [i.src, i.naturalWidth])")
        assert len(pictures) >= 3 and all(width > 0 for _, width in pictures), pictures  # every picture loaded
        browser.save_screenshot(str(tmp_path / "report.png"))
        if os.environ.get("PAGE_SCREENSHOT"):  # to look at them: PAGE_SCREENSHOT=prefix pytest -k training_report
            for name in ("page.png", "report.png"):
                shutil.copy(tmp_path / name, os.environ["PAGE_SCREENSHOT"] + name)
        base = s.url + "/models/model/versions/1/"
        for path in ("report/..%2Fgraph.pb", "report/%2E%2E/graph.pb", "report/x.txt", "graph.pb", "model.json",
                     "report", "../2/report.html"):
            assert requests.get(base + path, timeout=TIMEOUT).status_code == 404, path
        assert requests.get(s.url + "/models/model/versions/2/report.html", timeout=TIMEOUT).status_code == 404
        assert requests.get(s.url + "/models/other/versions/1/report.html", timeout=TIMEOUT).status_code == 404
    finally:
        s.stop()
