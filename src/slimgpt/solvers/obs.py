"""Structured Optimal Brain Surgeon on columns (paper Eq. 2–4, ALGORITHMS.md §2).

Conventions: ``W`` is ``(rows, cols)``; ``Hinv`` is the inverse Hessian of the *remaining*
columns, kept full-size: removed columns have zero rows/columns in ``Hinv`` and zero columns in
``W``. Removing a set ``P`` jointly is exact (equal to removing its columns one by one with the
Eq. 3 update), so every solver here is built on :func:`remove_columns`.
"""

from __future__ import annotations

import torch


def column_errors(W: torch.Tensor, Hinv: torch.Tensor) -> torch.Tensor:
    """Eq. 4's error of removing each column alone: ``||W[:, j]||² / Hinv[j, j]``."""
    return W.pow(2).sum(0) / torch.diagonal(Hinv)


def joint_error(W: torch.Tensor, Hinv: torch.Tensor, cols: torch.Tensor) -> float:
    """``trace(W_P (Hinv_PP)⁻¹ W_Pᵀ)``: the exact increase of ``||WX - ŴX||²`` (per unit of
    ``H = 2XXᵀ/n``) when columns ``P`` are removed together with optimal compensation."""
    WP = W[:, cols]
    L = torch.linalg.cholesky(Hinv[cols][:, cols])
    Z = torch.linalg.solve_triangular(L, WP.T.to(L.dtype), upper=False)  # L⁻¹ W_Pᵀ
    return Z.pow(2).sum().item()


def remove_columns(W: torch.Tensor, Hinv: torch.Tensor, cols: torch.Tensor) -> float:
    """Remove columns ``cols`` of ``W`` in place with optimal compensation and downdate ``Hinv``.

    ``ΔW = -W_P (Hinv_PP)⁻¹ Hinv_P,:`` and ``Hinv ← Hinv - Hinv_:,P (Hinv_PP)⁻¹ Hinv_P,:``
    (the Schur complement, i.e. Eq. 3 applied to all of ``P``). Both are written through
    ``V = Hinv_:,P L⁻ᵀ`` with ``Hinv_PP = L Lᵀ``, one triangular solve and two GEMMs.
    Returns the joint error ``||W_P L⁻ᵀ||²`` (see :func:`joint_error`).
    """
    if cols.numel() == 0:
        return 0.0
    L = torch.linalg.cholesky(Hinv[cols][:, cols])
    V = torch.linalg.solve_triangular(L, Hinv[cols], upper=False).T  # (cols_total, k) = Hinv_:,P L⁻ᵀ
    A = torch.linalg.solve_triangular(L, W[:, cols].T.to(L.dtype), upper=False).T  # (rows, k) = W_P L⁻ᵀ
    W.addmm_(A.to(W.dtype), V.T.to(W.dtype), alpha=-1)
    Hinv.addmm_(V, V.T, alpha=-1)
    W.index_fill_(1, cols, 0)
    Hinv.index_fill_(0, cols, 0).index_fill_(1, cols, 0)
    return A.pow(2).sum().item()


def remove_columns_sequential(W: torch.Tensor, Hinv: torch.Tensor, cols: list[int]) -> None:
    """Reference path: remove ``cols`` one at a time in the given order with Eq. 4 and Eq. 3.

    Slow (one rank-1 update per column); kept as the independent reference that the joint
    update is tested against, and as a readable statement of the paper's equations.
    """
    for p in cols:
        d = Hinv[p, p]
        row = Hinv[p, :].clone()
        W.sub_(torch.outer(W[:, p] / d, row).to(W.dtype))
        Hinv.sub_(torch.outer(Hinv[:, p], row) / d)
        W[:, p] = 0
        Hinv[p, :] = 0
        Hinv[:, p] = 0


