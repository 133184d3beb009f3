"""Hessian of the layer-wise objective and its damped inverse (ALGORITHMS.md §1)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from slimgpt.errors import NumericalError

log = logging.getLogger(__name__)

# Widths from which the F × F work is done in blocks, in place: the accumulation (upper triangle
# only, half the products), its finalize and the damped inverse hold about one F × F buffer each
# beyond their input instead of three to five (Llama-3.1-8B's FFN, F = 14,336: one float32 copy is
# 0.8 GB, at 70B 3.3 GB). Below it the work is small and runs as before, bit for bit.
LEAN_MIN_COLS = 4096
BLOCK = 1024


def solve_bytes(width: int, dtype: torch.dtype = torch.float32) -> int:
    """Peak bytes of accumulating, inverting and pruning one ``width``-column Hessian (for memory
    plans): the float64 running sum plus a ``dtype`` copy while it is finalized, then ``H``, its
    inverse and a few blocks; below :data:`LEAN_MIN_COLS`, the five copies the unblocked calls make."""
    f2 = width * width
    if width < LEAN_MIN_COLS:
        return f2 * (8 + 5 * dtype.itemsize)
    return f2 * (8 + dtype.itemsize) + 3 * BLOCK * width * 8


@contextmanager
def exact_tf32(on: bool) -> Iterator[None]:
    """Let CUDA matmuls of float32 inputs use TF32 tensor cores for the duration.

    Only for inputs that were float16 or bfloat16 values: their significands (11 and 8 bits) fit
    TF32's exactly, so every product is the float32 one and only the order of the float32 sums
    differs (float noise), at several times fp32 SIMT speed. The old setting is restored.
    """
    if not on:
        yield
        return
    m = torch.backends.cuda.matmul
    try:
        old: object = m.fp32_precision  # torch >= 2.9 (mixing it with allow_tf32 raises)
        new_api = True
    except (AttributeError, RuntimeError):
        old, new_api = m.allow_tf32, False
    if new_api:
        m.fp32_precision = "tf32"
    else:
        m.allow_tf32 = True
    try:
        yield
    finally:
        if new_api:
            m.fp32_precision = old
        else:
            m.allow_tf32 = old


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

    From :data:`LEAN_MIN_COLS` columns (with ``sum_dtype``) only the upper triangle is summed, in
    row blocks: half the products, and no F × F temporaries (a whole ``x xᵀ`` in ``dtype`` and, on
    CPU, its float64 cast were 1.5 F × F float64 on top of the sum); :meth:`finalize` mirrors it.
    The blocks' products equal the whole product's (MKL, measured from 4,096 columns). On CUDA,
    float16/bfloat16 activations are multiplied with TF32 tensor cores (:func:`exact_tf32`).
    """

    def __init__(self, ncols: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 sum_dtype: torch.dtype | None = None, where: str = ""):
        self.dtype, self.where = dtype, where
        self.sum = torch.zeros(ncols, ncols, device=device, dtype=sum_dtype or dtype)
        self.count = 0
        self.upper = self.sum.dtype != dtype and ncols >= LEAN_MIN_COLS

    def add(self, x: torch.Tensor) -> None:
        """Add inputs ``x`` of shape ``(..., ncols)``; every leading index is one token."""
        tf32 = self.sum.device.type == "cuda" and x.dtype in (torch.float16, torch.bfloat16) and self.dtype == torch.float32
        x = x.reshape(-1, x.shape[-1]).to(device=self.sum.device, dtype=self.dtype)
        if not torch.isfinite(x).all():
            raise NumericalError(f"{self.where or 'calibration activations'} contain NaN/inf; try --dtype float32 "
                                 "or different calibration text")
        with exact_tf32(tf32):
            if self.sum.dtype == self.dtype:
                self.sum.addmm_(x.T, x)
            elif not self.upper:
                self.sum += x.T @ x  # the product in dtype, the running sum in sum_dtype
            else:
                n = self.sum.shape[0]
                for i in range(0, n, BLOCK):
                    e = min(i + BLOCK, n)
                    self.sum[i:e, i:] += x[:, i:e].T @ x[:, i:]
        self.count += x.shape[0]

    def finalize(self) -> torch.Tensor:
        """``2 Σ x xᵀ / n`` in ``dtype``, scaled and rounded block by block (no F × F float64 temporary)."""
        if self.count == 0:
            raise NumericalError("no calibration tokens reached this layer; check the calibration data")
        if self.sum.dtype == self.dtype:
            return (self.sum * (2.0 / self.count)).to(self.dtype)
        if self.upper:
            _mirror_upper(self.sum)
        n = self.sum.shape[0]
        out = torch.empty(n, n, dtype=self.dtype, device=self.sum.device)
        for i in range(0, n, BLOCK):
            out[i:i + BLOCK] = (self.sum[i:i + BLOCK] * (2.0 / self.count)).to(self.dtype)
        return out


