"""Shared fixtures of the evaluation tests."""

import numpy as np
import pytest

from flatfsc_jax.data import episodes as episodes_lib
from flatfsc_jax.data import sources

IMAGE = (16, 16, 1)


@pytest.fixture(scope="session")
def split_and_episodes():
    """A 16x16 grey split of 6 classes and 3 padded episodes the backbone adaptations run on."""
    return make_split_and_episodes()


def make_split_and_episodes():
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(6), 6)
    images = rng.integers(0, 256, (len(labels), *IMAGE), dtype=np.uint8)
    split = sources.SplitData("fake/x", "test", images, labels, [str(c) for c in range(6)])
    # 3 episodes, variable ways (3-4) and shots, padded to 12 support / 10 query, max_ways 5;
    # 5-8 support and query images each, so they share one power-of-two bucket (8).
    spec = [(3, [2, 2, 1]), (4, [1, 1, 2, 1]), (3, [3, 2, 2])]
    f = {k: np.zeros((3, 12), np.int32) for k in ("support_idx", "support_labels")}
    f.update({k: np.zeros((3, 10), np.int32) for k in ("query_idx", "query_labels")})
    f["support_mask"], f["query_mask"] = np.zeros((3, 12), bool), np.zeros((3, 10), bool)
    for e, (ways, shots) in enumerate(spec):
        classes = rng.choice(6, ways, replace=False)
        s, q = [], []
        for j, (c, k) in enumerate(zip(classes, shots, strict=True)):
            items = rng.permutation(np.flatnonzero(labels == c))
            s += [(i, j) for i in items[:k]]
            q += [(i, j) for i in items[k : k + 2]]
        f["support_idx"][e, : len(s)], f["support_labels"][e, : len(s)] = np.transpose(s)
        f["query_idx"][e, : len(q)], f["query_labels"][e, : len(q)] = np.transpose(q)
        f["support_mask"][e, : len(s)], f["query_mask"][e, : len(q)] = True, True
    episodes = episodes_lib.EpisodeBatch(
        **f,
        ways=np.array([w for w, _ in spec], np.int32),
        classes=np.full((3, 5), -1, np.int32),  # not used by adapt
        max_ways=5,
    )
    return split, episodes
