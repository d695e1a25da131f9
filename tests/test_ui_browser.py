"""The web UI at /ui in a real browser (headless Chromium from Debian, driven by Playwright): launch a
model from the form after seeing its estimate, see its segment on the fake GPU's bar beside another
model's, chat with streamed text, stop it and see its segment go; the API-key prompt when auth
is on; and, for a Ray cluster's answers, the GPUs page grouped by node and the launch form's Node
picker (worker_ip).

Needs `apt-get install -y chromium chromium-driver` and `pip install playwright` (no `playwright
install`: the Debian Chromium is used). Screenshots go to test-artifacts/; with
SHOAL_UPDATE_SCREENSHOTS=1 the GPUs page one is also copied to docs/ui-gpus.png for the README (not
by default, so that a test run leaves the checkout as it was).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import CHAT_MODEL, EMBED_MODEL, ShoalServer
from test_cli_render import RAY_DEVICES, RAY_WORKERS

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
INSTALL = (
    "install it with `apt-get install -y chromium chromium-driver` and `.venv/bin/pip install playwright` "
    "(`make test` does both); do not run `playwright install`"
)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
API_KEY = "ui-test-admin-key"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"the Python package playwright is missing: {INSTALL}")
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: {INSTALL}")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _serve(tmp: Path, *args: str) -> ShoalServer:
    srv = ShoalServer(tmp / "data", tmp / "server.log", extra_args=["--fake-gpus", "1x24GiB", *args])
    srv.start()
    return srv


def _open_page(browser: Any, errors: list[str]) -> Any:
    page = browser.new_page(viewport={"width": 1280, "height": 600})
    page.set_default_timeout(20_000)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return page


def _screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def test_launch_from_the_form_chat_and_stop(browser: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    srv = _serve(tmp_path)
    errors: list[str] = []
    page = _open_page(browser, errors)
    try:
        page.goto(srv.url + "/")  # redirected to /ui/, the GPUs page
        assert page.url.endswith("/ui/"), page.url
        gpu_bar = page.locator('.bar[data-device="gpu:0"]')
        expect(gpu_bar).to_be_visible()
        expect(page.locator('.bar[data-device="cpu"]')).to_be_visible()
        expect(gpu_bar.locator(".seg.model")).to_have_count(0)

        # Models page: pick the model; the estimate and where it would go show before launching.
        page.click('header nav a[href="#models"]')
        form = page.locator("#launch-form")
        form.locator('select[name="model_type"]').select_option("LLM")
        expect(form.locator(f'select[name="model_name"] option[value="{CHAT_MODEL}"]')).to_have_count(1)
        form.locator('select[name="model_name"]').select_option(CHAT_MODEL)
        form.locator('select[name="device"]').select_option("gpu:0")
        form.locator('input[name="gpu_memory"]').fill("30GiB")
        estimate = page.locator("#estimate")
        expect(estimate).to_contain_text("Does not fit now", timeout=30_000)  # 30 GiB > the 24 GiB GPU
        expect(estimate).to_contain_text("gpu:0")
        form.locator('input[name="gpu_memory"]').fill("2GiB")
        form.locator('input[name="keep_alive"]').fill("5m")
        form.locator('input[name="engine_options"]').fill("n_ctx=1024 n_parallel=1")
        expect(estimate).to_contain_text("Would go to gpu:0", timeout=30_000)
        expect(estimate).to_contain_text("2.00 GiB")  # the declared memory, per device
        expect(estimate).to_contain_text("1024 tokens × 1")  # the KV cache for the engine options given
        page.click("#launch-button")
        expect(page.locator("#launch-msg")).to_contain_text(f"{CHAT_MODEL} is ready", timeout=120_000)
        row = page.locator(f'#models-body tr[data-uid="{CHAT_MODEL}"]')
        expect(row).to_contain_text("ready")
        expect(row).to_contain_text("gpu:0")
        expect(row).to_contain_text("2.00 GiB")
        expect(row).to_contain_text("5 min")
        described = srv.http.get(f"/v1/models/{CHAT_MODEL}").json()
        assert described["replicas"][0]["device"] == "gpu:0"
        assert described["estimate"]["declared"] == 2 * 1024**3
        assert described["estimate"]["context_length"] == 1024
        # A second model, launched through the API, shares the GPU (and the pictures).
        launched = srv.http.post("/v1/models", json={"model_name": EMBED_MODEL, "keep_alive": "10m"})
        assert launched.status_code == 200, launched.text
        expect(page.locator(f'#models-body tr[data-uid="{EMBED_MODEL}"]')).to_contain_text("ready")
        _screenshot(page, "models.png")

        # GPUs page: the model's segment on gpu:0, about 2/24 of the bar, its breakdown on hover.
        page.click('header nav a[href="#gpus"]')
        segment = gpu_bar.locator(f'.seg.model[data-uid="{CHAT_MODEL}"]')
        expect(segment).to_be_visible()
        expect(gpu_bar.locator(f'.seg.model[data-uid="{EMBED_MODEL}"]')).to_be_visible()
        share = segment.evaluate("s => s.getBoundingClientRect().width / s.parentElement.clientWidth")
        assert abs(share - 2 / 24) < 0.01, share
        shot = _screenshot(page, "gpus.png")
        if os.environ.get("SHOAL_UPDATE_SCREENSHOTS") == "1":
            shutil.copyfile(shot, ROOT / "docs" / "ui-gpus.png")
        segment.hover()
        tooltip = page.locator("#tooltip")
        expect(tooltip).to_be_visible()
        expect(tooltip).to_contain_text("weights")
        expect(tooltip).to_contain_text("KV cache")
        expect(tooltip).to_contain_text("(declared)")
        _screenshot(page, "gpus-hover.png")

        # Playground: the reply appears piece by piece while the stream is open.
        page.mouse.move(0, 0)
        page.click('header nav a[href="#playground"]')
        expect(page.locator(f'#chat-model option[value="{CHAT_MODEL}"]')).to_have_count(1)
        page.select_option("#chat-model", CHAT_MODEL)
        page.fill("#chat-max", "48")
        page.fill("#chat-input", "Write one sentence about the sea.")
        page.press("#chat-input", "Enter")
        expect(page.locator(".bubble.user")).to_have_text("Write one sentence about the sea.")
        page.wait_for_function(
            "() => { const b = document.querySelector('.bubble.assistant.streaming');"
            " return b !== null && b.textContent.length > 0; }",
            timeout=60_000,
        )
        expect(page.locator(".bubble.assistant.streaming")).to_have_count(0, timeout=60_000)
        reply = page.locator(".bubble.assistant").inner_text()
        assert reply.strip() and "error" not in page.locator(".bubble.assistant").get_attribute("class")
        stats = page.locator("#chat-stats").inner_text()
        assert int(stats.split()[0]) > 1, stats  # more than one chunk: streamed
        _screenshot(page, "playground.png")

        # Stop it from the Models page; its row and its segment go.
        page.click('header nav a[href="#models"]')
        page.click(f'button[data-action="stop"][data-uid="{CHAT_MODEL}"]')
        expect(page.locator("#models-msg")).to_contain_text(f"{CHAT_MODEL} stopped")
        expect(row).to_have_count(0)
        page.click('header nav a[href="#gpus"]')
        expect(gpu_bar).to_be_visible()
        expect(gpu_bar.locator(f'.seg.model[data-uid="{CHAT_MODEL}"]')).to_have_count(0)
        expect(gpu_bar.locator(f'.seg.model[data-uid="{EMBED_MODEL}"]')).to_be_visible()
        assert [m["id"] for m in srv.http.get("/v1/models").json()["data"]] == [EMBED_MODEL]
        assert not errors, errors
    finally:
        page.close()
        srv.stop()


def test_asks_for_the_api_key_once_when_auth_is_on(browser: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    srv = _serve(tmp_path, "--api-key", API_KEY)
    errors: list[str] = []
    page = _open_page(browser, errors)
    try:
        response = page.goto(srv.url + "/ui/")
        assert response is not None and response.status == 200, (
            f"GET /ui/ answered {response and response.status} with auth on: the UI's own files must be "
            "open paths (gateway/middleware.py), only its API calls need the key"
        )
        dialog = page.locator("#key-dialog")
        expect(dialog).to_be_visible()
        page.fill("#key-input", "wrong-key")
        page.click("#key-ok")
        expect(page.locator("#key-msg")).to_contain_text("refused")  # asked again, saying why
        page.fill("#key-input", API_KEY)
        page.click("#key-ok")
        expect(dialog).to_be_hidden()
        expect(page.locator('.bar[data-device="gpu:0"]')).to_be_visible()
        assert page.evaluate("sessionStorage.getItem('shoal.apiKey')") == API_KEY
        page.reload()  # kept for the browser session: no second prompt
        expect(page.locator('.bar[data-device="gpu:0"]')).to_be_visible()
        expect(dialog).to_be_hidden()
        page.click('header nav a[href="#models"]')
        expect(page.locator('#launch-form select[name="model_name"] option')).not_to_have_count(0)
        expect(page.locator("#estimate")).to_contain_text("Would go to", timeout=30_000)
        assert not errors, errors
    finally:
        page.close()
        srv.stop()


def test_gpus_page_groups_devices_by_node_on_a_ray_cluster(browser: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    # This tests the page's rendering of a Ray cluster's answers, not the cluster (test_ray_cluster.py
    # does that): a one-machine server serves the UI, and the browser gets hand-written answers for
    # the two endpoints the GPUs page polls. Two nodes up, one that left the cluster.
    srv = _serve(tmp_path)
    errors: list[str] = []
    page = _open_page(browser, errors)
    page.route("**/v1/cluster/devices", lambda route: route.fulfill(json=RAY_DEVICES))
    page.route("**/v1/workers", lambda route: route.fulfill(json=RAY_WORKERS))
    try:
        page.goto(srv.url + "/ui/")
        sections = page.locator("#devices section.node")
        expect(sections).to_have_count(3)
        # In the workers' order, each heading naming its node and IP; only the node that left is down.
        assert sections.evaluate_all("s => s.map(n => n.dataset.node)") == [
            "node-aa11aa11",
            "node-cc33cc33",
            "node-bb22bb22",
        ]
        first, gone, second = (
            page.locator(f'section.node[data-node="{n}"]')
            for n in ("node-aa11aa11", "node-cc33cc33", "node-bb22bb22")
        )
        expect(first.locator(".node-head")).to_contain_text("10.0.0.1")
        expect(first.locator(".node-head .tag.down")).to_have_count(0)
        expect(gone.locator(".node-head")).to_contain_text("10.0.0.3")
        expect(gone.locator(".node-head .tag.down")).to_have_text("down")
        expect(gone).to_contain_text("Left the cluster")
        expect(gone.locator(".device")).to_have_count(0)
        # Each device under its node, labelled by its id there; the bar keeps the full id.
        expect(first.locator(".device .device-head .id")).to_have_text(["gpu:0", "cpu"])
        expect(second.locator(".device .device-head .id")).to_have_text(["gpu:0", "gpu:1"])
        expect(
            second.locator('.bar[data-device="node-bb22bb22/gpu:0"] .seg.model[data-uid="chat"]')
        ).to_be_visible()
        expect(
            first.locator('.bar[data-device="node-aa11aa11/gpu:0"] .seg.model[data-uid="chat"]')
        ).to_be_visible()
        expect(page.locator('.bar[data-device="gpu:0"]')).to_have_count(0)  # not the serving machine's own
        _screenshot(page, "gpus-nodes.png")
        assert not errors, errors
    finally:
        page.close()
        srv.stop()


def test_launch_form_node_picker_on_a_ray_cluster(browser: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    srv = _serve(tmp_path)
    errors: list[str] = []

    def is_estimate(request: Any) -> bool:
        return request.method == "POST" and request.url.endswith("/v1/models/estimate")

    # One machine, no routes: the Node field stays hidden and nothing sends worker_ip. The first
    # estimate is asked once the catalog is loaded, after the workers were read.
    page = _open_page(browser, errors)
    try:
        with page.expect_request(is_estimate) as first:
            page.goto(srv.url + "/ui/#models")
        assert "worker_ip" not in first.value.post_data_json, first.value.post_data_json
        expect(page.locator("#launch-form select[name=model_name] option")).not_to_have_count(0)
        expect(page.locator("#node-field")).to_be_hidden()
        assert not errors, errors
    finally:
        page.close()

    # This tests the launch form only, not the cluster (test_ray_cluster.py does that): the browser
    # gets hand-written Ray answers for the workers and devices (two nodes up, one that left), the
    # estimate goes on to the one-machine server, and the launch is answered here with a 507.
    page = _open_page(browser, errors)
    page.route("**/v1/workers", lambda route: route.fulfill(json=RAY_WORKERS))
    page.route("**/v1/cluster/devices", lambda route: route.fulfill(json=RAY_DEVICES))
    launches: list[dict[str, Any]] = []
    no_room = "does not fit on node-bb22bb22 (worker_ip) now: 0.50 GiB free of 16.00 GiB"

    def launch(route: Any) -> None:
        if route.request.method != "POST":
            route.continue_()
            return
        launches.append(route.request.post_data_json)
        error = {"message": no_room, "type": "insufficient_memory", "code": "no_fit", "param": None}
        route.fulfill(status=507, json={"error": error})

    page.route("**/v1/models", launch)
    try:
        with page.expect_request(is_estimate) as first:
            page.goto(srv.url + "/ui/#models")
        assert "worker_ip" not in first.value.post_data_json  # "any node" by default
        form = page.locator("#launch-form")
        node = form.locator("select[name=worker_ip]")
        expect(page.locator("#node-field")).to_be_visible()
        # Both alive nodes, by name with their IP; not the node that left the cluster.
        expect(node.locator("option")).to_have_text(
            ["any node", "node-aa11aa11 (10.0.0.1)", "node-bb22bb22 (10.0.0.2)"]
        )
        assert node.locator("option").evaluate_all("os => os.map(o => o.value)") == [
            "",
            "node-aa11aa11",
            "node-bb22bb22",
        ]
        expect(node).to_have_value("")
        expect(page.locator("#estimate")).to_contain_text("Would go to", timeout=30_000)

        with page.expect_request(is_estimate) as picked:
            node.select_option("node-bb22bb22")
        assert picked.value.post_data_json["worker_ip"] == "node-bb22bb22"
        # the one-machine server behind the routes has no such node, and the estimate says so
        expect(page.locator("#estimate")).to_contain_text("no node matches worker_ip node-bb22bb22")
        _screenshot(page, "models-nodes.png")

        page.click("#launch-button")
        expect(page.locator("#launch-msg")).to_contain_text(no_room)
        assert len(launches) == 1 and launches[0]["worker_ip"] == "node-bb22bb22", launches
        assert launches[0]["model_name"] == form.locator("select[name=model_name]").input_value()
        assert srv.http.get("/v1/models").json()["data"] == []  # the launch never reached the server

        # A GPU of one node in the Device list: that index on that node.
        with page.expect_request(is_estimate) as on_gpu:
            form.locator("select[name=device]").select_option("node-bb22bb22/gpu:1")
        body = on_gpu.value.post_data_json
        assert body["gpu_idx"] == 1 and body["worker_ip"] == "node-bb22bb22", body
        assert not errors, errors
    finally:
        page.close()
        srv.stop()
