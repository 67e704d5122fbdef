"""Configs as data: per-layer KV precision (``LayerSpec``), a whole model's ``KVConfig``.

A ``KVConfig`` round-trips through JSON with a schema version and a model fingerprint, and
through KVTuner's published per-layer YAML presets (``{layer: {nbits_key: 8, nbits_value: 4}}``),
so configs move both ways between the two tools. Only stdlib and PyYAML here.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

SCHEMA_VERSION = 1
METHODS = ("kivi", "per_token", "fp8", "kvquant", "fp16")
INT_BITS = (1, 2, 3, 4, 8, 16)
FP8_BITS = (8, 16)
CODEBOOK_BITS = (2, 3, 4)
SPEC_FIELDS = ("method", "k_bits", "v_bits", "group_size", "residual_length", "sink", "pre_rope", "codebook", "outliers")


class KVConfigError(ValueError):
    """A config that cannot be used, with a message that names the problem."""


@dataclass(frozen=True)
class LayerSpec:
    """How one layer stores its keys and values.

    method: ``kivi`` (keys per channel, values per token, asymmetric, grouped, with a
    full-precision window of recent tokens), ``per_token`` (both per token, as llama.cpp does),
    ``fp8`` (e4m3 with a scale per group), ``kvquant`` (KVQuant's layout: keys per channel over
    a calibrated range, no per-group scales at all; values per token over the whole head; 2-4
    bits, needs a calibration file) or ``fp16`` (unquantized).
    k_bits / v_bits: 16 leaves that side unquantized.
    residual_length: recent tokens kept in full precision; when the window fills it is
    quantized in one go (for ``kivi`` it must be a multiple of ``group_size``, since keys are
    grouped along tokens).

    KVQuant's options (Hooper et al., 2024), composable, all off by default
    (:mod:`kvtuner.method` says what each stores):
    sink: the first ``sink`` tokens of the sequence stay full precision (attention sinks).
    pre_rope: keys are quantized before the rotary embedding and re-rotated on read.
    codebook: integer codes index calibrated non-uniform levels inside each group (NUQ; 2-4 bits).
    outliers: fraction of elements (e.g. 0.01) outside calibrated thresholds kept sparse in fp16.
    """

    method: str = "kivi"
    k_bits: int = 16
    v_bits: int = 16
    group_size: int = 32
    residual_length: int = 32
    sink: int = 0
    pre_rope: bool = False
    codebook: bool = False
    outliers: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise KVConfigError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        allowed = {"fp16": (16,), "fp8": FP8_BITS, "kvquant": CODEBOOK_BITS + (16,)}.get(self.method, INT_BITS)
        for side, bits in (("k_bits", self.k_bits), ("v_bits", self.v_bits)):
            if not isinstance(bits, int) or isinstance(bits, bool) or bits not in allowed:
                raise KVConfigError(
                    f"unsupported {side}={bits!r} for method {self.method!r}; supported: {', '.join(map(str, allowed))}"
                )
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise KVConfigError(f"group_size must be a positive integer, not {self.group_size!r}")
        if not isinstance(self.residual_length, int) or self.residual_length < 0:
            raise KVConfigError(f"residual_length must be a non-negative integer, not {self.residual_length!r}")
        if self.method == "kivi" and self.residual_length % self.group_size:
            raise KVConfigError(
                f"residual_length {self.residual_length} is not a multiple of group_size {self.group_size} "
                "(KIVI quantizes keys in groups of group_size tokens)"
            )
        if not isinstance(self.sink, int) or isinstance(self.sink, bool) or self.sink < 0:
            raise KVConfigError(f"sink must be a non-negative integer, not {self.sink!r}")
        for name in ("pre_rope", "codebook"):
            if not isinstance(getattr(self, name), bool):
                raise KVConfigError(f"{name} must be true or false, not {getattr(self, name)!r}")
        if isinstance(self.outliers, bool) or not isinstance(self.outliers, (int, float)) or not 0 <= self.outliers < 0.5:
            raise KVConfigError(f"outliers must be a fraction in [0, 0.5), not {self.outliers!r}")
        # a label carries the percentage to 4 decimals; so does the spec, or the two would not round-trip
        object.__setattr__(self, "outliers", round(float(self.outliers), 6))
        if self.codebook or self.outliers:
            if self.method not in ("kivi", "per_token", "kvquant"):
                raise KVConfigError(
                    f"codebooks and outliers apply to integer methods (kivi, per_token, kvquant), not {self.method!r}")
        if self.codebook:
            for side, bits in (("k_bits", self.k_bits), ("v_bits", self.v_bits)):
                if bits not in CODEBOOK_BITS + (16,):
                    raise KVConfigError(f"codebook levels are fitted for 2, 3 or 4 bits, not {side}={bits}")
        if self.method == "fp16" and (self.sink or self.pre_rope):
            raise KVConfigError("an fp16 layer stores everything in full precision; sink and pre_rope do not apply")

    @property
    def is_quantized(self) -> bool:
        return self.method != "fp16" and (self.k_bits < 16 or self.v_bits < 16)

    @property
    def window(self) -> int:
        """Tokens quantized together when the residual fills (keys per channel need a whole group)."""
        return self.residual_length or (self.group_size if self.method == "kivi" else 1)

    @property
    def avg_bits(self) -> float:
        """Nominal bits per element, K and V averaged (the figure KVTuner quotes)."""
        return (self.k_bits + self.v_bits) / 2

    @property
    def label(self) -> str:
        """``[method:]PAIR[+option...]``, e.g. ``KV3+sink1+prerope+nuq+ds1`` (readable by :func:`parse_label`)."""
        if not self.is_quantized:
            return "fp16"
        pair = f"KV{self.k_bits}" if self.k_bits == self.v_bits else f"K{self.k_bits}V{self.v_bits}"
        options = [f"sink{self.sink}"] * bool(self.sink) + ["prerope"] * self.pre_rope + ["nuq"] * self.codebook
        if self.outliers:
            options.append(f"ds{100 * self.outliers:g}")
        text = "+".join([pair, *options])
        return text if self.method == "kivi" else f"{self.method}:{text}"


@dataclass(frozen=True)
class ModelFingerprint:
    """What a config must agree with: the model's attention shape."""

    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int


