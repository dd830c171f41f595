"""Accessors for the services the lifespan put on ``app.state``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from service.answerer import Answerer
from service.core.config import Settings
from service.core.errors import Unavailable
from service.core.security import require_admin
from service.metrics import Metrics


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.runtime.sessions() as session:
        yield session


def get_answerer(request: Request) -> Answerer:
    answerer = getattr(request.app.state, "answerer", None)
    if answerer is None:
        raise Unavailable("the model is not loaded; see /readyz")
    return answerer


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
AnswererDep = Annotated[Answerer, Depends(get_answerer)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
AdminDep = Depends(require_admin)
