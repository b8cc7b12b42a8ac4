"""The chat page of lm.serve in headless Chromium (Debian's chromium + chromium-driver, driven by selenium): a message
sent, the answer seen growing as it streams, equal to the API's answer; a second turn; "new chat"; a screenshot; no
console errors. Skipped when chromium or chromedriver is missing (a failure under CI=true)."""
import os
import re
import shutil
import struct
import time

import httpx
import pytest

from tests.test_serve import Server

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402

MAX_TOKENS = 8   # a random model's answer re-encodes to many tokens: keep two turns inside the context


def browser_paths():
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        message = f"headless Chromium needs chromium and chromedriver on PATH (found {chromium}, {driver})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return chromium, driver


@pytest.fixture(scope="module")
def server(tmp_path_factory, chat_workdir):
    server = Server(chat_workdir, tmp_path_factory.mktemp("log") / "serve.log")
    yield server
    server.close()


@pytest.fixture
def driver():
    chromium, chromedriver = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1000,700", "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # an explicit chromedriver: selenium never tries to fetch one
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))
    yield driver
    driver.quit()


def wait_for(condition, timeout=120, what="the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# Records the length of the last answer's text at every change, with the time, inside the page.
WATCH_ANSWER = """
window.answerLengths = [];
new MutationObserver(() => {
  const answers = document.querySelectorAll('.assistant .answer');
  if (answers.length) window.answerLengths.push([performance.now(), answers[answers.length - 1].textContent.length]);
}).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
"""


def send(driver, text):
    box = driver.find_element(By.ID, "input")
    box.clear()
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()
    wait_for(lambda: driver.find_element(By.ID, "stop").is_displayed() or finished(driver), what="the answer to start")
    wait_for(lambda: finished(driver), what="the answer to end")


def finished(driver) -> bool:
    return driver.find_element(By.ID, "send").is_enabled() and not driver.find_element(By.ID, "stop").is_displayed()


def test_chat_page_streams_answers_keeps_history_and_starts_over(server, driver, tmp_path, tok):
    driver.get(server.url + "/")
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#model option"), what="the model list")
    assert driver.find_element(By.ID, "model").get_attribute("value") == "sft"   # the default: most trained
    for name, value in (("temperature", "0"), ("max-tokens", str(MAX_TOKENS))):
        field = driver.find_element(By.ID, name)
        field.clear()
        field.send_keys(value)
    driver.execute_script(WATCH_ANSWER)

    send(driver, "hello")
    answer = driver.find_elements(By.CSS_SELECTOR, ".assistant .answer")[-1].get_attribute("textContent")
    lengths = [n for _, n in driver.execute_script("return window.answerLengths")]
    grew = [n for n in lengths if n > 0]
    assert len(set(grew)) >= 3 and grew == sorted(grew), lengths     # the text grew over time, piece by piece
    api = httpx.post(server.url + "/v1/chat/completions", timeout=120, json=dict(
        model="sft", messages=[{"role": "user", "content": "hello"}], temperature=0, max_tokens=MAX_TOKENS)).json()
    assert answer == api["choices"][0]["message"]["content"] and answer
    assert "stopped at max tokens" in driver.find_element(By.CSS_SELECTOR, ".assistant .finish").text
    assert not driver.find_element(By.CSS_SELECTOR, ".assistant details.thinking").is_displayed()  # no thinking

    send(driver, "and then?")   # the second turn is sent with the first in its history
    messages = driver.find_elements(By.CSS_SELECTOR, ".message")
    assert [m.get_attribute("class") for m in messages] == ["message user", "message assistant"] * 2
    second = messages[-1].find_element(By.CSS_SELECTOR, ".answer").get_attribute("textContent")
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": answer},
               {"role": "user", "content": "and then?"}]
    api = httpx.post(server.url + "/v1/chat/completions", timeout=120, json=dict(
        model="sft", messages=history, temperature=0, max_tokens=MAX_TOKENS)).json()
    assert second == api["choices"][0]["message"]["content"]

    # a message that fits only without the history: the page drops the oldest turns, says so, and answers it
    long_message = "word " * 20
    assert len(tok.encode(long_message)) < 128 - MAX_TOKENS - 10
    send(driver, long_message)
    status = driver.find_element(By.ID, "status").text
    dropped = re.fullmatch(r"context full: dropped the oldest (\d) turn\(s\)", status)
    assert dropped, status
    third = driver.find_elements(By.CSS_SELECTOR, ".assistant .answer")[-1].get_attribute("textContent")
    kept = (history + [{"role": "assistant", "content": second}, {"role": "user", "content": long_message}])
    api = httpx.post(server.url + "/v1/chat/completions", timeout=120, json=dict(
        model="sft", messages=kept[2 * int(dropped[1]):], temperature=0, max_tokens=MAX_TOKENS)).json()
    assert third == api["choices"][0]["message"]["content"]
    too_long = httpx.post(server.url + "/v1/chat/completions", timeout=120, json=dict(
        model="sft", messages=kept[2 * int(dropped[1]) - 2:], temperature=0, max_tokens=MAX_TOKENS))
    assert too_long.json()["error"]["code"] == "context_length_exceeded"   # one turn more would not have fit

    path = tmp_path / "chat.png"
    assert driver.save_screenshot(str(path))
    png = path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    width, height = struct.unpack(">II", png[16:24])
    assert width >= 500 and height >= 300

    driver.find_element(By.ID, "new-chat").click()
    assert driver.find_elements(By.CSS_SELECTOR, ".message") == []
    errors = [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
    assert errors == []
    assert server.alive()
