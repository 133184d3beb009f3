"""Hessian of the layer-wise objective and its damped inverse (ALGORITHMS.md §1)."""

from __future__ import annotations

import logging

import torch

from slimgpt.errors import NumericalError

log = logging.getLogger(__name__)


class HessianAccumulator:
    """Running ``H = 2 X Xᵀ / n`` over calibration tokens.

    Accumulates the raw sum ``Σ x xᵀ`` in ``dtype`` (fp32 by default, fp64 for tests) and
    scales once at the end, so the result does not depend on how tokens were batched.

    With ``sum_dtype`` (float64), each batch's ``x xᵀ`` is still formed in ``dtype`` but added into
    a float64 running sum: the order in which batches are added (one process, or several that sum
    their shares and then all-reduce) then moves the sum by float64 ulps only, and the result,
    rounded to ``dtype``, is the same whatever the split (up to an fp64 sum landing on an fp32
    rounding boundary). Measured on SmolLM2: fp32 running sums, split over 2 processes, flipped a
    kept FFN channel in layer 7.
    """

    def __init__(self, ncols: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 sum_dtype: torch.dtype | None = None):
        self.dtype = dtype
        self.sum = torch.zeros(ncols, ncols, device=device, dtype=sum_dtype or dtype)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """Add inputs ``x`` of shape ``(..., ncols)``; every leading index is one token."""
        x = x.reshape(-1, x.shape[-1]).to(device=self.sum.device, dtype=self.dtype)
        if not torch.isfinite(x).all():
            raise NumericalError(
                "calibration activations contain NaN/inf; try --dtype float32 or different calibration text"
            )
        if self.sum.dtype == self.dtype:
            self.sum.addmm_(x.T, x)
        else:
            self.sum += x.T @ x  # the product in dtype, the running sum in sum_dtype
        self.count += x.shape[0]

    def finalize(self) -> torch.Tensor:
        if self.count == 0:
            raise NumericalError("no calibration tokens reached this layer; check the calibration data")
        return (self.sum * (2.0 / self.count)).to(self.dtype)


def dead_columns(H: torch.Tensor) -> torch.Tensor:
    """Columns whose input was zero on every calibration token (zero diagonal of ``H``)."""
    return torch.diagonal(H) == 0


def damped_inverse(
    H: torch.Tensor,
    damp: float = 0.01,
    max_tries: int = 5,
    where: str = "",
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, float]:
    """``(H + λ·mean(diag H)·I)⁻¹`` via Cholesky, retrying with ``λ ×10`` when it fails.

    Dead columns (zero diagonal: inputs that are always zero) get diagonal 1 so they do not make
    ``H`` singular; pass :func:`dead_columns` to the solvers, which zero their weights so that
    removing them costs exactly 0 (as GPTQ does). Returns the inverse and the ``λ`` that worked.
    Raises :class:`NumericalError` naming ``where`` if no damping up to ``λ·10^(tries-1)`` works.
    """
    H = H.to(dtype or H.dtype).clone()
    if not torch.isfinite(H).all():
        raise NumericalError(f"Hessian{' of ' + where if where else ''} contains NaN/inf; check calibration data")
    diag = torch.diagonal(H)
    dead = diag == 0
    diag[dead] = 1.0
    mean = diag.mean().item()
    lam, applied = damp, 0.0
    # Damping is added to the diagonal in place (no second n×n copy): at n = 8960 (Qwen2.5-1.5B's
    # FFN) every extra float32 matrix is 320 MB of peak memory.
    for attempt in range(max_tries):
        diag += (lam - applied) * mean
        applied = lam
        L, info = torch.linalg.cholesky_ex(H)
        if info.item() == 0:
            del H
            eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
            # cholesky_solve against I is 3-5x faster than cholesky_inverse on CPU (measured)
            inv = torch.cholesky_solve(eye, L)
            del eye, L
            inv = (inv + inv.T) / 2
            if torch.isfinite(inv).all():
                if attempt:
                    log.warning("Hessian%s needed damping %.3g to factor", f" of {where}" if where else "", lam)
                return inv, lam
            raise NumericalError(
                f"Hessian{' of ' + where if where else ''} has a non-finite inverse; use more calibration "
                "samples or a larger --damp"
            )
        del L
        lam = max(lam * 10, 1e-4)
    raise NumericalError(
        f"Hessian{' of ' + where if where else ''} would not factor even with damping {lam / 10:.3g}; "
        "use more calibration samples or a larger --damp"
    )
