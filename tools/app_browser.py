#!/usr/bin/env python
# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""Drive the web demo (`app.py`) in a real headless Chromium through Selenium and chromium-driver.

The browser test (`tests/test_app.py`) uses it, and so does the README screenshot:

    python -m tools.app_browser --model outputs/demo/model --output docs/figures/web_demo.png

Chromium is the distribution's package (`apt-get install chromium chromium-driver`, which `.ci/run` does when it is
missing); nothing is downloaded at run time: Selenium is given both executables, so its driver manager never runs.
`SKINCLIP_CHROMIUM` / `SKINCLIP_CHROMEDRIVER` point at other executables.
"""

import argparse
import json
import os
import shutil
import socket
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVER_NAMES = ("chromedriver",)

# the page's element ids (set in app.py)
IMAGE_INPUT, AGE, SEX, SITE, SUBMIT = "#image_input", "#age", "#sex", "#site", "#submit"
STATUS, PROBABILITIES, RATIONALE, TERM_MAP, WARNINGS, JSON_FILE, OVERLAYS = (
    "#status", "#probabilities", "#rationale", "#term_map", "#warnings", "#json_file", "#overlays")


def find_chromium():
    """`(browser, driver)` executables, or `None` when either is missing."""
    browser = os.environ.get("SKINCLIP_CHROMIUM") or next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)
    driver = os.environ.get("SKINCLIP_CHROMEDRIVER") or next(filter(None, map(shutil.which, DRIVER_NAMES)), None)
    return (browser, driver) if browser and driver else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(model, examples_dir, port=None, extra_args=()):
    """Launch `app.py` on 127.0.0.1 in a background thread of this process; return `(demo, url)`."""
    import app

    port = port or free_port()
    demo = app.serve(["--model", str(model), "--port", str(port), "--host", "127.0.0.1",
                      "--examples_dir", str(examples_dir), *extra_args], block=False)
    url = f"http://127.0.0.1:{port}/"
    with urllib.request.urlopen(url, timeout=30) as response:  # serving
        response.read()
    return demo, url


def open_chromium(executables=None, width: int = 1400, height: int = 1700):
    """A headless Chromium WebDriver (no sandbox: CI runs as root)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = executables or find_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}", "--hide-scrollbars"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


