"""Errors as the API answers them: OpenAI's {"error": {message, type, param, code}} body.

Bad input is a 400, 413 or 422 naming the field, never a 500: the exception handlers here turn
FastAPI's validation errors, APIError and Starlette's HTTP errors into that one shape.
"""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    """Raised by a handler; answered as error_response(status, message, param, type_, headers)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.headers = (
            status, message, param, type_, headers)


def error_body(status: int, message: str, param: str | None = None,
               type_: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None,
                   type_: str = "invalid_request_error",
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, type_), status_code=status,
                        headers=headers)


def validation_error_response(errors: list[dict]) -> JSONResponse:
    """400 for a body that is not JSON; otherwise 422 listing up to five fields, the first of
    them as param."""
    for e in errors:
        if e.get("type") == "json_invalid":
            where = e.get("ctx", {}).get("error", "")
            return error_response(400, f"malformed JSON body: {where}".rstrip(": "), "body")
    parts, first = [], None
    for e in errors[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        name = ".".join(loc) or "body"
        first = first or name
        parts.append(f"{name}: {e.get('msg')}")
    return error_response(422, "; ".join(parts), first)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return validation_error_response(exc.errors())

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.type, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), None, "not_found"
                              if exc.status_code == 404 else "invalid_request_error")