class CrossAccumulator:
    """Running ``G = 2 Σ r x̃ᵀ / n``: the cross-covariance of a target residual ``r`` (what the
    output of a linear should gain, per token) with the linear's input ``x̃``, for asymmetric
    compensation (:func:`~slimgpt.solvers.obs.compensation_target`).

    Scaled like :class:`HessianAccumulator` (``2/n``), so ``G H⁻¹`` needs no rescaling, and summed
    in ``sum_dtype`` (float64) per batch for the same reason: the sum does not depend on how the
    tokens were batched or split across processes. ``sum``/``count`` are reduced under torchrun as
    the Hessian's are. ``r`` is formed per token from activation differences (``W(x − x̃)``), not as
    ``W C − W H̃`` from two sums: those nearly cancel and would lose every digit in float32, and
    with ``x = x̃`` the difference, hence ``G``, is exactly zero.
    """

    def __init__(self, rows: int, ncols: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 sum_dtype: torch.dtype = torch.float64, where: str = ""):
        self.dtype, self.where = dtype, where
        self.sum = torch.zeros(rows, ncols, device=device, dtype=sum_dtype)
        self.count = 0

    def add(self, r: torch.Tensor, x: torch.Tensor) -> None:
        """Add residuals ``r`` (``(..., rows)``) against inputs ``x`` (``(..., ncols)``), token by token."""
        r = r.reshape(-1, r.shape[-1]).to(device=self.sum.device, dtype=self.dtype)
        x = x.reshape(-1, x.shape[-1]).to(device=self.sum.device, dtype=self.dtype)
        if r.shape[0] != x.shape[0]:
            raise ValueError(f"{r.shape[0]} residual tokens against {x.shape[0]} input tokens")
        if not torch.isfinite(r).all():
            raise NumericalError(f"{self.where or 'the dense activations'} contain NaN/inf; try --dtype float32")
        self.sum += r.T @ x
        self.count += x.shape[0]

    def finalize(self) -> torch.Tensor:
        """``2 Σ r x̃ᵀ / n`` in ``dtype``."""
        if self.count == 0:
            raise NumericalError("no calibration tokens reached this layer; check the calibration data")
        return (self.sum * (2.0 / self.count)).to(self.dtype)


def complement_(part: HessianAccumulator | CrossAccumulator, whole: HessianAccumulator | CrossAccumulator) -> None:
    """Turn ``part`` into ``whole`` minus ``part``'s tokens, in place (the rest of a split: held-out
    windows accumulated apart, the fit windows' sums are then the whole sums less theirs). For a
    Hessian, call after both were finalized (mirrored), so that both sums are whole matrices."""
    part.sum.neg_().add_(whole.sum)
    part.count = whole.count - part.count


def cross_bytes(rows: int, ncols: int, dtype: torch.dtype = torch.float32) -> int:
    """Peak bytes of one :class:`CrossAccumulator` and its use (float64 sum, the ``dtype`` copy and
    the compensated target), for memory plans."""
    return rows * ncols * (8 + 2 * dtype.itemsize)


def heldout_bytes(rows: int, ncols: int, dtype: torch.dtype = torch.float32) -> int:
    """Extra peak bytes of a held-out split beside :func:`cross_bytes` (``--shrink heldout``): the
    held-out windows' float64 ``H`` and ``G`` sums, the fit and held-out ``H`` and ``G`` in ``dtype``
    and the fit ``H``'s inverse."""
    return ncols * ncols * (8 + 3 * dtype.itemsize) + rows * ncols * (8 + 2 * dtype.itemsize)


