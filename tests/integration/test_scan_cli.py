"""``modgate scan`` as a user runs it: a real subprocess over a directory of good and
hostile files, and over an S3 prefix served by a real moto server."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker.tools.samples import bomb_png, photo

MODGATE = [sys.executable, "-m", "worker.cli"]


def run(args, env=None, **kw):
    return subprocess.run(
        [*MODGATE, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
        **kw,
    )


def jpeg_bytes(w, h, seed=0):
    buf = io.BytesIO()
    photo(w, h, seed).save(buf, "JPEG", quality=85)
    return buf.getvalue()


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    good = jpeg_bytes(640, 480)
    (d / "good.jpg").write_bytes(good)
    (d / "nested").mkdir()
    (d / "nested" / "big.jpg").write_bytes(jpeg_bytes(4000, 3000, seed=2))
    photo(300, 300, 3).save(d / "nested" / "graphic.png")
    photo(300, 200, 4).save(d / "pic.webp")
    frames = [photo(160, 120, 10 + i) for i in range(20)]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=40)
    (d / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (d / "zero.jpg").write_bytes(b"")
    (d / "notes.txt").write_text("not an image")
    (d / "bomb.png").write_bytes(bomb_png())
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(2000))
    (d / ".hidden.jpg").write_bytes(good)  # hidden files are skipped
    return d


EXPECTED = {
    "good.jpg": ("ok", None),
    "nested/big.jpg": ("ok", None),
    "nested/graphic.png": ("ok", None),
    "pic.webp": ("ok", None),
    "anim.gif": ("ok", None),
    "truncated.jpg": ("error", "corrupt_image"),
    "zero.jpg": ("error", "empty_object"),
    "notes.txt": ("error", "unsupported_format"),
    "bomb.png": ("error", "image_too_large"),
    "corrupt.png": ("error", "corrupt_image"),
}


def test_directory_with_hostile_files_scans_to_one_verdict_per_file(hostile_dir, tmp_path):
    out = tmp_path / "v.jsonl"
    proc = run(["scan", str(hostile_dir), "--output", str(out), "--no-progress"])
    assert proc.returncode == 0, proc.stderr
    verdicts = [json.loads(line) for line in out.read_text().splitlines()]
    got = {
        str(Path(v["source"]["path"]).relative_to(hostile_dir)): (v["status"], (v["error"] or {}).get("code"))
        for v in verdicts
    }
    assert got == EXPECTED
    assert len(verdicts) == len(EXPECTED)
    by_name = {Path(v["source"]["path"]).name: v for v in verdicts}
    anim = by_name["anim.gif"]
    assert anim["image"]["frame_count"] == 20 and anim["frames"] == 8
    big = by_name["big.jpg"]
    assert big["image"] == {"format": "JPEG", "width": 4000, "height": 3000, "frame_count": 1}
    for v in verdicts:
        if v["status"] == "ok":
            assert set(v["detectors"]) == {"open_nsfw", "nudenet"}
            assert len(v["categories"]) == 11
            assert v["decision"] in ("safe", "review", "unsafe")
    assert "total" in proc.stderr and "images/s" in proc.stderr


def test_fail_on_unsafe_exits_1_and_stdout_is_jsonl(hostile_dir, tmp_path):
    cfg = tmp_path / "strict.yaml"
    cfg.write_text("policy: {categories: {sexual: {threshold: 0.0, review: 0.0}}}\n")
    proc = run(
        [
            "scan",
            str(hostile_dir / "good.jpg"),
            "--config",
            str(cfg),
            "--fail-on",
            "unsafe",
            "--no-progress",
            "--detectors",
            "open_nsfw",
        ]
    )
    assert proc.returncode == 1, proc.stderr
    verdict = json.loads(proc.stdout.strip())
    assert verdict["decision"] == "unsafe" and verdict["primary_category"] == "sexual"
    assert set(verdict["detectors"]) == {"open_nsfw"}
    relaxed = run(["scan", str(hostile_dir / "good.jpg"), "--fail-on", "unsafe", "--no-progress"])
    assert relaxed.returncode == 0, relaxed.stderr


def test_usage_and_infrastructure_errors(tmp_path):
    missing = run(["scan", str(tmp_path / "nope"), "--no-progress"])
    assert missing.returncode == 3 and "nope" in missing.stderr
    bad_weights = run(["scan", str(tmp_path), "--model", f"open_nsfw={tmp_path / 'w.onnx'}", "--no-progress"])
    assert bad_weights.returncode == 3 and "w.onnx" in bad_weights.stderr
    unknown = run(["scan", str(tmp_path), "--detectors", "nope", "--no-progress"])
    assert unknown.returncode == 3 and "unknown detector" in unknown.stderr
    bad_model_flag = run(["scan", str(tmp_path), "--model", "open_nsfw"])
    assert bad_model_flag.returncode == 2


def test_scan_an_s3_prefix(s3_client, bucket, s3_env, tmp_path):
    keys = ["uploads/a b+c.jpg", "uploads/ünïcode/ß.jpg", "uploads/x/y/z.png", "other/skip.jpg"]
    for i, key in enumerate(keys):
        body = jpeg_bytes(320, 240, seed=i) if key.endswith(".jpg") else b"\x89PNG\r\n\x1a\nbroken"
        s3_client.put_object(Bucket=bucket, Key=key, Body=body)
    out = tmp_path / "s3.jsonl"
    proc = run(["scan", f"s3://{bucket}/uploads/", "-o", str(out), "--no-progress"], env=s3_env)
    assert proc.returncode == 0, proc.stderr
    verdicts = {v["source"]["key"]: v for v in map(json.loads, out.read_text().splitlines())}
    assert set(verdicts) == set(keys[:3])
    for key in keys[:2]:
        v = verdicts[key]
        assert v["status"] == "ok" and v["source"]["bucket"] == bucket and v["source"]["etag"]
        assert v["source"]["uri"] == f"s3://{bucket}/{key}"
    assert verdicts["uploads/x/y/z.png"]["error"]["code"] == "corrupt_image"


def command_line(command, tmp_path, policy):
    """Each command that takes a policy file, with inputs that are never read when the
    policy is refused first."""
    labels, verdicts = tmp_path / "labels.csv", tmp_path / "verdicts.jsonl"
    labels.write_text("uri,label\n")
    verdicts.write_text("")
    return {
        "scan": ["scan", str(tmp_path), "--no-progress"],
        "eval": [
            "eval",
            str(labels),
            "--verdicts",
            str(verdicts),
            "--out",
            str(tmp_path / "ev"),
            "--policy",
            policy,
        ],
        "replay": ["replay", str(verdicts), "--policy", policy],
        "calibrate": [
            "calibrate",
            str(labels),
            "--verdicts",
            str(verdicts),
            "--out",
            str(tmp_path / "p.yaml"),
            "--policy",
            policy,
        ],
    }[command]


@pytest.mark.parametrize("command", ["scan", "eval", "replay", "calibrate"])
def test_a_bad_policy_file_is_one_message_with_file_and_line_and_exit_3(tmp_path, command):
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: x\ncategories:\n  sexual: {threshold: 0.9\n")
    typo = tmp_path / "typo.yaml"
    typo.write_text(
        "version: x\ncategories:\n  sexual:\n    evidence:\n      - {detector: open_nsf, score: nsfw}\n"
    )
    for policy, expected in (
        (broken, "broken.yaml:4: YAML syntax error"),
        (typo, "typo.yaml:5: unknown detector 'open_nsf'"),
    ):
        args = command_line(command, tmp_path, str(policy))
        env = {"MODGATE_POLICY_FILE": str(policy)} if command == "scan" else {}
        proc = run(args, env)
        assert proc.returncode == 3, proc.stderr
        assert expected in proc.stderr and "Traceback" not in proc.stderr


def test_a_config_file_with_a_yaml_error_is_one_message(tmp_path):
    cfg = tmp_path / "modgate.yaml"
    cfg.write_text("batch:\n  max_batch: [4\n")
    proc = run(["scan", str(tmp_path), "--config", str(cfg), "--no-progress"])
    assert proc.returncode == 3 and "modgate.yaml:3: YAML syntax error" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unusable_output_paths_are_refused_before_any_work(tmp_path):
    labels, verdicts = tmp_path / "labels.csv", tmp_path / "verdicts.jsonl"
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    nowhere = tmp_path / "no-such-dir" / "out"
    cases = [
        (["scan", str(tmp_path), "--output", str(tmp_path)], "is a directory"),
        (["scan", str(tmp_path), "--output", str(nowhere)], "does not exist"),
        (["calibrate", str(labels), "--verdicts", str(verdicts), "--out", str(nowhere)], "does not exist"),
        (["calibrate", str(labels), "--verdicts", str(verdicts), "--out", str(tmp_path)], "is a directory"),
        (["replay", str(verdicts), "--policy", str(a_file), "--out", str(tmp_path)], "is a directory"),
        (["eval", str(labels), "--verdicts", str(verdicts), "--out", str(a_file)], "is a file"),
    ]
    for args, expected in cases:
        proc = run([*args, "--no-progress"] if args[0] == "scan" else args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert not labels.exists() and not verdicts.exists()  # nothing was read or written


def test_an_error_the_policy_counts_as_review_is_a_review_for_fail_on(hostile_dir, tmp_path):
    cfg = tmp_path / "errors.yaml"
    cfg.write_text("policy: {errors: {corrupt_image: {review: true}}}\n")
    args = ["scan", str(hostile_dir / "truncated.jpg"), "--no-progress", "--fail-on", "review"]
    proc = run([*args, "--config", str(cfg)])
    assert proc.returncode == 1, proc.stderr
    verdict = json.loads(proc.stdout.strip())
    assert (verdict["status"], verdict["error"]["code"], verdict["decision"]) == (
        "error",
        "corrupt_image",
        "review",
    )
    plain = run(args)
    assert plain.returncode == 0 and json.loads(plain.stdout.strip())["decision"] is None


def test_a_first_run_says_in_one_line_which_detectors_ran_and_what_to_do_next(tmp_path):
    """No weights but the packaged ones: one line on the detectors (not one warning each),
    the output file and the next commands; -v brings each skip's reason back."""
    (tmp_path / "in").mkdir()
    photo(320, 240, 1).save(tmp_path / "in" / "a.jpg")
    out = tmp_path / "v.jsonl"
    quiet = run(["scan", str(tmp_path / "in"), "--output", str(out), "--no-progress"])
    assert quiet.returncode == 0, quiet.stderr
    lines = quiet.stderr.splitlines()
    (detectors,) = [line for line in lines if line.startswith("detectors:")]
    assert "open_nsfw, nudenet ran" in detectors and "7 skipped" in detectors
    assert "modgate models list" in detectors
    assert not [line for line in lines if "skipped:" in line or "no checkpoint found" in line]
    assert f"verdicts written to {out}" in lines
    assert any(line.startswith("next: `modgate eval") and "modgate worker" in line for line in lines)
    verbose = run(["scan", str(tmp_path / "in"), "--output", str(out), "--no-progress", "-v"])
    assert verbose.returncode == 0, verbose.stderr
    assert "no checkpoint found" in verbose.stderr and "falconsai_vit:" in verbose.stderr
