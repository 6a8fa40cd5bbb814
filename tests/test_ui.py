"""The web page at /: driven in a real headless Chromium against a real server on the tiny model.
What the page received is compared with what the API gives for the same request."""

import base64
import io
import json
import os
import shutil
import signal
import time
from pathlib import Path

import httpx2 as httpx
import numpy as np
import pytest
import soundfile as sf
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from csm_mlx import CSM
from csm_mlx.audio import read_audio_blocks
from csm_mlx.codec import Mimi
from csm_mlx.script import read_script
from csm_mlx.watermark import SAMPLE_RATE as WATERMARK_RATE
from csm_mlx.chat.responder import Responder
from csm_mlx.recognizer import Recognizer
from csm_mlx.server.realtime import ChatModels
from chat_fixtures import espeak, make_language_model, make_whisper
from speech_fixtures import write_voice
from test_server import LiveServer, ServeProcess, assert_pcm_close, goes_idle, pcm16

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER) and not os.environ.get("CI"),
    reason="no chromium and chromedriver on PATH: apt-get install chromium chromium-driver (CI installs them)")

SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
WIDTHS = {"desktop": (1280, 800), "phone": (390, 844)}
GREEDY_PAGE = {"temperature": "0", "seed": "1", "max_seconds": "0.64"}  # as typed into the form
GREEDY_BODY = {"temperature": 0, "top_k": 50, "seed": 1, "max_audio_length_ms": 640, "speed": 1, "speaker": 0}


@pytest.fixture(scope="module")
def csm(hub_cache):
    return CSM.load(watermark=False)


@pytest.fixture(scope="module")
def voices_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("voices")


@pytest.fixture(scope="module")
def live(csm, voices_dir):
    server = LiveServer(csm, voices_dir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    return tmp_path_factory.mktemp("downloads")


def chromium(downloads, *flags):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800",
                 "--autoplay-policy=no-user-gesture-required", "--disable-gpu",
                 # the microphone allowed without asking, and a fake one (that beeps, unless given a file)
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream", *flags):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    return driver


@pytest.fixture(scope="module")
def browser(downloads):
    driver = chromium(downloads)
    yield driver
    driver.quit()


def wait(driver, condition, timeout=60, message=""):
    try:
        return WebDriverWait(driver, timeout, 0.05).until(lambda d: condition(d))
    except TimeoutException:
        errors = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".error") if e.is_displayed()]
        raise AssertionError(f"timed out: {message}; errors shown: {errors}") from None


def open_view(driver, url, view):
    driver.get(f"{url}/#{view}")
    wait(driver, lambda d: d.execute_script(
        "return document.querySelector('#speak-form select[name=voice]').options.length > 0"), message="voices")


def fill(driver, selector, value):
    element = driver.find_element(By.CSS_SELECTOR, selector)
    element.clear()
    if value:
        element.send_keys(value)


def fill_settings(driver, values):
    for name, value in values.items():
        fill(driver, f"#speak-form [name={name}]", value)


def page_bytes(driver, expression) -> bytes:
    """A Uint8Array of the page as bytes."""
    text = driver.execute_script(f"""const b = {expression}; let s = "";
        for (let i = 0; i < b.length; i += 0x8000) s += String.fromCharCode(...b.subarray(i, i + 0x8000));
        return btoa(s);""")
    return base64.b64decode(text)


def api_pcm(url, **body) -> bytes:
    response = httpx.post(url + "/v1/audio/speech", json={"model": "tts-1", "response_format": "pcm", **body},
                          timeout=120)
    assert response.status_code == 200, response.text
    return response.content


def progress(driver, view) -> str:
    return driver.find_element(By.ID, f"{view}-progress").text


def shown_error(driver, view) -> str:
    element = driver.find_element(By.ID, f"{view}-error")
    return element.text if element.is_displayed() else ""


