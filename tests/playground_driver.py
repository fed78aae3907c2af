"""Headless Chromium for the playground page (serving/static/playground.html): finding Debian's
`chromium` and `chromium-driver` (nothing is downloaded at run time), driving the page's three
views, and, run as a script, the screenshots in docs/.

tests/test_playground.py uses the helpers;

    python tests/playground_driver.py docs/

serves the bundled models (exported/, and a tiny random HM-LSTM for the boundaries) in
process and writes docs/playground-{generate,score,boundaries,digit}.png.
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "exported"


def browser_paths() -> tuple[str, str] | None:
    """(chromium, chromedriver) from PATH, or None when either is missing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def start_browser(width: int = 1180, height: int = 900):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = browser_paths()
    if paths is None:
        raise RuntimeError(
            "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"
        )
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium-manager must not look for downloads
    opts = webdriver.ChromeOptions()
    opts.binary_location = paths[0]
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
    ):
        opts.add_argument(arg)
    opts.set_capability(
        "goog:loggingPrefs", {"browser": "ALL"}
    )  # the console, read by console_errors
    return webdriver.Chrome(service=Service(paths[1]), options=opts)


def console_errors(driver) -> list[str]:
    """The console's errors since the last call (SEVERE: uncaught exceptions, console.error,
    failed loads)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def wait(predicate, timeout: float = 30.0, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def open_page(driver, base: str) -> None:
    driver.get(base + "/")
    wait(
        lambda: driver.execute_script("return document.body.dataset.ready === '1'"),
        what="the model list",
    )


def show(driver, view: str) -> None:
    driver.find_element("id", f"tab-{view}").click()


def set_value(driver, element_id: str, value) -> None:
    driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event('change'));",
        element_id,
        str(value),
    )


def generate(
    driver, prompt: str, max_tokens: int, seed: int | None = 1, model: str | None = None
) -> list[int]:
    """Click Generate and poll the generated text's length until the stream finishes: the
    lengths seen on the way (a streamed generation shows some between 0 and the last)."""
    show(driver, "generate")
    if model:
        set_value(driver, "gen-model", model)
    set_value(driver, "prompt", prompt)
    set_value(driver, "max-tokens", max_tokens)
    set_value(driver, "seed", "" if seed is None else seed)
    driver.find_element("id", "generate").click()
    seen = []
    # the last generated part: the one this click streams into
    length = (
        "const g = document.querySelectorAll('#gen-output .generated'); return g.length ? "
        "g[g.length - 1].textContent.length : 0"
    )
    deadline = time.monotonic() + 120
    while "finished" not in driver.find_element("id", "gen-status").text:
        n = driver.execute_script(length)
        if not seen or seen[-1] != n:
            seen.append(n)
        if time.monotonic() > deadline:
            raise TimeoutError("the generation did not finish in 120 s")
        error = driver.find_element("id", "error").text
        if error:
            raise AssertionError(f"the page shows an error: {error}")
        time.sleep(0.01)
    seen.append(driver.execute_script(length))
    return seen


def draw_digit(driver, strokes: list[list[tuple[int, int]]]) -> None:
    """Draw on the 280x280 canvas with real pointer events: each stroke a list of (x, y)
    canvas points (pressed at the first, released at the last)."""
    from selenium.webdriver.common.action_chains import ActionChains

    show(driver, "digit")
    canvas = driver.find_element("id", "digit-canvas")
    for points in strokes:
        # offsets are from the element's centre in Selenium 4
        chain = ActionChains(driver).move_to_element_with_offset(
            canvas, points[0][0] - 140, points[0][1] - 140
        )
        chain.click_and_hold()
        for (x0, y0), (x1, y1) in itertools.pairwise(points):
            chain.move_by_offset(x1 - x0, y1 - y0)
        chain.release().perform()


ONE = [[(145, 45), (142, 110), (140, 175), (138, 240)]]  # a slightly slanted vertical stroke
SEVEN = [[(80, 60), (150, 58), (205, 60), (170, 130), (140, 190), (120, 240)]]


def classify(driver, model: str | None = None, timeout: float = 60) -> tuple[int, str]:
    """Click Classify and wait for the last glimpse's prediction: (class, the step line)."""
    if model:
        set_value(driver, "digit-model", model)
    driver.find_element("id", "classify").click()
    wait(
        lambda: driver.execute_script(
            "return document.getElementById('prediction').dataset.done === '1'"
        ),
        timeout,
        "the prediction",
    )
    return int(driver.find_element("id", "prediction").text), driver.find_element(
        "id", "glimpse-step"
    ).text


