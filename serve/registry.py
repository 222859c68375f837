"""Models from the MLflow Model Registry: `models:/NAME@ALIAS`, `models:/NAME/VERSION` or
`models:/NAME/latest` -> a model directory on this node.

    resolve(uri, tracking_uri)        the registered version the URI names now (an alias or
                                      "latest" is looked up; a version is checked to exist)
    fetch(uri, tracking_uri, cache)   its directory, downloaded once per node into
                                      CACHE/NAME/VERSION and reused by every later start

Who downloads: every replica that needs the model (the LLM deployment; the ingress needs only the
config and tokenizer, `weights=False`) resolves `model_dir` itself, in its constructor, into the
cache of the node it runs on. Replicas on other nodes of a cluster therefore work with nothing
shared between nodes; replicas on one node share one download. `bubogpt serve` resolves the URI
first (a bad one is a one-line error before Ray starts), downloads it, and hands the replicas the
pinned `models:/NAME/VERSION`, so a replica that starts later (autoscaling, a restart) serves the
same version even if the alias has moved since.

The cache is written atomically: a download goes to a temporary folder beside its target and is
renamed into place, so a reader sees a whole model or nothing, and when two replicas on one node
download at once the first rename wins and the other's copy is deleted. A version's files never
change in MLflow, so a cached `models:/NAME/VERSION` is used without asking the server.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from bubogpt.atomic import staging_directory
from bubogpt.checkpoints.native import CONFIG_FILE
from serve.settings import SettingsError

SCHEME = "models:/"
CACHE_ENV = "BUBOGPT_MODEL_CACHE"  # the cache root when none is configured
DEFAULT_CACHE = "~/.cache/bubogpt/models"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")  # left out of a `weights=False` fetch
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[^/@]+))$")


class RegistryError(SettingsError):
    """A registry model that cannot be served: the message names the URI and what is wrong."""


def is_registry_uri(value: str | os.PathLike | None) -> bool:
    return isinstance(value, str) and value.startswith(SCHEME)


@dataclass(frozen=True)
class ModelURI:
    name: str
    alias: str | None = None
    version: str | None = None  # digits, or "latest" (the highest version)

    @classmethod
    def parse(cls, uri: str) -> "ModelURI":
        match = _URI.match(uri)
        if match is None or (match["version"] is not None and not (match["version"].isdigit() or
                                                                     match["version"] == "latest")):  # fmt: skip
            raise RegistryError(f"{uri!r} is not a registry model URI: use models:/NAME@ALIAS, models:/NAME/VERSION "
                                "or models:/NAME/latest")  # fmt: skip
        return cls(match["name"], match["alias"], match["version"])


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    source: str  # where the version's files are (the training run's `model` artifact)

    @property
    def uri(self) -> str:
        """The pinned URI: this version, whatever an alias names later."""
        return f"{SCHEME}{self.name}/{self.version}"


def tracking_uri_or_env(tracking_uri: str | None) -> str:
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise RegistryError("a models:/ URI needs an MLflow tracking server: pass --tracking-uri or set "
                            "MLFLOW_TRACKING_URI")  # fmt: skip
    return uri


def cache_root(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser().resolve()


def _check_server(tracking_uri: str) -> None:
    """Fail at once when no server answers (MLflow's own client retries for minutes)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return  # a database or file store: MLflow's errors are immediate
    import requests

    try:
        requests.get(tracking_uri.rstrip("/") + "/health", timeout=10).raise_for_status()
    except requests.RequestException as err:
        reason = type(err).__name__ if isinstance(err, requests.ConnectionError) else err
        raise RegistryError(f"no MLflow tracking server answers at {tracking_uri} ({reason})") from None


def resolve(uri: str, tracking_uri: str | None = None) -> RegisteredVersion:
    """The version `uri` names now; RegistryError when the model, alias or version does not exist."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    ref = ModelURI.parse(uri)
    tracking_uri = tracking_uri_or_env(tracking_uri)
    _check_server(tracking_uri)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        registered = client.get_registered_model(ref.name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"{uri}: no registered model {ref.name!r} at {tracking_uri}") from None
        raise RegistryError(f"{uri}: the registry at {tracking_uri} refused: {err.message}") from None
    if ref.alias is not None:
        if ref.alias not in registered.aliases:
            known = ", ".join(sorted(registered.aliases)) or "none"
            raise RegistryError(f"{uri}: model {ref.name!r} has no alias {ref.alias!r} (its aliases: {known})")
        version = client.get_model_version(ref.name, registered.aliases[ref.alias])
    elif ref.version == "latest":
        found = client.search_model_versions(f"name='{ref.name}'", order_by=["version_number DESC"], max_results=1)
        if not found:
            raise RegistryError(f"{uri}: model {ref.name!r} has no versions")
        version = found[0]
    else:
        try:
            version = client.get_model_version(ref.name, ref.version)
        except MlflowException:
            raise RegistryError(f"{uri}: model {ref.name!r} has no version {ref.version}") from None
    if version.status != "READY":
        raise RegistryError(f"{uri}: version {version.version} is {version.status}, not READY")
    return RegisteredVersion(ref.name, str(version.version), version.source)


def fetch(uri: str, tracking_uri: str | None = None, cache_dir: str | os.PathLike | None = None,
          weights: bool = True) -> tuple[RegisteredVersion | None, Path]:  # fmt: skip
    """(the version, its directory on this node). `weights=False`: everything but the weight files
    (config and tokenizer: what the ingress reads). A cached pinned version returns (None, path)
    without contacting the server."""
    ref = ModelURI.parse(uri)
    folder = cache_root(cache_dir) / quote(ref.name, safe="")
    if ref.version not in (None, "latest"):
        cached = _cached(folder, ref.version, weights)
        if cached is not None:
            return None, cached
    version = resolve(uri, tracking_uri)
    cached = _cached(folder, version.version, weights)
    if cached is not None:
        return version, cached
    target = folder / (version.version if weights else f"{version.version}-no-weights")
    _download(version, tracking_uri_or_env(tracking_uri), target, weights)
    return version, target


def _cached(folder: Path, version: str, weights: bool) -> Path | None:
    """A whole download of `version` (the full one serves a `weights=False` caller too)."""
    for name in (version,) if weights else (version, f"{version}-no-weights"):
        if (folder / name / CONFIG_FILE).is_file():
            return folder / name
    return None


def _download(version: RegisteredVersion, tracking_uri: str, target: Path, weights: bool) -> None:
    from mlflow.artifacts import download_artifacts, list_artifacts

    staging = staging_directory(target)  # a hidden sibling; renamed into place below, first download wins
    try:
        model = staging / "model"
        if weights:
            download_artifacts(artifact_uri=version.source, dst_path=str(staging), tracking_uri=tracking_uri)
            Path(staging, Path(version.source.rstrip("/")).name).rename(model)
        else:  # walk the listing; fetch file by file
            folders = [""]
            while folders:
                sub = folders.pop()
                base = f"{version.source.rstrip('/')}/{sub}".rstrip("/")
                for item in list_artifacts(artifact_uri=base, tracking_uri=tracking_uri):
                    relative = f"{sub}/{Path(item.path).name}".lstrip("/")
                    if item.is_dir:
                        folders.append(relative)
                    elif not relative.endswith(WEIGHT_SUFFIXES):
                        (model / relative).parent.mkdir(parents=True, exist_ok=True)
                        download_artifacts(artifact_uri=f"{base}/{Path(item.path).name}",
                                           dst_path=str((model / relative).parent), tracking_uri=tracking_uri)  # fmt: skip
        if not (model / CONFIG_FILE).is_file():
            raise RegistryError(f"{version.uri} (source {version.source}) is not a BuboGPT model: no {CONFIG_FILE}")
        try:
            model.rename(target)  # atomic; fails when another download got there first
        except OSError:
            if not (target / CONFIG_FILE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
