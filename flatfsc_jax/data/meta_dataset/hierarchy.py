"""ImageNet's class hierarchy as Meta-Dataset samples it, in the episodic split format.

Meta-Dataset (MD) draws an ImageNet episode from a node of a per-split WordNet DAG: a
node spanning 5..392 of the split's classes, all of them (subsampled to 50). Which nodes
exist matters: MD's *sampling graph* is not the raw WordNet ``is_a`` relation.
``imagenet_specification.create_sampling_graph`` keeps the classes and their ancestors,
drops every node with a single child (its child moves up to its parents), and, for the
valid and test splits, keeps only ancestors at or below the split's root (carnivore
n02075296, device n03183080). Every single-child node would otherwise repeat its child's
episode, and every ancestor above a root would be a node spanning the whole split.

Two inputs give that graph:

* MD's ``ilsvrc_2012_dataset_spec.json`` (its ``split_subgraphs``): the graph itself,
  exactly. It ships with this package (``assets/meta_dataset_md/``, Apache-2.0, see the
  LICENSE there) and is ImageNet's default.
* a WordNet ``is_a`` file ("parent child" per line): MD's trimming rules are applied here
  (``md_split_graphs``), once to all classes and then per split, as MD's converter does.

The result is the ``class_hierarchy`` metadata of a split: internal node -> indices of the
split's classes below it (leaves themselves are not listed).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources

from flatfsc_jax.data.meta_dataset.specs import SPLITS, ClassSplits

# MD's split roots (imagenet_specification.create_imagenet_specification).
MD_SPLIT_ROOTS = {"valid": "n02075296", "test": "n03183080"}  # carnivore, device
# MD's eligibility range (sampling.py: min_ways and MAX_SPANNING_LEAVES_ELIGIBLE); the
# episode sampler (EpisodeSpec.min_ways / max_spanning_leaves) applies the same defaults.
MIN_SPANNING_LEAVES = 5
MAX_SPANNING_LEAVES = 392

SPEC_FILE = "ilsvrc_2012_dataset_spec.json"
SPEC_URL = (
    "https://raw.githubusercontent.com/google-research/meta-dataset/main/meta_dataset/"
    "dataset_conversion/dataset_specs/ilsvrc_2012_dataset_spec.json"
)
# The spec's split keys are MD's Split enum names.
_SPEC_SPLITS = {"TRAIN": "train", "VALID": "valid", "TEST": "test"}
# Sources whose valid/test episodes are drawn from a hierarchy in MD.
HIERARCHICAL_SOURCES = ("ilsvrc_2012",)

# node -> children (a child may be listed twice: MD's collapse can attach one child to a
# parent twice, and counts it twice when deciding whether that parent has one child).
Graph = dict[str, list[str]]


def shipped_spec_path():
    """MD's ``ilsvrc_2012_dataset_spec.json`` as shipped with the package."""
    return resources.files("flatfsc_jax.data").joinpath("assets", "meta_dataset_md", SPEC_FILE)


class MissingHierarchyError(ValueError):
    """ImageNet valid/test episodes were asked for without MD's sampling graph."""


def missing_hierarchy_message(source: str, split: str) -> str:
    return (
        f"{source}/{split} has no class hierarchy, so its episodes cannot follow "
        f"Meta-Dataset (which draws a WordNet node spanning {MIN_SPANNING_LEAVES}.."
        f"{MAX_SPANNING_LEAVES} classes, not uniform classes). The hierarchy is MD's "
        f"{SPEC_FILE}: it ships with this package and is used by default when ImageNet "
        "is prepared, so prepare ilsvrc_2012 again with --overwrite (or pass "
        f"--hierarchy_file=<{SPEC_FILE} or a WordNet is_a file>; the spec is at "
        f"{SPEC_URL}). To draw classes uniformly instead, knowingly unlike MD, set "
        "EpisodeSpec.use_hierarchy=False."
    )


# ----------------------------------------------------------------------------------------
# MD's graph rules, on plain dicts
# ----------------------------------------------------------------------------------------


def children_from_edges(edges: Iterable[tuple[str, str]]) -> dict[str, set[str]]:
    """(parent, child) pairs -> node -> set of children (every node listed)."""
    children: dict[str, set[str]] = {}
    for parent, child in edges:
        children.setdefault(parent, set()).add(child)
        children.setdefault(child, set())
    return children


def _parents(children: Mapping[str, Iterable[str]]) -> dict[str, set[str]]:
    parents: dict[str, set[str]] = {n: set() for n in children}
    for node, kids in children.items():
        for child in kids:
            parents.setdefault(child, set()).add(node)
    return parents


def _reachable(start: Iterable[str], step: Mapping[str, Iterable[str]]) -> set[str]:
    """Nodes reachable from ``start`` in one or more steps (``start`` itself excluded
    unless it is reached again, which a DAG never does)."""
    out: set[str] = set()
    stack = [n for s in start for n in step.get(s, ())]
    while stack:
        node = stack.pop()
        if node not in out:
            out.add(node)
            stack.extend(step.get(node, ()))
    return out