def screenshot(driver, name):
    """The view at a desktop's and a phone's width, for docs/ui.md."""
    SCREENSHOTS.mkdir(exist_ok=True)
    for width_name, (width, height) in WIDTHS.items():
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 1, "mobile": width_name == "phone"})
        driver.execute_script("window.scrollTo(0, 0)")
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
        (SCREENSHOTS / f"{name}-{width_name}.png").write_bytes(base64.b64decode(shot["data"]))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def downloaded(downloads, name, timeout=30) -> bytes:
    path = downloads / name
    deadline = time.time() + timeout
    while not path.exists() or any(downloads.glob("*.crdownload")):
        assert time.time() < deadline, f"{name} was not downloaded: {list(downloads.iterdir())}"
        time.sleep(0.05)
    data = path.read_bytes()
    path.unlink()
    return data


def test_speak_plays_the_api_s_audio_and_keeps_it_in_the_history(live, browser, downloads):
    open_view(browser, live.url, "speak")
    fill(browser, "#speak-text", "Hello from the page.")
    Select(browser.find_element(By.CSS_SELECTOR, "#speak-form [name=voice]")).select_by_value("conversational_b")
    fill_settings(browser, GREEDY_PAGE)
    browser.find_element(By.ID, "speak-go").click()
    wait(browser, lambda d: progress(d, "speak").startswith("Done"), message="speech")
    got = page_bytes(browser, "window.csmLast.pcm")
    expected = api_pcm(live.url, input="Hello from the page.", voice="conversational_b", **GREEDY_BODY)
    assert len(got) == 8 * 1920 * 2
    assert_pcm_close(pcm16(got), pcm16(expected))
    assert progress(browser, "speak").startswith("Done: 8 frames · 0.64 s of audio")
    screenshot(browser, "speak")

    browser.find_element(By.ID, "speak-download").click()  # wav: written by the page from the PCM
    wav = downloaded(downloads, "speech.wav")
    samples, rate = sf.read(io.BytesIO(wav), dtype="int16")
    assert rate == 24_000 and np.array_equal(samples, pcm16(got))
    Select(browser.find_element(By.ID, "speak-format")).select_by_value("flac")  # the same request, as FLAC
    browser.find_element(By.ID, "speak-download").click()
    samples, rate = sf.read(io.BytesIO(downloaded(downloads, "speech.flac")), dtype="int16")
    assert_pcm_close(samples, pcm16(expected))

    browser.get(live.url + "/#history")
    items = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#history-list audio"), message="history")
    assert len(items) == 1 and "Hello from the page." in browser.find_element(By.ID, "history-list").text
    assert "seed 1" in browser.find_element(By.ID, "history-list").text
    screenshot(browser, "history")
    browser.find_element(By.CSS_SELECTOR, "#history-list button").click()  # Remove
    wait(browser, lambda d: "Nothing generated yet." in d.find_element(By.ID, "history-list").text)


