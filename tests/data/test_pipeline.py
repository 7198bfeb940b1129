"""Tests of the backbone-training input pipeline (flatfsc_jax/data/pipeline.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from matplotlib import colors as mcolors

from flatfsc_jax.data import pipeline
from flatfsc_jax.data.sources import SplitData, preprocess

NO_COLOUR = dict(contrast=0.0, saturation=0.0, hue=0.0, brightness=0.0)


def make_split(num_examples=30, shape=(12, 12, 1), num_classes=None, seed=0):
    """Random images; with ``num_classes=None`` every example is its own class, so a
    label identifies an example."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num_examples, *shape), dtype=np.uint8)
    if num_classes is None:
        labels = np.arange(num_examples)
        num_classes = num_examples
    else:
        labels = rng.integers(0, num_classes, num_examples)
    return SplitData(
        "test/synthetic", "train", images, labels, [str(c) for c in range(num_classes)]
    )


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["label"], y["label"])
        np.testing.assert_array_equal(x["image"], y["image"])


def iterator(split, batch_size=8, seed=3, augment=None, **kwargs):
    augment = augment or pipeline.AugmentConfig(pad=3)
    return pipeline.make_train_iterator(
        split, global_batch_size=batch_size, seed=seed, augment=augment, **kwargs
    )


# ----------------------------------------------------------------------------------------
# Stream: determinism, epochs, resumption, processes
# ----------------------------------------------------------------------------------------


def test_same_seed_same_batches_different_seed_different_batches():
    split = make_split(shape=(12, 12, 3))
    first = take(iterator(split, seed=3), 6)
    assert_same_batches(first, take(iterator(split, seed=3), 6))
    # Synchronous and prefetching iteration compute the same stream.
    assert_same_batches(first, take(iterator(split, seed=3, prefetch=0), 6))
    other = take(iterator(split, seed=4), 6)
    assert not np.array_equal(first[0]["label"], other[0]["label"])
    # Same examples in another seed's stream get other augmentations: compare example 0.
    position = lambda batches: next(  # noqa: E731
        b["image"][list(b["label"]).index(0)] for b in batches if 0 in b["label"]
    )
    assert not np.array_equal(position(first), position(other))


def test_every_example_once_per_epoch_and_epochs_reshuffled():
    num_examples, batch_size = 30, 8  # 30 % 8 != 0: batches straddle epoch boundaries
    split = make_split(num_examples)
    batches = take(iterator(split, batch_size, augment=pipeline.AugmentConfig(enabled=False)), 12)
    labels = np.concatenate([b["label"] for b in batches])
    images = np.concatenate([b["image"] for b in batches])
    epochs = labels[: 3 * num_examples].reshape(3, num_examples)
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(num_examples))
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])
    # Without augmentation a batch is exactly the preprocessed source images.
    np.testing.assert_array_equal(images, preprocess(split.images[labels]))
    assert images.dtype == np.float32 and labels.dtype == np.int32


@pytest.mark.parametrize("resume_at", [2, 3, 4])  # epoch 0 ends inside batch 3 (30 / 8)
def test_resume_from_saved_state_gives_the_same_following_batches(resume_at):
    split = make_split(shape=(12, 12, 3))
    reference = iterator(split)
    take(reference, resume_at)
    state = json.loads(json.dumps(reference.get_state()))  # as stored in a checkpoint
    assert state["next_batch"] == resume_at
    expected = take(reference, 6)

    resumed = iterator(split)
    take(resumed, 1)  # a started iterator is restarted, not just a fresh one
    resumed.set_state(state)
    assert_same_batches(take(resumed, 6), expected)
    assert resumed.get_state() == reference.get_state()


def test_resume_under_another_process_count_reassembles_the_same_global_batches():
    split = make_split(shape=(12, 12, 3))
    single = iterator(split)
    take(single, 5)
    state = single.get_state()
    expected = take(single, 3)
    halves = []
    for p in range(2):
        it = iterator(split, process_index=p, process_count=2)
        it.set_state(state)
        halves.append(take(it, 3))
    for k in range(3):
        for key in ("image", "label"):
            joined = np.concatenate([halves[0][k][key], halves[1][k][key]])
            np.testing.assert_array_equal(joined, expected[k][key])


