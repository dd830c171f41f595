"""Accessors for the services the lifespan put on ``app.state`` and for who is calling."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPBearer
from sqlalchemy.orm import Session

from service.answerer import Answerer
from service.core.config import Settings
from service.core.errors import Unavailable
from service.core.security import Principal, require_admin, unauthorized
from service.metrics import Metrics
from service.runtime import Runtime


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def get_read_session(request: Request) -> Iterator[Session]:
    with request.app.state.runtime.db.read() as session:
        yield session


def get_write_session(request: Request) -> Iterator[Session]:
    """A session whose transaction takes SQLite's write lock at its first statement (see
    ``service.db.Database``): for routes that read, then write what they read."""
    with request.app.state.runtime.db.write() as session:
        yield session


def get_answerer(request: Request) -> Answerer:
    answerer = getattr(request.app.state, "answerer", None)
    if answerer is None:
        raise Unavailable("the model is not loaded; see /readyz")
    return answerer


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


# How a key is presented, for the OpenAPI schema (the request middleware checks it, before the body is read)
_bearer = Security(HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer <key>`"))
_api_key = Security(APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key"))


def get_principal(request: Request, _bearer_key=_bearer, _header_key=_api_key) -> Principal:
    principal = getattr(request.state, "principal", None)
    if principal is None:  # only the open probes run without one
        raise unauthorized()
    return principal


def get_tenant(principal: Annotated[Principal, Depends(get_principal)]) -> str:
    return principal.tenant


def admin_principal(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    require_admin(principal)
    return principal


SettingsDep = Annotated[Settings, Depends(get_settings)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SessionDep = Annotated[Session, Depends(get_read_session)]
WriteSessionDep = Annotated[Session, Depends(get_write_session)]
AnswererDep = Annotated[Answerer, Depends(get_answerer)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
TenantDep = Annotated[str, Depends(get_tenant)]
AdminDep = Annotated[Principal, Depends(admin_principal)]
