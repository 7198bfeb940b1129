"""Renders the Glyphs benchmark from installed font files: the source of truth of the shipped data.

    python -m tools.glyphs_render --out flatfsc_jax/data/assets/glyphs   # from the repo root

Glyphs is the embedded few-shot benchmark (docs/data.md#glyphs-the-embedded-benchmark): a
*class* is a Unicode character, an *instance* is that character drawn by one font face (one type
designer's version of the symbol), a *domain* is a script. This script turns the fonts of the
Debian font packages listed on that page into one compressed ``glyphs-v1.npz`` plus its data
card ``glyphs-v1.json``; both are committed, so users never need fonts, Pillow or fontTools
(this module imports them lazily: they are the ``render`` extra). ``flatfsc_jax.data.glyphs``
reads the result. An offline tool, not part of the installed package: the names the reader
shares with it (domains, file names, checksums) live in ``flatfsc_jax.data.glyphs_spec`` and
are imported from there.

Pipeline (everything seeded by ``SEED``; the same fonts and library versions give the same bytes):

1. *Faces.* Every face of every .ttf/.otf/.ttc/.otc file under the font directories, with its
   Unicode cmap read by fontTools, its Debian package and that package's licence.
2. *Coverage.* A face takes part in a domain when its cmap maps most of the domain's characters
   to real glyphs. CJK is restricted to Chinese/Japanese faces: a face that covers Hangul but not
   Bopomofo is a Korean font, and Korean fonts are dropped from CJK (some draw Han code points
   with Hangul-reading glyphs).
3. *Rendering.* Each character is drawn alone (no shaping: one code point, its nominal glyph, so
   Arabic letters are their isolated forms) at ``RENDER_PX`` and cropped to its ink. The crops of
   one face and domain share one scale and one baseline: the face's ink extent over the domain
   (highest ascender to lowest descender, widest glyph) fills the 28x28 box less ``MARGIN``;
   each glyph is centred horizontally on its ink. Fitting every glyph to the box on its own would
   erase size and baseline, the only difference between many Latin, Greek and Cyrillic case pairs
   (c/C, o/O, в/В, к/К, p/P) and make those classes identical. Box-filter downsampling gives
   coverage-style anti-aliasing; ink is 255 on a 0 background.
4. *Cleaning.* Dropped: renders of code points the cmap maps to .notdef, blank renders, renders
   of code points that share one glyph with another class in the same face (placeholders,
   caps-only fonts) or look the same as another class's render of that face, faces where less
   than half of the covered characters survive (tofu fonts), outlier faces whose renders are
   far from every class's median render (dingbats, keycap fonts), then near-duplicate faces
   (weight/width variants, metric clones such as Arimo and Liberation Sans): a face whose mean
   absolute pixel difference to an already kept face over their common classes is below
   ``DEDUP_MAD`` is dropped. Classes with fewer than ``MIN_FACES`` distinct faces are dropped;
   a domain with fewer than ``MIN_FACES`` faces is dropped.
5. *Sampling.* CJK and Hangul have thousands of classes: a seeded sample of ``SAMPLED_CLASSES``
   from their common characters (:func:`sampling_pool`).
   Each class keeps at most ``MAX_PER_CLASS`` instances, drawn in a seeded order (per class)
   that visits every font family once before any family twice (diversity of designers).
6. *Protocol* (mirrors Meta-Dataset): seen domains split their classes train/valid/test
   70/15/15 with a seeded permutation; unseen domains are test-only.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import fnmatch
import glob
import io
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from flatfsc_jax.data.glyphs_spec import (
    CARD_NAME,
    DOMAINS,
    NPZ_NAME,
    SEEN_DOMAINS,
    SPLITS,
    UNSEEN_DOMAINS,
    content_sha256,
    file_sha256,
)

VERSION = "1.0.0"
SEED = 0
IMAGE_SIZE = 28
MARGIN = 2  # pixels left blank on each side of the face's ink extent
RENDER_PX = 96  # font size of the high-resolution pass (~4x supersampling)
MIN_FACES = 10  # distinct faces a class (and a domain) needs
MAX_PER_CLASS = 30
DEDUP_MAD = 5.0  # mean |difference| (0..255 scale) below which two faces are one design
MIN_DOMAIN_COVERAGE = 0.9  # fraction of a fixed domain's characters a face must map
MIN_SAMPLED_COVERAGE = 0.5  # ... of a sampled domain's candidate characters
MIN_VALID_FRACTION = 0.5  # below this fraction of clean renders a face is broken for a domain
SAME_RENDER_MAD = 1.0  # two classes of one face closer than this are indistinguishable
# A face whose renders are, class by class, this many times further from the class's median
# render than a typical face is drawing something else (dingbats, keycaps, ornaments).
OUTLIER_SCORE = 2.5
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)
FONT_DIRS = ("/usr/share/fonts",)
FONT_EXTENSIONS = (".ttf", ".otf", ".ttc", ".otc")

SAMPLED_CLASSES = {"cjk": 400, "hangul": 150}
# Candidates drawn for a sampled domain, as a multiple of the target: some fail cleaning.
_SAMPLED_OVERDRAW = 1.5


def _span(first: int, last: int, exclude: Iterable[int] = ()) -> tuple[int, ...]:
    excluded = set(exclude)
    return tuple(cp for cp in range(first, last + 1) if cp not in excluded)


# Small kana are their full-size letters drawn smaller; katakana he/be/pe are drawn like
# hiragana he/be/pe. Both would be classes that differ in nothing but size or label.
_SMALL_KANA = (0x3041, 0x3043, 0x3045, 0x3047, 0x3049, 0x3063, 0x3083, 0x3085, 0x3087, 0x308E)
_SMALL_KANA += tuple(cp + 0x60 for cp in _SMALL_KANA)
_KATAKANA_LIKE_HIRAGANA = (0x30D8, 0x30D9, 0x30DA)

# Characters of each fixed domain (letters only: no combining marks, no punctuation).
DOMAIN_CHARACTERS: dict[str, tuple[int, ...]] = {
    "latin": _span(0x41, 0x5A) + _span(0x61, 0x7A),
    "digits": _span(0x30, 0x39),
    # Capitals (U+03A2 is unassigned) and small letters including final sigma.
    "greek": _span(0x391, 0x3A9, exclude=[0x3A2]) + _span(0x3B1, 0x3C9),
    "cyrillic": _span(0x410, 0x44F),
    # Hiragana and katakana of JIS X 0208 (up to U+3093 / U+30F4) without the small forms.
    "kana": _span(0x3042, 0x3093, exclude=_SMALL_KANA)
    + _span(0x30A2, 0x30F4, exclude=_SMALL_KANA + _KATAKANA_LIKE_HIRAGANA),
    "thai": _span(0xE01, 0xE2E),  # consonants
    # The 36 letters of the basic Arabic block (hamza .. yeh, without tatweel).
    "arabic": _span(0x621, 0x63A) + _span(0x641, 0x64A),
    "hebrew": _span(0x5D0, 0x5EA),  # 22 letters and 5 final forms
    # Independent vowels and consonants.
    "devanagari": _span(0x905, 0x939),
    "bengali": _span(0x985, 0x98C)
    + (0x98F, 0x990)
    + _span(0x993, 0x9A8)
    + _span(0x9AA, 0x9B0)
    + (0x9B2,)
    + _span(0x9B6, 0x9B9),
}
_HANGUL_SYLLABLES = range(0xAC00, 0xD7A4)
_UNMAPPED = 0xFFFF  # a noncharacter: no font maps it, so it draws the .notdef glyph
_BOPOMOFO = range(0x3105, 0x312A)


def class_name(codepoint: int) -> str:
    """Readable class name of a character, e.g. ``"U+0041 A"``."""
    return f"U+{codepoint:04X} {chr(codepoint)}"


# ----------------------------------------------------------------------------------------
# Rendering one face
# ----------------------------------------------------------------------------------------


def read_cmap(font_path, face_index: int = 0) -> dict[int, str]:
    """Unicode code point -> glyph name of one face (fontTools' preferred Unicode cmap)."""
    from fontTools.ttLib import TTFont

    with TTFont(str(font_path), fontNumber=face_index, lazy=True) as font:
        return dict(font.getBestCmap() or {})


def _ink_crop(font, char: str, pad: int):
    """Draws ``char`` on the baseline and crops it to its ink.

    Returns ``(ink uint8 [h, w], top, left)`` with ``top``/``left`` the ink box's position
    relative to the pen origin on the baseline (y grows downwards), or ``None`` when the glyph
    has no ink or its ink reaches the canvas edge (a glyph far outside its own metrics).
    """
    from PIL import Image, ImageDraw

    x0, y0, x1, y1 = font.getbbox(char, anchor="ls")
    width, height = x1 - x0 + 2 * pad, y1 - y0 + 2 * pad
    canvas = Image.new("L", (width, height), 0)
    origin = (pad - x0, pad - y0)
    ImageDraw.Draw(canvas).text(origin, char, font=font, fill=255, anchor="ls")
    pixels = np.asarray(canvas)
    rows = np.flatnonzero(pixels.any(axis=1))
    cols = np.flatnonzero(pixels.any(axis=0))
    if rows.size == 0:
        return None
    if rows[0] == 0 or cols[0] == 0 or rows[-1] == height - 1 or cols[-1] == width - 1:
        return None
    ink = pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    return ink, int(rows[0] - origin[1]), int(cols[0] - origin[0])


def _place(ink: np.ndarray, top: int, scale: float, centre_y: float, image_size: int):
    """Resamples an ink crop into the output box: centred on its ink horizontally, on the
    face's extent vertically (``centre_y``, baseline-relative), ``scale`` output px per px."""
    from PIL import Image

    half = image_size / 2 / scale  # half the output box, in render pixels
    # Source window in the crop's own pixel coordinates.
    x0 = ink.shape[1] / 2 - half
    y0 = centre_y - top - half
    x_int, y_int = math.floor(x0), math.floor(y0)
    window = Image.fromarray(ink).crop(
        (x_int, y_int, math.ceil(x0 + 2 * half), math.ceil(y0 + 2 * half))
    )
    box = (x0 - x_int, y0 - y_int, x0 - x_int + 2 * half, y0 - y_int + 2 * half)
    return np.asarray(window.resize((image_size, image_size), Image.Resampling.BOX, box=box))


def render_characters(
    font_path,
    codepoints: Sequence[int],
    *,
    face_index: int = 0,
    cmap: Mapping[int, str] | None = None,
    image_size: int = IMAGE_SIZE,
    margin: int = MARGIN,
    render_px: int = RENDER_PX,
) -> tuple[np.ndarray, np.ndarray]:
    """Renders characters of one domain with one face at a shared scale and baseline.

    Args:
      font_path, face_index: the face (``face_index`` selects a face of a .ttc collection).
      codepoints: the domain's characters; the shared scale is fitted to the ink of all of
        them that the face draws, so pass a whole domain, not single characters.
      cmap: the face's code point -> glyph name map (read with fontTools when ``None``).
      image_size, margin: output box and the blank border around the face's ink extent.
      render_px: font size of the high-resolution pass.

    Returns:
      ``images`` uint8 [n, image_size, image_size] (ink 255 on 0) and ``drawn`` bool [n]:
      False where the face has no glyph for the code point (not in the cmap, or mapped to
      .notdef), the glyph has no ink, or it looks like the face's .notdef box (tofu);
      those images are all zero.
    """
    from PIL import ImageFont

    if cmap is None:
        cmap = read_cmap(font_path, face_index)
    font = ImageFont.truetype(
        str(font_path), render_px, index=face_index, layout_engine=ImageFont.Layout.BASIC
    )
    pad = render_px // 2
    crops = [None] * len(codepoints)
    for i, cp in enumerate(codepoints):
        if cmap.get(cp, ".notdef") != ".notdef":
            crops[i] = _ink_crop(font, chr(cp), pad)
    images = np.zeros((len(codepoints), image_size, image_size), np.uint8)
    drawn = np.array([c is not None for c in crops], bool)
    if not drawn.any():
        return images, drawn
    tops = np.array([c[1] for c in crops if c is not None])
    bottoms = np.array([c[1] + c[0].shape[0] for c in crops if c is not None])
    widths = np.array([c[0].shape[1] for c in crops if c is not None])
    extent = max(bottoms.max() - tops.min(), widths.max())  # the face's ink extent
    scale = (image_size - 2 * margin) / extent  # output pixels per render pixel
    centre_y = (tops.min() + bottoms.max()) / 2
    for i, crop in enumerate(crops):
        if crop is not None:
            images[i] = _place(crop[0], crop[1], scale, centre_y, image_size)
    drawn &= images.reshape(len(images), -1).max(axis=1) > 0
    # An unmapped code point draws glyph 0 (.notdef); glyphs drawn the same way are tofu.
    notdef = None if _UNMAPPED in cmap else _ink_crop(font, chr(_UNMAPPED), pad)
    if notdef is not None:
        tofu = _place(notdef[0], notdef[1], scale, centre_y, image_size).astype(np.float32)
        distance = np.abs(images.astype(np.float32) - tofu).mean(axis=(1, 2))
        drawn &= distance >= SAME_RENDER_MAD
    return images, drawn


# ----------------------------------------------------------------------------------------
# Faces, packages, licences
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Face:
    """One font face found on this machine."""

    path: str
    index: int
    family: str
    style: str
    cmap: Mapping[int, str] = dataclasses.field(repr=False, compare=False)

    @property
    def is_korean(self) -> bool:
        """Covers Hangul but not Bopomofo: a Korean font, not a Chinese/Japanese one."""
        hangul = sum(cp in self.cmap for cp in _HANGUL_SYLLABLES)
        return hangul >= 2000 and not any(cp in self.cmap for cp in _BOPOMOFO)


def _font_files(font_dirs: Sequence[str]) -> list[str]:
    files = set()
    for font_dir in font_dirs:
        for root, _, names in os.walk(font_dir):
            for name in names:
                if name.lower().endswith(FONT_EXTENSIONS):
                    files.add(os.path.realpath(os.path.join(root, name)))
    return sorted(files)


def _read_faces(path: str) -> list[Face]:
    """All faces of one font file; unreadable files give none (and are reported)."""
    from fontTools.ttLib import TTCollection, TTFont

    try:
        if path.lower().endswith((".ttc", ".otc")):
            with TTCollection(path, lazy=True) as collection:
                count = len(collection.fonts)
        else:
            count = 1
        faces = []
        for index in range(count):
            with TTFont(path, fontNumber=index, lazy=True) as font:
                names = font["name"]
                faces.append(
                    Face(
                        path=path,
                        index=index,
                        family=names.getBestFamilyName() or os.path.basename(path),
                        style=names.getBestSubFamilyName() or "",
                        cmap=dict(font.getBestCmap() or {}),
                    )
                )
        return faces
    except Exception as e:  # a broken font file must not stop the render
        print(f"  skipping unreadable font {path}: {type(e).__name__}: {e}", file=sys.stderr)
        return []


def discover_faces(font_dirs: Sequence[str], jobs: int = 1) -> list[Face]:
    """Every face under ``font_dirs``, sorted by (path, index); symlinks resolved."""
    files = _font_files(font_dirs)
    with _executor(jobs) as pool:
        per_file = list(pool.map(_read_faces, files, chunksize=8))
    return [face for faces in per_file for face in faces]


def debian_packages() -> dict[str, str]:
    """Resolved file path -> owning Debian package, from dpkg's file lists (empty elsewhere)."""
    owners = {}
    for listing in sorted(glob.glob("/var/lib/dpkg/info/*.list")):
        package = os.path.basename(listing)[: -len(".list")].split(":")[0]
        with open(listing, encoding="utf-8", errors="replace") as f:
            for line in f:
                path = line.rstrip("\n")
                if path.lower().endswith(FONT_EXTENSIONS):
                    owners.setdefault(os.path.realpath(path), package)
    return owners


def debian_versions(packages: Iterable[str]) -> dict[str, str]:
    wanted = sorted(set(packages))
    if not wanted:
        return {}
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Package} ${Version}\n", *wanted],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
    except FileNotFoundError:
        return {}
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


