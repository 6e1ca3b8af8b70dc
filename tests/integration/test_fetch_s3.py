"""Fetching from a real S3 API server (moto in server mode) over HTTP with boto3."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from modgate.errors import ErrorCode, ModerationError
from modgate.settings import S3Settings
from worker.ingest.fetch import Fetcher, TargetError


@pytest.fixture
def fetcher(moto_server, s3_env):
    return Fetcher(S3Settings(endpoint_url=moto_server.url, max_object_bytes=10_000))


def code_of(f, source):
    with pytest.raises(ModerationError) as info:
        f.fetch(source)
    return info.value.code


def one(f, bucket, key):
    (source,) = list(f.expand(f"s3://{bucket}/{key}"))
    return source


def test_listing_paginates_and_carries_etag_and_size(fetcher, s3_client, bucket):
    keys = [f"p/{i:05d}.jpg" for i in range(1100)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: s3_client.put_object(Bucket=bucket, Key=k, Body=k.encode()), keys))
    s3_client.put_object(Bucket=bucket, Key="p/folder/", Body=b"")
    s3_client.put_object(Bucket=bucket, Key="q/other.jpg", Body=b"x")
    sources = list(fetcher.expand(f"s3://{bucket}/p/"))
    assert [s.key for s in sources] == keys
    assert all(s.etag and '"' not in s.etag and s.size == len(s.key) for s in sources)
    assert sources[0].uri == f"s3://{bucket}/p/00000.jpg"


def test_fetch_many_concurrently_with_one_client(fetcher, s3_client, bucket):
    for i in range(40):
        s3_client.put_object(Bucket=bucket, Key=f"k{i}", Body=f"body-{i}".encode())
    sources = list(fetcher.expand(f"s3://{bucket}/k"))
    with ThreadPoolExecutor(16) as pool:
        fetched = list(pool.map(fetcher.fetch, sources))
    assert {f.source.key: f.data for f in fetched} == {f"k{i}": f"body-{i}".encode() for i in range(40)}
    assert all(f.source.etag for f in fetched)


def test_error_codes(fetcher, s3_client, bucket):
    s3_client.put_object(Bucket=bucket, Key="big", Body=b"x" * 10_001)
    s3_client.put_object(Bucket=bucket, Key="zero", Body=b"")
    big = one(fetcher, bucket, "big")
    assert code_of(fetcher, big) == ErrorCode.TOO_LARGE  # from the listing's size
    assert code_of(fetcher, big.model_copy(update={"size": None})) == ErrorCode.TOO_LARGE  # Content-Length
    assert code_of(fetcher, one(fetcher, bucket, "zero")) == ErrorCode.EMPTY_OBJECT
    gone = big.model_copy(update={"key": "missing", "size": None, "etag": None})
    assert code_of(fetcher, gone) == ErrorCode.NOT_FOUND
    nobucket = gone.model_copy(update={"bucket": "no-such-bucket-x"})
    assert code_of(fetcher, nobucket) == ErrorCode.NOT_FOUND


def test_object_overwritten_after_listing_is_not_moderated_blindly(fetcher, s3_client, bucket):
    s3_client.put_object(Bucket=bucket, Key="img", Body=b"first")
    listed = one(fetcher, bucket, "img")
    s3_client.put_object(Bucket=bucket, Key="img", Body=b"second version")
    with pytest.raises(ModerationError) as info:
        fetcher.fetch(listed)
    assert info.value.code == ErrorCode.NOT_FOUND and "changed since it was listed" in info.value.message


def test_unreachable_endpoint_is_fetch_failed_after_retries(s3_env):
    from tests.servers import free_port

    dead = Fetcher(
        S3Settings(
            endpoint_url=f"http://127.0.0.1:{free_port()}",
            max_attempts=2,
            connect_timeout_s=0.5,
            read_timeout_s=0.5,
        )
    )
    source = dead.parse_s3_uri("s3://b/k")
    from modgate.verdict import Source

    src = Source(kind="s3", uri="s3://b/k", bucket=source[0], key=source[1])
    with pytest.raises(ModerationError) as info:
        dead.fetch(src)
    assert info.value.code == ErrorCode.FETCH_FAILED and "2 attempts" in info.value.message
    with pytest.raises(TargetError):
        list(dead.expand("s3://b/"))
