"""Every verdict carries the image's hashes, computed where its frames are: on a decode
thread (baseline JPEG) or in a decode process (PNG, animations), the same either way."""

import hashlib

import pytest
from PIL import Image

from modgate.settings import load_settings
from modgate.verdict import Source
from worker.detectors import LoadedDetectors
from worker.detectors.open_nsfw import OpenNSFW
from worker.ingest.hashing import pdq_hash
from worker.pipeline import Pipeline
from worker.tools.samples import photo


@pytest.fixture(scope="module")
def open_nsfw():
    return OpenNSFW.load(load_settings())


def _verdict(pipe, path):
    return pipe.submit(Source(kind="file", uri=str(path), path=str(path))).result(timeout=60)


@pytest.mark.parametrize("processes", [True, False])
def test_md5_sha256_and_pdq_of_every_shape_of_image(tmp_path, open_nsfw, processes):
    jpeg, png = tmp_path / "a.jpg", tmp_path / "b.png"
    photo(400, 300, 1).save(jpeg, "JPEG", quality=90)
    photo(400, 300, 2).save(png, "PNG")
    settings = load_settings(decode={"processes": processes}, cache={"enabled": False})
    with Pipeline(settings, LoadedDetectors([open_nsfw], {})) as pipe:
        for path in (jpeg, png):
            verdict = _verdict(pipe, path)
            data = path.read_bytes()
            assert verdict.status == "ok"
            assert verdict.hashes.md5 == hashlib.md5(data).hexdigest()
            assert verdict.source.sha256 == hashlib.sha256(data).hexdigest()
            with Image.open(path) as im:  # small images: no draft reduction, the full frame
                assert (verdict.hashes.pdq, verdict.hashes.pdq_quality) == pdq_hash(im.convert("RGB"))


def test_pdq_off_keeps_the_exact_hashes(tmp_path, open_nsfw):
    path = tmp_path / "a.png"
    photo(200, 150, 3).save(path, "PNG")
    settings = load_settings(hashing={"pdq": "off"})
    with Pipeline(settings, LoadedDetectors([open_nsfw], {})) as pipe:
        verdict = _verdict(pipe, path)
    assert verdict.hashes.pdq is None and verdict.hashes.md5 == hashlib.md5(path.read_bytes()).hexdigest()
