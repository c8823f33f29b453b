"""A fault-injecting S3 endpoint: moto's own WSGI app behind a middleware that fails chosen requests.

moto keeps its buckets in process-global backends, so this endpoint and the conftest's ``s3_endpoint``
serve the same data: write through the faulty endpoint, inspect through the clean one. Every request
is recorded (operation, key, Range header, what was done to it), so tests can also count requests.

Faults are rules: an S3 operation (``"UploadPart"``, ``"PutObject"``, ``"*"`` ...), an optional key
fragment, an action and how many times it fires (``None``: until cleared)::

    with FaultyS3() as s3:
        s3.fail("UploadPart", "503", times=2)   # the next two part uploads get 503 SlowDown
        s3.fail("*", "reset", key="model_")     # every request on a model_* key: connection dropped

Actions: ``"500"`` (InternalError), ``"503"`` (SlowDown), ``"403"`` (AccessDenied), ``"404"``
(NoSuchBucket), ``"reset"`` (the connection is dropped before any response: the client sees
"connection closed" or "reset by peer", as when a server crashes or a middlebox cuts it), and
``"hold"``: the request waits, unserved, until :meth:`FaultyS3.release` (or :meth:`~FaultyS3.close`),
then moto serves it; so a test can act (say, SIGKILL the writer) while an upload is mid-flight::

    s3.fail("UploadPart", "hold", times=1)
    ...start the save...
    assert s3.wait_for("UploadPart")            # the held part arrived (a Condition, no polling)
    ...kill the writer, then...
    s3.release()

:meth:`~FaultyS3.wait_for` waits until ``n`` requests of an operation were received (returns False on
its timeout); :meth:`~FaultyS3.max_in_flight` is the most requests of an operation the endpoint was
handling at once (from arrival until the response was sent), to check that a client really sends in
parallel.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

__all__ = ("ACTIONS", "FaultyS3", "Seen", "s3_operation")

StartResponse = Callable[[str, list[tuple[str, str]]], Any]

_ERRORS = {
    "500": ("500 Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
    "503": ("503 Slow Down", "SlowDown", "Please reduce your request rate."),
    "403": ("403 Forbidden", "AccessDenied", "Access Denied"),
    "404": ("404 Not Found", "NoSuchBucket", "The specified bucket does not exist"),
}
ACTIONS = (*_ERRORS, "reset", "hold")


def s3_operation(method: str, path: str, query: str, headers: dict[str, str]) -> str:
    """The S3 API operation a path-style request is, from its method, path and query string."""
    params = parse_qs(query, keep_blank_values=True)
    has_key = "/" in path.strip("/")
    if method == "PUT":
        if "partNumber" in params:
            return "UploadPart"
        if not has_key:
            return "CreateBucket"
        return "CopyObject" if "x-amz-copy-source" in headers else "PutObject"
    if method == "POST":
        if "uploads" in params:
            return "CreateMultipartUpload"
        if "uploadId" in params:
            return "CompleteMultipartUpload"
        return "DeleteObjects" if "delete" in params else "Post"
    if method == "DELETE":
        if "uploadId" in params:
            return "AbortMultipartUpload"
        return "DeleteObject" if has_key else "DeleteBucket"
    if method == "HEAD":
        return "HeadObject" if has_key else "HeadBucket"
    if has_key:
        return "ListParts" if "uploadId" in params else "GetObject"
    if "uploads" in params:
        return "ListMultipartUploads"
    return "ListObjectsV2" if "list-type" in params else "ListObjects" if path.strip("/") else "ListBuckets"


@dataclass(frozen=True, slots=True)
class Seen:
    """One request the endpoint received.

    Attributes:
        op: The S3 operation (see :func:`s3_operation`).
        key: ``bucket/key`` (unquoted), or the bucket alone.
        range: The Range header of a GetObject, if any.
        fault: The action taken instead of serving it, or None when moto served it.
    """

    op: str
    key: str
    range: str | None
    fault: str | None


@dataclass
class _Rule:
    op: str
    action: str
    times: int | None
    key: str

    def matches(self, op: str, key: str) -> bool:
        return (self.op in {"*", op}) and self.key in key and (self.times is None or self.times > 0)


class FaultyS3:
    """An S3 endpoint on 127.0.0.1 serving moto's state, failing the requests its rules select.

    Needs moto's credentials and region in the environment (the conftest's ``s3_endpoint`` sets them).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a request arrived, or held ones were released
        self._rules: list[_Rule] = []
        self._seen: list[Seen] = []
        self._releases = 0  # how many times release() was called: a held request waits for the next
        self._release_action: str | None = None  # what the last release() made of the held requests
        self._closing = False
        self._in_flight: dict[str, int] = {}
        self._max_in_flight: dict[str, int] = {}
        self._app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server("127.0.0.1", 0, self, threaded=True, request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-s3", daemon=True)
        self._thread.start()
        host, port = self._server.server_address[:2]
        self.endpoint = f"http://{host!s}:{port}"

    # ---- configuration -------------------------------------------------------------------
    def fail(self, op: str, action: str, *, times: int | None = None, key: str = "") -> None:
        """Answer the next ``times`` requests of ``op`` on keys containing ``key`` with ``action``."""
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
        with self._lock:
            self._rules.append(_Rule(op=op, action=action, times=times, key=key))

    def clear(self) -> None:
        """Remove every rule and forget the recorded requests (and the in-flight maxima)."""
        with self._lock:
            self._rules.clear()
            self._seen.clear()
            self._max_in_flight = dict(self._in_flight)

    def release(self, action: str | None = None) -> None:
        """Let every request held so far go on to moto, or answer them with ``action`` ("reset": dropped,
        as a killed client's half-sent request is); later matching ones are held again."""
        if action is not None and action not in ACTIONS[:-1]:
            raise ValueError(f"action must be None or one of {ACTIONS[:-1]}, got {action!r}")
        with self._changed:
            self._release_action = action
            self._releases += 1
            self._changed.notify_all()

    def wait_for(self, op: str, n: int = 1, timeout: float = 10.0, *, key: str = "") -> bool:
        """Wait until ``n`` requests of ``op`` (``"*"``: any) on keys containing ``key`` were received.

        Counts since the last :meth:`clear`; returns False when ``timeout`` seconds pass first.
        """
        with self._changed:
            return self._changed.wait_for(
                lambda: sum(1 for s in self._seen if op in {"*", s.op} and key in s.key) >= n, timeout=timeout
            )

    # ---- inspection ----------------------------------------------------------------------
    @property
    def seen(self) -> list[Seen]:
        """Every request received since the last :meth:`clear`, in order."""
        with self._lock:
            return list(self._seen)

    def count(self, ops: str | Iterable[str] = "*", *, faulted: bool | None = None, key: str = "") -> int:
        """How many requests of ``ops`` (on keys containing ``key``) were received, faulted or served."""
        wanted = {ops} if isinstance(ops, str) else set(ops)
        return sum(
            1
            for s in self.seen
            if ("*" in wanted or s.op in wanted)
            and key in s.key
            and (faulted is None or (s.fault is not None) == faulted)
        )

    def max_in_flight(self, op: str) -> int:
        """The most requests of ``op`` handled at once since :meth:`clear` (arrival to response sent)."""
        with self._lock:
            return self._max_in_flight.get(op, 0)

    # ---- the WSGI side -------------------------------------------------------------------
    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        path = unquote(environ.get("PATH_INFO", ""))
        headers = {k[5:].replace("_", "-").lower(): str(v) for k, v in environ.items() if k.startswith("HTTP_")}
        op = s3_operation(method, path, environ.get("QUERY_STRING", ""), headers)
        key = path.strip("/")
        with self._changed:
            rule = next((r for r in self._rules if r.matches(op, key)), None)
            if rule is not None and rule.times is not None:
                rule.times -= 1
            action = rule.action if rule else None
            self._seen.append(Seen(op=op, key=key, range=headers.get("range"), fault=action))
            self._in_flight[op] = self._in_flight.get(op, 0) + 1
            self._max_in_flight[op] = max(self._max_in_flight.get(op, 0), self._in_flight[op])
            self._changed.notify_all()
            if action == "hold":
                releases = self._releases
                self._changed.wait_for(lambda: self._releases != releases or self._closing)
                action = None if self._closing else self._release_action
        try:
            return _Tracked(self._respond(action, environ, start_response, method, key), lambda: self._done(op))
        except BaseException:
            self._done(op)
            raise

    def _done(self, op: str) -> None:
        with self._lock:
            self._in_flight[op] -= 1

    def _respond(
        self, action: str | None, environ: dict[str, Any], start_response: StartResponse, method: str, key: str
    ) -> Iterable[bytes]:
        if action is None:
            result: Iterable[bytes] = self._app(environ, start_response)
            return result
        _drain(environ)
        if action == "reset":
            return _reset(environ, start_response)
        status, code, message = _ERRORS[action]
        body = (
            b'<?xml version="1.0" encoding="UTF-8"?>\n'
            + f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<Resource>/{key}</Resource><RequestId>faulty-s3</RequestId></Error>".encode()
        )
        start_response(status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
        return [b""] if method == "HEAD" else [body]

    # ---- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        """Release every held request, then stop serving."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> FaultyS3:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class _Tracked:
    """A WSGI response body that reports when the server is done sending it (its ``close``)."""

    def __init__(self, body: Iterable[bytes], done: Callable[[], None]) -> None:
        self._body = body
        self._done: Callable[[], None] | None = done

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            done, self._done = self._done, None
            if done is not None:
                done()


def _drain(environ: dict[str, Any]) -> None:
    """Read the request body, so the connection is in a known state (and the client done sending)."""
    stream = environ["wsgi.input"]
    if environ.get("wsgi.input_terminated"):
        while stream.read(1 << 20):
            pass
        return
    left = int(environ.get("CONTENT_LENGTH") or 0)
    while left > 0:
        chunk = stream.read(min(left, 1 << 20))
        if not chunk:
            break
        left -= len(chunk)


def _reset(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """Drop the connection with no response, as a crashed server or a middlebox would."""
    sock: socket.socket = environ["werkzeug.socket"]
    # SO_LINGER with a zero timeout makes the final close send RST rather than wait to flush.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.shutdown(socket.SHUT_RDWR)
    # werkzeug's attempt to send this response then fails quietly on the dead socket.
    start_response("500 Connection Reset", [("Content-Length", "0")])
    return [b""]
