"""Protocol-level errors and OpenAI-shaped error bodies.

Every 4xx/5xx the HTTP layer writes itself (malformed requests, limits,
timeouts, handler crashes) has the body OpenAI clients expect:
`{"error": {"message", "type", "param", "code"}}`.
"""

from typing import Optional

import orjson

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    417: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "internal_server_error",
    501: "invalid_request_error",
    503: "service_unavailable_error",
    505: "invalid_request_error",
}


class ProtocolError(Exception):
    """A request the parser refuses; `status` is the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def error_type_for(status: int) -> str:
    """OpenAI's error `type` for an HTTP status."""
    default = "internal_server_error" if status >= 500 else "invalid_request_error"
    return ERROR_TYPES.get(status, default)


def error_body(
    status: int,
    message: str,
    *,
    type: Optional[str] = None,
    param: Optional[str] = None,
    code: Optional[str] = None,
) -> bytes:
    """The JSON body `{"error": {...}}` for an error response."""
    error = {"message": message, "type": type or error_type_for(status), "param": param, "code": code}
    return orjson.dumps({"error": error})