_LICENCE_KEYWORDS = (
    ("arphic public license", "Arphic-1999"),
    ("open font license", "OFL-1.1"),
    ("general public license", "GPL"),
    ("public domain", "public-domain"),
    ("bitstream vera", "Bitstream-Vera"),
)


def debian_licence(package: str, font_file: str, doc_dir: str = "/usr/share/doc") -> str:
    """The licence of ``font_file`` according to ``<doc_dir>/<package>/copyright``.

    Machine-readable (DEP-5) files: the ``License`` of the last ``Files`` stanza whose pattern
    matches the font's file name, else of the catch-all ``*`` stanza. Free-form files: the
    licences the text names.
    """
    path = os.path.join(doc_dir, package, "copyright")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return "unknown"
    if text.startswith("Format:"):
        default, specific = None, None
        for stanza in re.split(r"\n\s*\n", text):
            files = re.search(r"^Files:(.*(?:\n[ \t].*)*)", stanza, re.M)
            licence = re.search(r"^License:[ \t]*(.+)$", stanza, re.M)
            if not files or not licence:
                continue
            for pattern in files.group(1).split():
                if pattern == "*":
                    default = licence.group(1).strip()
                elif not pattern.startswith("debian/"):
                    base = pattern.rsplit("/", 1)[-1]
                    if base != "*" and fnmatch.fnmatch(font_file.lower(), base.lower()):
                        specific = licence.group(1).strip()
        found = specific or default
        if found:
            return found
    lower = text.lower()
    named = [short for phrase, short in _LICENCE_KEYWORDS if phrase in lower]
    return " or ".join(named) if named else "see copyright file"


