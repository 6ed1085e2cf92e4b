"""Adapter types. ``base`` says what any adapter type implements; ``lora/`` is the native LoRA."""
