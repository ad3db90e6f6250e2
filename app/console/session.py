"""Console sessions: a signed cookie naming an API key by id, and its CSRF token."""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

from fastapi import Request, Response
from itsdangerous import BadSignature, URLSafeTimedSerializer

from app.auth import service as auth_service
from app.auth.exceptions import NotAuthenticated
from app.auth.service import ANONYMOUS, KeyCache, Principal
from app.core.config import Settings
from app.core.errors import AppError

COOKIE = "taskdock_console"
LOGIN_COOKIE = "taskdock_console_login"
# The login form's token lives this long: the time to paste a key.
LOGIN_SECONDS = 15 * 60

# Strict: no script may run but the console's own file; no inline style either.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class CsrfRefused(AppError):
    status_code = 403
    code = "csrf_refused"
    message = "the form's CSRF token is missing or wrong; reload the page and try again"


class LoginRequired(NotAuthenticated):
    """No valid console session: the pages send the browser to the login form."""


@dataclass(frozen=True)
class Session:
    principal: Principal
    csrf: str


class Sessions:
    """Signs and reads the session cookie; resolves its key id to the key's principal."""

    def __init__(self, *, settings: Settings) -> None:
        secret = (
            settings.console_secret.get_secret_value()
            if settings.console_secret is not None
            else secrets.token_urlsafe(32)
        )
        self.auth = settings.auth_enabled
        self.max_age = int(settings.console_session_seconds)
        self.signer = URLSafeTimedSerializer(secret, salt="taskdock.console.session")
        self.login_signer = URLSafeTimedSerializer(secret, salt="taskdock.console.login")
        # Principals by key id, trusted as long as the API trusts a checked key.
        self.cache = KeyCache(seconds=settings.api_key_cache_seconds)

    @staticmethod
    def new_csrf() -> str:
        return secrets.token_urlsafe(24)

    def issue(
        self, response: Response, request: Request, *, key_id: str, csrf: str | None = None
    ) -> str:
        """A new session for `key_id` ("" with auth off); returns its CSRF token."""
        csrf = csrf or self.new_csrf()
        response.set_cookie(
            COOKIE,
            self.signer.dumps({"k": key_id, "c": csrf}),
            max_age=self.max_age,
            path="/console",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return csrf

    def end(self, response: Response) -> None:
        response.delete_cookie(COOKIE, path="/console", httponly=True, samesite="strict")

    def read(self, request: Request) -> tuple[str, str] | None:
        """(key id, CSRF token) of a valid, unexpired cookie."""
        raw = request.cookies.get(COOKIE)
        if not raw:
            return None
        try:
            data = self.signer.loads(raw, max_age=self.max_age)
        except BadSignature:
            return None
        if not isinstance(data, dict):
            return None
        key_id, csrf = data.get("k"), data.get("c")
        if not isinstance(key_id, str) or not isinstance(csrf, str):
            return None
        return key_id, csrf

    async def load(self, request: Request) -> Session | None:
        """The session's principal, or None (no cookie, expired, or its key revoked)."""
        found = self.read(request)
        if found is None:
            return None
        key_id, csrf = found
        if not self.auth:
            return Session(principal=ANONYMOUS, csrf=csrf)
        if not key_id:
            return None  # a session made while auth was off
        principal = self.cache.get(key_id)
        if principal is None:
            principal = await request.app.state.database.autocommit(
                auth_service.principal_by_id, key_id=key_id
            )
            if principal is None:
                return None
            self.cache.put(key_id, principal)
        return Session(principal=principal, csrf=csrf)

    def login_token(self) -> tuple[str, str]:
        """The login form's (nonce, token): the nonce goes in a short-lived cookie
        (`login_cookie`), the token, signed over it, in the form (double submit)."""
        nonce = secrets.token_urlsafe(24)
        return nonce, self.login_signer.dumps(nonce)

    def login_cookie(self, response: Response, request: Request, nonce: str) -> None:
        response.set_cookie(
            LOGIN_COOKIE,
            nonce,
            max_age=LOGIN_SECONDS,
            path="/console",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )

    def check_login_token(self, request: Request, token: str) -> None:
        nonce = request.cookies.get(LOGIN_COOKIE, "")
        try:
            signed = self.login_signer.loads(token, max_age=LOGIN_SECONDS)
        except BadSignature:
            raise CsrfRefused() from None
        if not nonce or not isinstance(signed, str) or not hmac.compare_digest(signed, nonce):
            raise CsrfRefused()


def check_csrf(session: Session, token: str | None) -> None:
    if not token or not hmac.compare_digest(token, session.csrf):
        raise CsrfRefused()