# ----------------------------------------------------------------------------------------
# Building the benchmark
# ----------------------------------------------------------------------------------------


class _SerialExecutor:
    """``ProcessPoolExecutor`` stand-in for ``jobs=1`` (no fork, easier debugging)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, *iterables, chunksize=1):
        return map(fn, *iterables)


def _executor(jobs: int):
    if jobs <= 1:
        return _SerialExecutor()
    return concurrent.futures.ProcessPoolExecutor(jobs)


def _render_job(job) -> tuple[np.ndarray, np.ndarray]:
    path, index, codepoints, cmap = job
    return render_characters(path, codepoints, face_index=index, cmap=cmap)


@dataclasses.dataclass
class DomainResult:
    """One cleaned domain: images per (class, face) and the bookkeeping for the data card."""

    codepoints: list[int]  # kept classes, sorted
    faces: list[int]  # indices into the face list of the faces that supplied images
    instances: dict[int, list[tuple[int, np.ndarray]]]  # codepoint -> [(face, image)]
    notes: list[str]


def _shared_glyph_mask(face: Face, codepoints: Sequence[int]) -> np.ndarray:
    """True for code points whose glyph another of ``codepoints`` also maps to."""
    counts = collections.Counter(face.cmap.get(cp) for cp in codepoints if cp in face.cmap)
    return np.array([cp in face.cmap and counts[face.cmap[cp]] > 1 for cp in codepoints])


def _same_render_mask(images: np.ndarray, drawn: np.ndarray) -> np.ndarray:
    """True for drawn images within ``SAME_RENDER_MAD`` of another drawn class's image."""
    index = np.flatnonzero(drawn)
    mask = np.zeros(len(images), bool)
    if index.size < 2:
        return mask
    flat = images[index].reshape(len(index), -1).astype(np.float32)
    # Squared L2 distances bound the L1 ones (|d| <= 255), so a matrix product finds the few
    # candidate pairs and only those get the exact mean absolute difference.
    sq = (flat**2).sum(axis=1)
    l2 = sq[:, None] + sq[None, :] - 2 * flat @ flat.T
    bound = 255.0 * flat.shape[1] * SAME_RENDER_MAD
    for a, b in zip(*np.nonzero(np.triu(l2 < bound, k=1)), strict=True):
        if np.abs(flat[a] - flat[b]).mean() < SAME_RENDER_MAD:
            mask[index[a]] = mask[index[b]] = True
    return mask


