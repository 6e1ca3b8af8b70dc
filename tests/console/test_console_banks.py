"""The console's bank API (console/banks.py) over HTTP against real Redis: a bank created,
hashes added and removed as a worker's bank sync then sees them, every malformed hash a 400
naming it with nothing written (never a 500: HMA's lookup answered one), take-down feedback
from verdicts on the results stream (both PDQs of a rotated image), JSON-only writes."""

from __future__ import annotations

import json

import requests

from modgate import keys
from modgate.settings import load_settings
from tests.console.conftest import TOKENS
from worker.judge.banks import BankSync

PDQ = "f0" * 16 + "0f" * 16
PDQ2 = "3c" * 32
PDQ_FILE = "a5" * 32
AUTH = {"Authorization": f"Bearer {TOKENS['ana']}"}


def api(server, method: str, path: str, body=None, **kw) -> requests.Response:
    return requests.request(
        method, server.base + "/api/banks" + path, json=body, headers=AUTH, timeout=10, **kw
    )


def stored(r, bank: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in r.hgetall(keys.bank_entries(bank)).items()}


def test_a_bank_made_and_filled_over_http_is_what_workers_load(start_console, r, redis_server):
    server = start_console()
    made = api(server, "PUT", "/takedowns", {"kind": "pdq", "category": "sexual", "max_distance": 20})
    assert made.status_code == 200, made.text
    assert made.json() | {"version": None} == {
        "name": "takedowns",
        "kind": "pdq",
        "category": "sexual",
        "action": "unsafe",
        "max_distance": 20,
        "allow_pdq": False,
        "hashes": 0,
        "version": None,
        "valid": True,
        "problem": None,
    }
    added = api(server, "POST", "/takedowns/hashes", {"hashes": [PDQ, PDQ2.upper(), PDQ], "quality": 90})
    assert added.status_code == 200, added.text
    assert added.json()["added"] == 2 and added.json()["already"] == 0 and added.json()["hashes"] == 2
    again = api(server, "POST", "/takedowns/hashes", {"hashes": [PDQ]}).json()
    assert again["added"] == 0 and again["already"] == 1
    # The reviewer is noted when no note is given: who put a hash in a bank is on record.
    assert "ana" in stored(r, "takedowns")[PDQ2]

    sync = BankSync(r, load_settings(redis={"url": redis_server.url}))
    sync.poll()
    near = f"{int(PDQ, 16) ^ 0xFFF:064x}"  # 12 bits away: within the bank's 20
    assert [m.bank for m in sync.banks.match_pdq([(near, 90)])] == ["takedowns"]

    removed = api(server, "POST", "/takedowns/remove", {"hashes": [PDQ, "0" * 64]}).json()
    assert removed["removed"] == 1 and removed["already"] == 1 and removed["hashes"] == 1
    sync.poll()
    assert sync.banks.match_pdq([(near, 90)]) == []
    listed = api(server, "GET", "").json()
    assert [(b["name"], b["hashes"], b["valid"]) for b in listed] == [("takedowns", 1, True)]