_SHORTHAND = re.compile(r"^(?:KV(?P<kv>\d+)|K(?P<k>\d+)V(?P<v>\d+))$", re.IGNORECASE)


_OPTION = re.compile(r"^(?:sink(?P<sink>\d*)|(?P<prerope>prerope)|(?P<nuq>nuq)|ds(?P<ds>\d+(?:\.\d+)?)?)$", re.IGNORECASE)


def parse_label(text: str, group_size: int = 32, residual_length: int = 32, method: str = "kivi") -> LayerSpec:
    """A layer spec from ``[method:]PAIR[+option...]``: ``K4V2``, ``per_token:KV8``, ``KV3+sink+prerope+nuq+ds1``.

    Options: ``sink`` / ``sinkN`` (N full-precision first tokens, default 1), ``prerope``, ``nuq``,
    ``ds`` / ``dsP`` (dense-and-sparse, P percent outliers, default 1).
    """
    if ":" in text:
        method, text = (part.strip() for part in text.split(":", 1))
    pair, *options = (part.strip() for part in text.split("+"))
    k_bits, v_bits = parse_shorthand(pair)
    kwargs: dict[str, Any] = {}
    for option in options:
        m = _OPTION.match(option)
        if not m:
            raise KVConfigError(f"unknown option {option!r} in {text!r}; use sink[N], prerope, nuq or ds[P]")
        if m["sink"] is not None:
            kwargs["sink"] = int(m["sink"] or 1)
        elif m["prerope"]:
            kwargs["pre_rope"] = True
        elif m["nuq"]:
            kwargs["codebook"] = True
        else:
            kwargs["outliers"] = float(m["ds"] or 1) / 100
    if (k_bits, v_bits) == (16, 16):
        if kwargs:
            raise KVConfigError(f"{text!r}: options need a quantized pair")
        method = "fp16"
    return LayerSpec(method, k_bits, v_bits, group_size, residual_length, **kwargs)


def parse_shorthand(text: str) -> tuple[int, int]:
    """``KV8`` -> (8, 8), ``K4V2`` -> (4, 2), ``fp16`` -> (16, 16)."""
    if text.lower() in ("fp16", "bf16", "kv16"):
        return 16, 16
    m = _SHORTHAND.match(text.strip())
    if not m:
        raise KVConfigError(f"cannot read KV shorthand {text!r}; expected e.g. KV8, K8V4, K4V2 or fp16")
    if m["kv"]:
        return int(m["kv"]), int(m["kv"])
    return int(m["k"]), int(m["v"])


