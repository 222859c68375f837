"""The README's first command (`bubogpt quickstart`), on its real code path: its own `ray start`
cluster and MLflow server, corpus, Ray Data, Ray Train, evaluation, Ray Serve, one request per input
combination. Run as the user runs it (a subprocess of the `bubogpt` CLI): the full recipe on the
default (medium) corpus, of another seed than the demo's; then run again (completed steps are
reused), asked about photos and sounds the project did not make, and stopped."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

from bubogpt.data import vocab
from tests.serve_harness import free_port

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--seed", "1", "--num-cpus", "4"]  # the demo's corpus is seed 0
# Issue 16's targets, written here from the issue (not read from the code under test): (at least, at
# most). Met on seeds 0, 1, 2 and 3 since the colour pretraining phase (benchmarks/train_quickstart.md,
# results/train_quickstart_2026-12-05f_seed*.json); on seed 1 colour was 41/41, localisation 189/192.
ISSUE_16_TARGETS = {
    "image_qa_colour": (0.95, None), "image_qa_kind": (0.95, None), "image_qa_count": (0.95, None),
    "image_qa_position": (0.90, None), "sound_kind": (0.95, None), "localisation": (0.85, None),
    "unrelated_rate": (0.90, None), "false_alarm_rate": (None, 0.10), "modality_hallucination_rate": (None, 0.05),
}
COMBINATIONS = ["image", "audio", "image+matched-audio", "image+unrelated-audio"]


def quickstart(workdir: Path, *extra: str, timeout: float = 1200) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "workflows.cli", "quickstart", "--workdir", str(workdir), *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    return result, time.monotonic() - started


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("quickstart")
    port = free_port()
    try:
        first, first_s = quickstart(workdir, *QUICK, "--port", str(port))
        assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-6000:]
        second, second_s = quickstart(workdir, *QUICK, "--port", str(port))
        assert second.returncode == 0, second.stdout[-6000:] + second.stderr[-6000:]
        yield workdir, port, first.stdout, first_s, second.stdout, second_s, first.stderr
    finally:
        stopped, _ = quickstart(workdir, "--stop", timeout=120)
        print(stopped.stdout, stopped.stderr)


def test_first_run_trains_evaluates_serves_and_answers_every_combination(two_runs):
    workdir, port, out, seconds, _, _, err = two_runs
    print(f"first quickstart run: {seconds:.0f} s")
    # The trained model, the evaluation, and one answered request per input combination.
    assert (workdir / "model" / "bubogpt_config.json").is_file()
    evaluation = json.loads((workdir / "eval.json").read_text())
    print(json.dumps({m: (evaluation["metrics"][m], evaluation["counts"][m]) for m in evaluation["metrics"]}, indent=1))
    for metric, (at_least, at_most) in ISSUE_16_TARGETS.items():
        value, why = evaluation["metrics"][metric], (metric, evaluation["metrics"][metric], evaluation["counts"][metric])
        assert (at_least is None or value >= at_least) and (at_most is None or value <= at_most), why
        assert evaluation["targets_met"][metric], why  # and the table the quickstart prints agrees
    assert evaluation["counts"]["modality_hallucination_rate"]["total"] >= 200  # image-only + audio-only rows
    # Image-only, audio-only answers counted for modality hallucination; chance next to the scores.
    parts = ("modality_hallucination_rate", "modality_hallucination_image_only", "modality_hallucination_audio_only")
    assert set(parts) <= set(evaluation["metrics"]), evaluation["metrics"]
    assert evaluation["chance"]["sound_kind"] == 1 / len(vocab.SOUND_KINDS), evaluation["chance"]
    results = json.loads((workdir / "requests.json").read_text())
    assert [r["request"] for r in results] == COMBINATIONS
    for result in results:
        # A barely trained model may end its reply at once (an empty answer, finish "stop"); one that
        # ran to the quickstart's 60-token limit wrote something.
        assert result["finish_reason"] in ("stop", "length"), result
        if result["finish_reason"] == "length":
            assert result["completion_tokens"] == 60 and result["answer"].strip(), result
        for span in result["spans"]:
            assert result["answer"][span["start"]:span["end"]] == span["text"]
    # Annotated images for the requests with an image, at the size of the image sent.
    for name in ("image", "image+matched-audio", "image+unrelated-audio"):
        with Image.open(workdir / "annotated" / f"{name}.png") as png:
            assert png.format == "PNG" and min(png.size) >= 64
    # Progress through every step (the training workers' own progress lines included, not Serve's
    # request log), and where to look at the end.
    for step in range(1, 8):
        assert f"{step}/7" in out
    for stage in ("stage1", "stage2"):
        assert len(re.findall(rf"\[bubogpt train\] {stage}: finished \d+ steps", out)) == 1, stage  # each line once
    assert out.count("[bubogpt train] all stages finished") == 1
    # Ray's own warnings from its workers stay in Ray's logs, off the terminal (the placement-group
    # cleaner warns every few seconds while the dashboard is off).
    for noise in ("PlacementGroupCleaner", "Failed to query Ray Train Controller", "RayDeprecationWarning",
                  "'PreemptionWatcher'"):  # fmt: skip
        assert noise not in out + err, noise
    from workflows.ray_connect import address_file

    started = (workdir / "ray_auth_token").stat().st_mtime
    logs = [p for p in address_file().parent.glob("session_*/logs/worker-*.err") if p.stat().st_mtime >= started]
    assert any("'PreemptionWatcher'" in p.read_text(errors="replace") for p in logs), "the warnings left the logs too"
    assert "/v1/chat 200" not in out  # no access-log lines
    assert "MLflow UI" in out and f"http://127.0.0.1:{port}" in out and "--stop" in out


def test_services_stay_up_with_the_runs_recorded(two_runs):
    import mlflow

    workdir, port, out, _, _, _, _ = two_runs
    hello = {"message": "Hello", "max_new_tokens": 8, "temperature": 0}  # greedy: the same reply every run
    reply = requests.post(f"http://127.0.0.1:{port}/v1/chat", json=hello, timeout=120)
    assert reply.status_code == 200, reply.text
    # As for requests.json: an empty answer only when the model ended it ("stop"); cut at the limit, it wrote.
    body = reply.json()
    assert body["finish_reason"] in ("stop", "length"), body
    if body["finish_reason"] == "length":
        assert body["usage"]["completion_tokens"] == 8 and body["answer"].strip(), body
    uri = re.search(r"MLflow UI\s+(\S+)", out).group(1)
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("bubogpt")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert parents and children, [r.info.run_name for r in runs]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} <= {r.info.run_id for r in parents}
    assert any(k.startswith("loss") for r in children for k in r.data.metrics), [r.data.metrics for r in children]
    assert client.search_model_versions("name='bubogpt-tiny'"), "no registered model version"


# --- inputs the project did not make (issue 16, item 5) ---------------------------------------------


def photos_made_elsewhere() -> dict[str, bytes]:
    """Real photographs other projects ship (matplotlib's and scikit-learn's sample images) and a
    chart matplotlib draws now: nothing like the corpus's flat shapes on plain backgrounds."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import cbook
    from sklearn.datasets import load_sample_image

    photos = {"grace_hopper.jpg": cbook.get_sample_data("grace_hopper.jpg").read()}
    for name in ("china.jpg", "flower.jpg"):
        encoded = io.BytesIO()
        Image.fromarray(load_sample_image(name)).save(encoded, format="JPEG", quality=90)
        photos[name] = encoded.getvalue()
    figure, axes = plt.subplots(figsize=(4, 3), dpi=80)
    axes.bar(["2019", "2020", "2021", "2022"], [3, 7, 2, 5], color="tab:orange")
    axes.set_title("sales")
    chart = io.BytesIO()
    figure.savefig(chart, format="png")
    plt.close(figure)
    photos["bar_chart.png"] = chart.getvalue()
    return photos