def _outlier_scores(
    faces: Sequence[int], images: Mapping[int, np.ndarray], valid: Mapping[int, np.ndarray]
) -> dict[int, float]:
    """Per face: median over its classes of (distance to the class's median render) divided
    by (the median of that distance over the class's faces); about 1 for a typical face."""
    ratios: dict[int, list[float]] = {f: [] for f in faces}
    num_classes = len(next(iter(valid.values()))) if valid else 0
    for c in range(num_classes):
        drawing = [f for f in faces if valid[f][c]]
        if len(drawing) < 3:
            continue
        stack = np.stack([images[f][c] for f in drawing]).astype(np.float32)
        distance = np.abs(stack - np.median(stack, axis=0)).mean(axis=(1, 2))
        typical = max(float(np.median(distance)), 1e-6)
        for f, d in zip(drawing, distance, strict=True):
            ratios[f].append(d / typical)
    return {f: float(np.median(r)) if r else 1.0 for f, r in ratios.items()}


def _style_rank(style: str) -> int:
    """Regular-looking styles first, so de-duplication keeps them."""
    return 0 if style.lower() in {"regular", "book", "roman", "normal", "medium"} else 1


def _dedup_faces(
    order: Sequence[int], images: Mapping[int, np.ndarray], valid: Mapping[int, np.ndarray]
) -> tuple[list[int], dict[int, tuple[int, float]]]:
    """Greedy de-duplication: keeps a face unless it is within ``DEDUP_MAD`` of a kept face.

    Returns the kept faces and, for each dropped face, (the kept face it duplicates, MAD).
    """
    kept: list[int] = []
    dropped: dict[int, tuple[int, float]] = {}
    for face in order:
        for other in kept:
            common = valid[face] & valid[other]
            if common.sum() < 5:
                continue
            diff = images[face][common].astype(np.float32) - images[other][common]
            mad = float(np.abs(diff).mean())
            if mad < DEDUP_MAD:
                dropped[face] = (other, mad)
                break
        else:
            kept.append(face)
    return kept, dropped


