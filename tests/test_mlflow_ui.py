"""The MLflow UI as a user meets it: the documented runs view and a params filter, in headless Chromium.

An MLflow server started here on 127.0.0.1 serves a small store made by the real tracking code;
Debian's chromium and chromium-driver (installed by .ci/run) are driven by selenium. Screenshots
land in $TRANSFERLAB_UI_SHOTS when it is set (to look at them), else in the test's tmp dir.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from helpers import make_tracking_store

from transferlab import tracking

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements-dev.txt)")
BROWSER = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
DRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,  # an MLflow server and a browser: README, "Tests"
    pytest.mark.skipif(
        not (BROWSER and DRIVER),
        reason="no headless browser: install Debian's chromium and "
        "chromium-driver (apt-get install chromium chromium-driver; .ci/run does)",
    ),
]
HEADS = ["train_head/resnet50-native", "train_head/vgg16-native", "train_head/vgg16-rescale"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    store = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", store)
        mp.delenv("DVC_EXP_NAME", raising=False)
        made = make_tracking_store(root)
        experiment = mlflow.MlflowClient().get_experiment_by_name(tracking.EXPERIMENT).experiment_id
        url = f"http://127.0.0.1:{free_port()}"
        log = open(root / "server.log", "w")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                store,
                "--host",
                "127.0.0.1",
                "--port",
                url.rsplit(":", 1)[1],
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        try:
            deadline = time.time() + 240
            while True:
                try:
                    urllib.request.urlopen(url + "/health", timeout=5)
                    break
                except OSError:
                    assert proc.poll() is None and time.time() < deadline, (root / "server.log").read_text()[-3000:]
                    time.sleep(1)
            mp.setenv("MLFLOW_TRACKING_URI", url)  # the runs' links now point at this server
            yield {**made, "url": url, "experiment": experiment, "views": tracking.runs_view_url(experiment)}
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
            log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
        "--window-size=1600,1000",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(DRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def shots(tmp_path):
    return Path(os.environ.get("TRANSFERLAB_UI_SHOTS") or tmp_path)


def page_text(driver, *wanted, absent=(), timeout=90) -> str:
    """The page's text once every wanted string is shown and no absent one is (the UI loads in steps)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d):
        text = d.find_element(By.TAG_NAME, "body").text
        return text if all(w in text for w in wanted) and not any(a in text for a in absent) else False

    try:
        return WebDriverWait(driver, timeout).until(ready)
    except Exception:
        text = driver.find_element(By.TAG_NAME, "body").text
        pytest.fail(f"the page never showed {wanted} without {absent}; it shows:\n{text[:3000]}")


def search(driver, query: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, "input[placeholder*='metrics.rmse']")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(query, Keys.ENTER)


def test_documented_url_lands_on_the_runs(server, browser, shots):
    assert server["views"] == (
        f"{server['url']}/#/experiments/{server['experiment']}/runs?"
        "workflowType=machine_learning&orderByKey=tags.%60mlflow.runName%60&orderByAsc=true"
    )
    browser.get(server["views"])
    # the three runs listed flat (not folded into their group's run, which is the fourth row)
    text = page_text(browser, *HEADS, "group/repro-", "4 matching runs")
    browser.save_screenshot(str(shots / "runs_view.png"))
    assert "Model training" in text and "No data available" not in text


def test_filter_on_backbone_returns_its_runs(server, browser, shots):
    browser.get(server["views"])
    page_text(browser, *HEADS)
    search(browser, "params.backbone = 'vgg16'")
    page_text(
        browser,
        "train_head/vgg16-native",
        "train_head/vgg16-rescale",
        "2 matching runs",
        absent=["train_head/resnet50-native", "group/"],
    )
    browser.save_screenshot(str(shots / "filter_vgg16.png"))
    # the README's VGG16 vs ResNet50: both rows, ResNet50 without numbers
    search(
        browser,
        "params.method = 'train_head' and params.preprocessing = 'native' and params.backbone != 'efficientnet_lite0'",
    )
    page_text(
        browser,
        "train_head/vgg16-native",
        "train_head/resnet50-native",
        "2 matching runs",
        absent=["train_head/vgg16-rescale"],
    )
    browser.save_screenshot(str(shots / "filter_vgg16_vs_resnet50.png"))


def test_unavailable_run_says_why(server, browser, shots):
    resnet = next(r for r in server["runs"] if r["record"].backbone == "resnet50")
    browser.get(tracking.run_url(server["experiment"], resnet["mlflow_run_id"]))
    page_text(
        browser,
        "train_head/resnet50-native",
        "Weights unavailable",
        "put resnet50_notop.h5 in ~/.keras/models/",
        "No metrics recorded",
        "weights unavailable",
    )
    browser.save_screenshot(str(shots / "resnet50_run.png"))
