"""Tests of the episode sampler and batches (flatfsc_jax/data/sampling.py, episodes.py).

Invariants are checked over thousands of episodes on synthetic splits (tiny to huge
classes, 7..1000 classes, Omniglot-like groups, an ImageNet-like hierarchy); the
Meta-Dataset formulas and the documented random-draw order are checked against plain
Python re-implementations; distributions with chi-square tests at fixed seeds.
"""

import itertools
import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from scipy import stats  # noqa: E402

from flatfsc_jax.data.episodes import (  # noqa: E402
    EpisodeBatch,
    EpisodeSampler,
    bucket_sizes,
    compact_episode,
    pad_episodes,
    show_episode,
)
from flatfsc_jax.data.sampling import (  # noqa: E402
    Episode,
    EpisodeSpec,
    PadSizes,
    episode_rng,
    num_query_per_class,
    sample_episode,
    shots_per_class,
    support_set_size,
)
from flatfsc_jax.data.sources import SplitData  # noqa: E402

VARIABLE = EpisodeSpec()
LOG_HALF, LOG_TWO = math.log(0.5), math.log(2.0)


# ----------------------------------------------------------------------------------------
# Synthetic splits.
# ----------------------------------------------------------------------------------------


def labels_from_counts(counts, seed=0):
    """Labels with ``counts[c]`` images of class c, in shuffled (non-contiguous) order."""
    rng = np.random.default_rng(seed)
    return rng.permutation(np.repeat(np.arange(len(counts)), counts)).astype(np.int32)


def mixed_counts(num_classes, seed):
    """Tiny (2-4), small, medium and huge (1000-2500) classes."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(4, num_classes, p=[0.1, 0.4, 0.4, 0.1])
    lows, highs = np.array([2, 5, 31, 1000]), np.array([5, 31, 301, 2501])
    return rng.integers(lows[kind], highs[kind])


def grouped_split(seed=0):
    """Omniglot-like: 40 groups of 1..60 classes (some below min_ways), 2..40 images."""
    rng = np.random.default_rng(seed)
    group_sizes = rng.integers(1, 61, size=40)
    groups = np.repeat(np.arange(40), group_sizes)
    counts = rng.integers(2, 41, size=len(groups))
    return labels_from_counts(counts, seed), counts, groups


def hierarchy_split(seed=0, num_classes=500):
    """ImageNet-like: nested nodes from recursive random splits, sizes 1..num_classes."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(2, 1301, size=num_classes)
    order = rng.permutation(num_classes)
    nodes = {}

    def split(lo, hi):
        nodes[f"n{len(nodes):04d}"] = order[lo:hi]
        if hi - lo < 3:
            return
        num_cuts = min(int(rng.integers(1, 4)), hi - lo - 1)
        cuts = np.sort(rng.choice(np.arange(lo + 1, hi), num_cuts, replace=False))
        for a, b in itertools.pairwise([lo, *cuts.tolist(), hi]):
            split(a, b)

    split(0, num_classes)
    return labels_from_counts(counts, seed), counts, nodes


def eligible_nodes(nodes, spec=VARIABLE):
    sizes = {k: len(np.unique(v)) for k, v in nodes.items()}
    return {k: v for k, v in nodes.items() if spec.min_ways <= sizes[k] <= 392}


def split_data(labels, *, class_groups=None, class_hierarchy=None, size=6):
    """A SplitData whose image i is filled with the value (i % 251) + 1 (never 0 or 255)."""
    fill = (np.arange(len(labels)) % 251 + 1).astype(np.uint8)
    images = np.broadcast_to(fill[:, None, None, None], (len(labels), size, size, 1)).copy()
    num_classes = int(labels.max()) + 1
    return SplitData(
        source="synthetic/test",
        split="test",
        images=images,
        labels=labels,
        class_names=[f"c{c}" for c in range(num_classes)],
        class_groups=class_groups,
        class_hierarchy=class_hierarchy,
    )


# ----------------------------------------------------------------------------------------
# Invariants.
# ----------------------------------------------------------------------------------------


