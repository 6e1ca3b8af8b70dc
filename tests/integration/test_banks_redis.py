"""Hash banks through a real redis-server: ``modgate banks`` writes, workers follow.

Two worker processes (each a BankSync in its own interpreter, as in ``modgate worker``)
take a bank added while they run within 5 s — the product's promise, measured and
printed — and drop a removed hash as fast; a bank corrupted by hand is refused with a
message while the last good copy keeps matching; a worker that fell behind the changes
stream's kept history loads its banks again; a copy older than ``max_stale_s`` turns
health not ok. The command line: every subcommand, and bad input as exit 2, never a
traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

from modgate import keys
from modgate.banks import BankEntry, BankSpec
from modgate.settings import BankSettings, ResultsSettings
from modgate.verdict import Hashes, Source, Verdict
from tests.servers import RedisServer
from worker.cli import app
from worker.delivery.publisher import ResultPublisher
from worker.judge.banks import BankStore, BankSync

REPO = Path(__file__).resolve().parents[2]
PROMISE_S = 5.0
PDQ_A = "f" * 32 + "0" * 32
PDQ_B = "0f" * 32


def near(h: str, bits: int) -> str:
    return f"{int(h, 16) ^ ((1 << bits) - 1):064x}"


@pytest.fixture
def client(redis_server):
    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    return r


@pytest.fixture
def env(redis_server, monkeypatch):
    monkeypatch.setenv("MODGATE_REDIS__URL", redis_server.url)
    monkeypatch.delenv("MODGATE_CONFIG", raising=False)
    return {"MODGATE_REDIS__URL": redis_server.url}


def cli(*args: str, env: dict[str, str] | None = None):
    result = CliRunner().invoke(app, ["banks", *args], env=env)
    assert "Traceback" not in (result.output or ""), result.output
    return result


# A worker process: a BankSync on its own Redis connection, answering questions on stdin.
CHILD = r"""
import dataclasses, json, sys
import redis
from modgate.settings import BankSettings
from worker.judge.banks import BankSync

sync = BankSync(redis.Redis.from_url(sys.argv[1]), BankSettings.model_validate_json(sys.argv[2]))
sync.start()
print(json.dumps("ready"), flush=True)
for line in sys.stdin:
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "pdq":
        out = [dataclasses.asdict(m) for m in sync.banks.match_pdq([(arg, 100)])]
    elif cmd == "md5":
        out = [dataclasses.asdict(m) for m in sync.banks.match_exact(arg, None)]
    else:
        out = sync.health()
    print(json.dumps(out), flush=True)
"""


class SyncProcess:
    def __init__(self, url: str, settings: BankSettings) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, url, settings.model_dump_json()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        assert self.proc.stdout is not None
        assert json.loads(self.proc.stdout.readline()) == "ready"

    def ask(self, line: str = "health") -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def wait_until(condition, timeout: float) -> float:
    """Seconds until ``condition()`` held (polled every 20 ms); fails past ``timeout``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - start


