"""Reading a YAML file that may be hostile: aliases that expand without end, or nest forever.

YAML aliases let a few lines stand for billions of values ("billion laughs"),
and an alias may refer to the very list it is in (``a: &a [*a]``). The file is
composed into nodes first (aliases shared, nothing expanded), checked, and only
then turned into Python values, so such a file costs milliseconds and one clear
line instead of minutes or a traceback.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

#: Values a config may hold once every alias is expanded; a real one holds hundreds.
MAX_VALUES = 100_000
#: Brackets (``[``, ``{``) open at once. PyYAML's scanner slows down with the square
#: of their number, and its composer recurses once per level.
MAX_BRACKETS = 200
_BRACKET = re.compile(r"[\[\]{}]")


class TooNested(ValueError):
    """The YAML expands or nests beyond reason; the message says how."""


def load(text: str) -> Any:
    """``yaml.safe_load(text)``, refusing alias bombs, recursive aliases and deep nesting."""
    if _most_open_brackets(text) > MAX_BRACKETS:
        raise TooNested(f"the file nests too deep (more than {MAX_BRACKETS} brackets open at once)")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        check_aliases(node)
        return loader.construct_document(node)
    except RecursionError:
        raise TooNested("the file nests too deep (lists or mappings inside each other)") from None
    finally:
        loader.dispose()


def _most_open_brackets(text: str) -> int:
    """The most brackets open at once, quotes ignored: an upper bound that is cheap."""
    depth = most = 0
    for bracket in _BRACKET.findall(text):
        depth = depth + 1 if bracket in "[{" else max(0, depth - 1)
        most = max(most, depth)
    return most


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def check_aliases(root: yaml.Node) -> None:
    """Raise :class:`TooNested` if an alias refers to a value that holds it, or if the
    document, every alias expanded, would hold more than MAX_VALUES values.

    One walk over the distinct nodes (an alias is a shared node), iterative so that
    no nesting depth can exhaust the stack.
    """
    sizes: dict[int, int] = {}  # expanded size of each node done
    open_nodes: set[int] = set()  # the node being walked and its ancestors
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            open_nodes.discard(key)
            size = 1 + sum(sizes[id(child)] for child in _children(node))
            if size > MAX_VALUES:
                raise TooNested(
                    f"aliases nest too deep: expanded, the file would hold more than "
                    f"{MAX_VALUES:,} values (a 'billion laughs' file?)"
                )
            sizes[key] = size
            continue
        if key in sizes:
            continue
        open_nodes.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in open_nodes:
                line = child.start_mark.line + 1
                raise TooNested(
                    f"aliases nest too deep: the value at line {line} contains an alias "
                    "to itself (a recursive alias)"
                )
            if id(child) not in sizes:
                stack.append((child, False))
