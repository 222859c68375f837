"""The Ray Serve application: an LLM deployment, a grounding deployment, and an HTTP ingress.

    client --HTTP--> Ingress (serve/ingress.py: FastAPI; parse, limits, auth, media decode check)
                       ├── LLM.generate(chat)       serve/llm.py: encoders (cached by content hash)
                       │                            + batched generation (serve/generation.py)
                       └── Grounding.ground(image)  serve/grounding.py: tags -> boxes -> masks,
                                                    batched, cached by content hash
                       (both at once), then Grounding.match(answer, entities) -> answer spans

The deployments are plain classes; the ingress receives their `DeploymentHandle`s as constructor
arguments, and the app is a `.bind()` tree. The API is stateless: clients send the whole
conversation; the caches make a multi-turn chat about one image cost one image encoding and one
grounding.

Deployment options (resources, queues, autoscaling, health checks) have ONE source: the
`deployments` of serve/config.yaml. `serve run` / `serve deploy` apply them to `build_app`'s
application; code that deploys with `compose` passes them (serve/local.py: `deployment_options`).
"""

from __future__ import annotations

from typing import Any

from serve.grounding import GroundingDeployment
from serve.ingress import ChatIngress
from serve.llm import LLMDeployment
from serve.settings import ServeSettings


def compose(settings: ServeSettings, options: dict[str, dict]):
    """The `.bind()` tree with `options` per deployment name (LLM, Grounding, Ingress)."""
    args = settings.to_dict()
    llm = LLMDeployment.options(**options.get("LLM", {})).bind(args)
    grounding = GroundingDeployment.options(**options.get("Grounding", {})).bind(args)
    return ChatIngress.options(**options.get("Ingress", {})).bind(llm, grounding, args)


def build_app(args: dict[str, Any]):
    """Import path for `serve run` / `serve deploy` (serve/config.yaml): `args` are ServeSettings;
    Serve applies the config's deployment options itself."""
    return compose(ServeSettings.from_dict(dict(args)), {})
