"""A server on its own event loop in a background thread: for programs (and tests) that embed zfserve but are
not asyncio programs themselves.

    with BackgroundServer(ServerOptions(port=0)) as server:
        client = Client(server.target)
        ...
"""

from __future__ import annotations

import asyncio
import threading

from .app import ServerOptions, ZFServer


class BackgroundServer:
    """Starts a :class:`ZFServer` (``load=False``: bind only; call ``call(server.load())`` later) and stops it
    gracefully on :meth:`stop` or at the end of a ``with`` block."""

    def __init__(self, options: ServerOptions, *, load: bool = True, timeout: float = 300):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="zfserve-loop", daemon=True)
        self.thread.start()
        try:
            self.server: ZFServer = self.call(self._make(options), timeout)
            self.port: int = self.call(self.server.bind(), timeout)
            self.target = f"{options.host}:{self.port}"
            if load:
                self.call(self.server.load(), timeout)
        except BaseException:
            server = getattr(self, "server", None)
            if server is not None:
                self.call(server.stop(0), timeout)
            self._close_loop()
            raise

    @staticmethod
    async def _make(options: ServerOptions) -> ZFServer:
        return ZFServer(options)   # made on the loop: its asyncio objects belong to it

    def call(self, coro, timeout: float | None = 300):
        """Run ``coro`` on the server's loop and return its result (blocking)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _close_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def stop(self, grace: float = 10) -> None:
        """Graceful shutdown (accepted requests finish, up to ``grace`` seconds), then the loop ends."""
        if self.thread.is_alive():
            self.call(self.server.stop(grace), grace + 60)
            self._close_loop()

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["BackgroundServer"]
