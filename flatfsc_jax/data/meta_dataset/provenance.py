"""Where a prepared split came from and how its pixels were made, as split metadata.

``provenance`` builds the dict a prepared source stores under ``metadata["provenance"]``
(the same for each of its splits); ``format_provenance`` is its one-line form for
reports. Results are only comparable with MD's when these match, so they travel with
the data rather than with the command line that made it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flatfsc_jax.data.meta_dataset.convert import MD_JPEG_SOURCES, RESIZE_RULES, resize_rule
from flatfsc_jax.data.meta_dataset.specs import (
    MD_DATASRC_DIRS,
    SOURCES,
    check_source,
    imagenet_duplicates,
    missing_duplicates_message,
)

ORIGINS = ("catalogue", "archive", "md_datasrc", "records")


def provenance(
    source: str,
    origin: str,
    *,
    location: str | None = None,
    resize: str | None = None,
    md_jpeg: bool = False,
    hierarchy: str | None = None,
    md_duplicates_dir: str | None = None,
) -> dict[str, Any]:
    """The provenance record of one prepared source.

    Args:
      source: Meta-Dataset source name.
      origin: "catalogue" (TFDS), "archive" (``--source_dirs``), "md_datasrc" (MD's
        conversion-guide tree) or "records" (MD's converted TFRecords).
      location: the directory read (archive, md_datasrc, records); for the catalogue the
        TFDS name is filled in.
      resize: the resize rule used (default: the source's ``resize_rule``).
      md_jpeg: whether MD's JPEG re-encoding was reproduced.
      hierarchy: the hierarchy file the class hierarchy came from, if any.
      md_duplicates_dir: ImageNet not from records: the folder MD's three duplicate lists
        were read from (records were de-duplicated by MD's converter already).
    """
    source = check_source(source)
    if origin not in ORIGINS:
        raise ValueError(f"origin={origin!r} is unknown; choose one of {ORIGINS}")
    resize = resize_rule(source) if resize is None else resize
    if resize not in RESIZE_RULES:
        raise ValueError(f"resize={resize!r} is unknown; choose one of {RESIZE_RULES}")
    cat = SOURCES[source].catalogue
    if origin == "catalogue":
        if cat is None:
            raise ValueError(f"{source} is not in the TFDS catalogue")
        location = cat.name
    elif not location:
        raise ValueError(f"origin={origin!r} needs the directory it read as location=")
    deviations = []
    if origin == "catalogue" and cat.deviation:
        deviations.append(cat.deviation)
    if resize != resize_rule(source):
        deviations.append(f"resized with {resize}, not {resize_rule(source)} as in URL/CNAPs")
    jpeg_applies = source in MD_JPEG_SOURCES
    if jpeg_applies and not md_jpeg and origin != "records":
        deviations.append("exact pixels, where MD's records hold a JPEG re-encoding")
    record: dict[str, Any] = {
        "source": source,
        "origin": origin,
        "location": location,
        "resize": resize,
        # Records already hold MD's JPEGs; elsewhere only the option reproduces them.
        "md_jpeg": bool(md_jpeg) or origin == "records",
        "md_jpeg_applies": jpeg_applies,
        "deviations": deviations,
    }
    if origin == "md_datasrc":
        record["md_datasrc_dir"] = MD_DATASRC_DIRS[source]
    if source == "ilsvrc_2012":
        if origin == "records":
            record["dedup"] = "by MD's converter (records)"
        else:
            if not md_duplicates_dir:
                raise ValueError(missing_duplicates_message(f"ImageNet from {origin}"))
            lists = imagenet_duplicates(md_duplicates_dir)
            record["dedup"] = md_duplicates_dir
            record["dedup_lists"] = {name: len(files) for name, files in lists.items()}
            record["dedup_files"] = len(frozenset().union(*lists.values()))
        record["hierarchy"] = hierarchy
    return record


def format_provenance(record: Mapping[str, Any]) -> str:
    """One line: ``aircraft: md_datasrc (/d/fgvc-aircraft-2013b), bilinear_aligned, ...``."""
    parts = [f"{record['origin']} ({record['location']})", record["resize"]]
    if record.get("md_jpeg_applies"):
        parts.append("MD JPEG" if record.get("md_jpeg") else "exact pixels (no MD JPEG)")
    if "dedup_files" in record:
        lists = ", ".join(f"{k.split('_')[1]} {v}" for k, v in record["dedup_lists"].items())
        parts.append(f"dedup {record['dedup_files']} files ({lists})")
    elif "dedup" in record:
        parts.append(f"dedup {record['dedup']}")
    if "hierarchy" in record:
        parts.append(f"hierarchy {record['hierarchy'] or 'none'}")
    line = f"{record['source']}: " + ", ".join(parts)
    if record.get("deviations"):
        line += "; differs from MD: " + "; ".join(record["deviations"])
    return line
