"""Headless Chromium driven by Selenium, with no network beyond loopback (Chromium's own background
traffic switched off: this machine's closed network refuses it, many connections at a time)."""

from __future__ import annotations

import shutil
from pathlib import Path

FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
)


def available() -> bool:
    return bool(shutil.which("chromium") and shutil.which("chromedriver"))


def chromium(profile: Path, *extra: str):
    """A Selenium Chrome driver on Debian's chromium with a fresh profile in ``profile``, keeping the
    browser console log (``driver.get_log("browser")``)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in (*FLAGS, *extra, f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
