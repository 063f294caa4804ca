"""A labelled dataset: raw features (for MNIST, 0..255 pixels) and integer class labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Dataset:
    """``features (n, d)`` as stored (uint8 pixels or floats) and ``labels (n,)`` class indices."""

    features: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.features.ndim != 2:
            raise ValueError(f"features must be 2-D (n, d), got shape {self.features.shape}")
        if self.labels.shape != (self.features.shape[0],):
            raise ValueError(
                f"{self.features.shape[0]} feature rows but labels have shape {self.labels.shape}"
            )

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def take(self, count: int) -> Dataset:
        """The first ``count`` examples."""
        return Dataset(self.features[:count], self.labels[:count])


# The weight/height toy from Victor Zhou's 'Machine Learning for Beginners: An Introduction to
# Neural Networks': (weight - 135 lb, height - 66 in) -> 1 for female.
TOY_PEOPLE = Dataset(
    np.array([[-2, -1], [25, 6], [17, 4], [-15, -6]], dtype=np.float64),
    np.array([1, 0, 0, 1], dtype=np.int64),
)
