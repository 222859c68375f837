"""`bubogpt quickstart --workdir DIR`: the whole system, end to end, on the embedded tiny default.

Steps (each skipped when a previous run completed it, so a second run reuses them):
  1. a local Ray cluster (a `ray start --head` of its own) and a local MLflow tracking server
     (SQLite backend) -- both keep running after the command ends, for the user to explore;
  2. the synthetic corpus in the original formats (`bubogpt data synth`)      -> DIR/corpus
  3. Ray Data preparation (`bubogpt data prepare`)                            -> DIR/prepared
  4. the BuboGPT stages on Ray Train (`bubogpt train --stage all`), tracked   -> DIR/model
     (the tiny grounding models are the shipped assets; `--stage grounding` retrains them)
  5. evaluation on the held-out splits (`bubogpt eval`)                       -> DIR/eval.json
     (steps 2-5 call the same functions as those commands, and print the command each one equals)
  6. the Ray Serve application (LLM + grounding deployments behind one ingress)
  7. one request per input combination (image; audio; image + matched audio; image + unrelated
     audio): answers printed with grounded spans coloured, annotated images -> DIR/annotated/

    bubogpt quickstart --workdir work/quickstart
    bubogpt quickstart --workdir work/quickstart --stop      # stop Serve, Ray and MLflow
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from workflows.mlflow_server import free_port, start_mlflow_server, stop_mlflow_server
from workflows.options import EvalOptions, QuickstartOptions, TrainOptions
from workflows.ray_connect import connect, forget_cluster, quiet_ray_noise

RAY_RECORD = "ray.json"


def say(message: str) -> None:
    print(f"\n\033[1m==> {message}\033[0m", flush=True)


def done(path: Path) -> bool:
    return path.exists()


# -- services ----------------------------------------------------------------------------------------

def use_ray_token(workdir: Path) -> Path:
    """Ray 2.60 clusters started with `ray start` require token authentication: the quickstart's
    cluster gets its own token file, and this process and its children present it."""
    token = workdir / "ray_auth_token"
    if not token.is_file():
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    return token


def start_ray(workdir: Path, num_cpus: int) -> str:
    """A Ray head of the quickstart's own (reused if it still runs); returns its address."""
    use_ray_token(workdir)
    record = workdir / RAY_RECORD
    if record.is_file():
        data = json.loads(record.read_text())
        if _alive(data["pid"]):
            return data["address"]
    port = free_port()
    command = [
        str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", str(num_cpus),
        "--include-dashboard", "false", "--disable-usage-stats",
    ]
    log = open(workdir / "ray.log", "ab")
    # Its own session: `--stop` ends exactly this cluster, never another Ray on the machine.
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    record.write_text(json.dumps({"address": address, "pid": process.pid}))
    deadline = time.monotonic() + 180
    while subprocess.run([str(Path(sys.executable).with_name("ray")), "status", "--address", address],
                         capture_output=True).returncode != 0:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the local Ray head did not start; see {workdir / 'ray.log'}")
        time.sleep(1)
    return address


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def stop(workdir: Path) -> int:
    """Stop the quickstart's Ray head and MLflow server, and forget the Ray address the way `ray stop`
    does, so a later plain command starts its own local Ray instead of retrying a dead one."""
    record = workdir / RAY_RECORD
    if record.is_file():
        data = json.loads(record.read_text())
        record.unlink()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(data["pid"], sig)
            except ProcessLookupError:
                break
            time.sleep(3)
        print(f"stopped Ray (process group {data['pid']})")
        if forget_cluster(data["address"]):
            print(f"removed the Ray address file that named {data['address']}")
    if stop_mlflow_server(workdir / "mlflow"):
        print("stopped the MLflow server")
    return 0


# -- the pipeline ------------------------------------------------------------------------------------

def announce(command: str) -> None:
    """The `bubogpt` command a step equals (what a user would run by hand)."""
    print(f"$ bubogpt {command}", flush=True)


