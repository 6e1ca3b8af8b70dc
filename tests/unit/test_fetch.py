import hashlib
import os

import pytest

from worker.errors import ErrorCode, ModerationError
from worker.fetch import Fetcher, TargetError
from worker.settings import S3Settings
from worker.verdict import Source


def fetcher(cap=1000):
    return Fetcher(S3Settings(max_object_bytes=cap))


def src(path):
    return Source(kind="file", uri=str(path), path=str(path))


def code_of(f, source):
    with pytest.raises(ModerationError) as info:
        f.fetch(source)
    return info.value.code


def test_directories_expand_recursively_sorted_without_hidden(tmp_path):
    for rel in ["b.jpg", "a.jpg", "sub/c.png", "sub/deeper/d.gif", ".hidden.jpg", ".git/x.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    got = [os.path.relpath(s.path, tmp_path) for s in fetcher().expand(str(tmp_path))]
    assert got == ["a.jpg", "b.jpg", "sub/c.png", "sub/deeper/d.gif"]
    assert all(s.kind == "file" and s.uri == s.path for s in fetcher().expand(str(tmp_path)))


def test_a_missing_target_is_a_usage_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(fetcher().expand(str(tmp_path / "nope")))
    with pytest.raises(TargetError):
        Fetcher.parse_s3_uri("s3:///key")
    assert Fetcher.parse_s3_uri("s3://bucket/a/b/") == ("bucket", "a/b/")


def test_fetch_fills_in_size_and_content_hash(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"abc")
    fetched = fetcher().fetch(src(tmp_path / "a.jpg"))
    assert fetched.data == b"abc"
    assert fetched.source.size == 3 and fetched.source.sha256 == hashlib.sha256(b"abc").hexdigest()


def test_size_cap_boundary(tmp_path):
    (tmp_path / "ok").write_bytes(b"x" * 1000)
    (tmp_path / "big").write_bytes(b"x" * 1001)
    assert len(fetcher(1000).fetch(src(tmp_path / "ok")).data) == 1000
    assert code_of(fetcher(1000), src(tmp_path / "big")) == ErrorCode.TOO_LARGE


def test_file_error_codes(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    assert code_of(fetcher(), src(tmp_path / "missing")) == ErrorCode.NOT_FOUND
    assert code_of(fetcher(), src(tmp_path / "empty")) == ErrorCode.EMPTY_OBJECT
    assert code_of(fetcher(), src(tmp_path)) == ErrorCode.FETCH_FAILED  # a directory


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file_is_access_denied(tmp_path):
    path = tmp_path / "secret.jpg"
    path.write_bytes(b"x")
    path.chmod(0)
    assert code_of(fetcher(), src(path)) == ErrorCode.ACCESS_DENIED