class DemoPage:
    r"""
    The demo page in a browser: fill the inputs, submit, read what is rendered.

    Args:
        driver: a Selenium WebDriver (`open_chromium`).
        url (`str`): the app's address.
        timeout (`float`, *optional*, defaults to 60): seconds to wait for the page or a result.
    """

    def __init__(self, driver, url: str, timeout: float = 60):
        self.driver, self.url, self.timeout = driver, url, timeout

    def _wait(self, condition, what: str, timeout=None):
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, timeout or self.timeout, poll_frequency=0.2).until(condition)
        except TimeoutException as err:
            raise AssertionError(f"timed out after {timeout or self.timeout} s waiting for {what}") from err

    def find(self, selector: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, selector)

    def find_all(self, selector: str) -> list:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, selector)

    def load(self) -> "DemoPage":
        self.driver.get(self.url)
        self._wait(lambda d: self.find_all(f"{IMAGE_INPUT} input[type=file]") and self.find_all(SUBMIT),
                   "the page to render")
        return self

    def upload(self, path) -> None:
        """Put a file into the image input as the file chooser would (the browser checks its type first)."""
        self.find(f"{IMAGE_INPUT} input[type=file]").send_keys(str(Path(path).resolve()))

    def wait_for_preview(self) -> None:
        self._wait(lambda d: self.find_all(f"{IMAGE_INPUT} img"), "the uploaded image's preview")

    def set_age(self, age) -> None:
        box = self.find(f"{AGE} input")
        box.clear()
        box.send_keys(str(age))

    def pick(self, selector: str, value: str) -> None:
        """Choose `value` in a dropdown by clicking it open and clicking the option."""
        self.find(f"{selector} input").click()
        option = self._wait(lambda d: [o for o in self.find_all(f"{selector} li[role=option]")
                                       if o.get_attribute("aria-label") == value], f"option {value!r} of {selector}")
        option[0].click()
        self._wait(lambda d: self.find(f"{selector} input").get_attribute("value") == value,
                   f"{selector} to show {value!r}")

    def submit(self) -> None:
        """Press Diagnose and wait until the request has finished (the status box went through loading and back)."""
        self.driver.execute_script(
            "window.__skinclipChanged = false;"
            "const box = document.querySelector(arguments[0]);"
            "new MutationObserver(() => { window.__skinclipChanged = true; })"
            "  .observe(box, {subtree: true, childList: true, attributes: true, characterData: true});",
            STATUS,
        )
        self.find(SUBMIT).click()
        tracker = f"{STATUS} [data-testid=status-tracker]"
        self._wait(lambda d: d.execute_script("return window.__skinclipChanged")
                   and "hide" in (self.find(tracker).get_attribute("class") or ""), "the diagnosis to finish")

    def status(self) -> str:
        return self.find(STATUS).text.strip()

    def probabilities(self) -> dict:
        """`{class: (probability the page holds, percentage it shows)}` from the label's meters."""
        out = {}
        for meter in self.find_all(f"{PROBABILITIES} meter"):
            row = meter.find_element("xpath", "..")
            shown = row.find_element("css selector", "dd").text.strip().rstrip("%")
            out[meter.get_attribute("aria-label")] = (float(meter.get_attribute("value")), float(shown))
        return out

    def rationale(self) -> str:
        return " ".join(e.text for e in self.find_all(f"{RATIONALE} .textfield")).strip()

    def overlays(self) -> list:
        """`[(natural width, natural height)]` of the overlay images the browser has decoded."""
        sizes = self.driver.execute_script(
            "return Array.from(document.querySelectorAll(arguments[0])).map(i => [i.naturalWidth, i.naturalHeight]);",
            f"{OVERLAYS} img",
        )
        return [tuple(s) for s in sizes if s[0] > 0]

    def wait_for_overlays(self) -> list:
        return self._wait(lambda d: self.overlays(), "an overlay image to load")

    def json_record(self) -> dict:
        """The JSON file offered for download, fetched from its link."""
        link = self.find(f"{JSON_FILE} a[download]")
        with urllib.request.urlopen(link.get_attribute("href"), timeout=30) as response:
            return json.loads(response.read())

    def toasts(self) -> list:
        return [t.text for t in self.find_all("[data-testid=toast-body]")]

    def wait_for_toast(self, text: str) -> str:
        return self._wait(lambda d: next((t for t in self.toasts() if text in t), None), f"a message with {text!r}")

    def click_first_term(self) -> bool:
        """Click the first highlighted clinical term of the rationale (its map shows); `False` when there is none."""
        terms = [t for t in self.find_all(f"{RATIONALE} .token")
                 if not t.find_elements("css selector", ".unlabeled")]
        if not terms:
            return False
        terms[0].click()
        self._wait(lambda d: self.find_all(f"{TERM_MAP} img"), "the term's map")
        return True

    def screenshot(self, path) -> Path:
        """A screenshot of the whole page (the window is grown to the page's height first)."""
        height = self.driver.execute_script("return document.documentElement.scrollHeight")
        width = self.driver.get_window_size()["width"]
        self.driver.set_window_size(width, min(max(height + 40, 800), 4000))
        time.sleep(0.5)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))
        return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Screenshot of the web demo diagnosing a synthetic example")
    parser.add_argument("--model", default="outputs/demo/model")
    parser.add_argument("--examples_dir", default="outputs/app_examples")
    parser.add_argument("--example", type=int, default=0, help="which synthetic example to diagnose")
    parser.add_argument("--output", default="docs/figures/web_demo.png")
    parser.add_argument("--width", type=int, default=1280, help="browser window width")
    parser.add_argument("--max_width", type=int, default=1100, help="the saved PNG is downscaled to this width")
    args = parser.parse_args(argv)
    executables = find_chromium()
    if executables is None:
        raise SystemExit(f"No Chromium + chromedriver found (looked for {CHROMIUM_NAMES} and {DRIVER_NAMES})")
    import app

    example = app.write_examples(args.examples_dir)[args.example]
    demo, url = start_app(args.model, args.examples_dir)
    driver = open_chromium(executables, width=args.width)
    try:
        page = DemoPage(driver, url, timeout=300).load()
        page.upload(example[0])
        page.wait_for_preview()
        if example[1] is not None:
            page.set_age(int(example[1]))
        page.pick(SEX, example[2])
        page.pick(SITE, example[3])
        page.submit()
        page.wait_for_overlays()
        page.click_first_term()
        shot = page.screenshot(args.output)
    finally:
        driver.quit()
        demo.close()
    from PIL import Image

    with Image.open(shot) as image:
        image = image.convert("RGB")
        if image.width > args.max_width:
            image = image.resize((args.max_width, round(image.height * args.max_width / image.width)), Image.LANCZOS)
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(shot, optimize=True)  # a small PNG
    print(f"{shot}: {Path(example[0]).name} ({example[4]}), {shot.stat().st_size / 1024:.0f} KiB")
    return 0


__all__ = ["DemoPage", "find_chromium", "free_port", "open_chromium", "start_app"]


if __name__ == "__main__":
    sys.exit(main())
