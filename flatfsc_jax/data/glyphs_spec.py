"""What the shipped Glyphs render is: its domains, file names and identifying checksums.

Shared by the reader (``glyphs.py``) and the offline renderer that made the shipped files
(``tools/glyphs_render.py``, not part of the installed package): the renderer imports
these names from here, the package never imports the renderer. numpy only (no TFDS), so
config validation can list the domains cheaply.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

from flatfsc_jax.data.sources import SPLITS

__all__ = [
    "CARD_NAME",
    "DOMAINS",
    "NPZ_NAME",
    "SEEN_DOMAINS",
    "SPLITS",
    "UNSEEN_DOMAINS",
    "content_sha256",
    "file_sha256",
]

NPZ_NAME = "glyphs-v1.npz"
CARD_NAME = "glyphs-v1.json"

# Seen domains split their classes train/valid/test (cjk is the large, general,
# "ImageNet-like" one); unseen domains are test-only. The order is the domain id.
SEEN_DOMAINS = ("cjk", "latin", "greek", "cyrillic", "kana")
UNSEEN_DOMAINS = ("digits", "hangul", "thai", "arabic", "hebrew", "devanagari", "bengali")
DOMAINS = SEEN_DOMAINS + UNSEEN_DOMAINS


def content_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """Checksum of the benchmark's arrays (names, dtypes, shapes, bytes), independent of how the
    npz container was compressed: two renders are the same benchmark iff this matches."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def file_sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