def test_state_of_another_run_is_rejected():
    split = make_split()
    state = iterator(split, seed=3).get_state()
    with pytest.raises(ValueError, match="seed=3 but this pipeline has seed=4"):
        iterator(split, seed=4).set_state(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        iterator(split, batch_size=6).set_state(state)
    with pytest.raises(ValueError, match="lacks"):
        iterator(split).set_state({"next_batch": 2})


def test_processes_union_equals_the_single_process_global_batch():
    split = make_split(40, shape=(10, 10, 3), num_classes=5)
    global_batches = take(iterator(split, batch_size=12), 5)
    per_process = [
        take(iterator(split, batch_size=12, process_index=p, process_count=2), 5) for p in range(2)
    ]
    for k in range(5):
        assert per_process[0][k]["image"].shape == (6, 10, 10, 3)
        for key in ("image", "label"):
            joined = np.concatenate([per_process[0][k][key], per_process[1][k][key]])
            np.testing.assert_array_equal(joined, global_batches[k][key])


def test_dataset_element_k_is_the_kth_batch():
    split = make_split()
    dataset = pipeline.make_train_dataset(
        split, global_batch_size=8, seed=3, augment=pipeline.AugmentConfig(pad=3)
    )
    batches = take(iterator(split), 5)
    assert_same_batches([dataset[k] for k in (4, 0, 2)], [batches[4], batches[0], batches[2]])


def test_index_batches_concatenate_seeded_epoch_permutations():
    source = pipeline.ShuffledIndexBatches(num_examples=7, batch_size=5, seed=11)
    stream = np.concatenate([source[k] for k in range(7)])  # 35 = 5 epochs of 7
    expected = np.concatenate([np.random.default_rng((11, e)).permutation(7) for e in range(5)])
    np.testing.assert_array_equal(stream, expected)
    big = pipeline.ShuffledIndexBatches(num_examples=3, batch_size=8, seed=0)  # B > N
    np.testing.assert_array_equal(np.sort(big[0][:6]), [0, 0, 1, 1, 2, 2])


@pytest.mark.slow
def test_worker_processes_give_the_in_process_stream():
    split = make_split(shape=(12, 12, 3))
    expected = take(iterator(split), 5)
    with iterator(split, worker_count=2) as workers:
        assert_same_batches(take(workers, 5), expected)
        state = workers.get_state()
    with iterator(split, worker_count=1) as resumed:
        resumed.set_state(state)
        assert_same_batches(take(resumed, 2), take(iterator(split), 7)[5:])


# ----------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,pad", [((28, 28, 1), 3), ((84, 84, 3), 8)])
def test_augmented_batches_keep_shape_dtype_and_range(shape, pad):
    split = make_split(20, shape=shape, num_classes=4)
    augment = pipeline.AugmentConfig.for_image_size(shape[0])
    assert augment.pad == pad
    for batch in take(iterator(split, batch_size=16, augment=augment), 3):
        assert batch["image"].shape == (16, *shape)
        assert batch["image"].dtype == np.float32
        assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
        assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
        assert np.isfinite(batch["image"]).all()


def test_crop_is_a_shift_of_the_reflect_padded_image():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 9, 11, 2), dtype=np.uint8)
    pad = 3
    offset_y, offset_x = np.array([0, 3, 6, 2]), np.array([6, 3, 0, 5])
    crops = pipeline.reflect_pad_crop(images, pad, offset_y, offset_x)
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    for i in range(4):
        y, x = offset_y[i], offset_x[i]
        np.testing.assert_array_equal(crops[i], padded[i, y : y + 9, x : x + 11])

    # The same by hand: output pixel (r, c) is source pixel (r + y - pad, c + x - pad)
    # mirrored about the first / last row and column, the edge itself not repeated.
    def mirror(i, n):
        return -i if i < 0 else 2 * (n - 1) - i if i >= n else i

    i, y, x = 0, offset_y[0], offset_x[0]
    for r in range(9):
        for c in range(11):
            source = images[i, mirror(r + y - pad, 9), mirror(c + x - pad, 11)]
            np.testing.assert_array_equal(crops[i, r, c], source)
    # Offset (pad, pad) is the identity.
    centre = np.full(4, pad)
    np.testing.assert_array_equal(pipeline.reflect_pad_crop(images, pad, centre, centre), images)


