"""Hash banks through Redis as deployed: two real ``modgate worker`` processes, banks
changed with the real ``modgate banks`` command while they run, objects in an S3 API server.
A change reaches every worker without a restart; an unsafe match skips the models; an
allow-list makes a verdict safe; a removed hash stops matching; take-down feedback
(``add-from-verdict``) blocks a re-upload."""

import hashlib
import subprocess
import sys
import time

from modgate import keys
from tests.helpers import jpeg, verdicts, wait_for
from tests.integration.test_worker import env, producer, r  # noqa: F401 (fixtures)

MODGATE = [sys.executable, "-m", "worker.cli"]
# The product's promise: a bank change applies in every running worker within 5 s.
APPLIED_S = 5.0


def banks(env, *args):  # noqa: F811
    result = subprocess.run([*MODGATE, "banks", *args], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def moderate(producer, r, bucket, keys_, seen):  # noqa: F811
    for key in keys_:
        producer({"items": [{"bucket": bucket, "key": key}]})
    wait_for(lambda: len({v["source"]["key"] for v in verdicts(r)} - seen) >= len(keys_), what="verdicts")
    out = {v["source"]["key"]: v for v in verdicts(r) if v["source"]["key"] in keys_}
    seen.update(out)
    return out


def test_bank_changes_reach_running_workers_and_decide_before_the_models(
    env,  # noqa: F811
    r,  # noqa: F811
    producer,  # noqa: F811
    workers,
    s3_client,
    bucket,
):
    import os

    cli_env = {**os.environ, **env}
    body, allowed = jpeg(1), jpeg(2)
    for key, data in [("first.jpg", body), ("allowed.jpg", allowed)]:
        s3_client.put_object(Bucket=bucket, Key=key, Body=data)
    for i in range(4):
        s3_client.put_object(Bucket=bucket, Key=f"again-{i}.jpg", Body=body)  # re-uploads
        s3_client.put_object(Bucket=bucket, Key=f"later-{i}.jpg", Body=body)
    banks(cli_env, "add", "allow", "--kind", "sha256", "--action", "safe")  # an empty bank
    workers(env, name="a")
    workers(env, name="b")
    wait_for(lambda: len(r.keys(keys.health("*", "*"))) >= 2, what="two workers ready", timeout=180)
    seen: set[str] = set()

    first = moderate(producer, r, bucket, ["first.jpg"], seen)["first.jpg"]
    assert first["decision"] and first["matches"] == [] and "open_nsfw" in first["detectors"]

    # Take-down feedback: the verdict's hashes go to a bank while both workers run.
    banks(cli_env, "add-from-verdict", "takedowns", first["id"], "--kind", "sha256")
    sha = hashlib.sha256(jpeg(2)).hexdigest()
    banks(cli_env, "add", "allow", sha)
    time.sleep(APPLIED_S)
    got = moderate(producer, r, bucket, [f"again-{i}.jpg" for i in range(4)] + ["allowed.jpg"], seen)
    for i in range(4):  # four messages, spread over both workers
        again = got[f"again-{i}.jpg"]
        assert again["decision"] == "unsafe" and again["matches"][0]["bank"] == "takedowns"
        assert again["detectors"] == {}  # judged before decode: no model ran
    assert got["allowed.jpg"]["decision"] == "safe" and got["allowed.jpg"]["matches"][0]["bank"] == "allow"

    banks(cli_env, "remove", "takedowns", first["source"]["sha256"])
    time.sleep(APPLIED_S)
    later = moderate(producer, r, bucket, [f"later-{i}.jpg" for i in range(4)], seen)
    for verdict in later.values():
        assert verdict["matches"] == [] and verdict["decision"] == first["decision"]
        assert verdict["detectors"]["open_nsfw"] == first["detectors"]["open_nsfw"]  # the scores, reused
        assert verdict["cached_from"] == first["id"]
