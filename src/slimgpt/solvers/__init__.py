"""OBS solvers: pure tensor functions on ``(W, H)``, no model knowledge, no I/O.

* :mod:`.hessian` — accumulate ``H = 2 X Xᵀ / n`` and invert it with damping and retry; the
  cross-covariance ``G`` of asymmetric compensation beside it.
* :mod:`.obs` — structured OBS: column errors, joint removal with compensation (paper Eq. 2–4),
  and the target ``W* = W + G H⁻¹`` those removals start from when compensating toward the dense model.
* :mod:`.heads` — Batched Greedy Pruning of attention heads with grouped Cholesky (Eq. 5), GQA-aware.
* :mod:`.channels` — FFN channels with Dynamic Group Size.
"""
