"""The fed path of the input pipeline: batched reads, uint8 batches, device augmentation.

References: the numpy ``pipeline.augment_images`` (the host path, itself tested against
matplotlib's HSV and hand computations in test_pipeline.py) for ``augment_on_device``;
one ``__getitem__`` per image for the batched read; a fresh iterator for resumption.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flatfsc_jax.data import pipeline
from flatfsc_jax.data.sources import SplitData, preprocess

# float32 on the 0..255 scale: the two paths sum and divide in different orders.
ATOL = 2e-3


def make_split(num_examples=40, shape=(16, 16, 3), seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num_examples, *shape), dtype=np.uint8)
    labels = np.arange(num_examples) % 7
    return SplitData("test/synthetic", "train", images, labels, [str(c) for c in range(7)])


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def device_iterator(split, batch_size=8, **kwargs):
    return pipeline.make_train_iterator(
        split,
        global_batch_size=batch_size,
        seed=5,
        augment=pipeline.AugmentConfig(pad=3),
        device_augment=True,
        **kwargs,
    )


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
        np.testing.assert_array_equal(x["augment"], y["augment"])


# ----------------------------------------------------------------------------------------
# augment_on_device == augment_images
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,pad", [((6, 84, 84, 3), 8), ((6, 28, 28, 1), 3), ((4, 9, 7, 3), 0)])
def test_device_augmentation_equals_the_numpy_reference(shape, pad):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    images[0] = 128  # a grey image: hue undefined, must stay grey
    # Strong factors so that clipping, saturation clipping and hue wrap all occur.
    config = pipeline.AugmentConfig(pad=pad, contrast=0.9, saturation=1.0, hue=0.5, brightness=60)
    params = pipeline.sample_augment_params(config, 7, np.arange(shape[0]))
    if pad:  # the extreme crop offsets
        params.offset_y[:2], params.offset_x[:2] = (0, 2 * pad), (2 * pad, 0)
    expected = pipeline.augment_images(images, params, pad)
    augment = jax.jit(pipeline.augment_on_device, static_argnums=2)
    got = np.asarray(augment(images, params.pack(), pad))
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    # Identity parameters leave the images unchanged (jitter off: the HSV path skipped).
    identity = pipeline.AugmentParams.identity(shape[0], pad)
    np.testing.assert_allclose(augment(images, identity.pack(), pad), images, atol=ATOL)


def test_to_step_batch_of_a_device_batch_equals_the_host_augmented_batch():
    split = make_split()
    host = pipeline.make_train_iterator(
        split, global_batch_size=8, seed=5, augment=pipeline.AugmentConfig(pad=3)
    )
    for host_batch, device_batch in zip(
        take(host, 3), take(device_iterator(split), 3), strict=True
    ):
        assert host_batch["image"].dtype == np.float32
        step_batch = pipeline.to_step_batch(device_batch, pad=3)
        assert step_batch["images"].dtype == np.float32
        np.testing.assert_allclose(
            step_batch["images"], host_batch["image"], rtol=0, atol=ATOL * 2 / 255
        )
        np.testing.assert_array_equal(step_batch["labels"], host_batch["label"])


# ----------------------------------------------------------------------------------------
# uint8 at the device boundary
# ----------------------------------------------------------------------------------------


def test_device_batches_cross_to_the_device_as_uint8_and_keep_their_sharding():
    split = make_split()
    batch = next(device_iterator(split))
    assert batch["image"].dtype == np.uint8
    first_indices = pipeline.ShuffledIndexBatches(len(split), 8, 5)[0]
    np.testing.assert_array_equal(batch["image"], split.images[first_indices])  # raw pixels
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    on_device = jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
    assert on_device["image"].dtype == np.uint8  # the bytes that cross to the device
    step_batch = pipeline.to_step_batch(on_device, pad=3)
    assert step_batch["images"].sharding.is_equivalent_to(sharding, 4)
    # Without augmentation the images travel as uint8 and are passed through untouched.
    plain = pipeline.make_train_iterator(
        split,
        global_batch_size=8,
        seed=5,
        augment=pipeline.AugmentConfig(enabled=False),
        device_augment=True,
    )
    plain_batch = next(plain)
    assert plain_batch.keys() == {"image", "label"} and plain_batch["image"].dtype == np.uint8
    passed = pipeline.to_step_batch(plain_batch, pad=3)
    np.testing.assert_array_equal(passed["images"], plain_batch["image"])
    host_plain = pipeline.make_train_iterator(
        split, global_batch_size=8, seed=5, augment=pipeline.AugmentConfig(enabled=False)
    )
    np.testing.assert_allclose(preprocess(passed["images"]), next(host_plain)["image"])


# ----------------------------------------------------------------------------------------
# Determinism and resumption of the uint8 + parameters stream
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("worker_count", [0, 2])
def test_device_stream_is_deterministic_and_resumes_mid_epoch(worker_count):
    split = make_split(num_examples=30)  # 30 / 8: epoch 0 ends inside batch 3
    with device_iterator(split) as reference:
        expected = take(reference, 7)
    with device_iterator(split, worker_count=worker_count) as first:
        assert_same_batches(take(first, 3), expected[:3])
        state = json.loads(json.dumps(first.get_state()))
    assert state["next_batch"] == 3
    with device_iterator(split, worker_count=worker_count) as resumed:
        resumed.set_state(state)
        assert_same_batches(take(resumed, 4), expected[3:])


# ----------------------------------------------------------------------------------------
# Batched reads
# ----------------------------------------------------------------------------------------


class CountingImages:
    """A lazy image store with both access paths, counting the calls."""

    def __init__(self, images):
        self.images, self.item_calls, self.batch_calls = images, 0, 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        self.item_calls += 1
        return self.images[i]

    def __getitems__(self, indices):
        self.batch_calls += 1
        return [self.images[i] for i in indices]


def test_pipeline_reads_each_batch_with_one_batched_call():
    split = make_split()
    store = CountingImages(split.images)
    lazy = SplitData(split.source, split.split, store, split.labels, split.class_names)
    batches = take(device_iterator(lazy, prefetch=0), 3)
    assert (store.batch_calls, store.item_calls) == (3, 1)  # 1: SplitData.image_shape
    assert_same_batches(batches, take(device_iterator(split), 3))


def test_batched_array_record_read_equals_per_index_reads(tmp_path):
    from bench.md_split import synthetic_md_split

    split = synthetic_md_split(str(tmp_path), num_images=24, num_classes=3)
    assert type(split.images).__name__ == "_LazyImages"  # read lazily from array_record
    indices = np.array([17, 3, 3, 0, 23, 8])
    batched = pipeline.read_images(split, indices, batched=True)
    assert batched.dtype == np.uint8 and batched.shape == (6, 84, 84, 3)
    one_by_one = pipeline.read_images(split, indices, batched=False)
    np.testing.assert_array_equal(batched, one_by_one)
    np.testing.assert_array_equal(batched[2], split.images[3])


# ----------------------------------------------------------------------------------------
# Which block of the batch a process loads
# ----------------------------------------------------------------------------------------


def test_contiguous_block_follows_the_mesh_order_not_the_process_index():
    # Process 1's devices hold the first rows (a topology-ordered mesh): it loads block 0.
    rows = {0: set(range(8, 16)), 1: set(range(0, 8))}
    assert pipeline.contiguous_block(rows, 16, 1) == (0, 2)
    assert pipeline.contiguous_block(rows, 16, 0) == (1, 2)
    interleaved = {0: {0, 1, 4, 5}, 1: {2, 3, 6, 7}}
    with pytest.raises(ValueError, match="not one contiguous block of 4"):
        pipeline.contiguous_block(interleaved, 8, 0)


def test_process_block_of_a_one_process_mesh_is_the_whole_batch():
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    assert pipeline.process_block(sharding, 8 * len(jax.devices())) == (0, 1)


def test_bad_fed_arguments_name_the_argument():
    split = make_split()
    with pytest.raises(ValueError, match="device_augment='yes' must be True or False"):
        pipeline.make_train_iterator(
            split,
            global_batch_size=8,
            seed=0,
            augment=pipeline.AugmentConfig(pad=3),
            device_augment="yes",
        )
    images = np.zeros((4, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match=r"must be \[4, 6\] \(AugmentParams.pack\)"):
        pipeline.augment_on_device(images, np.zeros((4, 5), np.float32), 3)
    with pytest.raises(ValueError, match="augment.pad=16 must be in"):
        pipeline.augment_on_device(images, pipeline.AugmentParams.identity(4, 16), 16)