@dataclass
class KVConfig:
    """Per-layer KV specs for one model, versioned and fingerprinted."""

    layers: list[LayerSpec]
    model: ModelFingerprint | None = None
    name: str = ""
    version: int = SCHEMA_VERSION
    meta: dict[str, Any] = field(default_factory=dict)
    calibration: str | None = None  # calibration file (NUQ levels, outlier thresholds), relative to the config's folder

    def __post_init__(self) -> None:
        if not self.layers:
            raise KVConfigError("a KVConfig needs at least one layer")
        if self.version != SCHEMA_VERSION:
            raise KVConfigError(f"unsupported config version {self.version}; this kvtuner reads version {SCHEMA_VERSION}")
        if self.model is not None and self.model.num_layers != len(self.layers):
            raise KVConfigError(
                f"config has {len(self.layers)} layers but its model fingerprint says {self.model.num_layers}"
            )
        if self.calibration is not None and not isinstance(self.calibration, str):
            raise KVConfigError(f"'calibration' must be a file path, not {self.calibration!r}")

    # --- construction -------------------------------------------------------------------
    @classmethod
    def uniform(
        cls,
        kv: str | tuple[int, int],
        num_layers: int,
        method: str = "kivi",
        group_size: int = 32,
        residual_length: int = 32,
        model: ModelFingerprint | None = None,
        calibration: str | None = None,
    ) -> "KVConfig":
        """Every layer alike; ``kv`` a label (``K4V2``, ``KV3+sink+prerope``, see :func:`parse_label`) or a bit pair."""
        if method == "fp16" and kv not in ("fp16", (16, 16)):
            raise KVConfigError(f"method 'fp16' stores 16 bits; it cannot give {kv}")
        if isinstance(kv, str):
            spec = parse_label(kv, group_size, residual_length, method)
        else:
            spec = LayerSpec("fp16" if tuple(kv) == (16, 16) else method, *kv, group_size, residual_length)
        name = spec.label if isinstance(kv, tuple) or method != "kivi" or "+" in kv else kv
        return cls([spec] * num_layers, model=model, name=name, calibration=calibration)

    # --- facts ----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def avg_bits(self) -> float:
        """Nominal bits averaged over layers and over K and V."""
        return sum(s.avg_bits for s in self.layers) / len(self.layers)

    def calibration_path(self, base: str | os.PathLike | None = None) -> Path | None:
        """The calibration file, a relative path taken from ``base`` (the config's folder)."""
        if self.calibration is None:
            return None
        path = Path(self.calibration)
        return path if path.is_absolute() or base is None else Path(base) / path

    def check_model(self, fingerprint: ModelFingerprint) -> None:
        """Raise ``KVConfigError`` if this config cannot serve a model with ``fingerprint``."""
        if self.num_layers != fingerprint.num_layers:
            raise KVConfigError(
                f"config has {self.num_layers} layers but the model ({fingerprint.architecture}) has "
                f"{fingerprint.num_layers}"
            )
        if self.model is not None:
            for attr in ("num_kv_heads", "head_dim"):
                mine, theirs = getattr(self.model, attr), getattr(fingerprint, attr)
                if mine != theirs:
                    raise KVConfigError(f"config was made for {attr}={mine} but the model has {attr}={theirs}")
        for i, spec in enumerate(self.layers):  # kvquant groups whole heads and never uses group_size
            if spec.is_quantized and spec.method != "kvquant" and fingerprint.head_dim % spec.group_size:
                raise KVConfigError(
                    f"layer {i}: group_size {spec.group_size} does not divide head_dim {fingerprint.head_dim}"
                )

    # --- JSON -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "name": self.name,
            "model": asdict(self.model) if self.model else None,
            "avg_bits": round(self.avg_bits, 4),
            "layers": [asdict(s) for s in self.layers],
            "calibration": self.calibration,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> "KVConfig":
        if not isinstance(data, dict) or "layers" not in data:
            raise KVConfigError(f"{source}: expected an object with a 'layers' list")
        if not isinstance(data["layers"], list):
            raise KVConfigError(f"{source}: 'layers' must be a list")
        layers = []
        for i, item in enumerate(data["layers"]):
            if not isinstance(item, dict):
                raise KVConfigError(f"{source}: layer {i} must be an object")
            unknown = set(item) - set(SPEC_FIELDS)
            if unknown:
                raise KVConfigError(f"{source}: layer {i} has unknown field(s) {', '.join(sorted(unknown))}")
            try:
                layers.append(LayerSpec(**item))
            except KVConfigError as e:
                raise KVConfigError(f"{source}: layer {i}: {e}") from None
        model = data.get("model")
        if model is not None:
            try:
                model = ModelFingerprint(**model)
            except TypeError:
                raise KVConfigError(f"{source}: malformed 'model' fingerprint {model!r}") from None
        try:
            return cls(layers, model=model, name=data.get("name", ""), version=data.get("version", SCHEMA_VERSION),
                       meta=data.get("meta") or {}, calibration=data.get("calibration"))
        except KVConfigError as e:
            raise KVConfigError(f"{source}: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "config") -> "KVConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise KVConfigError(f"{source}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        return cls.from_dict(data, source)

    # --- KVTuner YAML presets ---------------------------------------------------------------
    def to_kvtuner_dict(self) -> dict[int, dict[str, Any]]:
        """KVTuner's per-layer preset: ``nbits_key`` / ``nbits_value``, which KVTuner reads, plus every other
        field that differs from the defaults (method, group size, residual, options), which it ignores and
        :meth:`from_kvtuner_dict` reads back, so nothing is lost."""
        defaults = LayerSpec()
        preset = {}
        for i, spec in enumerate(self.layers):
            entry: dict[str, Any] = {"nbits_key": spec.k_bits, "nbits_value": spec.v_bits}
            for name in SPEC_FIELDS[3:]:
                if getattr(spec, name) != getattr(defaults, name):
                    entry[name] = getattr(spec, name)
            if spec.method not in ("kivi", "fp16"):
                entry["method"] = spec.method
            preset[i] = entry
        return preset

    @classmethod
    def from_kvtuner_dict(
        cls, data: Any, source: str = "preset", method: str = "kivi", group_size: int = 32, residual_length: int = 32
    ) -> "KVConfig":
        if not isinstance(data, dict) or not data:
            raise KVConfigError(f"{source}: expected a mapping {{layer: {{nbits_key, nbits_value}}}}")
        try:
            indices = sorted(int(k) for k in data)
        except (TypeError, ValueError):
            raise KVConfigError(f"{source}: layer keys must be integers") from None
        if indices != list(range(len(indices))):
            raise KVConfigError(f"{source}: layers must be numbered 0..{len(indices) - 1} without gaps")
        layers = []
        for i in indices:
            entry = data.get(i, data.get(str(i)))
            if not isinstance(entry, dict) or not {"nbits_key", "nbits_value"} <= set(entry):
                raise KVConfigError(f"{source}: layer {i} needs nbits_key and nbits_value")
            k, v = entry["nbits_key"], entry["nbits_value"]
            extra = {name: entry[name] for name in SPEC_FIELDS if name in entry}
            unknown = set(entry) - set(SPEC_FIELDS) - {"nbits_key", "nbits_value"}
            if unknown:
                raise KVConfigError(f"{source}: layer {i} has unknown field(s) {', '.join(sorted(unknown))}")
            fields = {"method": "fp16" if (k, v) == (16, 16) else method, "group_size": group_size,
                      "residual_length": residual_length, **extra}
            try:
                layers.append(LayerSpec(k_bits=k, v_bits=v, **fields))
            except KVConfigError as e:
                raise KVConfigError(f"{source}: layer {i}: {e}") from None
        return cls(layers, name=Path(source).stem)

    # --- files ------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON (or a KVTuner YAML preset for .yaml/.yml) atomically: never a half-written file."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            if self.calibration is not None:
                raise KVConfigError("a KVTuner YAML preset cannot reference a calibration file; save as .json")
            text = yaml.safe_dump(self.to_kvtuner_dict(), sort_keys=False)
        else:
            text = self.to_json() + "\n"
        write_atomic(path, text)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, **preset_kwargs: Any) -> "KVConfig":
        """Read a kvtuner JSON config or a KVTuner YAML preset (by extension)."""
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise KVConfigError(f"{path}: no such config file") from None
        except OSError as e:
            raise KVConfigError(f"{path}: cannot read ({e.strerror})") from None
        if path.suffix in (".yaml", ".yml"):
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise KVConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
            if isinstance(data, dict) and "layers" in data:
                return cls.from_dict(data, str(path))._resolve_calibration(path)
            return cls.from_kvtuner_dict(data, str(path), **preset_kwargs)
        return cls.from_json(text, str(path))._resolve_calibration(path)

    def _resolve_calibration(self, path: Path) -> "KVConfig":
        """A calibration path relative to the config file, made absolute: usable from any working directory,
        and still right when the config is saved elsewhere."""
        resolved = self.calibration_path(path.parent)
        self.calibration = None if resolved is None else str(resolved.resolve())
        return self


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

