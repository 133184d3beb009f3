"""Searched allocation (ALGORITHMS.md §9): let the calibration loss choose every layer's heads,
channels and whole blocks under the exact parameter budget.

* :mod:`.levels` — units (one attention or FFN block each), their ladders of levels, the budget
  lattice, EvoPress-style level-switch mutations that keep the budget, and the channel fix-up.
* :mod:`.database` — every (unit, level) variant pruned once with SlimGPT's OBS solvers from the
  dense model's inputs, kept as kept indices + compensated output weights (memory-mapped on disk).
* :mod:`.fitness` — KL divergence from the dense model on calibration windows, candidates evaluated
  by swapping stored variants into one model (prefix shared with the parent reused).
* :mod:`.evolution` — the (1+λ) search with multi-step selection, seeded, journalled, time-budgeted.

:class:`slimgpt.methods.searched.SearchedSlimGPT` (``--schedule search``) ties them together.
"""
