"""`bubogpt serve --model DIR|models:/NAME@ALIAS [--port P] [--metrics-port M]`: run serve/config.yaml
locally for one model.

The config is the one `serve deploy` uses, with `model_dir` and the HTTP port filled in; it is
validated against Ray Serve's schema and then run with `serve run` (blocking; Ctrl-C stops it).
A registry model (serve/registry.py) is resolved and downloaded into the node's cache before Ray
starts, and the replicas get the pinned `models:/NAME/VERSION` (they find it in the cache).
With `--metrics-port M` the command starts its own local Ray with that metrics export port, so
Prometheus scrapes the application's metrics (serve/metrics.py) at http://HOST:M/metrics.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from bubogpt.checkpoints.native import CONFIG_FILE
from serve.registry import cache_root, fetch, is_registry_uri, tracking_uri_or_env
from serve.settings import ServeSettings, SettingsError

CONFIG_YAML = Path(__file__).with_name("config.yaml")


def deployment_options(config_path: str | Path = CONFIG_YAML) -> dict[str, dict]:
    """{deployment name: its options} from a Serve config file's (first) application: what
    `serve.app.compose` takes, so code that deploys without `serve run` uses the same options."""
    app = yaml.safe_load(Path(config_path).read_text())["applications"][0]
    return {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app["deployments"]}


def local_config(
    model_dir: str | Path,
    port: int = 8000,
    host: str = "127.0.0.1",
    config_path: str | Path = CONFIG_YAML,
    api_key_env: str | None = None,
    tracking_uri: str | None = None,
    model_cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """serve/config.yaml for this model (a directory, or a models:/ URI: resolved, downloaded and
    pinned to its version here), port and API key variable (None: no key); raises SettingsError
    for bad values (RegistryError for a registry model that cannot be served)."""
    from ray.serve.schema import ServeDeploySchema

    registry_args = {}
    if is_registry_uri(str(model_dir)):
        version, _ = fetch(str(model_dir), tracking_uri, model_cache_dir)
        pinned = version.uri if version is not None else str(model_dir)  # None: a version found in the cache
        registry_args = {"tracking_uri": tracking_uri_or_env(tracking_uri) if version is not None else tracking_uri,
                         "model_cache_dir": str(cache_root(model_cache_dir)) if model_cache_dir else None}  # fmt: skip
        model_dir = pinned
    else:
        model_dir = Path(model_dir).resolve()
        if not (model_dir / CONFIG_FILE).is_file():
            raise SettingsError(f"{model_dir} is not a BuboGPT model directory (no {CONFIG_FILE})")
    if not 0 < port < 65536:
        raise SettingsError(f"port must be in 1..65535, got {port}")
    config = yaml.safe_load(Path(config_path).read_text())
    config["http_options"] = {**config.get("http_options", {}), "host": host, "port": port}
    app = config["applications"][0]
    app["args"]["model_dir"] = str(model_dir)
    app["args"].update(registry_args)
    app["args"]["api_key_env"] = api_key_env  # None: no API key (the default listens on loopback only)
    ServeSettings.from_dict(app["args"])  # our settings: unknown keys and bad ranges fail here
    ServeDeploySchema.model_validate(config)  # Serve's: deployment options
    return config


def ray_init_options(metrics_port: int | None) -> dict[str, Any] | None:
    """The `ray.init` options of the Ray `bubogpt serve --metrics-port` starts (None without the
    flag: `serve run` connects to a running Ray, or starts one, itself)."""
    if metrics_port is None:
        return None
    if not 0 < metrics_port < 65536:
        raise SettingsError(f"metrics port must be in 1..65535, got {metrics_port}")
    if os.environ.get("RAY_ADDRESS"):
        raise SettingsError(
            "--metrics-port sets the metrics port of the Ray this command starts, but RAY_ADDRESS names a "
            "running cluster: its nodes export metrics on their own port (ray start --metrics-export-port)"
        )
    from ray.serve._private.constants import SERVE_NAMESPACE

    return {"address": "local", "namespace": SERVE_NAMESPACE, "_metrics_export_port": metrics_port}


def run_local(model_dir: str | Path, port: int = 8000, host: str = "127.0.0.1", api_key_env: str | None = None,
              metrics_port: int | None = None, tracking_uri: str | None = None,
              model_cache_dir: str | Path | None = None) -> int:  # fmt: skip
    """Blocks while the application serves at http://host:port (serve run)."""
    import ray
    from ray.serve.scripts import cli

    config = local_config(model_dir, port, host, api_key_env=api_key_env, tracking_uri=tracking_uri,
                          model_cache_dir=model_cache_dir)  # fmt: skip
    options = ray_init_options(metrics_port)
    if options is not None:
        ray.init(**options)
        print(f"Prometheus metrics at http://{host}:{metrics_port}/metrics")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="bubogpt-serve-", delete=False) as handle:
        yaml.safe_dump(config, handle, sort_keys=False)
    print(f"serving {config['applications'][0]['args']['model_dir']} at http://{host}:{port} (config {handle.name})")
    cli.main(args=["run", handle.name], prog_name="serve", standalone_mode=False)
    return 0
