"""Serving a model from the MLflow Model Registry (serve/registry.py; `bubogpt serve --model models:/...`).

The session's `trained_tiny_model` trained all tiny stages on a real MLflow server and registered a
version of `bubogpt-tiny`. Here an alias is set on that version, the CLI's config resolves and
downloads it, an application is deployed beside `serve_app` from the registry URI (its replicas
download into a cache of their own, as on another node), and its answers are compared with the same
application serving the training's local model directory.
"""

import filecmp
import os
import threading
from pathlib import Path

import pytest

from serve_harness import b64, deploy_beside, deployment_options_for_tests, free_port, image_bytes, scene

MODEL = "bubogpt-tiny"
# Training moves this alias to each version it registers (workflows/tracking.py; MLflow reserves the
# name "latest": models:/NAME/latest is the highest version).
ALIAS = "newest"


@pytest.fixture(scope="module")
def registered(trained_tiny_model) -> str:
    """The version the session's training registered; its training moved ALIAS to it."""
    from mlflow import MlflowClient

    client = MlflowClient(trained_tiny_model.tracking_uri, registry_uri=trained_tiny_model.tracking_uri)
    [version] = client.search_model_versions(f"name='{MODEL}' and run_id='{trained_tiny_model.run['run_id']}'")
    assert client.get_model_version_by_alias(MODEL, ALIAS).version == version.version
    return str(version.version)


def same_tree(left: Path, right: Path) -> bool:
    """Every file of both trees, byte for byte."""
    files = lambda root: sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())  # noqa: E731
    if files(left) != files(right):
        return False
    return all(filecmp.cmp(left / f, right / f, shallow=False) for f in files(left))


def test_bad_registry_uris_are_one_line_errors_with_exit_code_2(trained_tiny_model, registered, tmp_path, capsys):
    from workflows.cli import main

    uri = trained_tiny_model.tracking_uri
    cases = [
        (["--model", "models:/no-such-model@newest", "--tracking-uri", uri], "no registered model 'no-such-model'"),
        (["--model", f"models:/{MODEL}@no-such-alias", "--tracking-uri", uri], "has no alias 'no-such-alias'"),
        (["--model", f"models:/{MODEL}/999", "--tracking-uri", uri], "has no version 999"),
        (["--model", f"models:/{MODEL}@{ALIAS}", "--tracking-uri", f"http://127.0.0.1:{free_port()}"],
         "no MLflow tracking server answers"),
        (["--model", f"models:/{MODEL}/one"], "is not a registry model URI"),
    ]  # fmt: skip
    for flags, message in cases:
        code = main(["serve", *flags, "--model-cache", str(tmp_path / "cache")])
        err = capsys.readouterr().err
        assert code == 2, (flags, err)
        assert err.count("\n") == 1 and err.startswith("bubogpt serve: ") and message in err, (flags, err)
    env = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        assert main(["serve", "--model", f"models:/{MODEL}@{ALIAS}", "--model-cache", str(tmp_path / "cache")]) == 2
        assert "needs an MLflow tracking server" in capsys.readouterr().err
    finally:
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env
    assert not (tmp_path / "cache").exists()  # nothing downloaded, nothing half-written


def test_a_registry_model_is_downloaded_once_atomically_and_reused(trained_tiny_model, registered, tmp_path):
    from serve.registry import fetch

    cache, uri = tmp_path / "cache", f"models:/{MODEL}@{ALIAS}"
    results = []
    threads = [threading.Thread(target=lambda: results.append(fetch(uri, trained_tiny_model.tracking_uri, cache)))
               for _ in range(3)]  # three replicas of one node starting at once
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(results) == 3
    assert {version.uri for version, _ in results} == {f"models:/{MODEL}/{registered}"}
    [path] = {path for _, path in results}
    assert path == cache / MODEL / registered
    assert same_tree(path, trained_tiny_model.model_dir)  # the training's exported model, every byte
    assert sorted(p.name for p in (cache / MODEL).iterdir()) == [registered]  # no partial download left

    # The next start finds the pinned version in the cache without asking any server.
    dead_server = f"http://127.0.0.1:{free_port()}"
    assert fetch(f"models:/{MODEL}/{registered}", dead_server, cache) == (None, path)
    # An alias is always looked up (it may have moved): a dead server is an error, not a stale model.
    with pytest.raises(Exception, match="no MLflow tracking server answers"):
        fetch(uri, dead_server, cache)

    # The ingress's download: config and tokenizer, no weights (and the full model where it is cached).
    _, light = fetch(uri, trained_tiny_model.tracking_uri, tmp_path / "light", weights=False)
    files = {p.relative_to(light).as_posix() for p in light.rglob("*") if p.is_file()}
    assert "bubogpt_config.json" in files and any(f.startswith("llm/tokenizer") for f in files)
    assert not [f for f in files if f.endswith(".safetensors")], files
    assert fetch(uri, trained_tiny_model.tracking_uri, cache, weights=False)[1] == path


def test_serving_by_alias_answers_as_the_local_model_directory(serve_app, trained_tiny_model, registered, tmp_path):
    from serve.local import local_config
    from serve.settings import ServeSettings

    # What `bubogpt serve --model models:/bubogpt-tiny@newest` runs: the version pinned, downloaded.
    config = local_config(f"models:/{MODEL}@{ALIAS}", free_port(), tracking_uri=trained_tiny_model.tracking_uri,
                          model_cache_dir=tmp_path / "cli-cache")  # fmt: skip
    args = config["applications"][0]["args"]
    assert args["model_dir"] == f"models:/{MODEL}/{registered}"
    assert args["tracking_uri"] == trained_tiny_model.tracking_uri
    assert same_tree(tmp_path / "cli-cache" / MODEL / registered, trained_tiny_model.model_dir)

    # The replicas resolve the URI themselves, into a cache nothing has filled (a node of their own).
    node_cache = tmp_path / "node-cache"
    settings = {**serve_app.settings, "model_dir": args["model_dir"], "tracking_uri": args["tracking_uri"],
                "model_cache_dir": str(node_cache)}  # fmt: skip
    image = b64(image_bytes(scene(71).pixels))
    # Greedy, and sampled with a seed (the same seed and request give the same sample): a 6-step model
    # often ends at once when greedy, while a seeded sample shows the weights' every difference.
    questions = [{"message": "Hello, who are you?"}, {"message": "What is in the picture?", "image": image}]
    questions += [{**q, "temperature": 1.0, "seed": 7} for q in questions]

    def answers(app) -> list[str]:
        return [app.chat(**{"temperature": 0, **q}, max_new_tokens=16)["answer"] for q in questions]

    app, delete = deploy_beside(serve_app, "registry", ServeSettings.from_dict(settings), deployment_options_for_tests())
    try:
        served = answers(app)
        assert app.get("/v1/models").json()["data"][0]["id"] == MODEL
    finally:
        delete()
    assert same_tree(node_cache / MODEL / registered, trained_tiny_model.model_dir)

    local = {**serve_app.settings, "model_dir": str(trained_tiny_model.model_dir)}
    app, delete = deploy_beside(serve_app, "registry", ServeSettings.from_dict(local), deployment_options_for_tests())
    try:
        assert answers(app) == served
    finally:
        delete()
    assert any(served), served  # not only empty answers
