"""The score names each registered detector declares: what policy evidence may name.

A plain table (no detector is imported, so ``import worker`` stays light); a unit test
holds it to the detectors' own constants (tests/unit/test_policy_load.py).
"""

from __future__ import annotations

from typing import Literal, get_args

# The policy's categories (UnsafeBench's 11); clip_zeroshot scores each one, and
# modgate.policy takes them from here.
Category = Literal[
    "hate",
    "harassment",
    "violence",
    "self_harm",
    "sexual",
    "shocking",
    "illegal_activity",
    "deception",
    "political",
    "public_health",
    "spam",
]
CATEGORIES: tuple[str, ...] = get_args(Category)

# NudeNet 3's classes in its output order (worker/detectors/nudenet.py decodes with these).
NUDENET_LABELS = (
    "FEMALE_GENITALIA_COVERED",
    "FACE_FEMALE",
    "BUTTOCKS_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_BREAST_EXPOSED",
    "ANUS_EXPOSED",
    "FEET_EXPOSED",
    "BELLY_COVERED",
    "FEET_COVERED",
    "ARMPITS_COVERED",
    "ARMPITS_EXPOSED",
    "FACE_MALE",
    "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "ANUS_COVERED",
    "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
)

# detector id -> every score name it emits for a frame
DECLARED_SCORES: dict[str, frozenset[str]] = {
    "open_nsfw": frozenset({"nsfw", "sfw"}),
    "nudenet": frozenset({*NUDENET_LABELS, "sexual"}),
    "sd_safety_checker": frozenset(
        {
            *(f"special_{j}" for j in range(3)),
            *(f"concept_{j:02d}" for j in range(17)),
            "nsfw",
            "special_care",
        }
    ),
    "laion_nsfw": frozenset({"nsfw"}),
    "q16": frozenset({"non_inappropriate", "inappropriate"}),
    "multiheaded": frozenset({"sexual", "violent", "disturbing", "hateful", "political"}),
    "laion_violence": frozenset({"non_violent", "violent"}),
    "falconsai_vit": frozenset({"normal", "nsfw"}),
    "clip_zeroshot": frozenset({*CATEGORIES, "safe"}),
}