def sounds_made_elsewhere() -> dict[str, bytes]:
    """Sounds scipy makes now (a stereo float WAV, an 8-bit WAV at 8 kHz, an Ogg file through
    soundfile), none of the corpus's kinds: a plucked-string melody, a drum loop, pink noise."""
    import io

    import numpy as np
    import soundfile
    from scipy import signal
    from scipy.io import wavfile

    rate, rng = 22050, np.random.default_rng(3)
    t = np.arange(int(rate * 3.0)) / rate
    melody = np.zeros_like(t)
    for i, freq in enumerate((262, 330, 392, 523, 392, 330)):  # plucked notes: decaying harmonics
        start = int(i * 0.5 * rate)
        n = len(t) - start
        envelope = np.exp(-6 * t[:n])
        melody[start:] += envelope * sum(np.sin(2 * np.pi * freq * k * t[:n]) / k for k in (1, 2, 3))
    drums = np.zeros_like(t)
    for beat in np.arange(0, 3.0, 0.25):
        start = int(beat * rate)
        n = min(int(0.12 * rate), len(t) - start)
        kick = np.sin(2 * np.pi * np.linspace(120, 40, n) * t[:n]) * np.exp(-30 * t[:n])
        drums[start:start + n] += kick + 0.3 * rng.standard_normal(n) * np.exp(-60 * t[:n])
    white = rng.standard_normal(len(t))
    pink = signal.lfilter([0.049922035, -0.095993537, 0.050612699, -0.004408786], [1, -2.494956002, 2.017265875, -0.522189400], white)

    def wav(samples, sample_rate, dtype):
        encoded = io.BytesIO()
        samples = samples / np.abs(samples).max()
        if dtype == "uint8":
            samples = ((samples * 0.8 + 1) * 127.5).astype(np.uint8)
        wavfile.write(encoded, sample_rate, samples.astype(dtype) if dtype != "uint8" else samples)
        return encoded.getvalue()

    ogg = io.BytesIO()
    soundfile.write(ogg, (pink / np.abs(pink).max() * 0.8).astype(np.float32), rate, format="OGG")
    return {
        "melody_stereo_float.wav": wav(np.stack([melody, 0.7 * melody], axis=1), rate, "float32"),
        "drums_8bit_8khz.wav": wav(signal.resample_poly(drums, 8000, rate), 8000, "uint8"),
        "pink_noise.ogg": ogg.getvalue(),
    }


