"""The review console over HTTP against real Redis and moto's S3: authentication on every
route (before any body is read), CSRF, leases, first decision wins, the labels export, the
dashboard's counters, the image proxy's refusals, the queue's one-item-per-verdict rule,
and a Schemathesis run over its OpenAPI with and without credentials."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import requests

from modgate import keys
from modgate.contract import MODERATE_QUEUE
from tests.console.conftest import TOKENS, form_value, png, publish, session
from tests.servers import free_port

OPEN = {"/healthz", "/login", "/openapi.json", "/static/console.css"}


def bearer(reviewer: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[reviewer]}"}


def queued(r) -> list[str]:
    return [m.decode() for m in r.zrevrange(keys.REVIEW_QUEUE, 0, -1)]


def test_every_route_but_the_open_ones_refuses_a_request_without_a_reviewer(start_console, r, bucket):
    server = start_console()
    verdict, _ = publish(r, bucket, "a.png")
    routes = [(route.path, sorted(route.methods)) for route in server.app.routes if hasattr(route, "methods")]
    guarded = [(p, m) for p, m in routes if p not in OPEN]
    assert len(guarded) >= 9  # /, /next, item, image, decide, skip, export, dashboard, logout
    for path, methods in guarded:
        url = server.base + path.replace("{verdict_id}", verdict.id)
        for method in methods:
            if method == "HEAD":
                continue
            plain = requests.request(method, url, allow_redirects=False, timeout=10)
            assert plain.status_code == 401, (method, path, plain.status_code)
            assert plain.headers["WWW-Authenticate"].startswith("Bearer")
            wrong = requests.request(
                method,
                url,
                headers={"Authorization": "Bearer not-a-token"},
                allow_redirects=False,
                timeout=10,
            )
            assert wrong.status_code == 401, (method, path)
            # The proxy header means nothing unless trust_proxy_header is on.
            proxied = requests.request(
                method, url, headers={"X-Forwarded-User": "mallory"}, allow_redirects=False, timeout=10
            )
            assert proxied.status_code == 401, (method, path)
            forged = requests.request(
                method,
                url,
                cookies={"modgate_console": "eyJ1IjoiYW5hIn0.forged"},
                allow_redirects=False,
                timeout=10,
            )
            assert forged.status_code == 401, (method, path)
            if method == "GET":  # a browser goes to the login form, and comes back after
                page = requests.get(url, headers={"Accept": "text/html"}, allow_redirects=False, timeout=10)
                assert page.status_code == 303 and page.headers["Location"].startswith("/login?next=%2F")
    health = requests.get(server.base + "/healthz", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert requests.get(server.base + "/", headers=bearer("ana"), timeout=10).status_code == 200


def test_authentication_is_checked_before_the_body_is_read(start_console):
    server = start_console()
    # Headers promise a body that never comes: the answer arrives anyway, so it was not waited for.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
        conn.sendall(
            b"POST /items/abc/decide HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 4000\r\n\r\n"
        )
        answer = conn.recv(4096).decode()
    assert answer.startswith("HTTP/1.1 401")
    too_big = requests.post(
        server.base + "/items/abc/decide", data="x" * 20_000, headers=bearer("ana"), timeout=10
    )
    assert too_big.status_code == 413


def test_the_proxy_header_names_the_reviewer_only_when_trusted(start_console, r, bucket):
    server = start_console(trust_proxy_header=True)
    page = requests.get(server.base + "/", headers={"X-Forwarded-User": "carol"}, timeout=10)
    assert page.status_code == 200 and "carol" in page.text
    # A sent Authorization header is judged on its own, whatever else came with it.
    mixed = requests.get(
        server.base + "/", headers={"X-Forwarded-User": "carol", "Authorization": "Bearer nope"}, timeout=10
    )
    assert mixed.status_code == 401


def test_login_sets_a_signed_http_only_cookie_and_a_wrong_token_is_refused(start_console):
    server = start_console(cookie_secure=True)
    first = requests.get(server.base + "/login", timeout=10)
    nonce = re.search(r"modgate_console_login=([^;]+)", first.headers["Set-Cookie"]).group(1)
    csrf = form_value(first.text, "csrf")
    login_cookie = {"Cookie": f"modgate_console_login={nonce}"}
    wrong = requests.post(
        server.base + "/login",
        data={"token": "guess", "csrf": csrf},
        headers=login_cookie,
        allow_redirects=False,
        timeout=10,
    )
    assert wrong.status_code == 401 and "modgate_console=" not in wrong.headers.get("Set-Cookie", "")
    # Without the login cookie's nonce the form's CSRF token is worthless (a cross-site post).
    cross = requests.post(
        server.base + "/login", data={"token": TOKENS["ana"], "csrf": csrf}, allow_redirects=False, timeout=10
    )
    assert cross.status_code == 403
    ok = requests.post(
        server.base + "/login",
        data={"token": TOKENS["ana"], "csrf": csrf, "next": "https://evil.example/"},
        headers=login_cookie,
        allow_redirects=False,
        timeout=10,
    )
    assert ok.status_code == 303 and ok.headers["Location"] == "/"  # never off-site
    cookie = ok.headers["Set-Cookie"]
    assert "modgate_console=" in cookie and "HttpOnly" in cookie and "Secure" in cookie
    assert "samesite=lax" in cookie.lower()
    session_cookie = re.search(r"modgate_console=([^;]+)", cookie).group(1)
    page = requests.get(
        server.base + "/", headers={"Cookie": f"modgate_console={session_cookie}"}, timeout=10
    )
    assert page.status_code == 200 and "ana" in page.text
    # The same cookie with one character of its payload changed is nobody's.
    forged = ("B" if session_cookie[0] != "B" else "C") + session_cookie[1:]
    assert (
        requests.get(
            server.base + "/", headers={"Cookie": f"modgate_console={forged}"}, timeout=10
        ).status_code
        == 401
    )


def test_a_forged_or_missing_csrf_token_is_refused_and_nothing_is_decided(start_console, r, bucket):
    server = start_console()
    verdict, _ = publish(r, bucket, "a.png")
    ana, ben = session(server, "ana"), session(server, "ben")
    page = ana.get(f"{server.base}/items/{verdict.id}", timeout=10)
    assert page.status_code == 200
    bens_token = form_value(ben.get(server.base + "/", timeout=10).text, "csrf")
    url = f"{server.base}/items/{verdict.id}/decide"
    for data in (
        {"decision": "unsafe", "category": "sexual", "csrf": "forged"},
        {"decision": "unsafe", "category": "sexual"},
        {"decision": "unsafe", "category": "sexual", "csrf": bens_token},  # another session's token
    ):
        answer = ana.post(url, data=data, allow_redirects=False, timeout=10)
        assert answer.status_code == 403, (data, answer.status_code)
    assert ana.post(f"{url[:-7]}/skip", data={"csrf": "x"}, timeout=10).status_code == 403
    assert ana.post(server.base + "/logout", data={"csrf": ""}, timeout=10).status_code == 403
    # A bearer client has a CSRF token too (derived from the reviewer), so a form is never
    # acted on without one.
    assert requests.post(url, data={"decision": "safe"}, headers=bearer("ana"), timeout=10).status_code == 403
    assert r.xlen(keys.REVIEWS) == 0 and queued(r) == [verdict.id]


def test_two_reviewers_are_never_shown_the_same_item(start_console, r, bucket):
    server = start_console()
    first, _ = publish(r, bucket, "a.png", score=0.7)
    second, _ = publish(r, bucket, "b.png", score=0.6)
    ana, ben = session(server, "ana"), session(server, "ben")
    to_ana = ana.get(server.base + "/next", allow_redirects=False, timeout=10)
    assert to_ana.headers["Location"] == f"/items/{first.id}"  # highest score first
    assert ana.get(server.base + to_ana.headers["Location"], timeout=10).status_code == 200
    to_ben = ben.get(server.base + "/next", allow_redirects=False, timeout=10)
    assert to_ben.headers["Location"] == f"/items/{second.id}"
    bens_queue = ben.get(server.base + "/", timeout=10).text
    assert second.id in bens_queue and first.id not in bens_queue
    held = ben.get(f"{server.base}/items/{first.id}", timeout=10)
    assert held.status_code == 423 and "ana" in held.text
    # Skipping gives it back to the others and hides it from the one who skipped.
    csrf = form_value(ana.get(f"{server.base}/items/{first.id}", timeout=10).text, "csrf")
    ana.post(f"{server.base}/items/{first.id}/skip", data={"csrf": csrf}, allow_redirects=False, timeout=10)
    assert first.id in ben.get(server.base + "/", timeout=10).text
    assert first.id not in ana.get(server.base + "/", timeout=10).text


def test_the_first_decision_stands_and_the_second_reviewer_sees_it(start_console, r, bucket):
    server = start_console()
    verdict, _ = publish(r, bucket, "a.png")
    ana, ben = session(server, "ana"), session(server, "ben")
    csrf = form_value(ana.get(f"{server.base}/items/{verdict.id}", timeout=10).text, "csrf")
    decided = ana.post(
        f"{server.base}/items/{verdict.id}/decide",
        data={"decision": "unsafe", "category": "sexual", "csrf": csrf},
        allow_redirects=False,
        timeout=10,
    )
    assert decided.status_code == 303 and queued(r) == []
    late = ben.get(f"{server.base}/items/{verdict.id}", timeout=10)
    assert late.status_code == 409 and "ana" in late.text and "unsafe" in late.text
    bens_csrf = form_value(late.text, "csrf")
    again = ben.post(
        f"{server.base}/items/{verdict.id}/decide", data={"decision": "safe", "csrf": bens_csrf}, timeout=10
    )
    assert again.status_code == 409 and "ana" in again.text
    # The console forgot the item (its record expired) and the verdict came again: the
    # backend's record still says who decided first, to a form posted straight away...
    r.delete(keys.review_item(verdict.id))
    publish(r, bucket, "a.png")
    requests.get(server.base + "/", headers=bearer("ben"), timeout=10)
    assert queued(r) == [verdict.id]
    third = ben.post(
        f"{server.base}/items/{verdict.id}/decide", data={"decision": "safe", "csrf": bens_csrf}, timeout=10
    )
    assert third.status_code == 409 and "ana" in third.text and "unsafe" in third.text
    assert queued(r) == []
    # ...and to the item page.
    r.delete(keys.review_item(verdict.id))
    publish(r, bucket, "a.png")
    fourth = ben.get(f"{server.base}/items/{verdict.id}", timeout=10)
    assert fourth.status_code == 409 and "ana" in fourth.text and queued(r) == []
    reviews = r.xrange(keys.REVIEWS)
    assert len(reviews) == 1
    assert json.loads(reviews[0][1][b"decision"])["reviewer"] == "ana"


def test_the_export_is_the_labels_file_of_the_decisions(start_console, r, bucket):
    server = start_console()
    unsafe, _ = publish(r, bucket, "u.png")
    safe, _ = publish(r, bucket, "s.png")
    for verdict, data in (
        (unsafe, {"decision": "unsafe", "category": "violence"}),
        (safe, {"decision": "safe"}),
    ):
        page = requests.get(f"{server.base}/items/{verdict.id}", headers=bearer("ana"), timeout=10)
        answer = requests.post(
            f"{server.base}/items/{verdict.id}/decide",
            data={**data, "csrf": form_value(page.text, "csrf")},
            headers=bearer("ana"),
            allow_redirects=False,
            timeout=10,
        )
        assert answer.status_code == 303
    export = requests.get(server.base + "/export.csv", headers=bearer("ben"), timeout=10)
    assert export.status_code == 200 and export.headers["Content-Type"].startswith("text/csv")
    rows = export.text.strip().splitlines()
    assert rows[0] == "uri,label,category"
    assert sorted(rows[1:]) == sorted([f"s3://{bucket}/u.png,unsafe,violence", f"s3://{bucket}/s.png,safe,"])


def test_the_dashboard_shows_the_counters(start_console, r, bucket):
    server = start_console()
    minute = int(time.time()) // 60
    written = {
        minute: {"total": 7, "decision:safe": 4, "decision:review": 2, "decision:unsafe": 1, "status:ok": 7,
                 "category:sexual": 1},
        minute - 180: {"total": 5, "decision:safe": 3, "status:ok": 3, "status:error": 2,
                       "category:violence": 0},
        minute - 23 * 60: {"total": 2, "decision:unsafe": 2, "status:ok": 2, "category:sexual": 2},
        minute - 30 * 60: {"total": 100, "decision:safe": 100, "status:ok": 100},  # outside 24 h
    }  # fmt: skip
    for m, fields in written.items():
        for name, value in fields.items():
            r.hincrby(keys.stats_minute(m), name, value)
    r.lpush(MODERATE_QUEUE, "m1", "m2", "m3")
    for i in range(2):
        r.xadd(keys.WEBHOOK_DEAD_STREAM, {"n": i})
    publish(r, bucket, "a.png")
    publish(r, bucket, "b.png")
    requests.get(server.base + "/", headers=bearer("ana"), timeout=10)  # the queue reads the stream
    page = requests.get(server.base + "/dashboard?hours=24", headers=bearer("ana"), timeout=10).text

    def figure(name: str) -> int:
        return int(re.search(rf'id="{name}">(\d+)<', page).group(1))

    assert figure("total") == 14
    assert (figure("decision-safe"), figure("decision-review"), figure("decision-unsafe")) == (7, 2, 3)
    assert (figure("status-ok"), figure("status-error")) == (12, 2)
    assert (figure("queue-depth"), figure("review-backlog"), figure("dead-letters")) == (3, 2, 2)
    counts = dict(re.findall(r'data-category="(\w+)">(\d+)<', page))
    assert counts == {"sexual": "3", "violence": "0"}
    wide = requests.get(server.base + "/dashboard?hours=48", headers=bearer("ana"), timeout=10).text
    assert re.search(r'id="total">(\d+)<', wide).group(1) == "114"
    assert "<rect" in page and "<script" not in page


def test_the_image_proxy_serves_only_images_under_the_cap(start_console, r, bucket, s3_client):
    server = start_console(image_max_bytes=4096)
    small = png(32, 24)
    s3_client.put_object(Bucket=bucket, Key="ok.png", Body=small, ContentType="text/html")
    s3_client.put_object(
        Bucket=bucket, Key="page.png", Body=b"<html><script>alert(1)</script></html>", ContentType="image/png"
    )
    big = png(400, 400, seed=3) + b"\0" * 5000
    s3_client.put_object(Bucket=bucket, Key="big.png", Body=big)
    s3_client.put_object(Bucket=bucket, Key="held/q.png", Body=png(16, 16, seed=5))
    ok, _ = publish(r, bucket, "ok.png")
    page, _ = publish(r, bucket, "page.png")
    large, _ = publish(r, bucket, "big.png")
    moved, _ = publish(r, bucket, "q.png")
    gone, _ = publish(r, bucket, "missing.png")
    r.set(keys.action_outcome(moved.id), json.dumps({"quarantined_to": f"s3://{bucket}/held/q.png"}))
    requests.get(server.base + "/", headers=bearer("ana"), timeout=10)

    def image(verdict_id: str) -> requests.Response:
        return requests.get(f"{server.base}/items/{verdict_id}/image", headers=bearer("ana"), timeout=10)

    served = image(ok.id)
    assert served.status_code == 200 and served.content == small
    assert served.headers["Content-Type"] == "image/png"  # from the bytes, not S3's text/html
    assert served.headers["X-Content-Type-Options"] == "nosniff"
    assert served.headers["Content-Security-Policy"] == "default-src 'none'"
    assert served.headers["Cache-Control"] == "no-store"
    assert image(page.id).status_code == 415
    assert image(large.id).status_code == 413
    quarantined = image(moved.id)
    assert quarantined.status_code == 200 and quarantined.content == png(16, 16, seed=5)
    assert image(gone.id).status_code == 404
    assert image("0" * 32).status_code == 404  # not a queued verdict: the proxy reads nothing


def test_only_the_latest_entry_of_a_verdict_is_queued(start_console, r, bucket):
    server = start_console()
    # A transient error sent to review, then the object judged safe: nothing to review.
    timed_out, _ = publish(r, bucket, "a.png", status="error", decision="review")
    # Two review entries for one verdict in one read, and a third in a later read.
    twice, _ = publish(r, bucket, "b.png", score=0.55)
    publish(r, bucket, "b.png", score=0.65)
    unsafe, _ = publish(r, bucket, "u.png", decision="unsafe", score=0.95)  # not queued by default
    requests.get(server.base + "/", headers=bearer("ana"), timeout=10)
    assert sorted(queued(r)) == sorted([timed_out.id, twice.id])
    publish(r, bucket, "a.png", decision="safe")
    _, latest = publish(r, bucket, "b.png", score=0.75)
    page = requests.get(server.base + "/", headers=bearer("ana"), timeout=10).text
    assert queued(r) == [twice.id] and page.count(f'data-verdict="{twice.id}"') == 1
    assert r.zscore(keys.REVIEW_QUEUE, twice.id) == pytest.approx(0.75)
    assert json.loads(r.get(keys.review_item(twice.id)))["entry_id"] == latest
    assert unsafe.id not in queued(r)
    # Every entry read was acknowledged.
    assert r.xpending(keys.VERDICT_STREAM, keys.CONSOLE_GROUP)["pending"] == 0


def test_unsafe_verdicts_enter_for_confirmation_when_enabled_and_filters_apply(start_console, r, bucket):
    server = start_console(queue_unsafe=True)
    unsafe, _ = publish(r, bucket, "u.png", decision="unsafe", score=0.95, category="violence", tenant="acme")
    review, _ = publish(r, bucket, "r.png", tenant="other")

    def listed(query: str) -> set[str]:
        page = requests.get(server.base + "/" + query, headers=bearer("ana"), timeout=10).text
        return set(re.findall(r'data-verdict="(\w+)"', page))

    assert listed("") == {unsafe.id, review.id}
    assert listed("?category=violence") == {unsafe.id}
    assert listed("?tenant=other") == {review.id}
    assert listed("?max_age_h=1") == {unsafe.id, review.id}
    assert listed("?min_age_h=1") == set()


def test_the_queue_is_bounded_lowest_scores_leave_first(start_console, r, bucket):
    server = start_console(queue_maxlen=3)
    made = [publish(r, bucket, f"{i}.png", score=0.5 + i / 100)[0] for i in range(5)]
    requests.get(server.base + "/", headers=bearer("ana"), timeout=10)
    assert queued(r) == [made[4].id, made[3].id, made[2].id]
    assert r.get(keys.review_item(made[0].id)) is None


def console_routes() -> list[tuple[str, str]]:
    from console.app import create_app
    from modgate.settings import load_settings

    app = create_app(load_settings(), background=False)  # no connection is made to build it
    schema = app.openapi()
    return [(path, method) for path, ops in schema["paths"].items() for method in ops]


@pytest.fixture
def console_process(redis_server, moto_server, s3_env, tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "MODGATE_REDIS__URL": redis_server.url,
        "MODGATE_CONSOLE__TOKENS": json.dumps(TOKENS),
        "MODGATE_CONSOLE__COOKIE_SECURE": "false",
    }
    log = open(tmp_path / "console.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "console", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            requests.get(base + "/healthz", timeout=1)
            break
        except requests.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError((tmp_path / "console.log").read_text()) from None
            time.sleep(0.1)
    yield base
    proc.terminate()
    proc.wait(10)
    log.close()


@pytest.mark.parametrize("authenticated", [True, False], ids=["bearer", "anonymous"])
def test_schemathesis_finds_no_server_error(console_process, r, bucket, tmp_path, authenticated):
    for i in range(3):
        publish(r, bucket, f"{i}.png")
    auth = ["--header", f"Authorization: Bearer {TOKENS['ana']}"] if authenticated else []
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            console_process + "/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "30",
            "--seed",
            "1",
            "--workers",
            "1",
            "--no-shrink",
            *auth,
            "--report-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    # Every operation tested, every generated case passed (warnings, e.g. the 404s of random
    # verdict ids or the 401s without a token, are not failures).
    assert re.search(r"Tested: (\d+)", out.stdout).group(1) == str(len(console_routes())), out.stdout[-3000:]
    assert re.search(r"(\d+) generated, \1 passed", out.stdout), out.stdout[-3000:]
    assert "Server error" not in out.stdout


def test_a_decision_whose_webhooks_cannot_be_queued_is_finished_by_deciding_again(
    redis_server, moto_server, s3_env, r, bucket
):
    from console.app import webhook_sender
    from tests.console.conftest import ConsoleServer, console_settings

    settings = console_settings(redis_server.url, moto_server.url)
    # The webhook queue's broker is down (nothing listens there); Redis itself is up.
    down = ConsoleServer(settings, send_task=webhook_sender(f"redis://127.0.0.1:{free_port()}/0"))
    verdict, _ = publish(r, bucket, "a.png", urls=["http://127.0.0.1:9/hook"])
    ana = session(down, "ana")
    csrf = form_value(ana.get(f"{down.base}/items/{verdict.id}", timeout=10).text, "csrf")
    data = {"decision": "unsafe", "category": "sexual", "csrf": csrf}
    failed = ana.post(f"{down.base}/items/{verdict.id}/decide", data=data, allow_redirects=False, timeout=30)
    assert failed.status_code == 503 and "Decide the same again" in failed.text
    assert queued(r) == [verdict.id]  # still there, for the reviewer to finish
    down.stop()
    up = ConsoleServer(settings)
    ana = session(up, "ana")
    csrf = form_value(ana.get(f"{up.base}/items/{verdict.id}", timeout=10).text, "csrf")
    done = ana.post(
        f"{up.base}/items/{verdict.id}/decide", data={**data, "csrf": csrf}, allow_redirects=False, timeout=30
    )
    assert done.status_code == 303 and queued(r) == []
    assert r.xlen(keys.REVIEWS) == 1 and r.zcard(keys.WEBHOOK_PENDING) == 1  # its webhook is on its way
    up.stop()


def test_a_decision_whose_console_died_is_finished_by_a_running_console(
    redis_server, moto_server, s3_env, r, bucket
):
    from console.app import webhook_sender
    from tests.console.conftest import ConsoleServer, console_settings

    settings = console_settings(redis_server.url, moto_server.url)
    settings.review.resume_after_s = 1.0
    down = ConsoleServer(settings, send_task=webhook_sender(f"redis://127.0.0.1:{free_port()}/0"))
    verdict, _ = publish(r, bucket, "a.png", urls=["http://127.0.0.1:9/hook"])
    ana = session(down, "ana")
    csrf = form_value(ana.get(f"{down.base}/items/{verdict.id}", timeout=10).text, "csrf")
    data = {"decision": "unsafe", "category": "sexual", "csrf": csrf}
    assert ana.post(f"{down.base}/items/{verdict.id}/decide", data=data, timeout=30).status_code == 503
    down.stop()
    # Nobody decides again: the running console's sweeper carries the decision out.
    up = ConsoleServer(settings)
    deadline = time.monotonic() + 30
    while (queued(r) or r.zcard(keys.WEBHOOK_PENDING) == 0) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert queued(r) == [] and r.zcard(keys.WEBHOOK_PENDING) == 1 and r.zcard(keys.REVIEW_INCOMPLETE) == 0
    assert json.loads(r.get(keys.review_decided(verdict.id)))["complete"] is True
    up.stop()


def test_consumers_of_gone_consoles_are_forgotten_and_their_unacked_entries_claimed(r, bucket, monkeypatch):
    from console import queue as queue_module
    from console.queue import ReviewQueue
    from modgate.settings import ConsoleSettings

    for key in ("a.png", "b.png"):
        publish(r, bucket, key)
    r.xgroup_create(keys.VERDICT_STREAM, keys.CONSOLE_GROUP, id="0")
    ((_, [(done, _)]),) = r.xreadgroup(keys.CONSOLE_GROUP, "gone:1", {keys.VERDICT_STREAM: ">"}, count=1)
    r.xack(keys.VERDICT_STREAM, keys.CONSOLE_GROUP, done)
    r.xreadgroup(keys.CONSOLE_GROUP, "crashed:2", {keys.VERDICT_STREAM: ">"}, count=1)  # never acked
    monkeypatch.setattr(queue_module, "STALE_CONSUMER_MS", -1)  # "a day ago" is now
    queue = ReviewQueue(r, ConsoleSettings())
    queue.pump()
    names = {c["name"].decode() for c in r.xinfo_consumers(keys.VERDICT_STREAM, keys.CONSOLE_GROUP)}
    assert "gone:1" not in names and "crashed:2" in names
    # crashed:2's entry stays pending for it until a minute idle, then is claimed: not lost.
    assert r.xpending(keys.VERDICT_STREAM, keys.CONSOLE_GROUP)["consumers"] == [
        {"name": b"crashed:2", "pending": 1}
    ]
    monkeypatch.setattr(queue_module, "CLAIM_IDLE_MS", 0)  # "a minute idle" is now
    queue.pump()
    assert len(queued(r)) == 1 and r.xpending(keys.VERDICT_STREAM, keys.CONSOLE_GROUP)["pending"] == 0
