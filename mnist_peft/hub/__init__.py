"""The Hugging Face Hub: push registry entries (``push``: bundles, per-adapter repos, tags) and pull
them (``pull``); the repo layout and the remote index they share live in ``common``."""

from __future__ import annotations

from .common import PullResult, PushResult, head_commit
from .pull import pull_from_hub
from .push import adapter_repo_id, push_adapters_to_hub, push_to_hub

__all__ = [
    "PullResult",
    "PushResult",
    "adapter_repo_id",
    "head_commit",
    "pull_from_hub",
    "push_adapters_to_hub",
    "push_to_hub",
]
