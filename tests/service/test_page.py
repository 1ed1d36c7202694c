"""The browser page at `/`, driven in a real headless Chromium (Selenium) against the real service: uploads,
live progress from the event stream, playback of the results, problems, the job list and a phone-width
layout. A screenshot of every state goes to the artifacts folder ($MMAUDIO_TEST_ARTIFACTS, else
tests/artifacts/page/)."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait
from service_harness import JOB_TIMEOUT, KEY_A, MAIN_SETTINGS, REPO, Stack, make_stack

from model.testkit import make_video
from service.problems import PROBLEMS

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(os.environ.get("MMAUDIO_TEST_ARTIFACTS") or REPO / "tests" / "artifacts") / "page"
CLIP_SECONDS = 1.6
PHONE = {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True}
# records every progress text the page shows (a MutationObserver), so a short stage cannot slip between polls
WATCH_PROGRESS = """
window.progressSeen = [];
new MutationObserver(() => window.progressSeen.push(document.getElementById('progress-text').textContent))
  .observe(document.getElementById('progress-text'), {childList: true, characterData: true, subtree: true});
"""
PROGRESS_SEEN = "return window.progressSeen"
SAMPLED = re.compile(r"Sampling: step [1-9]")  # at least one step done
MEDIA_DURATIONS = """
const done = arguments[arguments.length - 1];
const players = [...document.querySelectorAll(arguments[0])];
Promise.all(players.map((p) => p.readyState >= 1 ? p.duration : new Promise((resolve) => {
  p.addEventListener('loadedmetadata', () => resolve(p.duration));
  p.addEventListener('error', () => resolve('error ' + (p.error && p.error.code)));
}))).then(done);
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("CI") == "true":
            pytest.fail("chromium and chromedriver are missing; scripts/setup installs them (chromium-driver)")
        pytest.skip("chromium and chromedriver are not installed (scripts/setup installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1400"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_script_timeout(60)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def page_stack(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """API keys on (the page must show its key field), one worker."""
    folder = tmp_path_factory.mktemp("page")
    with make_stack(redis_server, folder, "page", 12, MAIN_SETTINGS).running(1) as stack:
        yield stack


def shot(driver: WebDriver, name: str) -> None:
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def wait(driver: WebDriver, condition, timeout: float = JOB_TIMEOUT):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def field(driver: WebDriver, element_id: str, value: str) -> None:
    element = driver.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(value)


def text_of(driver: WebDriver, selector: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, selector).text


def open_page(driver: WebDriver, stack: Stack) -> None:
    driver.get(stack.url + "/")
    wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true", 30)


def job_status(driver: WebDriver) -> str:
    return text_of(driver, "#job-status")


def test_page_uploads_a_video_follows_progress_and_plays_the_result(
    browser: WebDriver, page_stack: Stack, tmp_path: Path
) -> None:
    video = make_video(tmp_path / "clip.mp4", seconds=CLIP_SECONDS, fps=25, size=(320, 240), with_audio=True)
    info = httpx.get(f"{page_stack.url}/v1/info", timeout=30)  # what the page reads first, without a key
    assert info.status_code == 200 and info.json()["api_keys_required"] is True
    open_page(browser, page_stack)
    # keys are configured: the key field shows, and the job list says why it is empty
    assert browser.find_element(By.ID, "api-key").is_displayed()
    wait(browser, lambda d: PROBLEMS["unauthorized"].title in text_of(d, "#history-note"), 30)
    assert browser.find_element(By.ID, "weights-badge").is_displayed()  # tiny weights serve
    variants = [o.text for o in Select(browser.find_element(By.ID, "variant")).options]
    assert variants == ["large_44k_v2", "small_16k"]
    shot(browser, "1-form")

    browser.find_element(By.ID, "api-key").send_keys(KEY_A, Keys.TAB)
    browser.find_element(By.ID, "file").send_keys(str(video))
    field(browser, "prompt", "waves crashing on rocks")
    field(browser, "steps", "10")
    field(browser, "seed", "1234")
    browser.execute_script(WATCH_PROGRESS)
    browser.find_element(By.ID, "submit").click()

    # the observer's log, not a poll of the text: a fast machine samples 10 steps between two polls
    wait(browser, lambda d: any(SAMPLED.match(text) for text in d.execute_script(PROGRESS_SEEN)))
    shot(browser, "2-progress")
    job_id = browser.find_element(By.ID, "job").get_attribute("data-id")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#result video"))
    assert job_status(browser) == "succeeded"
    seen = browser.execute_script(PROGRESS_SEEN)
    assert any(text.startswith("Queued") for text in seen) or any("Reading the video" in text for text in seen)
    steps = [int(text.split("step ")[1].split("/")[0]) for text in seen if text.startswith("Sampling: step")]
    assert steps == sorted(steps) and max(steps) <= 10  # live, in order

    durations = browser.execute_async_script(MEDIA_DURATIONS, "#result video")
    assert len(durations) == 1 and isinstance(durations[0], int | float), durations
    assert abs(durations[0] - CLIP_SECONDS) < 0.15
    assert text_of(browser, ".detail-seed") == "1234"
    assert text_of(browser, ".detail-time-total").endswith(" s")
    assert browser.find_element(By.ID, "random-label").is_displayed()
    links = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "#downloads a")]
    assert links == ["mp4", "flac", "wav", "m4a"]
    shot(browser, "3-result-video")

    # the job is listed, and re-opens from the list
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, f'.job-item[data-id="{job_id}"]'), 30)
    field(browser, "prompt", "")
    for radio in browser.find_elements(By.CSS_SELECTOR, "input[name=kind]"):
        if radio.get_attribute("value") == "text":
            radio.click()
    field(browser, "duration", "2")
    field(browser, "steps", "4")
    field(browser, "num-samples", "2")
    Select(browser.find_element(By.ID, "format")).select_by_value("flac")
    browser.find_element(By.ID, "submit").click()
    wait(browser, lambda d: d.find_element(By.ID, "job").get_attribute("data-id") != job_id, 30)
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#result audio")) == 2)
    durations = browser.execute_async_script(MEDIA_DURATIONS, "#result audio")
    assert all(isinstance(d, int | float) and abs(d - 2.0) < 0.05 for d in durations), durations
    assert len(browser.find_elements(By.CSS_SELECTOR, "#downloads a")) == 2 * 3  # flac, wav, m4a per sample
    shot(browser, "4-result-audio")

    browser.find_element(By.CSS_SELECTOR, f'.job-item[data-id="{job_id}"]').click()
    wait(browser, lambda d: d.find_element(By.ID, "job").get_attribute("data-id") == job_id, 30)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#result video"))
    assert text_of(browser, ".detail-seed") == "1234"


