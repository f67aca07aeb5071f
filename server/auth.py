"""Optional bearer-token auth: with API keys configured, every /v1 call must present one.

Keys arrive as `Authorization: Bearer <key>` (what the openai SDK sends on HTTP and on the
Realtime WebSocket), or, for browsers that cannot set WebSocket headers, as the subprotocol
`openai-insecure-api-key.<key>` that OpenAI's own Realtime API accepts.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from starlette.requests import HTTPConnection

from server.errors import APIError

BEARER_PREFIX = "bearer "
SUBPROTOCOL_KEY_PREFIX = "openai-insecure-api-key."


def presented_key(connection: HTTPConnection) -> str | None:
    """The API key a request or WebSocket handshake carries, if any."""
    header = connection.headers.get("authorization", "")
    if header.lower().startswith(BEARER_PREFIX):
        return header[len(BEARER_PREFIX) :].strip() or None
    protocols = connection.headers.get("sec-websocket-protocol", "")
    for protocol in (p.strip() for p in protocols.split(",")):
        if protocol.startswith(SUBPROTOCOL_KEY_PREFIX):
            return protocol[len(SUBPROTOCOL_KEY_PREFIX) :] or None
    return None


def is_authorized(key: str | None, accepted: Sequence[str]) -> bool:
    """True when no keys are configured or `key` matches one (compared in constant time)."""
    if not accepted:
        return True
    if key is None:
        return False
    return any(hmac.compare_digest(key.encode(), ok.encode()) for ok in accepted)


def verify_api_key(connection: HTTPConnection, accepted: Sequence[str]) -> None:
    """Raise a 401 `APIError` unless the connection presents an accepted key."""
    key = presented_key(connection)
    if is_authorized(key, accepted):
        return
    reason = "no API key provided" if key is None else "incorrect API key provided"
    raise APIError(
        401,
        f"{reason}; send it as 'Authorization: Bearer <key>'",
        code="invalid_api_key",
    )
