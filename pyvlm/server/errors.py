"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}}.

Handlers raise `ApiError`; the application turns it into a Response. A
message is always written for the client: never a traceback or a repr.
"""

from typing import List, Optional, Tuple

import orjson

from pyvlm.http.types import Response

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 500: "internal_server_error",
          503: "service_unavailable_error"}


class ApiError(Exception):
    """An error answer: HTTP status, client-safe message, offending param."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[List[Tuple[str, str]]] = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code, self.headers = code, list(headers or [])

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}

    def to_response(self) -> Response:
        return Response(self.status, orjson.dumps(self.body()), list(self.headers))


def invalid(message: str, param: Optional[str] = None) -> ApiError:
    """400 invalid_request_error."""
    return ApiError(400, message, param)


def unsupported_field(name: str) -> ApiError:
    return ApiError(400, f"'{name}' is not supported by pyvlm", name, "unsupported_parameter")


def unknown_field(name: str) -> ApiError:
    return ApiError(400, f"Unrecognized request argument supplied: {name}", name,
                    "unknown_parameter")


def too_busy(message: str = "The server has too many queued requests; retry later",
             retry_after_s: int = 1) -> ApiError:
    return ApiError(429, message, None, "too_many_requests", [("retry-after", str(retry_after_s))])


def unavailable(message: str = "The server is not ready (starting or shutting down)") -> ApiError:
    return ApiError(503, message, None, "service_unavailable", [("retry-after", "5")])


def internal_error() -> ApiError:
    return ApiError(500, "Internal server error", None, "internal_error")
