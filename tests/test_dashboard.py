"""``fedmqtt dashboard``: a real federation over mosquitto, watched live in headless Chromium.

The browser test needs Debian's chromium and chromedriver (apt; scripts/setup.sh
installs them with the dev extras) and selenium; it skips, saying so, without
them. Set ``UPDATE_SCREENSHOT=1`` to write the README's docs/dashboard.png.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from aggregator.datasets import federated_digits
from aggregator.sim import Simulation, agent_ids
from edge_agent import wire
from edge_agent.models import BuiltinModel
from edge_agent.topics import Topics

from .conftest import WAIT_S
from .test_integration import digits_config

pytestmark = pytest.mark.broker

REPO = Path(__file__).resolve().parents[1]
FEDMQTT = str(Path(sys.executable).parent / "fedmqtt")
ROUNDS = 5
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1280,900")


@pytest.fixture
def browser(tmp_path):
    pytest.importorskip("plotly", reason="plotly not installed: pip install -e '.[dashboard]'")
    pytest.importorskip("selenium", reason="selenium not installed: pip install -e '.[dev]'")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    missing = [p for p in (chromium, driver_path) if not os.access(p, os.X_OK)]
    if missing:
        pytest.skip(f"chromium/chromedriver not installed: {', '.join(missing)} missing "
                    "(apt-get install chromium chromium-driver; scripts/setup.sh does with the dev extras)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium  # with an explicit driver and binary, Selenium Manager downloads nothing
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    # the viewport itself (a window size includes the browser's frame)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False})
    try:
        yield driver
    finally:
        driver.quit()


def _text(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def _wait(driver, what: str, cond, timeout: float = WAIT_S):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: cond(d))
    except TimeoutException:
        raise AssertionError(f"the page never showed {what}; it shows:\n{_text(driver, 'agents')}\nmodel "
                             f"{_text(driver, 'model-round')} / last round {_text(driver, 'last-round')}") from None


def _agent_rows(driver) -> dict[str, list[str]]:
    # one script call: the page replaces the rows when they change
    rows = driver.execute_script("return Array.from(document.querySelectorAll('#agents tbody tr'),"
                                 " (tr) => Array.from(tr.cells, (td) => td.textContent))")
    return {cells[0].removesuffix(" ●"): cells for cells in rows}


def test_dashboard_follows_a_federation_live_in_a_browser(fed, broker, broker_config, tmp_path, start_aggregator,
                                                          raw_client, browser):
    from selenium.webdriver.common.by import By

    topics = Topics(fed)
    # A device that is online but not eligible, and why.
    device = raw_client("dev-battery")

    def not_eligible(reason: str) -> None:
        device.publish(topics.status("dev-battery"), wire.encode(wire.StatusMsg(
            fed, 0, "dev-battery", "online", 40, ["softmax"], eligible=False, reason=reason)), retain=True)

    reason = "battery at 18%, below 20%"
    not_eligible(reason)

    proc = subprocess.Popen([FEDMQTT, "dashboard", "--broker", broker.address, "--federation", fed,
                             "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        found = re.search(r"serving (http://127\.0\.0\.1:\d+/)", line)
        assert found, f"dashboard did not start: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        url = found.group(1)

        browser.get(url)
        browser.execute_script("window.notReloaded = true")
        _wait(browser, "the not-eligible device", lambda d: "dev-battery" in _agent_rows(d))
        assert _text(browser, "model-version") == "none retained"

        # The federation runs while the page is open.
        seed = 3
        data = federated_digits(5, "dirichlet", 0.5, seed)
        cfg = digits_config(fed, broker_config, tmp_path, rounds=ROUNDS, min_agents=5)
        model = BuiltinModel(cfg.model.spec())
        ra = start_aggregator(cfg, evaluate=lambda p: model.evaluate(p, data.X_test, data.y_test))
        sim = Simulation(broker_config, fed, data.agents, seed=seed)
        sim.start()
        try:
            ra.wait_finished()
            assert sim.finished.wait(WAIT_S), "agents did not see the federation finish"
            summaries = [ra.rounds.get_nowait().summary for _ in range(ROUNDS)]
            version = ra.coordinator.version

            _wait(browser, f"round {ROUNDS} closed", lambda d: _text(d, "last-round") == str(ROUNDS)
                  and _text(d, "task-state") == f"finished after round {ROUNDS}")
            assert browser.execute_script("return window.notReloaded === true"), "the page reloaded"
            assert _text(browser, "model-round") == str(ROUNDS)
            assert _text(browser, "model-version") == version
            assert _text(browser, "conn") == f"connected to {broker.address}"

            rows = _agent_rows(browser)
            assert sorted(rows) == sorted(agent_ids(5) + ["dev-battery"])
            # agent, state, eligible, why not, last selected, model round, samples
            assert rows["dev-battery"][1:4] == ["online", "no", reason]
            for a in agent_ids(5):
                assert rows[a][1:5] == ["online", "yes", "", str(ROUNDS)]

            # The accuracy chart: one point per closed round, the values of the rounds.
            traces = browser.execute_script(
                "return Array.from(document.getElementById('chart-accuracy').data,"
                " (t) => ({name: t.name, x: Array.from(t.x), y: Array.from(t.y)}))")
            acc = {t["name"]: t for t in traces}["test_accuracy"]
            assert acc["x"] == list(range(1, ROUNDS + 1))
            assert acc["y"] == pytest.approx([s.metrics["test_accuracy"] for s in summaries])
            index = [t["name"] for t in traces].index("test_accuracy")
            markers = browser.execute_script(
                "return document.querySelectorAll('#chart-accuracy .scatterlayer .trace')[arguments[0]]"
                ".querySelectorAll('.points path').length", index)
            assert markers == ROUNDS
            assert "test_loss" in {t["name"] for t in browser.execute_script(
                "return Array.from(document.getElementById('chart-loss').data, (t) => ({name: t.name}))")}
            assert _text(browser, "rejected-note") == "none"
            assert browser.find_element(By.ID, "privacy").get_attribute("hidden") is not None

            shot = tmp_path / "dashboard.png"
            assert browser.save_screenshot(str(shot))
            png = shot.read_bytes()
            assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (1280, 900)
            if os.environ.get("UPDATE_SCREENSHOT"):
                shutil.copyfile(shot, REPO / "docs" / "dashboard.png")
        finally:
            sim.stop()
        # Agents that leave are shown offline, still without a reload.
        _wait(browser, "the agents offline", lambda d: all(_agent_rows(d)[a][1] == "offline" for a in agent_ids(5)))
        # Whatever a device says stays text: no element is made of it, no script runs.
        markup = "<b>battery</b> low <img src=x onerror=\"document.title='pwned'\"> <script>alert(1)</script> &amp;"
        not_eligible(markup)
        _wait(browser, "the new reason", lambda d: _agent_rows(d)["dev-battery"][3] == markup)
        assert not browser.find_elements(By.CSS_SELECTOR, "#agents b, #agents img, #agents script")
        assert browser.title == "fedmqtt dashboard"

        assert browser.execute_script("return window.notReloaded === true"), "the page reloaded"
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        proc.terminate()
        try:
            rc = proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        device.publish(topics.status("dev-battery"), b"", retain=True)
    assert rc == 0, proc.stderr.read()


def _get(url: str, host: str | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_dashboard_server_serves_page_plotly_and_state_and_refuses_foreign_hosts(fed, broker_config, raw_client):
    pytest.importorskip("plotly", reason="plotly not installed: pip install -e '.[dashboard]'")
    from aggregator.dashboard import Dashboard

    dash = Dashboard(broker_config, fed, ("127.0.0.1", 0))
    dash.start()
    try:
        code, headers, page = _get(dash.url)
        assert code == 200 and b'<script src="plotly.min.js">' in page
        assert "script-src 'self'" in headers["Content-Security-Policy"]  # no inline script runs
        code, headers, js = _get(dash.url + "plotly.min.js")
        assert code == 200 and js.startswith(b"/**\n* plotly.js v") and "max-age" in headers["Cache-Control"]
        code, _, js = _get(dash.url + "app.js")
        assert code == 200 and b"innerHTML" not in js
        end = time.monotonic() + WAIT_S
        while not json.loads(_get(dash.url + "api/state")[2])["connected"]:
            assert time.monotonic() < end, "the dashboard never connected to the broker"
            time.sleep(0.05)
        state = json.loads(_get(dash.url + "api/state")[2])
        assert state["federation"] == fed and state["model"] is None and state["agents"] == []
        # DNS rebinding: a page of another origin resolving to 127.0.0.1 is refused.
        assert _get(dash.url + "api/state", host=f"evil.example:{dash.port}")[0] == 403
        assert _get(dash.url + "nothing")[0] == 404
    finally:
        dash.stop()


def test_live_view_under_dp_shows_epsilon_and_budget_and_hides_rejections():
    from aggregator.dashboard import _LiveCollector

    c = _LiveCollector("f")

    def deliver(topic: str, msg) -> None:
        c.on_message(None, topic, wire.encode(msg) if msg is not None else b"", {})

    t = Topics("f")
    deliver(t.status("a-1"), wire.StatusMsg("f", 0, "a-1", "online", 0, ["softmax"]))
    deliver(t.selected("a-1"), wire.SelectedMsg("f", 2, "a-1", 0, "v1"))
    deliver(t.task, wire.TaskMsg("f", 2, "v1", "open", deadline=time.time() + 30,
                                 config=wire.TrainConfig(dp_mode="central")))
    history = [{"round": 1.0, "epsilon": 1.0, "test_accuracy": 0.5},
               {"round": 2.0, "epsilon": 1.5, "test_accuracy": 0.6}]
    deliver(t.metrics, wire.MetricsMsg("f", 2, "v2", 0, {"epsilon": 1.5, "delta": 1e-5, "noise_multiplier": 1.2,
                                                         "test_accuracy": 0.6, "x<b>accuracy": 0.9}, history))
    s = c.snapshot(budget=4.0)
    assert s["privacy"] == {"epsilon": 1.5, "delta": 1e-5, "noise_multiplier": 1.2, "budget": 4.0}
    assert s["rejected"] is None and s["metrics"]["participants"] is None
    assert s["charts"]["rounds"] == [1, 2] and s["charts"]["epsilon"] == [1.0, 1.5]
    assert s["charts"]["accuracy"] == {"test_accuracy": [0.5, 0.6]}  # only plain names become series
    assert 25 < s["task"]["deadline_in"] <= 30 and s["agents"][0]["last_selected"] == 2 and s["agents"][0]["selected"]

    # Without DP the rejection counts are shown; a new run (lower round) starts the charts afresh.
    deliver(t.task, wire.TaskMsg("f", 1, "v0", "waiting"))
    deliver(t.metrics, wire.MetricsMsg("f", 1, "w1", 3, {"test_accuracy": 0.4, "rejected_stale_base": 2.0},
                                       [{"round": 1.0, "participants": 3.0, "test_accuracy": 0.4}]))
    s = c.snapshot()
    assert s["privacy"] is None and s["rejected"] == {"stale_base": 2} and s["metrics"]["participants"] == 3
    assert s["charts"]["rounds"] == [1] and s["charts"]["accuracy"] == {"test_accuracy": [0.4]}
    # A removed retained status removes the agent; garbage is reported, not fatal.
    deliver(t.status("a-1"), None)
    c.on_message(None, t.model, b"\x93garbage", {})
    s = c.snapshot()
    assert s["agents"] == [] and len(s["undecodable"]) == 1