def score(driver, text: str, model: str | None = None) -> str:
    show(driver, "score")
    if model:
        set_value(driver, "score-model", model)
    set_value(driver, "score-text", text)
    driver.find_element("id", "score").click()
    return wait(
        lambda: driver.find_element("id", "bpc").text.strip(), what="the bits per character"
    )


def models_with_hmlstm(root: Path) -> Path:
    """root/ holding links to the bundled models and a tiny random HM-LSTM character model
    (tiny-hmlstm, 3 layers of 8 cells: its boundaries are all the page can show of it)."""
    import torch

    from training.data.tokenizer import train_char_tokenizer
    from training.export import export_model
    from training.models import ModelConfig, build_model
    from training.testing.models import TEXT

    root.mkdir(parents=True, exist_ok=True)
    for name in ("ptb-nlstm", "mnist-nlstm"):
        if not (root / name).exists():
            (root / name).symlink_to(BUNDLED / name, target_is_directory=True)
    torch.manual_seed(0)
    tok = train_char_tokenizer(TEXT, newline=True)
    hm = build_model(
        ModelConfig(
            kind="char", core="hmlstm", hidden_size=8, num_layers=3, vocab_size=tok.vocab_size
        )
    )
    export_model(
        hm.eval(), root / "tiny-hmlstm", task="ptb", tokenizer=tok.model_proto, sequence="never"
    )
    return root


def screenshots(out: Path) -> list[Path]:
    """docs/playground-*.png: the three views on the bundled models, and the boundaries of
    a (random) HM-LSTM under scored text."""
    import tempfile

    from serving.engine import Limits
    from serving.testing.inprocess import ServerThread

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerThread(models_with_hmlstm(Path(tmp)), Limits(), http_port=0)
        driver = start_browser(1180, 820)
        written = []
        try:
            open_page(driver, f"http://localhost:{server.running.http_port}")
            set_value(driver, "temperature", 0.7)
            driver.find_element("id", "session-new").click()
            wait(lambda: driver.find_element("id", "session-info").text, what="the session")
            generate(driver, "the company said ", 240, seed=7)
            set_value(driver, "prompt", " but analysts said ")
            generate(driver, " but analysts said ", 160, seed=8)
            driver.save_screenshot(str(out / "playground-generate.png"))
            written.append(out / "playground-generate.png")
            score(
                driver,
                "the company said it expects to report a loss for the third quarter\n"
                "the stock rose N cents to $ N a share in new york stock exchange "
                "composite trading\n"
                "qxzv jjkw the the the",
                "ptb-nlstm",
            )
            driver.save_screenshot(str(out / "playground-score.png"))
            written.append(out / "playground-score.png")
            score(
                driver,
                "the cat sat on the mat\na dog ran in the park\nwe saw the stars at night",
                "tiny-hmlstm",
            )
            driver.save_screenshot(str(out / "playground-boundaries.png"))
            written.append(out / "playground-boundaries.png")
            draw_digit(driver, SEVEN)
            # stop mid-way through the replay, so that the picture shows a glimpse being read
            driver.find_element("id", "classify").click()
            wait(
                lambda: "glimpse 9 of" in driver.find_element("id", "glimpse-step").text,
                30,
                "glimpse 9",
            )
            driver.save_screenshot(str(out / "playground-digit.png"))
            written.append(out / "playground-digit.png")
            errors = console_errors(driver)
            if errors:
                raise RuntimeError(f"console errors: {errors}")
        finally:
            driver.quit()
            server.close()
    return written


if __name__ == "__main__":
    import sys

    for path in screenshots(Path(sys.argv[1] if len(sys.argv) > 1 else REPO / "docs")):
        print(path)
