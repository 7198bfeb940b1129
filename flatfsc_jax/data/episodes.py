"""Episodes for evaluators: reproducible streams, fixed-shape padded batches, a figure.

:class:`EpisodeSampler` draws episode ``i`` of seed ``s`` from ``episode_rng(s, i)`` alone
(:mod:`flatfsc_jax.data.sampling` draws one episode), so any subset of an evaluation's
episodes can be regenerated. ``pad_episodes`` turns a list of episodes into fixed-shape
masked arrays for ``jax.vmap``; the shapes depend only on the padding sizes
(``EpisodeSpec.pad_sizes`` or the tighter ``bucket_sizes`` of a split), so jitted
evaluators never recompile. ``EpisodeBatch.sample(split, n, seed=s)`` is the usual entry
point (validation and test episodes): episodes ``0 .. n-1`` of seed ``s``, padded to the
split's ``bucket_sizes``. ``compact_episode`` re-pads one episode to power-of-two widths
for the adaptations that run the backbone per task (fine-tuning, TSA). ``show_episode``
draws one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flatfsc_jax.checks import is_int
from flatfsc_jax.data.sampling import (
    Episode,
    EpisodeSpec,
    PadSizes,
    _plan_for,
    episode_rng,
)
from flatfsc_jax.data.sources import SplitData

__all__ = [
    "EPISODE_SPECS",
    "EPISODE_SPEC_TITLES",
    "EpisodeBatch",
    "EpisodeSampler",
    "FixedShotSpec",
    "bucket_sizes",
    "bucket_width",
    "compact_episode",
    "episode_spec",
    "pad_episodes",
    "show_episode",
]


# ----------------------------------------------------------------------------------------
# Named test settings: Meta-Dataset's and URL's (``config.evaluation.episode_spec``).
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FixedShotSpec:
    """Variable-way episodes with exactly ``shots`` support images per class.

    Classes are drawn as ``base`` draws them (Meta-Dataset's variable ways, with the class
    ontology); every class then gets ``shots`` support images and
    q = min(max_query, min_c n_c - shots) query images: Meta-Dataset's
    ``compute_num_query`` with a fixed support size, as in URL's "5shot" test setting.
    """

    shots: int = 5
    max_query: int = 10
    base: EpisodeSpec = EpisodeSpec()

    def __post_init__(self):
        for name in ("shots", "max_query"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"FixedShotSpec.{name}={value!r} must be an integer >= 1")
        if self.base.mode != "variable":
            raise ValueError("FixedShotSpec.base must be a variable-mode EpisodeSpec")

    def pad_sizes(self) -> PadSizes:
        ways = self.base.max_ways
        return PadSizes(ways, ways * self.shots, ways * self.max_query)


# URL (Li et al. 2021, data/meta_dataset_reader.py ``test_type``): "standard" is MD's
# variable-way variable-shot; "5shot" is varying-way five-shot (num_support=5); "1shot" is
# five-way one-shot: MD's sampler with 5 ways, at most 10 queries per class and one support
# image per class.
EPISODE_SPECS = {
    "md": EpisodeSpec(),
    "5shot": FixedShotSpec(shots=5, max_query=10),
    "1shot": EpisodeSpec(min_ways=5, max_ways=5, max_support_per_class=1, max_query_per_class=10),
}


# How a report names each setting.
EPISODE_SPEC_TITLES = {
    "md": "Meta-Dataset's variable-way variable-shot",
    "5shot": "URL's varying-way five-shot",
    "1shot": "URL's five-way one-shot",
}


def episode_spec(name: str) -> EpisodeSpec | FixedShotSpec:
    """The test setting ``name``: one of ``EPISODE_SPECS`` ("md", "5shot", "1shot")."""
    if name not in EPISODE_SPECS:
        raise ValueError(f"episode spec {name!r} is unknown; choose one of {tuple(EPISODE_SPECS)}")
    return EPISODE_SPECS[name]


# ----------------------------------------------------------------------------------------
# Reproducible streams of episodes.
# ----------------------------------------------------------------------------------------


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
        fixed = isinstance(spec, FixedShotSpec)
        base = spec.base if fixed else spec
        self._plan = _plan_for(data, base, class_groups, class_hierarchy, num_classes)
        self._shots = spec.shots if fixed else None
        if fixed:
            plan = self._plan
            reachable = np.unique(np.concatenate(plan.pools))
            small = reachable[plan.counts[reachable] <= spec.shots]
            if len(small):
                raise ValueError(
                    f"{len(small)} class(es) of the split (e.g. {plan.name(small[0])}) have "
                    f"<= {spec.shots} images: {spec.shots}-shot episodes need at least "
                    f"{spec.shots + 1} (one query); lower FixedShotSpec.shots"
                )

    @property
    def kind(self) -> str:
        """How classes are drawn: "plain", "groups" or "hierarchy"."""
        return self._plan.kind

    @property
    def pad_sizes(self) -> PadSizes:
        """Tight padding sizes for this split (see ``bucket_sizes``)."""
        if self._shots is None:
            return self._plan.pad_sizes()
        ways = self._plan.largest_ways()
        return PadSizes(ways, ways * self._shots, ways * self.spec.max_query)

    def episode(self, index: int) -> Episode:
        rng = episode_rng(self.seed, index)
        drawn = self._plan.sample(rng)
        if self._shots is None:
            return drawn
        # Keep the variable-mode draw's classes (ways and ontology); redraw the images.
        plan, shots, classes = self._plan, self._shots, drawn.classes
        query = min(self.spec.max_query, int(plan.counts[classes].min()) - shots)
        support, queries = [], []
        for c in classes.tolist():
            picked = rng.choice(int(plan.counts[c]), shots + query, replace=False)
            members = plan.sorted_idx[plan.offsets[c] + picked]
            support.append(members[:shots])
            queries.append(members[shots:])
        labels = np.arange(drawn.ways, dtype=np.int32)
        return Episode(
            support_idx=np.concatenate(support),
            support_labels=np.repeat(labels, shots),
            query_idx=np.concatenate(queries),
            query_labels=np.repeat(labels, query),
            classes=classes,
            ways=drawn.ways,
        )

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
        cls, split_data, num: int, *, seed: int, spec: EpisodeSpec | FixedShotSpec | None = None
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
