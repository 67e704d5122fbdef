"""Per-layer KV sensitivity from calibration text: single-layer decode-faithful KL and attention statistics."""

from kvtuner.profile.blockwise import BlockwiseEvaluator, decode_faithful_attention
from kvtuner.profile.candidates import DEFAULT_PAIRS, PRESETS, candidate_specs
from kvtuner.profile.data import PROMPTS, CalibrationData, calibration_data, generate_text
from kvtuner.profile.sensitivity import (
    Profile,
    ProfileSettings,
    Unit,
    assemble_profile,
    check_profile,
    measure_unit,
    profile_layers,
    profile_units,
)

__all__ = [
    "DEFAULT_PAIRS",
    "PRESETS",
    "PROMPTS",
    "BlockwiseEvaluator",
    "CalibrationData",
    "Profile",
    "ProfileSettings",
    "Unit",
    "assemble_profile",
    "check_profile",
    "calibration_data",
    "candidate_specs",
    "decode_faithful_attention",
    "generate_text",
    "measure_unit",
    "profile_layers",
    "profile_units",
]
