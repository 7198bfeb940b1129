"""Few-shot episodes: Meta-Dataset's variable-way variable-shot sampler and fixed-way episodes.

An *episode* is a small classification task drawn from one class split (a ``SplitData``):
a labelled support set to adapt on and a disjoint query set to score. Episodes here are
pure index sets (positions in the ``SplitData``), so the evaluator can embed every test
image once and score thousands of episodes on cached embeddings.

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

Fixed mode draws ``ways`` classes uniformly and exactly ``shots`` support and ``query``
query images per class (the 5-way 1-shot / 5-shot protocols); as in Meta-Dataset, fixed
ways ignore the class ontology.

Images of a class are drawn in random order without replacement; the first ``shots_c``
form the support and the next ``q`` the query, so the two sets are disjoint. Support and
query are laid out class by class in episode order; label ``j`` is ``classes[j]``, and
the class order itself is random.

Reproducibility: episode ``i`` of seed ``s`` is drawn from ``episode_rng(s, i)`` (the
``i``-th child of ``np.random.SeedSequence(s)``) and depends on nothing else, so any
subset of an evaluation's episodes can be regenerated. Random numbers are consumed in
this order: [group or node index], [ways], classes, [beta, log-weights], then each
class's image draw (brackets: when applicable).

``pad_episodes`` turns a list of episodes into fixed-shape masked arrays for
``jax.vmap``; the shapes depend only on the padding sizes (``EpisodeSpec.pad_sizes`` or
the tighter ``bucket_sizes`` of a split), so jitted evaluators never recompile.
``EpisodeBatch.sample(split, n, seed=s)`` is the usual entry point (validation and test
episodes): episodes ``0 .. n-1`` of seed ``s``, padded to the split's ``bucket_sizes``.
``compact_episode`` re-pads one episode to power-of-two widths for the adaptations that
run the backbone per task (fine-tuning, TSA).

Why one module: the sampler, the padded batches and the episode figure share the
``EpisodeSpec`` / ``Episode`` / ``PadSizes`` types and one contract, the order of random
draws above (episode ``i`` of seed ``s`` is a pure function of the split, the spec and
``s``). Much of the length is that contract written out: the Meta-Dataset formulas as
pure functions with their docstrings, next to the ``_Plan`` that draws them in that
order. Cut into modules, the order would be spread over several files that must change
together, and every reader of an episode would import them all anyway.
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
    "EpisodeBatch",
    "EpisodeSampler",
    "EpisodeSpec",
    "PadSizes",
    "bucket_sizes",
    "bucket_width",
    "compact_episode",
    "episode_rng",
    "num_query_per_class",
    "pad_episodes",
    "sample_episode",
    "show_episode",
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


# ----------------------------------------------------------------------------------------
# The Meta-Dataset formulas, as pure functions of the random draws (tested against plain
# re-implementations).
# ----------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------
# Sampling.
# ----------------------------------------------------------------------------------------


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


class EpisodeSampler:
    """Reproducible episodes of one split: episode ``i`` depends only on ``(seed, i)``.

    Args:
      data: a ``SplitData`` or the split's int labels.
      spec: how to draw episodes (validated, and checked against the split, here).
      seed: the episode stream's seed.
      class_groups, class_hierarchy, num_classes: as in ``sample_episode``, with labels.
    """

    def __init__(
        self,
        data,
        spec: EpisodeSpec,
        seed: int,
        *,
        class_groups=None,
        class_hierarchy: Mapping[str, Any] | None = None,
        num_classes: int | None = None,
    ):
        if not is_int(seed) or seed < 0:
            raise ValueError(f"seed={seed!r} must be a non-negative integer")
        self.spec = spec
        self.seed = int(seed)
        self._plan = _plan_for(data, spec, class_groups, class_hierarchy, num_classes)

    @property
    def kind(self) -> str:
        """How classes are drawn: "plain", "groups" or "hierarchy"."""
        return self._plan.kind

    @property
    def pad_sizes(self) -> PadSizes:
        """Tight padding sizes for this split (see ``bucket_sizes``)."""
        return self._plan.pad_sizes()

    def episode(self, index: int) -> Episode:
        return self._plan.sample(episode_rng(self.seed, index))

    def sample(self, n: int, start: int = 0) -> list[Episode]:
        """Episodes ``start .. start + n - 1`` of this seed's stream."""
        if not is_int(n) or n < 0 or not is_int(start) or start < 0:
            raise ValueError(f"n={n!r} and start={start!r} must be non-negative integers")
        return [self.episode(i) for i in range(start, start + n)]

    def sample_batch(self, n: int, start: int = 0, sizes: PadSizes | None = None):
        """``pad_episodes(self.sample(n, start))`` padded to ``sizes`` (default: tight)."""
        sizes = self.pad_sizes if sizes is None else sizes
        return pad_episodes(self.sample(n, start), **sizes)


