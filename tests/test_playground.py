"""The playground page in a real headless browser (Debian's chromium and chromium-driver through
selenium): it loads without console errors, a generation streams text into the page, scored
text is coloured with the server's figures and an HM-LSTM's boundaries under it, and a digit
drawn with pointer events gets a prediction glimpse by glimpse.

Without the browser the tests skip with the reason, except under CI (CI=true), where .ci/run
installs it, so a missing browser fails them instead of passing silently.
"""

from __future__ import annotations

import importlib.util
import json
import os
import urllib.request

import pytest
from playground_driver import (
    ONE,
    browser_paths,
    classify,
    console_errors,
    draw_digit,
    generate,
    models_with_hmlstm,
    open_page,
    score,
    start_browser,
)

from serving.engine import Limits
from serving.testing.inprocess import ServerThread

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser():
    why = None
    if browser_paths() is None:
        why = (
            "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"
        )
    elif importlib.util.find_spec("selenium") is None:
        why = "selenium is not installed (pip install -e '.[dev]')"
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why}; .ci/run installs them, so under CI this is a failure")
        pytest.skip(why)
    driver = start_browser()
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # the bundled PTB and MNIST models (a real prediction for a drawn digit) and a tiny HM-LSTM;
    # a message every 20 ms, so that a 1,500-character generation arrives in many
    s = ServerThread(
        models_with_hmlstm(tmp_path_factory.mktemp("models")),
        Limits(max_sessions=16, stream_interval=0.02),
        http_port=0,
    )
    yield s
    s.close()


@pytest.fixture
def page(browser, server):
    base = f"http://localhost:{server.running.http_port}"
    open_page(browser, base)
    yield browser, base
    assert console_errors(browser) == []


def post(base: str, path: str, body: dict) -> dict:
    r = urllib.request.Request(
        base + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(r, timeout=60) as resp:
        return json.loads(resp.read())


def test_page_loads_without_console_errors(page):
    driver, _ = page
    assert console_errors(driver) == []
    options = [
        o.get_attribute("value") for o in driver.find_elements("css selector", "#gen-model option")
    ]
    assert set(options) == {"ptb-nlstm", "tiny-hmlstm"}  # character models only
    assert [
        o.get_attribute("value")
        for o in driver.find_elements("css selector", "#digit-model option")
    ] == ["mnist-nlstm"]


def test_generation_streams_into_the_page(page):
    driver, base = page
    seen = generate(driver, "the company said ", 1500, seed=3, model="ptb-nlstm")
    assert seen[-1] == 1500, seen
    # streamed: the page showed part of the text before the rest had come
    assert any(0 < n < 1500 for n in seen), seen
    status = driver.find_element("id", "gen-status").text
    assert "finished: length" in status and "position 1517" in status
    # what the page shows is what the server makes for the same seed
    text = driver.execute_script(
        "return document.querySelector('#gen-output .generated').textContent"
    )
    same = post(
        base,
        "/v2/models/ptb-nlstm/generate",
        {
            "text_input": "the company said ",
            "parameters": {"max_tokens": 1500, "seed": 3, "temperature": 0.8, "top_p": 0.95},
        },
    )
    assert text == same["text_output"]


def test_session_continue_and_fork(page):
    driver, base = page
    driver.find_element("id", "session-new").click()
    info = driver.find_element("id", "session-info")
    generate(driver, "the ", 20, seed=1, model="ptb-nlstm")
    generate(driver, "", 10, seed=2)
    assert info.get_attribute("data-position") == str(4 + 20 + 10)
    sid = info.text.split()[1]
    with urllib.request.urlopen(f"{base}/v2/sessions/{sid}", timeout=10) as r:
        assert json.loads(r.read())["position"] == 34
    driver.find_element("id", "session-fork").click()
    generate(driver, "", 5, seed=3)
    fork = info.text.split()[1]
    assert fork != sid and info.get_attribute("data-position") == "39"


def test_scored_text_is_coloured_with_the_servers_bits(page):
    driver, base = page
    text = "the stock rose N cents\nqxzv"
    bpc = score(driver, text, "ptb-nlstm")
    r = post(base, "/v2/models/ptb-nlstm/score", {"text": text, "per_char": True})
    assert bpc == f"{r['bits_per_char']:.3f} bits/char"
    cells = driver.find_elements("css selector", "#score-output .ch")
    assert len(cells) == len(text)
    titles = [c.get_attribute("title") for c in cells]
    assert titles[0] == f'"t": {r["bits"][0]:.2f} bits'
    assert (
        driver.find_elements("css selector", "#score-output .ch .b") == []
    )  # no boundaries: not an HM-LSTM


def test_hmlstm_boundaries_under_scored_text(page):
    driver, base = page
    text = "the cat sat on the mat\na dog"
    score(driver, text, "tiny-hmlstm")
    r = post(base, "/v2/models/tiny-hmlstm/score", {"text": text, "per_char": True})
    assert len(r["boundaries"]) == 2  # a detector on each layer but the top one
    cells = driver.find_elements("css selector", "#score-output .ch")
    shown = [
        "".join(
            "1" if "on" in b.get_attribute("class") else "0"
            for b in cell.find_elements("css selector", ".b")
        )
        for cell in cells
    ]
    assert ["".join(layer[i] for layer in r["boundaries"]) for i in range(len(text))] == shown
    assert "HM-LSTM boundaries" in driver.find_element("id", "boundary-note").text


def test_drawn_digit_gets_a_prediction(page):
    driver, _ = page
    draw_digit(driver, ONE)
    predicted, step = classify(driver, "mnist-nlstm")
    assert step == "glimpse 20 of 20"
    assert predicted == 1  # the bundled classifier (98.2% on MNIST) reads the stroke as a one
    probs = [float(driver.find_element("id", f"p-{k}").text) for k in range(10)]
    assert abs(sum(probs) - 1) < 0.01 and max(probs) == probs[1]