def test_a_bank_change_reaches_two_worker_processes_within_5_seconds(client, redis_server):
    settings = BankSettings()  # the defaults: poll every 1 s, jittered
    store = BankStore(client, settings)
    store.put_spec(BankSpec(name="known", kind="pdq"))
    store.add("known", [BankEntry(PDQ_B)])
    workers = [SyncProcess(redis_server.url, settings) for _ in range(2)]
    try:
        for w in workers:
            assert [m["hash"] for m in w.ask(f"pdq {PDQ_B}")] == [PDQ_B]
            assert w.ask(f"pdq {near(PDQ_A, 20)}") == []

        # Added while they run: a near-duplicate of it matches in both.
        store.add("known", [BankEntry(PDQ_A, "takedown")])
        added = time.monotonic()
        took = []
        for w in workers:
            wait_until(
                lambda w=w: [m["distance"] for m in w.ask(f"pdq {near(PDQ_A, 20)}")] == [20], 2 * PROMISE_S
            )
            took.append(time.monotonic() - added)
        print(
            f"\nbank add took effect in both workers after {max(took):.2f} s",
            f"({', '.join(f'{t:.2f}' for t in took)})",
        )
        assert max(took) <= PROMISE_S

        # A new bank, created and filled while they run.
        store.put_spec(BankSpec(name="md5s", kind="md5", action="review"))
        store.add("md5s", [BankEntry("ab" * 16)])
        created = time.monotonic()
        for w in workers:
            wait_until(
                lambda w=w: [m["action"] for m in w.ask(f"md5 {'ab' * 16}")] == ["review"], 2 * PROMISE_S
            )
        print(f"new bank matched in both after {time.monotonic() - created:.2f} s")
        assert time.monotonic() - created <= PROMISE_S

        # Removed: it stops matching in both.
        store.remove("known", [PDQ_A])
        removed = time.monotonic()
        for w in workers:
            wait_until(lambda w=w: w.ask(f"pdq {near(PDQ_A, 20)}") == [], 2 * PROMISE_S)
        print(f"removal took effect in both after {time.monotonic() - removed:.2f} s")
        assert time.monotonic() - removed <= PROMISE_S
        for w in workers:
            assert [m["hash"] for m in w.ask(f"pdq {PDQ_B}")] == [PDQ_B]  # the rest stays
            health = w.ask()
            assert health["ok"] and health["banks"]["known"]["hashes"] == 1
            assert health["banks"]["md5s"]["state"] == "ok"
    finally:
        for w in workers:
            w.stop()


def two_syncs(client, **kw) -> list[BankSync]:
    settings = BankSettings(reload_jitter_s=0, **kw)
    syncs = [BankSync(redis.Redis(connection_pool=client.connection_pool), settings) for _ in range(2)]
    for s in syncs:
        s.poll()
    return syncs


def corrupt_spec(client):
    client.hset(keys.BANKS, "known", '{"name": "known", "kind": "pdq", "action": "bl')  # half a JSON


def corrupt_entries(client):
    client.hset(keys.bank_entries("known"), "not-a-hash", "")


def corrupt_meta(client):
    client.delete(keys.bank_meta("known"))


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (corrupt_spec, "its spec does not validate"),
        (corrupt_entries, "3 hashes stored but its meta counts 2"),
        (corrupt_meta, "meta record (version, count) is missing"),
    ],
)
def test_a_bank_corrupted_by_hand_is_refused_and_the_last_good_copy_keeps_matching(
    client, env, tmp_path, corrupt, message
):
    store = BankStore(client, BankSettings())
    assert cli("add", "known", PDQ_A, PDQ_B, "--kind", "pdq").exit_code == 0
    syncs = two_syncs(client)
    for s in syncs:
        assert [m.hash for m in s.banks.match_pdq([(near(PDQ_A, 3), 90)])] == [PDQ_A]

    corrupt(client)
    for s in syncs:
        s.poll()
        health = s.health()
        assert health["refused"] == ["known"] and message in health["banks"]["known"]["error"]
        assert health["ok"]  # not stale yet: the last good copy is recent
        assert [m.hash for m in s.banks.match_pdq([(near(PDQ_A, 3), 90)])] == [PDQ_A]
    assert store.state("known").problem is not None

    # The command line refuses to write to it (exit 3) and says how to repair it.
    result = cli("add", "known", near(PDQ_B, 1))
    assert result.exit_code == 3 and message in result.output and "--replace" in result.output
    listed = cli("list", "--json")
    assert json.loads(listed.output)["valid"] is False

    # A worker starting now refuses it too: no copy at all, and says so.
    fresh = BankSync(client, BankSettings())
    fresh.poll()
    assert fresh.banks.get("known") is None and fresh.health()["banks"]["known"]["state"] == "refused"

    # Repair: rewrite it from a file; every worker loads it again.
    bank_file = tmp_path / "known.txt"
    bank_file.write_text(f"{PDQ_B}\n{'1' * 64}\n")
    result = cli("import", "known", str(bank_file), "--replace", "--kind", "pdq")
    assert result.exit_code == 0, result.output
    assert store.state("known").problem is None and store.state("known").stored == 2
    for s in [*syncs, fresh]:
        s.poll()
        assert s.health()["refused"] == []
        assert s.banks.match_pdq([(near(PDQ_A, 3), 90)]) == []
        assert [m.hash for m in s.banks.match_pdq([("1" * 64, 90)])] == ["1" * 64]


