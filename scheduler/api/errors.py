"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with their status codes."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from aigc_core.errors import NotFound, SpecError

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def not_found(what: str, id_: str, param: str | None = None) -> ApiError:
    """The same answer for a missing object and another key's object: its existence is not disclosed."""
    return ApiError(404, f"No {what} found with id '{id_}'.", param=param, code="not_found")


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(loc) or None
        return error_response(400, f"{param or 'request'}: {first.get('msg', 'invalid request')}", param=param,
                              code="invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(e.status_code, str(e.detail), code=code)

    @app.exception_handler(NotFound)
    async def _missing(request: Request, e: NotFound) -> JSONResponse:
        return error_response(404, str(e), code="not_found")

    @app.exception_handler(SpecError)
    async def _spec(request: Request, e: SpecError) -> JSONResponse:
        return error_response(400, str(e), code="invalid_request")

    @app.exception_handler(Exception)
    async def _server(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "The server had an error while processing your request.", "server_error")
