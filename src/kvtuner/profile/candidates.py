"""The per-layer choices a search may make: (method, K bits, V bits) candidates, parsed from flags.

``--pairs`` takes shorthands (``K4V2``), method-qualified shorthands (``per_token:K8V4``),
either with KVQuant's options (``KV3+sink+prerope+nuq+ds1``, see
:func:`kvtuner.config.parse_label`), and the presets below; ``--methods`` says which methods
the unqualified pairs are tried with. FP8 stores 8 bits only, so it takes just the all-8 pairs
(``fp8:KV8``) of the list.
"""

from __future__ import annotations

from collections.abc import Iterable

from kvtuner.config import METHODS, KVConfigError, LayerSpec, parse_label, parse_shorthand

DEFAULT_PAIRS = ("KV8", "K8V4", "K4V8", "K4V4", "K4V2", "K2V4", "K2V2")
THREE_BIT_PAIRS = ("K8V3", "K3V8", "K4V3", "K3V4", "K3V3", "K3V2", "K2V3")
PRESETS = {
    "default": DEFAULT_PAIRS,
    "3bit": DEFAULT_PAIRS + THREE_BIT_PAIRS,
    "all": tuple(f"K{k}V{v}" if k != v else f"KV{k}" for k in (8, 4, 3, 2) for v in (8, 4, 3, 2)),
}


def split_list(text: str | Iterable[str]) -> list[str]:
    """``"a, b"`` or ``["a", "b"]`` -> ``["a", "b"]``."""
    items = text.split(",") if isinstance(text, str) else list(text)
    return [item.strip() for item in items if item.strip()]


def candidate_specs(
    pairs: str | Iterable[str] = DEFAULT_PAIRS,
    methods: str | Iterable[str] = ("kivi",),
    group_size: int = 32,
    residual_length: int = 32,
) -> list[LayerSpec]:
    """Distinct quantized layer specs for the pairs under the methods, in the order given.

    Raises ``KVConfigError`` naming an unknown pair or method, or when nothing is left.
    """
    methods = split_list(methods)
    for method in methods:
        if method not in METHODS or method == "fp16":
            raise KVConfigError(f"unknown method {method!r}; use kivi, per_token, fp8 or kvquant")
    specs: list[LayerSpec] = []
    for item in split_list(pairs):
        if item.lower() in PRESETS:
            expanded = [(m, p) for m in methods for p in PRESETS[item.lower()]]
        elif ":" in item:
            method, pair = item.split(":", 1)
            expanded = [(method.strip(), pair.strip())]
        else:
            expanded = [(m, item) for m in methods]
        for method, pair in expanded:
            try:
                k_bits, v_bits = parse_shorthand(pair.split("+")[0])
            except KVConfigError:
                raise KVConfigError(
                    f"unknown pair {pair!r}; expected e.g. KV8, K4V2, per_token:K8V4, KV3+sink+prerope or a preset "
                    f"({', '.join(PRESETS)})"
                ) from None
            if (k_bits, v_bits) == (16, 16):
                raise KVConfigError(f"pair {pair!r} is unquantized; fp16 is always the reference, not a candidate")
            if method == "fp8" and not {k_bits, v_bits} <= {8, 16}:
                if ":" in item:
                    raise KVConfigError(f"fp8 stores 8 bits; {item!r} is not an fp8 pair (use fp8:KV8)")
                continue  # an unqualified low-bit pair simply has no fp8 version
            if method == "kvquant" and not {k_bits, v_bits} <= {2, 3, 4, 16} and ":" not in item:
                continue  # nor an 8-bit pair a kvquant version (its levels are fitted for 2-4 bits)
            try:
                spec = parse_label(pair, group_size, residual_length, method)
            except KVConfigError as e:
                raise KVConfigError(f"unknown pair {item!r}: {e}") from None
            if spec not in specs:
                specs.append(spec)
    if not specs:
        raise KVConfigError("no candidate pairs: give --pairs such as KV8,K4V2 (fp8 takes only KV8)")
    return specs
