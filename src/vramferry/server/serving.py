"""How uvicorn serves the app: a time limit on reading a request's headers, and bounds on their size.

uvicorn limits how long an idle keep-alive connection stays open (``timeout_keep_alive``) but not how long a client
may take to send a request's headers: a client that sends one header byte every few seconds holds its connection
open forever (the "slowloris" attack). :class:`HeaderTimeoutProtocol` closes a connection that has not sent a whole
request head within ``header_timeout`` seconds of connecting or of its previous answer.
"""

from __future__ import annotations

import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024  # h11's limit on an incomplete request head; larger heads are answered 400
KEEP_ALIVE_TIMEOUT = 5  # seconds an idle keep-alive connection stays open (uvicorn's default, stated)


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request head takes over ``header_timeout`` seconds."""

    header_timeout: float = 10.0

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer = self.loop.call_later(self.header_timeout, self._on_header_timeout)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the whole head is in: the request runs
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():  # the next request's head gets the same time
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(self.header_timeout, self._on_header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _cancel_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            logger.info(
                "closing a connection that sent no complete request head in %g s", self.header_timeout
            )
            self.transport.close()


def uvicorn_options(settings: Any) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run(app, host=..., port=..., **uvicorn_options(settings))``.

    Args:
        settings: the app's :class:`~vramferry.server.ServerSettings` (its ``header_timeout`` is used).

    Returns:
        ``http``: the h11 protocol with a header-read timeout (uvicorn's httptools protocol, picked by default when
        installed, has none); ``timeout_keep_alive``; ``h11_max_incomplete_event_size``, the largest request head.
    """
    protocol = type(
        "HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout": settings.header_timeout}
    )
    return {
        "http": protocol,
        "timeout_keep_alive": KEEP_ALIVE_TIMEOUT,
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
    }