def test_a_hash_replaced_by_hand_is_refused_by_the_next_load_only_once(client):
    """A field swapped for garbage keeps the count right: running workers keep their good
    copy (nothing changed for them); a worker that loads the bank refuses it, and does not
    read it again until the bank changes."""
    store = BankStore(client, BankSettings())
    store.put_spec(BankSpec(name="known", kind="pdq"))
    store.add("known", [BankEntry(PDQ_A), BankEntry(PDQ_B)])
    (running,) = two_syncs(client)[:1]
    client.hdel(keys.bank_entries("known"), PDQ_B)
    client.hset(keys.bank_entries("known"), PDQ_B.upper(), "")  # not lowercase: not as stored
    fresh = BankSync(client, BankSettings())
    for _ in range(3):
        fresh.poll()
        running.poll()
    health = fresh.health()
    assert "a stored hash is not valid" in health["banks"]["known"]["error"]
    assert fresh.banks.get("known") is None
    assert fresh._copies["known"].reloads == 0 and running.health()["refused"] == []
    assert [m.hash for m in running.banks.match_pdq([(PDQ_B, 90)])] == [PDQ_B]
    # The bank changes (a hash added): the fresh worker tries again.
    store.add("known", [BankEntry("1" * 64)])
    fresh.poll()
    assert "a stored hash is not valid" in fresh.health()["banks"]["known"]["error"]


def test_a_worker_behind_the_trimmed_stream_loads_its_banks_again(client):
    settings = BankSettings(changes_maxlen=100, reload_jitter_s=0)
    store = BankStore(client, settings)
    store.put_spec(BankSpec(name="b", kind="md5"))
    behind, current = two_syncs(client, changes_maxlen=100)
    hashes = [f"{i:032x}" for i in range(600)]
    for h in hashes:  # one stream entry each: far more than the stream keeps
        store.add("b", [BankEntry(h)])
        if int(h, 16) % 50 == 0:
            current.poll()  # keeps up
    assert client.xlen(keys.BANK_CHANGES) < 600
    current.poll()
    behind.poll()
    assert behind.full_loads == 1 and current.full_loads == 0
    for s in (behind, current):
        assert len(s.banks.get("b")) == 600
        assert s.banks.match_exact(hashes[0], None) and s.banks.match_exact(hashes[-1], None)


def test_a_pdq_bank_loaded_again_is_brought_up_to_date_in_place(client):
    settings = BankSettings(changes_maxlen=100, reload_jitter_s=0)
    store = BankStore(client, settings)
    store.put_spec(BankSpec(name="p", kind="pdq"))
    rng = random.Random(3)
    first = [f"{rng.getrandbits(256):064x}" for _ in range(300)]
    later = [f"{rng.getrandbits(256):064x}" for _ in range(150)]
    store.add("p", [BankEntry(h) for h in first])
    (sync,) = two_syncs(client, changes_maxlen=100)[:1]
    sync.poll()
    held = sync.banks.get("p")
    for h in first[:150]:  # one stream entry each: more than the stream keeps
        store.remove("p", [h])
    for h in later:
        store.add("p", [BankEntry(h)])
    sync.poll()
    assert sync.full_loads == 1
    # The same bank object, its index brought to Redis's 300 hashes (no second copy held).
    assert sync.banks.get("p") is held and len(held) == 300
    assert set(held.index.hashes()) == {e.hash for e in store.entries("p")}
    assert [m.hash for m in held.match(later[-1])] == [later[-1]] and not held.match(first[0])


def test_a_copy_older_than_max_stale_s_turns_health_not_ok(tmp_path):
    server = RedisServer(tmp_path / "redis")
    try:
        r = redis.Redis.from_url(server.url, socket_timeout=1)
        store = BankStore(r, BankSettings())
        store.put_spec(BankSpec(name="b", kind="sha256"))
        store.add("b", [BankEntry("cd" * 32)])
        sync = BankSync(r, BankSettings(max_stale_s=0.5, poll_interval_s=0.1))
        sync.start()
        assert sync.health()["ok"]
        server.stop()
        wait_until(lambda: not sync.health()["ok"], 10)
        health = sync.health()
        assert health["stale"] == ["b"] and "error" in health
        assert sync.banks.match_exact(None, "cd" * 32)  # still matching from its copy
        server.start()
        wait_until(lambda: sync.health()["ok"], 10)
        sync.stop()
    finally:
        server.stop()


