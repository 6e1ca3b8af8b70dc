from modgate.errors import ErrorCode
from modgate.verdict import Source, Verdict, error_verdict, verdict_id


def s3(key="a.jpg", etag='"abc"', version=None):
    return Source(kind="s3", uri=f"s3://b/{key}", bucket="b", key=key, etag=etag, version_id=version)


def test_id_is_stable_and_names_the_object_version_and_policy():
    assert verdict_id(s3(), "p1") == verdict_id(s3(etag="abc"), "p1")  # quotes do not matter
    assert verdict_id(s3(), "p1") != verdict_id(s3(), "p2")
    assert verdict_id(s3(), "p1") != verdict_id(s3(etag='"def"'), "p1")
    assert verdict_id(s3(version="v1"), "p1") != verdict_id(s3(version="v2"), "p1")
    assert verdict_id(s3(key="x.jpg"), "p1") != verdict_id(s3(), "p1")


def test_file_id_follows_content_not_name():
    a = Source(kind="file", uri="/a.jpg", path="/a.jpg", sha256="f" * 64)
    b = Source(kind="file", uri="/b.jpg", path="/b.jpg", sha256="f" * 64)
    assert verdict_id(a, "p") == verdict_id(b, "p")


def test_error_verdict_round_trips_through_json():
    v = error_verdict(s3(), "p1", ErrorCode.CORRUPT_IMAGE, "truncated JPEG")
    again = Verdict.model_validate_json(v.model_dump_json())
    assert again.status == "error" and again.error.code == ErrorCode.CORRUPT_IMAGE
    assert again.decision is None and again.schema_version == "1"


def test_schema_lists_the_error_codes():
    schema = Verdict.model_json_schema()
    codes = schema["$defs"]["ErrorCode"]["enum"]
    for code in (
        "not_found",
        "access_denied",
        "too_large",
        "image_too_large",
        "unsupported_format",
        "corrupt_image",
        "empty_object",
        "fetch_failed",
        "detector_failed",
    ):
        assert code in codes


def test_modgate_schema_documents_both_webhook_bodies():
    """`modgate schema`: the verdict (verdict.created's body), the envelope, and the body of
    verdict.reviewed; a reviewed event built by modgate.review validates against the latter."""
    import json

    import jsonschema
    import pytest
    from typer.testing import CliRunner

    from modgate.review import ReviewDecision, ReviewedEvent
    from worker.cli import app

    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert set(document["x-modgate-webhook"]["event_types"]) == {"verdict.created", "verdict.reviewed"}
    reviewed = document["x-modgate-reviewed-event"]
    source = Source(kind="s3", uri="s3://b/k.jpg", bucket="b", key="k.jpg")
    verdict = Verdict(
        id=verdict_id(source, "p1"), source=source, status="ok", decision="review", policy_version="p1"
    )
    event = ReviewedEvent(
        review=ReviewDecision(
            verdict_id=verdict.id, reviewer="ana", decision="unsafe", category="sexual", at=1.0
        ),
        verdict=verdict,
    )
    jsonschema.validate(json.loads(event.model_dump_json()), reviewed)
    bad = json.loads(event.model_dump_json())
    bad["review"]["decision"] = "maybe"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, reviewed)


def test_modgate_schema_names_revision_1_2_and_the_file_pdq():
    """Revision 1.2 (additive) added ``hashes.pdq_file`` and ``hashes.pdq_file_quality``: a
    verdict carrying them validates against the printed schema, and so does one without."""
    import json

    import jsonschema
    from typer.testing import CliRunner

    from modgate.verdict import SCHEMA_REVISION, Hashes
    from worker.cli import app

    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert SCHEMA_REVISION == "1.2" and "revision 1.2" in document["description"]
    hashes = document["$defs"]["Hashes"]["properties"]
    assert {"pdq", "pdq_quality", "md5", "pdq_file", "pdq_file_quality"} <= set(hashes)
    assert "v1.2" in hashes["pdq_file"]["description"] and "EXIF" in hashes["pdq_file"]["description"]
    source = Source(kind="file", uri="/a.jpg", path="/a.jpg", sha256="f" * 64)
    for extra in ({"pdq_file": "ab" * 32, "pdq_file_quality": 90}, {}):
        verdict = Verdict(
            id=verdict_id(source, "p1"),
            source=source,
            status="ok",
            decision="safe",
            policy_version="p1",
            hashes=Hashes(pdq="cd" * 32, pdq_quality=90, md5="ef" * 16, **extra),
        )
        jsonschema.validate(json.loads(verdict.model_dump_json()), document)
        assert Verdict.model_validate_json(verdict.model_dump_json()) == verdict
