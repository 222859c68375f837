"""Helpers for the serving tests: a tiny model directory, test media, the answers of the model library
called directly (what the server must equal), and the running application.

The application is started ONCE per test session (the `serve_app` fixture in conftest.py) on a
loopback port, with the deployment options of serve/config.yaml except: one replica each (no
autoscaling, so replica identities are comparable), no logical CPUs reserved (other tests share the
session's Ray), a fast health check (the fault test waits for a restart), and a small LLM queue
(LLM_ONGOING + LLM_QUEUED) so that a burst of requests can overflow it (the 503 test).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import http.server
import io
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CONFIG_YAML = REPO / "serve" / "config.yaml"
APP_NAME = "bubogpt"
API_KEY = "serve-test-key-5d1c"
DEPLOYMENTS = ("LLM", "Grounding", "Ingress")
LLM_ONGOING, LLM_QUEUED = 16, 16  # per LLM replica / per caller: 32 requests fit, the 33rd gets 503


# --------------------------------------------------------------------------------------------------
# Model and media
# --------------------------------------------------------------------------------------------------


def build_tiny_model_dir(directory: Path) -> Path:
    """A randomly initialised tiny BuboGPT (fixed seed), saved as a native model directory."""
    from bubogpt.checkpoints.native import save_model
    from bubogpt.config import tiny
    from bubogpt.data import sample_texts
    from bubogpt.modeling_bubogpt import BuboGPT
    from bubogpt.tokenizer import build_tiny_tokenizer

    torch.manual_seed(0)
    model = BuboGPT.build(tiny(), build_tiny_tokenizer(sample_texts()))
    return save_model(model, directory)


# What the tuned tiny model says, by the set of media it is given.
TALKING_ANSWERS = {
    (): "Hello, ask me about a picture or a sound.",
    ("vision",): "I see a circle, a square and a triangle.",
    ("audio",): "I hear a steady tone.",
    ("vision", "audio"): "The tone comes from the circle on the left.",
}
TALKING_ANSWER = TALKING_ANSWERS[("vision",)]


def build_talking_model_dir(directory: Path, max_steps: int = 100) -> Path:
    """The seed-0 tiny model with its LLM fine-tuned to name shapes, one answer per set of media.

    A random tiny model answers "plain plain ..." and never mentions an entity, so nothing in its
    answers could be grounded or highlighted (the web page test needs spans), and every set of
    media would get the same answer. The serving tests compare the server with this same
    directory, so the exact words do not matter to them.
    """
    from bubogpt.checkpoints.native import save_model
    from bubogpt.config import tiny
    from bubogpt.conversation import Conversation
    from bubogpt.data import sample_texts
    from bubogpt.modeling_bubogpt import BuboGPT
    from bubogpt.tokenizer import build_tiny_tokenizer
    from serve.generation import encode_audio, encode_image

    torch.manual_seed(0)
    model = BuboGPT.build(tiny(), build_tiny_tokenizer(sample_texts()))
    vision = encode_image(model, image_bytes(scene(0).pixels), 10**7)
    audio = encode_audio(model, sound_bytes("tone"), 30.0)

    def batch(questions):
        prompts, targets, n_vision, n_audio = [], [], 0, 0
        for question in questions:
            for modalities, answer in TALKING_ANSWERS.items():
                conversation = Conversation()
                conversation.add_user(question, modalities)
                prompts.append(conversation.render())
                targets.append(answer)
                n_vision += "vision" in modalities
                n_audio += "audio" in modalities
        return prompts, targets, torch.cat([vision] * n_vision), torch.cat([audio] * n_audio)

    prompts, targets, vision_tokens, audio_tokens = batch(
        ["What shapes are in the picture?", "Describe the image.", "Describe it.",
         "Which objects can you see, and what colour are they?", "Hello"])
    probe = batch(["Describe it."])
    optimizer = torch.optim.AdamW(model.llm.parameters(), lr=3e-3)
    for step in range(max_steps):
        model.train()
        loss = model(prompts, targets, vision_tokens=vision_tokens, audio_tokens=audio_tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 9:
            model.eval()
            answers = model.generate(probe[0], vision_tokens=probe[2], audio_tokens=probe[3], max_new_tokens=16)
            if answers == probe[1]:
                break
    model.eval()
    return save_model(model, directory)


def grounding_dir_for_tests(directory: Path) -> str | None:
    """The shipped tiny grounding weights (None: the application's default) when they exist; else the
    same architecture with random weights (fixed seed) and permissive thresholds, so every image still
    yields entities with boxes and masks. Either way the tests compare the server with the pipeline
    loaded from the same weights."""
    from bubogpt.grounding.pipeline import RAM_FILES, TINY_ASSETS, save_tiny_grounding

    if (TINY_ASSETS / RAM_FILES[0]).is_file():
        return None
    from bubogpt.data.vocab import OBJECT_KINDS
    from bubogpt.grounding.detector import DetectorConfig, build_tiny_grounding_dino
    from bubogpt.grounding.ram import RAMTagger, ram_tiny
    from bubogpt.grounding.segmenter import SamSegmenter, build_sam, sam_tiny

    torch.manual_seed(0)
    tags = list(OBJECT_KINDS)
    tagger = RAMTagger(ram_tiny(len(tags)), tags)
    detector = build_tiny_grounding_dino(directory / "vocab", tags)
    sam_config = sam_tiny()
    permissive = DetectorConfig(box_threshold=0.0, text_threshold=0.0, resize_short=256, resize_max=512)
    save_tiny_grounding(directory, tagger, torch.zeros(len(tags)), detector, permissive,
                        SamSegmenter(build_sam(sam_config)), sam_config)  # fmt: skip
    return str(directory)


def scene(seed: int, kinds: tuple[str, ...] = ("circle", "square")):
    """A synthetic scene (coloured shapes, ground truth kept) from the corpus generator."""
    from bubogpt.data.synth import make_scene

    return make_scene(np.random.default_rng(seed), f"serve-{seed}", list(kinds))


def image_bytes(pixels: np.ndarray, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def sound_bytes(kind: str, seed: int = 0, seconds: float = 2.0, sample_rate: int = 16000) -> bytes:
    """A synthetic sound of `kind` (tone, buzz, chirp, ...) as a 16-bit WAV."""
    from bubogpt.data.synth import audio_bytes, make_sound

    return audio_bytes(make_sound(np.random.default_rng(seed), kind, seconds, sample_rate, 1), "WAV")


def source_sound(object_kind: str) -> str:
    """The sound kind an object of this kind makes (the corpus's one-to-one mapping)."""
    from bubogpt.data.vocab import SOURCE_SOUND

    return SOURCE_SOUND[object_kind]


def silence_wav(seconds: float, sample_rate: int = 8000) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(int(seconds * sample_rate), dtype=np.float32), sample_rate, format="WAV")
    return buffer.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A small, well-formed PNG whose header declares width x height (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    data = zlib.compress(row * 16)  # only the first rows: the guard must refuse before decoding
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{b64(data)}"


# --------------------------------------------------------------------------------------------------
# Independent answers: the model library and the grounding pipeline called directly
# --------------------------------------------------------------------------------------------------


def reference_answer(model, turns, image=None, audio=None, max_new_tokens=12):
    """What the model library itself answers (no serving code): turns: [(role, text)], the media
    opening the first user turn. Greedy, like temperature 0. Returns (answer, prompt tokens)."""
    from bubogpt.conversation import Conversation
    from bubogpt.preprocess import (AudioPreprocessConfig, ImagePreprocessConfig, decode_image, image_transform,
                                    load_audio_fbank)

    conversation = Conversation()
    modalities = [m for m, media in (("vision", image), ("audio", audio)) if media is not None]
    for i, (role, text) in enumerate(turns):
        if role == "user":
            conversation.add_user(text, modalities if i == 0 else ())
        else:
            conversation.add_assistant(text)
    pixels = fbank = None
    if image is not None:
        pixels = image_transform(ImagePreprocessConfig.for_model(model.config))(decode_image(image))[None]
    if audio is not None:
        fbank = load_audio_fbank(audio, AudioPreprocessConfig.for_model(model.config))[None]
    prompt = conversation.render()
    with torch.no_grad():
        answer = model.generate([prompt], audio=fbank, image=pixels, max_new_tokens=max_new_tokens, do_sample=False)[0]
        embeds = model.embed_modalities(audio=fbank, image=pixels)
        prompt_tokens = model.assemble([prompt], embeds, padding_side="left").inputs_embeds.shape[1]
    return answer, prompt_tokens


def check_grounding(body, image, pipeline):
    """Entities equal the pipeline's own for the decoded image (up to float noise between processes),
    masks decode to the image size, the PNG is the pipeline's drawing, spans are its matches."""
    from bubogpt.grounding.result import Entity, annotate_image, decode_mask
    from bubogpt.preprocess import decode_image

    decoded = decode_image(image)
    expected = pipeline.ground_image(decoded)
    served = [Entity(**e) for e in body["entities"]]
    assert [(e.id, e.label, e.colour, e.attributes, len(e.boxes)) for e in served] == [
        (e.id, e.label, e.colour, e.attributes, len(e.boxes)) for e in expected
    ]
    for got, want in zip(served, expected):
        assert got.score == pytest.approx(want.score, abs=2e-3)
        np.testing.assert_allclose(got.boxes, want.boxes, atol=0.5)
        for got_rle, want_rle in zip(got.masks, want.masks):
            got_mask, want_mask = decode_mask(got_rle), decode_mask(want_rle)
            assert got_mask.shape == (decoded.height, decoded.width)
            assert (got_mask & want_mask).sum() >= 0.98 * (got_mask | want_mask).sum()
    annotated = Image.open(io.BytesIO(base64.b64decode(body["annotated_image"])))
    assert annotated.format == "PNG" and annotated.size == decoded.size
    drawn = np.asarray(annotate_image(decoded, served), dtype=np.int16)
    assert np.abs(np.asarray(annotated.convert("RGB"), dtype=np.int16) - drawn).max() == 0
    assert body["spans"] == [dataclasses.asdict(span) for span in pipeline.match(body["answer"], served)]
    for span in body["spans"]:
        assert body["answer"][span["start"]:span["end"]] == span["text"]


# --------------------------------------------------------------------------------------------------
# The application
# --------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def start_media_server(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """A loopback static file server: the target of allow-listed image URLs."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def deployment_options_for_tests() -> dict[str, dict]:
    """serve/config.yaml's per-deployment options, with the test changes named in the docstring."""
    from serve.local import deployment_options

    options = deployment_options(CONFIG_YAML)
    for deployment in options.values():
        deployment.pop("autoscaling_config", None)
        deployment["num_replicas"] = 1
        deployment["ray_actor_options"] = {**deployment.get("ray_actor_options", {}), "num_cpus": 0}
        deployment["health_check_period_s"] = 1
        deployment["graceful_shutdown_timeout_s"] = 2
    options["LLM"] |= {"max_ongoing_requests": LLM_ONGOING, "max_queued_requests": LLM_QUEUED}
    return options


@dataclass
class RunningApp:
    url: str
    model_dir: Path
    media_dir: Path
    media_url: str
    settings: dict
    http: requests.Session = field(default_factory=requests.Session)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}

    def post(self, path: str, timeout: float = 60, **kwargs) -> requests.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return self.http.post(self.url + path, headers=headers, timeout=timeout, **kwargs)

    def get(self, path: str, timeout: float = 30, **kwargs) -> requests.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return self.http.get(self.url + path, headers=headers, timeout=timeout, **kwargs)

    def chat(self, **payload) -> dict:
        response = self.post("/v1/chat", json=payload)
        assert response.status_code == 200, response.text
        return response.json()

    def replicas(self, pings: int = 6) -> dict[str, set[tuple[str, int]]]:
        """{deployment: {(replica id, pid)}} from the replicas themselves, through handles."""
        from ray import serve

        found: dict[str, set[tuple[str, int]]] = {}
        for name in DEPLOYMENTS:
            handle = serve.get_deployment_handle(name, app_name=APP_NAME)
            for _ in range(pings):
                info = handle.ping.remote().result(timeout_s=30)
                found.setdefault(name, set()).add((info["replica_id"], info["pid"]))
        return found

    def metrics(self) -> dict:
        response = self.get("/v1/metrics")
        assert response.status_code == 200, response.text
        return response.json()


def start_app(workdir: Path, model_dir: Path | None = None) -> tuple[RunningApp, callable]:
    """Deploy the application on the current Ray; returns it and a function that stops it."""
    from ray import serve

    from serve.app import compose
    from serve.settings import ServeSettings

    media_dir = workdir / "media"
    (media_dir / "allowed").mkdir(parents=True)
    (media_dir / "private").mkdir(parents=True)
    media_server, media_url = start_media_server(media_dir)
    model_dir = model_dir or build_talking_model_dir(workdir / "model")
    settings = ServeSettings(
        model_dir=str(model_dir),
        grounding_dir=grounding_dir_for_tests(workdir / "grounding"),
        api_key=API_KEY,
        allowed_media_url_prefixes=[media_url + "/allowed/"],
        max_body_bytes=4 * 1024 * 1024,
        max_image_pixels=4_000_000,
        max_audio_seconds=30.0,
        max_prompt_tokens=600,
        max_new_tokens=128,
        default_max_new_tokens=16,
        request_timeout_s=60.0,
        llm_max_batch_size=8,
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(compose(settings, deployment_options_for_tests()), name=APP_NAME, route_prefix="/", blocking=False)
    app = RunningApp(f"http://127.0.0.1:{port}", Path(model_dir), media_dir, media_url, settings.to_dict())
    wait_until_healthy(app, timeout_s=180)

    def stop() -> None:
        serve.delete(APP_NAME)
        serve.shutdown()
        media_server.shutdown()

    return app, stop


def wait_until_healthy(app: RunningApp, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = requests.get(app.url + "/healthz", timeout=10)
            if last.status_code == 200:
                return
        except requests.RequestException as err:
            last = err
        time.sleep(0.5)
    raise TimeoutError(f"the application did not become healthy in {timeout_s} s: {last}")


def error_message(response: requests.Response) -> str:
    """The message of a JSON error response (asserting it is one)."""
    assert response.headers["content-type"].startswith("application/json"), response.text[:200]
    return response.json()["error"]["message"]
