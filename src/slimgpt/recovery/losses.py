"""Recovery losses: KL to the teacher's next-token distribution, top-k KL, and the LM loss.

Per scored token ``i`` (a position whose label is not :data:`IGNORE`), with student logits ``s``,
teacher logits ``t`` and temperature ``T``::

    kd_i  = T² · KL(softmax(t/T) ‖ softmax(s/T)) = T² · Σ_v p_v (log p_v − log q_v)
    lm_i  = −log softmax(s)[label_i]
    loss  = Σ_i [(1 − w) · kd_i + w · lm_i] / N                (w = --lm-weight)

The direction is the usual (forward) distillation one: the teacher's distribution is the target
and the student is pushed to cover it. ``T²`` keeps the gradient's size independent of ``T``
(Hinton et al.), so one learning rate serves every temperature. ``N`` is the number of scored
tokens of the whole optimiser step over all micro-batches and processes, so every token weighs
the same whatever micro-batch or rank it falls in.

Top-k (``--teacher-topk k``): the teacher keeps, per position, the log-probabilities of its ``k`` most
likely tokens ``S`` and the log of the mass left outside them, ``p_r`` (k + 1 numbers instead of a
vocabulary's worth). The KL is taken over the ``k + 1`` outcomes "token i of S" and "any other
token": ``Σ_S p (log p − log q) + p_r (log p_r − log q_r)`` with ``q_r`` the student's mass outside
``S``. Its gradient pushes the student's tail down as a whole to ``p_r`` (without it, renormalising
the teacher over ``S`` leaves the tail unconstrained: SmolLM2 50 %, 25k tokens, k = 64 gave WikiText-2
607 against 549 for the full KL). With ``k`` = the vocabulary this is the full KL exactly.

Why a chunked loss (:func:`chunked_head_loss`) instead of ``model(...).logits``: the logits of a
micro-batch are tokens × vocabulary floats (SmolLM2: 2,048 × 49,152 × 4 bytes = 400 MB per model;
Qwen's 152k vocabulary triples that), and every elementwise pass over them (log-softmax, exp,
the difference, its gradient) streams that memory. The head is applied a few hundred tokens at a
time instead, the chunk's loss and its gradients with respect to the hidden states and the head
weight are computed at once, and only those gradients are kept: no tokens × vocabulary tensor
ever exists, and each chunk's passes stay in cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100  # label of tokens that are not scored (prompt, padding)


# ---- per-token terms on materialised logits (the definitions; also the tests' references) ----------


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``KL(softmax(t/T) ‖ softmax(s/T))`` per row (last dimension = vocabulary), float32, without ``T²``."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp, ids)``: per row the teacher's ``k`` most likely ids at ``T``, their log-probabilities
    in ``logp[:, :k]`` and the log of the probability mass outside them in ``logp[:, k]`` (−inf
    when ``k`` covers the vocabulary)."""
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    values, ids = log_p.topk(min(k, log_p.shape[-1]), dim=-1)
    rest = log_p.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([values, rest], dim=-1), ids


def _topk_kl_and_target(log_q: torch.Tensor, logp: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor,
                                                                                           torch.Tensor]:
    """KL sum over the k + 1 outcomes (see the module docstring) and the target distribution whose
    difference from ``q`` is the gradient: the teacher's ``p`` on its top ``k``, and outside them the
    student's own ``q`` scaled to the teacher's tail mass (``q · p_r / q_r``)."""
    ids = ids.long()
    k = ids.shape[-1]
    lp_top, lp_rest = logp[:, :k].float(), logp[:, k].float()
    lq_top = log_q.gather(-1, ids)
    lq_rest = log_q.scatter(-1, ids, float("-inf")).logsumexp(-1)
    p_top, p_rest = lp_top.exp(), lp_rest.exp()
    tail = torch.where(p_rest > 0, p_rest * (lp_rest - lq_rest), torch.zeros_like(p_rest))
    kl = (p_top * (lp_top - lq_top)).sum() + tail.sum()
    ratio = torch.where(torch.isfinite(lq_rest), (lp_rest - lq_rest).exp(), torch.zeros_like(lq_rest))
    target = (log_q.exp() * ratio[:, None]).scatter_(-1, ids, p_top)
    return kl, target


