"""Meta-Dataset's episode sampler: the draw of one episode from one class split.

An *episode* is a small classification task on a ``SplitData``: a labelled support set and
a disjoint query set, as positions in the split, so an evaluator embeds every image once.
Streams of episodes and padded batches of them: :mod:`flatfsc_jax.data.episodes`.

Variable mode follows the Meta-Dataset protocol exactly (Meta-Dataset; Triantafillou et
al. 2020, ``meta_dataset/data/sampling.py``):

1. classes: ways ~ U{min_ways .. min(max_ways, #classes)}, classes uniformly without
   replacement. With ``class_groups`` (Omniglot alphabets) a group is first drawn
   uniformly among the groups with >= min_ways classes and ways is drawn within it.
   With ``class_hierarchy`` (ImageNet's WordNet DAG) a node spanning
   min_ways..max_spanning_leaves classes of the split is drawn uniformly and its leaves
   are the episode's classes (a random max_ways of them if it spans more).
2. query per class: q = min(max_query_per_class, min_c floor(n_c / 2)), equal for all.
3. support size: S = min(max_support, sum_c (floor(beta * min(max_support_per_class,
   n_c - q)) + 1)), beta ~ U[0, 1).
4. shots: w_c = n_c * exp(U(min_log_weight, max_log_weight)), p_c = w_c / sum w,
   shots_c = min(floor(p_c * (S - ways)) + 1, n_c - q).

Fixed mode (the 5-way 1-shot / 5-shot protocols) draws ``ways`` classes uniformly, ignoring
the class ontology as Meta-Dataset does, and exactly ``shots`` support and ``query`` query
images per class.

Images of a class are drawn in random order without replacement; the first ``shots_c``
form the support and the next ``q`` the query, so the two sets are disjoint. Support and
query are laid out class by class in episode order; label ``j`` is ``classes[j]``, and
the class order itself is random.

``_Plan`` consumes random numbers in one order, the contract that makes episode ``i`` of
seed ``s`` (drawn from ``episode_rng(s, i)``) a pure function of the split, the spec and
``s``: [group or node index], [ways], classes, [beta, log-weights], then each class's
image draw (brackets: when applicable).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flatfsc_jax.checks import is_int
from flatfsc_jax.data.sources import SplitData

__all__ = [
    "MODES",
    "Episode",
    "EpisodeSpec",
    "PadSizes",
    "episode_rng",
    "num_query_per_class",
    "sample_episode",
    "shots_per_class",
    "support_set_size",
]


MODES = ("variable", "fixed")


@dataclasses.dataclass(frozen=True)
class PadSizes(Mapping):
    """Padding sizes of an ``EpisodeBatch``: largest ways, support set and query set.

    A mapping as well, so ``pad_episodes(episodes, **sizes)`` works.
    """

    max_ways: int
    max_support: int
    max_query: int

    def __getitem__(self, name: str) -> int:
        if name not in _PAD_FIELDS:
            raise KeyError(name)
        return getattr(self, name)

    def __iter__(self):
        return iter(_PAD_FIELDS)

    def __len__(self) -> int:
        return len(_PAD_FIELDS)


_PAD_FIELDS = ("max_ways", "max_support", "max_query")


@dataclasses.dataclass(frozen=True)
class EpisodeSpec:
    """How episodes are drawn. The defaults are Meta-Dataset's variable-way variable-shot.

    Attributes:
      mode: "variable" (Meta-Dataset) or "fixed" (``ways``-way ``shots``-shot).
      ways, shots: fixed mode only: classes per episode and support images per class.
      query: fixed mode only: query images per class (15 when left ``None``).
      min_ways, max_ways: range of the number of classes in variable mode.
      max_support: cap on the support-set size S.
      max_support_per_class: cap on a class's contribution to S (not on its shots).
      max_query_per_class: cap on the query images per class.
      min_log_weight, max_log_weight: range of the log-uniform class-imbalance factor.
      max_spanning_leaves: a hierarchy node is eligible if it spans at most this many
        classes of the split (Meta-Dataset: 392, the least value that reaches every leaf).
      use_groups, use_hierarchy: draw classes through ``class_groups`` /
        ``class_hierarchy``. ``None`` means: when the split has them, in variable mode.
    """

    mode: str = "variable"
    ways: int | None = None
    shots: int | None = None
    query: int | None = None
    min_ways: int = 5
    max_ways: int = 50
    max_support: int = 500
    max_support_per_class: int = 100
    max_query_per_class: int = 10
    min_log_weight: float = math.log(0.5)
    max_log_weight: float = math.log(2.0)
    max_spanning_leaves: int = 392
    use_groups: bool | None = None
    use_hierarchy: bool | None = None

    def __post_init__(self):
        if self.mode == "fixed" and self.query is None:
            object.__setattr__(self, "query", 15)
        self.validate()

    @classmethod
    def fixed(cls, ways: int, shots: int, query: int = 15) -> EpisodeSpec:
        """``ways``-way ``shots``-shot episodes with ``query`` query images per class."""
        return cls(mode="fixed", ways=ways, shots=shots, query=query)

    def validate(self) -> EpisodeSpec:
        """Raises ``ValueError`` naming the offending field; returns ``self``."""
        if self.mode not in MODES:
            raise ValueError(f"EpisodeSpec.mode={self.mode!r} is unknown; choose one of {MODES}")
        positive = ["min_ways", "max_ways", "max_support", "max_support_per_class"]
        positive += ["max_query_per_class", "max_spanning_leaves"]
        if self.mode == "fixed":
            positive += ["ways", "shots", "query"]
        else:
            for name in ("ways", "shots", "query"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"EpisodeSpec.{name}={getattr(self, name)!r} is only for mode='fixed'; "
                        "variable mode draws it (see min_ways/max_ways, max_support, "
                        "max_query_per_class)"
                    )
        for name in positive:
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"EpisodeSpec.{name}={value!r} must be an integer >= 1")
        if self.max_ways < self.min_ways:
            raise ValueError(
                f"EpisodeSpec.max_ways={self.max_ways} is below min_ways={self.min_ways}"
            )
        if self.max_support < self.min_ways:
            raise ValueError(
                f"EpisodeSpec.max_support={self.max_support} is below min_ways="
                f"{self.min_ways}: every class needs at least one support image"
            )
        if self.max_spanning_leaves < self.min_ways:
            raise ValueError(
                f"EpisodeSpec.max_spanning_leaves={self.max_spanning_leaves} is below "
                f"min_ways={self.min_ways}: no hierarchy node could be eligible"
            )
        for name in ("min_log_weight", "max_log_weight"):
            value = getattr(self, name)
            if not isinstance(value, int | float | np.floating) or not math.isfinite(value):
                raise ValueError(f"EpisodeSpec.{name}={value!r} must be a finite number")
        if self.max_log_weight < self.min_log_weight:
            raise ValueError(
                f"EpisodeSpec.max_log_weight={self.max_log_weight} is below "
                f"min_log_weight={self.min_log_weight}"
            )
        for name in ("use_groups", "use_hierarchy"):
            value = getattr(self, name)
            if value not in (None, True, False):
                raise ValueError(f"EpisodeSpec.{name}={value!r} must be None, True or False")
            if value and self.mode == "fixed":
                raise ValueError(
                    f"EpisodeSpec.{name}=True needs mode='variable': fixed-way episodes draw "
                    "classes uniformly over the split (as Meta-Dataset does); leave it None"
                )
        if self.use_groups and self.use_hierarchy:
            raise ValueError(
                "EpisodeSpec.use_groups and use_hierarchy are both True; choose one ontology"
            )
        return self

    def pad_sizes(self) -> PadSizes:
        """The largest episode this spec can produce on any split."""
        if self.mode == "fixed":
            return PadSizes(self.ways, self.ways * self.shots, self.ways * self.query)
        return PadSizes(self.max_ways, self.max_support, self.max_ways * self.max_query_per_class)


@dataclasses.dataclass(frozen=True, eq=False)
class Episode:
    """One episode as indices into its ``SplitData``.

    Attributes:
      support_idx, query_idx: int64 positions in the split, grouped class by class.
      support_labels, query_labels: int32 episode labels ``0..ways-1``.
      classes: int32 [ways] split class ids; label ``j`` is class ``classes[j]``.
      ways: number of classes.
    """

    support_idx: np.ndarray
    support_labels: np.ndarray
    query_idx: np.ndarray
    query_labels: np.ndarray
    classes: np.ndarray
    ways: int

    @property
    def shots(self) -> np.ndarray:
        """int [ways] support images per episode label."""
        return np.bincount(self.support_labels, minlength=self.ways)

    @property
    def query_per_class(self) -> int:
        """Query images per class (the same for every class)."""
        return len(self.query_idx) // self.ways

    def __eq__(self, other) -> bool:
        if not isinstance(other, Episode):
            return NotImplemented
        return self.ways == other.ways and all(
            np.array_equal(getattr(self, f), getattr(other, f))
            for f in ("support_idx", "support_labels", "query_idx", "query_labels", "classes")
        )

    __hash__ = None


# ------------------------------------ Meta-Dataset formulas (pure functions of the draws)


def num_query_per_class(images_per_class, max_query_per_class: int = 10) -> int:
    """q = min(max_query_per_class, min_c floor(n_c / 2)): leaves >= half of each class."""
    images_per_class = np.asarray(images_per_class)
    if images_per_class.min() < 2:
        raise ValueError(
            f"every class needs >= 2 images (one support, one query); got counts "
            f"{images_per_class.tolist()}"
        )
    return int(min(max_query_per_class, (images_per_class // 2).min()))


def support_set_size(
    remaining_per_class,
    beta: float,
    *,
    max_support_per_class: int = 100,
    max_support: int = 500,
) -> int:
    """S = min(max_support, sum_c (floor(beta * min(max_support_per_class, r_c)) + 1)).

    ``remaining_per_class`` is r_c = n_c - q; ``beta`` in [0, 1). The +1 per class makes
    S >= ways.
    """
    remaining_per_class = np.asarray(remaining_per_class)
    if max_support < len(remaining_per_class):
        raise ValueError(
            f"max_support={max_support} is smaller than the {len(remaining_per_class)} ways: "
            "every class needs at least one support image"
        )
    contributions = np.minimum(max_support_per_class, remaining_per_class)
    return int(min(max_support, (np.floor(beta * contributions) + 1).sum()))


def shots_per_class(images_per_class, remaining_per_class, support_size: int, log_weights):
    """shots_c = min(floor(p_c * (S - ways)) + 1, r_c), p_c proportional to n_c * exp(u_c).

    Args:
      images_per_class: n_c.
      remaining_per_class: r_c = n_c - q, the images left after the query set.
      support_size: S from ``support_set_size``.
      log_weights: u_c ~ U(min_log_weight, max_log_weight), one per class.
    Returns:
      int64 [ways] shots, each >= 1.
    """
    images_per_class = np.asarray(images_per_class)
    remaining_per_class = np.asarray(remaining_per_class)
    ways = len(images_per_class)
    if support_size < ways:
        raise ValueError(f"support_size={support_size} is below the number of ways {ways}")
    weights = images_per_class * np.exp(np.asarray(log_weights, np.float64))
    proportions = weights / weights.sum()
    desired = np.floor(proportions * (support_size - ways)).astype(np.int64) + 1
    return np.minimum(desired, remaining_per_class)


def episode_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of episode ``index``: child ``index`` of ``SeedSequence(seed)``."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(int(index),)))


# -------------------------------------------------------------------------------- sampling


class _Plan:
    """Everything about a split that episodes need, computed once.

    Attributes:
      kind: "plain", "groups" or "hierarchy".
      pools: the class sets an episode draws from (plain: one pool with all classes;
        groups: the eligible groups; hierarchy: the eligible nodes' leaves).
      sorted_idx, offsets, counts: split positions sorted by class; class ``c`` owns
        ``sorted_idx[offsets[c]:offsets[c] + counts[c]]``.
    """

    def __init__(
        self,
        labels,
        spec: EpisodeSpec,
        *,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        class_groups=None,
        class_hierarchy: Mapping[str, Any] | None = None,
    ):
        spec.validate()
        self.spec = spec
        self.class_names = class_names
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"labels must be a 1-D integer array; got dtype {labels.dtype}, "
                f"shape {labels.shape}"
            )
        if len(labels) == 0:
            raise ValueError("labels is empty: the split has no images")
        if num_classes is None:
            num_classes = int(labels.max()) + 1
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(
                f"labels must lie in 0..{num_classes - 1} (num_classes={num_classes}); "
                f"got {labels.min()}..{labels.max()}"
            )
        self.num_images = len(labels)
        self.num_classes = num_classes
        self.counts = np.bincount(labels, minlength=num_classes).astype(np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.sorted_idx = np.argsort(labels, kind="stable").astype(np.int64)

        use_groups, use_hierarchy = spec.use_groups, spec.use_hierarchy
        variable = spec.mode == "variable"
        if use_groups and class_groups is None:
            raise ValueError(
                "EpisodeSpec.use_groups=True but the split has no class_groups; set it to "
                "None or False"
            )
        if use_hierarchy and class_hierarchy is None:
            raise ValueError(
                "EpisodeSpec.use_hierarchy=True but the split has no class_hierarchy; set it "
                "to None or False"
            )
        has_both = class_groups is not None and class_hierarchy is not None
        if variable and has_both and use_groups is None and use_hierarchy is None:
            raise ValueError(
                "the split has both class_groups and class_hierarchy; set "
                "EpisodeSpec.use_groups or use_hierarchy to False to choose one"
            )
        if use_groups is None:
            use_groups = variable and class_groups is not None and not use_hierarchy
        if use_hierarchy is None:
            use_hierarchy = variable and class_hierarchy is not None and not use_groups

        if use_groups:
            self.kind, self.pools = "groups", self._group_pools(class_groups)
        elif use_hierarchy:
            self.kind, self.pools = "hierarchy", self._hierarchy_pools(class_hierarchy)
        else:
            self.kind, self.pools = "plain", [np.arange(num_classes)]
            needed = spec.min_ways if variable else spec.ways
            if num_classes < needed:
                field = "min_ways" if variable else "ways"
                raise ValueError(
                    f"the split has {num_classes} classes, fewer than EpisodeSpec.{field}="
                    f"{needed}; lower {field} or use a split with more classes"
                )
        self._check_class_sizes()
        largest_ways = self.largest_ways()
        if variable and spec.max_support < largest_ways:
            raise ValueError(
                f"EpisodeSpec.max_support={spec.max_support} is below the largest possible "
                f"number of ways ({largest_ways}) on this split; raise max_support or lower "
                "max_ways"
            )

    def name(self, c: int) -> str:
        if self.class_names is not None:
            return f"class {c} ({self.class_names[c]!r})"
        return f"class {c}"

    def _group_pools(self, class_groups) -> list[np.ndarray]:
        groups = np.asarray(class_groups)
        if groups.shape != (self.num_classes,):
            raise ValueError(
                f"class_groups has shape {groups.shape}; it needs one group id per class "
                f"({self.num_classes},)"
            )
        pools = [np.flatnonzero(groups == g) for g in np.unique(groups)]
        eligible = [p for p in pools if len(p) >= self.spec.min_ways]
        if not eligible:
            raise ValueError(
                f"no class group has >= EpisodeSpec.min_ways={self.spec.min_ways} classes "
                f"(largest: {max(len(p) for p in pools)}); lower min_ways or set "
                "use_groups=False"
            )
        return eligible

    def _hierarchy_pools(self, class_hierarchy: Mapping[str, Any]) -> list[np.ndarray]:
        lo, hi = self.spec.min_ways, self.spec.max_spanning_leaves
        pools = []
        # Sorted by node name so the episode stream does not depend on mapping order.
        for node in sorted(class_hierarchy):
            leaves = np.unique(np.asarray(class_hierarchy[node], np.int64))
            if len(leaves) and (leaves[0] < 0 or leaves[-1] >= self.num_classes):
                raise ValueError(
                    f"class_hierarchy[{node!r}] has class ids outside 0..{self.num_classes - 1}"
                )
            if lo <= len(leaves) <= hi:
                pools.append(leaves)
        if not pools:
            raise ValueError(
                f"no class_hierarchy node spans between EpisodeSpec.min_ways={lo} and "
                f"max_spanning_leaves={hi} classes of the split; adjust them or set "
                "use_hierarchy=False"
            )
        return pools

    def _check_class_sizes(self):
        spec = self.spec
        reachable = np.unique(np.concatenate(self.pools))
        if spec.mode == "variable":
            needed, why = 2, "the variable-way sampler needs >= 2 (one support, one query)"
        else:
            needed = spec.shots + spec.query
            why = (
                f"{spec.ways}-way {spec.shots}-shot episodes with {spec.query} query images "
                f"need >= {needed}; lower EpisodeSpec.shots or query"
            )
        small = reachable[self.counts[reachable] < needed]
        if len(small):
            listed = ", ".join(
                f"{self.name(c)} has {self.counts[c]} image(s)" for c in small[:5].tolist()
            )
            more = f" and {len(small) - 5} more" if len(small) > 5 else ""
            raise ValueError(f"{listed}{more}: {why}")

    def largest_ways(self) -> int:
        spec = self.spec
        if spec.mode == "fixed":
            return spec.ways
        return min(spec.max_ways, max(len(p) for p in self.pools))

    def sample(self, rng: np.random.Generator) -> Episode:
        spec = self.spec
        if self.kind == "hierarchy":
            leaves = self.pools[rng.integers(len(self.pools))]
            ways = min(len(leaves), spec.max_ways)
            classes = rng.choice(leaves, ways, replace=False)
        else:
            if self.kind == "groups":
                pool = self.pools[rng.integers(len(self.pools))]
            else:
                pool = self.pools[0]
            if spec.mode == "fixed":
                ways = spec.ways
            else:
                ways = int(rng.integers(spec.min_ways, min(spec.max_ways, len(pool)) + 1))
            classes = rng.choice(pool, ways, replace=False)

        n = self.counts[classes]
        if spec.mode == "fixed":
            query = spec.query
            shots = np.full(ways, spec.shots, np.int64)
        else:
            query = num_query_per_class(n, spec.max_query_per_class)
            remaining = n - query
            size = support_set_size(
                remaining,
                rng.random(),
                max_support_per_class=spec.max_support_per_class,
                max_support=spec.max_support,
            )
            log_weights = rng.uniform(spec.min_log_weight, spec.max_log_weight, size=ways)
            shots = shots_per_class(n, remaining, size, log_weights)

        support, queries = [], []
        for c, k in zip(classes.tolist(), shots.tolist(), strict=True):
            picked = rng.choice(int(self.counts[c]), k + query, replace=False)
            members = self.sorted_idx[self.offsets[c] + picked]
            support.append(members[:k])
            queries.append(members[k:])
        labels = np.arange(ways, dtype=np.int32)
        return Episode(
            support_idx=np.concatenate(support),
            support_labels=np.repeat(labels, shots),
            query_idx=np.concatenate(queries),
            query_labels=np.repeat(labels, query),
            classes=classes.astype(np.int32),
            ways=int(ways),
        )

    def pad_sizes(self) -> PadSizes:
        """The largest ways, support and query any episode of this split can have."""
        spec = self.spec
        if spec.mode == "fixed":
            return spec.pad_sizes()
        best = PadSizes(0, 0, 0)
        for pool in self.pools:
            counts = np.sort(self.counts[pool])[::-1]
            if self.kind == "hierarchy":
                k_min = k_max = min(len(pool), spec.max_ways)
            else:
                k_min, k_max = spec.min_ways, min(len(pool), spec.max_ways)
            pool_sizes = self._pool_maxima(counts, k_min, k_max)
            best = PadSizes(**{name: max(best[name], pool_sizes[name]) for name in best})
        return best

    def _pool_maxima(self, counts: np.ndarray, k_min: int, k_max: int) -> PadSizes:
        """Exact maxima over the episodes of ``k_min..k_max`` classes of one pool.

        ``counts`` is sorted in decreasing order. Query: with k classes the best q comes
        from the k largest classes, so max_k k * min(qmax, counts[k-1] // 2). Support: S
        is bounded by sum_c min(cap, n_c - q) (beta < 1) and the shots sum to at most S.
        Fixing the smallest chosen class j fixes q, and the k - 1 largest classes then
        maximise the sum, so it suffices to scan j with k = min(j + 1, k_max).
        """
        spec = self.spec
        qmax, cap = spec.max_query_per_class, spec.max_support_per_class
        ks = np.arange(k_min, k_max + 1)
        max_query = int((ks * np.minimum(qmax, counts[ks - 1] // 2)).max())
        j = np.arange(k_min - 1, len(counts))
        q = np.minimum(qmax, counts[j] // 2)
        k = np.minimum(j + 1, k_max)
        # prefix[q, t] = sum of min(cap, counts[i] - q) over the t largest classes.
        qs = np.arange(qmax + 1)[:, None]
        prefix = np.concatenate(
            [np.zeros((qmax + 1, 1), np.int64), np.cumsum(np.minimum(cap, counts - qs), 1)], 1
        )
        totals = prefix[q, k - 1] + np.minimum(cap, counts[j] - q)
        max_support = int(min(spec.max_support, totals.max()))
        return PadSizes(k_max, max_support, max_query)


def _plan_for(data, spec: EpisodeSpec, class_groups, class_hierarchy, num_classes) -> _Plan:
    if isinstance(data, SplitData):
        if class_groups is not None or class_hierarchy is not None or num_classes is not None:
            raise ValueError(
                "class_groups/class_hierarchy/num_classes are taken from the SplitData; "
                "pass them only with a plain labels array"
            )
        if (
            spec.mode == "variable"
            and spec.use_hierarchy is None
            and data.class_hierarchy is None
            and data.source.endswith("ilsvrc_2012")
        ):
            # MD draws ImageNet episodes from its WordNet graph; uniform classes would be a
            # silently different benchmark. Imported here: meta_dataset needs TFDS.
            from flatfsc_jax.data.meta_dataset.hierarchy import require_hierarchy

            require_hierarchy(data.source, data.split, None)
        return _Plan(
            data.labels,
            spec,
            num_classes=data.num_classes,
            class_names=data.class_names,
            class_groups=data.class_groups,
            class_hierarchy=data.class_hierarchy,
        )
    return _Plan(
        data,
        spec,
        num_classes=num_classes,
        class_groups=class_groups,
        class_hierarchy=class_hierarchy,
    )


def sample_episode(
    labels,
    spec: EpisodeSpec,
    rng: np.random.Generator,
    *,
    class_groups=None,
    class_hierarchy: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
) -> Episode:
    """Draws one episode from a split given by its labels (or a ``SplitData``).

    Indexes the split on every call (a sort of the labels); use ``EpisodeSampler`` to
    draw many episodes from one split.

    Args:
      labels: int [N] class ids ``0..C-1`` of the split's images, or a ``SplitData``.
      spec: how to draw the episode.
      rng: the random generator; consumed in the order the module docstring gives.
      class_groups: optional int [C] group of each class (Omniglot alphabets).
      class_hierarchy: optional node name -> class ids under it (ImageNet's WordNet).
      num_classes: C, when classes without images follow the last labelled one
        (default ``labels.max() + 1``).
    """
    return _plan_for(labels, spec, class_groups, class_hierarchy, num_classes).sample(rng)
