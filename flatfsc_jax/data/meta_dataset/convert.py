"""Pure conversion of catalogue examples into stored images and class-split records.

What Meta-Dataset's conversion scripts do to an image, in numpy: grayscale -> RGB,
inversion (Omniglot), crops (MSCOCO, FGVC-Aircraft), optionally MD's JPEG re-encoding,
and the per-source resize to 84x84 (``resize_rule``: MD's bilinear decoder with aligned
corners, or the Lanczos pre-resize of MNIST/CIFAR that CNAPs and URL use); and
``convert_split``, which turns a stream of ``(image, class name)`` examples into the
labelled records of one class split, with strict checks. No TFDS and no TensorFlow (PIL
only to decode and encode images).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from flatfsc_jax.data.meta_dataset.specs import IMAGE_SIZE, ClassSplits, check_split

# ----------------------------------------------------------------------------------------
# Pure image conversion
# ----------------------------------------------------------------------------------------


def to_rgb(image: Any) -> np.ndarray:
    """uint8 HxWx3 from a uint8/bool image: gray (HxW, HxWx1) repeated, alpha dropped.

    Matches PIL's ``convert("RGB")``, which Meta-Dataset applies to every source.
    """
    image = np.asarray(image)
    if image.dtype == np.bool_:
        image = image.astype(np.uint8) * 255
    if image.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (or bool), got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"expected an HxW or HxWxC (C in 1..4) image, got shape {image.shape}")
    if image.shape[-1] in (1, 2):  # gray (+ alpha)
        return np.repeat(image[..., :1], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


def _interpolation_weights(n_in: int, n_out: int):
    """Source indices and weights of 1-d linear interpolation with aligned corners."""
    if n_out == 1 or n_in == 1:
        pos = np.zeros(n_out)
    else:  # the first and last output samples sit exactly on the first/last input pixel
        pos = np.arange(n_out) * ((n_in - 1) / (n_out - 1))
    lo = np.minimum(np.floor(pos).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, pos - lo


def resize_bilinear(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Bilinear resize to ``size x size`` with aligned corners, rounded back to uint8.

    Meta-Dataset's decoder resizes with ``tf.image.resize_images(..., BILINEAR,
    align_corners=True)`` (no anti-aliasing); this is the same map computed in float64.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"expected an HxWxC image, got shape {image.shape}")
    h_lo, h_hi, h_w = _interpolation_weights(image.shape[0], size)
    w_lo, w_hi, w_w = _interpolation_weights(image.shape[1], size)
    x = image.astype(np.float64)
    rows = x[h_lo] * (1.0 - h_w)[:, None, None] + x[h_hi] * h_w[:, None, None]
    out = rows[:, w_lo] * (1.0 - w_w)[None, :, None] + rows[:, w_hi] * w_w[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# How an image reaches 84x84 (see ``resize_rule``).
BILINEAR = "bilinear_aligned"  # MD's decoder: tf bilinear, align_corners, at read time
LANCZOS = "lanczos"  # CNAPs' prepare_extra_datasets.py: PIL LANCZOS, at conversion time
RESIZE_RULES = (BILINEAR, LANCZOS)
# The sources that reach MD's records only through CNAPs' script (the URL/SUR setup).
LANCZOS_SOURCES = ("mnist", "cifar10", "cifar100")
# Sources whose every image MD (or CNAPs, for MNIST/CIFAR) encodes as JPEG itself: the
# originals are not RGB JPEGs (QuickDraw arrays, Omniglot PNGs, GTSRB PPMs, MNIST/CIFAR
# PNGs) or are crops (MSCOCO, FGVC-Aircraft). The other sources keep their JPEG bytes.
MD_JPEG_SOURCES = (
    "omniglot",
    "quickdraw",
    "aircraft",
    "traffic_sign",
    "mscoco",
    "mnist",
    "cifar10",
    "cifar100",
)


def resize_rule(source: str) -> str:
    """The resize the URL/CNAPs records of ``source`` went through (a ``RESIZE_RULES``)."""
    return LANCZOS if source in LANCZOS_SOURCES else BILINEAR


def resize_lanczos(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """PIL's ``resize((size, size), LANCZOS)`` of a uint8 HxWx3 image, as CNAPs does."""
    from PIL import Image

    return np.asarray(Image.fromarray(np.asarray(image)).resize((size, size), Image.LANCZOS))