def test_augmented_images_are_shifts_never_flips():
    # An image without mirror symmetry: brighter to the bottom and (more) to the right.
    ramp = np.add.outer(np.arange(16) * 5, np.arange(16) * 11).astype(np.uint8)
    images = np.repeat(ramp[None, :, :, None], 20, axis=0)
    split = SplitData("test/ramp", "train", images, np.zeros(20), ["ramp"])
    pad = 2
    padded = np.pad(ramp, pad, mode="reflect")
    shifts = {
        (y, x): preprocess(padded[y : y + 16, x : x + 16])
        for y in range(2 * pad + 1)
        for x in range(2 * pad + 1)
    }
    flips = [preprocess(ramp[::-1]), preprocess(ramp[:, ::-1]), preprocess(ramp[::-1, ::-1])]
    augment = pipeline.AugmentConfig(pad=pad, **NO_COLOUR)
    seen = set()
    for batch in take(iterator(split, batch_size=10, augment=augment), 6):
        for image in batch["image"][..., 0]:
            matches = [s for s, shifted in shifts.items() if np.array_equal(image, shifted)]
            assert len(matches) == 1, "every augmented image is one shift of the original"
            seen.add(matches[0])
            assert not any(np.abs(image - f).max() < 0.5 for f in flips)
    assert len(seen) >= 15, f"60 crops should use most of the 25 offsets, got {len(seen)}"

    # With the colour jitter on, the ramps still go the original way in every image.
    for batch in take(iterator(split, batch_size=10, augment=pipeline.AugmentConfig(pad=pad)), 3):
        for image in batch["image"][..., 0]:
            assert image[:, -4:].mean() > image[:, :4].mean()  # brighter to the right
            assert image[-4:].mean() > image[:4].mean()  # brighter to the bottom


def test_contrast_matches_a_hand_computation():
    image = np.array([[0.0, 100.0], [50.0, 250.0]], np.float32)  # mean 100
    rgb = np.stack([image, image / 2, np.full((2, 2), 7.0, np.float32)], axis=-1)
    out = pipeline.adjust_contrast(rgb[None], [1.5])[0]
    # (x - 100) * 1.5 + 100; second channel mean 50: (x - 50) * 1.5 + 50; flat stays flat.
    np.testing.assert_allclose(out[..., 0], [[-50.0, 100.0], [25.0, 325.0]], rtol=1e-6)
    np.testing.assert_allclose(out[..., 1], [[-25.0, 50.0], [12.5, 162.5]], rtol=1e-6)
    np.testing.assert_allclose(out[..., 2], 7.0, rtol=1e-6)


def test_brightness_then_contrast_then_clip_in_augment_images():
    image = np.array([[[10], [20]], [[30], [250]]], np.uint8)[None]  # [1, 2, 2, 1], mean 77.5
    params = pipeline.AugmentParams.identity(1, pad=1)
    params = pipeline.AugmentParams(
        params.offset_y, params.offset_x, np.array([2.0]), np.array([1.2]),
        params.saturation, params.hue,
    )  # fmt: skip
    out = pipeline.augment_images(image, params, pad=1)
    x = image[0, ..., 0].astype(np.float64) + 2.0
    expected = np.clip((x - x.mean()) * 1.2 + x.mean(), 0, 255)
    np.testing.assert_allclose(out[0, ..., 0], expected, rtol=1e-6)
    assert out.max() == 255.0  # 250 would be 284.5: clipped


