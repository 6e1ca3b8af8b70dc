"""A moderator clears the review queue in a real browser: headless Debian Chromium driven by
Selenium through /usr/bin/chromedriver (Selenium Manager never runs), against the console on
real Redis and moto's S3, with a real ``modgate worker -Q modgate.webhooks`` dispatcher
delivering ``verdict.reviewed`` to a real HTTP receiver.

Log in through the form, see the queue (a screenshot of it is saved under the test's tmp
dir), open an item with its image blurred, reveal it, decide unsafe, then safe on the next,
see the queue empty, the signed webhooks arrive and the decisions in the export."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import requests

from modgate.signing import verify_headers
from tests.console.conftest import TOKENS, WEBHOOK_SECRET, publish
from tests.helpers import jpeg, wait_for
from tests.servers import WebhookReceiver

CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM = Path("/usr/bin/chromium")

pytestmark = pytest.mark.skipif(
    not CHROMEDRIVER.exists(),
    reason="/usr/bin/chromedriver is absent: install Debian's chromium and chromium-driver (make install)",
)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(arg)
    # Both the driver and the browser are named: Selenium Manager has nothing to look up.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.implicitly_wait(5)
    yield driver
    driver.quit()


def image_state(driver) -> tuple[int, str]:
    """(naturalWidth once loaded, the computed CSS filter) of the item's image."""
    image = driver.find_element("id", "image")
    wait_for(
        lambda: driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image),
        timeout=15,
        what="the image to load",
    )
    width = driver.execute_script("return arguments[0].naturalWidth", image)
    return width, driver.execute_script("return getComputedStyle(arguments[0]).filter", image)


def test_a_moderator_clears_the_queue_in_the_browser(
    start_console, r, bucket, s3_client, s3_env, redis_server, workers, browser, tmp_path
):
    started = time.monotonic()
    hook = WebhookReceiver()
    workers(
        {
            **s3_env,
            "MODGATE_REDIS__URL": redis_server.url,
            "MODGATE_WEBHOOK__ALLOW_HOSTS": '["127.0.0.1"]',
            "MODGATE_WEBHOOK__SECRET": WEBHOOK_SECRET,
            "MODGATE_WEBHOOK__BACKOFF_BASE_S": "0.2",
        },
        name="dispatcher",
        queues="modgate.webhooks",
    )
    server = start_console()
    for name, seed in (("beach.jpg", 1), ("party.jpg", 2)):
        s3_client.put_object(Bucket=bucket, Key=name, Body=jpeg(seed, 480, 360))
    first, _ = publish(r, bucket, "beach.jpg", score=0.72, urls=[hook.url])
    second, _ = publish(r, bucket, "party.jpg", score=0.61, urls=[hook.url])

    # Every page needs a reviewer: the browser lands on the login form.
    browser.get(server.base + "/")
    assert browser.current_url.startswith(server.base + "/login")
    browser.find_element("id", "token").send_keys(TOKENS["ana"])
    browser.find_element("css selector", "#login button[type=submit]").click()
    wait_for(lambda: browser.find_elements("id", "queue"), timeout=15, what="the queue page")
    rows = [row.get_attribute("data-verdict") for row in browser.find_elements("css selector", "tr.item")]
    assert rows == [first.id, second.id]  # highest score first
    assert browser.find_element("id", "depth").text == "2"
    screenshot = tmp_path / "console-queue.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 0
    print(f"\nqueue page screenshot: {screenshot}")

    browser.find_element("id", "start").click()
    assert browser.current_url == f"{server.base}/items/{first.id}"
    width, blurred = image_state(browser)
    assert width == 480 and "blur" in blurred
    browser.save_screenshot(str(tmp_path / "console-item-blurred.png"))
    browser.find_element("id", "reveal-button").click()
    assert image_state(browser)[1] == "none"
    browser.find_element("id", "grey-button").click()
    assert image_state(browser)[1] == "grayscale(1)"
    browser.find_element("css selector", "#category option[value=violence]").click()
    browser.find_element("id", "unsafe").click()

    # The next item opens by itself; it comes back blurred.
    wait_for(
        lambda: browser.current_url == f"{server.base}/items/{second.id}", timeout=15, what="the next item"
    )
    assert "blur" in image_state(browser)[1]
    browser.find_element("id", "safe").click()
    wait_for(lambda: browser.find_elements("id", "empty"), timeout=15, what="the empty queue")
    assert browser.find_element("id", "depth").text == "0"

    # Each decision reached the receiver as a signed verdict.reviewed event.
    wait_for(lambda: len(hook.delivered()) >= 2, timeout=60, what="two verdict.reviewed webhooks")
    events = {}
    for request in hook.delivered():
        assert verify_headers(WEBHOOK_SECRET, request["body"], request["headers"])
        assert request["headers"]["Modgate-Event-Type"] == "verdict.reviewed"
        body = json.loads(request["body"])
        events[body["verdict"]["id"]] = body["review"]
    assert {vid: (e["reviewer"], e["decision"], e["category"]) for vid, e in events.items()} == {
        first.id: ("ana", "unsafe", "violence"),
        second.id: ("ana", "safe", None),
    }

    # And the labels export, fetched with the browser's own session.
    cookies = {c["name"]: c["value"] for c in browser.get_cookies()}
    export = requests.get(server.base + "/export.csv", cookies=cookies, timeout=10)
    assert export.status_code == 200
    assert sorted(export.text.strip().splitlines()[1:]) == sorted(
        [f"s3://{bucket}/beach.jpg,unsafe,violence", f"s3://{bucket}/party.jpg,safe,"]
    )
    hook.stop()
    print(f"browser flow wall time: {time.monotonic() - started:.1f} s (pid {os.getpid()})")
