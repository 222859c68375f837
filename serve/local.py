"""`bubogpt serve --model DIR [--port P] [--metrics-port M]`: run serve/config.yaml locally for one
model directory.

The config is the one `serve deploy` uses, with `model_dir` and the HTTP port filled in; it is
validated against Ray Serve's schema and then run with `serve run` (blocking; Ctrl-C stops it).
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
) -> dict[str, Any]:
    """serve/config.yaml for this model directory, port and API key variable (None: no key);
    raises SettingsError for bad values."""
    from ray.serve.schema import ServeDeploySchema

    model_dir = Path(model_dir).resolve()
    if not (model_dir / CONFIG_FILE).is_file():
        raise SettingsError(f"{model_dir} is not a BuboGPT model directory (no {CONFIG_FILE})")
    if not 0 < port < 65536:
        raise SettingsError(f"port must be in 1..65535, got {port}")
    config = yaml.safe_load(Path(config_path).read_text())
    config["http_options"] = {**config.get("http_options", {}), "host": host, "port": port}
    app = config["applications"][0]
    app["args"]["model_dir"] = str(model_dir)
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
              metrics_port: int | None = None) -> int:  # fmt: skip
    """Blocks while the application serves at http://host:port (serve run)."""
    import ray
    from ray.serve.scripts import cli

    config = local_config(model_dir, port, host, api_key_env=api_key_env)
    options = ray_init_options(metrics_port)
    if options is not None:
        ray.init(**options)
        print(f"Prometheus metrics at http://{host}:{metrics_port}/metrics")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="bubogpt-serve-", delete=False) as handle:
        yaml.safe_dump(config, handle, sort_keys=False)
    print(f"serving {config['applications'][0]['args']['model_dir']} at http://{host}:{port} (config {handle.name})")
    cli.main(args=["run", handle.name], prog_name="serve", standalone_mode=False)
    return 0
