"""The main job and its studies: demo, bench, merge study, svd sweep, headroom, plots."""
