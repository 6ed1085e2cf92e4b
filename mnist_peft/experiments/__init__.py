"""The main job and its studies, at the top layer beside ``cli`` and ``app`` (nothing below imports them).

- ``demo`` runs the demo's stages (``demo_stages``) and writes its report and plots (``demo_report``);
- ``bench`` holds the table of figures and the run over it; the figures live in ``bench_adapters`` and
  ``bench_workflows``, what they share (``Figure``, round-robin timing) in ``bench_measure``;
- ``merge_study``, ``svd_sweep``, ``headroom`` (the logit-offset reference) and ``plots``.
"""
