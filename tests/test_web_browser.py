"""
The dashboard in a real browser: headless Chromium (Debian's C{chromium}
and C{chromium-driver}, which C{.ci/run} installs) driven by Selenium,
against a real C{twistd -n pfo3 --web}.  A missing browser fails the test:
it is part of CI, never skipped.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Tuple

import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import Select, WebDriverWait

from pfo3 import tokens

from .conftest import LineSocket
from .test_web_process import Web, start_web

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


def chromium() -> Any:
    """
    A headless Chromium, phone-sized.
    """
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    assert browser and driver, (
        "the browser test needs Debian's chromium and chromium-driver: "
        "apt-get install -y chromium chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=412,915", "--hide-scrollbars"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Web]:
    running = start_web(tmp_path)
    try:
        yield running
    finally:
        running.server.stop()


def distinct_colours(path: Path) -> int:
    with Image.open(path) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None
    return len(colours)


def text(driver: Any, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


def test_dashboard_submits_a_task_and_the_counters_move(web: Web, tmp_path: Path) -> None:
    """
    The dashboard loads, goes live over its WebSocket, submits a task
    through its form and shows the reply; the completed counter moves with
    tasks sent over TCP too; the page fits a phone's width, and its
    screenshot is not blank.
    """
    driver = chromium()
    try:
        driver.get(web.url + "/")
        wait = WebDriverWait(driver, 15)
        wait.until(lambda d: d.find_element(By.ID, "conexion").get_attribute("data-estado")
                   == "en-vivo")
        wait.until(lambda d: len(Select(d.find_element(By.ID, "tipo")).options) >= 4)
        before = int(text(driver, "completadas"))

        Select(driver.find_element(By.ID, "tipo")).select_by_value("uppercase")
        field = driver.find_element(By.ID, "contenido")
        field.clear()
        field.send_keys("hola desde el navegador")
        driver.find_element(By.ID, "enviar").click()
        wait.until(expected_conditions.text_to_be_present_in_element(
            (By.ID, "respuesta"), "HOLA DESDE EL NAVEGADOR"))
        assert '"estado": "ok"' in text(driver, "respuesta")

        tcp = LineSocket(web.server.port)
        for i in range(20):
            tcp.send_json({"tarea_id": f"t{i}", "tipo": "reverse", "contenido": "abc"})
        tcp.read_many(20)
        tcp.close()
        wait.until(lambda d: int(text(d, "completadas")) >= before + 21)
        wait.until(lambda d: text(d, "p99") != "–")

        # An error shows in the list.
        field.clear()
        driver.find_element(By.ID, "tipo")
        Select(driver.find_element(By.ID, "tipo")).select_by_value("sleep")
        field.send_keys("-1")
        driver.find_element(By.ID, "enviar").click()
        wait.until(expected_conditions.text_to_be_present_in_element(
            (By.ID, "respuesta"), "contenido_invalido"))
        wait.until(expected_conditions.text_to_be_present_in_element(
            (By.ID, "errores"), "contenido_invalido"))

        width = driver.execute_script("return document.documentElement.scrollWidth")
        assert width <= driver.execute_script("return window.innerWidth")
        time.sleep(1.2)  # one more snapshot, so tasks/s shows the burst
        shot = tmp_path / "dashboard.png"
        assert driver.save_screenshot(str(shot))
        assert distinct_colours(shot) > 20
        logs = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert logs == []
    finally:
        driver.quit()


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Tuple[Web, Path]]:
    secret = tmp_path / "secret"
    secret.write_text("s" * 32)
    running = start_web(tmp_path, "--jwt-secret-file", str(secret))
    try:
        yield running, secret
    finally:
        running.server.stop()


def mint(secret: Path, sub: str) -> str:
    """
    A token for C{sub}, as C{pfo3-token --sub SUB --secret-file SECRET}
    prints it.
    """
    options = tokens.Options()
    options.parseOptions(["--sub", sub, "--secret-file", str(secret)])
    return tokens.sign(options)


def test_dashboard_with_a_token(secured: Tuple[Web, Path]) -> None:
    """
    On a server started with --jwt-secret-file, the dashboard says it needs
    a token (GET /tipos is 401, the type list is empty and the feed sends no
    figures) and says so again for a forged one; once a minted token is
    typed in, the types load, the feed goes live with figures, and a task
    submitted through the form gets its reply.
    """
    web, secret = secured
    driver = chromium()
    try:
        driver.get(web.url + "/")
        wait = WebDriverWait(driver, 15)
        wait.until(expected_conditions.text_to_be_present_in_element(
            (By.ID, "aviso"), "token_faltante"))
        assert driver.find_element(By.ID, "aviso").is_displayed()
        assert Select(driver.find_element(By.ID, "tipo")).options == []
        assert text(driver, "completadas") == "–"

        field = driver.find_element(By.ID, "token")
        field.send_keys("not.a.jwt", Keys.TAB)
        wait.until(expected_conditions.text_to_be_present_in_element(
            (By.ID, "aviso"), "token_invalido"))
        assert Select(driver.find_element(By.ID, "tipo")).options == []

        field.clear()
        field.send_keys(mint(secret, "navegador"), Keys.TAB)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "tipo")).options) >= 4)
        wait.until(lambda d: not d.find_element(By.ID, "aviso").is_displayed())
        wait.until(lambda d: text(d, "completadas") != "–")
        assert driver.find_element(By.ID, "conexion").get_attribute("data-estado") == "en-vivo"

        Select(driver.find_element(By.ID, "tipo")).select_by_value("uppercase")
        content = driver.find_element(By.ID, "contenido")
        content.clear()
        content.send_keys("con token")
        driver.find_element(By.ID, "enviar").click()
        wait.until(expected_conditions.text_to_be_present_in_element(
            (By.ID, "respuesta"), "CON TOKEN"))
        assert '"estado": "ok"' in text(driver, "respuesta")
        wait.until(lambda d: int(text(d, "completadas")) >= 1)
        # The only failed loads are the refusals before the token was typed.
        logs = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert all("401" in entry["message"] for entry in logs), logs
    finally:
        driver.quit()
