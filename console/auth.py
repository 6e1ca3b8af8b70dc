"""Who is asking: reviewer tokens, signed session cookies, the trusted proxy header, CSRF.

Authentication runs as ASGI middleware, before any route and so before any request body is
read: an unauthenticated request costs its headers only. A bearer token or the login form's
token is compared with ``hmac.compare_digest`` against every configured token (no early
exit). Sessions are a signed cookie (HMAC-SHA256 over reviewer, expiry and a nonce); the
nonce seeds the session's CSRF token, so a token from one session is useless in another.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from modgate.settings import ConsoleSettings

SESSION_COOKIE = "modgate_console"
LOGIN_COOKIE = "modgate_console_login"
PROXY_HEADER = "x-forwarded-user"
# Paths served without a reviewer: no queue data behind any of them.
OPEN_PATHS = frozenset({"/healthz", "/login", "/openapi.json", "/static/console.css"})
# Form posts are small (a decision, a token); anything larger is refused before it is read.
MAX_BODY_BYTES = 16 * 1024
MAX_NAME = 128


@dataclass(frozen=True)
class Identity:
    reviewer: str
    via: Literal["bearer", "session", "proxy"]
    # What the CSRF token is derived from: the session's nonce, or the reviewer's name for
    # bearer and proxy requests (no cookie of ours to ride on).
    csrf_seed: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _same(a: str, b: str) -> bool:
    """Constant-time equality of two strings, whatever characters a client sent."""
    return hmac.compare_digest(a.encode("utf-8", "surrogateescape"), b.encode("utf-8", "surrogateescape"))


def _valid_name(name: str) -> bool:
    return 0 < len(name) <= MAX_NAME and name.isprintable()


class Authenticator:
    def __init__(self, settings: ConsoleSettings) -> None:
        self.settings = settings
        configured = settings.session_secret
        # No configured secret: a random one per process, so sessions end with the process
        # and do not span replicas (docs/review.md).
        self.secret = (
            configured.get_secret_value().encode() if configured is not None else secrets.token_bytes(32)
        )
        self.tokens = [(name, token.get_secret_value().encode()) for name, token in settings.tokens.items()]

    def _mac(self, purpose: str, data: str) -> str:
        return _b64(hmac.new(self.secret, f"{purpose}\0{data}".encode(), hashlib.sha256).digest())

    def token_owner(self, token: str) -> str | None:
        """The reviewer whose token this is; every token is compared, so timing says nothing."""
        given = token.encode("utf-8", "surrogateescape")
        owner = None
        for name, expected in self.tokens:
            if hmac.compare_digest(given, expected):
                owner = name
        return owner

    def make_session(self, reviewer: str) -> str:
        payload = _b64(
            json.dumps(
                {
                    "u": reviewer,
                    "exp": int(time.time()) + self.settings.session_max_age_s,
                    "n": _b64(secrets.token_bytes(16)),
                }
            ).encode()
        )
        return f"{payload}.{self._mac('session', payload)}"

    def read_session(self, cookie: str) -> Identity | None:
        payload, _, mac = cookie.partition(".")
        if not mac or not _same(mac, self._mac("session", payload)):
            return None
        try:
            data = json.loads(_unb64(payload))
            reviewer, expires, nonce = str(data["u"]), int(data["exp"]), str(data["n"])
        except (ValueError, KeyError, TypeError):
            return None
        # A reviewer whose token was removed loses their session too.
        if expires < time.time() or reviewer not in {name for name, _ in self.tokens}:
            return None
        return Identity(reviewer, "session", "s:" + nonce)

    def identify(self, headers: dict[str, str], cookies: dict[str, str]) -> Identity | None:
        authorization = headers.get("authorization")
        if authorization is not None:
            # A credential that was sent is judged alone: a wrong token is not rescued by a cookie.
            scheme, _, token = authorization.partition(" ")
            owner = self.token_owner(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
            return Identity(owner, "bearer", "u:" + owner) if owner else None
        if self.settings.trust_proxy_header and PROXY_HEADER in headers:
            user = headers[PROXY_HEADER].strip()
            return Identity(user, "proxy", "u:" + user) if _valid_name(user) else None
        cookie = cookies.get(SESSION_COOKIE)
        return self.read_session(cookie) if cookie else None

    def csrf_token(self, identity: Identity) -> str:
        return self._mac("csrf", identity.csrf_seed)

    def csrf_ok(self, identity: Identity, token: str | None) -> bool:
        return bool(token) and _same(str(token), self.csrf_token(identity))

    # The login form has no session yet: its CSRF token is tied to a nonce in a short-lived
    # cookie (double submit, signed), so another site cannot post a login for its own token.
    def login_nonce(self) -> str:
        return _b64(secrets.token_bytes(16))

    def login_csrf(self, nonce: str) -> str:
        return self._mac("login", nonce)

    def login_csrf_ok(self, nonce: str | None, token: str | None) -> bool:
        return bool(nonce) and bool(token) and _same(str(token), self.login_csrf(str(nonce)))

    def set_cookie(self, response: Response, name: str, value: str, max_age: int) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            httponly=True,
            samesite="lax",
            secure=self.settings.cookie_secure,
            path="/",
        )


def _cookies(header: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name not in found:
            found[name] = value.strip().strip('"')
    return found


class AuthMiddleware:
    """Refuses every request to a non-open path without a reviewer, before the body is read;
    puts the ``Identity`` in ``scope["state"]["identity"]`` for the routes."""

    def __init__(self, app: ASGIApp, authenticator: Authenticator) -> None:
        self.app = app
        self.auth = authenticator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            refusal = self._body_refusal(headers)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        identity = self.auth.identify(headers, _cookies(headers.get("cookie", "")))
        scope.setdefault("state", {})["identity"] = identity
        if identity is None and scope["path"] not in OPEN_PATHS:
            await self._refuse(scope, headers)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    @staticmethod
    def _body_refusal(headers: dict[str, str]) -> Response | None:
        length = headers.get("content-length")
        if length is None:
            if "transfer-encoding" in headers:
                return PlainTextResponse("a Content-Length is required", status_code=411)
            return None
        if not length.isdigit():
            return PlainTextResponse("bad Content-Length", status_code=400)
        if int(length) > MAX_BODY_BYTES:
            return PlainTextResponse("request body too large", status_code=413)
        return None

    @staticmethod
    def _refuse(scope: Scope, headers: dict[str, str]) -> Response:
        # A browser asking for a page goes to the login form; anything else gets a 401.
        if scope["method"] in ("GET", "HEAD") and "text/html" in headers.get("accept", ""):
            target = scope["path"] + (
                "?" + scope["query_string"].decode("latin-1") if scope["query_string"] else ""
            )
            return RedirectResponse("/login?next=" + quote(target, safe=""), status_code=303)
        return JSONResponse(
            {"detail": "authentication required"},
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer realm="modgate console"'},
        )


def identity_of(request: Any) -> Identity:
    """The reviewer of a request that passed the middleware (routes behind it only)."""
    identity = request.scope.get("state", {}).get("identity")
    if identity is None:  # an open path reached a route that needs a reviewer: refuse
        raise PermissionError("no reviewer")
    return identity