def collapse(children: Mapping[str, Sequence[str]]) -> Graph:
    """MD's ``collapse``: remove every node with exactly one child, attaching that child
    to the node's parents, until no such node is left.

    Removing a node replaces it by its child in each parent's list, so no other node's
    child count changes: the removed nodes are exactly those with one child at the start,
    and one pass of chain-following suffices. Counts keep multiplicity as in MD, whose
    lists can hold a child twice (a parent of both ``n`` and ``n``'s only child).
    """
    single = {n for n, kids in children.items() if len(kids) == 1}

    def resolve(node: str) -> str:
        while node in single:
            node = children[node][0]
        return node

    return {n: [resolve(c) for c in kids] for n, kids in children.items() if n not in single}


def sampling_graph(
    children: Mapping[str, Iterable[str]], leaves: Iterable[str], root: str | None = None
) -> Graph:
    """MD's ``create_sampling_graph``: ``leaves`` and their ancestors, optionally only the
    ancestors at or below ``root``, isolated from the rest, then collapsed.

    ``children`` is a DAG without repeated children (a WordNet relation, or a graph that
    MD copied, which de-duplicates).
    """
    leaves = set(leaves)
    missing = sorted(leaves - set(children))
    if missing:
        raise ValueError(
            f"{len(missing)} classes are not in the hierarchy, e.g. {missing[:5]}; is it the "
            "WordNet hierarchy of these classes?"
        )
    nodes = _reachable(leaves, _parents(children))
    if root is not None:
        if root not in children:
            raise ValueError(f"the split root {root!r} is not in the hierarchy")
        nodes &= _reachable([root], children) | {root}
    nodes |= leaves
    isolated = {n: sorted(set(children[n]) & nodes) for n in nodes}
    return collapse(isolated)


def md_split_graphs(
    edges: Iterable[tuple[str, str]],
    split_classes: Mapping[str, Sequence[str]],
    split_roots: Mapping[str, str] | None = None,
) -> dict[str, Graph]:
    """MD's per-split sampling graphs from a WordNet ``is_a`` relation.

    As ``create_imagenet_specification``: one sampling graph of all classes; then, on a
    (de-duplicating) copy of it, one per split, the valid/test ones restricted to their
    roots (``split_roots``: split -> WordNet id; none for train).
    """
    full = sampling_graph(
        children_from_edges(edges), [c for s in SPLITS for c in split_classes.get(s, ())]
    )
    copied = {n: set(kids) for n, kids in full.items()}
    roots = dict(split_roots or {})
    return {
        s: sampling_graph(copied, split_classes[s], roots.get(s))
        for s in SPLITS
        if split_classes.get(s)
    }


def spec_split_graphs(spec: Mapping) -> dict[str, Graph]:
    """The per-split graphs stored in MD's ``ilsvrc_2012_dataset_spec.json``."""
    if "split_subgraphs" not in spec:
        raise ValueError("a Meta-Dataset hierarchical spec needs 'split_subgraphs'")
    graphs = {}
    for key, nodes in spec["split_subgraphs"].items():
        split = _SPEC_SPLITS.get(key, key.lower())
        graphs[split] = {n["wn_id"]: list(n["children_ids"]) for n in nodes}
        for n in nodes:
            for child in n["children_ids"]:
                graphs[split].setdefault(child, [])
    return graphs


def class_hierarchy_from_graph(graph: Mapping[str, Sequence[str]], class_names: Sequence[str]):
    """Internal node -> sorted indices (into ``class_names``) of the classes it spans.

    As MD's sampler with a filtered class set: leaves that are not among ``class_names``
    are ignored, and nodes spanning none of them are left out. Every class must be a leaf
    of the graph.
    """
    leaves = {n for n, kids in graph.items() if not kids}
    not_leaves = [c for c in class_names if c not in leaves]
    if not_leaves:
        raise ValueError(
            f"{len(not_leaves)} of {len(class_names)} classes are not leaves of the "
            f"hierarchy, e.g. {not_leaves[:5]}; is it the hierarchy of this split?"
        )
    index = {c: i for i, c in enumerate(class_names)}
    out = {}
    for node in sorted(n for n, kids in graph.items() if kids):
        spanned = sorted(index[n] for n in _reachable([node], graph) if n in index)
        if spanned:
            out[node] = spanned
    return out


def eligible_nodes(
    class_hierarchy: Mapping[str, Sequence[int]],
    min_leaves: int = MIN_SPANNING_LEAVES,
    max_leaves: int = MAX_SPANNING_LEAVES,
) -> list[str]:
    """The nodes an MD episode may be drawn from: spanning min..max classes."""
    return sorted(n for n, idx in class_hierarchy.items() if min_leaves <= len(idx) <= max_leaves)


