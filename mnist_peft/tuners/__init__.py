"""Adapter types. ``base`` says what any adapter type implements; ``lora/`` is the native LoRA."""

from __future__ import annotations

from .base import AdapterConfig, AdapterLayer

__all__ = ["AdapterConfig", "AdapterLayer"]