def _face_order(faces: Sequence[Face], candidates: Sequence[int], rng) -> list[int]:
    """Seeded order visiting every family once before any family a second time."""
    families: dict[str, list[int]] = collections.defaultdict(list)
    for f in candidates:
        families[faces[f].family].append(f)
    names = sorted(families)
    names = [names[i] for i in rng.permutation(len(names))]
    queues = [
        [members[i] for i in rng.permutation(len(members))]
        for members in (families[n] for n in names)
    ]
    order = []
    while any(queues):
        for queue in queues:
            if queue:
                order.append(queue.pop(0))
    return order


def _encodes_in(codepoint: int, codec: str, first: int, last: int) -> bool:
    """Whether the character's (big-endian) code in ``codec`` lies in ``first..last``."""
    try:
        code = int.from_bytes(chr(codepoint).encode(codec), "big")
    except UnicodeEncodeError:
        return False
    return first <= code <= last


def sampling_pool(domain: str) -> list[int]:
    """The common characters a sampled domain draws its classes from.

    cjk: the ideographs in the first (frequent) level of all three national standards
    GB 2312, JIS X 0208 and Big5 (1583 characters every Chinese and Japanese font has);
    hangul: the 2350 precomposed syllables of KS X 1001. Defined by Python's codecs, so the
    pool does not depend on which fonts happen to be installed.
    """
    if domain == "cjk":
        return [
            cp
            for cp in range(0x4E00, 0xA000)
            if _encodes_in(cp, "gb2312", 0xB0A1, 0xD7FE)  # GB 2312 level 1: rows 16-55
            and _encodes_in(cp, "euc_jp", 0xB0A1, 0xCFFE)  # JIS X 0208 level 1: rows 16-47
            and _encodes_in(cp, "big5", 0xA440, 0xC67E)  # Big5 frequently used characters
        ]
    if domain == "hangul":
        return [cp for cp in _HANGUL_SYLLABLES if _encodes_in(cp, "euc_kr", 0xB0A1, 0xC8FE)]
    raise ValueError(f"domain {domain!r} is not sampled; sampled: {sorted(SAMPLED_CLASSES)}")


