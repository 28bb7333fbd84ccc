"""What the HTTP side lets in, decided from a request's head before its body is read (:class:`HttpPolicy`), and
the headers every answer carries.

In this order:
1. **Host.** A browser page on another site can reach a server on this machine by giving its own name the
   address 127.0.0.1 (DNS rebinding); the request then carries that name in Host. Accepted: IP addresses (a
   rebinding page cannot send one, and clients that connect by address send it), ``localhost`` and its
   sub-names, and the names of ``--allowed-hosts`` (``*``: any). Otherwise 403.
2. **Token.** With ``--auth-token-file``, exactly one ``Authorization: Bearer <token>`` on every protected route
   (the health checks are exempt, as over gRPC; see :mod:`.auth`). Otherwise 401.
3. **Origin, for routes that change state** (every POST). A page on another site can make a browser send a
   "simple" request (a form's content types, no custom header) without asking first, and such a request could
   start work or unload a model. Refused (403): an ``Origin`` other than this server's own, or a
   ``Sec-Fetch-Site`` of ``cross-site`` / ``same-site``; refused (415): a content type a form can send
   (``text/plain``, ``application/x-www-form-urlencoded``, ``multipart/form-data``) unless a header a page cannot
   send without asking comes with it (``Authorization``, ``Inference-Header-Content-Length``,
   ``X-Requested-With``). JSON, binary tensors, uploads (``image/*``, ``application/octet-stream``) and clients
   that send no content type (tritonclient, perf_analyzer) pass.
4. **Body size**: the route's own limit (:func:`limit_of`): ``--max-message-bytes`` for OIP infer, the upload
   limit for the page's uploads, 64 KiB for the rest.
Every answer, the listener's own refusals included, says ``X-Content-Type-Options: nosniff`` and carries a
Content-Security-Policy with ``frame-ancestors 'none'`` (the page's allows its own scripts, styles and images;
everything else allows nothing), ``X-Frame-Options: DENY``, ``Referrer-Policy: no-referrer`` and
``Cross-Origin-Resource-Policy: same-origin``.
"""

from __future__ import annotations

import ipaddress
from typing import Callable
from urllib.parse import urlsplit

from .auth import EXEMPT_PATHS, refusal
from .http_body import CONTROL_BODY_BYTES, HttpError

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
FORM_TYPES = ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data")
PREFLIGHTED_HEADERS = (b"authorization", b"inference-header-content-length", b"x-requested-with")
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
API_CSP = "default-src 'none'; frame-ancestors 'none'"
_COMMON = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
           (b"referrer-policy", b"no-referrer"), (b"cross-origin-resource-policy", b"same-origin")]


def limit_of(route) -> tuple[int, str]:
    """A route's body limit and the flag that sets it, as :func:`with_limit` attached it (other routes, and
    paths that match none: :data:`~.http_body.CONTROL_BODY_BYTES`)."""
    return getattr(route, "body_limit", (CONTROL_BODY_BYTES, "the limit of routes without uploads"))


def with_limit(route, limit: int, flag: str):
    """``route`` with a body limit of ``limit`` bytes (the listener refuses a longer declared body unread)."""
    route.body_limit = (limit, flag)
    return route


def host_name(host: str) -> str:
    """The name in a Host header, without its port, in lower case and without a trailing dot."""
    if host.startswith("["):
        return host[1:host.find("]")].lower()
    return (host.rpartition(":")[0] if host.count(":") == 1 else host).lower().rstrip(".")


class HttpPolicy:
    """``admit(scope)``: an :class:`HttpError` for a refused request, else ``(body limit, its flag)``;
    ``headers(scope)``: the headers every answer carries. ``protected(path)`` says which paths need the token;
    ``routes``, whose matching one gives the body limit (:func:`limit_of`)."""

    def __init__(self, token: bytes | None, allowed_hosts=(), *, routes=(),
                 protected: Callable[[str], bool] = lambda path: True, page: Callable[[str], bool] = lambda p: False):
        self.token, self.protected, self.page = token, protected, page
        self.routes = [route for route in routes if hasattr(route, "body_limit")]   # the others: the default
        self.allowed = {host_name(h) for h in allowed_hosts if h != "*"}
        self.any_host = "*" in allowed_hosts
        self._verdicts: dict[str, bool] = {}   # Host header -> allowed (a client sends the same one each time)
        self._headers = {page: _COMMON + [(b"content-security-policy", (PAGE_CSP if page else API_CSP).encode())]
                         for page in (True, False)}

    def admit(self, scope: dict):
        headers = scope["headers"]
        values = {}
        for name, value in headers:
            values.setdefault(name, []).append(value)
        host = values.get(b"host", [None])[0]
        if host is not None and not self.host_allowed(host.decode("latin-1")):
            name = host_name(host.decode("latin-1"))
            return HttpError(403, f"host: {name!r} is not a name this server answers to; start it with "
                                  f"--allowed-hosts {name} to serve that name", "host")
        path = scope["path"]
        if self.token is not None and path not in EXEMPT_PATHS and self.protected(path):
            reason = refusal(values.get(b"authorization", []), self.token)
            if reason is not None:
                return HttpError(401, f"authorization: {reason}; send 'Authorization: Bearer <token>'",
                                 "authorization", {"www-authenticate": "Bearer"})
        if scope["method"] not in SAFE_METHODS:
            refused = self._cross_site(scope, values, host)
            if refused is not None:
                return refused
        return self._limit(scope)

    def host_allowed(self, host: str) -> bool:
        verdict = self._verdicts.get(host)
        if verdict is None:
            if len(self._verdicts) >= 1024:   # bounded: names a client makes up are not kept for ever
                self._verdicts.clear()
            verdict = self._verdicts[host] = self._allowed(host_name(host))
        return verdict

    def _allowed(self, name: str) -> bool:
        if self.any_host or name in self.allowed or name == "localhost" or name.endswith(".localhost"):
            return True
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return False

    def _cross_site(self, scope: dict, values: dict, host: bytes | None) -> HttpError | None:
        own = f"{scope['scheme']}://{host.decode('latin-1').lower()}" if host else None
        origin = values.get(b"origin", [None])[0]
        if origin is not None and origin.decode("latin-1").lower().rstrip("/") != own:
            return HttpError(403, f"origin: {origin.decode('latin-1')!r:.80} is not this server's ({own}); requests "
                                  f"that change state are refused from other sites", "origin")
        site = values.get(b"sec-fetch-site", [b""])[0].decode("latin-1").lower()
        if site in ("cross-site", "same-site"):
            return HttpError(403, f"origin: a {site} request (Sec-Fetch-Site); requests that change state are "
                                  f"refused from other sites", "origin")
        content_type = values.get(b"content-type", [b""])[0].decode("latin-1").split(";")[0].strip().lower()
        if content_type in FORM_TYPES and not any(name in values for name in PREFLIGHTED_HEADERS):
            return HttpError(415, f"content-type: {content_type} is refused on routes that change state (any web "
                                  f"page could send it); send application/json, or the raw bytes as "
                                  f"application/octet-stream", "content-type")
        return None

    def _limit(self, scope: dict):
        from starlette.routing import Match
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return limit_of(route)
        return limit_of(None)

    def headers(self, scope: dict | None) -> list:
        return self._headers[bool(scope) and self.page(scope["path"])]


__all__ = ["API_CSP", "HttpPolicy", "PAGE_CSP", "host_name", "limit_of", "with_limit"]