def test_unseen_photos_and_sounds_are_never_described_as_the_other_medium(two_runs):
    """The served quickstart model, asked about one medium it has never seen the like of, talks
    about that medium only: no sound in an answer about a photo, no picture in one about a sound
    (the evaluation's words, `talks_about_sound` / `describes_image`). It may get the content wrong."""
    from bubogpt.evaluation import describes_image, talks_about_sound

    port = two_runs[1]
    url = f"http://127.0.0.1:{port}/v1/chat"
    asked = []
    for name, data in photos_made_elsewhere().items():
        for question in ("Describe this image.", "What can you see in this picture?"):
            asked.append((name, question, {"image": base64.b64encode(data).decode()}, talks_about_sound))
    for name, data in sounds_made_elsewhere().items():
        for question in ("What do you hear?", "Describe the sound you hear."):
            asked.append((name, question, {"audio": base64.b64encode(data).decode()}, describes_image))
    wrong = []
    for name, question, media, other_medium in asked:
        body = {"message": question, **media, "max_new_tokens": 60, "temperature": 0}
        reply = requests.post(url, json=body, timeout=300)
        assert reply.status_code == 200, (name, reply.text)
        answer = reply.json()["answer"]
        print(f"{name} | {question} | {answer}")
        assert len(answer.split()) >= 3, (name, question, answer)  # it answers (an empty reply proves nothing)
        if other_medium(answer):
            wrong.append((name, question, answer))
    assert not wrong, wrong


def test_second_run_reuses_completed_steps(two_runs):
    _, _, _, first_s, out, second_s, _ = two_runs
    print(f"second quickstart run: {second_s:.0f} s (first {first_s:.0f} s)")
    assert out.count("reusing") >= 4, out[-4000:]
    assert "$ bubogpt train" not in out and "$ bubogpt data" not in out
    assert second_s < first_s


def test_stop_leaves_nothing_a_plain_command_trips_on(two_runs, tmp_path):
    """After `--stop`, a plain command (no --address) starts its own Ray: the address file `ray start`
    wrote no longer sends it to the stopped cluster (runs last: it stops the services)."""
    from workflows.ray_connect import address_file, same_address

    workdir = two_runs[0]
    address = json.loads((workdir / "ray.json").read_text())["address"]
    recorded = address_file()
    assert same_address(recorded.read_text().strip(), address)  # the quickstart's `ray start` recorded its cluster
    stopped, _ = quickstart(workdir, "--stop", timeout=120)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert not recorded.exists()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(
        [sys.executable, "-m", "workflows.cli", "data", "prepare", "--input", str(workdir / "corpus"),
         "--out", str(tmp_path / "prepared"), "--workers", "1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "prepared" / "manifest.json").is_file()