def bucket_sizes(
    split_data,
    spec: EpisodeSpec,
    *,
    class_groups=None,
    class_hierarchy: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
) -> PadSizes:
    """The largest ways, support set and query set ``spec`` can produce on this split.

    Exact for ways and query; for support it is the largest reachable S, which bounds
    the support set (the shots sum to at most S). Padding to these sizes instead of
    ``spec.pad_sizes()`` keeps small domains from padding to 500 support images.
    """
    return _plan_for(split_data, spec, class_groups, class_hierarchy, num_classes).pad_sizes()


# ----------------------------------------------------------------------------------------
# Fixed-shape batches for jax.vmap.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class EpisodeBatch:
    """E episodes padded to fixed shapes; padded entries have idx 0, label 0, mask False.

    Attributes:
      support_idx, support_labels: int32 [E, max_support].
      support_mask: bool [E, max_support], True on real support images.
      query_idx, query_labels: int32 [E, max_query].
      query_mask: bool [E, max_query].
      ways: int32 [E].
      classes: int32 [E, max_ways] split class ids, -1 past ``ways``.
      max_ways: static number of label slots (prototype rows) an evaluator allocates.
    """

    support_idx: np.ndarray
    support_labels: np.ndarray
    support_mask: np.ndarray
    query_idx: np.ndarray
    query_labels: np.ndarray
    query_mask: np.ndarray
    ways: np.ndarray
    classes: np.ndarray
    max_ways: int

    _ARRAYS = (
        "support_idx",
        "support_labels",
        "support_mask",
        "query_idx",
        "query_labels",
        "query_mask",
        "ways",
        "classes",
    )

    def __post_init__(self):
        lengths = {name: len(getattr(self, name)) for name in self._ARRAYS}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"EpisodeBatch arrays disagree on the number of episodes: {lengths}")
        for name in self._ARRAYS[:6]:
            shape = np.shape(getattr(self, name))
            if len(shape) != 2:
                raise ValueError(f"EpisodeBatch.{name} must be [E, width], got shape {shape}")
        for side in ("support", "query"):
            shapes = {np.shape(getattr(self, f"{side}_{k}")) for k in ("idx", "labels", "mask")}
            if len(shapes) != 1:
                raise ValueError(f"EpisodeBatch.{side}_idx/{side}_labels/{side}_mask shapes differ")

    @classmethod
    def sample(
        cls, split_data, num: int, *, seed: int, spec: EpisodeSpec | None = None
    ) -> EpisodeBatch:
        """Episodes ``0 .. num - 1`` of ``seed``'s stream on a split (default: Meta-Dataset's
        variable-way variable-shot), padded to the split's tight ``bucket_sizes``."""
        return EpisodeSampler(split_data, spec or EpisodeSpec(), seed).sample_batch(num)

    def __len__(self) -> int:
        return len(self.ways)

    @property
    def pad_sizes(self) -> PadSizes:
        return PadSizes(self.max_ways, self.support_idx.shape[1], self.query_idx.shape[1])

    def arrays(self) -> dict[str, np.ndarray]:
        """The per-episode arrays by name (a pytree for ``jax.vmap``)."""
        return {name: getattr(self, name) for name in self._ARRAYS}

    def index_arrays(self) -> tuple[np.ndarray, ...]:
        """``(support_idx, support_labels, support_mask, query_idx, query_labels,
        query_mask)``: what an evaluator needs of each episode."""
        return tuple(getattr(self, name) for name in self._ARRAYS[:6])

    def take(self, index) -> EpisodeBatch:
        """The episodes ``index`` (positions, a mask or a slice), same padded shapes."""
        if not isinstance(index, slice):
            index = np.asarray(index)
        return EpisodeBatch(
            **{name: getattr(self, name)[index] for name in self._ARRAYS},
            max_ways=self.max_ways,
        )

    def slice(self, start: int, stop: int) -> EpisodeBatch:
        """Episodes ``start:stop`` with the same padded shapes."""
        return self.take(slice(start, stop))

    def episode(self, i: int) -> Episode:
        """Episode ``i`` with the padding removed."""
        s, q = self.support_mask[i], self.query_mask[i]
        ways = int(self.ways[i])
        return Episode(
            support_idx=self.support_idx[i][s].astype(np.int64),
            support_labels=self.support_labels[i][s],
            query_idx=self.query_idx[i][q].astype(np.int64),
            query_labels=self.query_labels[i][q],
            classes=self.classes[i, :ways],
            ways=ways,
        )


