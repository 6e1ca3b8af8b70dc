"""Labels files in both styles, the bad inputs a user will hand us, and the join to verdicts."""

import json
import os

import pytest

from modgate.errors import ErrorCode
from modgate.policy import CATEGORIES
from modgate.verdict import Source, Verdict, error_verdict
from worker.quality.labels import LabelsError, join, read_labels
from worker.quality.replay import read_verdicts


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def verdict(path, decision="safe"):
    source = Source(kind="file", uri=str(path), path=str(path))
    return Verdict(id="x", source=source, status="ok", decision=decision, policy_version="p")


def test_unsafebench_csv_one_category_is_negative_for_the_others(tmp_path):
    path = write(
        tmp_path,
        "labels.csv",
        "uri,label,category,split\na.jpg,unsafe,Sexual,real\nb.jpg,safe,,ai\n"
        "c.jpg,Unsafe,Public and personal health,ai\ns3://bkt/k/d.png,unsafe,violence,\n",
    )
    labels = read_labels(path)
    assert labels.style == "unsafebench"
    a, b, c, d = labels.rows
    assert a.unsafe and a.truth["sexual"] == 1 and a.truth["violence"] == 0 and len(a.truth) == 11
    assert not b.unsafe and set(b.truth.values()) == {0} and b.split == "ai"
    assert c.truth["public_health"] == 1
    assert a.key == os.path.realpath(tmp_path / "a.jpg") and d.key == "s3://bkt/k/d.png" and d.split is None


def test_multilabel_jsonl_leaves_unlisted_categories_unknown(tmp_path):
    rows = [{"uri": "a.jpg", "sexual": 1, "violence": 0}, {"uri": "b.jpg", "sexual": False, "violence": "1"}]
    labels = read_labels(write(tmp_path, "l.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n"))
    assert labels.style == "multilabel"
    assert labels.rows[0].truth == {"sexual": 1, "violence": 0} and labels.rows[0].unsafe
    assert labels.rows[1].truth == {"sexual": 0, "violence": 1}


def test_unknown_categories_and_duplicates_are_reported_not_dropped(tmp_path):
    labels = read_labels(
        write(
            tmp_path,
            "l.csv",
            "uri,label,category\na.jpg,unsafe,nudity\nb.jpg,unsafe,sexual\nb.jpg,safe,\nc.jpg,unsafe,\n",
        )
    )
    assert labels.unknown_categories.count == 1 and labels.unknown_categories.examples == ["nudity"]
    assert labels.duplicate_uris.count == 1 and labels.duplicate_uris.examples == ["b.jpg"]
    assert labels.unsafe_without_category.count == 1
    a = labels.rows[0]
    assert a.unsafe and a.truth == {}  # unsafe overall, unknown per category
    multi = read_labels(write(tmp_path, "m.csv", "uri,sexual,gore\na.jpg,1,0\nb.jpg,0,1\n"))
    assert multi.unknown_categories.examples == ["gore"] and multi.unknown_categories.count == 2


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("empty.csv", "", "empty"),
        ("header.csv", "uri,label,category\n", "no labelled rows"),
        ("nouri.csv", "path,label,category\na.jpg,safe,\n", "missing column `uri`"),
        ("nocat.csv", "uri,label\na.jpg,safe\n", "missing column `category`"),
        ("nolabels.csv", "uri,split\na.jpg,real\n", "no label columns"),
        ("badlabel.csv", "uri,label,category\na.jpg,safe,\nb.jpg,maybe,\n", "l:3"),
        ("badflag.csv", "uri,sexual\na.jpg,1\nb.jpg,2\n", "must be 0 or 1"),
        ("short.csv", "uri,label,category\na.jpg,safe\n", "2 fields, the header has 3"),
        ("trunc.jsonl", '{"uri": "a.jpg", "sexual": 1}\n{"uri": "b.jpg", "sex', ":2: not a JSON object"),
        ("list.jsonl", "[1, 2]\n", "expected a JSON object"),
        ("emptyuri.csv", "uri,label,category\n,safe,\n", "empty `uri`"),
    ],
)
def test_malformed_labels_are_one_clear_error_with_the_line(tmp_path, name, text, message):
    path = write(tmp_path, name, text)
    with pytest.raises(LabelsError) as info:
        read_labels(path)
    text = str(info.value).replace(str(tmp_path / name), "l")
    assert message in text, text


def test_join_counts_errors_per_code_and_both_kinds_of_unmatched(tmp_path):
    labels = read_labels(
        write(tmp_path, "l.csv", "uri,label,category\na.jpg,safe,\nb.jpg,unsafe,hate\nc.jpg,safe,\n")
    )
    bad = Source(kind="file", uri=str(tmp_path / "b.jpg"), path=str(tmp_path / "b.jpg"))
    verdicts = [
        verdict(tmp_path / "a.jpg"),
        error_verdict(bad, "p", ErrorCode.CORRUPT_IMAGE, "broken"),
        verdict(tmp_path / "z.jpg"),
    ]
    joined = join(labels, verdicts)
    assert [r.uri for r in joined.rows] == ["a.jpg"]
    assert dict(joined.error_codes) == {"corrupt_image": 1}
    assert joined.labels_without_verdict.examples == ["c.jpg"]
    assert joined.verdicts_without_label.count == 1
    assert joined.truth("hate").tolist() == [0.0] and set(CATEGORIES) >= {"hate"}


def test_verdict_files_with_error_records_read_and_a_broken_line_is_named(tmp_path):
    source = Source(kind="file", uri="/x.jpg", path="/x.jpg")
    good = [verdict(tmp_path / "a.jpg"), error_verdict(source, "p", ErrorCode.EMPTY_OBJECT, "empty")]
    path = write(tmp_path, "v.jsonl", "".join(v.model_dump_json() + "\n" for v in good))
    assert [v.status for v in read_verdicts(path)] == ["ok", "error"]
    broken = write(
        tmp_path, "b.jsonl", good[0].model_dump_json() + "\n" + good[1].model_dump_json()[:40] + "\n"
    )
    with pytest.raises(LabelsError, match=r"b\.jsonl:2: not a verdict"):
        read_verdicts(broken)
    with pytest.raises(LabelsError, match="no verdicts"):
        read_verdicts(write(tmp_path, "e.jsonl", "\n"))


def test_safe_with_a_category_is_counted_and_listed_and_counts_as_safe(tmp_path):
    labels = read_labels(
        write(
            tmp_path,
            "l.csv",
            "uri,label,category\na.jpg,safe,sexual\nb.jpg,safe,\nc.jpg,unsafe,sexual\na.jpg,safe,hate\n",
        )
    )
    assert labels.safe_with_category.count == 1 and labels.safe_with_category.examples == ["a.jpg"]
    assert labels.duplicate_uris.count == 1  # the duplicate row is not counted twice
    a = labels.rows[0]
    assert not a.unsafe and set(a.truth.values()) == {0} and len(a.truth) == len(CATEGORIES)