def jpeg_round_trip(image: np.ndarray) -> np.ndarray:
    """A uint8 RGB image saved as MD saves it (PIL ``save(format="JPEG")``: quality 75,
    4:2:0 chroma) and decoded again."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image)).save(buffer, format="JPEG")
    with Image.open(io.BytesIO(buffer.getvalue())) as img:
        return np.asarray(img.convert("RGB"))


def standardize_image(
    image: Any,
    *,
    invert: bool = False,
    size: int = IMAGE_SIZE,
    resize: str = BILINEAR,
    jpeg: bool = False,
) -> np.ndarray:
    """One catalogue image -> the stored uint8 ``size x size x 3`` image.

    In MD's order: RGB, inversion (Omniglot, at conversion time), then for ``BILINEAR``
    the JPEG the records hold followed by the decoder's resize, and for ``LANCZOS``
    CNAPs' resize followed by the JPEG.
    """
    if resize not in RESIZE_RULES:
        raise ValueError(f"resize={resize!r} is unknown; choose one of {RESIZE_RULES}")
    rgb = to_rgb(image)
    if invert:
        rgb = 255 - rgb
    if resize == LANCZOS:
        out = resize_lanczos(rgb, size)
        return jpeg_round_trip(out) if jpeg else out
    if jpeg:
        rgb = jpeg_round_trip(rgb)
    return resize_bilinear(rgb, size)


def crop(image: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """PIL ``Image.crop((xmin, ymin, xmax, ymax))``: zero-padded where outside the image."""
    xmin, ymin, xmax, ymax = (int(v) for v in box)
    if xmax <= xmin or ymax <= ymin:
        raise ValueError(f"empty crop box {tuple(box)}")
    out = np.zeros((ymax - ymin, xmax - xmin) + image.shape[2:], image.dtype)
    y0, y1 = max(ymin, 0), min(ymax, image.shape[0])
    x0, x1 = max(xmin, 0), min(xmax, image.shape[1])
    if y1 > y0 and x1 > x0:
        out[y0 - ymin : y1 - ymin, x0 - xmin : x1 - xmin] = image[y0:y1, x0:x1]
    return out


def coco_crop_box(
    bbox_xywh: Sequence[float], width: int, height: int, scale: float = 1.2
) -> tuple[int, int, int, int] | None:
    """Meta-Dataset's MSCOCO crop: the box grown by ``scale`` about its centre.

    COCO boxes use half-integer pixel centres, PIL crops integer corners; the rounding
    (Python's round-half-to-even) and clamping follow Meta-Dataset's converter. Returns
    ``(xmin, ymin, xmax, ymax)`` or None for an empty crop (Meta-Dataset skips those).
    """
    x, y, w, h = (float(v) for v in bbox_xywh)
    x -= 0.5 * w * (scale - 1.0)
    y -= 0.5 * h * (scale - 1.0)
    w *= scale
    h *= scale
    xmin = max(int(round(x - 0.5)), 0)
    ymin = max(int(round(y - 0.5)), 0)
    xmax = min(int(round(x + w - 0.5)) + 1, width)
    ymax = min(int(round(y + h - 0.5)) + 1, height)
    if xmax <= xmin or ymax <= ymin:
        return None
    return xmin, ymin, xmax, ymax


def decode_image(data: Any) -> np.ndarray:
    """Encoded bytes, a file path or an array -> uint8 array (gray or RGB), via PIL."""
    if isinstance(data, np.ndarray) and data.dtype != object:
        return data
    from PIL import Image  # the [prepare] extra; only needed to decode encoded images

    if isinstance(data, (bytes, bytearray, np.bytes_)):
        handle = io.BytesIO(bytes(data))
    else:
        handle = os.fspath(data)
    with Image.open(handle) as img:
        if img.mode not in ("L", "RGB"):  # '1', 'P', 'RGBA', 'CMYK', 'I;16', ...
            img = img.convert("RGB")
        return np.asarray(img)


# ----------------------------------------------------------------------------------------
# Pure split conversion
# ----------------------------------------------------------------------------------------

# An example is (image, class name) or (image, class name, group); the image is an array
# or a zero-argument callable returning one (so skipped examples are never decoded), or
# None to drop the example.
Example = tuple


def convert_split(
    examples: Iterable[Example],
    class_splits: ClassSplits,
    split: str,
    *,
    invert: bool = False,
    image_size: int = IMAGE_SIZE,
    max_images_per_class: int | None = None,
    resize: str | None = None,
    md_jpeg: bool = False,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yields ``(key, {"image", "label"})`` for the examples that belong to ``split``.

    Every example's class must be in the class split (an unknown name means the class
    name rule and the shipped lists disagree: an error, not a silent drop), a given group
    must match the shipped one, and every class of ``split`` must receive at least one
    image. ``max_images_per_class`` keeps the first N images of each class. ``resize``
    defaults to the source's ``resize_rule``; ``md_jpeg`` re-encodes the images of
    ``MD_JPEG_SOURCES`` as MD's records hold them.
    """
    check_split(split)
    resize = resize_rule(class_splits.source) if resize is None else resize
    jpeg = bool(md_jpeg) and class_splits.source in MD_JPEG_SOURCES
    names = class_splits.classes[split]
    if not names:
        raise ValueError(f"{class_splits.source} has no {split!r} classes")
    if max_images_per_class is not None and max_images_per_class < 1:
        raise ValueError(f"max_images_per_class must be >= 1, got {max_images_per_class}")
    assignment = class_splits.assignment
    counts = np.zeros(len(names), np.int64)
    for example in examples:
        image, class_name = example[0], example[1]
        if class_name not in assignment:
            raise ValueError(
                f"{class_splits.source}: catalogue class {class_name!r} is not in the shipped "
                f"class splits (e.g. {list(assignment)[:3]}); the class-name rule and the "
                "split lists disagree"
            )
        example_split, label = assignment[class_name]
        if len(example) > 2 and class_splits.groups is not None:
            expected = class_splits.groups[example_split][label]
            if example[2] != expected:
                raise ValueError(
                    f"{class_splits.source}: class {class_name!r} has group {example[2]!r}, "
                    f"the shipped splits say {expected!r}"
                )
        if example_split != split:
            continue
        if max_images_per_class is not None and counts[label] >= max_images_per_class:
            continue
        pixels = image() if callable(image) else image
        if pixels is None:  # the callable dropped it (an empty MSCOCO crop)
            continue
        record = {
            "image": standardize_image(
                pixels, invert=invert, size=image_size, resize=resize, jpeg=jpeg
            ),
            "label": label,
        }
        yield f"{label:05d}_{counts[label]:08d}", record
        counts[label] += 1
    empty = [names[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise ValueError(
            f"{class_splits.source}/{split}: {len(empty)} of {len(names)} classes got no "
            f"images, e.g. {empty[:5]}; the catalogue or directory is incomplete"
        )