def test_a_voice_uploaded_in_the_page_speaks_and_is_deleted(csm, live, voices_dir, browser, tmp_path):
    clip = write_voice(tmp_path / "clip.wav", seconds=1.0, seed=7)
    open_view(browser, live.url, "voices")
    fill(browser, "#voice-form [name=name]", "my voice")
    fill(browser, "#voice-transcript", "What the clip says.")
    browser.find_element(By.CSS_SELECTOR, "#voice-form [name=audio_sample]").send_keys(str(clip))
    browser.find_element(By.CSS_SELECTOR, "#voice-form button[type=submit]").click()
    wait(browser, lambda d: d.find_element(By.ID, "voice-status").text.startswith("Added"), message="upload")
    voice = next(v for v in httpx.get(live.url + "/v1/audio/voices").json()["voices"] if v["name"] == "my voice")
    wait(browser, lambda d: "my voice" in d.find_element(By.ID, "voice-list").text)

    # the voice's audio is its stored Mimi codes decoded
    stored = json.loads((voices_dir / f"{voice['id']}.json").read_text())
    codes = np.frombuffer(base64.b64decode(stored["codes"]), "<u2").reshape(stored["codes_shape"]).astype(np.int32)
    heard, rate = sf.read(io.BytesIO(httpx.get(live.url + f"/v1/audio/voices/{voice['id']}/audio").content),
                          dtype="int16")
    assert rate == 24_000 and len(heard) == codes.shape[1] * 1920
    assert_pcm_close(heard, np.clip(np.round(Mimi(csm.mimi.path).decode(codes) * 32767), -32768, 32767).astype(np.int16))
    browser.find_element(By.CSS_SELECTOR, f"#voice-list button[aria-label='Listen to my voice']").click()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#voice-list audio[src^='blob:']"), message="listen")

    browser.get(live.url + "/#speak")
    select = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#speak-form [name=voice]"))
    wait(browser, lambda d: voice["id"] in [o.get_attribute("value") for o in Select(select).options])
    Select(select).select_by_value(voice["id"])
    fill(browser, "#speak-text", "Now in my voice.")
    fill_settings(browser, GREEDY_PAGE)
    browser.find_element(By.ID, "speak-go").click()
    wait(browser, lambda d: progress(d, "speak").startswith("Done"), message="speech in the voice")
    got = page_bytes(browser, "window.csmLast.pcm")
    assert_pcm_close(pcm16(got), pcm16(api_pcm(live.url, input="Now in my voice.", voice=voice["id"], **GREEDY_BODY)))
    other = api_pcm(live.url, input="Now in my voice.", voice="conversational_a", **GREEDY_BODY)
    assert np.abs(pcm16(got).astype(np.int32) - pcm16(other)).max() > 1

    browser.get(live.url + "/#voices")
    wait(browser, lambda d: "my voice" in d.find_element(By.ID, "voice-list").text)
    browser.find_element(By.CSS_SELECTOR, "#voice-list button[aria-label='Delete my voice']").click()
    browser.switch_to.alert.accept()
    wait(browser, lambda d: "None yet." in d.find_element(By.ID, "voice-list").text, message="delete")
    assert voice["id"] not in [v["id"] for v in httpx.get(live.url + "/v1/audio/voices").json()["voices"]]


def recorded(driver) -> float:
    return float(driver.find_element(By.ID, "record-time").text.split()[0])