def test_page_shows_the_problem_of_a_bad_upload(browser: WebDriver, page_stack: Stack, tmp_path: Path) -> None:
    bad = tmp_path / "noise.mp4"
    bad.write_bytes(os.urandom(64 * 1024))
    with httpx.Client(base_url=page_stack.url, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60) as client:
        expected = client.post("/v1/jobs", files={"video": ("noise.mp4", bad.read_bytes())}).json()
    assert expected["status"] == PROBLEMS["unreadable-media"].status

    open_page(browser, page_stack)
    field(browser, "api-key", KEY_A)
    browser.find_element(By.ID, "file").send_keys(str(bad))
    browser.find_element(By.ID, "submit").click()
    wait(browser, lambda d: d.find_element(By.ID, "problem").is_displayed(), 60)
    assert text_of(browser, "#problem .problem-title") == expected["title"]
    assert text_of(browser, "#problem .problem-detail") == expected["detail"]
    shot(browser, "5-problem")


def test_page_fits_a_phone(browser: WebDriver, page_stack: Stack) -> None:
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", PHONE)
    try:
        open_page(browser, page_stack)
        field(browser, "api-key", KEY_A)
        browser.find_element(By.ID, "api-key").send_keys(Keys.TAB)
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".job-item"), 30)
        width = browser.execute_script("return window.innerWidth")
        assert width == PHONE["width"]
        assert browser.execute_script("return document.documentElement.scrollWidth") <= width  # no sideways scroll
        for element_id in ("compose", "history", "submit", "prompt"):
            box = browser.find_element(By.ID, element_id).rect
            assert box["x"] >= 0 and box["x"] + box["width"] <= width, element_id
        shot(browser, "6-phone")
        browser.find_element(By.CSS_SELECTOR, ".job-item").click()
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#result video, #result audio"), 60)
        browser.execute_script("document.getElementById('job').scrollIntoView()")
        assert browser.execute_script("return document.documentElement.scrollWidth") <= width
        shot(browser, "7-phone-result")
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