def _candidate_codepoints(domain: str, rng) -> list[int]:
    """A fixed domain's characters, or a seeded draw (in draw order) from a sampling pool."""
    if domain in DOMAIN_CHARACTERS:
        return list(DOMAIN_CHARACTERS[domain])
    pool = sampling_pool(domain)
    draw = math.ceil(SAMPLED_CLASSES[domain] * _SAMPLED_OVERDRAW)
    return [pool[i] for i in rng.permutation(len(pool))[:draw]]


def _allowed_in(domain: str, face: Face) -> bool:
    """Whether a face may take part in a domain at all: CJK excludes Korean fonts."""
    return domain != "cjk" or not face.is_korean


def build_domain(
    domain: str, faces: Sequence[Face], *, jobs: int = 1, log=print
) -> DomainResult | None:
    """Renders and cleans one domain; ``None`` when it has fewer than ``MIN_FACES`` faces."""
    domain_id = DOMAINS.index(domain)
    rng = np.random.default_rng([SEED, domain_id])
    candidates = _candidate_codepoints(domain, rng)
    sampled = domain in SAMPLED_CLASSES
    min_coverage = MIN_SAMPLED_COVERAGE if sampled else MIN_DOMAIN_COVERAGE
    members = [
        i
        for i, f in enumerate(faces)
        if _allowed_in(domain, f)
        and sum(f.cmap.get(cp, ".notdef") != ".notdef" for cp in candidates)
        >= min_coverage * len(candidates)
    ]
    notes = []
    jobs_in = [
        (
            faces[i].path,
            faces[i].index,
            candidates,
            {cp: faces[i].cmap.get(cp) for cp in candidates if cp in faces[i].cmap},
        )
        for i in members
    ]
    images, valid = {}, {}
    broken = []
    with _executor(jobs) as pool:
        for i, (imgs, drawn) in zip(
            members, pool.map(_render_job, jobs_in, chunksize=4), strict=True
        ):
            covered = sum(faces[i].cmap.get(cp, ".notdef") != ".notdef" for cp in candidates)
            ok = drawn & ~_shared_glyph_mask(faces[i], candidates)
            ok &= ~_same_render_mask(imgs, ok)
            if covered == 0 or ok.sum() < MIN_VALID_FRACTION * covered:
                broken.append(i)
                continue
            images[i], valid[i] = imgs, ok
    if broken:
        notes.append(
            "faces dropped as blank/tofu/placeholder fonts: "
            + ", ".join(f"{faces[f].family} {faces[f].style}" for f in broken)
        )
    order = sorted(
        images,
        key=lambda i: (_style_rank(faces[i].style), faces[i].family, faces[i].path, faces[i].index),
    )
    kept, _ = _dedup_faces(order, images, valid)
    notes.append(
        f"{len(members)} faces cover it, {len(images)} render cleanly, "
        f"{len(kept)} distinct after de-duplication (MAD < {DEDUP_MAD})"
    )
    # Outliers are judged among distinct faces: clones of one family would otherwise be the
    # "typical" face and make every other design look like an outlier.
    scores = _outlier_scores(kept, images, valid)
    outliers = sorted((f for f in kept if scores[f] > OUTLIER_SCORE), key=lambda f: -scores[f])
    if outliers:
        notes.append(
            "outlier faces dropped: "
            + ", ".join(f"{faces[f].family} {faces[f].style} ({scores[f]:.1f})" for f in outliers)
        )
        kept = [f for f in kept if f not in outliers]
    counts = np.sum([valid[i] for i in kept], axis=0) if kept else np.zeros(len(candidates))
    enough = [cp for cp, n in zip(candidates, counts, strict=True) if n >= MIN_FACES]
    if sampled:
        enough = enough[: SAMPLED_CLASSES[domain]]
        if len(enough) < SAMPLED_CLASSES[domain]:
            notes.append(f"only {len(enough)} sampled classes have >= {MIN_FACES} faces")
    else:
        dropped = sorted(set(candidates) - set(enough))
        if dropped:
            notes.append(
                f"classes with < {MIN_FACES} faces dropped: "
                + ", ".join(class_name(cp) for cp in dropped)
            )
    if len(kept) < MIN_FACES or not enough:
        log(f"  {domain}: dropped ({len(kept)} distinct faces, {len(enough)} classes)")
        for note in notes:
            log(f"    {note}")
        return None
    position = {cp: candidates.index(cp) for cp in enough}
    instances = {}
    for cp in sorted(enough):
        drawing = [f for f in kept if valid[f][position[cp]]]
        order = _face_order(faces, drawing, np.random.default_rng([SEED, domain_id, cp]))
        chosen = sorted(order[:MAX_PER_CLASS])
        instances[cp] = [(f, images[f][position[cp]]) for f in chosen]
    used = sorted({f for items in instances.values() for f, _ in items})
    return DomainResult(codepoints=sorted(enough), faces=used, instances=instances, notes=notes)


