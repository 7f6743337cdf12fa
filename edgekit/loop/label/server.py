"""``edgekit label``'s web server: the standard library's ThreadingHTTPServer, a page, a JSON API.

Safety (the page can change labels, so it is guarded):

* it binds to 127.0.0.1 by default; then only requests whose ``Host`` is a loopback name are
  served (a web page elsewhere cannot reach it through DNS rebinding);
* bound to any other address it needs a token: printed at start inside the URL
  (``?token=...``); the first page load with it sets a same-site cookie, API calls may also send
  it as ``X-Edgekit-Token``; a request without it gets 403;
* every POST needs ``Content-Type: application/json`` and an ``X-Edgekit: 1`` header, which a
  form or image on another site cannot send; bodies are at most 64 KiB, JSON objects only.

API (all JSON; ``user`` is the labeler's name):

==========================  =========================================================================
``GET /api/config``         classes, keys, the invalid label, the default user, lease time, filters
``POST /api/next``          ``{user, exclude?}``: the next sample (leased), or ``{"sample": null}``
``GET /api/sample?id=&user=``  one sample (leased when unlabelled and free)
``GET /api/image?id=``      the input as a PNG
``POST /api/label``         ``{user, sample_id, label, label_version}``; 409 with the reason on conflict
``POST /api/undo``          ``{user, sample_id, label_version}``: back to the label it replaced
``POST /api/skip``          ``{user, sample_id}``
``POST /api/renew``         ``{user, sample_ids}``: keep the leases of what is on screen
``POST /api/grid``          ``{user, n, predicted?}``: up to n samples at once
``POST /api/accept``        ``{user, items: [{sample_id, label, label_version}]}``
``GET /api/progress``       labelled, left, by class
``GET /api/history?limit=`` who labelled what when (newest first)
==========================  =========================================================================
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import secrets
import threading
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, Dict, Optional
from urllib.parse import parse_qs, urlsplit

from ...errors import DataError, EdgekitError, LabelConflictError, StoreError
from ..store import INVALID_LABEL
from .render import png_bytes
from .service import LabelService

__all__ = ["LabelServer", "is_loopback"]

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
COOKIE = "edgekit_label_token"
_STATIC = {"/": ("page.html", "text/html; charset=utf-8"), "/label.js": ("label.js", "text/javascript; charset=utf-8"),
           "/label.css": ("label.css", "text/css; charset=utf-8")}


def is_loopback(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ::1 (brackets allowed)."""
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The host part of a Host header (``[::1]:8765`` -> ``[::1]``, ``a:1`` -> ``a``)."""
    header = header.strip()
    if header.startswith("["):
        return header.split("]")[0] + "]"
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _static(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


class LabelServer:
    """The page and API of a :class:`LabelService` on ``host:port`` (port 0: any free port).

    ``token`` defaults to a fresh random one when ``host`` is not a loopback address (and to none
    on loopback, unless given). ``serve_forever()`` blocks; ``start()`` runs it in a thread.
    """

    def __init__(self, service: LabelService, host: str = "127.0.0.1", port: int = 8765, *,
                 token: Optional[str] = None, default_user: str = "") -> None:
        self.service = service
        self.host = host
        self.loopback = is_loopback(host)
        self.token = token if token is not None else (None if self.loopback else secrets.token_urlsafe(18))
        self.default_user = default_user
        handler = type("Handler", (_Handler,), {"app": self})
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise EdgekitError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port") from exc
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host = self.host if self.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    def serve_forever(self) -> None:
        self.httpd.serve_forever(poll_interval=0.5)

    def start(self) -> "LabelServer":
        self._thread = threading.Thread(target=self.serve_forever, name="edgekit-label", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown() if self._thread else None
        self.httpd.server_close()
        if self._thread:
            self._thread.join(timeout=10)

    def __enter__(self) -> "LabelServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def config(self) -> Dict[str, Any]:
        s = self.service
        return {"classes": list(s.classes), "invalid_label": INVALID_LABEL, "user": self.default_user,
                "lease_seconds": s.lease_seconds, "filters": s.filters, "order": s.order_name,
                "store": s.store.url}


class _HttpError(Exception):
    def __init__(self, status: int, message: str, extra: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(message)
        self.status, self.extra = status, extra or {}


class _Handler(BaseHTTPRequestHandler):
    app: LabelServer
    server_version = "edgekit-label"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet: the terminal is the labeler's
        log.debug("%s %s", self.address_string(), fmt % args)

    # -- guard -----------------------------------------------------------
    def _guard(self) -> bool:
        """True when the request may go on (an error was sent otherwise); also sets the cookie flag."""
        app = self.app
        host = _host_name(self.headers.get("Host") or "")
        if app.loopback and not is_loopback(host):
            self._send_json(HTTPStatus.FORBIDDEN, {"error": f"Host {host!r} is not this machine; open {app.url}"})
            return False
        self._set_cookie = False
        if app.token is None:
            return True
        offered = self.headers.get("X-Edgekit-Token") or (parse_qs(urlsplit(self.path).query).get("token") or [""])[0]
        if offered and hmac.compare_digest(offered, app.token):
            self._set_cookie = True
            return True
        cookie = SimpleCookie(self.headers.get("Cookie") or "")
        if COOKIE in cookie and hmac.compare_digest(cookie[COOKIE].value, app.token):
            return True
        self._send_json(HTTPStatus.FORBIDDEN, {"error": "this labeling page needs its token: open the URL "
                                                        "`edgekit label` printed (it ends in ?token=...)"})
        return False

    # -- plumbing --------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str, extra_headers: Optional[Dict[str, str]] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                                    "script-src 'self'; frame-ancestors 'none'")
        if getattr(self, "_set_cookie", False) and self.app.token:
            self.send_header("Set-Cookie", f"{COOKIE}={self.app.token}; Path=/; HttpOnly; SameSite=Strict")
        for k, v in (extra_headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, doc: Any) -> None:
        self._send(status, json.dumps(doc).encode("utf-8"), "application/json")

    def _body(self) -> Dict[str, Any]:
        if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json" \
                or self.headers.get("X-Edgekit") != "1":
            raise _HttpError(HTTPStatus.FORBIDDEN, "POST needs Content-Type: application/json and X-Edgekit: 1")
        try:
            length = int(self.headers.get("Content-Length") or "0")
        except ValueError:
            raise _HttpError(HTTPStatus.BAD_REQUEST, "Content-Length is not a number") from None
        if not 0 <= length <= MAX_BODY:
            raise _HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes; at most {MAX_BODY}")
        raw = self.rfile.read(length)
        try:
            doc = json.loads(raw.decode("utf-8")) if raw else {}
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _HttpError(HTTPStatus.BAD_REQUEST, f"body is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise _HttpError(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
        return doc

    def _run(self, fn: Any) -> None:
        try:
            result = fn()
        except _HttpError as exc:
            self._send_json(exc.status, {"error": str(exc), **exc.extra})
        except LabelConflictError as exc:
            self._send_json(HTTPStatus.CONFLICT, {"error": str(exc), "current": exc.current})
        except StoreError as exc:
            status = HTTPStatus.NOT_FOUND if "not in the store" in str(exc) else HTTPStatus.SERVICE_UNAVAILABLE
            self._send_json(status, {"error": str(exc)})
        except (DataError, EdgekitError) as exc:
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        except Exception as exc:  # noqa: BLE001 - one request must never end the server
            log.exception("label server: %s %s failed", self.command, self.path)
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {exc}"})
        else:
            if isinstance(result, tuple):
                self._send(HTTPStatus.OK, result[0], result[1])
            else:
                self._send_json(HTTPStatus.OK, result)

    # -- routes ----------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if not self._guard():
            return
        parts = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(parts.query).items()}
        svc = self.app.service
        if parts.path in _STATIC:
            name, ctype = _STATIC[parts.path]
            self._run(lambda: (_static(name), ctype))
            return
        routes = {
            "/api/config": lambda: self.app.config(),
            "/api/progress": svc.progress,
            "/api/history": lambda: {"events": svc.history(_int(q.get("limit", "50"), "limit"))},
            "/api/sample": lambda: {"sample": svc.open(q.get("user", ""), _need(q, "id"))},
            "/api/image": lambda: (png_bytes(svc.store.get_sample(_need(q, "id"))), "image/png"),
        }
        if parts.path == "/favicon.ico":
            self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
            return
        if parts.path not in routes:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no such page {parts.path}"})
            return
        self._run(routes[parts.path])

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        if not self._guard():
            return
        svc = self.app.service
        path = urlsplit(self.path).path

        def route() -> Any:
            b = self._body()
            user = b.get("user", "")
            if path == "/api/next":
                ex = b.get("exclude") or []
                if not isinstance(ex, list) or len(ex) > 1000:
                    raise _HttpError(HTTPStatus.BAD_REQUEST, "exclude must be a list of at most 1000 ids")
                return {"sample": svc.next(user, exclude=[str(x) for x in ex]), "progress": svc.progress()}
            if path == "/api/label":
                saved = svc.save(user, _str(b, "sample_id"), b.get("label"), b.get("label_version"))
                return {"saved": saved, "progress": svc.progress()}
            if path == "/api/undo":
                return {"sample": svc.undo(user, _str(b, "sample_id"), b.get("label_version")),
                        "progress": svc.progress()}
            if path == "/api/skip":
                svc.skip(user, _str(b, "sample_id"))
                return {"ok": True}
            if path == "/api/renew":
                ids = b.get("sample_ids") or []
                if not isinstance(ids, list) or len(ids) > 500:
                    raise _HttpError(HTTPStatus.BAD_REQUEST, "sample_ids must be a list of at most 500 ids")
                return {"held": svc.renew(user, [str(x) for x in ids])}
            if path == "/api/grid":
                pred, ex = b.get("predicted"), b.get("exclude") or []
                if not isinstance(ex, list) or len(ex) > 1000:
                    raise _HttpError(HTTPStatus.BAD_REQUEST, "exclude must be a list of at most 1000 ids")
                return {"samples": svc.grid(user, b.get("n", 36), pred if pred not in ("", None) else None,
                                            exclude=[str(x) for x in ex])}
            if path == "/api/accept":
                items = b.get("items") or []
                if not isinstance(items, list) or len(items) > 500 or not all(isinstance(i, dict) for i in items):
                    raise _HttpError(HTTPStatus.BAD_REQUEST, "items must be a list of at most 500 objects")
                return {**svc.accept(user, items), "progress": svc.progress()}
            raise _HttpError(HTTPStatus.NOT_FOUND, f"no such action {path}")

        self._run(route)


def _need(q: Dict[str, str], key: str) -> str:
    v = q.get(key, "")
    if not v or len(v) > 200:
        raise _HttpError(HTTPStatus.BAD_REQUEST, f"query parameter {key!r} is missing or too long")
    return v


def _str(b: Dict[str, Any], key: str) -> str:
    v = b.get(key)
    if not isinstance(v, str) or not v or len(v) > 200:
        raise _HttpError(HTTPStatus.BAD_REQUEST, f"{key!r} must be a non-empty string of at most 200 characters")
    return v


def _int(v: str, key: str) -> int:
    try:
        return int(v)
    except ValueError:
        raise _HttpError(HTTPStatus.BAD_REQUEST, f"{key}={v!r} is not a number") from None