def token_kl_topk(student_logits: torch.Tensor, topk_logp: torch.Tensor, topk_ids: torch.Tensor,
                  temperature: float = 1.0) -> torch.Tensor:
    """Per row: the top-k KL of the module docstring (teacher top-k and tail mass from
    :func:`teacher_topk`) against the student's full softmax at ``T``."""
    logits = student_logits.to(torch.promote_types(student_logits.dtype, torch.float32))
    log_q = F.log_softmax(logits / temperature, dim=-1)
    ids = topk_ids.long()
    k = ids.shape[-1]
    lp_top, lp_rest = topk_logp[:, :k].to(log_q.dtype), topk_logp[:, k].to(log_q.dtype)
    lq_top = log_q.gather(-1, ids)
    lq_rest = log_q.scatter(-1, ids, float("-inf")).logsumexp(-1)
    p_rest = lp_rest.exp()
    tail = torch.where(p_rest > 0, p_rest * (lp_rest - lq_rest), torch.zeros_like(p_rest))
    return (lp_top.exp() * (lp_top - lq_top)).sum(-1) + tail


def token_nll(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``−log softmax(s)[label]`` per row (0 where the label is :data:`IGNORE`)."""
    return F.cross_entropy(student_logits.float(), labels.long(), ignore_index=IGNORE, reduction="none")


# ---- the chunked loss ---------------------------------------------------------------------------------


@dataclass
class TeacherTargets:
    """What the loss needs of the teacher for the scored rows: its final hidden states and head
    (full KL, or top-k computed chunk by chunk), or top-k targets computed earlier (a cache)."""

    hidden: torch.Tensor | None = None  # (N, d) teacher final hidden states of the scored rows
    head: Callable[[torch.Tensor], torch.Tensor] | None = None  # hidden → logits
    topk: int | None = None  # keep only the k most likely teacher tokens
    topk_logp: torch.Tensor | None = None  # (N, k + 1) precomputed top-k log-probs and tail mass ...
    topk_ids: torch.Tensor | None = None  # ... and their ids

    def chunk(self, r0: int, r1: int, temperature: float) -> tuple[torch.Tensor | None, torch.Tensor | None,
                                                                  torch.Tensor | None]:
        """``(teacher_logits, topk_logp, topk_ids)`` of rows ``r0:r1``; one of the two forms is None."""
        if self.topk_logp is not None and self.topk_ids is not None:
            return None, self.topk_logp[r0:r1], self.topk_ids[r0:r1]
        assert self.hidden is not None and self.head is not None
        with torch.no_grad():
            logits = self.head(self.hidden[r0:r1]).float()
        if self.topk is not None:
            logp, ids = teacher_topk(logits, self.topk, temperature)
            return None, logp, ids
        return logits, None, None


def loss_terms(logits: torch.Tensor, labels: torch.Tensor, teacher: TeacherTargets | None, r0: int, r1: int,
               temperature: float, lm_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(weighted loss sum, KL sum, NLL sum, d loss / d logits)`` of rows ``r0:r1`` (every row is
    scored; 0-dim float32 tensors, the KL sum at ``T`` without ``T²``; the NLL sum is NaN when it
    would cost an extra softmax and nothing needs it). The gradient is written out rather than taken
    by autograd: ``T (q_T − p)`` for the KL term and ``q − onehot`` for the LM term, where ``q_T``/``p``
    are the student's/teacher's softmax at ``T``. Besides saving autograd's passes over the chunk,
    this gives a student that equals its teacher exactly zero gradients (``q_T`` and ``p`` are then
    the same floats), so AdamW leaves its weights exactly where they are."""
    z = logits.float()
    rows = torch.arange(z.shape[0], device=z.device)
    y = labels[r0:r1].to(z.device).long()
    if teacher is None:
        log_q = F.log_softmax(z, dim=-1)
        nll = -log_q[rows, y].sum()
        grad = log_q.exp_()
        grad[rows, y] -= 1.0
        return nll, torch.zeros_like(nll), nll, grad
    t_logits, logp, ids = teacher.chunk(r0, r1, temperature)
    log_q_t = F.log_softmax(z / temperature if temperature != 1 else z, dim=-1)
    if t_logits is not None:
        log_p = F.log_softmax(t_logits / temperature if temperature != 1 else t_logits, dim=-1)
        p = log_p.exp()
        kl = (p * (log_p - log_q_t)).sum()
    else:
        assert logp is not None and ids is not None
        kl, p = _topk_kl_and_target(log_q_t, logp, ids)
    nll = torch.full((), float("nan"), device=z.device)
    log_q = None
    if lm_weight > 0 or temperature == 1:
        log_q = log_q_t if temperature == 1 else F.log_softmax(z, dim=-1)
        nll = -log_q[rows, y].sum()
    q_t = log_q_t.exp()
    grad = (q_t - p).mul_((1.0 - lm_weight) * temperature)
    total = (1.0 - lm_weight) * temperature ** 2 * kl
    if lm_weight > 0:
        assert log_q is not None
        q = q_t if temperature == 1 else log_q.exp()
        grad.add_(q, alpha=lm_weight)
        grad[rows, y] -= lm_weight
        total = total + lm_weight * nll
    return total, kl, nll, grad


class _ChunkedHeadLoss(torch.autograd.Function):
    """Loss and both gradients computed in the forward pass, a chunk of rows at a time; the
    backward only scales them by the incoming gradient (the loss is a scalar)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, run: Callable) -> torch.Tensor:  # type: ignore[override]
        loss, grad_h, grad_w = run(hidden, weight)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        one = bool(grad_out == 1)  # the usual case (loss.backward()): no copy of the weight gradient
        gh = (grad_h if one else grad_h * grad_out) if ctx.needs_input_grad[0] else None
        gw = (grad_w if one else grad_w * grad_out) if ctx.needs_input_grad[1] and grad_w.numel() else None
        return gh, gw, None


@dataclass
class LossParts:
    """A micro-batch's loss (differentiable, already divided by the step's token count) and the
    detached sums behind it, for logging."""

    loss: torch.Tensor
    kl_sum: float
    nll_sum: float
    tokens: int


def chunked_head_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
                      teacher: TeacherTargets | None = None, temperature: float = 1.0, lm_weight: float = 0.0,
                      scale: float = 1.0, chunk: int = 256) -> LossParts:
    """The loss of the module docstring over the rows of ``hidden`` (N, d), each predicting
    ``labels`` (N,) (all scored: select the rows first), times ``scale`` (1 / the step's token
    count). ``head(h, w)`` turns hidden states into logits with the head weight ``w`` (V, d);
    gradients reach ``hidden`` and ``weight`` through autograd like any other op."""
    n = hidden.shape[0]
    sums = {"kl": 0.0, "nll": 0.0}

    def run(h_all: torch.Tensor, w_all: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        need_h, need_w = h_all.requires_grad, w_all.requires_grad
        grad_h = torch.empty_like(h_all) if need_h else h_all.new_zeros(0)
        grad_w: torch.Tensor | None = None
        total = torch.zeros((), dtype=torch.float64, device=h_all.device)
        kl_sum = torch.zeros((), dtype=torch.float64, device=h_all.device)
        nll_sum = torch.zeros((), dtype=torch.float64, device=h_all.device)
        dev = h_all.device.type
        # the head weight in the compute dtype once per micro-batch (autocast would cast it per chunk)
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else w_all.dtype
        plain = getattr(head, "plain_linear", False)
        w_use = w_all.detach().to(dtype)
        if not plain:
            w_use.requires_grad_(need_w)
        # plain head: the weight gradient gᵀ h of up to `group` rows in one product (each product is added
        # to the fp32 sum through a conversion pass over the whole weight, so fewer is faster)
        group = min(n, 8 * chunk) if plain and need_w else 0
        g_buf = torch.empty((group, w_all.shape[0]), dtype=dtype, device=h_all.device) if group else None
        h_buf = torch.empty((group, h_all.shape[1]), dtype=dtype, device=h_all.device) if group else None
        filled = 0

        def flush(rows: int) -> None:
            nonlocal grad_w
            assert g_buf is not None and h_buf is not None
            gw = g_buf[:rows].t() @ h_buf[:rows]
            if grad_w is None:
                grad_w = gw.to(torch.float32, copy=True)
            else:
                grad_w.add_(gw)  # fp32 sum of the compute-dtype products

        for r0 in range(0, n, chunk):
            r1 = min(n, r0 + chunk)
            if plain:  # logits h wᵀ, gradients g w and gᵀ h written out: no autograd, no per-chunk copies
                h = h_all[r0:r1].detach().to(dtype)
                z = F.linear(h, w_use)
            else:
                with torch.enable_grad():
                    h = h_all[r0:r1].detach().requires_grad_(need_h)
                    z = head(h, w_use)
            loss, kl, nll, grad_z = loss_terms(z.detach(), labels, teacher, r0, r1, temperature, lm_weight)
            if (need_h or need_w) and plain:
                if g_buf is not None and h_buf is not None:
                    if filled + (r1 - r0) > group:
                        flush(filled)
                        filled = 0
                    g = g_buf[filled:filled + r1 - r0]
                    g.copy_(grad_z.mul_(scale))
                    h_buf[filled:filled + r1 - r0].copy_(h)
                    filled += r1 - r0
                else:
                    g = grad_z.mul_(scale).to(dtype)
                if need_h:
                    grad_h[r0:r1] = g @ w_use
            elif need_h or need_w:
                wants = [t for t, need in ((h, need_h), (w_use, need_w)) if need]
                it = iter(torch.autograd.grad(z, wants, grad_outputs=grad_z.mul_(scale).to(z.dtype)))
                if need_h:
                    grad_h[r0:r1] = next(it)
                if need_w:
                    gw = next(it)
                    grad_w = gw.to(torch.float32, copy=True) if grad_w is None else grad_w.add_(gw)
            total += loss.double()
            kl_sum += kl.double()
            nll_sum += nll.double()
        if filled:
            flush(filled)
        sums["kl"], sums["nll"] = float(kl_sum), float(nll_sum)  # one device sync per micro-batch
        gw_all = grad_w.to(w_all.dtype) if grad_w is not None else w_all.new_zeros(0)
        return (total * scale).float(), grad_h, gw_all

    if n == 0:
        loss = hidden.sum() * 0.0 + weight.sum() * 0.0  # keeps the graph (DDP-style reductions expect grads)
        return LossParts(loss, 0.0, 0.0, 0)
    loss = _ChunkedHeadLoss.apply(hidden, weight, run)
    return LossParts(loss, sums["kl"], sums["nll"], n)


def linear_head(softcap: float | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``h @ wᵀ`` (the untied or tied LM head), with Gemma's final logit soft-capping when set; a head
    without soft-capping is marked ``plain_linear`` and gets its gradients written out."""

    def head(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        logits = F.linear(h, w)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    head.plain_linear = not softcap  # type: ignore[attr-defined]
    return head


__all__ = ["IGNORE", "LossParts", "TeacherTargets", "chunked_head_loss", "linear_head", "loss_terms", "teacher_topk",
           "token_kl", "token_kl_topk", "token_nll"]
