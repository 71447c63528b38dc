"""Compression settings: a frozen, validated dataclass stored in the output model's metadata.

Per-layer overrides are keyed by Conv node name. Values are checked on construction, so a
config that exists is a config that makes sense; checks that need the model (m no larger
than a layer's slice count) happen when the layer is planned.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import ConfigError

SCALE_MODES = ("slice", "filter")
EXECUTIONS = ("auto", "speed", "dense", "lean", "stacked")
REPRESENTATIONS = ("binary", "int8", "int4")  # stacked binary codebook, or per-channel integers (DequantizeLinear)
RESTS = ("float", "int8")  # how the float weights compression leaves are stored (see rest.py)
CONFIG_VERSION = 1


@dataclass(frozen=True)
class LayerOverride:
    """Settings for one Conv node; None keeps the global value."""

    slice_dim: int | None = None
    codebook_size: int | None = None
    execution: str | None = None
    terms: int | None = None
    skip: bool = False
    reason: str | None = None  # why the layer is skipped, when not the user's choice
    representation: str | None = None  # "binary" (the default), "int8" or "int4" (per output channel)
    scale: str | None = None  # a binary layer's scale mode ("slice" or "filter"); None: the config's


@dataclass(frozen=True)
class CompressConfig:
    """How every eligible Conv is compressed.

    slice_dim: d, input channels per slice (D = d * kh * kw weights a slice).
    codebook_size: m, binary codewords shared by one layer's slices; None picks
        min(max_codebook_size, the largest power of two <= slices / slices_per_codeword).
    scale: "slice" (one float16 scale per slice) or "filter" (one per output filter).
    terms: k, codewords stacked per slice (1 is the paper's form; 2 cuts the error at twice the
        index and scale bits).
    execution: "auto" (the faster form per layer by the cost model, dense or stacked, then lean for the
        layers with the fewest output pixels until the predicted session memory is at most the original's:
        core.cost.memory_plan), "speed" (the faster form per layer, memory not considered), "dense" (decode
        once at session start, then Conv: as fast as the original, more memory), "lean" (decode at every
        run: the least memory, slower) or "stacked" (binary Conv over channel groups, then a sparse 1x1 merge).
    iterations: alternating assign / scale / update steps of the codebook fit.
    skip: Conv node names left dense.
    overrides: node name -> LayerOverride (its `representation` "int8" / "int4" stores that layer as
        per-channel integers through DequantizeLinear instead of a binary codebook).
    calibration_positions: output positions sampled per calibration image and layer.
    calibration_damp: ridge term of the output-aware fit, relative to the mean input energy.
    rest: "float" keeps what compression leaves (layers kept dense or skipped, weights of other nodes) as it
        is; "int8" stores each such weight worth it per output channel through DequantizeLinear (rest.py).
    """

    slice_dim: int = 16
    codebook_size: int | None = None
    max_codebook_size: int = 256
    slices_per_codeword: int = 4
    scale: str = "slice"
    terms: int = 1
    execution: str = "auto"
    iterations: int = 20
    seed: int = 0
    calibration_positions: int = 64
    calibration_damp: float = 0.01
    skip: tuple[str, ...] = ()
    overrides: Mapping[str, LayerOverride] = field(default_factory=dict)
    rest: str = "float"

    def __post_init__(self) -> None:
        object.__setattr__(self, "skip", tuple(self.skip))
        object.__setattr__(self, "overrides", dict(self.overrides))
        _check_slice_dim(self.slice_dim, "slice_dim")
        if self.codebook_size is not None:
            _check_codebook_size(self.codebook_size, "codebook_size")
        _check_codebook_size(self.max_codebook_size, "max_codebook_size")
        if self.slices_per_codeword < 1:
            raise ConfigError(f"slices_per_codeword must be >= 1, got {self.slices_per_codeword}")
        if not isinstance(self.terms, int) or not 1 <= self.terms <= 4:
            raise ConfigError(f"terms must be an integer in [1, 4], got {self.terms!r}")
        if self.scale not in SCALE_MODES:
            raise ConfigError(f"scale must be one of {SCALE_MODES}, got {self.scale!r}")
        _check_execution(self.execution, "execution")
        if self.rest not in RESTS:
            raise ConfigError(f"rest must be one of {RESTS}, got {self.rest!r}")
        if not 0 <= self.iterations <= 1000:
            raise ConfigError(f"iterations must be in [0, 1000], got {self.iterations}")
        if not 1 <= self.calibration_positions <= 1 << 20:
            raise ConfigError(f"calibration_positions must be in [1, 1048576], got {self.calibration_positions}")
        if not 0 < self.calibration_damp < 100:
            raise ConfigError(f"calibration_damp must be in (0, 100), got {self.calibration_damp}")
        for name, ov in self.overrides.items():
            if not isinstance(ov, LayerOverride):
                raise ConfigError(f"override for {name!r} must be a LayerOverride, got {type(ov).__name__}")
            if ov.slice_dim is not None:
                _check_slice_dim(ov.slice_dim, f"slice_dim of {name!r}")
            if ov.codebook_size is not None:
                _check_codebook_size(ov.codebook_size, f"codebook_size of {name!r}")
            if ov.terms is not None and not (isinstance(ov.terms, int) and 1 <= ov.terms <= 4):
                raise ConfigError(f"terms of {name!r} must be an integer in [1, 4], got {ov.terms!r}")
            if ov.execution is not None:
                _check_execution(ov.execution, f"execution of {name!r}")
            if ov.scale is not None and ov.scale not in SCALE_MODES:
                raise ConfigError(f"scale of {name!r} must be one of {SCALE_MODES}, got {ov.scale!r}")
            if ov.representation is not None and ov.representation not in REPRESENTATIONS:
                raise ConfigError(f"representation of {name!r} must be one of {REPRESENTATIONS}, "
                                  f"got {ov.representation!r}")

    def for_layer(self, name: str) -> "LayerSettings":
        """The settings that apply to one Conv node."""
        ov = self.overrides.get(name, LayerOverride())
        return LayerSettings(
            slice_dim=ov.slice_dim or self.slice_dim,
            codebook_size=ov.codebook_size or self.codebook_size,
            execution=ov.execution or self.execution,
            terms=ov.terms or self.terms,
            skip=ov.skip or name in self.skip,
            skip_reason=ov.reason if ov.skip and ov.reason else "excluded by the user",
            representation=ov.representation or "binary",
            scale=ov.scale or self.scale,
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["skip"] = list(self.skip)
        d["overrides"] = {k: _override_dict(v) for k, v in self.overrides.items()}
        if d["rest"] == "float":  # left out at its default: configs from before --rest keep their JSON and bytes
            del d["rest"]
        d["version"] = CONFIG_VERSION
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CompressConfig":
        d = dict(d)
        version = d.pop("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ConfigError(f"config version {version} is not supported (expected {CONFIG_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        d["overrides"] = {k: LayerOverride(**v) for k, v in d.get("overrides", {}).items()}
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass(frozen=True)
class LayerSettings:
    slice_dim: int
    codebook_size: int | None
    execution: str
    skip: bool
    terms: int = 1
    skip_reason: str = "excluded by the user"
    representation: str = "binary"
    scale: str = "slice"

    @property
    def int_bits(self) -> int | None:
        """4 or 8 for an integer representation, None for binary."""
        return {"int8": 8, "int4": 4}.get(self.representation)


def _override_dict(ov: LayerOverride) -> dict[str, Any]:
    """An override as stored; an unset representation is left out, so configs that never name one keep
    the JSON (and the output bytes) they had before integer layers existed."""
    d = dataclasses.asdict(ov)
    if d["representation"] is None:
        del d["representation"]
    if d["scale"] is None:  # likewise for a per-layer scale mode
        del d["scale"]
    return d


def _check_slice_dim(v: int, what: str) -> None:
    if not isinstance(v, int) or not 1 <= v <= 4096:
        raise ConfigError(f"{what} must be an integer in [1, 4096], got {v!r}")


def _check_codebook_size(v: int, what: str) -> None:
    if not isinstance(v, int) or not 2 <= v <= 65536:
        raise ConfigError(f"{what} must be an integer in [2, 65536], got {v!r}")


def _check_execution(v: str, what: str) -> None:
    if v not in EXECUTIONS:
        raise ConfigError(f"{what} must be one of {EXECUTIONS}, got {v!r}")
