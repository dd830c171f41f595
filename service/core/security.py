"""Opt-in API keys: with ``FRESHLM_API_KEYS`` set every API call needs a key (``Authorization:
Bearer <key>`` or ``X-API-Key``); delete, rollback and rebuild need one of ``FRESHLM_ADMIN_API_KEYS``.
Probes (/healthz, /readyz), /metrics and the API docs stay open for the orchestrator."""

from __future__ import annotations

import hmac

from fastapi import Request

from service.core.errors import Forbidden, Unauthorized

OPEN_PATHS = {"/healthz", "/readyz", "/metrics", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"}


def presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key")


def _matches(key: str | None, allowed: list[str]) -> bool:
    return key is not None and any(hmac.compare_digest(key.encode(), k.encode()) for k in allowed)


def check_api_key(request: Request) -> None:
    settings = request.app.state.settings
    if request.url.path in OPEN_PATHS or not (settings.api_keys or settings.admin_api_keys):
        return
    if not _matches(presented_key(request), settings.api_keys + settings.admin_api_keys):
        raise Unauthorized("a valid API key is required (Authorization: Bearer <key> or X-API-Key)")


def require_admin(request: Request) -> None:
    """Dependency of the destructive routes. Without any key configured the service is open."""
    settings = request.app.state.settings
    if not (settings.api_keys or settings.admin_api_keys):
        return
    key = presented_key(request)
    if not _matches(key, settings.api_keys + settings.admin_api_keys):
        raise Unauthorized("a valid API key is required (Authorization: Bearer <key> or X-API-Key)")
    if not _matches(key, settings.admin_api_keys):
        raise Forbidden("this operation needs an admin API key")
