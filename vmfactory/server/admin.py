"""The admin HTTP API: thin FastAPI handlers over the same daemon core the gRPC
service calls.

=======================================  ===========================================
GET    /healthz                          the process serves
GET    /readyz                           every pool at or above its minimum, or why not
GET    /metrics                          Prometheus text exposition
GET    /v1/pools, /v1/pools/{name}       status, configuration, the sizing policy's view
PATCH  /v1/pools/{name}                  min_size, max_size, keep_running, sizing
POST   /v1/pools/{name}/drain            stop its ready VMs (the refill makes new ones)
GET    /v1/vms, /v1/leases               VMs; leases (ids only for the caller's own)
GET    /v1/templates                     template factories and their current template
POST   /v1/templates/{name}/rotate       build the next generation now, swap it in
GET    /v1/host, /v1/latency             host memory, GetVM histograms (the page)
GET    /                                 the status page; /docs, /openapi.json
=======================================  ===========================================

Errors leave through one table (:data:`HTTP_STATUS`), as JSON ``{"error", "message"}``;
a request body that does not validate (wrong type, unknown field) is 422.  Who
may change things is decided by the listener (``server.admin_server``): the
unix socket is root's, the TCP listener reads only, unless the token comes.
"""

from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path
from typing import Any, Literal

import psutil
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError, ResponseValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from vmfactory import __version__
from vmfactory.daemon.callers import Caller
from vmfactory.daemon.core import Daemon, DaemonState
from vmfactory.errors import (
    AlreadyExists, ConfigError, DaemonError, DeadlineExceeded, InvalidRequest, NotFound,
    PermissionDenied, ResourceExhausted, TemplateError, VmFactoryError,
)
from vmfactory.server.admin_models import (
    Drained, ErrorBody, Health, Host, LatencySeries, LeaseView, PoolStatus, PoolView, Readiness,
    TemplateFactoryView, VmView,
)

logger = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("status.html")
CALLER_KEY = "vmfactory.caller"

# Most specific first, as the gRPC table.
HTTP_STATUS: tuple[tuple[type[VmFactoryError], int], ...] = (
    (InvalidRequest, 400), (ConfigError, 400), (PermissionDenied, 403), (NotFound, 404),
    (AlreadyExists, 409), (TemplateError, 409), (ResourceExhausted, 429),
    (DeadlineExceeded, 504), (DaemonError, 503), (VmFactoryError, 500),
)


class PoolPatch(BaseModel):
    """What PATCH may change; anything else in the body is refused."""

    model_config = ConfigDict(extra="forbid", strict=True)
    min_size: int | None = Field(default=None, ge=0, le=1000)
    max_size: int | None = Field(default=None, ge=1, le=1000)
    keep_running: bool | None = None
    sizing: Literal["fixed", "adaptive"] | None = None


def _caller(request: Request) -> Caller:
    return request.scope[CALLER_KEY]  # type: ignore[no-any-return]


def _error(exc: VmFactoryError) -> JSONResponse:
    status = next(code for cls, code in HTTP_STATUS if isinstance(exc, cls))
    message = str(exc)
    if status == 500:  # as over gRPC: the detail is for the log
        ref = secrets.token_hex(4)
        logger.error("admin request failed [%s]: %s: %s", ref, type(exc).__name__, exc)
        message = f"the daemon could not do this [{ref} in its log]"
    return JSONResponse({"error": type(exc).__name__, "message": message[:1024]}, status)


def make_app(daemon: Daemon) -> FastAPI:
    """The admin API of ``daemon``; each request's scope carries its Caller."""
    app = FastAPI(title="vmfactory admin", version=__version__, docs_url=None, redoc_url=None,
                  responses={code: {"model": ErrorBody} for code in (400, 403, 404, 409, 422,
                                                                      429, 503)})
    _errors(app)
    _health(app, daemon)
    _pools(app, daemon)
    _resources(app, daemon)
    _pages(app)
    return app


