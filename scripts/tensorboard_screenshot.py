"""Screenshot TensorBoard's scalars page for the README, from a real run, in headless Chromium.

    .venv/bin/python scripts/tensorboard_screenshot.py [--home HOME] [--filter REGEX] [--out PNG]

Starts ``tensorboard --logdir <home>/runs`` (as the README says) on a free loopback port, after a real run
(e.g. ``./scripts/demo``'s, in the default home), opens the scalars dashboard
filtered to the tags given (default: per-tensor sparsity and the mask policy's targets) in headless
Chromium and saves a PNG (default: docs/img/tensorboard-scalars.png). Needs chromium and chromedriver
(``./scripts/test`` installs them). Processes: one TensorBoard server and one Chromium, both stopped
before it returns.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from coordinator.broker import free_port, wait_for_port  # noqa: E402
from coordinator.store import Store, default_home  # noqa: E402
from tests.helpers import browser  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", type=Path, default=default_home(), help="coordinator home (default: EDGEPRUNE_HOME)")
    ap.add_argument("--filter", default="^sparsity", help="tag filter of the scalars page (a regex)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "tensorboard-scalars.png")
    args = ap.parse_args()
    store = Store(args.home)
    runs = [r for r in store.runs() if r["kind"] == "train" and r["state"] == "done"]
    if not runs:
        print(f"no finished training run in {args.home} (run ./scripts/demo first)", file=sys.stderr)
        return 1
    logdir = args.home / "runs"  # what the README says to open: every run of the home, side by side
    if not browser.available():
        print("needs chromium and chromedriver: sudo apt-get install chromium chromium-driver", file=sys.stderr)
        return 1
    port = free_port()
    tb = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port("127.0.0.1", port, 60)
        profile = tempfile.mkdtemp(prefix="edgeprune-chrome-")
        driver = browser.chromium(Path(profile), "--window-size=1500,1100")
        try:
            from urllib.parse import quote

            # the scalars dashboard keeps its settings in the URL's fragment: the filter, and no smoothing
            driver.get(f"http://127.0.0.1:{port}/#scalars&tagFilter={quote(args.filter)}&_smoothingWeight=0")
            # round 1 is no outlier: the whole curve (this setting lives in the browser's local storage)
            driver.execute_script("window.localStorage.setItem('_ignoreYOutliers', 'false')")
            driver.refresh()
            time.sleep(8)  # the dashboard fetches runs, tags and series, then draws
            args.out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.out))
        finally:
            driver.quit()
            shutil.rmtree(profile, ignore_errors=True)
    finally:
        tb.terminate()
        tb.wait(30)
    print(f"{args.out} ({len(runs)} training runs in {logdir}, tags matching {args.filter!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