def test_cli_add_list_export_import_remove(client, env, tmp_path):
    assert cli("list").output.strip() == "no banks"
    result = cli(
        "add", "takedowns", PDQ_A.upper(), "--kind", "pdq", "--note", "ticket 1", "--max-distance", "20"
    )
    assert result.exit_code == 0 and "1 added" in result.output
    result = cli("add", "takedowns", PDQ_A, PDQ_B, "--action", "review")
    assert result.exit_code == 0 and "1 added, 1 already there" in result.output
    rows = [json.loads(line) for line in cli("list", "--json").output.splitlines()]
    assert rows == [
        {
            "name": "takedowns",
            "kind": "pdq",
            "category": "illegal_activity",
            "action": "review",
            "max_distance": 20,
            "allow_pdq": False,
            "hashes": 2,
            "version": rows[0]["version"],
            "valid": True,
        }
    ]
    out = tmp_path / "takedowns.csv"
    assert cli("export", "takedowns", "--out", str(out)).exit_code == 0
    assert out.read_text().splitlines() == ["hash,note,quality", f"{PDQ_B},,", f"{PDQ_A},ticket 1,"]
    exported = cli("export", "takedowns").output
    assert exported == out.read_text()

    # Import into another bank: the exported file reads back.
    assert cli("import", "copy", str(out), "--kind", "pdq").exit_code == 0
    assert {e.hash for e in BankStore(client, BankSettings()).entries("copy")} == {PDQ_A, PDQ_B}

    assert cli("remove", "takedowns", PDQ_B).exit_code == 0
    assert "1 pdq hashes" in cli("remove", "takedowns", PDQ_B).output
    assert cli("remove", "copy", "--all").exit_code == 0
    assert [json.loads(line)["name"] for line in cli("list", "--json").output.splitlines()] == ["takedowns"]


def test_a_hash_given_twice_in_one_add_keeps_the_bank_valid(client, env):
    # The meta's count once grew by both copies, so every worker refused the bank as
    # "written outside modgate" from then on.
    result = cli("add", "twice", PDQ_A, PDQ_A.upper(), PDQ_B, "--kind", "pdq")
    assert result.exit_code == 0 and "2 added" in result.output
    state = BankStore(client, BankSettings()).state("twice")
    assert state.problem is None and state.count == state.stored == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["add", "b", "abc", "--kind", "pdq"], "not a pdq hash: 3 hex digits, expected 64"),
        (["add", "b", "z" * 64, "--kind", "pdq"], "not a pdq hash (not hexadecimal)"),
        (["add", "b", "a" * 64], "no bank named 'b': give --kind"),
        (["add", "b", "a" * 64, "--kind", "pdq", "--quality", "20"], "quality 20 is below 50"),
        (
            ["add", "b", "a" * 32, "--kind", "md5", "--max-distance", "4"],
            "max_distance applies to PDQ banks only",
        ),
        (["add", "b:c", "a" * 64, "--kind", "pdq"], "bank 'b:c': name"),
        (["add", "b", "a" * 64, "--kind", "pdq", "--category", "nope"], "category"),
        (["remove", "nothing", "--all"], "no bank named 'nothing'"),
        (["export", "nothing"], "no bank named 'nothing'"),
        (["add-from-verdict", "b", "xyz", "--kind", "pdq"], "not a verdict id"),
    ],
)
def test_cli_bad_input_is_a_message_and_exit_2(client, env, args, message):
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert client.hlen(keys.BANKS) == 0  # nothing written


def test_cli_malformed_bank_file_names_its_line_and_writes_nothing(client, env, tmp_path):
    path = tmp_path / "list.csv"
    path.write_text(f"hash,note\n{PDQ_A},ok\n{PDQ_B[:-1]},short\n")
    result = cli("import", "b", str(path), "--kind", "pdq")
    assert result.exit_code == 2 and f"{path}:3: not a pdq hash: 63 hex digits" in result.output
    assert client.hlen(keys.BANKS) == 0
    assert cli("add", "b", PDQ_A, "--kind", "pdq").exit_code == 0
    result = cli("add", "b", "--kind", "md5")
    assert result.exit_code == 2 and "kind cannot change" in result.output


