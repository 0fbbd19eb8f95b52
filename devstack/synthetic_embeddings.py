"""Synthetic embeddings shaped like a CNN's pooled features, generated in reproducible chunks.

Uniform random Gaussians have no neighbour structure (every point is nearly equidistant from every
other in 512 dims), so no ANN index helps and recall figures on them say nothing about real runs.
Real pooled activations are non-negative, sparse-ish and lie near a low-dimensional set with
clusters (similar views, similar tissue). So: ``clusters`` centres in a ``latent``-dimensional
space, each point a centre plus Gaussian spread, mapped to ``dim`` units by a fixed random linear
map, rectified (ReLU, like the activations before pooling), plus small non-negative noise, then
L2-normalised as the engine normalises ``features["embedding"]``. Chunk ``i`` is generated from
seed ``(seed, i)``, so any pass over the rows gives the same rows without holding the matrix.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

LATENT = 24
CLUSTERS = 1000
SPREAD = 0.5  # within-cluster spread: half the centres' scale (neighbours cross list borders)
NOISE = 0.02
CHUNK = 16384


class SyntheticEmbeddings:
    """``n`` rows of ``dim`` float32 unit vectors; ``chunks()`` is a fresh, identical pass each call."""

    def __init__(self, n: int, dim: int, seed: int = 0, clusters: int = CLUSTERS, latent: int = LATENT,
                 chunk: int = CHUNK, spread: float = SPREAD, draw: int = 0) -> None:
        self.n, self.dim, self.seed, self.chunk, self.spread, self.draw = n, dim, seed, chunk, spread, draw
        rng = np.random.default_rng(seed)
        self.centres = rng.standard_normal((clusters, latent)).astype(np.float32)
        self.mapping = (rng.standard_normal((latent, dim)) / np.sqrt(latent)).astype(np.float32)

    def block(self, i: int) -> np.ndarray:
        start = i * self.chunk
        rows = min(self.chunk, self.n - start)
        rng = np.random.default_rng([self.seed, self.draw, i])  # draw 1..: other rows, same clusters
        which = rng.integers(0, len(self.centres), rows)
        latent = self.centres[which] + self.spread * rng.standard_normal((rows, self.centres.shape[1]), np.float32)
        x = np.maximum(latent @ self.mapping, 0.0) + NOISE * np.abs(rng.standard_normal((rows, self.dim), np.float32))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x.astype(np.float32, copy=False)

    def chunks(self) -> Iterator[np.ndarray]:
        for i in range((self.n + self.chunk - 1) // self.chunk):
            yield self.block(i)

    def matrix(self) -> np.ndarray:
        return np.concatenate(list(self.chunks())) if self.n else np.zeros((0, self.dim), np.float32)