def pad_episodes(
    episodes: Sequence[Episode],
    *,
    spec: EpisodeSpec | None = None,
    max_ways: int | None = None,
    max_support: int | None = None,
    max_query: int | None = None,
) -> EpisodeBatch:
    """Stacks episodes into fixed-shape arrays.

    Sizes left ``None`` come from ``spec.pad_sizes()`` (default spec: Meta-Dataset's
    50 ways / 500 support / 500 query), never from the episodes, so every call yields the
    same shapes. Pass ``bucket_sizes(split, spec)`` for a split's tight sizes.
    """
    if len(episodes) == 0:
        raise ValueError("episodes is empty; pad_episodes needs at least one episode")
    defaults = (spec or EpisodeSpec()).pad_sizes()
    sizes = PadSizes(
        defaults.max_ways if max_ways is None else max_ways,
        defaults.max_support if max_support is None else max_support,
        defaults.max_query if max_query is None else max_query,
    )
    for name, value in sizes.items():
        if not is_int(value) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    for i, ep in enumerate(episodes):
        for name, size in (
            ("max_ways", ep.ways),
            ("max_support", len(ep.support_idx)),
            ("max_query", len(ep.query_idx)),
        ):
            if size > getattr(sizes, name):
                raise ValueError(
                    f"episode {i} has {size} {name[4:]} entries > {name}="
                    f"{getattr(sizes, name)}; pass a larger {name} (bucket_sizes(split, "
                    "spec) gives a split's maxima)"
                )

    num = len(episodes)
    support_idx = np.zeros((num, sizes.max_support), np.int32)
    support_labels = np.zeros((num, sizes.max_support), np.int32)
    support_mask = np.zeros((num, sizes.max_support), bool)
    query_idx = np.zeros((num, sizes.max_query), np.int32)
    query_labels = np.zeros((num, sizes.max_query), np.int32)
    query_mask = np.zeros((num, sizes.max_query), bool)
    classes = np.full((num, sizes.max_ways), -1, np.int32)
    for i, ep in enumerate(episodes):
        s, q = len(ep.support_idx), len(ep.query_idx)
        support_idx[i, :s] = ep.support_idx
        support_labels[i, :s] = ep.support_labels
        support_mask[i, :s] = True
        query_idx[i, :q] = ep.query_idx
        query_labels[i, :q] = ep.query_labels
        query_mask[i, :q] = True
        classes[i, : ep.ways] = ep.classes
    return EpisodeBatch(
        support_idx=support_idx,
        support_labels=support_labels,
        support_mask=support_mask,
        query_idx=query_idx,
        query_labels=query_labels,
        query_mask=query_mask,
        ways=np.asarray([ep.ways for ep in episodes], np.int32),
        classes=classes,
        max_ways=sizes.max_ways,
    )


def bucket_width(n: int, width: int) -> int:
    """Smallest power of two >= n, capped at the padded width."""
    return min(width, 1 << max(0, int(n) - 1).bit_length())


def _compact(idx, labels, mask, size):
    """The unmasked entries first, padded to ``size`` with the first one (masked out)."""
    keep = np.flatnonzero(mask)
    pad = size - keep.size
    idx = np.concatenate([idx[keep], np.full(pad, idx[keep[0]], idx.dtype)])
    labels = np.concatenate([labels[keep], np.zeros(pad, labels.dtype)])
    mask = np.arange(size) < keep.size
    return idx, labels.astype(np.int32), mask


