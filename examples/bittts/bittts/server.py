"""`bittts serve`: a small HTTP server that speaks text with one model loaded once.

    GET  /health       200, JSON {"status": "ok", "model": ..., "sample_rate": ..., "busy": ...}
    POST /synthesize   body: UTF-8 text, or JSON {"text": ..., "duration_scale": 1.0}
                       (Content-Type: application/json); 200 audio/wav, a mono 16-bit WAV

Built on the standard library's `http.server.ThreadingHTTPServer`: a text-to-speech endpoint needs no routing
or async framework, and no web library is a dependency of bittts (the one in a training environment,
werkzeug, comes with TensorBoard, which a synthesis-only install does not have). What a request may cost is
bounded: its body (`MAX_REQUEST_BYTES`, refused with 413 before it is read), the syntheses that run at once (one
by default: a request that finds every slot taken gets 503 with Retry-After at once, instead of queueing
without bound), the socket's idle time, and the memory of a response (spooled to a temporary file, sentence by
sentence, like `bittts synthesize`). Errors are one line of plain text with a 4xx status (5xx for a bug).
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .limits import MAX_DURATION_SCALE, MAX_REQUEST_BYTES
from .speech import speak, split_sentences, spooled_wav

__all__ = ["SpeechServer"]

_DRAIN_BYTES = 1 << 20  # an oversized body up to this size is read and dropped, so the client sees the 413


class _RequestError(Exception):
    """A request refused with `status` and a one-line message."""

    def __init__(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers or {}


class SpeechServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer around one `bittts.inference.Synthesizer`; `jobs` syntheses run at once."""

    # Request threads are joined, not daemons: a thread still running when the interpreter exits is killed at
    # its next GIL acquisition, and inside torch (an op returning, a tensor freed: the last reference to the model
    # can be a request thread's) that kill is std::terminate, SIGABRT. `server_close` wakes open connections first.
    daemon_threads = False

    def __init__(self, address: tuple[str, int], synth: Any, max_bytes: int = MAX_REQUEST_BYTES, jobs: int = 1,
                 quiet: bool = False) -> None:
        if not 1 <= max_bytes <= MAX_REQUEST_BYTES:
            raise ValueError(f"--max-bytes {max_bytes}: expected 1 to {MAX_REQUEST_BYTES:,}")
        if jobs < 1:
            raise ValueError(f"--jobs {jobs}: expected at least 1")
        self.synth, self.max_bytes, self.quiet = synth, max_bytes, quiet
        self.slots = threading.BoundedSemaphore(jobs)
        self.busy = 0  # syntheses running (for /health), changed under `_busy_lock`
        self._busy_lock = threading.Lock()
        self._open: set[socket.socket] = set()  # accepted connections not yet closed, under `_open_lock`
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:  # forgotten before it is closed, so `server_close` never touches a closed socket
            self._open.discard(request)
        super().shutdown_request(request)

    def server_close(self) -> None:
        """Stop listening, end the reading side of every open connection (a client still sending its request
        is let go at once; a synthesis under way finishes and is answered; a client that stops reading its
        answer is dropped after the 30 s stall limit), and wait for the request threads, so none is left to run
        torch code while the interpreter shuts down."""
        with self._open_lock:
            for conn in self._open:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RD)
        super().server_close()  # closes the listening socket, then joins every request thread

    def count_busy(self, change: int) -> None:
        with self._busy_lock:
            self.busy += change

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: SpeechServer
    timeout = 30  # seconds a client may stall mid-request before its socket is closed
    server_version = "bittts"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._handle({"/health": self._health}, "GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle({"/synthesize": self._synthesize}, "POST")

    def _handle(self, routes: dict[str, Any], method: str) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path not in routes:
                other = {"/health": "GET", "/synthesize": "POST"}.get(path)
                if other is None:
                    raise _RequestError(HTTPStatus.NOT_FOUND, f"no such endpoint {path[:100]!r}: use GET /health "
                                                              "or POST /synthesize")
                raise _RequestError(HTTPStatus.METHOD_NOT_ALLOWED, f"{path} takes {other}, not {method}",
                                    {"Allow": other})
            routes[path]()
        except _RequestError as e:
            self._reply(e.status, (str(e) + "\n").encode(), "text/plain; charset=utf-8", e.headers)
        except (ConnectionError, TimeoutError):  # the client went away or stalled: nobody to answer
            self.close_connection = True
        except Exception as e:  # a bug: one line to the client, the details in the log
            self.log_error("internal error: %r", e)
            self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(e).__name__}\n".encode(),
                        "text/plain; charset=utf-8")

    def _reply(self, status: HTTPStatus, body: bytes, content_type: str,
               headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _health(self) -> None:
        synth = self.server.synth
        body = {"status": "ok", "model": synth.path.name, "sample_rate": synth.sample_rate,
                "busy": self.server.busy}
        self._reply(HTTPStatus.OK, json.dumps(body).encode() + b"\n", "application/json")

    def _body(self) -> bytes:
        """The request body, if its Content-Length is given and within the server's bound."""
        length = self.headers.get("Content-Length")
        if length is None:
            raise _RequestError(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
        if not length.strip().isdigit():
            raise _RequestError(HTTPStatus.BAD_REQUEST, f"Content-Length {length[:40]!r} is not a byte count")
        size = int(length)
        if size > self.server.max_bytes:
            if size <= _DRAIN_BYTES:
                self.rfile.read(size)
            self.close_connection = True
            raise _RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                f"the text has {size:,} bytes, more than the {self.server.max_bytes:,} this server "
                                "speaks in one request: send it in parts")
        body = self.rfile.read(size)
        if len(body) < size:
            raise _RequestError(HTTPStatus.BAD_REQUEST, f"the body ended after {len(body)} of {size} bytes")
        return body

    def _text(self) -> tuple[str, float]:
        """The text and duration scale of a request: a JSON object or plain UTF-8 text."""
        body = self._body()
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _RequestError(HTTPStatus.BAD_REQUEST, f"the body is not UTF-8 text (byte {e.start})") from None
        scale: Any = 1.0
        if self.headers.get("Content-Type", "").split(";")[0].strip().lower() == "application/json":
            try:
                request = json.loads(text)
            except json.JSONDecodeError as e:
                raise _RequestError(HTTPStatus.BAD_REQUEST, f"invalid JSON: {e}") from None
            if not isinstance(request, dict) or not isinstance(request.get("text"), str):
                raise _RequestError(HTTPStatus.BAD_REQUEST, 'expected a JSON object {"text": "..."}')
            text, scale = request["text"], request.get("duration_scale", 1.0)
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or \
                    not 0 < scale <= MAX_DURATION_SCALE:
                raise _RequestError(HTTPStatus.BAD_REQUEST, f"duration_scale {scale!r:.40}: expected a number in "
                                                            f"(0, {MAX_DURATION_SCALE:g}]")
        if not text.strip():
            raise _RequestError(HTTPStatus.BAD_REQUEST, "the text is empty: send the text to speak")
        return text, float(scale)

    def _synthesize(self) -> None:
        text, scale = self._text()
        if not self.server.slots.acquire(blocking=False):
            raise _RequestError(HTTPStatus.SERVICE_UNAVAILABLE, "busy: every synthesis slot is taken; retry "
                                                                "shortly", {"Retry-After": "1"})
        self.server.count_busy(+1)
        synth = self.server.synth
        start = time.perf_counter()
        with contextlib.ExitStack() as spool:
            try:
                wav, size = spool.enter_context(spooled_wav(speak(synth, split_sentences(text), scale),
                                                            synth.sample_rate))
            except ValueError as e:  # nothing in the text could be spoken
                raise _RequestError(HTTPStatus.BAD_REQUEST, " ".join(str(e).split())) from None
            finally:  # the slot bounds the synthesis; sending the spooled WAV needs none
                self.server.count_busy(-1)
                self.server.slots.release()
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "audio/wav")
            self.send_header("Content-Length", str(size))
            self.send_header("X-Synthesis-Seconds", f"{time.perf_counter() - start:.3f}")
            self.end_headers()
            shutil.copyfileobj(wav, self.wfile)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        if not self.server.quiet:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")
