"""Backbone-training input pipeline: shuffled, augmented, resumable batches.

Batch training (one domain's train split, cross-entropy over its classes, the paper)
reads ``dict(image=float32 [B, H, W, C] in [-1, 1], label=int32 [B])`` (or uint8 images
plus augmentation parameters, below) from ``make_train_iterator``. The stream is a pure
function of ``(seed, position)``:

* examples: epoch ``e`` is the permutation ``default_rng((seed, e)).permutation(N)``
  of the split (every example once per epoch, a fresh order every epoch), forever;
* global batches: consecutive runs of ``global_batch_size`` examples of that stream
  (a batch may straddle an epoch boundary). They are the elements of a grain
  ``MapDataset`` (random access by batch index; grain runs the prefetch thread or the
  worker processes). The index batch is cut from the cached epoch permutation in one
  numpy slice: grain's per-element ``shuffle().repeat().batch()`` spends ~35 us of
  Python per example, three times the whole load + augment cost of a 28 px example;
* augmentation: every random number of an example is a counter-based hash of
  ``(seed, position of the example in the stream)``, so it neither depends on the
  process layout nor on where the iterator was (re)started.

Resuming is therefore exact and cheap: ``iterator.get_state()`` is
``{"next_batch": k, ...}`` (small, JSON-able: store it next to the train state) and
``set_state`` restarts the grain dataset at global batch ``k``. The same state resumes
under any ``process_count`` / ``worker_count``: global batches do not depend on them.

Multi-host: every process reads the whole global index batch (cheap: integers) and loads
and augments only its contiguous block ``[p * B/P, (p + 1) * B/P)``. The trainer turns
those blocks into one global array on a batch-sharded mesh with
``jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("data")), x)``,
which puts a process's local rows on its own devices in the order of the rows those
devices hold. Which block a process holds depends on the mesh's device order:
``jax.make_mesh`` orders devices by the physical topology (on TPU slices not by process),
``Mesh(jax.devices())`` by device id. ``process_block(sharding, B)`` reads the block off
the sharding; pass its result as ``process_index, process_count`` and every process
loads exactly the rows its devices hold, whatever the mesh. (With any other block
choice the global batch would hold the same examples in another row order.)

Reading: a batch's images are read with one ``__getitems__`` call of a lazy split's
image store (array_record reads a list of records in one request; ``batched_read``).
Workers (``worker_count``, grain processes) read, decode and augment in parallel.

Augmentation on the host or on the device. The parameters are always drawn on the host,
per example (below), so the stream is the same either way. ``device_augment=False``
augments in numpy here and ships float32 [-1, 1]. ``device_augment=True`` ships the uint8
images plus the parameters (a few numbers per example: 4x fewer bytes and no per-pixel
host work) and ``to_step_batch`` augments the sharded batch in one jitted program
(``augment_on_device``, equal to the numpy ``augment_images`` to float rounding).

The augmentation (the paper's recipe), vectorised over the batch, in this order:
reflect-pad by ``pad`` px and crop back at a uniform offset (a shift by up to ``pad`` px
each way, *no flips*), brightness ``+U[-b, b]`` on the 0..255 scale, contrast
``(x - mean_c) * f + mean_c`` with ``f ~ U[1-c, 1+c]`` and ``mean_c`` the per-image
per-channel mean (TensorFlow's ``adjust_contrast``), clip to [0, 255], then, for RGB
images only, saturation ``s * U[1-s, 1+s]`` (clipped to [0, 1]) and hue ``h + U[-d, d]``
(turns, wrapped) in HSV. Only backbone *training batches* are
augmented: few-shot episodes (support and query) never are.

Why one module: the stream above is one contract (which examples, which random numbers
and which global batch every position gets), and the sections below (configuration,
per-example randomness, image operations, the grain dataset and its resumable iterator)
each implement one clause of it; a change to the stream is one diff to read here. Split,
no part would be used without the others.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from flatfsc_jax.checks import is_int, is_real
from flatfsc_jax.data.sources import SplitData, preprocess

# Reflect padding of 8 px at 84 px in the paper; scaled with the image side elsewhere.
PAPER_PAD, PAPER_IMAGE_SIZE = 8, 84


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Training-batch augmentation (the paper). Defaults are the paper's at 84 px.

    Attributes:
      pad: reflect padding in pixels before the random crop back to the original size
        (8 at 84 px; use ``for_image_size`` to scale it, 3 at 28 px). 0 disables cropping.
      contrast: contrast factor ~ U[1 - contrast, 1 + contrast]; in [0, 1).
      saturation: saturation factor ~ U[1 - saturation, 1 + saturation]; in [0, 1].
        RGB images only.
      hue: hue shift ~ U[-hue, hue] in turns of the colour wheel; in [0, 0.5].
        RGB images only.
      brightness: additive shift ~ U[-brightness, brightness] on the 0..255 scale (the
        paper's 0.125 is, as published, almost nothing).
      enabled: False turns every transformation off (batches are plain preprocessed images).
    """

    pad: int = PAPER_PAD
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.03
    brightness: float = 0.125
    enabled: bool = True

    def __post_init__(self):
        if isinstance(self.enabled, (bool, np.bool_)):
            object.__setattr__(self, "enabled", bool(self.enabled))
        else:
            raise ValueError(f"AugmentConfig.enabled={self.enabled!r} must be True or False")
        if not is_int(self.pad) or self.pad < 0:
            raise ValueError(
                f"AugmentConfig.pad={self.pad!r} must be a non-negative integer number of "
                "pixels (8 at 84 px, 3 at 28 px)"
            )
        object.__setattr__(self, "pad", int(self.pad))
        for name, high, closed in (
            ("contrast", 1.0, False),
            ("saturation", 1.0, True),
            ("hue", 0.5, True),
            ("brightness", 255.0, True),
        ):
            value = getattr(self, name)
            ok = is_real(value) and math.isfinite(value) and value >= 0
            ok = ok and (value <= high if closed else value < high)
            if not ok:
                interval = f"[0, {high:g}]" if closed else f"[0, {high:g})"
                raise ValueError(
                    f"AugmentConfig.{name}={value!r} must be a number in {interval} "
                    "(the maximal deviation of the random factor / shift)"
                )
            object.__setattr__(self, name, float(value))

    @classmethod
    def for_image_size(cls, image_size: int, **overrides) -> AugmentConfig:
        """The paper's recipe with the padding scaled to ``image_size`` (3 px at 28 px)."""
        if not is_int(image_size) or image_size < 2:
            raise ValueError(f"image_size={image_size!r} must be an integer >= 2")
        pad = max(1, round(PAPER_PAD * image_size / PAPER_IMAGE_SIZE))
        return cls(**{"pad": pad, **overrides})


