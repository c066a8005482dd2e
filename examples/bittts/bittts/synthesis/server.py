"""`bittts serve`: a small HTTP server that speaks text with one model loaded once.

    GET  /health       200, JSON {"status": "ok", "model": ..., "sample_rate": ..., "busy": ...}
    POST /synthesize   body: UTF-8 text, or JSON {"text": ..., "duration_scale": 1.0}
                       (Content-Type: application/json); 200 audio/wav, a mono 16-bit WAV

One thread runs a `selectors` loop that reads every request, answers `/health` and every refusal, and writes every
WAV; a synthesis runs in a thread of its own, at most `jobs` at once. So a connection costs a socket and its
buffers, never a thread, and slow clients cannot exhaust threads or open files (the load test,
tests/test_bittts_serve_load.py, holds the process to its bounds under more slow connections than
`MAX_CONNECTIONS`). No web library is a dependency: one request per connection and two routes are a few hundred
lines of the standard library, while a server that bounds connections and deadlines itself (waitress) would still
need the bounds on phonemes and audio, the cancellation of a synthesis whose client has left, and its answers made
one line (its errors are HTML), in every synthesis-only install; werkzeug, the only web library of a training
environment, comes with TensorBoard.

What a request may cost is bounded (`bittts.limits`): the connections open at once (`MAX_CONNECTIONS`, below
the open-files limit; when full, the connection that has been reading its request longest is closed), the
request line and headers (`MAX_HEADER_BYTES`, 431) and body (`--max-bytes`, 413 before it is read), the time for
the whole request to arrive (`READ_SECONDS`, total, 408) and for the whole exchange (`REQUEST_SECONDS`: the
synthesis stops, 503), the syntheses at once (`jobs`: beyond them 503 with Retry-After at once, no queue), the
phonemes and seconds of audio of a request and of each sentence (413), and the memory of an answer (spooled to a
temporary file sentence by sentence, like `bittts synthesize`). A synthesis whose client has gone (its socket
reads end-of-file or fails) stops before its next sentence. Every answer closes its connection. Errors are one
line of plain text with a 4xx status (5xx for a bug or an overrun deadline); the request log escapes control
characters, so a request cannot write terminal escapes or forged lines to the log.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import json
import math
import re
import selectors
import socket
import sys
import tempfile
import threading
import time
from email.utils import formatdate
from http import HTTPStatus
from typing import IO, Any

from .. import limits
from ..limits import MAX_DURATION_SCALE, MAX_REQUEST_BYTES, LimitError
from .long_text import count_phonemes, speak, split_sentences, wav_header

__all__ = ["SpeechServer", "printable"]

ROUTES = {"/health": "GET", "/synthesize": "POST"}
_CHUNK = 1 << 16  # bytes read or sent at a time
_MAX_HEADERS = 100  # header lines of one request (http.client's bound)
_LINGER_BYTES = 1 << 20  # after a refused body, up to this much is read and dropped, so the client sees the answer
_LINGER_SECONDS = 2.0
_RESERVED_FILES = 64  # open files kept free of connections (model, spools, espeak-ng pipes, the log)
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def printable(text: str) -> str:
    """`text` with every control or other non-printable character escaped (ESC -> \\x1b, CR -> \\r): what goes
    into one log line, so a request can neither move the terminal nor start a forged line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class _RequestError(Exception):
    """A request refused with `status` and a one-line message."""

    def __init__(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers or {}


def _input_waiting(sock: socket.socket) -> bool:
    """Whether bytes from the client wait in `sock` (an end of stream does not count)."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:  # nothing yet (EAGAIN), or a broken connection: evictable either way
        return False


class _Connection:
    """One client connection: reading its request, then working (a synthesis runs for it), then writing the
    answer (then, after a refused body, lingering: reading what it still sends, so it sees the answer)."""

    def __init__(self, sock: socket.socket, address: Any, now: float) -> None:
        self.sock, self.host, self.started = sock, str(address[0]) if address else "-", now
        self.state = "reading"
        self.inbuf = bytearray()
        self.method = self.request_line = ""
        self.length: int | None = None  # the body's length, once the headers are read
        self.headers: dict[str, list[str]] = {}
        self.out = bytearray()
        self.spool: IO[bytes] | None = None  # the answer's body, streamed from a temporary file
        self.linger = False  # linger after the answer (a request refused before its body was read)
        self.linger_until = 0.0
        self.dropped = 0  # bytes read and dropped while lingering
        self.gone = threading.Event()  # the client left or the deadline passed: its synthesis stops
        self.timed_out = False
        self.closed = False


class SpeechServer:
    """An HTTP server around one `bittts.synthesis.voice.Voice` (torch or ONNX); `jobs` syntheses run at once.

    `serve_forever()` runs it in the calling thread until `shutdown()` (from another thread) or Ctrl-C;
    `server_close()` (or leaving a `with` block) closes every connection and stops the syntheses."""

    def __init__(self, address: tuple[str, int], synth: Any, max_bytes: int = MAX_REQUEST_BYTES, jobs: int = 1,
                 quiet: bool = False, *, max_connections: int = limits.MAX_CONNECTIONS,
                 read_seconds: float = limits.READ_SECONDS, request_seconds: float = limits.REQUEST_SECONDS) -> None:
        if not 1 <= max_bytes <= MAX_REQUEST_BYTES:
            raise ValueError(f"--max-bytes {max_bytes}: expected 1 to {MAX_REQUEST_BYTES:,}")
        if jobs < 1:
            raise ValueError(f"--jobs {jobs}: expected at least 1")
        if not 1 <= max_connections <= limits.MAX_CONNECTIONS:
            raise ValueError(f"max_connections {max_connections}: expected 1 to {limits.MAX_CONNECTIONS}")
        self.synth, self.max_bytes, self.quiet = synth, max_bytes, quiet
        self.read_seconds, self.request_seconds = float(read_seconds), float(request_seconds)
        self.max_connections = min(max_connections, _open_files_room())
        self.slots = threading.BoundedSemaphore(jobs)
        self.busy = 0  # syntheses running (for /health), changed under `_busy_lock`
        self._busy_lock = threading.Lock()
        host = address[0]
        self.socket = socket.create_server(address, family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                           backlog=128)
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.socket, selectors.EVENT_READ, "listen")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._listening, self._resume_at = True, 0.0
        self._conns: set[_Connection] = set()
        self._done: collections.deque[tuple[_Connection, Any]] = collections.deque()  # from the synthesis threads
        self._workers: set[threading.Thread] = set()
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()

    # ------------------------------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def count_busy(self, change: int) -> None:
        with self._busy_lock:
            self.busy += change

    def __enter__(self) -> SpeechServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server_close()

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until `shutdown()`."""
        self._stopped.clear()
        try:
            while not self._stop.is_set():
                for key, events in self._selector.select(poll_interval):
                    if key.data == "listen":
                        self._accept()
                    elif key.data == "wake":
                        with contextlib.suppress(OSError):
                            while self._wake_r.recv(4096):
                                pass
                    else:
                        self._guarded(key.data, self._on_event, key.data, events)
                while self._done:
                    conn, result = self._done.popleft()
                    self._guarded(conn, self._finish, conn, result)
                self._sweep(time.monotonic())
        finally:
            self._stop.clear()
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop `serve_forever` (running in another thread) and wait for it."""
        self._stop.set()
        self._wake()
        self._stopped.wait()

    def server_close(self) -> None:
        """Close every connection and the listening socket; stop the syntheses and wait for them."""
        for conn in list(self._conns):
            conn.gone.set()
            self._close(conn)
        for worker in list(self._workers):
            worker.join(timeout=60)  # a synthesis stops before its next sentence
        while self._done:
            self._discard(self._done.popleft()[1])
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.close()
        for sock in (self.socket, self._wake_r, self._wake_w):
            sock.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    # ------------------------------------------------------------------------------------------ connections

    def _accept(self) -> None:
        for _ in range(64):  # at most this many per turn of the loop: the others are served meanwhile
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # out of files: make room, else stop accepting for a moment instead of spinning on accept()
                    if not self._evict():
                        self._pause_accepting(time.monotonic() + 0.1)
                    return
                continue  # the client gave up before accept (ECONNABORTED): nothing to answer
            if len(self._conns) >= self.max_connections and not self._evict():
                sock.close()  # every connection is being answered: this one waits for none of them
                continue
            sock.setblocking(False)
            conn = _Connection(sock, address, time.monotonic())
            self._conns.add(conn)
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _evict(self) -> bool:
        """Close a connection that only reads: one lingering after its answer, else the one that has been reading
        its request longest (a slow or idle client) among those with nothing waiting to be read (a request that
        has arrived but not been read yet is about to be answered, however long ago it connected). False if
        there is none."""
        for state in ("lingering", "reading"):
            readers = [c for c in self._conns if c.state == state]
            if state == "reading":
                readers = [c for c in readers if not _input_waiting(c.sock)] or readers
            if readers:
                self._close(min(readers, key=lambda c: c.started))
                return True
        return False

    def _pause_accepting(self, until: float) -> None:
        if self._listening:
            self._selector.unregister(self.socket)
            self._listening, self._resume_at = False, until

    def _close(self, conn: _Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.discard(conn)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(conn.sock)
        conn.sock.close()
        if conn.spool is not None:
            conn.spool.close()
            conn.spool = None

    def _watch(self, conn: _Connection, events: int) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.modify(conn.sock, events, conn)

    def _sweep(self, now: float) -> None:
        """Deadlines: a request that has not arrived in `read_seconds` gets 408; past `request_seconds` a
        synthesis stops (503 when it does) and an answer still being sent is cut off."""
        if not self._listening and now >= self._resume_at:
            self._selector.register(self.socket, selectors.EVENT_READ, "listen")
            self._listening = True
        for conn in list(self._conns):
            age = now - conn.started
            if conn.state == "reading" and age > self.read_seconds:
                self._reply(conn, HTTPStatus.REQUEST_TIMEOUT, f"the request did not arrive within "
                                                              f"{self.read_seconds:g} s: send it at once")
            elif conn.state == "working" and age > self.request_seconds and not conn.gone.is_set():
                conn.timed_out = True
                conn.gone.set()
            elif conn.state in ("writing", "lingering") and (
                    age > self.request_seconds or conn.state == "lingering" and now > conn.linger_until):
                self._close(conn)

    def _guarded(self, conn: _Connection, handler: Any, *args: Any) -> None:
        """`handler(*args)`; a bug in it is logged and closes `conn` (answered 500 if nothing was sent yet),
        instead of ending the loop that serves every other connection."""
        try:
            handler(*args)
        except Exception as e:
            self._log(f"{conn.host} - internal error: {e!r}")
            if conn.state in ("reading", "working") and not conn.closed:
                with contextlib.suppress(Exception):
                    self._reply(conn, HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(e).__name__}")
                    return
            self._close(conn)

    def _on_event(self, conn: _Connection, events: int) -> None:
        if events & selectors.EVENT_READ and not conn.closed:
            self._on_readable(conn)
        if events & selectors.EVENT_WRITE and not conn.closed:
            self._send(conn)

    def _on_readable(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset by the client
            data = b""
        if conn.state == "reading":
            if not data:
                self._close(conn)
                return
            conn.inbuf += data
            try:
                self._read_request(conn)
            except _RequestError as e:
                self._reply(conn, e.status, str(e), e.headers)
        elif conn.state == "working":
            if not data:  # the client has gone (or shut its side): stop the synthesis, answer nobody
                conn.gone.set()
                self._unwatch(conn)
        elif conn.state == "lingering":
            conn.dropped += len(data)
            if not data or conn.dropped > _LINGER_BYTES:
                self._close(conn)

    def _unwatch(self, conn: _Connection) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)

    # ------------------------------------------------------------------------------------------ requests

    def _read_request(self, conn: _Connection) -> None:
        if conn.length is None:
            match = _HEADER_END.search(conn.inbuf, 0, limits.MAX_HEADER_BYTES + 4)
            if match is None:
                if len(conn.inbuf) > limits.MAX_HEADER_BYTES:
                    raise _RequestError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"the request line and headers "
                                        f"exceed {limits.MAX_HEADER_BYTES:,} bytes")
                return
            head = bytes(conn.inbuf[:match.start()]).decode("latin-1")
            del conn.inbuf[:match.end()]
            self._parse_head(conn, head)
        if len(conn.inbuf) >= conn.length:
            self._dispatch(conn, bytes(conn.inbuf[:conn.length]))

    def _parse_head(self, conn: _Connection, head: str) -> None:
        """The request line and headers: the route, the method and the body's length, else `_RequestError`."""
        lines = head.lstrip("\r\n").split("\n")
        conn.request_line = lines[0].rstrip("\r")
        parts = conn.request_line.split(" ")
        if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]):
            conn.length = 0
            raise _RequestError(HTTPStatus.BAD_REQUEST, "malformed request line: expected METHOD PATH HTTP/1.1")
        conn.method, target, version = parts
        conn.length = 0
        if not re.fullmatch(r"HTTP/1\.[0-9]", version):
            raise _RequestError(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED,
                                f"HTTP version {printable(version[:20])!r} is not supported: use HTTP/1.1")
        if len(lines) - 1 > _MAX_HEADERS:
            raise _RequestError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"more than {_MAX_HEADERS} headers")
        for line in lines[1:]:
            name, colon, value = line.rstrip("\r").partition(":")
            if not colon or not _TOKEN.fullmatch(name):
                raise _RequestError(HTTPStatus.BAD_REQUEST, f"malformed header line {printable(line[:60])!r}")
            conn.headers.setdefault(name.lower(), []).append(value.strip(" \t"))
        path = target.split("?", 1)[0]
        allowed = ROUTES.get(path)
        if allowed is None:
            raise _RequestError(HTTPStatus.NOT_FOUND, f"no such endpoint {printable(path[:100])!r}: use GET /health "
                                                      "or POST /synthesize")
        if conn.method != allowed:
            raise _RequestError(HTTPStatus.METHOD_NOT_ALLOWED, f"{path} takes {allowed}, not "
                                                               f"{printable(conn.method[:20])}", {"Allow": allowed})
        if conn.method == "POST":
            conn.length = self._content_length(conn)

    def _content_length(self, conn: _Connection) -> int:
        """The body's length, if its Content-Length is one ASCII byte count within the server's bound."""
        if "transfer-encoding" in conn.headers:
            raise _RequestError(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required (a Transfer-"
                                                            "Encoding is not accepted)")
        values = {v.strip() for v in conn.headers.get("content-length", [])}
        if not values:
            raise _RequestError(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
        if len(values) > 1:
            raise _RequestError(HTTPStatus.BAD_REQUEST, "conflicting Content-Length headers")
        length = values.pop()
        if not re.fullmatch(r"[0-9]{1,18}", length):  # ASCII digits only: str.isdigit() accepts '²'
            raise _RequestError(HTTPStatus.BAD_REQUEST, f"Content-Length {printable(length[:40])!r} is not a byte "
                                                        "count")
        size = int(length)
        if size > self.max_bytes:
            conn.linger = True
            raise _RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                f"the text has {size:,} bytes, more than the {self.max_bytes:,} this server "
                                "speaks in one request: send it in parts")
        if "100-continue" in (v.lower() for v in conn.headers.get("expect", [])):
            with contextlib.suppress(OSError):  # a few bytes into an empty buffer: sent at once
                conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        return size

    def _dispatch(self, conn: _Connection, body: bytes) -> None:
        if conn.method == "GET":  # /health
            synth = self.synth
            health = {"status": "ok", "model": synth.path.name, "sample_rate": synth.sample_rate, "busy": self.busy}
            self._answer(conn, HTTPStatus.OK, json.dumps(health).encode() + b"\n", "application/json")
            return
        text, scale = self._text(conn, body)
        if not self.slots.acquire(blocking=False):
            raise _RequestError(HTTPStatus.SERVICE_UNAVAILABLE, "busy: every synthesis slot is taken; retry "
                                                                "shortly", {"Retry-After": "1"})
        self.count_busy(+1)
        conn.state = "working"
        worker = threading.Thread(target=self._work, args=(conn, text, scale), name="bittts-synthesis", daemon=True)
        self._workers.add(worker)
        try:
            worker.start()
        except BaseException:
            self._workers.discard(worker)
            self.count_busy(-1)
            self.slots.release()
            raise

    def _text(self, conn: _Connection, body: bytes) -> tuple[str, float]:
        """The text and duration scale of a request: a JSON object or plain UTF-8 text."""
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _RequestError(HTTPStatus.BAD_REQUEST, f"the body is not UTF-8 text (byte {e.start})") from None
        scale: Any = 1.0
        content_type = (conn.headers.get("content-type") or [""])[0]
        if content_type.split(";")[0].strip().lower() == "application/json":
            try:
                request = json.loads(text)
            except json.JSONDecodeError as e:
                raise _RequestError(HTTPStatus.BAD_REQUEST, f"invalid JSON: {e}") from None
            except RecursionError:
                raise _RequestError(HTTPStatus.BAD_REQUEST, "invalid JSON: nested too deeply") from None
            except ValueError:  # an integer past Python's conversion limit (4,300 digits)
                raise _RequestError(HTTPStatus.BAD_REQUEST, "invalid JSON: a number has too many digits") from None
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

    # ------------------------------------------------------------------------------------------ synthesis

    def _work(self, conn: _Connection, text: str, scale: float) -> None:
        """In a synthesis thread: the WAV of `text` spooled to a temporary file, then handed to the loop. Stops
        before the next sentence once `conn.gone` is set (the client left, or the request's deadline passed)."""
        result: Any = None
        spool = None
        start = time.perf_counter()
        try:
            synth = self.synth
            sentences = list(split_sentences(text))
            count_phonemes(synth, sentences, limits.MAX_REQUEST_PHONEMES)  # refused before any synthesis
            spool = tempfile.TemporaryFile()
            spool.write(wav_header(synth.sample_rate, 0))
            total = 0
            for chunk in speak(synth, sentences, scale, max_phonemes=limits.MAX_REQUEST_PHONEMES,
                               max_seconds=limits.MAX_REQUEST_SECONDS):
                if conn.gone.is_set():
                    break
                spool.write(chunk)
                total += len(chunk)
            if not conn.gone.is_set():
                spool.seek(0)
                spool.write(wav_header(synth.sample_rate, total))
                spool.seek(0)
                result = (HTTPStatus.OK, {"X-Synthesis-Seconds": f"{time.perf_counter() - start:.3f}"}, spool,
                          len(wav_header(synth.sample_rate, total)) + total)
                spool = None
        except LimitError as e:
            result = _RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, " ".join(str(e).split()))
        except ValueError as e:  # nothing in the text could be spoken
            result = _RequestError(HTTPStatus.BAD_REQUEST, " ".join(str(e).split()))
        except Exception as e:  # a bug: one line to the client, the details in the log
            result = e
        finally:
            if spool is not None:
                spool.close()
            self.count_busy(-1)
            self.slots.release()
            self._done.append((conn, result))
            self._workers.discard(threading.current_thread())
            self._wake()

    def _finish(self, conn: _Connection, result: Any) -> None:
        """In the loop: answer what a synthesis thread handed over, unless its client has gone."""
        if conn.closed or conn.state != "working" or (conn.gone.is_set() and not conn.timed_out):
            self._discard(result)
            self._close(conn)
        elif conn.timed_out:
            self._discard(result)
            self._reply(conn, HTTPStatus.SERVICE_UNAVAILABLE, f"the synthesis took longer than "
                                                              f"{self.request_seconds:g} s: send shorter text")
        elif isinstance(result, _RequestError):
            self._reply(conn, result.status, str(result), result.headers)
        elif isinstance(result, Exception):
            self._log(f"{conn.host} - internal error: {result!r}")
            self._reply(conn, HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(result).__name__}")
        else:
            status, headers, spool, size = result
            self._start(conn, status, "audio/wav", size, headers)
            conn.spool = spool
            self._send(conn)

    @staticmethod
    def _discard(result: Any) -> None:
        if isinstance(result, tuple):
            result[2].close()

    # ------------------------------------------------------------------------------------------ answers

    def _reply(self, conn: _Connection, status: HTTPStatus, message: str,
               headers: dict[str, str] | None = None) -> None:
        """A refusal: one line of plain text. The connection lingers after it: the client may still be sending a
        body, and closing a socket with unread data resets it, which can lose the answer."""
        conn.linger = True
        self._answer(conn, status, (message + "\n").encode(), "text/plain; charset=utf-8", headers)

    def _answer(self, conn: _Connection, status: HTTPStatus, body: bytes, content_type: str,
                headers: dict[str, str] | None = None) -> None:
        self._start(conn, status, content_type, len(body), headers)
        if conn.method != "HEAD":  # a HEAD answer has headers only
            conn.out += body
        self._send(conn)

    def _start(self, conn: _Connection, status: HTTPStatus, content_type: str, length: int,
               headers: dict[str, str] | None) -> None:
        lines = [f"HTTP/1.1 {status.value} {status.phrase}", "Server: bittts", f"Date: {formatdate(usegmt=True)}",
                 f"Content-Type: {content_type}", f"Content-Length: {length}", "Connection: close"]
        lines += [f"{key}: {value}" for key, value in (headers or {}).items()]
        conn.out += ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        conn.state = "writing"
        self._watch(conn, selectors.EVENT_WRITE)
        if conn.request_line or status != HTTPStatus.REQUEST_TIMEOUT:
            self._log(f'{conn.host} - "{conn.request_line[:1000]}" {status.value} {length}')

    def _send(self, conn: _Connection) -> None:
        """Send what the socket takes now; the rest when it is writable again. Closes the connection at the end
        (after a refused body: shuts its side and lingers, reading, so that the client reads the answer)."""
        while True:
            if not conn.out and conn.spool is not None:
                conn.out += conn.spool.read(_CHUNK)
                if not conn.out:
                    conn.spool.close()
                    conn.spool = None
            if not conn.out:
                break
            try:
                sent = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # the client has gone
                self._close(conn)
                return
            del conn.out[:sent]
        if conn.linger:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
            conn.state, conn.linger_until = "lingering", time.monotonic() + _LINGER_SECONDS
            self._watch(conn, selectors.EVENT_READ)
        else:
            self._close(conn)

    def _log(self, line: str) -> None:
        if not self.quiet:
            sys.stderr.write(printable(line) + "\n")


def _open_files_room() -> int:
    """Connections that fit below the soft open-files limit, with `_RESERVED_FILES` to spare."""
    try:
        import resource
    except ImportError:  # not a Unix system
        return limits.MAX_CONNECTIONS
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return limits.MAX_CONNECTIONS
    return max(1, soft - _RESERVED_FILES)
