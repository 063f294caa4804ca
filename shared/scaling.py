"""Input scaling: how raw 0..255 pixels become the network's inputs, stored with every model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class InputScaling:
    """Affine map ``x -> offset + scale * x`` applied to raw features before the first layer."""

    offset: float = 0.0
    scale: float = 1.0 / 255.0

    @classmethod
    def unit(cls) -> InputScaling:
        """Pixels to 0..1, the common choice."""
        return cls(0.0, 1.0 / 255.0)

    @classmethod
    def tutorial(cls) -> InputScaling:
        """Pixels to 0.01..1.0, as 'Make Your Own Neural Network' scales them."""
        return cls(0.01, 0.99 / 255.0)

    @classmethod
    def identity(cls) -> InputScaling:
        """Features used as given (already-scaled or non-image data)."""
        return cls(0.0, 1.0)

    def apply(self, raw: np.ndarray, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """Return ``offset + scale * raw`` as a new array of ``dtype``."""
        out = np.empty(np.shape(raw), dtype=dtype)
        self.apply_into(raw, out)
        return out

    def apply_into(self, raw: np.ndarray, out: np.ndarray) -> None:
        """Write ``offset + scale * raw`` into ``out``, computed in ``out``'s dtype."""
        # Python floats become out's dtype (NEP 50), with no scalar conversion per call: this
        # runs once per training example in per-sample SGD.
        np.multiply(raw, self.scale, out=out, dtype=out.dtype)
        if self.offset:
            out += self.offset

    def as_dict(self) -> dict[str, float]:
        return {"offset": float(self.offset), "scale": float(self.scale)}

    @classmethod
    def from_dict(cls, data: dict) -> InputScaling:
        try:
            offset, scale = float(data["offset"]), float(data["scale"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"input_scaling must be {{'offset': float, 'scale': float}}, got {data!r}"
            ) from exc
        if not (np.isfinite(offset) and np.isfinite(scale)) or scale == 0:
            raise ValueError(
                f"input_scaling needs finite offset and non-zero finite scale, got {data!r}"
            )
        return cls(offset, scale)


def dtype_scalar(value: float, dtype: np.dtype | type) -> np.generic:
    """``value`` as a NumPy scalar of ``dtype``, so arithmetic never upcasts an array."""
    return np.dtype(dtype).type(value)
