"""The producer/worker message contract."""

import subprocess
import sys

import pytest

from modgate.contract import Item, ModerateMessage, chunk_items, validate_message


def test_valid_message_round_trips_as_json():
    message = validate_message(
        {
            "items": [{"bucket": "bkt", "key": "a b+c%.jpg", "etag": "e", "size": 3}],
            "callback_url": "https://h.example/x",
        }
    )
    again = ModerateMessage.model_validate_json(message.model_dump_json())
    assert again == message and again.items[0].key == "a b+c%.jpg"


@pytest.mark.parametrize(
    "payload",
    [
        {"items": []},
        {"items": [{"bucket": "bkt"}]},
        {"items": [{"bucket": "bkt", "key": "k", "extra": 1}]},
        {"items": [{"bucket": "bkt", "key": "k"}], "callback_url": "ftp://x"},
        {"items": [{"bucket": "bkt", "key": "k", "size": -1}]},
        ["not", "an", "object"],
    ],
)
def test_invalid_payloads_are_refused(payload):
    with pytest.raises(ValueError):
        validate_message(payload)


def test_item_limit():
    items = [{"bucket": "bkt", "key": str(i)} for i in range(5)]
    validate_message({"items": items}, max_items=5)
    with pytest.raises(ValueError, match="more than the limit of 4"):
        validate_message({"items": items}, max_items=4)


def test_chunking():
    items = [Item(bucket="bkt", key=str(i)) for i in range(130)]
    assert [len(c) for c in chunk_items(items, 64)] == [64, 64, 2]


def test_contract_imports_nothing_heavy():
    code = "import sys, modgate.contract; print({'torch', 'celery', 'boto3', 'numpy'} & set(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "set()"


def test_producers_and_the_webhook_dispatcher_never_import_model_code():
    code = (
        "import sys, producers.sqs, producers.receiver, producers.backfill, producers.lambda_handler; "
        # the webhook dispatcher's path
        "import worker.service.celery_app, worker.service.service, worker.cli; "
        "print({'torch', 'torchvision', 'transformers', 'onnxruntime', 'open_clip', 'numpy', 'PIL'} "
        "& set(sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "set()"
