"""Which device and runtime each detector gets, and the start-up refusal of a detector that
would run off the GPU on a CUDA runtime — on CPU, with the GPU's presence injected."""

import json
import urllib.request

import pytest
import torch

from modgate.errors import ConfigError
from modgate.settings import load_settings
from worker.detectors import LoadedDetectors, check_devices, detector_device, load_detectors, resolve_device
from worker.detectors.onnx_torch import choose_runtime
from worker.detectors.open_nsfw import OpenNSFW
from worker.observe.health import Health, detector_devices, serve


def gpu() -> bool:
    return True


def no_gpu() -> bool:
    return False


@pytest.mark.parametrize(
    ("setting", "available", "expected"),
    [("auto", gpu, "cuda"), ("auto", no_gpu, "cpu"), ("cuda", gpu, "cuda"), ("cpu", gpu, "cpu")],
)
def test_device_resolution(setting, available, expected):
    assert resolve_device(setting, available) == expected


def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(ConfigError, match="device=cuda"):
        resolve_device("cuda", no_gpu)


@pytest.mark.parametrize(
    ("setting", "device", "expected"),
    [
        ("auto", "cuda", "torch"),  # a GPU node: the converted module, on the device
        ("auto", "cpu", "onnxruntime"),  # CPU: onnxruntime is the faster one there
        ("torch", "cpu", "torch"),
        ("onnxruntime", "cuda", "onnxruntime"),
    ],
)
def test_onnx_runtime_choice(setting, device, expected):
    assert choose_runtime(setting, device) == expected


def test_auto_on_a_gpu_node_puts_the_onnx_detectors_on_it():
    settings = load_settings(runtime={"device": "auto"})
    device = resolve_device(settings.runtime.device, gpu)
    assert choose_runtime(settings.runtime.onnx, device) == "torch"


def test_a_detector_off_the_gpu_stops_startup_by_name():
    check_devices({"open_nsfw": "cpu", "nudenet": "cpu"}, "cpu")  # a CPU runtime: anything goes
    check_devices({"open_nsfw": "cuda", "q16": "cuda"}, "cuda")
    with pytest.raises(ConfigError) as err:
        check_devices({"open_nsfw": "cuda", "nudenet": "cpu"}, "cuda")
    assert "nudenet would run on cpu" in str(err.value) and "open_nsfw" not in str(err.value)


def test_onnxruntime_without_its_cuda_provider_fails_startup_on_a_gpu_node(monkeypatch):
    # The CPU build of onnxruntime on a GPU node (what the worker image used to install):
    # before, `auto` fell back to the CPU quietly; now start-up stops and names the detector.
    monkeypatch.setattr(torch.cuda, "is_available", gpu)
    settings = load_settings(detectors={"enabled": ["open_nsfw"]}, runtime={"onnx": "onnxruntime"})
    with pytest.raises(ConfigError, match="open_nsfw would run on cpu"):
        load_detectors(settings)


class _Declares:
    id = "declares"
    device = torch.device("cuda")


class _Holds:
    id = "holds"

    def __init__(self, value):
        self.name = "not a tensor"
        self.value = value


def test_detector_device_is_declared_or_read_from_its_weights():
    assert detector_device(_Declares()) == "cuda"
    assert detector_device(_Holds(torch.nn.Linear(2, 2))) == "cpu"
    assert detector_device(_Holds(torch.nn.Linear(2, 2, device="meta"))) == "meta"
    assert detector_device(_Holds({"embeds": torch.zeros(2, device="meta")})) == "meta"
    assert detector_device(_Holds(None)) == "cpu"


def test_readyz_and_the_heartbeat_list_each_detectors_device():
    class Redis:
        def ping(self):
            return True

    loaded = LoadedDetectors([OpenNSFW.load(load_settings(runtime={"device": "cpu"}))], {})

    class Pipeline:
        detectors = loaded

    health = Health(Redis(), ["modgate"], heartbeat_s=5, hostname="test")
    health.devices = detector_devices(Pipeline())
    assert detector_devices(object()) == {}  # a pipeline without models (benchmarks)
    health.ready = True
    server = serve(health, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/readyz"
        state = json.loads(urllib.request.urlopen(url, timeout=5).read())
    finally:
        server.shutdown()
    assert state["devices"] == {"open_nsfw": "cpu"} == health.state()["devices"]


def test_every_clip_head_moves_all_its_weights_with_the_backbone(tmp_path):
    """On a GPU node the heads must sit where the embeddings are. Moving them to the meta
    device shows every weight follows (a head left behind would mix devices per batch)."""
    from modgate.settings import load_settings
    from tests.conftest import SHARED
    from tests.models import tiny_safety_checker
    from worker.detectors import load_detectors

    shared = SHARED / "models"
    paths = {
        "sd_safety_checker": tiny_safety_checker(tmp_path / "sd"),
        "laion_nsfw": shared / "laion-clip-nsfw" / "clip_autokeras_binary_nsfw.zip",
        "q16": shared / "q16" / "prompts_vit_l_14.p",
        "multiheaded": shared / "multiheaded",
        "laion_violence": shared / "laion-clip-nsfw" / "violence_detection_vit_l_14.npy",
    }
    settings = load_settings(
        detectors={
            "enabled": list(paths),
            "paths": {k: str(v) for k, v in paths.items()},
            "backbone_space": "openai/ViT-L-14",
        },
        runtime={"device": "cpu"},
    )
    loaded = load_detectors(settings)
    assert set(loaded.devices().values()) == {"cpu"}
    meta = torch.device("meta")
    for head in loaded.detectors:
        head.to(meta)
        assert detector_device(head) == "meta", head.id
        tensors = [
            t
            for v in vars(head).values()
            for t in (v.values() if isinstance(v, dict) else [v])
            if isinstance(t, torch.Tensor)
        ]
        tensors += [
            t
            for v in vars(head).values()
            if isinstance(v, torch.nn.Module)
            for t in (*v.parameters(), *v.buffers())
        ]
        assert tensors and all(t.device == meta for t in tensors), head.id