def test_a_voice_recorded_in_the_page_is_kept_and_renamed(live, browser):
    open_view(browser, live.url, "voices")
    for name, shown in [("NotAllowedError", "may not use the microphone"), ("NotFoundError", "no microphone was found")]:
        browser.execute_script(f"""navigator.mediaDevices.getUserMedia =
            () => Promise.reject(new DOMException("refused", "{name}"));""")
        browser.find_element(By.ID, "record-start").click()
        wait(browser, lambda d: shown in shown_error(d, "voice"), message=name)
    browser.refresh()  # the real (fake) microphone again
    wait(browser, lambda d: "None yet." in d.find_element(By.ID, "voice-list").text, message="the page again")

    browser.find_element(By.ID, "record-start").click()
    wait(browser, lambda d: d.find_element(By.ID, "record-stop").is_enabled(), message="recording starts")
    browser.find_element(By.ID, "record-stop").click()
    wait(browser, lambda d: "record at least 1 s" in shown_error(d, "voice"), message="a short take refused")
    assert not browser.find_element(By.ID, "record-take").is_displayed()

    browser.find_element(By.ID, "record-start").click()
    started = time.monotonic()
    wait(browser, lambda d: recorded(d) >= 2.0, message="two seconds recorded")
    browser.find_element(By.ID, "record-stop").click()
    elapsed = time.monotonic() - started
    wait(browser, lambda d: d.find_element(By.ID, "record-take").is_displayed(), message="the take to listen to")
    assert not shown_error(browser, "voice")
    assert browser.find_element(By.ID, "record-take").get_attribute("src").startswith("blob:")
    seconds = browser.execute_script("return window.csmTake.seconds")
    assert 2.0 <= seconds <= elapsed + 0.5 and recorded(browser) == round(seconds, 1)
    browser.execute_async_script("""const done = arguments[0];
        window.csmTake.blob.arrayBuffer().then((b) => { window.csmTakeBytes = new Uint8Array(b); done(); });""")
    take, rate = sf.read(io.BytesIO(page_bytes(browser, "window.csmTakeBytes")), dtype="int16")
    assert len(take) == round(seconds * rate) and np.abs(take).max() > 1000  # the fake microphone's beeps

    fill(browser, "#voice-form [name=name]", "my take")
    fill(browser, "#voice-transcript", "What the take says.")
    browser.find_element(By.CSS_SELECTOR, "#voice-form button[type=submit]").click()
    wait(browser, lambda d: d.find_element(By.ID, "voice-status").text.startswith("Added"), message="upload")
    voice = next(v for v in httpx.get(live.url + "/v1/audio/voices").json()["voices"] if v["name"] == "my take")
    assert voice["transcript"] == "What the take says."
    heard, rate = sf.read(io.BytesIO(httpx.get(live.url + f"/v1/audio/voices/{voice['id']}/audio").content),
                          dtype="int16")
    assert rate == 24_000 and abs(len(heard) / rate - seconds) <= 0.5 and np.abs(heard).max() > 100
    assert not browser.find_element(By.ID, "record-take").is_displayed()  # the form is reset for the next voice

    wait(browser, lambda d: "my take" in d.find_element(By.ID, "voice-list").text)
    browser.find_element(By.CSS_SELECTOR, "#voice-list button[aria-label='Rename my take']").click()
    browser.switch_to.alert.send_keys("renamed take")
    browser.switch_to.alert.accept()
    wait(browser, lambda d: "renamed take" in d.find_element(By.ID, "voice-list").text, message="rename")
    names = {v["id"]: v["name"] for v in httpx.get(live.url + "/v1/audio/voices").json()["voices"]}
    assert names[voice["id"]] == "renamed take"
    browser.find_element(By.CSS_SELECTOR, "#voice-list button[aria-label='Rename renamed take']").click()
    browser.switch_to.alert.send_keys(" ")
    browser.switch_to.alert.accept()
    wait(browser, lambda d: "name must be a non-empty" in shown_error(d, "voice"), message="a blank name refused")
    browser.find_element(By.CSS_SELECTOR, "#voice-list button[aria-label='Listen to renamed take']").click()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#voice-list audio[src^='blob:']"), message="listen")
    screenshot(browser, "voices")
    browser.find_element(By.CSS_SELECTOR, "#voice-list button[aria-label='Delete renamed take']").click()
    browser.switch_to.alert.accept()
    wait(browser, lambda d: "None yet." in d.find_element(By.ID, "voice-list").text, message="delete")


