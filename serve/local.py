"""`bubogpt serve --model DIR [--port P]`: run serve/config.yaml locally for one model directory.

The config is the one `serve deploy` uses, with `model_dir` and the HTTP port filled in; it is
validated against Ray Serve's schema and then run with `serve run` (blocking; Ctrl-C stops it).
"""

from __future__ import annotations

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
    """serve/config.yaml for this model directory and port; raises SettingsError for bad values."""
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
    if api_key_env:
        app["args"]["api_key_env"] = api_key_env
    ServeSettings.from_dict(app["args"])  # our settings: unknown keys and bad ranges fail here
    ServeDeploySchema.model_validate(config)  # Serve's: deployment options
    return config


def run_local(model_dir: str | Path, port: int = 8000, host: str = "127.0.0.1", api_key_env: str | None = None) -> int:
    """Blocks while the application serves at http://host:port (serve run)."""
    from ray.serve.scripts import cli

    config = local_config(model_dir, port, host, api_key_env=api_key_env)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="bubogpt-serve-", delete=False) as handle:
        yaml.safe_dump(config, handle, sort_keys=False)
    print(f"serving {config['applications'][0]['args']['model_dir']} at http://{host}:{port} (config {handle.name})")
    cli.main(args=["run", handle.name], prog_name="serve", standalone_mode=False)
    return 0