# ----------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------


def class_hierarchy_from_edges(
    edges: Iterable[tuple[str, str]], class_names: Sequence[str]
) -> dict[str, list[int]]:
    """node -> sorted indices of the classes below it, for every ancestor of a class.

    The raw relation, without MD's trimming (``md_split_graphs`` applies it): kept for
    hierarchies of other sources, where no MD rule exists.
    """
    children = children_from_edges(edges)
    parents = _parents(children)
    uncovered = [c for c in class_names if not parents.get(c)]
    if uncovered:
        raise ValueError(
            f"the hierarchy has no parent for {len(uncovered)} of {len(class_names)} "
            f"classes, e.g. {uncovered[:5]}; is it the WordNet hierarchy of these classes?"
        )
    classes = set(class_names)
    below: dict[str, set[int]] = {}
    for index, name in enumerate(class_names):
        for node in _reachable([name], parents) - classes:
            below.setdefault(node, set()).add(index)
    return {node: sorted(below[node]) for node in sorted(below)}


def _read(path) -> str:
    if isinstance(path, str | os.PathLike):
        with open(os.path.expanduser(os.fspath(path)), encoding="utf-8") as f:
            return f.read()
    return path.read_text(encoding="utf-8")  # an importlib Traversable


def _parse_is_a(text: str, path) -> list[tuple[str, str]]:
    edges = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 2:
            raise ValueError(f"{path}:{number}: expected 'parent child', got {line!r}")
        edges.append((fields[0], fields[1]))
    return edges


def read_hierarchy_edges(path) -> list[tuple[str, str]]:
    """(parent, child) edges from ImageNet's ``wordnet.is_a.txt`` ("parent child" per line)
    or from Meta-Dataset's ``ilsvrc_2012_dataset_spec.json`` (its ``split_subgraphs``)."""
    text = _read(path)
    if text.lstrip().startswith("{"):
        graphs = spec_split_graphs(json.loads(text))
        return [(n, c) for g in graphs.values() for n, kids in g.items() for c in kids]
    return _parse_is_a(text, path)


def split_graphs_from_file(path, class_splits: ClassSplits, split_roots=None) -> dict[str, Graph]:
    """Per-split sampling graphs from MD's spec (as stored) or an ``is_a`` file (MD's
    rules applied; ``split_roots`` default to MD's for ImageNet, none otherwise)."""
    text = _read(path)
    if text.lstrip().startswith("{"):
        try:
            return spec_split_graphs(json.loads(text))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
    if split_roots is None:
        split_roots = MD_SPLIT_ROOTS if class_splits.source in HIERARCHICAL_SOURCES else {}
    classes = {s: class_splits.classes[s] for s in class_splits.splits_with_classes()}
    return md_split_graphs(_parse_is_a(text, path), classes, split_roots)


def load_class_hierarchy(
    path, class_splits: ClassSplits, split_roots: Mapping[str, str] | None = None
) -> dict[str, dict[str, list[int]]]:
    """split -> node -> class indices, the ``class_hierarchy`` metadata of the format."""
    graphs = split_graphs_from_file(path, class_splits, split_roots)
    out = {}
    for split in class_splits.splits_with_classes():
        if split not in graphs:
            raise ValueError(f"{path}: no {split!r} graph in the hierarchy")
        out[split] = class_hierarchy_from_graph(graphs[split], class_splits.classes[split])
    return out


def class_hierarchy_for(
    source: str, class_splits: ClassSplits, hierarchy_file=None
) -> dict[str, dict[str, list[int]]] | None:
    """The hierarchy a source is prepared with: ``hierarchy_file`` if given; for ImageNet
    otherwise MD's shipped spec; None for sources MD samples without one."""
    if hierarchy_file is not None:
        return load_class_hierarchy(hierarchy_file, class_splits)
    if source in HIERARCHICAL_SOURCES:
        return load_class_hierarchy(shipped_spec_path(), class_splits)
    return None


def hierarchy_origin(source: str, hierarchy_file=None) -> str | None:
    """What ``class_hierarchy_for`` reads, for the provenance record."""
    if hierarchy_file is not None:
        return os.fspath(hierarchy_file)
    return f"{SPEC_FILE} (shipped)" if source in HIERARCHICAL_SOURCES else None


def require_hierarchy(source: str, split: str, class_hierarchy) -> None:
    """Stops when MD would draw ``source/split`` episodes from a hierarchy that is absent.

    ``source`` may carry the benchmark prefix ("meta_dataset/ilsvrc_2012").
    """
    name = source.rsplit("/", 1)[-1]
    if name in HIERARCHICAL_SOURCES and split in ("valid", "test") and class_hierarchy is None:
        raise MissingHierarchyError(missing_hierarchy_message(source, split))
