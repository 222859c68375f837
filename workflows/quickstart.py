"""`bubogpt quickstart --workdir DIR`: the whole system, end to end, on the embedded tiny default.

Steps (each skipped when a previous run completed it, so a second run reuses them):
  1. a local Ray cluster (a `ray start --head` of its own) and a local MLflow tracking server
     (SQLite backend) -- both keep running after the command ends, for the user to explore;
  2. the synthetic corpus in the original formats (`bubogpt data synth`)      -> DIR/corpus
  3. Ray Data preparation (`bubogpt data prepare`)                            -> DIR/prepared
  4. the BuboGPT stages on Ray Train (`bubogpt train --stage all`), tracked   -> DIR/model
     (the tiny grounding models are the shipped assets; `--stage grounding` retrains them)
  5. evaluation on the held-out splits (`bubogpt eval`)                       -> DIR/eval.json
  6. the Ray Serve application (LLM + grounding deployments behind one ingress)
  7. one request per input combination (image; audio; image + matched audio; image + unrelated
     audio): answers printed with grounded spans coloured, annotated images -> DIR/annotated/

    bubogpt quickstart --workdir work/quickstart
    bubogpt quickstart --workdir work/quickstart --stop      # stop Serve, Ray and MLflow
"""

from __future__ import annotations

import argparse
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
    record = workdir / RAY_RECORD
    if record.is_file():
        pid = json.loads(record.read_text())["pid"]
        record.unlink()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            time.sleep(3)
        print(f"stopped Ray (process group {pid})")
    if stop_mlflow_server(workdir / "mlflow"):
        print("stopped the MLflow server")
    return 0


# -- the pipeline ------------------------------------------------------------------------------------

def cli(argv: list[str]) -> int:
    from workflows.cli import main

    print("$ bubogpt " + " ".join(argv), flush=True)
    code = main(argv)
    if code:
        raise RuntimeError(f"`bubogpt {' '.join(argv)}` failed with exit code {code}")
    return code


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


def run(args: argparse.Namespace) -> int:
    workdir = args.workdir.resolve()
    if args.stop:
        return stop(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    say("1/7 local Ray cluster and MLflow tracking server")
    address = args.address or start_ray(workdir, args.num_cpus)
    mlflow = start_mlflow_server(workdir / "mlflow")
    os.environ["MLFLOW_TRACKING_URI"] = mlflow.uri
    import ray

    # Workers' output (the training progress lines) comes to this terminal; Serve's request log does not
    # (deploy() turns it off), so step 7 prints only the answers.
    ray.init(address=address, log_to_driver=True)
    print(f"Ray at {address}; MLflow at {mlflow.uri}")

    corpus, prepared, model = workdir / "corpus", workdir / "prepared", workdir / "model"
    say("2/7 synthetic corpus in the original formats")
    if not done(corpus / "corpus.json"):
        cli(["data", "synth", "--out", str(corpus), "--seed", str(args.seed), "--size", args.size])
    else:
        print(f"reusing {corpus}")

    say("3/7 Ray Data preparation")
    if not done(prepared / "manifest.json"):
        cli(["data", "prepare", "--input", str(corpus), "--out", str(prepared), "--preset", "tiny", "--address", address])
    else:
        print(f"reusing {prepared}")

    say("4/7 training the BuboGPT stages on Ray Train (MLflow-tracked)")
    if not done(model / "bubogpt_config.json"):
        train = ["train", "--data", str(prepared), "--out", str(workdir), "--stage", "all", "--preset", "tiny",
                 "--tracking-uri", mlflow.uri, "--address", address, "--no-eval", "--seed", str(args.seed)]
        if args.max_steps:
            train += ["--max-steps", str(args.max_steps)]
        cli(train)
    else:
        print(f"reusing {model}")

    say("5/7 evaluation on the held-out splits")
    eval_json = workdir / "eval.json"
    if not done(eval_json):
        evaluate = ["eval", "--model", str(model), "--data", str(prepared), "--json", str(eval_json),
                    "--tracking-uri", mlflow.uri]
        if args.eval_limit:
            evaluate += ["--limit", str(args.eval_limit)]
        cli(evaluate)
    else:
        print(f"reusing {eval_json}")
        print(json.dumps(json.loads(eval_json.read_text()).get("metrics", {}), indent=2))

    say("6/7 Ray Serve: LLM and grounding deployments behind one ingress")
    url = deploy(model, args.port)
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
  stop everything  bubogpt quickstart --workdir {args.workdir} --stop
""")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=Path("work/quickstart"))
    parser.add_argument("--size", choices=["tiny", "small", "medium"], default="medium",
                        help="synthetic corpus size (tiny: a quick check of the code path)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, help="cap each training stage (quick checks)")
    parser.add_argument("--eval-limit", type=int, help="at most this many eval rows per dataset")
    parser.add_argument("--port", type=int, default=8000, help="Serve HTTP port (loopback)")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray head")
    parser.add_argument("--address", help="use this running Ray cluster instead of starting one")
    parser.add_argument("--stop", action="store_true", help="stop the services a previous run left running")
