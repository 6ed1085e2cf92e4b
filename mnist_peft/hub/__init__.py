"""The Hugging Face Hub: push and pull registry entries (bundles, per-adapter repos, tags)."""

from __future__ import annotations

from .transfer import pull_from_hub, push_adapters_to_hub, push_to_hub

__all__ = [
    "pull_from_hub",
    "push_adapters_to_hub",
    "push_to_hub",
]
