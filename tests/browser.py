"""Headless Chromium (Debian's chromium and chromium-driver packages) driven by Selenium, with every
request a page makes recorded from Chrome's DevTools network events. Used by the report's browser
tests and by examples/report_screenshot.py. Nothing is downloaded: the driver is the system's
chromedriver, so Selenium Manager never runs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

CHROMIUM = os.environ.get("SLIMGRAPH_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("SLIMGRAPH_CHROMEDRIVER", "/usr/bin/chromedriver")
INSTALL = "apt-get install -y --no-install-recommends chromium chromium-driver"


def missing() -> str | None:
    """Why Chromium cannot be started here, or None."""
    for what, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)):
        if not (Path(path).is_file() or shutil.which(path)):
            return (f"{what} not found at {path}: install Debian's Chromium ({INSTALL}; .ci/run does) "
                    f"or point SLIMGRAPH_CHROMIUM / SLIMGRAPH_CHROMEDRIVER at them")
    return None


def start(width: int = 1400, height: int = 1000):
    """A headless Chromium WebDriver with a ``width`` x ``height`` viewport that logs DevTools network
    events; quit() it when done."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                "--no-first-run", "--disable-extensions", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-default-apps", "--mute-audio",
                f"--window-size={width},{height}", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    # the page's viewport exactly this size (the window's includes what headless keeps for its frame)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    return driver


def open_page(driver, path: str | os.PathLike) -> list[str]:
    """Load a local file and return the URL of every request the page made (DevTools Network events:
    requests, websockets, service workers), the file itself included."""
    driver.get_log("performance")  # drop what earlier pages logged
    driver.get(Path(path).resolve().as_uri())
    driver.execute_script("return document.readyState")  # get() returns once the load event fired
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
        elif message["method"] == "Network.webSocketCreated":
            urls.append(message["params"]["url"])
    return urls