def _errors(app: FastAPI) -> None:
    @app.exception_handler(VmFactoryError)
    async def vmfactory_error(request: Request, exc: VmFactoryError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                             for e in exc.errors())
        return JSONResponse({"error": "InvalidRequest", "message": problems[:1024]}, 422)

    @app.exception_handler(ResponseValidationError)
    async def invalid_answer(request: Request, exc: ResponseValidationError) -> JSONResponse:
        # A view that no longer matches its documented model: a bug, told as JSON too.
        return _error(VmFactoryError(f"{request.url.path}: answer does not fit its model: "
                                     f"{exc.errors()[:1]}"))


def _health(app: FastAPI, daemon: Daemon) -> None:
    @app.get("/healthz", response_model=Health)
    async def healthz() -> JSONResponse:
        serving = daemon.state is DaemonState.SERVING
        return JSONResponse(Health(status=daemon.state.value, version=__version__).model_dump(),
                            200 if serving else 503)

    @app.get("/readyz", response_model=Readiness)
    async def readyz() -> JSONResponse:
        reasons = daemon.unready()
        body = Readiness(ready=not reasons, reasons=reasons)
        return JSONResponse(body.model_dump(), 503 if reasons else 200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(daemon.metrics.exposition(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")


def _pools(app: FastAPI, daemon: Daemon) -> None:
    @app.get("/v1/pools", response_model=list[PoolStatus])
    async def pools() -> list[dict[str, Any]]:
        return [p.status() for p in daemon.pools.values()]

    @app.get("/v1/pools/{name}", response_model=PoolView)
    async def pool(name: str) -> dict[str, Any]:
        return daemon.pool_view(name)

    @app.patch("/v1/pools/{name}", response_model=PoolView)
    async def patch_pool(name: str, patch: PoolPatch,
                         caller: Caller = Depends(_caller)) -> dict[str, Any]:
        daemon.pool(name)  # an unknown pool is 404 before its body is judged
        daemon.reconfigure_pool(name, patch.model_dump(exclude_none=True), caller)
        return daemon.pool_view(name)

    @app.post("/v1/pools/{name}/drain", response_model=Drained)
    async def drain(name: str, caller: Caller = Depends(_caller)) -> Drained:
        return Drained(stopped=await daemon.drain_pool(name, caller))


def _resources(app: FastAPI, daemon: Daemon) -> None:
    @app.get("/v1/vms", response_model=list[VmView])
    async def vms(caller: Caller = Depends(_caller)) -> list[dict[str, Any]]:
        return daemon.status(caller)["vms"]  # type: ignore[no-any-return]

    @app.get("/v1/leases", response_model=list[LeaseView])
    async def leases(caller: Caller = Depends(_caller)) -> list[dict[str, Any]]:
        return daemon.leases_view(caller)

    @app.get("/v1/templates", response_model=list[TemplateFactoryView])
    async def templates() -> list[dict[str, Any]]:
        return daemon.templates_status()

    @app.post("/v1/templates/{name}/rotate", response_model=list[TemplateFactoryView])
    async def rotate(name: str, caller: Caller = Depends(_caller)) -> list[dict[str, Any]]:
        await daemon.rotate_template(name, caller)
        return daemon.templates_status()

    @app.get("/v1/host", response_model=Host)
    async def host() -> dict[str, Any]:
        memory = psutil.virtual_memory()
        return {"memory_total_bytes": memory.total, "memory_available_bytes": memory.available,
                "mem_floor_mib": daemon.config.daemon.mem_floor_mib, "version": __version__,
                "uptime_s": time.time() - daemon.started_at, "state": daemon.state.value}

    @app.get("/v1/latency", response_model=list[LatencySeries])
    async def latency() -> list[dict[str, object]]:
        return daemon.metrics.histograms()


def _pages(app: FastAPI) -> None:
    import swagger_ui_bundle  # its assets ship in the package: the hosts have no internet

    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path),
              name="docs-assets")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text())

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="vmfactory admin",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")