def test_saturation_and_hue_match_matplotlib_hsv():
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 255, (5, 7, 6, 3)).astype(np.float32)
    images[0, 0, 0] = [40, 40, 40]  # grey
    images[0, 0, 1] = [255, 0, 0]  # pure colour: saturation at its cap
    factors = np.array([0.8, 1.2, 1.0, 3.0, 0.0], np.float32)
    shifts = np.array([0.03, -0.03, 0.5, -0.2, 0.0], np.float32)
    out = pipeline.adjust_saturation_hue(images, factors, shifts)

    hsv = mcolors.rgb_to_hsv(images.astype(np.float64) / 255.0)
    hsv[..., 0] = (hsv[..., 0] + shifts[:, None, None]) % 1.0
    hsv[..., 1] = np.clip(hsv[..., 1] * factors[:, None, None], 0.0, 1.0)
    expected = mcolors.hsv_to_rgb(hsv) * 255.0
    np.testing.assert_allclose(out, expected, atol=2e-3)
    np.testing.assert_array_equal(out[0, 0, 0], [40, 40, 40])  # grey stays grey
    # Saturation 0 makes every channel the HSV value, the pixel's largest channel.
    np.testing.assert_allclose(out[4], np.repeat(images[4].max(-1, keepdims=True), 3, -1))


def test_single_channel_images_skip_saturation_and_hue():
    images = np.random.default_rng(2).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    params = pipeline.AugmentParams.identity(3, pad=2)
    params = pipeline.AugmentParams(
        params.offset_y, params.offset_x, params.brightness, params.contrast,
        np.array([0.8, 1.2, 1.1]), np.array([0.03, -0.03, 0.01]),
    )  # fmt: skip
    np.testing.assert_array_equal(pipeline.augment_images(images, params, pad=2), images)


def test_augment_parameters_cover_their_ranges_and_depend_on_position_only():
    config = pipeline.AugmentConfig(pad=3)
    params = pipeline.sample_augment_params(config, 5, np.arange(4000))
    for offsets in (params.offset_y, params.offset_x):
        counts = np.bincount(offsets, minlength=7)
        assert len(counts) == 7 and counts.min() > 4000 / 7 * 0.8  # all 7 shifts, ~uniform
    for values, low, high in (
        (params.contrast, 0.8, 1.2),
        (params.saturation, 0.8, 1.2),
        (params.hue, -0.03, 0.03),
        (params.brightness, -0.125, 0.125),
    ):
        assert low <= values.min() < low + 0.01 and high - 0.01 < values.max() <= high
    some = pipeline.sample_augment_params(config, 5, np.array([17, 3999, 0]))
    np.testing.assert_array_equal(some.contrast, params.contrast[[17, 3999, 0]])
    other_seed = pipeline.sample_augment_params(config, 6, np.arange(4000))
    assert not np.array_equal(other_seed.offset_y, params.offset_y)


# ----------------------------------------------------------------------------------------
# Configuration errors
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(pad=-1), "AugmentConfig.pad"),
        (dict(pad=2.5), "AugmentConfig.pad"),
        (dict(contrast=1.0), "AugmentConfig.contrast"),
        (dict(saturation=-0.1), "AugmentConfig.saturation"),
        (dict(hue=0.7), "AugmentConfig.hue"),
        (dict(brightness=float("nan")), "AugmentConfig.brightness"),
        (dict(contrast=(0.8, 1.2)), "AugmentConfig.contrast"),
        (dict(enabled="yes"), "AugmentConfig.enabled"),
    ],
)
def test_augment_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        pipeline.AugmentConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(batch_size=10, process_count=4), r"config\.batch_size.*not divisible"),
        (dict(batch_size=0), r"config\.batch_size"),
        (dict(process_index=2, process_count=2), "process_index"),
        (dict(seed=-1), "seed"),
        (dict(seed=2**32), "seed"),
        (dict(augment=pipeline.AugmentConfig(pad=12)), "augment.pad=12"),
        (dict(worker_count=-1), "worker_count"),
        (dict(augment={"pad": 3}), "AugmentConfig"),
    ],
)
def test_iterator_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        iterator(make_split(shape=(12, 12, 1)), **kwargs)
