"""Named test settings (config.evaluation.episode_spec): Meta-Dataset's and URL's 5-/1-shot.

Checks each setting's ways, shots and query sizes over many episodes against URL's
definitions (data/meta_dataset_reader.py ``test_type``), that the ontologies still choose
the classes, that the evaluator draws its episodes with the configured setting, and that
an unknown name is a config error naming the key.
"""

import numpy as np
import pytest

from configs import glyphs as glyphs_config
from flatfsc_jax import config_lib
from flatfsc_jax.data import benchmarks
from flatfsc_jax.data import episodes as episodes_lib
from flatfsc_jax.evaluation import protocol

N_EPISODES = 200


def _split(num_classes=80, seed=0):
    rng = np.random.default_rng(seed)
    counts = rng.integers(6, 60, size=num_classes)
    labels = rng.permutation(np.repeat(np.arange(num_classes), counts)).astype(np.int32)
    return labels, counts


def _shots_and_query(ep):
    shots = np.bincount(ep.support_labels, minlength=ep.ways)
    query = np.bincount(ep.query_labels, minlength=ep.ways)
    assert len(set(query.tolist())) == 1  # balanced query sets in every setting
    return shots, int(query[0])


def _check_indices(ep, labels):
    both = np.concatenate([ep.support_idx, ep.query_idx])
    assert len(np.unique(both)) == len(both)
    np.testing.assert_array_equal(labels[ep.support_idx], ep.classes[ep.support_labels])
    np.testing.assert_array_equal(labels[ep.query_idx], ep.classes[ep.query_labels])


def test_md_setting_varies_ways_and_shots():
    labels, counts = _split()
    sampler = episodes_lib.EpisodeSampler(labels, episodes_lib.episode_spec("md"), seed=1)
    ways, unequal = set(), 0
    for ep in sampler.sample(N_EPISODES):
        shots, q = _shots_and_query(ep)
        assert q == min(10, int((counts[ep.classes] // 2).min()))
        ways.add(ep.ways)
        unequal += len(set(shots.tolist())) > 1
    assert min(ways) >= 5 and len(ways) > 20 and unequal > N_EPISODES // 2


def test_5shot_setting_is_varying_way_five_shot():
    labels, counts = _split()
    spec = episodes_lib.episode_spec("5shot")
    sampler = episodes_lib.EpisodeSampler(labels, spec, seed=2)
    ways = set()
    episodes = sampler.sample(N_EPISODES)
    for ep in episodes:
        shots, q = _shots_and_query(ep)
        np.testing.assert_array_equal(shots, 5)
        # MD's compute_num_query with a fixed support: min(10, smallest class - 5).
        assert q == min(10, int(counts[ep.classes].min()) - 5)
        _check_indices(ep, labels)
        ways.add(ep.ways)
    assert min(ways) >= 5 and max(ways) <= 50 and len(ways) > 20
    # The padded batch holds every episode unchanged.
    batch = episodes_lib.EpisodeBatch.sample(labels, 20, seed=2, spec=spec)
    for i in range(20):
        np.testing.assert_array_equal(batch.episode(i).support_idx, episodes[i].support_idx)
        np.testing.assert_array_equal(batch.episode(i).query_idx, episodes[i].query_idx)


def test_1shot_setting_is_five_way_one_shot():
    labels, counts = _split()
    sampler = episodes_lib.EpisodeSampler(labels, episodes_lib.episode_spec("1shot"), seed=3)
    for ep in sampler.sample(N_EPISODES):
        shots, q = _shots_and_query(ep)
        assert ep.ways == 5
        np.testing.assert_array_equal(shots, 1)
        assert q == min(10, int((counts[ep.classes] // 2).min()))
        _check_indices(ep, labels)


@pytest.mark.parametrize("name", ["5shot", "1shot"])
def test_url_settings_keep_the_class_ontology(name):
    """Omniglot-like groups: every episode's classes come from one alphabet, as in MD."""
    labels, counts = _split(num_classes=60, seed=4)
    groups = np.repeat(np.arange(6), 10)
    sampler = episodes_lib.EpisodeSampler(
        labels, episodes_lib.episode_spec(name), seed=5, class_groups=groups
    )
    assert sampler.kind == "groups"
    for ep in sampler.sample(50):
        assert len(np.unique(groups[ep.classes])) == 1


def test_5shot_names_classes_too_small_for_five_shots():
    labels = np.repeat(np.arange(10), [5] + [20] * 9).astype(np.int32)
    with pytest.raises(ValueError, match="class 0.*5-shot episodes need at least 6"):
        episodes_lib.EpisodeSampler(labels, episodes_lib.episode_spec("5shot"), seed=0)


def test_unknown_episode_spec_is_a_config_error_naming_the_key():
    c = glyphs_config.get_config("tiny")
    config_lib.validate(c)
    c.evaluation.episode_spec = "10shot"
    with pytest.raises(config_lib.ConfigError, match="evaluation.episode_spec"):
        config_lib.validate(c)


class _Drawn(Exception):
    pass


def test_results_record_the_setting(monkeypatch):
    c = config_lib.base_config()
    c.evaluation.domains = ("omniglot",)
    c.evaluation.episode_spec = "5shot"
    monkeypatch.setattr(protocol, "_evaluate_domain", lambda *a: {})
    results = protocol.evaluate_zoo(c, zoo=None, progress=False)
    assert results["episode_spec"] == "5shot"


def test_evaluator_draws_test_episodes_with_the_configured_setting(monkeypatch):
    c = config_lib.base_config()
    c.evaluation.episode_spec = "1shot"
    seen = {}

    def sample(split, num, *, seed, spec=None):
        seen["spec"] = spec
        raise _Drawn

    monkeypatch.setattr(benchmarks, "load_split", lambda *a, **k: None)
    monkeypatch.setattr(benchmarks, "split_options", lambda *a, **k: {})
    monkeypatch.setattr(episodes_lib.EpisodeBatch, "sample", sample)
    with pytest.raises(_Drawn):
        protocol._evaluate_domain(c, "omniglot", [], None, None)
    assert seen["spec"] == episodes_lib.EPISODE_SPECS["1shot"]
    assert seen["spec"].max_ways == 5 and seen["spec"].max_support_per_class == 1