def test_a_two_turn_dialogue_is_one_conversation_and_its_script_is_the_cli_s(live, browser, downloads, tmp_path):
    open_view(browser, live.url, "speak")
    fill_settings(browser, {"temperature": "0", "seed": "5", "max_seconds": "0.48"})  # the Speak view's settings
    browser.find_element(By.LINK_TEXT, "Dialogue").click()
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#turns > li")) == 2)
    browser.find_element(By.ID, "dialogue-go").click()
    wait(browser, lambda d: progress(d, "dialogue").startswith("Done"), message="dialogue")
    turns = [page_bytes(browser, f"window.csmDialogue[{n}].pcm") for n in range(2)]
    body = {**GREEDY_BODY, "max_audio_length_ms": 480}
    first = api_pcm(live.url, input="Hey, how are you doing?", voice="conversational_a", **{**body, "seed": 5})
    assert_pcm_close(pcm16(turns[0]), pcm16(first))
    context_wav = io.BytesIO()
    sf.write(context_wav, pcm16(turns[0]), 24_000, format="WAV", subtype="PCM_16")
    context = [{"speaker": 0, "text": "Hey, how are you doing?", "audio": base64.b64encode(context_wav.getvalue()).decode()}]
    second = api_pcm(live.url, input="Pretty good, pretty good. How about you?", voice="conversational_b",
                     **{**body, "speaker": 1, "seed": 6}, context=context)
    assert_pcm_close(pcm16(turns[1]), pcm16(second))
    alone = api_pcm(live.url, input="Pretty good, pretty good. How about you?", voice="conversational_b",
                    **{**body, "speaker": 1, "seed": 6})
    assert np.abs(pcm16(alone).astype(np.int32) - pcm16(turns[1])).max() > 1  # the context is heard
    screenshot(browser, "dialogue")

    browser.find_element(By.ID, "dialogue-download").click()
    samples, rate = sf.read(io.BytesIO(downloaded(downloads, "dialogue.wav")), dtype="int16")
    pause = np.zeros(int(0.3 * 24_000), np.int16)
    assert rate == 24_000 and np.array_equal(samples, np.concatenate([pcm16(turns[0]), pause, pcm16(turns[1])]))

    browser.find_element(By.ID, "dialogue-save").click()
    script = tmp_path / "dialogue.json"
    script.write_bytes(downloaded(downloads, "dialogue.json"))
    assert [(s.speaker, s.text) for s in read_script(script)] == [
        (0, "Hey, how are you doing?"), (1, "Pretty good, pretty good. How about you?")]
    script.write_text(json.dumps([{"speaker": 1, "text": "One."}, {"speaker": 0, "text": "Two.", "voice": "alloy"},
                                  {"speaker": 1, "text": "Three."}]))
    browser.find_element(By.ID, "dialogue-load").send_keys(str(script))
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#turns > li")) == 3)
    assert [t.get_attribute("value") for t in browser.find_elements(By.CSS_SELECTOR, "#turns textarea")] == [
        "One.", "Two.", "Three."]
    assert Select(browser.find_elements(By.CSS_SELECTOR, "#turns select")[1]).first_selected_option.get_attribute(
        "value") == "alloy"
    script.write_text(json.dumps([{"speaker": "x", "text": "One."}]))
    browser.find_element(By.ID, "dialogue-load").send_keys(str(script))
    wait(browser, lambda d: "speaker must be a whole number" in shown_error(d, "dialogue"))


def test_stop_frees_the_server_s_row(live, browser):
    open_view(browser, live.url, "speak")
    fill(browser, "#speak-text", "Talk for a long while.")
    fill_settings(browser, {"temperature": "0", "seed": "1", "max_seconds": "60"})
    browser.find_element(By.ID, "speak-go").click()
    wait(browser, lambda d: "frames" in progress(d, "speak"), message="first audio")
    assert httpx.get(live.url + "/health").json()["active"] == 1
    browser.find_element(By.ID, "speak-stop").click()
    wait(browser, lambda d: progress(d, "speak").startswith("Stopped"))
    assert goes_idle(live.engine)
    assert httpx.get(live.url + "/health").json()["active"] == 0


def test_server_errors_show_in_the_page(live, browser, tmp_path):
    open_view(browser, live.url, "speak")
    browser.execute_script("""const select = document.querySelector('#speak-form [name=voice]');
        select.append(new Option('nobody', 'nobody')); select.value = 'nobody';""")
    fill(browser, "#speak-text", "Hi.")
    browser.find_element(By.ID, "speak-go").click()
    wait(browser, lambda d: "voice 'nobody' is not a voice" in shown_error(d, "speak"), message="bad voice")
    browser.execute_script("document.getElementById('speak-text').required = false")  # past the page's own check
    fill(browser, "#speak-text", "")
    Select(browser.find_element(By.CSS_SELECTOR, "#speak-form [name=voice]")).select_by_value("alloy")
    browser.find_element(By.ID, "speak-go").click()
    wait(browser, lambda d: "input must be a non-empty string" in shown_error(d, "speak"), message="empty text")
    screenshot(browser, "error")
    browser.get(live.url + "/#verify")  # this server runs unmarked
    browser.find_element(By.ID, "verify-file").send_keys(str(write_voice(tmp_path / "x.wav", seconds=2.0)))
    wait(browser, lambda d: "--no-watermark" in shown_error(d, "verify"), message="verify refused")
    response = httpx.post(live.url + "/v1/audio/verify", files={"file": ("x.wav", b"RIFF")})
    assert response.status_code == 503 and response.json()["error"]["code"] == "watermark_disabled"