def test_cli_bad_config_and_unreachable_redis_exit_3(client, env, tmp_path):
    result = cli("list", env={"MODGATE_BANKS__POLL_INTERVAL_S": "-1"})
    assert result.exit_code == 3 and "invalid settings" in result.output
    result = cli("list", env={"MODGATE_REDIS__URL": "redis://127.0.0.1:1/0"})
    assert result.exit_code == 3 and "Redis" in result.output


def test_cli_the_entry_point_itself(env):
    """Once through ``python -m worker.cli`` (what ``modgate`` runs): a malformed hash."""
    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli", "banks", "add", "b", "a" * 63, "--kind", "pdq"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **env},
        timeout=60,
    )
    assert proc.returncode == 2 and "not a pdq hash" in proc.stderr and "Traceback" not in proc.stderr


def publish(client, vid_source: str, hashes: Hashes | None, status: str = "ok") -> str:
    source = Source(kind="s3", uri=f"s3://b/{vid_source}", bucket="b", key=vid_source, sha256="ee" * 32)
    verdict = Verdict(
        id=hashlib.sha256(vid_source.encode()).hexdigest()[:32],
        source=source,
        status=status,
        decision="unsafe" if status == "ok" else None,
        policy_version="t",
        hashes=hashes,
    )
    ResultPublisher(client, ResultsSettings()).publish(verdict)
    return verdict.id


def test_cli_add_from_verdict_takes_the_banks_kind_of_hash(client, env, tmp_path):
    good = publish(client, "k1", Hashes(pdq=PDQ_A, pdq_quality=90, md5="aa" * 16))
    flat = publish(client, "k2", Hashes(pdq=PDQ_B, pdq_quality=20, md5="bb" * 16))
    # Found through its published marker, and (marker gone) by scanning the stream.
    client.delete(keys.published_marker(flat))
    result = cli("add-from-verdict", "takedowns", good, "--kind", "pdq")
    assert result.exit_code == 0 and "1 added" in result.output
    result = cli("add-from-verdict", "takedowns", flat)
    assert result.exit_code == 1 and "quality 20 is below 50" in result.output
    result = cli("add-from-verdict", "takedowns-md5", good, flat, "--kind", "md5")
    assert result.exit_code == 0 and "2 added" in result.output
    result = cli("add-from-verdict", "takedowns-sha", good, "--kind", "sha256")
    assert result.exit_code == 0
    result = cli("add-from-verdict", "takedowns", "0" * 32)
    assert result.exit_code == 1 and "not on the results stream" in result.output
    store = BankStore(client, BankSettings())
    assert [(e.hash, e.note) for e in store.entries("takedowns")] == [(PDQ_A, f"verdict {good}")]
    assert {e.hash for e in store.entries("takedowns-md5")} == {"aa" * 16, "bb" * 16}
    assert [e.hash for e in store.entries("takedowns-sha")] == ["ee" * 32]

    # From a file of verdicts (``modgate scan --output``): all of them, or those named.
    lines = tmp_path / "verdicts.jsonl"
    v = {"id": "1" * 32, "status": "ok", "source": {"sha256": "11" * 32}, "hashes": {"md5": "cc" * 16}}
    e = {"id": "2" * 32, "status": "error", "source": {}}
    lines.write_text(json.dumps(v) + "\n\n" + json.dumps(e) + "\n")
    result = cli("add-from-verdict", "from-file", "--from-file", str(lines), "--kind", "md5")
    assert result.exit_code == 1 and "1 added" in result.output and "an error verdict" in result.output
    result = cli("add-from-verdict", "from-file", "1" * 32, "--from-file", str(lines))
    assert result.exit_code == 0 and "1 already there" in result.output
    lines.write_text("{not json\n")
    result = cli("add-from-verdict", "from-file", "--from-file", str(lines))
    assert result.exit_code == 2 and "verdicts.jsonl:1: not a JSON verdict" in result.output
