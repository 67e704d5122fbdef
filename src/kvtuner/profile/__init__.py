"""Per-layer KV sensitivity from calibration text: single-layer decode-faithful KL and attention statistics."""

from kvtuner.profile.blockwise import BlockwiseEvaluator, decode_faithful_attention
from kvtuner.profile.candidates import DEFAULT_PAIRS, PRESETS, candidate_specs
from kvtuner.profile.data import PROMPTS, CalibrationData, calibration_data, generate_text
from kvtuner.profile.sensitivity import Profile, ProfileSettings, profile_layers

__all__ = [
    "DEFAULT_PAIRS",
    "PRESETS",
    "PROMPTS",
    "BlockwiseEvaluator",
    "CalibrationData",
    "Profile",
    "ProfileSettings",
    "calibration_data",
    "candidate_specs",
    "decode_faithful_attention",
    "generate_text",
    "profile_layers",
]