def test_every_malformed_hash_is_a_400_that_names_it_and_writes_nothing(start_console, r):
    server = start_console()
    assert api(server, "PUT", "/p", {"kind": "pdq"}).status_code == 200
    assert api(server, "PUT", "/m", {"kind": "md5"}).status_code == 200
    before = r.xlen(keys.BANK_CHANGES)
    cases = [
        ("/p", [PDQ, PDQ[:-1]], "hashes[1]: not a pdq hash: 63 hex digits"),
        ("/p", [PDQ, PDQ[:-2] + "zz"], "hashes[1]: not a pdq hash (not hexadecimal)"),
        ("/p", ["0x" + PDQ[2:]], "hashes[0]: not a pdq hash (not hexadecimal)"),
        ("/p", ["", PDQ], "hashes[0]: empty pdq hash"),
        ("/p", [PDQ[:32] + "é" * 32], "hashes[0]: not a pdq hash (not hexadecimal)"),
        ("/m", [PDQ], "hashes[0]: not a md5 hash: 64 hex digits, expected 32"),
    ]
    for bank, hashes, detail in cases:
        for route in ("/hashes", "/remove"):
            answer = api(server, "POST", bank + route, {"hashes": hashes})
            assert answer.status_code == 400, (bank, route, hashes, answer.text)
            assert answer.json()["code"] == "bad_hash" and answer.json()["detail"].startswith(detail), (
                answer.text
            )
    flat = api(server, "POST", "/p/hashes", {"hashes": [PDQ], "quality": 12})
    assert flat.status_code == 400 and "quality 12 is below 50" in flat.json()["detail"]
    assert r.xlen(keys.BANK_CHANGES) == before and stored(r, "p") == {} and stored(r, "m") == {}

    # The body's shape is checked by its schema (422), a bank that is not there is a 404, a
    # distance on an exact kind a 400, a kind that changes a 409.
    assert api(server, "POST", "/p/hashes", {"hashes": PDQ}).status_code == 422
    assert api(server, "POST", "/p/hashes", {"hashes": []}).status_code == 422
    assert api(server, "POST", "/nope/hashes", {"hashes": [PDQ]}).json()["code"] == "no_such_bank"
    assert api(server, "GET", "/nope").status_code == 404
    assert api(server, "PUT", "/m", {"kind": "md5", "max_distance": 3}).json()["code"] == "bad_bank"
    assert api(server, "PUT", "/m", {"kind": "pdq"}).json()["code"] == "bank_refused"
    assert api(server, "PUT", "/bad name", {"kind": "pdq"}).status_code == 422


def test_writes_take_json_only(start_console, r):
    server = start_console()
    assert api(server, "PUT", "/p", {"kind": "pdq"}).status_code == 200
    # What a cross-site form can send: text/plain with a JSON-looking body.
    forged = requests.post(
        server.base + "/api/banks/p/hashes",
        data=json.dumps({"hashes": [PDQ]}),
        headers={**AUTH, "Content-Type": "text/plain"},
        timeout=10,
    )
    assert forged.status_code in (415, 422) and stored(r, "p") == {}
    assert (
        requests.post(server.base + "/api/banks/p/hashes", json={"hashes": [PDQ]}, timeout=10).status_code
        == 401
    )


def test_take_down_feedback_adds_the_hashes_of_verdicts_on_the_stream(start_console, r):
    server = start_console()
    assert api(server, "PUT", "/takedowns", {"kind": "pdq"}).status_code == 200
    assert api(server, "PUT", "/takedowns-md5", {"kind": "md5"}).status_code == 200
    rotated = {
        "id": "1" * 32,
        "status": "ok",
        "source": {"kind": "s3", "uri": "s3://b/rotated.jpg", "sha256": "ab" * 32},
        "hashes": {
            "pdq": PDQ,
            "pdq_quality": 90,
            "pdq_file": PDQ_FILE,
            "pdq_file_quality": 88,
            "md5": "cd" * 16,
        },
    }
    failed = {"id": "2" * 32, "status": "error", "source": {"kind": "s3", "uri": "s3://b/broken.jpg"}}
    for verdict in (rotated, failed):
        r.xadd(keys.VERDICT_STREAM, {"verdict": json.dumps(verdict), "id": verdict["id"], "status": "ok"})
    answer = api(server, "POST", "/takedowns/from-verdicts", {"verdict_ids": ["1" * 32, "2" * 32, "3" * 32]})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["added"] == 2 and body["verdicts"] == 2 and body["hashes"] == 2
    assert sorted(stored(r, "takedowns")) == sorted([PDQ, PDQ_FILE])
    assert f"verdict {'1' * 32}" in stored(r, "takedowns")[PDQ_FILE]
    assert len(body["skipped"]) == 2
    assert any("3" * 32 in s and "not on the results stream" in s for s in body["skipped"])
    assert any("2" * 32 in s and "an error verdict" in s for s in body["skipped"])
    md5 = api(server, "POST", "/takedowns-md5/from-verdicts", {"verdict_ids": ["1" * 32]}).json()
    assert md5["added"] == 1 and list(stored(r, "takedowns-md5")) == ["cd" * 16]
    bad_id = api(server, "POST", "/takedowns/from-verdicts", {"verdict_ids": ["not-an-id"]})
    assert bad_id.status_code == 422