def test_verify_says_what_csm_mlx_verify_says(hub_cache, browser, tmp_path):
    """The route's answer is the CLI's (verify_blocks over the file read at 44.1 kHz), and the page
    shows it. The test's SilentCipher weights are random, so the answer itself is whatever they
    decode; one decoder pass takes seconds on a CPU, hence one short file, verified once here and once
    by the server."""
    marked = CSM.load(watermark_key=[1, 2, 3, 4, 5])
    server = LiveServer(marked, tmp_path / "voices")
    try:
        pcm = api_pcm(server.url, input="A marked clip, long enough for a message.", voice="alloy",
                      **{**GREEDY_BODY, "max_audio_length_ms": 1200})
        path = tmp_path / "marked.wav"
        sf.write(path, pcm16(pcm), 24_000, subtype="PCM_16")
        key, confidence = marked.watermarker.verify_blocks(read_audio_blocks(path, WATERMARK_RATE), key=[1, 2, 3, 4, 5])
        expected = {"watermarked": key == (1, 2, 3, 4, 5), "key": list(key) if key else None,
                    "confidence": round(confidence, 4), "expected_key": [1, 2, 3, 4, 5]}
        browser.get(server.url + "/#verify")
        browser.find_element(By.ID, "verify-file").send_keys(str(path))
        wait(browser, lambda d: d.find_element(By.ID, "verify-result").text.startswith("marked.wav "), timeout=120,
             message="verify")
        shown = browser.find_element(By.ID, "verify-result").text
        if expected["watermarked"]:
            assert f"carries this server's watermark (key 1,2,3,4,5, confidence {confidence:.2f})" in shown
        else:
            assert "does not carry this server's watermark (key 1,2,3,4,5)" in shown, shown
        assert browser.execute_script("return window.csmVerify") == expected
        screenshot(browser, "verify")
        short = httpx.post(server.url + "/v1/audio/verify", files={"file": ("a.wav", path.read_bytes()[:20_000])})
        assert short.status_code == 400 and "too short" in short.json()["error"]["message"]
        garbage = httpx.post(server.url + "/v1/audio/verify", files={"file": ("a.wav", b"RIFF garbage")})
        assert garbage.status_code == 400 and garbage.json()["error"]["message"].startswith("cannot read file")
        assert httpx.post(server.url + "/v1/audio/verify", files={"other": ("a.wav", b"x")}).status_code == 400
    finally:
        server.stop()


def test_cold_server_first_paint_and_the_api_key_asked_once(hub_cache, browser, tmp_path):
    server = ServeProcess(tmp_path, "--api-key", "sesame")
    try:
        browser.get(server.url + "/")  # the page and its files need no key
        # the paint entry is recorded once the page has painted, which a loaded machine may not have yet
        paint = wait(browser, lambda d: d.execute_script(
            "return performance.getEntriesByName('first-contentful-paint')[0]?.startTime"), message="the first paint")
        print(f"first contentful paint from a cold server: {paint:.0f} ms")
        dialog = wait(browser, lambda d: d.find_element(By.ID, "key-dialog").is_displayed() and
                      d.find_element(By.ID, "key-dialog"), message="the key prompt")
        assert "no API key given" in dialog.text
        dialog.find_element(By.ID, "key-input").send_keys("sesame")
        dialog.find_element(By.CSS_SELECTOR, "button[value=ok]").click()
        wait(browser, lambda d: d.execute_script(
            "return document.querySelector('#speak-form select[name=voice]').options.length > 0"), message="voices")
        browser.refresh()  # the key is kept: no prompt the second time
        wait(browser, lambda d: d.execute_script(
            "return document.querySelector('#speak-form select[name=voice]').options.length > 0"), message="voices")
        assert not browser.find_element(By.ID, "key-dialog").is_displayed()
        assert browser.execute_script("return localStorage.getItem('csm-mlx.api-key')") == "sesame"
        browser.execute_script("localStorage.clear()")
        page = httpx.get(server.url + "/ui/main.js")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/javascript")
        assert httpx.get(server.url + "/ui/nothing.js").status_code == 404
        assert httpx.get(server.url + "/ui/..%2Fapp.py").status_code == 404
        assert httpx.get(server.url + "/v1/audio/voices").status_code == 401  # the API still wants it
    finally:
        code, stderr = server.stop(signal.SIGINT)
    assert code == 0, stderr


