"""The page's tabs, one module each: what a tab implements (``base``: :class:`Tab`, :class:`Page`),
``draw`` (sketchpad and adapter pickers), ``test_images`` (the base's mistakes and which adapters fix
them) and ``registry`` (entries, verify status, the adapter x digit heat map of the change against the base).
"""

from __future__ import annotations

from .base import Page, Tab
from .draw import DrawTab
from .registry import RegistryTab
from .test_images import TestImagesTab

__all__ = ["DrawTab", "Page", "RegistryTab", "Tab", "TestImagesTab"]
