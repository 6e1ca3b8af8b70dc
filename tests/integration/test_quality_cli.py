"""The quality loop as a user runs it, on real code: labelled images → ``modgate eval``
(which scans them) → ``modgate calibrate`` → ``modgate scan`` under the calibrated policy,
whose decisions must equal ``modgate replay``'s; and the bad inputs, each one clear line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from worker.quality.synthetic import generate, write
from worker.tools.samples import photo, skin_scene

MODGATE = [sys.executable, "-m", "worker.cli"]
SAFE, UNSAFE = 22, 22


def run(args, env=None):
    return subprocess.run(
        [*MODGATE, *args], capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}
    )


def decisions(path: Path) -> dict[str, str | None]:
    return {
        json.loads(line)["source"]["path"]: json.loads(line)["decision"]
        for line in path.read_text().splitlines()
    }


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Photos labelled safe, skin-toned scenes labelled sexual, and one truncated file."""
    root = tmp_path_factory.mktemp("labelled")
    (root / "images").mkdir()
    rows = ["uri,label,category,split"]
    for i in range(SAFE + UNSAFE):
        unsafe = i >= SAFE
        img = skin_scene(320, 240, seed=i) if unsafe else photo(320, 240, seed=i)
        img.save(root / "images" / f"{i:03d}.jpg", quality=85)
        rows.append(f"images/{i:03d}.jpg,{'unsafe' if unsafe else 'safe'},{'sexual' if unsafe else ''},"
                    f"{'real' if i % 2 else 'ai'}")  # fmt: skip
    good = (root / "images" / "000.jpg").read_bytes()
    (root / "images" / "broken.jpg").write_bytes(good[: len(good) // 3])
    rows.append("images/broken.jpg,safe,,real")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_scan_eval_calibrate_scan_equals_replay(labelled, tmp_path):
    labels = labelled / "labels.csv"
    ev = tmp_path / "eval"
    proc = run(["eval", str(labels), "--out", str(ev), "--no-progress", "--bootstrap", "200"])
    assert proc.returncode == 0, proc.stderr
    assert "sexual" in proc.stdout and "Traceback" not in proc.stderr
    report = json.loads((ev / "report.json").read_text())
    assert report["n"] == SAFE + UNSAFE and report["errors"] == {"corrupt_image": 1}
    assert report["overall"]["positives"] == UNSAFE and set(report["splits"]) == {"ai", "real"}
    sexual = report["categories"]["sexual"]
    assert sexual["positives"] == UNSAFE and sexual["auroc"] is not None
    assert set(sexual["detectors"]) == {"open_nsfw", "nudenet"}
    assert (ev / "sexual.png").stat().st_size > 0
    page = (ev / "report.html").read_text()
    assert "data:image/png;base64," in page and "http" not in page.replace("http-equiv", "")
    stored = ev / "verdicts.jsonl"
    assert len(stored.read_text().splitlines()) == SAFE + UNSAFE + 1

    policy = tmp_path / "calibrated.yaml"
    proc = run(
        ["calibrate", str(labels), "--verdicts", str(stored), "--fusion", "logistic", "--min-positives", "10",
         "--folds", "3", "--target", "f1", "--out", str(policy)]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    fitted = yaml.safe_load(policy.read_text())
    version = fitted["version"]
    assert fitted["categories"]["sexual"]["fusion"] == "logistic"
    assert set(fitted["categories"]["sexual"]["weights"]) == {"open_nsfw.nsfw", "nudenet.sexual"}
    assert fitted["categories"]["hate"]["fusion"] == "max"  # no labels for it: kept

    scanned = tmp_path / "scan.jsonl"
    proc = run(["scan", str(labelled / "images"), "-o", str(scanned), "--no-progress"],
               env={"MODGATE_POLICY_FILE": str(policy)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert {json.loads(line)["policy_version"] for line in scanned.read_text().splitlines()} == {version}

    replayed = tmp_path / "replayed.jsonl"
    proc = run(["replay", str(stored), "--policy", str(policy), "--out", str(replayed), "--json"])
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["policy_after"] == version and summary["transitions"]["error->error"] == 1
    assert decisions(replayed) == decisions(scanned)
    assert sum(v == "unsafe" for v in decisions(scanned).values()) > 0

    again = tmp_path / "eval2"
    proc = run(["eval", str(labels), "--verdicts", str(stored), "--policy", str(policy), "--out", str(again),
                "--no-plots", "--bootstrap", "0"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads((again / "report.json").read_text())["policy_version"] == version


def test_scan_refuses_a_logistic_policy_without_its_detectors(labelled, tmp_path):
    sexual = {
        "fusion": "logistic",
        "weights": {"open_nsfw.nsfw": 3.0, "nudenet.sexual": 2.0},
        "bias": -2.0,
        "evidence": [{"detector": "open_nsfw", "score": "nsfw"}, {"detector": "nudenet", "score": "sexual"}],
    }
    policy = tmp_path / "p.yaml"
    policy.write_text(yaml.safe_dump({"version": "logit", "categories": {"sexual": sexual}}))
    image = str(labelled / "images" / "000.jpg")
    env = {"MODGATE_POLICY_FILE": str(policy)}
    refused = run(["scan", image, "--detectors", "open_nsfw", "--no-progress"], env=env)
    assert refused.returncode == 3 and "nudenet" in refused.stderr and "on_missing" in refused.stderr
    assert "Traceback" not in refused.stderr
    policy.write_text(
        yaml.safe_dump({"version": "logit", "categories": {"sexual": {**sexual, "on_missing": "review"}}})
    )
    reviewed = run(["scan", image, "--detectors", "open_nsfw", "--no-progress"], env=env)
    assert reviewed.returncode == 0, reviewed.stderr
    verdict = json.loads(reviewed.stdout)
    assert verdict["decision"] == "review" and verdict["categories"]["sexual"]["review"] is True


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    root = tmp_path_factory.mktemp("stored")
    verdicts, rows = generate(300, seed=2, root=root, error_rate=0.05)
    return write(root, verdicts, rows)


def test_bad_inputs_are_one_clear_message(stored, tmp_path):
    labels, verdicts = stored
    out = str(tmp_path / "out")
    cases = {
        "missing.csv": ("uri,label\na.jpg,safe\n", "missing column `category`"),
        "empty.csv": ("", "empty"),
        "trunc.jsonl": ('{"uri": "a.jpg", "sexual": 1}\n{"uri": "b.jpg", "sex', "trunc.jsonl:2"),
    }
    for name, (text, message) in cases.items():
        path = labels.parent / name
        path.write_text(text)
        proc = run(["eval", str(path), "--verdicts", str(verdicts), "--out", out, "--no-plots"])
        assert proc.returncode == 2 and message in proc.stderr, (name, proc.stderr)
        assert "Traceback" not in proc.stderr
    bad_verdicts = tmp_path / "v.jsonl"
    bad_verdicts.write_text(verdicts.read_text().splitlines()[0] + "\n{not json\n")
    proc = run(["eval", str(labels), "--verdicts", str(bad_verdicts), "--out", out])
    assert proc.returncode == 2 and "v.jsonl:2" in proc.stderr and "Traceback" not in proc.stderr
    proc = run(
        ["calibrate", str(labels), "--verdicts", str(verdicts), "--target", "recall=0.9", "--out",
         str(tmp_path / "policy.yaml")]
    )  # fmt: skip
    assert proc.returncode == 2 and "--target" in proc.stderr

    # Unknown categories and duplicates are reported and counted, not fatal.
    odd = labels.parent / "odd.csv"
    lines = labels.read_text().splitlines()
    odd.write_text("\n".join([*lines, lines[1], "images/999999.jpg,unsafe,nudity,real"]) + "\n")
    proc = run(
        ["eval", str(odd), "--verdicts", str(verdicts), "--out", out, "--no-plots", "--bootstrap", "50"]
    )
    assert proc.returncode == 0, proc.stderr
    assert "unknown categories: 1 (e.g. nudity)" in proc.stderr and "duplicate uris: 1" in proc.stderr
    report = json.loads((Path(out) / "report.json").read_text())
    assert report["unmatched"]["labels_without_verdict"]["count"] == 1
    assert report["errors"]["corrupt_image"] > 0 and report["n"] + report["errors"]["corrupt_image"] == 300


def test_eval_scans_exactly_the_labelled_s3_keys(s3_client, bucket, s3_env, tmp_path):
    import io

    for i, key in enumerate(["set/a.jpg", "set/a.jpg.bak", "set/b.jpg"]):
        buf = io.BytesIO()
        photo(200, 150, seed=i).save(buf, "JPEG")
        s3_client.put_object(Bucket=bucket, Key=key, Body=buf.getvalue())
    labels = tmp_path / "labels.csv"
    labels.write_text(
        f"uri,label,category\ns3://{bucket}/set/a.jpg,safe,\ns3://{bucket}/set/b.jpg,unsafe,sexual\n"
        f"s3://{bucket}/set/missing.jpg,safe,\n"
    )
    out = tmp_path / "ev"
    proc = run(["eval", str(labels), "--out", str(out), "--detectors", "open_nsfw", "--no-progress",
                "--bootstrap", "20", "--no-plots"], env=s3_env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    scanned = [
        json.loads(line)["source"]["key"] for line in (out / "verdicts.jsonl").read_text().splitlines()
    ]
    assert sorted(scanned) == ["set/a.jpg", "set/b.jpg", "set/missing.jpg"]  # not a.jpg.bak
    assert report["n"] == 2 and report["errors"] == {"not_found": 1}
    assert report["unmatched"]["verdicts_without_label"]["count"] == 0


def test_eval_names_uncovered_categories_and_contradictory_rows(tmp_path):
    from worker.quality.synthetic import CALIBRATION_SCORES

    # Only sexual's detectors ran: the spam positives have no score from any detector.
    verdicts, rows = generate(
        300, seed=8, root=tmp_path, scores=CALIBRATION_SCORES, categories=["sexual", "spam"]
    )
    labels, stored = write(tmp_path, verdicts, rows)
    spam = sum(r["category"] == "spam" for r in rows)
    safe = next(r["uri"] for r in rows if r["label"] == "safe")
    text = labels.read_text().replace(f"{safe},safe,,", f"{safe},safe,sexual,")
    labels.write_text(text)
    out = tmp_path / "ev"
    proc = run(["eval", str(labels), "--verdicts", str(stored), "--out", str(out), "--no-plots",
                "--bootstrap", "50"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    note = f"{spam} labelled images in spam, no enabled detector covers it"
    assert spam > 0 and f"note: {note}" in proc.stderr
    assert f"note: safe with category: 1 (e.g. {safe})" in proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["notes"] == [note] and report["categories"]["spam"]["uncovered_positives"] == spam
    assert report["unmatched"]["safe_with_category"] == {"count": 1, "examples": [safe]}
    page = (out / "report.html").read_text()
    assert note in page and "contradictory: counted safe" in page