def _mirror_upper(A: torch.Tensor) -> None:
    """Copy the upper triangle of ``A`` onto its lower one, in place, block by block."""
    n = A.shape[0]
    for i in range(0, n, BLOCK):
        e = min(i + BLOCK, n)
        d = A[i:e, i:e]
        d.copy_(torch.triu(d) + torch.triu(d, 1).T)
        if e < n:
            A[e:, i:e] = A[i:e, e:].T


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

    From :data:`LEAN_MIN_COLS` columns the factor and the inverse are computed in blocks inside one
    ``dtype`` copy of ``H`` (:func:`_inverse_in_place`): one F × F buffer beyond ``H`` instead of
    the four to five that ``cholesky_ex`` + ``cholesky_solve(I)`` held, and about half the flops.
    """
    what = f"Hessian{' of ' + where if where else ''}"
    dtype = dtype or H.dtype
    if H.shape[0] >= LEAN_MIN_COLS:
        return _lean_damped_inverse(H, damp, max_tries, what, dtype)
    H = H.to(dtype).clone()
    if not torch.isfinite(H).all():
        raise NumericalError(f"{what} contains NaN/inf; check calibration data")
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
                    log.warning("%s needed damping %.3g to factor", what, lam)
                return inv, lam
            raise NumericalError(f"{what} has a non-finite inverse; use more calibration samples or a larger --damp")
        del L
        lam = max(lam * 10, 1e-4)
    raise NumericalError(f"{what} would not factor even with damping {lam / 10:.3g}; "
                         "use more calibration samples or a larger --damp")


def _lean_damped_inverse(H: torch.Tensor, damp: float, max_tries: int, what: str,
                         dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """:func:`damped_inverse` for wide ``H``, in one ``dtype`` buffer. A failed factorisation
    starts again from ``H`` (the caller's, untouched) with the same sequence of diagonal
    increments as the unblocked path, so the damped matrix is the same."""
    if not _all_finite(H):
        raise NumericalError(f"{what} contains NaN/inf; check calibration data")
    dead = torch.diagonal(H) == 0
    A = torch.empty(H.shape, dtype=dtype, device=H.device)
    steps: list[float] = []
    lam, applied = damp, 0.0
    for attempt in range(max_tries):
        A.copy_(H)
        diag = torch.diagonal(A)
        diag[dead] = 1.0
        mean = diag.mean().item()
        steps.append((lam - applied) * mean)
        applied = lam
        for step in steps:
            diag += step
        if _inverse_in_place(A):
            if not _all_finite(A):
                raise NumericalError(f"{what} has a non-finite inverse; use more calibration samples or a larger --damp")
            if attempt:
                log.warning("%s needed damping %.3g to factor", what, lam)
            return A, lam
        lam = max(lam * 10, 1e-4)
    raise NumericalError(f"{what} would not factor even with damping {lam / 10:.3g}; "
                         "use more calibration samples or a larger --damp")


def _all_finite(A: torch.Tensor) -> bool:
    """``torch.isfinite(A).all()`` by row blocks: on a whole F × F matrix it held 1.75 F × F float32
    of temporaries (measured)."""
    return all(bool(torch.isfinite(A[i:i + BLOCK]).all()) for i in range(0, A.shape[0], BLOCK))


def _inverse_in_place(A: torch.Tensor, b: int | None = None) -> bool:
    """Overwrite symmetric positive definite ``A`` with its inverse, using only ``b``-wide blocks
    beyond it; False (``A`` garbage) when it is not positive definite.

    Three blocked passes, each a loop of GEMMs (LAPACK's potrf, trtri and lauum in torch):
    the lower Cholesky factor ``L`` (right-looking, lower blocks only), ``X = L⁻¹`` over it (by block
    columns from the last), then ``A⁻¹ = Xᵀ X``: block column ``j`` of the product needs only rows
    ``≥ j`` of ``X``, so it is written into the unused upper triangle and mirrored into the rows of
    ``X`` no later column needs. The result is exactly symmetric.
    """
    n, b = A.shape[0], b or BLOCK
    starts = list(range(0, n, b))
    for j in starts:  # Cholesky: A = L Lᵀ, L in the lower triangle (diagonal blocks: zeros above)
        e = min(j + b, n)
        L, info = torch.linalg.cholesky_ex(A[j:e, j:e])
        if info.item() != 0:
            return False
        A[j:e, j:e] = L
        if e < n:
            P = torch.linalg.solve_triangular(L.T, A[e:, j:e], upper=True, left=False)  # A[e:, j] L⁻ᵀ
            A[e:, j:e] = P
            for k in range(e, n, b):
                ke = min(k + b, n)
                A[k:, k:ke].addmm_(P[k - e:], P[k - e:ke - e].T, alpha=-1)
    for j in reversed(starts):  # X = L⁻¹: X[e:, j] = -X[e:, e:] L[e:, j] L[j, j]⁻¹
        e = min(j + b, n)
        eye = torch.eye(e - j, dtype=A.dtype, device=A.device)
        inv_jj = torch.linalg.solve_triangular(A[j:e, j:e], eye, upper=False)  # lower, exact zeros above
        if e < n:
            panel = A[e:, j:e].clone()
            for k in range(e, n, b):  # block row k of X[e:, e:] is lower triangular: columns e..ke
                ke = min(k + b, n)
                A[k:ke, j:e] = -((A[k:ke, e:ke] @ panel[:ke - e]) @ inv_jj)
        A[j:e, j:e] = inv_jj
    for j in starts:  # A⁻¹ = Xᵀ X, block column j from rows >= j of X
        e = min(j + b, n)
        T = A[j:, :e].T @ A[j:, j:e]  # rows :e of block column j
        d = T[j:e]
        if j:
            A[:j, j:e] = T[:j]
            A[j:e, :j] = T[:j].T
        A[j:e, j:e] = (d + d.T) / 2
    return True
