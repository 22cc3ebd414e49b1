"""The status pages in a real headless browser (Debian's chromium + chromium-driver, driven
by selenium): the page loads, shows live figures that change while it is open, and logs
no console error.  Skipped, with the reason, where no browser is installed
(``make system-deps`` installs one).

Set ``FEDGATE_SCREENSHOT_DIR`` to keep PNG screenshots of both pages.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from aggregator_helpers import dev_config_text, tiny_model
from benchmarks.live_latency import write_at_rate
from brokers import Mosquitto, find_mosquitto
from gateway_helpers import RuleClassifier, gateway_config, wait_until
from gateway.service import GatewayService

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if os.path.exists(p)), None)
CHROMEDRIVER = shutil.which("chromedriver") or next(
    (p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver") if os.path.exists(p)), None)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="no headless browser: install Debian's chromium and chromium-driver "
                              "(make system-deps)"),
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed"),
]


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (dev extras)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def broker(tmp_path):
    b = Mosquitto(config_text=dev_config_text(), workdir=tmp_path / "broker").start()
    yield b
    b.stop()


def text_of(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def screenshot(driver, name: str, tmp_path: Path) -> Path:
    out = Path(os.environ.get("FEDGATE_SCREENSHOT_DIR") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000
    return path


def test_gateway_page_shows_live_figures(tmp_path, broker, browser):
    log = tmp_path / "conn.log"
    log.touch()
    cfg = gateway_config(tmp_path, broker_port=broker.port, http="127.0.0.1:0")
    service = GatewayService(cfg, classifier=RuleClassifier()).start()
    try:
        write_at_rate(log, rate=5000, count=400, uid_offset=5000)
        assert wait_until(lambda: service.status()["flows"] == 400, 20)
        browser.get(service.http.url + "/")
        assert browser.title == "fedgate gateway"
        assert wait_until(lambda: text_of(browser, "flows") == "400", 15), text_of(browser, "flows")
        assert text_of(browser, "model") == "rules-1"
        assert wait_until(lambda: text_of(browser, "backlog") == "0", 10)  # caught up with the log
        assert wait_until(lambda: text_of(browser, "mqtt") == "connected", 10)
        labels = text_of(browser, "labels")
        assert "PartOfAHorizontalPortScan" in labels and "Benign" in labels
        assert "PartOfAHorizontalPortScan" in text_of(browser, "recent")
        # live: more traffic while the page is open
        write_at_rate(log, rate=5000, count=300, uid_offset=5400)
        assert wait_until(lambda: text_of(browser, "flows") == "700", 15), text_of(browser, "flows")
        screenshot(browser, "gateway-page.png", tmp_path)
        assert console_errors(browser) == []
    finally:
        service.stop()


def test_aggregator_page_shows_gateways_rounds_and_detections(tmp_path, broker, browser):
    """A real aggregator and a real gateway on the broker: the gateway's retained status
    reaches the aggregator DB the page reads.  Aggregations (with central accuracy/F1)
    are written with the aggregator store's own ``add_round``, as the service does."""
    from cloud_aggregator import store
    from cloud_aggregator.service import AggregatorConfig, AggregatorService
    from cloud_aggregator.web import serve
    from gateway.mqtt import MqttSettings

    agg_db = str(tmp_path / "agg.db")
    aggregator = AggregatorService(AggregatorConfig(database=agg_db, mqtt=MqttSettings(port=broker.port,
                                                                                       client_id="agg")),
                                   initial_weights=tiny_model()).start()
    log = tmp_path / "conn.log"
    log.touch()
    gateway = GatewayService(gateway_config(tmp_path, broker_port=broker.port),
                             classifier=RuleClassifier()).start()
    page = serve(agg_db, ("127.0.0.1", 0))
    sessions = store.make_sessions(agg_db)

    def add_round(version: int, acc: float, f1: float) -> None:
        now = time.time()
        with sessions.begin() as s:
            store.add_round(s, version=version, strategy="gsfs", round=0, num_updates=2, live_clients=1,
                            senders=["gw1"], client_weights=[1.0], metrics={"accuracy": acc, "f1": f1},
                            info={"gate": {"gate_accuracy": acc + 0.0123}}, bytes_up=12_345, bytes_down=6_789,
                            started_at=now - 1, finished_at=now)

    try:
        write_at_rate(log, rate=5000, count=300, uid_offset=5000)

        def gw1_reported() -> bool:
            with sessions() as s:
                info = store.load_clients(s).get("gw1")
            return info is not None and info.online and info.status.get("flows") == 300

        assert wait_until(gw1_reported, 20)
        for v, (acc, f1) in enumerate([(0.81, 0.74), (0.86, 0.80), (0.89, 0.85)], start=1):
            add_round(v, acc, f1)
        browser.get(page.url + "/")
        assert browser.title == "fedgate aggregator"
        assert wait_until(lambda: "gw1" in text_of(browser, "clients") and "online" in text_of(browser, "clients"),
                          15), text_of(browser, "clients")
        assert "300" in text_of(browser, "clients")
        assert wait_until(lambda: "0.8900" in text_of(browser, "rounds"), 10)
        assert len(browser.find_elements("css selector", "#chart polyline")) == 2
        assert "PartOfAHorizontalPortScan" in text_of(browser, "labels")
        assert text_of(browser, "alive") == "1 / 1"
        add_round(4, 0.91, 0.88)  # live: a new aggregation appears without a reload
        assert wait_until(lambda: "0.9100" in text_of(browser, "rounds"), 10)
        assert "0.9223" in text_of(browser, "rounds")  # the deployment gate's score of v4
        with sessions.begin() as s:  # a candidate the gate kept back, as the service records one
            store.add_refusal(s, at=time.time(), base_version=4, round=0, reason="gate", detail="accuracy 0.4000",
                              senders=["gw1"], client_weights=[1.0],
                              figures={"gate_accuracy": 0.4, "gate_current_accuracy": 0.9223})
        assert wait_until(lambda: "0.4000" in text_of(browser, "refusals"), 10), text_of(browser, "refusals")
        assert "v4 gate" in text_of(browser, "refusals") and text_of(browser, "refused") == "1"
        assert len(browser.find_elements("css selector", "#chart circle")) == 8
        screenshot(browser, "aggregator-page.png", tmp_path)
        assert console_errors(browser) == []
        gateway.stop()  # its will/offline status reaches the page
        assert wait_until(lambda: "offline" in text_of(browser, "clients"), 15)
        assert console_errors(browser) == []
    finally:
        page.stop()
        gateway.stop()
        aggregator.stop()
