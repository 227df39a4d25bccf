"""`instructkit ui` in a real headless browser (Debian's chromium driven by Playwright): a tiny SFT recipe launched from
the page finishes, the runs page draws its loss curve, the data viewer highlights supervised tokens and shows a rejected
record, the playground answers from the run's model and its base model. Screenshots are kept as test artefacts in
test-artifacts/ui/ (INSTRUCTKIT_TEST_ARTIFACTS overrides the folder)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium browser (Debian: apt-get install -y chromium)")

DATA = [
    {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                  {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"},
                  {"role": "assistant", "content": "Green."}]},
    {"messages": [{"role": "user", "content": "no answer"}]},  # rejected: no assistant turn
]


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    import uvicorn

    from instructkit.ui.app import build_app

    root = tmp_path_factory.mktemp("ui_root")
    (root / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "tiny_sft.yaml", root / "configs" / "tiny_sft.yaml")
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in DATA))
    app = build_app(root, "runs")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield {"url": f"http://127.0.0.1:{sock.getsockname()[1]}/", "root": root}
    app.state.jobs.close()
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def page(ui):
    artefacts = Path(os.environ.get("INSTRUCTKIT_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "ui"
    artefacts.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        pg = browser.new_page(viewport={"width": 1100, "height": 760})
        pg.goto(ui["url"])
        pg.artefacts = artefacts
        yield pg
        browser.close()


def test_launch_a_tiny_recipe_and_see_it_finish(page, ui):
    page.click("#tab-launch")
    page.select_option("#launch-recipe", "sft")
    page.select_option("#launch-config", "configs/tiny_sft.yaml")
    page.fill("#launch-overrides", "train.max_steps=4 train.eval_every=0 train.save_every=0 train.sample_every=0 "
                                   "train.run_name=tiny_ui train.log_every=1")
    page.click("#launch-go")
    page.wait_for_selector("#launch-status[data-state=done]", timeout=240_000)
    assert "exit code 0" in page.inner_text("#launch-status")
    page.wait_for_selector("#launch-chart path.curve", timeout=10_000)
    page.screenshot(path=str(page.artefacts / "launch.png"))
    assert (ui["root"] / "runs" / "tiny_ui" / "summary.json").exists()


def test_runs_page_draws_the_loss_curve(page):
    page.click("#tab-runs")
    page.wait_for_selector("a[data-run=tiny_ui]", timeout=10_000)
    page.click("a[data-run=tiny_ui]")
    page.wait_for_function("document.querySelectorAll('#chart path.curve').length > 0", timeout=10_000)
    d = page.get_attribute("#chart path.curve", "d")
    assert d.count("L") >= 2  # a line through every logged step (4)
    assert page.input_value("#metric") == "loss"
    assert "tiny_ui" in page.inner_text("#config") and "last_loss" in page.inner_text("#summary")
    page.screenshot(path=str(page.artefacts / "runs.png"))


def test_data_viewer_highlights_supervised_tokens_and_shows_rejects(page, ui):
    page.click("#tab-data")
    page.fill("#data-path", "chat.jsonl")
    page.fill("#data-tokenizer", str(ui["root"] / "runs" / "tiny_ui" / "tiny_model"))
    page.click("#data-go")
    page.wait_for_selector(".tok.sup", timeout=30_000)
    sup = "".join(page.locator(".example").nth(0).locator(".tok.sup").all_inner_texts())
    assert sup.startswith("4.")  # the assistant's answer (and its end-of-turn token), not the question
    assert "2+2" not in sup and page.locator(".example").count() == 2
    assert "assistant" in page.inner_text("#data-rejects")  # the record without an assistant turn, with its reason
    page.screenshot(path=str(page.artefacts / "data.png"), full_page=True)


def test_playground_answers_from_the_run_and_its_base(page):
    page.click("#tab-play")
    assert page.input_value("#model-a") == "tiny_ui" and page.input_value("#model-b").endswith("tiny_model")
    page.fill("#play-max", "8")
    page.click("#play-go")
    page.wait_for_function("document.getElementById('name-b').textContent.includes('tokens')", timeout=60_000)
    assert "tokens" in page.inner_text("#name-a")
    page.screenshot(path=str(page.artefacts / "playground.png"))
