"""The adapter registry: names and references, entries, reads and verify, writes, named stacks
(``stacks``: entries of kind ``stack``), and the index stores.

``AdapterRegistry(root, store=...)`` takes any :class:`IndexStore`; by default the index is
``index.db`` in ``root``. (Reference resolution is in ``refs``, imported from its module; it imports torch only to load a base.)
"""

from __future__ import annotations

from .adapter_registry import AdapterRegistry
from .entry import RegistryEntry, entry_from_dict
from .names import confine, default_root, parse_ref, validate_name
from .stacks import STACK_FILE, StackMember, read_stack_members
from .stores.base import IndexMovedError, IndexStore
from .stores.folder import FolderIndex
from .stores.json import JsonIndex
from .stores.sqlite import SqliteIndex

__all__ = [
    "AdapterRegistry",
    "FolderIndex",
    "IndexMovedError",
    "IndexStore",
    "JsonIndex",
    "RegistryEntry",
    "STACK_FILE",
    "SqliteIndex",
    "StackMember",
    "confine",
    "default_root",
    "entry_from_dict",
    "parse_ref",
    "read_stack_members",
    "validate_name",
]