# ----------------------------------------------------------------------------------------
# Per-example randomness: a counter-based hash of (seed, stream position, draw)
# ----------------------------------------------------------------------------------------

# splitmix64 (Steele, Lea & Flood 2014): increment and output mixer.
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


def _mix64(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    return z ^ (z >> np.uint64(31))


def example_uniforms(seed: int, positions, num_draws: int) -> np.ndarray:
    """float64 [len(positions), num_draws] in [0, 1), a pure function of each
    ``(seed, position, draw)``: the same example position always gets the same numbers,
    whichever batch, process or worker computes it.
    """
    positions = np.asarray(positions, np.int64).reshape(-1).astype(np.uint64)
    with np.errstate(over="ignore"):  # uint64 arithmetic is meant to wrap
        key = _mix64(np.full(1, seed, np.uint64) * _GAMMA + _GAMMA)
        per_example = _mix64(key + positions * _GAMMA)
        draws = np.arange(1, num_draws + 1, dtype=np.uint64) * _GAMMA
        bits = _mix64(per_example[:, None] + draws[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


AUGMENT_PARAM_NAMES = ("offset_y", "offset_x", "brightness", "contrast", "saturation", "hue")


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """The random choices of one batch, one entry per example (numpy arrays [B])."""

    offset_y: np.ndarray  # crop offset into the padded image, 0..2*pad (pad = no shift)
    offset_x: np.ndarray
    brightness: np.ndarray  # additive, 0..255 scale
    contrast: np.ndarray  # factor
    saturation: np.ndarray  # factor
    hue: np.ndarray  # shift in turns

    @classmethod
    def identity(cls, batch_size: int, pad: int) -> AugmentParams:
        """Parameters that leave every image unchanged (centre crop, neutral colour)."""
        centre = np.full(batch_size, pad, np.int64)
        zeros, ones = np.zeros(batch_size, np.float32), np.ones(batch_size, np.float32)
        return cls(centre, centre.copy(), zeros, ones, ones.copy(), zeros.copy())

    def pack(self) -> np.ndarray:
        """float32 [B, 6], one column per ``AUGMENT_PARAM_NAMES`` entry: what travels with
        a uint8 batch to ``augment_on_device``. One array, so one transfer per batch;
        the integer crop offsets (at most 2 * pad) are exact in float32.
        """
        return np.stack(
            [np.asarray(getattr(self, name), np.float32) for name in AUGMENT_PARAM_NAMES], axis=1
        )


def sample_augment_params(config: AugmentConfig, seed: int, positions) -> AugmentParams:
    """The augmentation of the examples at stream ``positions`` under ``seed``."""
    u = example_uniforms(seed, positions, 6)
    num_offsets = 2 * config.pad + 1
    offsets = np.minimum((u[:, :2] * num_offsets).astype(np.int64), num_offsets - 1)

    def symmetric(col, radius):  # U[-radius, radius]
        return ((2.0 * u[:, col] - 1.0) * radius).astype(np.float32)

    return AugmentParams(
        offset_y=offsets[:, 0],
        offset_x=offsets[:, 1],
        brightness=symmetric(2, config.brightness),
        contrast=1.0 + symmetric(3, config.contrast),
        saturation=1.0 + symmetric(4, config.saturation),
        hue=symmetric(5, config.hue),
    )


# ----------------------------------------------------------------------------------------
# Image operations (batched numpy; images NHWC)
# ----------------------------------------------------------------------------------------


def reflect_pad_crop(images: np.ndarray, pad: int, offset_y, offset_x) -> np.ndarray:
    """Crops every [H, W] image at ``(offset_y[i], offset_x[i])`` (each in 0..2*pad) out
    of the batch reflect-padded by ``pad`` (numpy's "reflect": the edge pixel is not
    repeated, as torchvision's ``padding_mode="reflect"``). Offset ``pad`` is no shift.
    """
    b, h, w, _ = images.shape
    if pad >= min(h, w):
        raise ValueError(f"augment.pad={pad} must be smaller than the image side {min(h, w)}")
    offset_y, offset_x = np.asarray(offset_y), np.asarray(offset_x)
    if offset_y.shape != (b,) or offset_x.shape != (b,):
        raise ValueError(f"need one crop offset per image ({b}), got {offset_y.shape}")
    if min(offset_y.min(), offset_x.min()) < 0 or max(offset_y.max(), offset_x.max()) > 2 * pad:
        raise ValueError(f"crop offsets must be in [0, 2 * pad = {2 * pad}]")
    if pad == 0:
        return images.copy()
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    # One slice copy per image: about 10x faster than a single fancy-index gather.
    out = np.empty_like(images)
    for i, (y, x) in enumerate(zip(offset_y.tolist(), offset_x.tolist(), strict=True)):
        out[i] = padded[i, y : y + h, x : x + w]
    return out


# The colour operations work on channel planes [C, B, H, W]: every channel of the batch is
# one contiguous array, which makes numpy's element-wise passes and per-image means several
# times faster than on interleaved NHWC pixels.


def _planar(images: np.ndarray) -> np.ndarray:
    """NHWC -> contiguous float32 [C, B, H, W]."""
    return np.ascontiguousarray(np.moveaxis(images, -1, 0), dtype=np.float32)


def _interleaved(planes: np.ndarray) -> np.ndarray:
    """[C, B, H, W] -> contiguous NHWC."""
    return np.ascontiguousarray(np.moveaxis(planes, 0, -1))


def _contrast_planar(planes: np.ndarray, factors) -> np.ndarray:
    c, b = planes.shape[:2]
    mean = planes.reshape(c, b, -1).mean(axis=-1)[:, :, None, None]
    f = np.asarray(factors, np.float32)[None, :, None, None]
    return planes * f + mean * (1.0 - f)


def _saturation_hue_planar(planes: np.ndarray, saturation_factors, hue_shifts) -> np.ndarray:
    """HSV saturation scaling and hue rotation without materialising S.

    With V = max(R, G, B), chroma C = V - min(R, G, B) and saturation S = C / V, every
    channel is ``V - C * ramp_n(H)`` with ramp_n(H) = clip(min(k, 4 - k), 0, 1) and
    k = (n + 6 H) mod 6 for n = 5, 3, 1 (R, G, B). ``S <- clip(S * f, 0, 1)`` is
    ``C <- min(C * f, V)``; the hue shift rotates H. H itself is measured in sixths of a
    turn, in [0, 6).
    """
    r, g, b = planes
    value = np.maximum(np.maximum(r, g), b)
    chroma = value - np.minimum(np.minimum(r, g), b)
    # Hue sector by the maximal channel (R before G before B on ties, as the usual
    # definition). Boolean masks times floats instead of np.where / np.fmod: those are an
    # order of magnitude slower in numpy and this is the pipeline's hot loop at 84 px.
    is_r = value == r
    is_g = (value == g) & ~is_r
    is_b = ~(is_r | is_g)
    hue6 = is_r * (g - b) + is_g * (b - r + 2.0 * chroma) + is_b * (r - g + 4.0 * chroma)
    hue6 /= chroma + (chroma == 0)  # grey pixels: 0 / 1; they stay grey whatever the hue
    hue6 += (6.0 * np.asarray(hue_shifts, np.float32))[:, None, None]
    hue6 -= 6.0 * np.floor(hue6 * np.float32(1.0 / 6.0))  # wrap into [0, 6]
    f = np.asarray(saturation_factors, np.float32)[:, None, None]
    chroma = np.minimum(chroma * f, value)
    out = np.empty_like(planes)
    for channel, offset in enumerate((5.0, 3.0, 1.0)):
        k = hue6 + offset  # in [1, 12]: one wrap makes it (k mod 6)
        k -= 6.0 * (k >= 6.0)
        ramp = np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
        np.subtract(value, chroma * ramp, out=out[channel])
    return out


def adjust_contrast(images: np.ndarray, factors) -> np.ndarray:
    """``(x - mean) * f + mean`` per image with the mean over each channel's pixels
    (TensorFlow's ``adjust_contrast``). Float NHWC in, float32 NHWC out; no clipping.
    """
    return _interleaved(_contrast_planar(_planar(images), factors))


def adjust_saturation_hue(images: np.ndarray, saturation_factors, hue_shifts) -> np.ndarray:
    """RGB [B, H, W, 3] on any non-negative scale: in HSV, ``s <- clip(s * f, 0, 1)`` and
    ``h <- (h + d) mod 1`` (d in turns), value unchanged. float32 NHWC out.
    """
    if images.shape[-1] != 3:
        raise ValueError(f"saturation and hue need RGB images, got shape {images.shape}")
    return _interleaved(_saturation_hue_planar(_planar(images), saturation_factors, hue_shifts))


def augment_images(images: np.ndarray, params: AugmentParams, pad: int) -> np.ndarray:
    """uint8 [B, H, W, C] -> augmented float32 [B, H, W, C] on the 0..255 scale."""
    if images.ndim != 4:
        raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
    planes = _planar(reflect_pad_crop(images, pad, params.offset_y, params.offset_x))
    planes += np.asarray(params.brightness, np.float32)[None, :, None, None]
    planes = _contrast_planar(planes, params.contrast)
    np.clip(planes, 0.0, 255.0, out=planes)
    colour_jitter = np.any(params.saturation != 1.0) or np.any(params.hue != 0.0)
    if planes.shape[0] == 3 and colour_jitter:
        # V and C are in [0, 255] and each channel is V - C' ramp with C' <= V: no clip.
        planes = _saturation_hue_planar(planes, params.saturation, params.hue)
    return _interleaved(planes)


# ----------------------------------------------------------------------------------------
# The same augmentation on the device (jax.numpy; parameters drawn on the host)
# ----------------------------------------------------------------------------------------


def _crop_on_device(images: jax.Array, pad: int, offset_y, offset_x) -> jax.Array:
    """``reflect_pad_crop`` in jnp: one dynamic slice per image of the padded batch."""
    if pad == 0:
        return images
    _, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")

    def crop(image, y, x):
        return jax.lax.dynamic_slice(image, (y, x, 0), (h, w, c))

    return jax.vmap(crop)(
        padded, jnp.asarray(offset_y, jnp.int32), jnp.asarray(offset_x, jnp.int32)
    )


def _saturation_hue_on_device(images: jax.Array, saturation_factors, hue_shifts) -> jax.Array:
    """``_saturation_hue_planar`` in jnp on NHWC (same formulas, same tie rules)."""
    r, g, b = images[..., 0], images[..., 1], images[..., 2]
    value = jnp.maximum(jnp.maximum(r, g), b)
    chroma = value - jnp.minimum(jnp.minimum(r, g), b)
    is_r = value == r
    is_g = (value == g) & ~is_r
    hue6 = jnp.where(is_r, g - b, jnp.where(is_g, b - r + 2.0 * chroma, r - g + 4.0 * chroma))
    hue6 = hue6 / jnp.where(chroma == 0, 1.0, chroma)
    hue6 = hue6 + (6.0 * jnp.asarray(hue_shifts, jnp.float32))[:, None, None]
    hue6 = hue6 - 6.0 * jnp.floor(hue6 * jnp.float32(1.0 / 6.0))
    f = jnp.asarray(saturation_factors, jnp.float32)[:, None, None]
    chroma = jnp.minimum(chroma * f, value)
    channels = []
    for offset in (5.0, 3.0, 1.0):
        k = hue6 + offset
        k = jnp.where(k >= 6.0, k - 6.0, k)
        channels.append(value - chroma * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0))
    return jnp.stack(channels, axis=-1)


def augment_on_device(images: jax.Array, params: AugmentParams | jax.Array, pad: int) -> jax.Array:
    """``augment_images`` in jax.numpy: uint8 [B, H, W, C] -> float32 on the 0..255 scale.

    Jittable (``pad`` static); ``params`` is an ``AugmentParams`` or its ``pack()``ed
    float32 [B, 6] array. The parameters are drawn on the host (``sample_augment_params``),
    so the device computes the stream the host path computes, to float rounding: the
    numpy ``augment_images`` is the reference. Per example, so a batch-sharded input
    stays sharded with no communication.
    """
    if isinstance(params, AugmentParams):
        params = params.pack()
    if images.ndim != 4:
        raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
    b, h, w, c = images.shape
    if params.shape != (b, len(AUGMENT_PARAM_NAMES)):
        raise ValueError(
            f"augmentation parameters must be [{b}, {len(AUGMENT_PARAM_NAMES)}] "
            f"(AugmentParams.pack), got shape {params.shape}"
        )
    columns = jnp.moveaxis(jnp.asarray(params, jnp.float32), 1, 0)
    params = dict(zip(AUGMENT_PARAM_NAMES, columns, strict=True))
    if not is_int(pad) or not 0 <= pad < min(h, w):
        raise ValueError(f"augment.pad={pad!r} must be in [0, image side {min(h, w)})")
    offset_y, offset_x = (jnp.round(params[k]).astype(jnp.int32) for k in ("offset_y", "offset_x"))
    x = _crop_on_device(images, int(pad), offset_y, offset_x)
    x = x.astype(jnp.float32)
    x = x + jnp.asarray(params["brightness"], jnp.float32)[:, None, None, None]
    f = jnp.asarray(params["contrast"], jnp.float32)[:, None, None, None]
    x = x * f + jnp.mean(x, axis=(1, 2), keepdims=True) * (1.0 - f)
    x = jnp.clip(x, 0.0, 255.0)
    if c == 3:
        saturation = jnp.asarray(params["saturation"], jnp.float32)
        hue = jnp.asarray(params["hue"], jnp.float32)
        # Per example (no cross-device reduction): neutral parameters skip the HSV round
        # trip, whose float rounding would otherwise touch every pixel.
        jitter = (saturation != 1.0) | (hue != 0.0)
        x = jnp.where(jitter[:, None, None, None], _saturation_hue_on_device(x, saturation, hue), x)
    return x


@functools.partial(jax.jit, static_argnames="pad")
def _augmented_step_images(images, params, pad):
    return jnp.clip(preprocess(augment_on_device(images, params, pad)), -1.0, 1.0)


def to_step_batch(batch: Mapping, *, pad: int) -> dict:
    """A pipeline batch (host or already sharded ``jax.Array``s) -> the training step's
    ``{"images", "labels"}``.

    A batch of the device-augmentation path (``device_augment=True``: uint8 ``image`` and
    the per-example ``augment`` parameters) is augmented and preprocessed here, by one
    jitted program that keeps the batch's sharding, to float32 [-1, 1]. Other batches
    pass through: float32 images are final; uint8 ones the step preprocesses itself.
    ``pad`` is the ``AugmentConfig.pad`` the pipeline was built with.
    """
    images = batch["image"]
    if "augment" in batch:
        images = _augmented_step_images(images, batch["augment"], pad=int(pad))
    return {"images": images, "labels": batch["label"]}


# ----------------------------------------------------------------------------------------
# The grain pipeline
# ----------------------------------------------------------------------------------------


class ShuffledIndexBatches:
    """Random-access source of global index batches: element ``k`` is examples
    ``[k * B, (k + 1) * B)`` of the endless stream of per-epoch permutations, epoch ``e``
    being ``np.random.default_rng((seed, e)).permutation(num_examples)``.

    Endless (length ``sys.maxsize``, grain's convention for infinite datasets). The last
    two epoch permutations are cached, so consecutive batches cost one slice each.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self._epochs: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return sys.maxsize

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        permutation = self._epochs.get(epoch)
        if permutation is None:
            rng = np.random.default_rng((self.seed, epoch))
            permutation = rng.permutation(self.num_examples).astype(np.int64)
            # Racing prefetch threads would store the same array: benign.
            self._epochs = {e: p for e, p in self._epochs.items() if e in (epoch - 1, epoch)}
            self._epochs[epoch] = permutation
        return permutation

    def __getitem__(self, batch_index: int) -> np.ndarray:
        start = int(batch_index) * self.batch_size
        stop = start + self.batch_size
        parts = []
        while start < stop:  # more than one part only where a batch crosses epochs
            epoch, offset = divmod(start, self.num_examples)
            take = min(stop - start, self.num_examples - offset)
            parts.append(self.epoch_permutation(epoch)[offset : offset + take])
            start += take
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __getstate__(self):  # grain workers get the recipe, not the cache
        return {**self.__dict__, "_epochs": {}}


def read_images(split_data: SplitData, indices, *, batched: bool = True) -> np.ndarray:
    """uint8 [len(indices), H, W, C]: the images of ``split_data`` at ``indices``.

    In-memory splits are one numpy gather. Lazy splits whose image store reads a list of
    indices at once (``__getitems__``: array_record data sources, ``sources._LazyImages``)
    are read with one such call when ``batched``: one request for the whole batch
    instead of one per image. ``batched=False`` reads image by image (the reference).
    """
    indices = np.asarray(indices, np.int64)
    images = split_data.images
    if isinstance(images, np.ndarray):
        return images[indices]
    getitems = getattr(images, "__getitems__", None)
    if batched and getitems is not None:
        return np.stack([np.asarray(x) for x in getitems(indices.tolist())])
    return np.stack([np.asarray(images[int(i)]) for i in indices])


class _LoadLocalBatch:
    """Global index batch ``k`` -> this process's slice, loaded, augmented, preprocessed.

    A module-level class (not a closure) so that grain's worker processes can pickle it.
    With ``device_augment`` the images stay uint8 and the batch carries the augmentation
    parameters (``augment``, ``AugmentParams.pack``) for ``to_step_batch``.
    """

    def __init__(
        self,
        split_data,
        *,
        global_batch_size,
        seed,
        augment,
        process_index,
        process_count,
        device_augment=False,
        batched_read=True,
    ):
        self.split_data = split_data
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.augment = augment
        self.local_batch_size = global_batch_size // process_count
        self.local_start = process_index * self.local_batch_size
        self.device_augment = device_augment
        self.batched_read = batched_read

    def __call__(self, batch_index: int, global_indices: np.ndarray) -> dict[str, Any]:
        local = slice(self.local_start, self.local_start + self.local_batch_size)
        indices = np.asarray(global_indices)[local]
        images = read_images(self.split_data, indices, batched=self.batched_read)
        batch = {"label": self.split_data.labels[indices]}
        if self.augment.enabled:
            first = batch_index * self.global_batch_size + self.local_start
            positions = first + np.arange(self.local_batch_size, dtype=np.int64)
            params = sample_augment_params(self.augment, self.seed, positions)
            if self.device_augment:
                return {"image": images, "augment": params.pack(), **batch}
            images = preprocess(augment_images(images, params, self.augment.pad))
            np.clip(images, -1.0, 1.0, out=images)  # float rounding at 0 and 255
        elif not self.device_augment:
            images = preprocess(images)
        return {"image": images, **batch}


def make_train_dataset(
    split_data: SplitData,
    *,
    global_batch_size: int,
    seed: int,
    augment: AugmentConfig,
    process_index: int = 0,
    process_count: int = 1,
    device_augment: bool = False,
    batched_read: bool = True,
) -> grain.MapDataset:
    """The infinite random-access dataset whose element ``k`` is this process's part of
    global batch ``k``. ``make_train_iterator`` iterates it (arguments documented
    there); indexing it directly is handy for inspection (``ds[k]`` == the k-th batch of
    a fresh iterator).
    """
    _check_arguments(split_data, global_batch_size, seed, augment, process_index, process_count)
    for name, value in (("device_augment", device_augment), ("batched_read", batched_read)):
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{name}={value!r} must be True or False")
    load = _LoadLocalBatch(
        split_data,
        global_batch_size=global_batch_size,
        seed=seed,
        augment=augment,
        process_index=process_index,
        process_count=process_count,
        device_augment=bool(device_augment),
        batched_read=bool(batched_read),
    )
    index_batches = ShuffledIndexBatches(len(split_data), global_batch_size, seed)
    return grain.MapDataset.source(index_batches).map_with_index(load)


def _check_arguments(split_data, global_batch_size, seed, augment, process_index, process_count):
    if not isinstance(split_data, SplitData):
        raise ValueError(f"split_data must be a SplitData, got {type(split_data).__name__}")
    if len(split_data) == 0:
        raise ValueError(f"{split_data.source}/{split_data.split} has no examples to train on")
    if not isinstance(augment, AugmentConfig):
        raise ValueError(
            f"augment must be an AugmentConfig, got {type(augment).__name__}; "
            "build one with AugmentConfig(**config.augment)"
        )
    if not is_int(global_batch_size) or global_batch_size < 1:
        raise ValueError(
            f"global_batch_size (config.batch_size)={global_batch_size!r} must be a positive "
            "integer"
        )
    if not is_int(process_count) or process_count < 1:
        raise ValueError(f"process_count={process_count!r} must be a positive integer")
    if not is_int(process_index) or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index!r} must be in [0, process_count={process_count})"
        )
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size (config.batch_size)={global_batch_size} is not divisible by the "
            f"number of processes {process_count} (jax.process_count()): every process loads "
            "batch_size / process_count examples; choose a multiple of the process count"
        )
    if not is_int(seed) or not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed!r} must be an integer in [0, 2**32)")
    if augment.enabled and augment.pad:
        height, width = split_data.image_shape[:2]
        if augment.pad >= min(height, width):
            raise ValueError(
                f"augment.pad={augment.pad} must be smaller than the image side "
                f"{min(height, width)} of {split_data.source} (reflect padding); "
                f"AugmentConfig.for_image_size({min(height, width)}) scales the paper's 8 px"
            )


def process_block(
    sharding: jax.sharding.Sharding, global_batch_size: int, process_index: int | None = None
) -> tuple[int, int]:
    """``(process_index, process_count)`` to pass to ``make_train_iterator`` so that this
    process loads exactly the rows of every global batch that ``sharding`` places on its
    devices.

    ``jax.make_array_from_process_local_data(sharding, local)`` fills this process's
    devices with ``local`` in the order of the rows they hold, whatever the device order
    of the mesh: ``jax.make_mesh`` orders devices by the physical topology (on a TPU
    slice that is not by process), a ``Mesh(jax.devices())`` by device id. The pipeline
    cuts global batch ``k`` into ``process_count`` contiguous blocks, so each process
    must hold one contiguous, equal block of rows: the block index is read off the
    sharding (it equals ``jax.process_index()`` only when the mesh is in process order).
    """
    process_index = jax.process_index() if process_index is None else process_index
    rows = {}
    for device, index in sharding.devices_indices_map((global_batch_size,)).items():
        start, stop, _ = index[0].indices(global_batch_size)
        rows.setdefault(device.process_index, set()).update(range(start, stop))
    return contiguous_block(rows, global_batch_size, process_index)


def contiguous_block(
    rows_by_process: Mapping[int, set[int] | Sequence[int]],
    global_batch_size: int,
    process_index: int,
) -> tuple[int, int]:
    """The pure part of ``process_block``: from the batch rows each process's devices
    hold, ``(block index of process_index, number of processes)``; raises where the
    layout is not one contiguous equal block per process (the pipeline could not feed it).
    """
    count = len(rows_by_process)
    if global_batch_size % count:
        raise ValueError(f"global batch {global_batch_size} does not split over {count} processes")
    size = global_batch_size // count
    held = sorted(rows_by_process.get(process_index, ()))
    if not held:
        raise ValueError(f"process {process_index} holds no rows of the batch")
    block, offset = divmod(held[0], size)
    if offset or held != list(range(held[0], held[0] + size)):
        raise ValueError(
            f"process {process_index}'s devices hold rows {held[0]}..{held[-1]} "
            f"({len(held)} rows), not one contiguous block of {size}: the batch sharding "
            "must give every process a contiguous, equal share of the batch axis"
        )
    return block, count


class TrainIterator:
    """This process's training batches, forever, with a resumable position.

    ``get_state()`` -> ``{"next_batch": k, "seed": .., "global_batch_size": ..,
    "num_examples": ..}`` (JSON-able); ``set_state(state)`` continues with global batch
    ``k``. The last three fields guard against resuming a different stream. Call
    ``close()`` (or use ``with``) to stop grain's prefetch thread / worker processes.
    """

    def __init__(
        self,
        dataset: grain.MapDataset,
        *,
        identity: dict[str, int],
        worker_count: int,
        prefetch: int,
    ):
        self._dataset = dataset
        self._identity = dict(identity)
        self._worker_count = worker_count
        self._prefetch = prefetch
        self._next_batch = 0
        self._iterator = None

    @property
    def next_batch(self) -> int:
        """Index of the global batch the next ``next()`` returns."""
        return self._next_batch

    def _start(self):
        # Slicing keeps map_with_index's indices absolute: the restart is exact.
        remaining = self._dataset[self._next_batch :]
        if self._worker_count > 0:
            # grain's worker processes read its absl flags; outside an absl app (pytest,
            # notebooks) nothing has parsed them yet, so take their defaults.
            from absl import flags

            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            dataset = remaining.to_iter_dataset(
                grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
            ).mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=self._worker_count,
                    per_worker_buffer_size=max(1, self._prefetch),
                )
            )
        else:
            # One background thread computes the next batches while the (GIL-releasing)
            # training step runs; prefetch=0 makes it synchronous. grain's default
            # ReadOptions (16 threads, 500 elements) would hold 500 whole batches.
            dataset = remaining.to_iter_dataset(
                grain.ReadOptions(
                    num_threads=1 if self._prefetch else 0,
                    prefetch_buffer_size=self._prefetch,
                )
            )
        return iter(dataset)

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._iterator = self._start()
        batch = next(self._iterator)
        self._next_batch += 1
        return batch

    def get_state(self) -> dict[str, int]:
        return {"next_batch": self._next_batch, **self._identity}

    def set_state(self, state: dict[str, Any]) -> None:
        missing = [k for k in ("next_batch", *self._identity) if k not in state]
        if missing:
            raise ValueError(f"input pipeline state {state!r} lacks {missing}")
        for key, value in self._identity.items():
            if int(state[key]) != value:
                raise ValueError(
                    f"input pipeline state has {key}={state[key]} but this pipeline has "
                    f"{key}={value}: it was saved by a different run (config or data changed)"
                )
        next_batch = state["next_batch"]
        if not is_int(next_batch) or next_batch < 0:
            raise ValueError(f"input pipeline state next_batch={next_batch!r} is invalid")
        self.close()
        self._next_batch = int(next_batch)

    def close(self) -> None:
        if self._iterator is not None:
            close = getattr(self._iterator, "close", None)
            if close is not None:
                close()
            self._iterator = None

    def __enter__(self) -> TrainIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_train_iterator(
    split_data: SplitData,
    *,
    global_batch_size: int,
    seed: int,
    augment: AugmentConfig,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
    prefetch: int = 2,
    device_augment: bool = False,
    batched_read: bool = True,
) -> TrainIterator:
    """Training batches of ``split_data`` for this process, forever.

    Args:
      split_data: the domain's train split (uint8 HWC images, int32 labels).
      global_batch_size: examples per step over all processes (``config.batch_size``);
        must be divisible by ``process_count``.
      seed: shuffling and augmentation seed, in [0, 2**32).
      augment: ``AugmentConfig`` (``AugmentConfig(enabled=False)`` for none).
      process_index, process_count: ``jax.process_index()``, ``jax.process_count()``.
        Each process yields rows ``[p * B/P, (p + 1) * B/P)`` of every global batch.
      worker_count: grain worker processes computing batches (0: in this process;
        ``config.data.worker_count``). Workers read and decode in parallel: the way to
        feed an accelerator from a lazily read split. Each worker holds its own copy of
        an in-memory split. The stream does not depend on it.
      prefetch: batches computed ahead (per worker when ``worker_count > 0``;
        ``config.data.prefetch``); 0 makes the in-process pipeline synchronous.
      device_augment: ship uint8 images plus the host-drawn augmentation parameters and
        augment on the device (``to_step_batch``): 4x fewer bytes to the device and no
        per-pixel work on the host. False augments on the host in numpy (the reference;
        the two agree to float rounding).
      batched_read: read each batch's images with one ``__getitems__`` call of a lazy
        split's image store (False: one read per image).

    Returns:
      A ``TrainIterator`` of ``dict(image=float32 [B/P, H, W, C] in [-1, 1],
      label=int32 [B/P])``; with ``device_augment``, ``image`` is uint8 and, when
      augmentation is enabled, ``augment`` holds the parameters (float32 [B/P, 6],
      ``AugmentParams.pack``): pass the (sharded)
      batch through ``to_step_batch``. ``get_state`` / ``set_state`` resume it.
    """
    if not is_int(worker_count) or worker_count < 0:
        raise ValueError(f"worker_count={worker_count!r} must be a non-negative integer")
    if not is_int(prefetch) or prefetch < 0:
        raise ValueError(f"prefetch={prefetch!r} must be a non-negative integer")
    dataset = make_train_dataset(
        split_data,
        global_batch_size=global_batch_size,
        seed=seed,
        augment=augment,
        process_index=process_index,
        process_count=process_count,
        device_augment=device_augment,
        batched_read=batched_read,
    )
    identity = {
        "seed": int(seed),
        "global_batch_size": int(global_batch_size),
        "num_examples": len(split_data),
    }
    return TrainIterator(dataset, identity=identity, worker_count=worker_count, prefetch=prefetch)
