"""Protocol helpers: PARC support subsets, episode selection, family -> backbone mapping."""

import dataclasses

import numpy as np

from configs import glyphs as glyphs_config
from flatfsc_jax import parc, protocol
from flatfsc_jax.data import episodes as episodes_lib


def _batch(n_classes=12, per_class=30, n=20, seed=0):
    labels = np.repeat(np.arange(n_classes), per_class)
    spec = episodes_lib.EpisodeSpec(mode="variable")
    sampler = episodes_lib.EpisodeSampler(labels, spec, seed=seed)
    eps = sampler.sample(n)
    return labels, eps, episodes_lib.pad_episodes(eps, **episodes_lib.bucket_sizes(labels, spec))


def test_parc_subsets_are_random_subsets_of_the_support():
    labels, eps, batch = _batch()
    idx, lab, mask = protocol.parc_subsets(batch, 40, seed=0)
    assert idx.shape == (len(eps), 40)
    for e, ep in enumerate(eps):
        chosen = idx[e][mask[e]]
        assert len(chosen) == min(40, len(ep.support_idx))
        assert set(chosen) <= set(ep.support_idx.tolist())
        lookup = dict(zip(ep.support_idx.tolist(), ep.support_labels.tolist(), strict=True))
        assert [lookup[i] for i in chosen] == lab[e][mask[e]].tolist()
    again = protocol.parc_subsets(batch, 40, seed=0)
    np.testing.assert_array_equal(again[0], idx)
    full = protocol.parc_subsets(batch, 0, seed=0)
    assert full[0] is batch.support_idx


def test_parc_scores_on_padded_episodes_equal_unpadded_parc():
    labels, eps, batch = _batch(n=6)
    emb = np.random.default_rng(1).normal(size=(len(labels), 8)).astype(np.float32)
    scores = protocol.parc_scores(emb, protocol.parc_subsets(batch, 0, seed=0), chunk=4)
    for e, ep in enumerate(eps):
        ref = parc.parc_score(emb[ep.support_idx], ep.support_labels)
        np.testing.assert_allclose(scores[e], ref, atol=1e-5)


def test_take_episodes_keeps_padded_shapes():
    _, _, batch = _batch(n=10)
    sub = protocol.take_episodes(batch, [3, 7])
    assert sub.support_idx.shape == (2, batch.support_idx.shape[1])
    np.testing.assert_array_equal(sub.query_idx[1], batch.query_idx[7])
    assert sub.max_ways == batch.max_ways
    assert dataclasses.is_dataclass(sub)


def test_fused_family_uses_the_general_backbone_on_its_own_domain():
    c = glyphs_config.get_config()
    assert protocol.family_backbone(c, "sam+ft", "cjk") == ("cjk", "sam")
    assert protocol.family_backbone(c, "sam+ft", "latin") == ("latin", "sam+ft")
    assert protocol.family_backbone(c, "erm", "latin") == ("latin", "erm")
    assert protocol.families(c, None) == ["erm", "sam", "erm+ft", "sam+ft"]
