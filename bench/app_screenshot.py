"""Screenshot of the live demo (python -m dfm_diffusers.app) in a real headless browser, mid-generation.

    python bench/app_screenshot.py --out docs/app_screenshot.png [--chromedriver /usr/bin/chromedriver]

Runs the demo on a tiny random-weight DFMPipeline (the test suite's tiny FLUX components, 2 stages, 256 px so that a
stage takes a few seconds on a CPU), opens it in headless Chromium through chromedriver's WebDriver HTTP interface
(no Python browser package needed; Debian: apt-get install chromium chromium-driver), clicks Generate and takes the
screenshot once the first stage's preview is shown and the second stage is still running. The images are the tiny
random model's (noise-like): the screenshot shows the page, not a trained model.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import use_test_harness  # noqa: E402

use_test_harness()


def webdriver(base: str, method: str, path: str, payload: dict | None = None):
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["value"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    from diffusers import FluxPipeline

    from conftest import make_tiny_flux_components, make_tiny_tokenizers
    from dfm_diffusers import DFMPipeline
    from dfm_diffusers.app import build_demo

    flux = FluxPipeline(**make_tiny_flux_components(make_tiny_tokenizers(Path(tempfile.mkdtemp()))))
    pipe = DFMPipeline.from_flux_pipeline(flux, num_stages=2, steps_per_stage=[12, 24], stage_thresholds=[0.3])
    pipe.set_progress_bar_config(disable=True)
    pipe.default_sample_size = args.size // pipe.vae_scale_factor
    demo = build_demo(pipe, title="DFM: coarse-to-fine generation (tiny random model)")
    demo.launch(server_name="127.0.0.1", server_port=7861, prevent_thread_lock=True, quiet=True)
    driver = subprocess.Popen([args.chromedriver, "--port=9515"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = "http://127.0.0.1:9515"
    try:
        for _ in range(50):
            try:
                webdriver(base, "GET", "/status")
                break
            except OSError:
                time.sleep(0.2)
        options = {"binary": args.chromium,
                   "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000"]}
        session = webdriver(base, "POST", "/session", {"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": options}}})["sessionId"]
        s = f"/session/{session}"
        webdriver(base, "POST", s + "/url", {"url": "http://127.0.0.1:7861/"})
        button = None
        for _ in range(100):
            found = webdriver(base, "POST", s + "/elements",
                              {"using": "xpath", "value": "//button[contains(., 'Generate')]"})
            if found:
                button = list(found[0].values())[0]
                break
            time.sleep(0.2)
        if button is None:
            raise SystemExit("the page has no Generate button")
        webdriver(base, "POST", f"{s}/element/{button}/click", {})
        for _ in range(600):
            source = webdriver(base, "GET", s + "/source")
            if "stage 1 of 2 done" in source:
                time.sleep(0.5)  # let the preview image render
                break
            time.sleep(0.1)
        else:
            raise SystemExit("no stage preview appeared")
        png = base64.b64decode(webdriver(base, "GET", s + "/screenshot"))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_bytes(png)
        state = "mid-generation" if "stage 1 of 2 done" in webdriver(base, "GET", s + "/source") else "after the end"
        print(f"wrote {args.out} ({len(png)} bytes), taken {state}")
        webdriver(base, "DELETE", s)
    finally:
        driver.terminate()
        demo.close()


if __name__ == "__main__":
    main()