def check_variable_episode(ep: Episode, labels, counts, spec=VARIABLE):
    """Every Meta-Dataset invariant that one variable-way episode must satisfy."""
    ways, classes = ep.ways, ep.classes
    assert len(classes) == ways == len(np.unique(classes))
    assert spec.min_ways <= ways <= min(spec.max_ways, len(counts))
    n = counts[classes]
    q = min(spec.max_query_per_class, int((n // 2).min()))
    # Query: q per class, the same for every class, laid out class by class.
    np.testing.assert_array_equal(ep.query_labels, np.repeat(np.arange(ways), q))
    assert ep.query_per_class == q <= spec.max_query_per_class
    # Support: >= 1 shot, never more than the images left after the query set.
    shots = np.bincount(ep.support_labels, minlength=ways)
    assert len(shots) == ways and shots.min() >= 1
    assert np.all(shots <= n - q)
    np.testing.assert_array_equal(ep.support_labels, np.repeat(np.arange(ways), shots))
    # Total support <= S <= min(max_support, sum_c min(cap, n_c - q)).
    bound = min(spec.max_support, int(np.minimum(spec.max_support_per_class, n - q).sum()))
    assert ways <= len(ep.support_idx) <= bound
    check_indices(ep, labels)


def check_indices(ep: Episode, labels):
    """Valid, distinct, disjoint indices whose split labels match the episode labels."""
    everything = np.concatenate([ep.support_idx, ep.query_idx])
    assert everything.min() >= 0 and everything.max() < len(labels)
    assert len(np.unique(everything)) == len(everything)
    np.testing.assert_array_equal(labels[ep.support_idx], ep.classes[ep.support_labels])
    np.testing.assert_array_equal(labels[ep.query_idx], ep.classes[ep.query_labels])
    assert ep.support_labels.dtype == ep.query_labels.dtype == np.int32


@pytest.mark.parametrize(
    "counts",
    [
        mixed_counts(20, seed=1),
        mixed_counts(100, seed=2),
        mixed_counts(1000, seed=3),
        np.array([2, 3, 4, 60, 2000, 7, 11]),  # 7 classes: ways <= 7
        np.full(60, 30),
    ],
    ids=["20-classes", "100-classes", "1000-classes", "7-classes", "uniform-60x30"],
)
def test_variable_episode_invariants(counts):
    labels = labels_from_counts(counts)
    sampler = EpisodeSampler(labels, VARIABLE, seed=11)
    sizes = sampler.pad_sizes
    episodes = sampler.sample(600)
    for ep in episodes:
        check_variable_episode(ep, labels, counts)
        assert ep.ways <= sizes.max_ways
        assert len(ep.support_idx) <= sizes.max_support
        assert len(ep.query_idx) <= sizes.max_query
    # The draws cover the whole permitted range of ways.
    observed = {ep.ways for ep in episodes}
    assert min(observed) == 5 and max(observed) == min(50, len(counts))


def test_grouped_episodes_stay_in_one_eligible_group():
    labels, counts, groups = grouped_split()
    sampler = EpisodeSampler(labels, VARIABLE, seed=5, class_groups=groups)
    assert sampler.kind == "groups"
    group_sizes = np.bincount(groups)
    for ep in sampler.sample(500):
        check_variable_episode(ep, labels, counts)
        (group,) = np.unique(groups[ep.classes])
        assert group_sizes[group] >= 5
        assert ep.ways <= min(50, group_sizes[group])


def test_hierarchy_episodes_are_the_leaves_of_an_eligible_node():
    labels, counts, nodes = hierarchy_split()
    eligible = [set(v.tolist()) for v in eligible_nodes(nodes).values()]
    assert any(len(v) > 50 for v in eligible) and any(len(v) > 392 for v in nodes.values())
    sampler = EpisodeSampler(labels, VARIABLE, seed=5, class_hierarchy=nodes)
    assert sampler.kind == "hierarchy"
    for ep in sampler.sample(300):
        check_variable_episode(ep, labels, counts)
        chosen = set(ep.classes.tolist())
        # All leaves of a node with <= 50 leaves, or 50 of a larger node's leaves.
        assert any(
            chosen == node if len(node) <= 50 else (ep.ways == 50 and chosen <= node)
            for node in eligible
        )


def test_large_class_can_get_more_than_100_shots():
    # The 100 caps a class's contribution to S, not its shots (Meta-Dataset, step 3).
    counts = np.array([5000] + [120] * 49)
    labels = labels_from_counts(counts)
    spec = EpisodeSpec(min_ways=50)
    episodes = EpisodeSampler(labels, spec, seed=0).sample(50)
    big_shots = [ep.shots[list(ep.classes).index(0)] for ep in episodes]
    assert max(big_shots) > 100
    for ep in episodes:
        check_variable_episode(ep, labels, counts, spec)


# ----------------------------------------------------------------------------------------
# The formulas and the draw order against plain re-implementations.
# ----------------------------------------------------------------------------------------


def reference_support_size(remaining, beta, cap=100, max_support=500):
    total = 0
    for r in remaining:
        total += math.floor(beta * min(cap, int(r))) + 1
    return min(max_support, total)


def reference_shots(images, remaining, size, log_weights):
    weights = [int(n) * math.exp(float(u)) for n, u in zip(images, log_weights, strict=True)]
    total = math.fsum(weights)
    ways = len(images)
    return [
        min(math.floor(w / total * (size - ways)) + 1, int(r))
        for w, r in zip(weights, remaining, strict=True)
    ]


def test_support_set_size_matches_reference_for_sampled_betas():
    rng = np.random.default_rng(0)
    betas = np.concatenate([[0.0, np.nextafter(1.0, 0.0), 0.5], rng.random(500)])
    for beta in betas:
        remaining = rng.integers(1, 400, size=rng.integers(5, 51))
        for cap, max_support in ((100, 500), (7, 10_000), (1000, 60)):
            got = support_set_size(
                remaining, beta, max_support_per_class=cap, max_support=max_support
            )
            assert got == reference_support_size(remaining, beta, cap, max_support)
    # beta -> 1 gives sum_c min(cap, r_c); beta = 0 gives ways.
    assert support_set_size([3, 200, 1], np.nextafter(1.0, 0.0)) == 3 + 100 + 1
    assert support_set_size([3, 200, 1], 0.0) == 3


def test_shots_per_class_matches_reference():
    rng = np.random.default_rng(1)
    for _ in range(500):
        ways = int(rng.integers(5, 51))
        images = rng.integers(2, 2000, size=ways)
        q = num_query_per_class(images)
        assert q == min(10, min(int(n) // 2 for n in images))
        remaining = images - q
        size = reference_support_size(remaining, rng.random())
        log_weights = rng.uniform(LOG_HALF, LOG_TWO, size=ways)
        got = shots_per_class(images, remaining, size, log_weights)
        assert got.tolist() == reference_shots(images, remaining, size, log_weights)
        assert got.sum() <= size


def reference_episode(seed, index, counts, groups=None):
    """Meta-Dataset in plain Python, consuming episode_rng in the documented order."""
    rng = episode_rng(seed, index)
    if groups is None:
        pool = list(range(len(counts)))
    else:
        eligible = [g for g in sorted(set(groups.tolist())) if (groups == g).sum() >= 5]
        group = eligible[rng.integers(len(eligible))]
        pool = [c for c in range(len(counts)) if groups[c] == group]
    ways = int(rng.integers(5, min(50, len(pool)) + 1))
    classes = rng.choice(np.asarray(pool), ways, replace=False)
    images = [int(counts[c]) for c in classes]
    q = min(10, min(n // 2 for n in images))
    remaining = [n - q for n in images]
    size = reference_support_size(remaining, rng.random())
    shots = reference_shots(images, remaining, size, rng.uniform(LOG_HALF, LOG_TWO, ways))
    return classes.tolist(), q, shots, size


@pytest.mark.parametrize("grouped", [False, True], ids=["plain", "groups"])
def test_sampler_matches_reference_draw_for_draw(grouped):
    if grouped:
        labels, counts, groups = grouped_split(seed=3)
    else:
        counts, groups = mixed_counts(300, seed=4), None
        labels = labels_from_counts(counts)
    sampler = EpisodeSampler(labels, VARIABLE, seed=21, class_groups=groups)
    sizes_seen = []
    for i in range(300):
        ep = sampler.episode(i)
        classes, q, shots, size = reference_episode(21, i, counts, groups)
        assert ep.classes.tolist() == classes
        assert ep.query_per_class == q
        assert ep.shots.tolist() == shots
        assert len(ep.support_idx) <= size
        sizes_seen.append(size)
    assert min(sizes_seen) < 100 and max(sizes_seen) == 500  # both regimes exercised


# ----------------------------------------------------------------------------------------
# Distributions.
# ----------------------------------------------------------------------------------------


def test_ways_uniform_chi_square():
    counts = np.full(300, 20)
    episodes = EpisodeSampler(labels_from_counts(counts), VARIABLE, seed=3).sample(2300)
    observed = np.bincount([ep.ways for ep in episodes], minlength=51)[5:]
    assert stats.chisquare(observed).pvalue > 1e-3
    # The test has power: a distribution skewed by 20% towards small ways is rejected.
    skew = np.linspace(1.2, 0.8, 46)
    assert stats.chisquare(observed, skew / skew.sum() * observed.sum()).pvalue < 1e-3


def test_grouped_ways_and_groups_chi_square():
    labels, counts, groups = grouped_split(seed=7)
    sizes = np.bincount(groups)
    eligible = np.flatnonzero(sizes >= 5)
    episodes = EpisodeSampler(labels, VARIABLE, seed=9, class_groups=groups).sample(3000)
    chosen = [int(groups[ep.classes[0]]) for ep in episodes]
    observed_groups = np.bincount(chosen, minlength=len(sizes))[eligible]
    assert observed_groups.sum() == len(episodes)
    assert stats.chisquare(observed_groups).pvalue > 1e-3
    # P(ways = k) = mean over eligible groups g of U{5..min(50, size_g)}(k).
    expected = np.zeros(51)
    for g in eligible:
        top = min(50, sizes[g])
        expected[5 : top + 1] += 1.0 / (top - 4) / len(eligible)
    observed = np.bincount([ep.ways for ep in episodes], minlength=51)[5:]
    expected = expected[5:] * len(episodes)
    keep = expected > 0
    assert observed[~keep].sum() == 0
    assert stats.chisquare(observed[keep], expected[keep]).pvalue > 1e-3


def test_hierarchy_ways_follow_node_sizes_chi_square():
    labels, _, nodes = hierarchy_split(seed=2)
    ways_of_node = [min(50, len(v)) for v in eligible_nodes(nodes).values()]
    expected = np.bincount(ways_of_node, minlength=51)[5:] / len(ways_of_node)
    sampler = EpisodeSampler(labels, VARIABLE, seed=4, class_hierarchy=nodes)
    episodes = sampler.sample(1000)
    observed = np.bincount([ep.ways for ep in episodes], minlength=51)[5:]
    keep = expected > 0
    assert observed[~keep].sum() == 0
    assert stats.chisquare(observed[keep], expected[keep] * len(episodes)).pvalue > 1e-3


def test_fixed_mode_classes_uniform_chi_square():
    counts = np.full(20, 30)
    spec = EpisodeSpec.fixed(5, 1)
    episodes = EpisodeSampler(labels_from_counts(counts), spec, seed=0).sample(2000)
    observed = np.bincount(np.concatenate([ep.classes for ep in episodes]), minlength=20)
    assert stats.chisquare(observed).pvalue > 1e-3


# ----------------------------------------------------------------------------------------
# Fixed mode.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("ways,shots,query", [(5, 1, 15), (5, 5, 15), (20, 3, 2)])
def test_fixed_mode_exact(ways, shots, query):
    labels, counts, groups = grouped_split(seed=1)
    labels = labels_from_counts(np.maximum(counts, 20))
    spec = EpisodeSpec(mode="fixed", ways=ways, shots=shots, query=query)
    # Fixed ways ignore the ontology, as in Meta-Dataset.
    sampler = EpisodeSampler(labels, spec, seed=2, class_groups=groups)
    assert sampler.kind == "plain"
    assert sampler.pad_sizes == PadSizes(ways, ways * shots, ways * query)
    spans_groups = False
    for ep in sampler.sample(200):
        assert ep.ways == ways and len(np.unique(ep.classes)) == ways
        np.testing.assert_array_equal(ep.shots, np.full(ways, shots))
        np.testing.assert_array_equal(ep.query_labels, np.repeat(np.arange(ways), query))
        check_indices(ep, labels)
        spans_groups |= len(np.unique(groups[ep.classes])) > 1
    assert spans_groups


def test_fixed_spec_defaults_to_15_query():
    assert EpisodeSpec(mode="fixed", ways=5, shots=1).query == 15
    assert EpisodeSpec.fixed(5, 5) == EpisodeSpec(mode="fixed", ways=5, shots=5, query=15)


# ----------------------------------------------------------------------------------------
# Reproducibility.
# ----------------------------------------------------------------------------------------


def test_same_seed_same_episodes_and_regenerable_subsets():
    counts = mixed_counts(100, seed=5)
    labels = labels_from_counts(counts)
    first = EpisodeSampler(labels, VARIABLE, seed=42).sample(30)
    again = EpisodeSampler(labels, VARIABLE, seed=42)
    assert again.sample(30) == first
    assert again.sample(10, start=20) == first[20:]
    assert again.episode(17) == first[17]
    assert sample_episode(labels, VARIABLE, episode_rng(42, 17)) == first[17]
    # episode_rng(s, i) is child i of SeedSequence(s).
    child = np.random.default_rng(np.random.SeedSequence(42).spawn(18)[17])
    np.testing.assert_array_equal(episode_rng(42, 17).random(4), child.random(4))


def test_different_seeds_differ():
    labels = labels_from_counts(mixed_counts(100, seed=5))
    a = EpisodeSampler(labels, VARIABLE, seed=1).sample(30)
    b = EpisodeSampler(labels, VARIABLE, seed=2).sample(30)
    assert sum(x == y for x, y in zip(a, b, strict=True)) == 0
    assert len({tuple(ep.classes.tolist()) for ep in a}) == 30


def test_hierarchy_stream_ignores_mapping_order():
    labels, _, nodes = hierarchy_split(seed=1, num_classes=120)
    reordered = dict(reversed(list(nodes.items())))
    a = EpisodeSampler(labels, VARIABLE, seed=0, class_hierarchy=nodes).sample(10)
    b = EpisodeSampler(labels, VARIABLE, seed=0, class_hierarchy=reordered).sample(10)
    assert a == b


# ----------------------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(mode="episodic"), "mode"),
        (dict(ways=5), "ways"),
        (dict(query=10), "query"),
        (dict(mode="fixed", shots=1), "ways"),
        (dict(mode="fixed", ways=5), "shots"),
        (dict(mode="fixed", ways=5, shots=0), "shots"),
        (dict(mode="fixed", ways=5, shots=1, query=0), "query"),
        (dict(min_ways=0), "min_ways"),
        (dict(max_ways=4), "max_ways"),
        (dict(max_ways=5.0), "max_ways"),
        (dict(max_support=3), "max_support"),
        (dict(max_support_per_class=0), "max_support_per_class"),
        (dict(max_query_per_class=0), "max_query_per_class"),
        (dict(min_log_weight=1.0), "max_log_weight"),
        (dict(max_log_weight=float("inf")), "max_log_weight"),
        (dict(max_spanning_leaves=4), "max_spanning_leaves"),
        (dict(use_groups=True, use_hierarchy=True), "use_groups"),
        (dict(mode="fixed", ways=5, shots=1, use_groups=True), "use_groups"),
        (dict(use_hierarchy="yes"), "use_hierarchy"),
    ],
)
def test_spec_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"EpisodeSpec.{field}"):
        EpisodeSpec(**kwargs)


def test_too_small_class_is_an_error_naming_it():
    counts = np.full(30, 20)
    counts[7] = 1
    with pytest.raises(ValueError, match=r"class 7 \('c7'\) has 1 image"):
        EpisodeSampler(split_data(labels_from_counts(counts)), VARIABLE, seed=0)
    counts[7] = 0  # a class without images is found through num_classes
    labels = labels_from_counts(counts)
    with pytest.raises(ValueError, match="class 7 has 0 image"):
        sample_episode(labels, VARIABLE, np.random.default_rng(0), num_classes=30)
    counts[7] = 19
    spec = EpisodeSpec.fixed(5, 5)
    with pytest.raises(ValueError, match=r"class 7 has 19 image.*need >= 20"):
        EpisodeSampler(labels_from_counts(counts), spec, seed=0)
    # Fine once the class has shots + query images.
    counts[7] = 20
    EpisodeSampler(labels_from_counts(counts), spec, seed=0).sample(3)


def test_too_few_classes_and_too_small_support_are_errors():
    with pytest.raises(ValueError, match="4 classes, fewer than EpisodeSpec.min_ways=5"):
        EpisodeSampler(labels_from_counts([10] * 4), VARIABLE, seed=0)
    with pytest.raises(ValueError, match="fewer than EpisodeSpec.ways=5"):
        EpisodeSampler(labels_from_counts([30] * 4), EpisodeSpec.fixed(5, 1), seed=0)
    # 30 classes can give 30 ways: a support cap of 20 cannot hold one image per class.
    with pytest.raises(ValueError, match="EpisodeSpec.max_support=20"):
        EpisodeSampler(labels_from_counts([10] * 30), EpisodeSpec(max_support=20), seed=0)
    EpisodeSampler(labels_from_counts([10] * 20), EpisodeSpec(max_support=20), seed=0)
    with pytest.raises(ValueError, match="max_support=3"):
        support_set_size([5] * 4, 0.5, max_support=3)
    with pytest.raises(ValueError, match="support_size=3"):
        shots_per_class([5] * 4, [4] * 4, 3, np.zeros(4))
    with pytest.raises(ValueError, match=">= 2 images"):
        num_query_per_class([5, 1, 9])


def test_ontology_errors():
    labels, _, groups = grouped_split()
    with pytest.raises(ValueError, match="use_groups=True"):
        EpisodeSampler(labels, EpisodeSpec(use_groups=True), seed=0)
    with pytest.raises(ValueError, match="use_hierarchy=True"):
        EpisodeSampler(labels, EpisodeSpec(use_hierarchy=True), seed=0)
    with pytest.raises(ValueError, match="one group id per class"):
        EpisodeSampler(labels, VARIABLE, seed=0, class_groups=groups[:-1])
    with pytest.raises(ValueError, match="no class group has >= EpisodeSpec.min_ways"):
        EpisodeSampler(labels, VARIABLE, seed=0, class_groups=np.arange(len(groups)))
    with pytest.raises(ValueError, match="no class_hierarchy node"):
        EpisodeSampler(labels, VARIABLE, seed=0, class_hierarchy={"a": [0, 1, 2]})
    with pytest.raises(ValueError, match="outside"):
        EpisodeSampler(labels, VARIABLE, seed=0, class_hierarchy={"a": [0, 1, 2, 3, 10**6]})
    with pytest.raises(ValueError, match="both class_groups and class_hierarchy"):
        EpisodeSampler(
            labels, VARIABLE, seed=0, class_groups=groups, class_hierarchy={"a": range(9)}
        )
    # Either one, chosen explicitly, works.
    spec = EpisodeSpec(use_groups=False)
    both = dict(class_groups=groups, class_hierarchy={"a": np.arange(9)})
    assert EpisodeSampler(labels, spec, seed=0, **both).kind == "hierarchy"
    # Turning the ontology off gives plain sampling.
    assert EpisodeSampler(labels, spec, seed=0, class_groups=groups).kind == "plain"


def test_bad_labels_and_arguments():
    with pytest.raises(ValueError, match="1-D integer"):
        EpisodeSampler(np.zeros(10, np.float32), VARIABLE, seed=0)
    with pytest.raises(ValueError, match="must lie in 0..4"):
        EpisodeSampler(np.arange(10) % 6, VARIABLE, seed=0, num_classes=5)
    with pytest.raises(ValueError, match="seed"):
        EpisodeSampler(labels_from_counts([10] * 6), VARIABLE, seed=-1)
    data = split_data(labels_from_counts([10] * 6))
    with pytest.raises(ValueError, match="taken from the SplitData"):
        EpisodeSampler(data, VARIABLE, seed=0, class_groups=np.zeros(6, int))


def test_split_data_ontology_is_used_by_default():
    labels, _, groups = grouped_split()
    data = split_data(labels, class_groups=groups)
    assert EpisodeSampler(data, VARIABLE, seed=0).kind == "groups"
    assert EpisodeSampler(data, EpisodeSpec.fixed(5, 1, query=1), seed=0).kind == "plain"


# ----------------------------------------------------------------------------------------
# Padding and bucket sizes.
# ----------------------------------------------------------------------------------------


def test_padding_round_trip_with_default_shapes():
    labels = labels_from_counts(mixed_counts(100, seed=6))
    episodes = EpisodeSampler(labels, VARIABLE, seed=0).sample(40)
    batch = pad_episodes(episodes)
    assert len(batch) == 40 and batch.max_ways == 50
    assert batch.support_idx.shape == batch.support_labels.shape == (40, 500)
    assert batch.query_idx.shape == batch.query_mask.shape == (40, 500)
    assert batch.classes.shape == (40, 50)
    assert batch.support_idx.dtype == batch.query_labels.dtype == batch.ways.dtype == np.int32
    assert batch.support_mask.dtype == np.bool_
    for i, ep in enumerate(episodes):
        assert batch.episode(i) == ep
        for idx, lab, mask in (
            (batch.support_idx, batch.support_labels, batch.support_mask),
            (batch.query_idx, batch.query_labels, batch.query_mask),
        ):
            assert not idx[i][~mask[i]].any() and not lab[i][~mask[i]].any()
        assert batch.support_mask[i].sum() == len(ep.support_idx)
        assert (batch.classes[i, ep.ways :] == -1).all()
    np.testing.assert_array_equal(batch.ways, [ep.ways for ep in episodes])
    part = batch.slice(10, 15)
    assert len(part) == 5 and part.pad_sizes == batch.pad_sizes
    assert part.episode(0) == episodes[10]
    assert set(batch.arrays()) == {
        "support_idx",
        "support_labels",
        "support_mask",
        "query_idx",
        "query_labels",
        "query_mask",
        "ways",
        "classes",
    }


def test_padding_sizes_from_spec_and_bound_violations():
    labels = labels_from_counts(np.full(30, 40))
    spec = EpisodeSpec.fixed(5, 2, query=4)
    episodes = EpisodeSampler(labels, spec, seed=0).sample(6)
    batch = pad_episodes(episodes, spec=spec)
    assert batch.pad_sizes == PadSizes(5, 10, 20)
    assert batch.support_mask.all() and batch.query_mask.all()
    assert [batch.episode(i) for i in range(6)] == episodes
    with pytest.raises(ValueError, match="max_support=9"):
        pad_episodes(episodes, spec=spec, max_support=9)
    with pytest.raises(ValueError, match="max_query=19"):
        pad_episodes(episodes, max_query=19)
    with pytest.raises(ValueError, match="max_ways=4"):
        pad_episodes(episodes, max_ways=4)
    with pytest.raises(ValueError, match="empty"):
        pad_episodes([])
    sampler = EpisodeSampler(labels, spec, seed=0)
    assert sampler.sample_batch(6).episode(5) == episodes[5]


def batch_episodes(batch):
    return [batch.episode(i) for i in range(len(batch))]


def brute_force_sizes(counts, spec, ways_range):
    """Largest ways, S bound and query set over every class subset of each allowed size."""
    max_support = max_query = 0
    for k in ways_range:
        for subset in itertools.combinations(counts.tolist(), k):
            q = min(spec.max_query_per_class, min(subset) // 2)
            support = sum(min(spec.max_support_per_class, n - q) for n in subset)
            max_support = max(max_support, min(spec.max_support, support))
            max_query = max(max_query, k * q)
    return PadSizes(max(ways_range), max_support, max_query)


@pytest.mark.parametrize(
    "spec",
    [
        VARIABLE,
        EpisodeSpec(max_support_per_class=5, max_query_per_class=3, max_support=10_000),
        EpisodeSpec(max_support=40, max_ways=6),
    ],
)
def test_bucket_sizes_match_brute_force(spec):
    counts = np.array([2, 3, 7, 20, 25, 150, 300, 41, 9])
    labels = labels_from_counts(counts)
    expected = brute_force_sizes(counts, spec, range(5, min(spec.max_ways, 9) + 1))
    assert bucket_sizes(labels, spec) == expected
    # Hierarchy: a node's ways is min(max_ways, leaves); the max over eligible nodes.
    nodes = {"small": [0, 1, 2, 3, 4], "all": np.arange(9), "tiny": [5, 6]}
    expected_nodes = [
        brute_force_sizes(counts[leaves], spec, [min(spec.max_ways, len(leaves))])
        for leaves in (np.arange(5), np.arange(9))
    ]
    got = bucket_sizes(labels, spec, class_hierarchy=nodes)
    assert got == PadSizes(**{k: max(s[k] for s in expected_nodes) for k in got})


def test_bucket_sizes_bound_and_reach_sampled_episodes():
    # Uniform classes: q = 10 always, so the bounds on ways and query are attained.
    labels = labels_from_counts(np.full(60, 30))
    sampler = EpisodeSampler(labels, VARIABLE, seed=0)
    assert sampler.pad_sizes == bucket_sizes(split_data(labels), VARIABLE)
    assert sampler.pad_sizes == PadSizes(50, 500, 500)
    episodes = sampler.sample(400)
    assert max(len(ep.query_idx) for ep in episodes) == 500
    # A small domain pads far below Meta-Dataset's 500.
    labels = labels_from_counts(np.full(20, 6))
    sizes = bucket_sizes(labels, VARIABLE)
    assert sizes == PadSizes(20, 60, 60)
    batch = EpisodeSampler(labels, VARIABLE, seed=0).sample_batch(50)
    assert batch.pad_sizes == sizes
    # PadSizes unpacks into pad_episodes' keywords.
    assert dict(sizes) == {"max_ways": 20, "max_support": 60, "max_query": 60}
    assert pad_episodes(batch_episodes(batch), **sizes).pad_sizes == sizes
    # Grouped: the largest group bounds ways.
    labels, _, groups = grouped_split()
    sizes = bucket_sizes(labels, VARIABLE, class_groups=groups)
    assert sizes.max_ways == min(50, np.bincount(groups).max())
    for ep in EpisodeSampler(labels, VARIABLE, seed=1, class_groups=groups).sample(300):
        assert len(ep.support_idx) <= sizes.max_support
        assert len(ep.query_idx) <= sizes.max_query


def test_batch_sample_is_the_seed_stream_padded_to_the_split_bucket():
    # EpisodeBatch.sample is the sampler's stream padded to the split's bucket: the same
    # episodes (same random draws) and the same padded shapes as spelling it out.
    labels, _, groups = grouped_split()
    data = split_data(labels, class_groups=groups)
    spec = EpisodeSpec(mode="variable")
    eps = EpisodeSampler(data, spec, seed=1001).sample(30)
    want = pad_episodes(eps, **bucket_sizes(data, spec))
    got = EpisodeBatch.sample(data, 30, seed=1001)
    assert got.max_ways == want.max_ways
    for name, value in want.arrays().items():
        np.testing.assert_array_equal(getattr(got, name), value, err_msg=name)
        assert getattr(got, name).dtype == value.dtype


def test_take_keeps_padded_shapes_and_validation_rejects_ragged_batches():
    labels = labels_from_counts(mixed_counts(40, seed=3))
    batch = EpisodeBatch.sample(labels, 10, seed=0)
    sub = batch.take([3, 7])
    assert sub.pad_sizes == batch.pad_sizes and len(sub) == 2
    np.testing.assert_array_equal(sub.query_idx[1], batch.query_idx[7])
    assert sub.episode(0) == batch.episode(3)
    assert batch.take(np.arange(10) >= 8).episode(1) == batch.episode(9)
    arrays = batch.arrays()
    with pytest.raises(ValueError, match="support_idx/support_labels/support_mask"):
        EpisodeBatch(
            **{**arrays, "support_mask": arrays["support_mask"][:, :3]}, max_ways=batch.max_ways
        )
    with pytest.raises(ValueError, match=r"query_idx must be \[E, width\]"):
        EpisodeBatch(**{**arrays, "query_idx": arrays["ways"]}, max_ways=batch.max_ways)


def test_compact_episode_puts_real_entries_first_in_power_of_two_buckets():
    # Support slots 1, 4, 6 of width 12 (3 real), query slots 0..4 of width 10 (5 real).
    s_idx = np.arange(100, 112)[None]
    s_lab = np.arange(12)[None] % 3
    s_mask = np.isin(np.arange(12), [1, 4, 6])[None]
    q_idx, q_lab = np.arange(200, 210)[None], np.zeros((1, 10), np.int32)
    q_mask = (np.arange(10) < 5)[None]
    arrays = (s_idx, s_lab, s_mask, q_idx, q_lab, q_mask)
    si, sl, sm, qi, ql, qm = compact_episode(arrays, 0)
    assert len(si) == 4 and len(qi) == 8  # next powers of two of 3 and 5
    np.testing.assert_array_equal(si[sm], [101, 104, 106])
    np.testing.assert_array_equal(sl[sm], [1, 1, 0])
    assert sm.tolist() == [True] * 3 + [False] and qm.sum() == 5
    assert si[3] == 101 and sl.dtype == ql.dtype == np.int32  # padding: the first real one
    full = compact_episode(arrays, 0, bucket=False)
    assert len(full[0]) == 12 and len(full[3]) == 10
    np.testing.assert_array_equal(full[0][full[2]], si[sm])
    with pytest.raises(ValueError, match="episode 0 has 0 support"):
        compact_episode((s_idx, s_lab, s_mask & False, q_idx, q_lab, q_mask), 0)


# ----------------------------------------------------------------------------------------
# Looking at episodes.
# ----------------------------------------------------------------------------------------


def test_show_episode_draws_each_class_row():
    counts = np.full(12, 25)
    labels = labels_from_counts(counts)
    data = split_data(labels, size=6)
    ep = EpisodeSampler(data, VARIABLE, seed=3).episode(0)
    fig = show_episode(data, ep, max_per_class=4)
    assert isinstance(fig, matplotlib.figure.Figure)
    (ax,) = fig.axes
    mosaic = np.asarray(ax.images[0].get_array())
    assert len(ax.get_yticks()) == ep.ways
    assert mosaic.shape[0] % ep.ways == 0
    row_height = mosaic.shape[0] // ep.ways
    fills = data.images[:, 0, 0, 0].astype(np.float32) / 255
    starts = np.concatenate([[0], np.cumsum(ep.shots)[:-1]])
    for row in range(ep.ways):
        band = mosaic[row * row_height : (row + 1) * row_height]
        shown_support = ep.support_idx[starts[row] : starts[row] + min(4, ep.shots[row])]
        shown_query = ep.query_idx[ep.query_labels == row][:4]
        for i in np.concatenate([shown_support, shown_query]):
            assert np.isclose(band, fills[i]).all(axis=-1).any(), f"image {i} missing"
    # Support and query tiles are framed in two different colours.
    for colour in ((0.12, 0.47, 0.71), (1.0, 0.50, 0.05)):
        assert np.isclose(mosaic, colour).all(axis=-1).any()
    plt.close(fig)
    # Into a given Axes.
    fig, ax = plt.subplots()
    assert show_episode(data, ep, ax=ax) is fig
    plt.close(fig)
