"""The optional ImageNet class hierarchy (WordNet) of the episodic split format.

Meta-Dataset samples ImageNet episodes from the WordNet DAG: this reads the is-a edges
(ImageNet's ``wordnet.is_a.txt`` or Meta-Dataset's ``ilsvrc_2012_dataset_spec.json``) and
turns them into the ``class_hierarchy`` metadata (node -> class indices) of a split.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

from flatfsc_jax.data.meta_dataset.specs import ClassSplits


def class_hierarchy_from_edges(
    edges: Iterable[tuple[str, str]], class_names: Sequence[str]
) -> dict[str, list[int]]:
    """node -> sorted indices of the classes below it, for every ancestor of a class.

    ``edges`` are (parent, child) pairs of a DAG (WordNet's is-a relation; a node may
    have several parents). Class nodes themselves are not listed.
    """
    parents: dict[str, set[str]] = {}
    for parent, child in edges:
        parents.setdefault(child, set()).add(parent)
    uncovered = [c for c in class_names if c not in parents]
    if uncovered:
        raise ValueError(
            f"the hierarchy has no parent for {len(uncovered)} of {len(class_names)} "
            f"classes, e.g. {uncovered[:5]}; is it the WordNet hierarchy of these classes?"
        )
    classes = set(class_names)
    below: dict[str, set[int]] = {}
    for index, name in enumerate(class_names):
        stack, visited = [name], {name}
        while stack:
            for parent in parents.get(stack.pop(), ()):
                if parent not in visited:
                    visited.add(parent)
                    stack.append(parent)
                    if parent not in classes:
                        below.setdefault(parent, set()).add(index)
    return {node: sorted(below[node]) for node in sorted(below)}


def read_hierarchy_edges(path: str) -> list[tuple[str, str]]:
    """(parent, child) edges from ImageNet's ``wordnet.is_a.txt`` ("parent child" per line)
    or from Meta-Dataset's ``ilsvrc_2012_dataset_spec.json`` (its ``split_subgraphs``)."""
    with open(os.path.expanduser(path), encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("{"):
        spec = json.loads(text)
        if "split_subgraphs" not in spec:
            raise ValueError(f"{path}: a JSON hierarchy must have 'split_subgraphs'")
        return [
            (node["wn_id"], child)
            for nodes in spec["split_subgraphs"].values()
            for node in nodes
            for child in node["children_ids"]
        ]
    edges = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 2:
            raise ValueError(f"{path}:{number}: expected 'parent child', got {line!r}")
        edges.append((fields[0], fields[1]))
    return edges


def load_class_hierarchy(path: str, class_splits: ClassSplits) -> dict[str, dict[str, list[int]]]:
    """split -> node -> class indices, the ``class_hierarchy`` metadata of the format."""
    edges = read_hierarchy_edges(path)
    return {
        s: class_hierarchy_from_edges(edges, class_splits.classes[s])
        for s in class_splits.splits_with_classes()
    }