def compensation_target(W: torch.Tensor, G: torch.Tensor, Hinv: torch.Tensor,
                        dead: torch.Tensor | None = None) -> torch.Tensor:
    """The unconstrained optimum ``W* = W + G Hinv`` of the asymmetric objective, to which the
    OBS removals are then applied under the same ``Hinv`` (a new tensor, in ``W``'s dtype).

    With ``X`` the dense model's inputs to this linear, ``X̃`` the pruned model's, the target
    ``T = W X (+ residual drift)`` and ``H = 2X̃X̃ᵀ/n``, ``G = 2(T − W X̃)X̃ᵀ/n``
    (:class:`~slimgpt.solvers.hessian.CrossAccumulator`) and ``Hinv = (H + δI)⁻¹``
    (:func:`~slimgpt.solvers.hessian.damped_inverse`), ``W*`` minimises
    ``2‖W′X̃ − T‖²/n + δ‖W′ − W‖²`` (the damping keeps its meaning: a ridge toward the dense
    weights). That objective equals ``tr((W′ − W*)(H + δI)(W′ − W*)ᵀ)`` plus a constant, so removing
    columns of ``W*`` with OBS under ``Hinv`` is exactly the least-squares refit of the kept columns
    toward ``T``. ``G = 0`` (``X = X̃``) gives ``W* = W`` bit for bit: the symmetric prune.

    Written as the correction ``G Hinv`` added to ``W`` rather than ``W (C + δI) Hinv``: rounding
    errors of the product then scale with the (small) correction, not with ``W``. ``Hinv`` is the
    damped inverse the OBS steps use anyway, so no second factorisation is needed. ``dead``
    columns (always-zero inputs) keep ``W``'s values (their ``G`` columns are zero anyway).
    """
    out = W + (G.to(Hinv.dtype) @ Hinv).to(W.dtype)
    if dead is not None and bool(dead.any()):
        out[:, dead] = W[:, dead]
    return out


def heldout_shrinkage(G_fit: torch.Tensor, Hinv_fit: torch.Tensor, G_held: torch.Tensor, H_held: torch.Tensor) -> float:
    """The share ``α ∈ [0, 1]`` of the asymmetric correction that held-out tokens support.

    The correction ``C = G_fit Hinv_fit`` is fitted on some calibration windows; on the others
    (``H_held``, ``G_held``, accumulated apart) the asymmetric objective of ``W + αC`` is, up to a
    constant, ``α² tr(C H_held Cᵀ) − 2α tr(C G_heldᵀ)`` (expand ``‖αC X̃ − R‖²`` with
    ``R = T − W X̃``), a parabola whose minimum is closed-form. Clipped to ``[0, 1]``: 0 is the
    symmetric solution, 1 the full least-squares refit. Why: with a few thousand calibration tokens
    the refit toward the dense outputs fits noise in ``H``'s low-variance directions (measured on
    SmolLM2: better on the calibration windows, worse on every other text); the held-out windows
    say how much of it generalises. ``C = 0`` gives 1 (nothing to shrink).
    """
    C = G_fit.to(Hinv_fit.dtype) @ Hinv_fit
    H_held = H_held.to(C.dtype)
    den = float(((C @ H_held) * C).sum())
    if not den > 0:
        return 1.0
    num = float((C * G_held.to(C.dtype)).sum())
    return min(1.0, max(0.0, num / den))


def park_dead(W: torch.Tensor, dead: torch.Tensor | None) -> torch.Tensor | None:
    """Zero the columns of ``W`` whose input is always zero (``dead``) and return their weights.

    Such a column adds nothing to ``W X``, so removing it costs exactly 0 and needs no
    compensation; but with its weights left in place Eq. 4 would score it
    ``||W[:, j]||² / Hinv[j, j] > 0`` (the damped diagonal is 1 + λ·mean). GPTQ zeroes them for
    the same reason. Hand the result to :func:`restore_dead` when the solve is done.
    """
    if dead is None or not bool(dead.any()):
        return None
    saved = W[:, dead].clone()
    W[:, dead] = 0
    return saved


def restore_dead(W: torch.Tensor, dead: torch.Tensor | None, saved: torch.Tensor | None,
                 removed: torch.Tensor) -> None:
    """Put back the weights of dead columns that were *kept* (``removed`` is a column mask).

    Their ``Hinv`` rows are zero off the diagonal, so no compensation step touched them: what
    comes back is exactly the original column (the calibration output is the same either way,
    other inputs keep the dense behaviour)."""
    if saved is None or dead is None:
        return
    kept_dead = dead & ~removed.to(dead.device)
    W[:, kept_dead] = saved[:, kept_dead[dead]]
