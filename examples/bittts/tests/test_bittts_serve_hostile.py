"""`bittts serve` against hostile clients (issue 17): a client that leaves frees its synthesis slot (S1), text that
expands is bounded by its phonemes and audio, not its characters (S2), idle and slow connections cost no threads
and are dropped on a total deadline (S3), malformed framing and JSON get 400 (S4), other methods 405 with one
line and an Allow header (S5), and control characters never reach the log raw (S14). 127.0.0.1 only."""
from __future__ import annotations

import json
import re
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from bittts import limits
from bittts.synthesis.server import SpeechServer, printable
from bittts.synthesis.synthesizer import DEFAULT_MODEL, Synthesis, Synthesizer, shipped_model
from bittts_http import http_request
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

MODEL = shipped_model(DEFAULT_MODEL)
needs_model = pytest.mark.skipif(not MODEL.is_file(), reason="the shipped model is not installed")


class SlowSynth:
    """A stand-in model: each sentence takes 50 ms and gives 10 ms of silence; counts what it speaks."""

    path = Path("slow.safetensors")
    sample_rate = 16000

    def __init__(self) -> None:
        self.spoken = 0
        self.started = threading.Event()

    def text_to_ids(self, sentence: str) -> tuple[str, list[int]]:
        return "a", [1]

    def synthesize_ids(self, ids, phonemes="", duration_scale=1.0, max_seconds=limits.MAX_SENTENCE_SECONDS):
        if max_seconds < 0.01:
            raise limits.LimitError(f"more than {max_seconds} s")
        self.spoken += 1
        self.started.set()
        time.sleep(0.05)
        return Synthesis(torch.zeros(160), self.sample_rate, 0.05, phonemes)


class Running:
    """A SpeechServer served from a thread for the duration of a `with` block."""

    def __init__(self, synth, **kwargs) -> None:
        self.server = SpeechServer(("127.0.0.1", 0), synth, **kwargs)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> SpeechServer:
        self.thread.start()
        return self.server

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def server(one_thread):
    """The shipped model at the default bounds (10,000-byte bodies), logging (to the captured standard error)."""
    if not MODEL.is_file():
        pytest.skip("the shipped model is not installed")
    with Running(Synthesizer(MODEL)) as srv:
        yield srv


