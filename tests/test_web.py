"""The chat page (serve/static/) in a real browser: headless Chromium driven by Playwright, against
the session's running Serve application (the `serve_app` fixture).

One user session, step by step: open the page, upload a synthetic scene (file input) and a sound
(drag and drop), ask a question, watch the answer stream in, see the entity spans highlighted,
click one and see the canvas show only that entity, then upload a corrupt image and read the
server's error. Screenshots of each step go to test-artifacts/web/ (git-ignored); paths are printed.

Independent checks: the answer, spans and entities the page shows are compared with the server's
event stream as captured from the network (parsed here, not by the page); the canvas is checked
pixel by pixel against masks decoded here with pycocotools (not by the page's RLE decoder); the
error text is compared with the API's own error for the same bytes sent directly.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image, ImageColor
from pycocotools import mask as mask_utils

from serve_harness import API_KEY, image_bytes, scene, sound_bytes, source_sound

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts" / "web"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
TIMEOUT_MS = 60_000
MASK_ALPHA = 115 / 255  # the page's MASK_ALPHA (0.45) as stored in 8 bits
SCENE = scene(7, ("circle", "square", "triangle"))
SOUND_SECONDS = 2.0
QUESTIONS = (  # asked in turn until an answer names a grounded object
    "What shapes are in the picture?",
    "Describe the image.",
    "Which objects can you see, and what colour are they?",
)


# --------------------------------------------------------------------------------------------------
# Browser
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's Chromium, which the set-up command (scripts/bootstrap.sh, run by `make test`) installs.
    Missing, the tests FAIL: a browser test that silently skips would hide a broken page."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `bash scripts/bootstrap.sh` (or `apt-get install chromium`)")
    return CHROMIUM


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    context.close()


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def drop_file(page, selector: str, name: str, media_type: str, data: bytes) -> None:
    """Drag and drop a file onto `selector`, as the browser delivers one: a drop event whose
    DataTransfer holds a File."""
    transfer = page.evaluate_handle(
        """([name, type, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type }));
            return transfer;
        }""",
        [name, media_type, base64.b64encode(data).decode()],
    )
    page.dispatch_event(selector, "dragover", {"dataTransfer": transfer})
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


def canvas_pixels(page) -> np.ndarray:
    """The canvas as (H, W, 3) uint8, read through a lossless PNG export."""
    url = page.eval_on_selector("#scene", "canvas => canvas.toDataURL('image/png')")
    png = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


# --------------------------------------------------------------------------------------------------
# The server's event stream, parsed here
# --------------------------------------------------------------------------------------------------


def parse_event_stream(body: str) -> tuple[list[str], dict | None]:
    """SSE text -> (content deltas, grounding of the final chunk)."""
    deltas, grounding = [], None
    for event in body.replace("\r\n", "\n").split("\n\n"):
        data = "\n".join(line[5:].lstrip() for line in event.split("\n") if line.startswith("data:"))
        if not data or data == "[DONE]":
            continue
        chunk = json.loads(data)
        assert "error" not in chunk, chunk
        choice = chunk["choices"][0]
        if choice["delta"].get("content"):
            deltas.append(choice["delta"]["content"])
        if choice["finish_reason"] is not None:
            grounding = chunk.get("grounding")
    return deltas, grounding


def ask(page, question: str) -> tuple[str, list[str], dict | None]:
    """Type `question`, press Enter, wait for the answer; returns the server's stream as captured
    from the network: (answer, deltas, grounding)."""
    answers_before = page.locator("li.message.assistant").count()
    page.fill("#message", question)
    with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as captured:
        page.press("#message", "Enter")
    response = captured.value
    assert response.status == 200, response.text()
    deltas, grounding = parse_event_stream(response.text())
    page.wait_for_function(
        "n => document.querySelectorAll('li.message.assistant:not(.streaming)').length > n", arg=answers_before
    )
    return "".join(deltas), deltas, grounding


# --------------------------------------------------------------------------------------------------
# Canvas geometry
# --------------------------------------------------------------------------------------------------


def rgb(colour) -> np.ndarray:
    """An entity colour as the API gives it ("#rrggbb", a CSS colour name or [r, g, b])."""
    values = ImageColor.getrgb(colour) if isinstance(colour, str) else colour
    return np.array(values[:3], dtype=np.float64)


def entity_mask(entity: dict, shape: tuple[int, int]) -> np.ndarray:
    """Union of the entity's RLE masks (decoded by pycocotools), resized to the canvas (nearest, as
    the page enlarges masks)."""
    union = None
    for rle in entity["masks"]:
        mask = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
        union = mask if union is None else union | mask
    resized = Image.fromarray(union.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.NEAREST)
    return np.asarray(resized) > 0


def js_round(value: float) -> int:
    return int(np.floor(value + 0.5))  # Math.round (Python's round() rounds halves to even)


class PageDrawing:
    """Where renderView may draw for an entity, in canvas pixels (boxes scaled from image pixels).
    Sizes follow renderView: font max(12, side / 22), outline max(2, side / 150); zones are generous."""

    def __init__(self, scale: float, shape: tuple[int, int]):
        self.scale, self.shape = scale, shape
        self.outline = max(2, js_round(min(shape) / 150))
        self.label_height = max(12, js_round(min(shape) / 22)) + 2 * self.outline
        self.margin = self.outline + 2

    def _boxes(self, entity: dict):
        for box in entity["boxes"]:
            yield (int(v) for v in np.array(box) * self.scale)

    def _rect(self, top: int, bottom: int, left: int, right: int) -> np.ndarray:
        region = np.zeros(self.shape, dtype=bool)
        region[max(0, top) : max(0, bottom), max(0, left) : max(0, right)] = True
        return region

    def labels(self, entity: dict) -> np.ndarray:
        """At each box's top-left corner: above the box, or inside it when the box touches the top."""
        width = self.label_height * (len(entity["label"]) + 2)  # wider than any glyph run
        region = np.zeros(self.shape, dtype=bool)
        for x1, y1, x2, _ in self._boxes(entity):
            m = self.margin
            left = min(x1, self.shape[1] - width)  # labels are kept inside the canvas's right edge
            top, bottom = y1 - self.label_height - m, y1 + self.label_height + m
            region |= self._rect(top, bottom, left - m, max(x2, x1 + width) + m)
        return region

    def outlines(self, entity: dict) -> np.ndarray:
        region = np.zeros(self.shape, dtype=bool)
        for x1, y1, x2, y2 in self._boxes(entity):
            m = self.margin
            outer = self._rect(y1 - m, y2 + m + 1, x1 - m, x2 + m + 1)
            region |= outer & ~self._rect(y1 + m, y2 - m + 1, x1 + m, x2 - m + 1)
        return region

    def everything(self, entity: dict) -> np.ndarray:
        """Mask, outline and label: all inside the grown boxes and the label zones."""
        region = self.labels(entity)
        for x1, y1, x2, y2 in self._boxes(entity):
            m = self.margin
            region |= self._rect(y1 - m, y2 + m + 1, x1 - m, x2 + m + 1)
        return region