def deploy(model_dir: Path, port: int) -> str:
    """The Serve application of serve/config.yaml (its deployment options), on this cluster."""
    from ray import serve

    from serve.app import compose
    from serve.local import local_config
    from serve.settings import ServeSettings

    config = local_config(model_dir, port)
    app_config = config["applications"][0]
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app_config["deployments"]}
    serve.start(http_options=config["http_options"])
    serve.run(compose(ServeSettings.from_dict(app_config["args"]), options), name=app_config["name"],
              route_prefix=app_config["route_prefix"], blocking=False,
              logging_config={"enable_access_log": False, "log_level": "WARNING"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return url
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the Serve application did not become healthy within 5 minutes")
        time.sleep(2)


def demo_requests(corpus: Path) -> list[dict]:
    """One request per input combination, from the held-out split of the synthetic corpus."""
    vggss = json.loads((corpus / "vggss" / "eval" / "vggss_instruction.json").read_text())["annotations"][0]
    negative = json.loads((corpus / "negative_pairs" / "eval" / "negative_pairs.json").read_text())["annotations"][0]

    def read(split_dir: Path, kind: str, name: str) -> str:
        suffix = ".jpg" if kind == "image" else ".wav"
        return base64.b64encode((split_dir / kind / f"{name}{suffix}").read_bytes()).decode()

    v_dir, n_dir = corpus / "vggss" / "eval", corpus / "negative_pairs" / "eval"
    return [
        {"name": "image", "message": "Describe this image.", "image": read(v_dir, "image", vggss["image_id"])},
        {"name": "audio", "message": "What do you hear?", "audio": read(v_dir, "audio", vggss["audio_id"])},
        {"name": "image+matched-audio", "message": "Which object makes the sound, and where is it?",
         "image": read(v_dir, "image", vggss["image_id"]), "audio": read(v_dir, "audio", vggss["audio_id"])},
        {"name": "image+unrelated-audio", "message": "Are the image and the sound related?",
         "image": read(n_dir, "image", negative["image_id"]), "audio": read(n_dir, "audio", negative["audio_id"])},
    ]


def coloured(answer: str, spans: list[dict], entities: list[dict]) -> str:
    """The answer with each grounded span in its entity's colour (24-bit ANSI)."""
    colour = {e["id"]: e.get("colour") for e in entities}
    out, position = [], 0
    for span in sorted(spans, key=lambda s: s["start"]):
        rgb = colour.get(span["entity_id"])
        out.append(answer[position:span["start"]])
        text = answer[span["start"]:span["end"]]
        if isinstance(rgb, str) and rgb.startswith("#"):
            rgb = [int(rgb[i:i + 2], 16) for i in (1, 3, 5)]
        out.append(f"\033[1;38;2;{rgb[0]};{rgb[1]};{rgb[2]}m{text}\033[0m" if rgb else text)
        position = span["end"]
    out.append(answer[position:])
    return "".join(out)


def send_requests(url: str, corpus: Path, annotated: Path) -> list[dict]:
    annotated.mkdir(parents=True, exist_ok=True)
    results = []
    for request in demo_requests(corpus):
        body = {k: v for k, v in request.items() if k != "name"} | {"max_new_tokens": 60}
        response = requests.post(f"{url}/v1/chat", json=body, timeout=300)
        response.raise_for_status()
        reply = response.json()
        print(f"\n[{request['name']}] {request['message']}")
        print("  " + coloured(reply["answer"], reply.get("spans", []), reply.get("entities", [])))
        for entity in reply.get("entities", []):
            print(f"    entity {entity['id']}: {entity['label']} box {entity.get('boxes')}")
        if reply.get("annotated_image"):
            path = annotated / f"{request['name']}.png"
            path.write_bytes(base64.b64decode(reply["annotated_image"]))
            print(f"    annotated image: {path}")
        results.append({"request": request["name"], "answer": reply["answer"], "spans": reply.get("spans", []),
                        "finish_reason": reply["finish_reason"], "completion_tokens": reply["usage"]["completion_tokens"]})
    return results


def run_quickstart(options: QuickstartOptions) -> int:
    workdir = options.workdir.resolve()
    if options.stop:
        return stop(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    say("1/7 local Ray cluster and MLflow tracking server")
    address = options.address or start_ray(workdir, options.num_cpus)
    # Workers' output (the training progress lines) comes to this terminal, without Ray's own
    # warning floods (they stay in the logs); Serve's request log does not (deploy() turns it off).
    connect(address, log_to_driver=True)
    quiet_ray_noise()
    # Imported only now: Ray reads RAY_AUTH_MODE (set by `start_ray`) when it is first imported.
    from bubogpt.data.synth import synthesize
    from workflows.evaluate import run_eval
    from workflows.prepare import run_prepare
    from workflows.train import run_training

    mlflow = start_mlflow_server(workdir / "mlflow")
    os.environ["MLFLOW_TRACKING_URI"] = mlflow.uri
    print(f"Ray at {address}; MLflow at {mlflow.uri}")

    corpus, prepared, model = workdir / "corpus", workdir / "prepared", workdir / "model"
    say("2/7 synthetic corpus in the original formats")
    if not done(corpus / "corpus.json"):
        announce(f"data synth --out {corpus} --seed {options.seed} --size {options.size}")
        synthesize(corpus, seed=options.seed, size=options.size)
    else:
        print(f"reusing {corpus}")

    say("3/7 Ray Data preparation")
    if not done(prepared / "manifest.json"):
        announce(f"data prepare --input {corpus} --out {prepared} --preset tiny --address {address}")
        run_prepare(corpus, prepared, preset="tiny", address=address)
    else:
        print(f"reusing {prepared}")

    say("4/7 training the BuboGPT stages on Ray Train (MLflow-tracked)")
    if not done(model / "bubogpt_config.json"):
        train = TrainOptions(out=workdir, data=prepared, stage="all", preset="tiny", tracking_uri=mlflow.uri,
                             address=address, eval=False, seed=options.seed, max_steps=options.max_steps)  # fmt: skip
        announce(f"train --data {prepared} --out {workdir} --stage all --preset tiny --tracking-uri {mlflow.uri} "
                 f"--address {address} --no-eval --seed {options.seed}"
                 + (f" --max-steps {options.max_steps}" if options.max_steps else ""))  # fmt: skip
        run_training(train)
    else:
        print(f"reusing {model}")

    say("5/7 evaluation on the held-out splits")
    eval_json = workdir / "eval.json"
    if not done(eval_json):
        announce(f"eval --model {model} --data {prepared} --json {eval_json} --tracking-uri {mlflow.uri}"
                 + (f" --limit {options.eval_limit}" if options.eval_limit else ""))  # fmt: skip
        run_eval(EvalOptions(model=model, data=prepared, json=eval_json, tracking_uri=mlflow.uri, limit=options.eval_limit))
    else:
        print(f"reusing {eval_json}")
        print(json.dumps(json.loads(eval_json.read_text()).get("metrics", {}), indent=2))

    say("6/7 Ray Serve: LLM and grounding deployments behind one ingress")
    url = deploy(model, options.port)
    print(f"serving at {url}")

    say("7/7 one request per input combination")
    results = send_requests(url, corpus, workdir / "annotated")
    (workdir / "requests.json").write_text(json.dumps(results, indent=2))

    minutes = (time.monotonic() - started) / 60
    say(f"done in {minutes:.1f} minutes")
    print(f"""
  MLflow UI        {mlflow.uri}
  Serve endpoint   {url}   (POST /v1/chat, POST /v1/chat/completions, page at {url}/)
  output folder    {workdir}
                   model/ (trained model), eval.json, annotated/*.png, prepared/, corpus/
  Ray cluster      {address}  (token: RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={workdir / "ray_auth_token"})
  stop everything  bubogpt quickstart --workdir {options.workdir} --stop
""")
    return 0
