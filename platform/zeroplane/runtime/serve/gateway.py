"""One OpenAI base URL for every served model: ``http://<serve host>:<port>/v1``.

Deployed as its own Serve application (``zeroplane.names.GATEWAY_APP``, route prefix ``/v1``, import path
``zeroplane.runtime.serve.gateway:build_gateway``) next to the per-model applications, whose ``/<name>/v1``
prefixes keep working. Routes (relative to ``/v1``):

* ``POST /completions``, ``POST /chat/completions`` — the body's ``model`` (required here) picks the
  application: ``NAME`` (its traffic split, canary included) or ``NAME:vN`` (that version of NAME's
  application). The request goes to that application's ingress through a deployment handle, which answers
  exactly as its own prefix would (same validation, metrics, canary split).
* ``GET /models`` — every model version the key may use (API keys are not scoped per model: all of them),
  from every running zeroplane application.

The key is checked here before the body is read (the same key store and cache rules as a model replica).
"""

# No ``from __future__ import annotations``: see app.py (routes are pickled by @serve.ingress).
import time
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from zeroplane.errors import ZeroplaneError
from zeroplane.names import DEPLOYMENT, GATEWAY_APP, NAME_RE
from zeroplane.runtime.serve import auth
from zeroplane.runtime.serve.app import _error_response, _event_response
from zeroplane.runtime.serve.protocol import APIError
from zeroplane.runtime.serve.server import read_json
from zeroplane.storage import Storage

#: Seconds the gateway keeps its list of running applications before asking Serve again.
APPS_TTL_S = 5.0


class GatewayArgs(BaseModel):
    """Arguments of :func:`build_gateway`: ``storage_path`` (the key store; required with ``auth``), ``auth``
    (default true), ``key_cache_ttl_s`` (default 5)."""

    model_config = ConfigDict(extra="forbid")

    storage_path: Optional[str] = None
    auth: bool = True
    key_cache_ttl_s: float = Field(5.0, ge=0)


def application_of(model: Any) -> str:
    """The application a body's ``model`` names: ``NAME`` of ``NAME`` or ``NAME:vN``.

    Raises:
        APIError: 400 when ``model`` is missing or not a string, 404 when it cannot name a model.
    """
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required on /v1: the name of a served model ('NAME' or 'NAME:vN'); "
                            "GET /v1/models lists them", param="model")
    name = model.split(":", 1)[0]
    if not NAME_RE.fullmatch(name):
        raise APIError(404, f"model {model!r} not found; GET /v1/models lists the served models", param="model",
                       code="model_not_found")
    return name


_gateway_api = FastAPI(title="zeroplane OpenAI gateway", docs_url=None, redoc_url=None, openapi_url=None)


@_gateway_api.exception_handler(ZeroplaneError)
async def _gateway_error(request: Request, exc: ZeroplaneError) -> JSONResponse:
    return _error_response(exc)


@serve.deployment(name="OpenAIGateway")
@serve.ingress(_gateway_api)
class OpenAIGateway:
    """The ``/v1`` ingress (see the module docstring)."""

    def __init__(self, args: dict) -> None:
        cfg = GatewayArgs.model_validate(args)
        self._keys = (auth.KeyCache(Storage.from_uri(cfg.storage_path), cfg.key_cache_ttl_s, 60.0)
                      if cfg.auth else None)
        self._apps: list[str] = []
        self._apps_at = float("-inf")
        self._handles: dict[str, Any] = {}

    def _model_apps(self) -> list[str]:
        """Names of the running zeroplane model applications (refreshed every ``APPS_TTL_S``)."""
        if time.monotonic() - self._apps_at > APPS_TTL_S:
            self._apps = [name for name, app in serve.status().applications.items()
                          if name != GATEWAY_APP and DEPLOYMENT in app.deployments]
            self._apps_at = time.monotonic()
        return self._apps

    def _handle(self, name: str) -> Any:
        if name not in self._model_apps():
            self._apps_at = float("-inf")  # maybe deployed since: look again once
            if name not in self._model_apps():
                raise APIError(404, f"model {name!r} is not served here; GET /v1/models lists the served models",
                               param="model", code="model_not_found")
        if name not in self._handles:
            self._handles[name] = serve.get_deployment_handle(DEPLOYMENT, app_name=name)
        return self._handles[name]

    @_gateway_api.get("/models")
    async def models(self, request: Request) -> dict:
        """Every served model version (see the module docstring)."""
        await auth.authorize(self._keys, request.headers)
        data = []
        self._apps_at = float("-inf")
        for name in self._model_apps():
            try:
                data += await self._handle(name).models_api.remote()
            except Exception:  # noqa: BLE001 - an application going away meanwhile is not listed
                continue
        return {"object": "list", "data": data}

    @_gateway_api.post("/completions")
    async def completions(self, request: Request):
        """See the module docstring."""
        return await self._forward("completions", request)

    @_gateway_api.post("/chat/completions")
    async def chat_completions(self, request: Request):
        """See the module docstring."""
        return await self._forward("chat", request)

    async def _forward(self, kind: str, request: Request):
        await auth.authorize(self._keys, request.headers)
        body = await read_json(request)
        name = application_of(body.get("model") if isinstance(body, dict) else None)
        handle = self._handle(name)
        request_id = request.headers.get("x-request-id")
        if body.get("stream") is not True:
            status, payload = await handle.gateway_api.remote(kind, body, request_id)
            return JSONResponse(status_code=status, content=payload)
        return await _event_response(handle.options(stream=True).gateway_stream.remote(kind, body, request_id))


def build_gateway(args: dict) -> serve.Application:
    """Serve application builder of the gateway (``zeroplane.runtime.serve.gateway:build_gateway``).

    Args:
        args: see :class:`GatewayArgs`.

    Raises:
        pydantic.ValidationError: an unknown or invalid argument.
    """
    GatewayArgs.model_validate(args)
    return OpenAIGateway.options(max_ongoing_requests=64).bind(args)