def split_classes(domain: str, codepoints: Sequence[int]) -> dict[str, list[int]]:
    """The protocol's class split: seeded 70/15/15 for seen domains, all-test for unseen."""
    codepoints = sorted(codepoints)
    if domain in UNSEEN_DOMAINS:
        return {"train": [], "valid": [], "test": codepoints}
    rng = np.random.default_rng([SEED, DOMAINS.index(domain), 2])
    shuffled = [codepoints[i] for i in rng.permutation(len(codepoints))]
    n_train = round(SPLIT_FRACTIONS[0] * len(shuffled))
    n_valid = round(SPLIT_FRACTIONS[1] * len(shuffled))
    return {
        "train": sorted(shuffled[:n_train]),
        "valid": sorted(shuffled[n_train : n_train + n_valid]),
        "test": sorted(shuffled[n_train + n_valid :]),
    }


def build(font_dirs: Sequence[str] = FONT_DIRS, *, jobs: int = 1, log=print):
    """Renders the whole benchmark. Returns ``(arrays, card)`` for :func:`write`."""
    import fontTools
    import PIL
    from PIL import features

    start = time.time()
    faces = discover_faces(font_dirs, jobs=jobs)
    log(f"{len(faces)} faces in {len(_font_files(font_dirs))} files ({time.time() - start:.0f} s)")
    results: dict[str, DomainResult] = {}
    dropped_domains = {}
    for domain in DOMAINS:
        t = time.time()
        result = build_domain(domain, faces, jobs=jobs, log=log)
        if result is None:
            dropped_domains[domain] = f"fewer than {MIN_FACES} distinct faces"
            continue
        results[domain] = result
        n = sum(len(v) for v in result.instances.values())
        log(
            f"  {domain}: {len(result.codepoints)} classes, {n} images, "
            f"{len(result.faces)} faces ({time.time() - t:.0f} s)"
        )
        for note in result.notes:
            log(f"    {note}")

    # Global face table: only faces that supplied images, sorted for stable ids.
    used = sorted(
        {f for r in results.values() for f in r.faces},
        key=lambda i: (faces[i].path, faces[i].index),
    )
    face_id = {f: k for k, f in enumerate(used)}
    owners = debian_packages()
    packages = [owners.get(faces[f].path, "unknown") for f in used]
    versions = debian_versions(p for p in packages if p != "unknown")
    face_table = []
    for k, f in enumerate(used):
        face, package = faces[f], packages[k]
        face_table.append(
            {
                "id": k,
                "file": os.path.basename(face.path),
                "index": face.index,
                "family": face.family,
                "style": face.style,
                "package": package,
                "package_version": versions.get(package, "unknown"),
                "license": debian_licence(package, os.path.basename(face.path))
                if package != "unknown"
                else "unknown",
            }
        )

    images, domain_ids, codepoints, face_ids = [], [], [], []
    domains_card = {}
    for domain, result in results.items():
        splits = split_classes(domain, result.codepoints)
        for cp in result.codepoints:
            for f, image in result.instances[cp]:
                images.append(image)
                domain_ids.append(DOMAINS.index(domain))
                codepoints.append(cp)
                face_ids.append(face_id[f])
        per_class = {cp: len(result.instances[cp]) for cp in result.codepoints}
        domains_card[domain] = {
            "role": "seen" if domain in SEEN_DOMAINS else "unseen",
            "num_classes": {s: len(splits[s]) for s in SPLITS},
            "num_images": {s: sum(per_class[cp] for cp in splits[s]) for s in SPLITS},
            "instances_per_class": {
                "min": min(per_class.values()),
                "max": max(per_class.values()),
            },
            "faces": sorted(face_id[f] for f in result.faces),
            "classes": {s: [class_name(cp) for cp in splits[s]] for s in SPLITS},
            "notes": result.notes,
        }
    arrays = {
        "images": np.stack(images).astype(np.uint8),
        "domain": np.asarray(domain_ids, np.int8),
        "codepoint": np.asarray(codepoints, np.int32),
        "face": np.asarray(face_ids, np.int16),
    }
    card = {
        "name": "glyphs",
        "version": VERSION,
        "file": NPZ_NAME,
        "sha256": content_sha256(arrays),
        "image_shape": [IMAGE_SIZE, IMAGE_SIZE, 1],
        "num_images": len(images),
        "description": (
            "Few-shot benchmark of type designs: class = Unicode character, instance = the "
            "character rendered by one font face, domain = script. Ink 255 on 0, uint8."
        ),
        "arrays": {
            "images": "uint8 [N, 28, 28]",
            "domain": "int8 [N], index into domain_order",
            "codepoint": "int32 [N], the class (Unicode code point)",
            "face": "int16 [N], index into faces",
        },
        "domain_order": list(DOMAINS),
        "protocol": {
            "seen": [d for d in SEEN_DOMAINS if d in results],
            "unseen": [d for d in UNSEEN_DOMAINS if d in results],
            "split_fractions": list(SPLIT_FRACTIONS),
            "dropped_domains": dropped_domains,
        },
        "render": {
            "seed": SEED,
            "render_px": RENDER_PX,
            "margin": MARGIN,
            "min_faces": MIN_FACES,
            "max_per_class": MAX_PER_CLASS,
            "dedup_mad": DEDUP_MAD,
            "sampled_classes": SAMPLED_CLASSES,
            "font_dirs": list(font_dirs),
            "pillow": PIL.__version__,
            "freetype": features.version("freetype2"),
            "fonttools": fontTools.version,
            "numpy": np.__version__,
        },
        "domains": domains_card,
        "faces": face_table,
    }
    log(f"rendered {len(images)} images in {time.time() - start:.0f} s")
    return arrays, card