def tinted(base: np.ndarray, colour: np.ndarray) -> np.ndarray:
    return base * (1 - MASK_ALPHA) + colour * MASK_ALPHA


def mean_error(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    return float(np.abs(a[where].astype(np.float64) - b[where]).mean())


def share_close(a: np.ndarray, b: np.ndarray, where: np.ndarray, tolerance: float = 8) -> float:
    """Share of the `where` pixels whose channels all differ by at most `tolerance` (8-bit rounding
    of the blend; a few edge cells where the browser's and PIL's nearest sampling disagree)."""
    close = np.all(np.abs(a.astype(np.float64) - b) <= tolerance, axis=-1)
    return float(close[where].mean())


# --------------------------------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------------------------------


def test_chat_page_in_a_real_browser(serve_app, page):
    scene_png = image_bytes(SCENE.pixels, "PNG")  # lossless: the canvas shows exactly these pixels
    sound = sound_bytes(source_sound("circle"), seed=3, seconds=SOUND_SECONDS)

    script_errors: list[str] = []
    page.on("pageerror", lambda error: script_errors.append(str(error)))

    # 1. The ingress serves the page and its assets; the page finds the server healthy.
    page.goto(serve_app.url + "/")
    page.wait_for_function("document.querySelector('#server-status').classList.contains('ok')")
    page.fill("#api-key", API_KEY)

    # 2. The scene through the file input, the sound by drag and drop.
    page.set_input_files("#image-input", files=[{"name": "scene.png", "mimeType": "image/png", "buffer": scene_png}])
    drop_file(page, "#drop-zone", "circle.wav", "audio/wav", sound)
    page.wait_for_function("document.querySelector('#player').readyState >= 1")
    duration = page.eval_on_selector("#player", "player => player.duration")
    assert abs(duration - SOUND_SECONDS) < 0.05, f"the player holds a {duration} s sound, not the uploaded one"
    attachments = page.inner_text("#attachments")
    assert "scene.png" in attachments and "circle.wav" in attachments, attachments
    before_answer = canvas_pixels(page)  # the image alone, at the canvas's scale
    scale = float(page.eval_on_selector("#scene", "canvas => canvas.dataset.scale"))
    assert before_answer.shape[:2] == (js_round(SCENE.height * scale), js_round(SCENE.width * scale))
    screenshot(page, "01-uploaded")

    # 3. Ask, greedy (deterministic), recording every text the answer shows while it streams.
    page.click("#settings summary")
    page.fill("#temperature", "0")
    page.evaluate(
        """() => {
            // Every text the streaming answer is given: the page replaces it once per delta.
            window.partialAnswers = [];
            new MutationObserver((records) => {
                for (const record of records) {
                    const added = [...record.addedNodes];
                    if (record.target.matches && record.target.matches('li.message.assistant .text') &&
                        added.length === 1 && added[0].nodeType === Node.TEXT_NODE) {
                        window.partialAnswers.push(added[0].data);
                    }
                }
            }).observe(document.querySelector('#messages'), { subtree: true, childList: true });
        }"""
    )
    turns = []
    for question in QUESTIONS:
        answer, deltas, grounding = ask(page, question)
        turns.append((question, answer, grounding))
        assert grounding is not None, "the final chunk of an image chat carries no grounding"
        if grounding["spans"]:
            break
    screenshot(page, "02-answer")

    # The answer streamed: the page showed growing prefixes of it before the final text.
    partials = [p for p in page.evaluate("window.partialAnswers") if p]
    assert len(deltas) >= 2, f"the server sent the answer in {len(deltas)} piece(s): {deltas}"
    assert len(set(partials)) >= 2, f"the page did not render the answer incrementally: {partials}"
    assert all(any(a.startswith(p) for _, a, _ in turns) for p in partials), (partials, turns)

    # At least one answer named a grounded object.
    entities = {entity["id"]: entity for entity in grounding["entities"]}
    assert grounding["spans"], (
        "no answer named a grounded object, so nothing could be highlighted: "
        f"{[(q, a, sorted(e['label'] for e in g['entities'])) for q, a, g in turns]}"
    )

    # The page shows the server's answer, with exactly the server's spans marked in their colours.
    last_answer = page.locator("li.message.assistant").last
    assert last_answer.locator(".text").inner_text().strip() == answer.strip()
    marks = last_answer.locator("mark.entity-span")
    shown = [(m.inner_text(), m.get_attribute("data-entity-id")) for m in marks.all()]
    expected = [(s["text"], str(s["entity_id"])) for s in sorted(grounding["spans"], key=lambda s: s["start"])]
    assert shown == expected
    for mark, span in zip(marks.all(), sorted(grounding["spans"], key=lambda s: s["start"])):
        underline = mark.evaluate("m => getComputedStyle(m).borderBottomColor")
        assert np.allclose(rgb(_css_rgb(underline)), rgb(entities[span["entity_id"]]["colour"]), atol=1)

    # 4. All entities: each entity's mask pixels are tinted with its colour (masks decoded here by
    #    pycocotools); away from every box and label, the image is untouched.
    all_view = canvas_pixels(page)
    shape = all_view.shape[:2]
    assert len(entities) >= 2, f"only {len(entities)} entity grounded; a click could not change the view"
    drawing = PageDrawing(scale, shape)
    regions = {i: drawing.everything(e) for i, e in entities.items()}
    masks = {i: entity_mask(e, shape) for i, e in entities.items()}
    lines = np.any([drawing.outlines(e) | drawing.labels(e) for e in entities.values()], axis=0)
    # Where only this entity's mask is drawn: no other mask on top, no outline or label.
    only = {i: masks[i] & ~lines & ~np.any([masks[j] for j in entities if j != i], axis=0) for i in entities}
    for i, entity in entities.items():
        if only[i].sum() >= 20:
            tint = tinted(before_answer, rgb(entity["colour"]))
            assert share_close(all_view, tint, only[i]) > 0.9, f"{entity['label']}: mask not drawn where it is"
    assert mean_error(all_view, before_answer, ~np.any(list(regions.values()), axis=0)) < 1

    # 5. Click the first span: only its entity's mask and box remain; the others' vanish.
    chosen = sorted(grounding["spans"], key=lambda s: s["start"])[0]["entity_id"]
    marks.first.click()
    page.wait_for_function("document.querySelector('mark.entity-span.selected') !== null")
    one_view = canvas_pixels(page)
    screenshot(page, "03-span-selected")
    mine = regions[chosen]
    others = [i for i in entities if i != chosen]
    mine_only = masks[chosen] & ~drawing.outlines(entities[chosen]) & ~drawing.labels(entities[chosen])
    assert mine_only.sum() >= 20, f"{entities[chosen]['label']}: mask too small to check ({mine_only.sum()} px)"
    assert share_close(one_view, tinted(before_answer, rgb(entities[chosen]["colour"])), mine_only) > 0.9
    for i in others:
        elsewhere = regions[i] & ~mine
        assert mean_error(one_view, before_answer, elsewhere) < 1, f"{entities[i]['label']} is still drawn"
        assert mean_error(all_view, before_answer, elsewhere) > 1, f"{entities[i]['label']} was never drawn"
    assert entities[chosen]["label"] in page.inner_text("#view-caption")

    # Clicking the same span again shows every entity again.
    marks.first.click()
    page.wait_for_function("document.querySelector('mark.entity-span.selected') === null")
    assert np.array_equal(canvas_pixels(page), all_view)

    # 6. A corrupt image: the server's 400 message is shown, and the question is not lost.
    corrupt = b"\x89PNG\r\n\x1a\n" + b"this is not image data" * 8
    direct = requests.post(
        serve_app.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(corrupt).decode()}},
        ]}], "stream": True},  # fmt: skip
        timeout=60,
    )
    assert direct.status_code == 400, direct.text
    server_message = direct.json()["error"]["message"]
    answers_before = page.locator("li.message.assistant").count()
    page.set_input_files("#image-input", files=[{"name": "broken.png", "mimeType": "image/png", "buffer": corrupt}])
    page.fill("#message", "What is this?")
    page.press("#message", "Enter")
    page.wait_for_selector("#error:not([hidden])")
    error_text = page.inner_text("#error-text")
    screenshot(page, "04-error")
    assert "400" in error_text and server_message in error_text, (error_text, server_message)
    assert page.input_value("#message") == "What is this?"
    assert page.locator("li.message.assistant").count() == answers_before
    assert page.locator(".divider").count() == 1  # the new image started a new conversation

    # A file that is neither an image nor a sound is refused by the page itself, by name.
    drop_file(page, "#drop-zone", "notes.txt", "text/plain", b"hello")
    assert "notes.txt" in page.inner_text("#error-text")

    assert script_errors == [], script_errors


def _css_rgb(value: str) -> list[int]:
    """'rgb(r, g, b)' (a computed style) -> [r, g, b]."""
    return [int(float(v)) for v in value[value.index("(") + 1 : value.index(")")].split(",")[:3]]
