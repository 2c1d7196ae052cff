"""Job webhooks (lipsync.jobs.webhooks), delivered to a real local HTTP receiver.

The receiver is ``http.server`` on 127.0.0.1 in a thread; each test scripts
its answers per path (status and delay) and checks what arrived, including
the HMAC signature through the public ``verify_signature`` helper.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lipsync.errors import InvalidInputError, NoFaceError
from lipsync.jobs import JobRequest, LocalJobQueue, WebhookSender, sign, validate_callback_url, verify_signature
from lipsync.jobs.webhooks import encode_payload, redact_url
from lipsync.server.links import job_links
from tests.test_jobs import SlowService, make_queue, make_settings, wait_for  # noqa: F401 - make_queue: a fixture

SECRET = "test-secret"


class Receiver:
    """A webhook receiver: records every POST, answers from a per-path script of (status, delay),
    or dribbles its answer (``dribble``)."""

    def __init__(self):
        self.requests: list[dict] = []
        self.scripts: dict[str, list[tuple[int, float]]] = {}
        self.dribbles: dict[str, tuple[float, str]] = {}
        self.dribbling = 0        # answers being dribbled right now
        self.most_dribbling = 0   # the most at once
        self.default = (200, 0.0)
        self.lock = threading.Lock()
        self.closing = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server API
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                              "at": time.monotonic()})
                    script = receiver.scripts.get(self.path)
                    status, delay = script.pop(0) if script else receiver.default
                if self.path in receiver.dribbles:
                    receiver._dribble(self.wfile, *receiver.dribbles[self.path])
                    return
                time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:
                    pass  # the sender gave up waiting

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def dribble(self, path: str, interval: float, part: str = "status") -> str:
        """Answer POSTs to ``path`` with a valid 200, one byte every ``interval`` s: from the status
        line on (``part="status"``), or the headers at once and then the body (``"body"``)."""
        self.dribbles[path] = (interval, part)
        return self.url(path)

    def _dribble(self, wfile, interval: float, part: str) -> None:
        body = b"x" * 60
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 60\r\n\r\n"
        with self.lock:
            self.dribbling += 1
            self.most_dribbling = max(self.most_dribbling, self.dribbling)
        try:
            if part == "body":
                wfile.write(head)
                data = body
            else:
                data = head + body
            for i in range(len(data)):
                if self.closing.wait(interval):
                    return
                wfile.write(data[i:i + 1])
        except OSError:
            pass  # the sender hung up
        finally:
            with self.lock:
                self.dribbling -= 1

    def script(self, path: str, *answers: tuple[int, float]) -> str:
        self.scripts[path] = list(answers)
        return self.url(path)

    def at(self, path: str) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["path"] == path]

    def close(self):
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def other_receiver():
    """A second receiver, on another port: another origin for the sender."""
    r = Receiver()
    yield r
    r.close()


def settle(q) -> None:
    """Wait until nothing more can be posted: the worker has finished its job (a job's webhook is
    queued as it ends) and the sender has nothing queued, in flight or waiting for a retry.
    Call it once every job of ``q`` has ended: afterwards the worker takes no new job."""
    assert q.drain(30), "the engine worker did not finish its job"
    assert q.webhooks.wait_idle(30), f"webhooks still pending: {q.webhooks.pending()}"


def assert_signed(request: dict, secret: str = SECRET) -> dict:
    headers = request["headers"]
    assert headers["Content-Type"] == "application/json"
    assert verify_signature(secret, headers["X-Signature-Timestamp"], request["body"], headers["X-Signature"])
    return json.loads(request["body"])


# --------------------------------------------------------------- signatures
def test_signature_round_trip_and_rejections():
    body = b'{"id":"abc","status":"done"}'
    now = int(time.time())
    signature = sign(SECRET, now, body)
    assert signature.startswith("sha256=") and len(signature) == 7 + 64
    assert verify_signature(SECRET, str(now), body, signature)
    assert verify_signature(SECRET, now, body, signature)
    assert not verify_signature("other-secret", now, body, signature)
    assert not verify_signature(SECRET, now, body + b" ", signature)
    assert not verify_signature(SECRET, now + 1, body, signature)                     # timestamp is signed
    assert not verify_signature(SECRET, now, body, signature.upper())
    assert not verify_signature(SECRET, now, body, "sha256=ünïcode")
    assert not verify_signature(SECRET, "soon", body, signature)
    assert not verify_signature(SECRET, now, body, None)
    old = now - 600
    assert not verify_signature(SECRET, old, body, sign(SECRET, old, body))          # replay outside tolerance
    assert verify_signature(SECRET, old, body, sign(SECRET, old, body), tolerance_s=900)


def test_callback_urls_must_be_http_or_https_with_a_host():
    for good in ("http://example.com/hook", "https://hooks.example.com:8443/a?b=c", "http://127.0.0.1:9/x"):
        assert validate_callback_url(good) == good
    for bad in ("ftp://example.com/x", "javascript:alert(1)", "file:///etc/passwd", "http://", "example.com/hook",
                "http://exa mple.com/", "https://example.com/\r\nX-Injected: 1", "http://example.com:99999/",
                "", None, 42, "http://e.com/" + "a" * 3000):
        with pytest.raises(InvalidInputError) as info:
            validate_callback_url(bad)
        assert info.value.code == "invalid_callback_url" and info.value.status == 400, bad


# -------------------------------------------------------- through the queue
def test_a_done_job_posts_its_signed_final_state(make_queue, receiver):
    q = make_queue(webhook_backoff=0.05)
    url = receiver.url("/done")
    job = q.submit(JobRequest(text="hook me", language="en", callback_url=url))
    final = q.wait(job.id, timeout=5)
    assert final["status"] == "done" and final["callback_url"] == url
    wait_for(lambda: q.store.webhook_state(job.id) == "delivered")
    settle(q)
    [request] = receiver.at("/done")  # exactly once
    payload = assert_signed(request)
    assert payload == q.get(job.id)
    assert request["headers"]["X-Job-Id"] == job.id and request["headers"]["X-Webhook-Attempt"] == "1"
    assert abs(int(request["headers"]["X-Signature-Timestamp"]) - time.time()) < 10
    assert request["body"] == encode_payload(payload)
    wait_for(lambda: q.store.webhook_state(job.id) == "delivered")


def test_failed_and_cancelled_jobs_post_too_and_jobs_without_callback_do_not(make_queue, receiver):
    service = SlowService()
    service.fail["bad"] = NoFaceError("no face was found")
    service.hold("busy")
    q = make_queue(service, webhook_backoff=0.05)
    busy = q.submit(JobRequest(text="busy", language="en", callback_url=receiver.url("/busy")))
    assert service.started("busy")
    queued = q.submit(JobRequest(text="never runs", language="en", callback_url=receiver.url("/queued")))
    failed = q.submit(JobRequest(text="bad", language="en", callback_url=receiver.url("/failed")))
    plain = q.submit(JobRequest(text="no hook", language="en"))
    assert q.cancel(queued.id)
    assert q.cancel(busy.id)
    assert q.wait(plain.id, timeout=5)["status"] == "done"
    wait_for(lambda: receiver.at("/busy") and receiver.at("/queued") and receiver.at("/failed"))
    assert assert_signed(receiver.at("/busy")[0])["status"] == "cancelled"
    assert assert_signed(receiver.at("/queued")[0])["status"] == "cancelled"
    failed_payload = assert_signed(receiver.at("/failed")[0])
    assert failed_payload["status"] == "failed" and failed_payload["error"]["code"] == "no_face"
    assert failed_payload["id"] == failed.id
    settle(q)
    assert len(receiver.requests) == 3


def test_a_receiver_failing_twice_with_500_gets_three_attempts(make_queue, receiver):
    q = make_queue(webhook_backoff=0.1, webhook_retries=5)
    url = receiver.script("/flaky", (500, 0), (500, 0), (200, 0))
    job = q.submit(JobRequest(text="flaky receiver", language="en", callback_url=url))
    assert q.wait(job.id, timeout=5)["status"] == "done"
    wait_for(lambda: q.store.webhook_state(job.id) == "delivered")
    settle(q)
    attempts = receiver.at("/flaky")
    assert len(attempts) == 3
    assert [a["headers"]["X-Webhook-Attempt"] for a in attempts] == ["1", "2", "3"]
    for attempt in attempts:
        assert assert_signed(attempt)["status"] == "done"
    gaps = [b["at"] - a["at"] for a, b in zip(attempts, attempts[1:])]
    # exponential: 0.1 s, then 0.2 s. Lower bounds only (a retry never comes before its backoff):
    # the backoff is the behaviour, and a slow machine can only widen the gaps.
    assert gaps[0] >= 0.09 and gaps[1] >= 0.19, gaps


@pytest.mark.slow  # waits on real timeouts, servers or big files: seconds
def test_the_engine_worker_is_not_blocked_by_a_slow_receiver(make_queue, receiver):
    # every attempt to /slow outlasts the 0.3 s timeout until the fourth, which answers 200
    first_hook_when_ended: dict = {}  # the first job's webhook state as the worker ends each job

    def on_job_end(state):
        first_hook_when_ended[state["id"]] = q.store.webhook_state(first.id)

    q = make_queue(webhook_backoff=0.1, webhook_retries=5, webhook_timeout=0.3, on_job_end=on_job_end)
    url = receiver.script("/slow", (200, 1.0), (200, 1.0), (200, 1.0), (200, 0))
    first = q.submit(JobRequest(text="slow hook", language="en", callback_url=url))
    second = q.submit(JobRequest(text="next job", language="en", callback_url=receiver.url("/fast")))
    assert q.wait(second.id, timeout=30)["status"] == "done"
    assert q.get(first.id)["status"] == "done"
    wait_for(lambda: second.id in first_hook_when_ended)
    assert first_hook_when_ended[second.id] == "pending"     # the worker ran the next job while retrying...
    wait_for(lambda: receiver.at("/fast"))
    wait_for(lambda: q.store.webhook_state(first.id) == "delivered", timeout=30)
    assert len(receiver.at("/slow")) == 4
    # ...and other deliveries went out between the retries, before the last attempt
    assert receiver.at("/fast")[0]["at"] < receiver.at("/slow")[-1]["at"]


def test_an_undelivered_webhook_is_sent_again_after_a_restart(make_queue, receiver):
    q1 = make_queue(webhook_backoff=60)
    url = receiver.script("/later", (503, 0))
    job = q1.submit(JobRequest(text="receiver down", language="en", callback_url=url))
    assert q1.wait(job.id, timeout=5)["status"] == "done"
    wait_for(lambda: receiver.at("/later"))
    q1.stop()
    assert q1.store.webhook_state(job.id) == "pending"        # retry was scheduled a minute later
    q2 = make_queue(settings=q1.settings, webhook_backoff=0.05)
    wait_for(lambda: q2.store.webhook_state(job.id) == "delivered")
    first, second = receiver.at("/later")
    assert assert_signed(second)["id"] == job.id and assert_signed(second)["status"] == "done"


def test_jobs_interrupted_by_a_restart_post_their_failure(make_queue, receiver):
    service = SlowService()
    service.hold("stuck")
    q1 = make_queue(service, webhook_backoff=0.05)
    running = q1.submit(JobRequest(text="stuck", language="en", callback_url=receiver.url("/running")))
    queued = q1.submit(JobRequest(text="waiting", language="en", callback_url=receiver.url("/queued")))
    assert service.started("stuck")
    q1.stop()
    q2 = make_queue(settings=q1.settings, webhook_backoff=0.05)
    wait_for(lambda: q2.store.webhook_state(running.id) == "delivered" == q2.store.webhook_state(queued.id))
    settle(q2)
    [request] = receiver.at("/queued")  # exactly once: failed by q2's start, sent by q2
    payload = assert_signed(request)
    assert payload["status"] == "failed" and payload["error"]["code"] == "interrupted"
    # the running one was failed by q1's stop; its delivery may have left before q1's sender
    # stopped, and q2 sends it again unless it was confirmed: at least once
    requests = receiver.at("/running")
    assert 1 <= len(requests) <= 2
    assert {assert_signed(r)["error"]["code"] for r in requests} == {"interrupted"}


def test_unsigned_deliveries_without_a_secret(make_queue, receiver):
    q = make_queue(webhook_secret=None)
    job = q.submit(JobRequest(text="unsigned", language="en", callback_url=receiver.url("/plain")))
    assert q.wait(job.id, timeout=5)["status"] == "done"
    wait_for(lambda: receiver.at("/plain"))
    settle(q)
    [request] = receiver.at("/plain")
    assert "X-Signature" not in request["headers"] and request["headers"]["X-Signature-Timestamp"]
    assert json.loads(request["body"])["status"] == "done"


# ------------------------------------------------------- the sender itself
def _sender(**kwargs):
    results: list[tuple] = []
    sender = WebhookSender(SECRET, on_result=lambda *r: results.append(r), **kwargs)
    sender.start()
    return sender, results


def test_sender_gives_up_after_the_configured_retries(receiver):
    sender, results = _sender(retries=2, timeout=2, backoff=0.02)
    try:
        url = receiver.script("/down", *[(500, 0)] * 10)
        sender.send(url, {"id": "x"}, key="x")
        wait_for(lambda: results, timeout=5)
        assert results == [("x", False, 3, "HTTP 500")]
        assert len(receiver.at("/down")) == 3
    finally:
        sender.stop()


def test_sender_does_not_retry_4xx_or_follow_redirects(receiver):
    sender, results = _sender(retries=3, timeout=2, backoff=0.02)
    try:
        sender.send(receiver.script("/gone", (410, 0)), {"id": "a"}, key="a")
        sender.send(receiver.script("/moved", (302, 0)), {"id": "b"}, key="b")
        wait_for(lambda: len(results) == 2, timeout=5)
        assert sorted(results) == [("a", False, 1, "HTTP 410"), ("b", False, 1, "HTTP 302")]
        assert len(receiver.at("/gone")) == 1 and len(receiver.at("/moved")) == 1
    finally:
        sender.stop()


def test_sender_retries_timeouts_and_refused_connections(receiver):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    sender, results = _sender(retries=2, timeout=0.3, backoff=0.02)
    try:
        sender.send(receiver.script("/sleepy", (200, 1.0), (200, 0)), {"id": "t"}, key="t")
        sender.send(f"http://127.0.0.1:{closed_port}/hook", {"id": "r"}, key="r")
        wait_for(lambda: len(results) == 2, timeout=10)
        by_key = {r[0]: r for r in results}
        assert by_key["t"][1:3] == (True, 2)
        assert by_key["r"][1:3] == (False, 3) and "refused" in by_key["r"][3].lower()
        assert sender.wait_idle(1)
    finally:
        sender.stop()


# ------------------------------------------- deadlines, parallel senders (#10)
@pytest.mark.slow  # real receivers dribbling for seconds
@pytest.mark.parametrize("part", ["status", "body"])
def test_an_attempt_ends_at_its_deadline_however_slowly_the_receiver_answers(receiver, part):
    # One byte a second never trips a per-read timeout of 2 s: only a total deadline ends the attempt.
    sender, results = _sender(retries=1, timeout=2, backoff=0.05)
    try:
        sent = time.monotonic()
        sender.send(receiver.dribble("/dribble", 1.0, part), {"id": "d"}, key="d")
        wait_for(lambda: len(receiver.at("/dribble")) == 2, timeout=10,
                 message="the first attempt was not cut off and retried")  # a dribble lasts ~60 s
        retried = receiver.at("/dribble")[1]["at"] - sent
        wait_for(lambda: results, timeout=10)
        [(key, delivered, attempts, error)] = results
        assert (key, delivered, attempts) == ("d", False, 2)
        assert "within 2 s" in error
        assert retried < 2 + 0.05 + 3, retried  # the deadline plus backoff plus a margin for a slow machine
    finally:
        sender.stop()


@pytest.mark.slow  # real receivers dribbling for seconds
def test_a_slow_receiver_holds_one_sender_while_others_are_delivered(receiver, other_receiver):
    sender, results = _sender(retries=0, timeout=5, backoff=0.05)
    try:
        slow = other_receiver.dribble("/slow", 0.5)
        for n in range(6):  # more than the sender has threads: they wait for their receiver, one at a time
            sender.send(slow, {"id": f"slow{n}"}, key=f"slow{n}")
        wait_for(lambda: other_receiver.dribbling, timeout=5)
        sender.send(receiver.url("/fast"), {"id": "fast"}, key="fast")
        wait_for(lambda: results, timeout=5)
        assert results == [("fast", True, 1, None)]   # delivered while the slow receiver still dribbles...
        assert other_receiver.dribbling == 1
        assert len(other_receiver.at("/slow")) == 1   # ...its other webhooks waiting their turn
        assert sender.pending() == 6
    finally:
        sender.stop()
    assert other_receiver.most_dribbling == 1


@pytest.mark.slow  # real receivers dribbling for seconds
def test_deliveries_to_different_receivers_run_in_parallel(receiver, other_receiver):
    sender, results = _sender(retries=0, timeout=5)
    try:
        sender.send(receiver.script("/a", (200, 2.0)), {"id": "a"}, key="a")
        sender.send(other_receiver.script("/b", (200, 2.0)), {"id": "b"}, key="b")
        wait_for(lambda: len(results) == 2, timeout=10)
        assert sorted(results) == [("a", True, 1, None), ("b", True, 1, None)]
        [a], [b] = receiver.at("/a"), other_receiver.at("/b")
        assert abs(a["at"] - b["at"]) < 1.5  # the second did not wait for the first one's 2 s answer
        assert sender.wait_idle(1) and sender.pending() == 0
    finally:
        sender.stop()


@pytest.mark.slow  # waits on real timeouts, servers or big files: seconds
def test_the_sender_keeps_a_fixed_number_of_threads(receiver):
    def senders() -> set:
        return {t for t in threading.enumerate() if t.name.startswith("lipsync-webhooks")}

    before = senders()
    sender = WebhookSender(SECRET, retries=0, timeout=2, workers=3)
    sender.start()
    try:
        for n in range(20):
            sender.send(receiver.script(f"/n{n}", (200, 0.05)), {"id": n}, key=str(n))
        assert len(senders() - before) == 3
        sender.start()  # again: no more threads
        assert len(senders() - before) == 3
        assert sender.wait_idle(20)
        assert len(receiver.requests) == 20
        assert len(senders() - before) == 3
    finally:
        sender.stop()
    wait_for(lambda: not senders() - before)


# -------------------------------------------- refused URLs, redacted logs (#10)
def test_callback_urls_that_can_never_be_delivered_are_refused():
    secret = "hunter2pass"
    for bad in (f"http://user:{secret}@example.com/hook", "https://user@example.com/hook",
                f"http://:{secret}@example.com/", "http://bücher.example/hook", "http://example.com/päth",
                "http://example.com/hook?q=ü", "http://example.com/\u00a0x", "http://example.com/a b",
                "http://example.com/\x00", "http://example.com/\x1b[31m", "http://example.com/\x85",
                "http://exa\tmple.com/", "http://example.com/\u2028"):
        with pytest.raises(InvalidInputError) as info:
            validate_callback_url(bad)
        assert info.value.code == "invalid_callback_url" and info.value.status == 400, bad
        assert secret not in str(info.value) and bad not in str(info.value), bad
    for good in ("http://xn--bcher-kva.example/hook", "http://example.com/p%C3%A4th?q=%C3%BC",
                 "http://[::1]:8080/hook", "https://example.com/a@b", "https://example.com/?to=a@b.c"):
        assert validate_callback_url(good) == good
    with pytest.raises(InvalidInputError, match="user name or password"):
        validate_callback_url(f"http://user:{secret}@example.com/hook")
    with pytest.raises(InvalidInputError, match="IDNA"):
        validate_callback_url("http://bücher.example/hook")


def test_redact_url_keeps_scheme_host_port_and_path_only():
    assert redact_url("https://user:pw@Hooks.Example.com:8443/a/b?token=t#frag") == "https://hooks.example.com:8443/a/b"
    assert redact_url("http://example.com") == "http://example.com/"
    assert redact_url("http://u:p@[::1]:9/x?y") == "http://[::1]:9/x"
    assert redact_url("http://example.com/a\r\nInjected: 1") == "http://example.com/aInjected:%201"  # one line
    assert redact_url("http://example.com/\x1b[2J\u00e4") == "http://example.com/%1B%5B2J%C3%A4"
    assert redact_url("http://u:pw9@h:bad/") == "http://h/"  # a malformed port: still no credentials
    assert isinstance(redact_url(None), str)  # never raises: it is for log lines


def test_webhook_logs_never_show_credentials_or_query_strings(receiver, caplog):
    caplog.set_level(logging.DEBUG, logger="lipsync.jobs")
    port = receiver.server.server_address[1]
    sender, results = _sender(retries=2, timeout=2, backoff=0.05)
    try:
        # a URL stored before userinfo was refused: given up at once, not retried
        sender.send(f"http://user:s3cr3tpw@127.0.0.1:{port}/creds?token=t0ken", {"id": "c"}, key="c")
        sender.send(receiver.url("/ok?token=t0ken&sig=abc"), {"id": "q"}, key="q")
        sender.send(receiver.script("/retry?token=t0ken", (500, 0), (200, 0)), {"id": "r"}, key="r")
        wait_for(lambda: len(results) == 3, timeout=10)
    finally:
        sender.stop()
    by_key = {r[0]: r for r in results}
    assert by_key["c"][1:3] == (False, 1) and "user name or password" in by_key["c"][3]
    assert by_key["q"][1] is True and by_key["r"][1:3] == (True, 2)
    assert not [r for r in receiver.requests if r["path"].startswith("/creds")]
    text = caplog.text
    assert "s3cr3tpw" not in text and "t0ken" not in text and "sig=" not in text and "@127" not in text
    assert f"delivered to http://127.0.0.1:{port}/ok " in text
    assert f"to http://127.0.0.1:{port}/retry failed (HTTP 500)" in text
    assert f"to http://127.0.0.1:{port}/creds given up" in text
    assert all("s3cr3tpw" not in str(r[3]) for r in results)


# ------------------------------------------------- payload links (#10)
def _delivered_with_links(tmp_path, receiver, links, path: str) -> tuple[dict, dict]:
    """Run one job whose queue builds its links with ``links`` and wait for its webhook:
    (the job's final state, the signed payload the receiver got at ``path``)."""
    q = LocalJobQueue(SlowService(), make_settings(tmp_path), webhook_backoff=0.05, job_links=links)
    q.start()
    try:
        job = q.submit(JobRequest(text="links", language="en", callback_url=receiver.url(path)))
        assert q.wait(job.id, timeout=5)["status"] == "done"
        wait_for(lambda: q.store.webhook_state(job.id) == "delivered")
        [request] = receiver.at(path)
        return q.get(job.id), assert_signed(request)
    finally:
        q.stop(timeout=5)


def test_the_webhook_payload_carries_the_job_links(tmp_path, receiver):
    links = job_links  # what the server passes (lipsync.server.links)
    state, payload = _delivered_with_links(tmp_path, receiver, links, "/links")
    assert payload == {**state, **links(state["id"])}
    assert payload["status_url"] == f"/api/jobs/{state['id']}" and payload["stream_url"].endswith("/stream")


def test_a_failing_job_links_function_does_not_lose_the_webhook(tmp_path, receiver):
    def broken(job_id):
        raise RuntimeError("no routes")

    state, payload = _delivered_with_links(tmp_path, receiver, broken, "/nolinks")
    assert payload == state