def write(out_dir, arrays: Mapping[str, np.ndarray], card: dict) -> None:
    """Writes the npz (byte-for-byte reproducible: fixed zip timestamps) and the data card."""
    os.makedirs(out_dir, exist_ok=True)
    npz_path = os.path.join(out_dir, NPZ_NAME)
    with zipfile.ZipFile(npz_path, "w") as archive:
        for name in sorted(arrays):
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(arrays[name]))
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, buffer.getvalue(), compresslevel=9)
    card = dict(card, npz_sha256=file_sha256(npz_path), npz_bytes=os.path.getsize(npz_path))
    with open(os.path.join(out_dir, CARD_NAME), "w", encoding="utf-8") as f:
        json.dump(card, f, indent=1, ensure_ascii=False)
        f.write("\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (npz + data card)")
    parser.add_argument(
        "--font_dir", action="append", help=f"font directory (repeatable; default {FONT_DIRS})"
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    try:
        import fontTools  # noqa: F401
        import PIL  # noqa: F401
    except ImportError as e:
        raise SystemExit(
            f"rendering Glyphs needs the 'render' extra ({e.name} is missing): "
            "pip install -e .[render]"
        ) from e
    # fontTools warns about every slightly malformed table of ~1300 fonts; the cmaps are fine.
    logging.getLogger("fontTools").setLevel(logging.ERROR)
    font_dirs = args.font_dir or list(FONT_DIRS)
    missing = [d for d in font_dirs if not os.path.isdir(d)]
    if missing:
        raise SystemExit(f"--font_dir {missing} does not exist")
    arrays, card = build(font_dirs, jobs=args.jobs)
    write(args.out, arrays, card)
    size = os.path.getsize(os.path.join(args.out, NPZ_NAME))
    print(f"wrote {args.out}/{NPZ_NAME} ({size / 2**20:.1f} MiB) and {CARD_NAME}")


if __name__ == "__main__":
    main()
