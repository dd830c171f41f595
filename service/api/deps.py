"""Accessors for the services the lifespan put on ``app.state``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from service.answerer import RagAnswerer
from service.core.config import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


def get_answerer(request: Request) -> RagAnswerer:
    return request.app.state.answerer


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
AnswererDep = Annotated[RagAnswerer, Depends(get_answerer)]
