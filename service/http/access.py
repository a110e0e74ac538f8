"""Who may do what: scoped bearer tokens, and writes refused to other sites' pages.

Every route needs one scope, or none (health, the page, the docs):

    predict  predictions: /predict, /v2 inference and model metadata
    read     jobs, histories, plots, event streams, model versions, metrics
    train    fits and their cancellation
    admin    serving a model version (a rollback)

A request has a scope when the scope is open (SGD_OPEN_SCOPES, `predict,read` by default; every
scope when no token is configured at all, as before tokens existed), or when it carries
`Authorization: Bearer <token>` for a token that holds it: SGD_API_TOKEN holds every scope, and
each named token of SGD_TOKENS_FILE the scopes listed with it. That file holds SHA-256 hashes,
never tokens; it is read again when it changes (two tokens valid at once is a rotation without
a restart). A token is compared with every hash, in constant time.

A write (train, admin) whose `Sec-Fetch-Site` or `Origin` says another site sent it is refused
whatever the tokens: without a token set, a page on another site could otherwise post a form
to a service on loopback (the Host check cannot stop it: the browser sends the loopback Host).
Other services and curl send neither header and are not affected.
"""

import hashlib
import hmac
import logging
import os
import threading
import time
from pathlib import Path
from typing import Annotated, get_args
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from service.core.errors import CrossSiteWrite, InsufficientScope, Unauthorized
from service.core.settings import Scope, Settings

log = logging.getLogger("sgd_service")

SCOPES: tuple[Scope, ...] = get_args(Scope)
WRITES: frozenset[Scope] = frozenset({"train", "admin"})
RELOAD_SECONDS = 1.0  # how often a changed SGD_TOKENS_FILE is looked for, at most


class NamedToken(BaseModel):
    """One entry of SGD_TOKENS_FILE: `sgd-service token` prints one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    scopes: Annotated[tuple[Scope, ...], Field(min_length=1)]


class TokensFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: tuple[NamedToken, ...]


_FILE = TypeAdapter(TokensFile)


class TokensFileError(Exception):
    """SGD_TOKENS_FILE cannot be read or is not a tokens file; the message says why."""


def read_tokens(path: Path) -> tuple[NamedToken, ...]:
    try:
        return _FILE.validate_json(path.read_bytes()).tokens
    except OSError as exc:
        raise TokensFileError(f"cannot read {path}: {exc.strerror}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise TokensFileError(
            f"{path} is not a tokens file ({where}: {first['msg']}); see README, Security"
        ) from None


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("latin-1")).digest()


class Access:
    """The scopes a request holds, from its headers (SGD_API_TOKEN, SGD_TOKENS_FILE and
    SGD_OPEN_SCOPES); `require` raises the 401, 403 or cross-site 403 a route answers."""

    def __init__(self, settings: Settings) -> None:
        self._api_token = (
            None if settings.api_token is None else digest(settings.api_token.get_secret_value())
        )
        self._path = settings.tokens_file
        self._named: tuple[tuple[bytes, frozenset[Scope]], ...] = ()
        self._seen: tuple[int, int, int] | None = None  # the file's inode, size, mtime
        self._checked = 0.0
        self._lock = threading.Lock()
        if self._path is not None:
            self._load(first=True)
        configured = self._api_token is not None or self._path is not None
        self.open: frozenset[Scope] = (
            frozenset(settings.open_scopes) if configured else frozenset(SCOPES)
        )

    def is_open(self, scope: Scope) -> bool:
        return scope in self.open

    def require(
        self,
        scope: Scope,
        authorization: str | None,
        host: str | None = None,
        origin: str | None = None,
        fetch_site: str | None = None,
    ) -> None:
        """Raise unless a request with these headers may act in `scope`."""
        if scope in WRITES and _cross_site(host, origin, fetch_site):
            raise CrossSiteWrite(
                "a page on another site may not change this service (its Origin or "
                "Sec-Fetch-Site says so); send the request from the service's own page, or "
                "from a program (curl, a service), which sends neither header"
            )
        if scope in self.open:
            return
        held = self._scopes(authorization)
        if held is None:
            raise Unauthorized(
                f"this needs the {scope!r} scope: send 'Authorization: Bearer <token>' with "
                "SGD_API_TOKEN or a token of SGD_TOKENS_FILE that holds it"
            )
        if scope not in held:
            raise InsufficientScope(scope, held)

    def _scopes(self, authorization: str | None) -> frozenset[Scope] | None:
        """The scopes of the request's token; None without a known one."""
        kind, _, given = (authorization or "").partition(" ")
        if kind.lower() != "bearer" or not given:
            return None
        # Starlette decodes headers as latin-1: encoding again gives the bytes that were sent.
        presented = digest(given)
        held: set[Scope] = set()
        known = False
        if self._api_token is not None and hmac.compare_digest(presented, self._api_token):
            held.update(SCOPES)
            known = True
        for hashed, scopes in self._tokens():  # every hash compared: no early way out
            if hmac.compare_digest(presented, hashed):
                held.update(scopes)
                known = True
        return frozenset(held) if known else None

    def _tokens(self) -> tuple[tuple[bytes, frozenset[Scope]], ...]:
        if self._path is not None and time.monotonic() - self._checked >= RELOAD_SECONDS:
            self._load(first=False)
        return self._named

    def _load(self, first: bool) -> None:
        """Read SGD_TOKENS_FILE again if it changed. A file that turns bad keeps the tokens
        it held (logged), so that a half-written file locks nobody out and lets nobody in."""
        assert self._path is not None
        with self._lock:
            self._checked = time.monotonic()
            try:
                stat = os.stat(self._path)
            except OSError as exc:
                if first:
                    raise TokensFileError(f"cannot read {self._path}: {exc.strerror}") from None
                log.error("SGD_TOKENS_FILE %s: %s; keeping its last tokens", self._path, exc)
                return
            seen = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
            if seen == self._seen:
                return
            try:
                tokens = read_tokens(self._path)
            except TokensFileError as exc:
                if first:
                    raise
                log.error("%s; keeping its last tokens", exc)
                self._seen = seen
                return
            self._named = tuple((bytes.fromhex(t.sha256), frozenset(t.scopes)) for t in tokens)
            self._seen = seen
            if not first:
                log.info("SGD_TOKENS_FILE read again: %s", ", ".join(t.name for t in tokens))


def _cross_site(host: str | None, origin: str | None, fetch_site: str | None) -> bool:
    """Whether a browser says another site sent this request. Sec-Fetch-Site, which a page
    cannot set, decides when present; else an Origin whose host and port are not the Host's."""
    if fetch_site is not None:
        return fetch_site not in ("same-origin", "none")
    if origin is None:
        return False
    if origin == "null":  # an opaque origin: a sandboxed frame, a redirect across sites
        return True
    try:
        sent = urlsplit(origin)
        port = sent.port or {"http": 80, "https": 443}.get(sent.scheme)
        ours = urlsplit(f"//{host or ''}")
        our_port = ours.port or port
    except ValueError:
        return True
    return (sent.hostname, port) != (ours.hostname, our_port)
