"""An LRU cache of image and video features, bounded in bytes, keyed by `Media.digest` (pixels and layout)."""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np


class FeatureCache:
    """Features of media seen before (same pixels, same layout) skip the vision and projector graphs.
    Safe to share between threads."""

    def __init__(self, max_mb: float):
        self.max_bytes = int(max_mb * 2**20)
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            features = self._entries.get(key)
            if features is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return features

    def put(self, key: str, features: np.ndarray) -> None:
        with self._lock:
            if features.nbytes > self.max_bytes or key in self._entries:
                return
            self._entries[key] = features
            self._bytes += features.nbytes
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes

    @property
    def size_bytes(self) -> int:
        return self._bytes