def request(srv: SpeechServer, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return http_request(*srv.server_address[:2], method, path, body, headers)


def raw(srv: SpeechServer, data: bytes) -> bytes:
    """Send `data` as is and read the answer to its end (the server closes every connection)."""
    with socket.create_connection(srv.server_address[:2], timeout=60) as s:
        s.sendall(data)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


def one_line(body: bytes) -> str:
    text = body.decode()
    assert text.endswith("\n") and text.count("\n") == 1, text
    return text


def health(srv: SpeechServer) -> dict:
    status, _, body = request(srv, "GET", "/health")
    assert status == 200
    return json.loads(body)


# ------------------------------------------------------------------------------------------------- S1


def test_a_client_that_leaves_frees_the_slot_before_the_next_sentence():
    """200 sentences asked for, the client gone once the first has started: the synthesis stops (before: all 200
    spoken, the only slot held, every other POST answered 503 until then)."""
    synth = SlowSynth()
    with Running(synth, quiet=True) as srv:
        body = b"Hi.\n" * 200
        s = socket.create_connection(srv.server_address[:2], timeout=30)
        s.sendall(b"POST /synthesize HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        assert synth.started.wait(30)
        s.close()
        for _ in range(600):  # until the slot is free (bounded wait: 200 sentences take 10 s)
            if health(srv)["busy"] == 0:
                break
            time.sleep(0.05)
        assert synth.spoken < 100, synth.spoken
        status, _, _ = request(srv, "POST", "/synthesize", b"Hello.")
        assert status == 200


def test_a_request_past_its_total_deadline_stops_and_gets_503():
    synth = SlowSynth()
    with Running(synth, quiet=True, request_seconds=0.5) as srv:
        status, _, body = request(srv, "POST", "/synthesize", b"Hi.\n" * 200)
        assert status == 503 and "took longer than 0.5 s" in one_line(body)
        assert synth.spoken < 200 and health(srv)["busy"] == 0


# ------------------------------------------------------------------------------------------------- S2


@needs_model
def test_digits_are_bounded_by_their_phonemes_not_their_characters(server):
    """495 characters of digit groups, one sentence (6,000 phonemes, 268 s of audio before): 413 naming the
    bound, before any synthesis."""
    status, _, body = request(server, "POST", "/synthesize", ("777777777777777 " * 31).strip().encode())
    assert status == 413 and "MAX_SENTENCE_PHONEMES" in one_line(body)


@needs_model
def test_a_request_is_bounded_by_its_phonemes_before_any_synthesis(server):
    """10,000 bytes, one digit group a line (each line a short sentence): 413 at once, nothing synthesized."""
    lines = b"777777777777777 777777777777777\n" * 300
    status, _, body = request(server, "POST", "/synthesize", lines[:limits.MAX_REQUEST_BYTES])
    assert status == 413 and "MAX_REQUEST_PHONEMES" in one_line(body)
    assert health(server)["busy"] == 0


def test_a_request_is_bounded_by_its_seconds_of_audio(monkeypatch):
    monkeypatch.setattr(limits, "MAX_REQUEST_SECONDS", 0.1)
    with Running(SlowSynth(), quiet=True) as srv:
        status, _, body = request(srv, "POST", "/synthesize", b"Hi.\n" * 5)
    assert status == 413 and "MAX_REQUEST_SECONDS" in one_line(body)


# ------------------------------------------------------------------------------------------------- S3


def test_idle_connections_cost_no_threads_and_health_answers():
    """4x as many idle connections as the server keeps: no thread each (before: one each), the oldest are closed
    to make room, and /health answers throughout."""
    with Running(SlowSynth(), quiet=True, max_connections=16) as srv:
        before = threading.active_count()
        idle = []
        try:
            for i in range(64):
                s = socket.create_connection(srv.server_address[:2], timeout=30)
                s.sendall(b"POST /synthesize HTTP/1.1\r\nX-Slow: 1\r\n")  # a request that never ends
                idle.append(s)
                if i % 16 == 15:
                    assert health(srv)["status"] == "ok"
            assert threading.active_count() <= before + 1
            assert len(srv._conns) <= 16
            for s in idle[:64 - 16]:  # the oldest were closed to make room (the others wait for their deadline)
                s.settimeout(10)
                try:
                    assert s.recv(1) == b""
                except ConnectionError:
                    pass
        finally:
            for s in idle:
                s.close()


def test_a_slow_request_is_dropped_on_a_total_deadline_not_per_read():
    """A header line every 0.1 s keeps each read short; the whole request still gets 1 s (before: the stall
    limit was per read, so such a client was never dropped)."""
    with Running(SlowSynth(), quiet=True, read_seconds=1.0) as srv:
        s = socket.create_connection(srv.server_address[:2], timeout=30)
        s.sendall(b"POST /synthesize HTTP/1.1\r\n")
        answer = b""
        try:
            for i in range(100):  # 10 s of header lines, if the server let them all in
                s.sendall(b"X-Line-%d: 1\r\n" % i)
                time.sleep(0.1)
        except ConnectionError:
            pass
        s.settimeout(10)
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except ConnectionError:
            pass
        s.close()
    assert answer.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 1 s" in answer, answer[:200]


# ------------------------------------------------------------------------------------------------- S4, S5


@needs_model
@pytest.mark.parametrize(("name", "data", "message"), [
    ("superscript two as a length", b"POST /synthesize HTTP/1.1\r\nContent-Length: \xb2\r\n\r\nx", "not a byte count"),
    ("JSON nested 3,000 deep", None, "nested too deeply"),
    ("a 5,000-digit number", None, "too many digits"),
])
def test_malformed_requests_get_400_and_one_line(server, name, data, message):
    if name.startswith("JSON"):
        body = b"[" * 3000 + b"]" * 3000
    elif name.startswith("a 5,000"):
        body = b'{"text": "Hello.", "duration_scale": ' + b"1" * 5000 + b"}"
    if data is None:
        data = (b"POST /synthesize HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                % len(body) + body)
    answer = raw(server, data)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert message in one_line(body)


@needs_model
@pytest.mark.parametrize(("method", "path", "allow"), [
    ("PUT", "/synthesize", "POST"), ("DELETE", "/health", "GET"), ("PATCH", "/synthesize", "POST"),
    ("OPTIONS", "/health", "GET"), ("HEAD", "/health", "GET"), ("HEAD", "/synthesize", "POST")])
def test_other_methods_get_405_with_allow_and_one_line(server, method, path, allow):
    status, headers, body = request(server, method, path, b"" if method in ("PUT", "PATCH") else None)
    assert status == 405 and headers["Allow"] == allow
    if method == "HEAD":
        assert body == b""  # a HEAD answer has no body
    else:
        assert f"{path} takes {allow}, not {method}" in one_line(body)


# ------------------------------------------------------------------------------------------------- S14


@needs_model
def test_control_characters_reach_the_log_escaped(server, capsys):
    server.quiet = False
    try:
        capsys.readouterr()
        raw(server, b"GET /\x1b]0;pwned\x07\x1b[2J\rforged\x7f HTTP/1.1\r\n\r\n")
        raw(server, b"G\x1bET /health HTTP/1.1\r\n\r\n")
        for _ in range(100):  # the log line is written by the server's thread
            err = capsys.readouterr().err
            if err:
                break
            time.sleep(0.05)
    finally:
        server.quiet = True
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\rforged\\x7f" in err, err
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", err), repr(err)


def test_printable_escapes_every_control_character():
    assert printable("a\x1b[2J\x07\r\n\x00\u2028é ok") == "a\\x1b[2J\\x07\\r\\n\\x00\\u2028é ok"


# ------------------------------------------------------------------------------------------------- property


class FastSynth(SlowSynth):
    def synthesize_ids(self, ids, phonemes="", duration_scale=1.0, max_seconds=limits.MAX_SENTENCE_SECONDS):
        return Synthesis(torch.zeros(16), self.sample_rate, 0.0, phonemes)


_json = st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=20)
_bodies = st.one_of(st.binary(max_size=300), _json.map(lambda v: json.dumps(v).encode()),
                    st.fixed_dictionaries({"text": st.text(max_size=100)}, optional={"duration_scale": _json})
                    .map(lambda v: json.dumps(v).encode()))
_lengths = st.one_of(st.none(), st.sampled_from(["\xb2", "\u0661\u0662", "+1", "1 2", "0x10", "-1", "1e3",
                                                 "\uff19", "99999999999999999999999"]),
                     st.text(alphabet=st.characters(categories=["Nd", "No"]), min_size=1, max_size=4))


@pytest.fixture(scope="module")
def fast_server():
    with Running(FastSynth(), quiet=True) as srv:
        yield srv


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(method="POST", path="/synthesize", length="\xb2", json_type=False, body=b"x")
@given(method=st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "BREW", "G\x1bT"]),
       path=st.sampled_from(["/health", "/synthesize", "/synthesize?x=1", "/nope", "*", "/\x1b[2J\r"]),
       length=_lengths, json_type=st.booleans(), body=_bodies)