def test_no_ui_turns_the_page_off_and_leaves_the_api(hub_cache, tmp_path):
    server = ServeProcess(tmp_path, "--no-ui")
    try:
        page = httpx.get(server.url + "/")
        assert page.status_code == 404 and "no such route" in page.json()["error"]["message"]
        assert httpx.get(server.url + "/ui/main.js").status_code == 404
        assert httpx.get(server.url + "/v1/models").status_code == 200
    finally:
        code, stderr = server.stop(signal.SIGINT)
    assert code == 0, stderr


RECORD_EVENTS = """window.realtimeEvents = [];
const Native = window.WebSocket;
window.WebSocket = class extends Native {
  constructor(...args) {
    super(...args);
    this.addEventListener("message", ({ data }) => window.realtimeEvents.push(JSON.parse(data)));
  }
};"""


def test_talk_converses_through_the_microphone_over_the_realtime_socket(csm, downloads, tmp_path):
    """Chromium's fake microphone plays espeak-ng speech; the page streams it to /v1/realtime and
    shows and plays what the server sends (recorded beside the page, as it arrives)."""
    speech = espeak(tmp_path / "espeak.wav", "Hello there. What is the weather like today?")
    clip = tmp_path / "microphone.wav"
    sf.write(clip, np.concatenate([np.zeros(12_000), speech, np.zeros(72_000)]), 24_000, subtype="PCM_16")
    folder = tmp_path / "models"
    whisper, llm = make_whisper(folder / "whisper"), make_language_model(folder / "llm")

    def chat(engine):
        responder = engine.call(lambda: Responder.load(str(llm), "Be brief.", max_tokens=12, seed=0))
        return ChatModels(engine.call(lambda: Recognizer.load(str(whisper))), responder, "Be brief.",
                          dict(temperature=0, max_audio_length_ms=2000))
    server = LiveServer(csm, tmp_path / "voices", chat=chat)
    driver = chromium(downloads, f"--use-file-for-fake-audio-capture={clip}%noloop")
    try:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_EVENTS})
        open_view(driver, server.url, "talk")
        driver.find_element(By.ID, "talk-start").click()
        wait(driver, lambda d: d.execute_script(
            "return window.realtimeEvents.some((e) => e.type === 'response.done')"), 120, "a response")
        events = driver.execute_script("return window.realtimeEvents")
        you = driver.find_element(By.CSS_SELECTOR, "#talk-lines li.you span").text
        said = driver.find_element(By.CSS_SELECTOR, "#talk-lines li.csm span").text
        driver.find_element(By.ID, "talk-stop").click()
        assert not shown_error(driver, "talk")
    finally:
        driver.quit()
        server.stop()
    kinds = [e["type"] for e in events]
    transcript = next(e["transcript"] for e in events if e["type"].endswith("transcription.completed"))
    assert you == transcript != ""
    assert said == "".join(e["delta"] for e in events if e["type"] == "response.audio_transcript.delta") != ""
    assert kinds.index("input_audio_buffer.speech_started") < kinds.index("response.created")
    assert sum(len(e["delta"]) for e in events if e["type"] == "response.audio.delta") > 0