def compact_episode(arrays, e: int, *, bucket: bool = True) -> tuple[np.ndarray, ...]:
    """Episode ``e`` of the six padded arrays (``EpisodeBatch.index_arrays()``) for a
    per-episode program that runs the backbone (fine-tuning, TSA).

    Returns ``(support_idx, support_labels, support_mask, query_idx, query_labels,
    query_mask)`` of one episode, its real entries first. ``bucket=True`` pads the support
    and query sets to the next power of two (capped at the padded widths): variable-size
    episodes then need at most ~log2(width) compilations and waste < 2x compute on
    padding; False keeps the padded widths (one compilation for all episodes).
    """
    s_idx, s_lab, s_mask, q_idx, q_lab, q_mask = arrays
    n_s, n_q = int(s_mask[e].sum()), int(q_mask[e].sum())
    if n_s == 0 or n_q == 0:
        raise ValueError(f"episode {e} has {n_s} support and {n_q} query examples")
    size_s = bucket_width(n_s, s_idx.shape[1]) if bucket else s_idx.shape[1]
    size_q = bucket_width(n_q, q_idx.shape[1]) if bucket else q_idx.shape[1]
    support = _compact(s_idx[e], s_lab[e], s_mask[e].astype(bool), size_s)
    query = _compact(q_idx[e], q_lab[e], q_mask[e].astype(bool), size_q)
    return (*support, *query)


# ----------------------------------------------------------------------------------------
# Looking at an episode.
# ----------------------------------------------------------------------------------------

_SUPPORT_RGB = (0.12, 0.47, 0.71)  # matplotlib tab:blue
_QUERY_RGB = (1.0, 0.50, 0.05)  # matplotlib tab:orange


def _episode_mosaic(split_data: SplitData, episode: Episode, max_per_class: int):
    """One float RGB image: a row per class, framed support tiles then query tiles."""
    shots = episode.shots
    n_support = min(max_per_class, int(shots.max()))
    n_query = min(max_per_class, episode.query_per_class)
    starts = np.concatenate([[0], np.cumsum(shots)[:-1]])
    shown = []  # (row, column, split position, is_query)
    for row in range(episode.ways):
        for col in range(min(n_support, int(shots[row]))):
            shown.append((row, col, episode.support_idx[starts[row] + col], False))
        for col in range(n_query):
            pos = row * episode.query_per_class + col
            shown.append((row, n_support + 1 + col, episode.query_idx[pos], True))
    images = split_data.get_images(np.asarray([s[2] for s in shown], np.int64))
    images = images.astype(np.float32) / 255.0
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    h, w = images.shape[1:3]
    frame = max(1, min(h, w) // 14)
    cell_h, cell_w = h + 3 * frame, w + 3 * frame  # tile, frame on both sides, a gap
    columns = n_support + 1 + n_query  # one empty column separates support from query
    mosaic = np.ones((episode.ways * cell_h, columns * cell_w, 3), np.float32)
    for (row, col, _, is_query), image in zip(shown, images, strict=True):
        top, left = row * cell_h, col * cell_w
        mosaic[top : top + h + 2 * frame, left : left + w + 2 * frame] = (
            _QUERY_RGB if is_query else _SUPPORT_RGB
        )
        mosaic[top + frame : top + frame + h, left + frame : left + frame + w] = image
    return mosaic, cell_h


def show_episode(split_data: SplitData, episode: Episode, *, max_per_class: int = 8, ax=None):
    """An image grid of an episode: one row per class, support (blue) then query (orange).

    Args:
      split_data: the split the episode indexes.
      episode: the episode.
      max_per_class: at most this many support and this many query images per row.
      ax: a matplotlib Axes to draw into (default: a new figure).
    Returns:
      The matplotlib Figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if not is_int(max_per_class) or max_per_class < 1:
        raise ValueError(f"max_per_class={max_per_class!r} must be an integer >= 1")
    mosaic, cell_h = _episode_mosaic(split_data, episode, max_per_class)
    if ax is None:
        rows, cols = mosaic.shape[:2]
        scale = 0.9 / cell_h  # inches per pixel: ~0.9 inch per row
        fig, ax = plt.subplots(figsize=(max(4.0, cols * scale + 2.0), rows * scale + 1.0))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_xticks([])
    names = split_data.class_names
    ax.set_yticks(
        np.arange(episode.ways) * cell_h + cell_h / 2,
        [
            f"{names[c]} ({k} shot{'s' * (k != 1)})"
            for c, k in zip(episode.classes.tolist(), episode.shots.tolist(), strict=True)
        ],
        fontsize=8,
    )
    ax.set_title(
        f"{split_data.source}/{split_data.split}: {episode.ways}-way, "
        f"{len(episode.support_idx)} support, {len(episode.query_idx)} query",
        fontsize=9,
    )
    ax.legend(
        handles=[
            Patch(color=_SUPPORT_RGB, label="support"),
            Patch(color=_QUERY_RGB, label="query"),
        ],
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=8,
    )
    return ax.figure