def test_any_request_gets_one_status_line_and_no_500(fast_server, method, path, length, json_type, body):
    """Whatever the method, path, Content-Length and body: an HTTP/1.1 answer below 500, and a refusal is one
    line (before: '²' as a length, deep JSON, long numbers were 500; other methods 501 with an HTML page)."""
    if length is not None and re.fullmatch("[0-9]+", length) and len(body) < int(length) <= fast_server.max_bytes:
        length = str(len(body))  # a body shorter than its length waits for the rest: not what this test is about
    head = [f"{method} {path} HTTP/1.1"]
    if json_type:
        head.append("Content-Type: application/json")
    if length is not None or method in ("POST", "PUT", "PATCH"):
        head.append(f"Content-Length: {len(body) if length is None else length}")
    value = "\r\n".join(head).encode("utf-8") if not all(ord(c) < 256 for c in "".join(head)) else \
        "\r\n".join(head).encode("latin-1")
    answer = raw(fast_server, value + b"\r\n\r\n" + body)
    status_line, _, rest = answer.partition(b"\r\n")
    assert re.fullmatch(rb"HTTP/1\.1 [1-4][0-9][0-9] [A-Za-z -]+", status_line), answer[:200]
    _, _, reply = rest.partition(b"\r\n\r\n")
    if not status_line.startswith(b"HTTP/1.1 200") and method != "HEAD":
        one_line(reply)


def test_a_full_server_never_drops_a_request_that_has_arrived():
    """At `max_connections` a newcomer evicts the reader waiting longest among those with nothing sent: a client
    whose whole request waits unread in its socket (it connected first, the server has not turned to it yet) is
    about to be answered, not slow (before: it was the oldest reader, so it was reset; the load test's first
    /health poll, now and then)."""
    from bittts.synthesis.server import _Connection

    srv = SpeechServer(("127.0.0.1", 0), SlowSynth(), quiet=True, max_connections=2)
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        now = time.monotonic()
        waiting = _Connection(pairs[0][0], ("127.0.0.1", 1), now - 10)  # connected first, its request unread
        idle = _Connection(pairs[1][0], ("127.0.0.1", 2), now - 1)  # sent nothing yet
        pairs[0][1].sendall(b"GET /health HTTP/1.1\r\n\r\n")
        for conn in (waiting, idle):
            conn.sock.setblocking(False)
            srv._conns.add(conn)
        assert srv._evict()
        assert idle.closed and not waiting.closed
    finally:
        for a, b in pairs:
            a.close()
            b.close()
        srv.server_close()
