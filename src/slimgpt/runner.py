"""One decoder layer's calibration work, shared by every pass that walks the layers: the
layer-wise driver, streaming, the ``auto`` schedule's scoring pass, the search database and the
peers' statistics. :class:`LayerRunner` holds a layer's inputs, collects its Hessians (and, for
``--compensate asymmetric``, the dense stream's cross statistics), runs its dense pass and its
solve (reduced across torchrun processes); :class:`Timer` splits the time; :func:`embed_batches`
makes layer 0's inputs. Methods get a ``LayerRunner`` from the driver (``methods/base.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from slimgpt import distributed
from slimgpt.arch.base import LayerContext, ModelAdapter
from slimgpt.errors import NumericalError
from slimgpt.solvers.hessian import CrossAccumulator, HessianAccumulator, complement_

T = TypeVar("T")


class Timer:
    """Wall-clock buckets (calibration forward, hessian, solver) for the pruning-cost report.

    On a CUDA ``device`` each bucket synchronises the device when it opens and closes: kernels
    run asynchronously, so without it a bucket times only the launches and its work lands in
    whichever later code first waits for the GPU (on an H100 three quarters of a prune fell
    outside every bucket). The synchronisations cost a little overlap; the report's split is
    then the GPU's real one.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self._cuda = device if device is not None and device.type == "cuda" else None

    def sync(self) -> None:
        """Wait for the device (CUDA only), for code that times a slice of a bucket itself."""
        if self._cuda is not None:
            torch.cuda.synchronize(self._cuda)

    @contextmanager
    def __call__(self, bucket: str) -> Iterator[None]:
        self.sync()
        t = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[bucket] = self.seconds.get(bucket, 0.0) + time.perf_counter() - t

    def move(self, src: str, dst: str, secs: float) -> None:
        self.seconds[src] = self.seconds.get(src, 0.0) - secs
        self.seconds[dst] = self.seconds.get(dst, 0.0) + secs


@torch.no_grad()
def checksum(t: torch.Tensor, chunk: int = 1 << 22) -> tuple[float, float]:
    """``(Σ t, Σ k·t_k)`` over the flattened tensor in float64, chunked so no full-size float64
    copy is made: any realistic edit (zeroed or compensated columns, moved values) changes it."""
    flat = t.detach().reshape(-1)
    total = weighted = 0.0
    for start in range(0, flat.numel(), chunk):
        c = flat[start:start + chunk].double()
        pos = torch.arange(start + 1, start + 1 + c.numel(), device=c.device, dtype=torch.float64)
        total += c.sum().item()
        weighted += torch.dot(c, pos).item()
    return total, weighted


@dataclass
class Statistics:
    """A linear's compensation statistics: ``H`` over every calibration token, the dense stream's
    ``G`` (None without one), and with a held-out split ``(H_fit, G_fit, H_held, G_held)``."""

    H: torch.Tensor
    G: torch.Tensor | None = None
    held: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None


@dataclass
class DensePass:
    """What :meth:`LayerRunner.dense_pass` collects from one unchanged pass over a layer."""

    attn_hessian: torch.Tensor  # o_proj's input
    mlp_hessian: torch.Tensor  # down_proj's input
    outputs: list[torch.Tensor]  # per batch, on the compute device
    input_norms: tuple[float, float]  # mean ||x||² entering the attention and the MLP block


class LayerRunner:
    """One decoder layer and its calibration inputs, run block by block.

    ``inputs`` are batches of hidden states (on the offload device); each is moved to ``device``
    for compute. The attention block's outputs are cached and reused for as long as the
    attention weights are unchanged, so a method that prunes attention then MLP costs two
    attention and two MLP passes, not three. "Unchanged" is judged from the weights' contents
    (see :meth:`_attn_fingerprint`), not only their version counters: writes through ``.data``
    (as solvers do) bump no counter, and a stale cache would give the FFN the dense attention.
    """

    def __init__(
        self,
        index: int,
        layer: nn.Module,
        adapter: ModelAdapter,
        inputs: list[torch.Tensor],
        ctx: LayerContext,
        device: torch.device,
        timer: Timer,
        reference: list[torch.Tensor] | None = None,
        drift: bool = False,
        first_window: int = 0,
    ) -> None:
        self.index, self.layer, self.adapter = index, layer, adapter
        self.inputs, self.ctx, self.device, self.timer = inputs, ctx, device, timer
        self._mid: list[torch.Tensor] | None = None
        self._mid_key: tuple | None = None
        self.dense_outputs: list[torch.Tensor] | None = None  # dense_pass's outputs, for the caller's propagation
        # Asymmetric compensation (``--compensate asymmetric|drift``): ``reference`` holds the dense
        # model's inputs to this layer, batch for batch beside ``inputs``. The runner owns the list and
        # replaces its entries in place as the dense stream advances (inputs → attention outputs →
        # layer outputs), so the dense stream costs one copy of the activations, not three.
        self.reference, self.drift = reference, drift
        self.first_window = first_window  # this rank's first calibration window (held-out splits)
        self._ref_stage = "inputs"
        self._ref_home = reference[0].device if reference else None
        if reference is not None:  # the dense weights the dense stream must be computed with
            self._dense_keys = {"o": self._weight_key(adapter.attention(layer).o),
                                "down": self._weight_key(adapter.mlp(layer).down)}

    # ---- activations ---------------------------------------------------------------------
    def batches(self) -> Iterator[torch.Tensor]:
        """The input batches on the compute device, in order.

        Inputs already there (or a CPU run) are yielded as they are. From the host to a GPU,
        batch ``j + 1`` is copied on a side stream while batch ``j`` computes (asynchronous when the
        host tensors are pinned, as the driver keeps them); the compute stream waits for each copy
        before using it.
        """
        return self._stream(self.inputs)

    def _stream(self, tensors: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """:meth:`batches` of any list of batches (the dense stream's too)."""
        if self.device.type != "cuda" or all(x.device == self.device for x in tensors):
            for x in tensors:
                yield x.to(self.device)
            return
        side = torch.cuda.Stream(self.device)
        current = torch.cuda.current_stream(self.device)

        def issue(x: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
            side.wait_stream(current)  # the host tensor may have been written by work queued before
            with torch.cuda.stream(side):
                y = x.to(self.device, non_blocking=True)
                done = torch.cuda.Event()
                done.record(side)
            return y, done

        nxt = issue(tensors[0]) if tensors else None
        for j in range(len(tensors)):
            assert nxt is not None
            y, done = nxt
            nxt = issue(tensors[j + 1]) if j + 1 < len(tensors) else None
            current.wait_event(done)
            y.record_stream(current)
            yield y

    def _attn_fingerprint(self) -> tuple:
        """Identity, version counter and a content checksum of every parameter the attention
        block reads. The checksum catches in-place edits that bypass the version counter
        (``p.data.copy_``, as solvers write); it costs one read of the attention weights, far
        less than the attention forward the cache saves."""
        return tuple((name, p.data_ptr(), tuple(p.shape), p._version, *checksum(p))
                     for m in self.adapter.attention_block_modules(self.layer)
                     for name, p in m.named_parameters())

    def _check(self, t: torch.Tensor, what: str) -> torch.Tensor:
        if not torch.isfinite(t).all():
            raise NumericalError(
                f"layer {self.index} produced NaN/inf {what}; use --dtype float32 or check the model and data"
            )
        return t

    @torch.no_grad()
    def attention_outputs(self) -> list[torch.Tensor]:
        """Residual stream after the attention block, for every batch (on ``device``)."""
        key = self._attn_fingerprint()
        if self._mid is None or self._mid_key != key:
            self._mid = None  # free the stale outputs before computing new ones (one copy, not two)
            with self.timer("forward"):
                self._mid = [
                    self._check(self.adapter.attention_block(self.layer, x, self.ctx), "attention outputs")
                    for x in self.batches()
                ]
            self._mid_key = key
        return self._mid

    @torch.no_grad()
    def outputs(self) -> list[torch.Tensor]:
        """The layer's outputs with its current weights (for propagation to the next layer)."""
        mid = self.attention_outputs()
        with self.timer("forward"):
            return [self._check(self.adapter.mlp_block(self.layer, h), "outputs") for h in mid]

    # ---- Hessians ------------------------------------------------------------------------
    @torch.no_grad()
    def attention_hessian(self, module: nn.Module | None = None) -> torch.Tensor:
        """``H = 2XXᵀ/n`` of the input of ``module`` (default: o_proj), over all calibration tokens."""
        module = module or self.adapter.attention(self.layer).o
        acc = HessianAccumulator(module.in_features, device=self.device, sum_dtype=torch.float64,
                                 where=f"layer {self.index}'s attention activations")
        hook_time = [0.0]
        handle = module.register_forward_pre_hook(self._accumulating_hook(acc, hook_time))
        try:
            with self.timer("forward"):
                for x in self.batches():
                    self.adapter.attention_block(self.layer, x, self.ctx)
        finally:
            handle.remove()
        self.timer.move("forward", "hessian", hook_time[0])
        return self._reduced(acc)

    @torch.no_grad()
    def mlp_hessian(self) -> torch.Tensor:
        """``H`` of down_proj's input ``act(gate(x)) * up(x)`` after the (possibly pruned) attention."""
        acc = HessianAccumulator(self.adapter.intermediate_size(self.layer), device=self.device,
                                 sum_dtype=torch.float64,  # the same H however the batches are split
                                 where=f"layer {self.index}'s MLP activations")
        for h in self.attention_outputs():
            with self.timer("forward"):
                z = self.adapter.mlp_hidden(self.layer, h)
            with self.timer("hessian"):
                acc.add(z)
        return self._reduced(acc)

    @torch.no_grad()
    def dense_pass(self) -> DensePass:
        """The layer run once, unchanged, over every batch: both Hessians (``o_proj``'s and
        ``down_proj``'s inputs, taken by hooks during the forward), the layer's outputs and the
        blocks' mean squared input norms. For a consumer that edits no weight before it has all of
        these (the search's level database): one attention and one MLP pass instead of the two and
        a half that :meth:`attention_hessian`, :meth:`mlp_hessian` and :meth:`outputs` cost, with
        the same values (the hooks see exactly the tensors those methods form)."""
        o, down = self.adapter.attention(self.layer).o, self.adapter.mlp(self.layer).down
        acc_o = HessianAccumulator(o.in_features, device=self.device, sum_dtype=torch.float64,
                                   where=f"layer {self.index}'s attention activations")
        acc_d = HessianAccumulator(down.in_features, device=self.device, sum_dtype=torch.float64,
                                   where=f"layer {self.index}'s MLP activations")
        hook_time = [0.0]
        handles = [o.register_forward_pre_hook(self._accumulating_hook(acc_o, hook_time)),
                   down.register_forward_pre_hook(self._accumulating_hook(acc_d, hook_time))]
        outputs: list[torch.Tensor] = []
        sq, tokens = [0.0, 0.0], 0
        try:
            with self.timer("forward"):
                for x in self.batches():
                    mid = self._check(self.adapter.attention_block(self.layer, x, self.ctx), "attention outputs")
                    outputs.append(self._check(self.adapter.mlp_block(self.layer, mid), "outputs"))
                    sq[0] += float(x.float().pow(2).sum())
                    sq[1] += float(mid.float().pow(2).sum())
                    tokens += x.shape[0] * x.shape[1]
                    del mid
        finally:
            for h in handles:
                h.remove()
        self.timer.move("forward", "hessian", hook_time[0])
        self.dense_outputs = outputs
        return DensePass(self._reduced(acc_o), self._reduced(acc_d), outputs, (sq[0] / tokens, sq[1] / tokens))

    # ---- asymmetric compensation: statistics against the dense model's stream ---------------
    @torch.no_grad()
    def attention_statistics(self, holdout: int = 0) -> Statistics:
        """``o_proj``'s ``H`` (as :meth:`attention_hessian`) and, with a dense stream, its ``G``:
        ``2 Σ r x̃ᵀ / n`` with ``x̃`` the pruned stream's ``o_proj`` input, ``r = W (x − x̃)`` against the
        dense stream's input ``x`` (``drift``: plus the residual streams' difference ``h − h̃``, so that
        the block's output, not only ``o_proj``'s, is pulled toward the dense model's). ``G`` is None
        without a dense stream, and ``H`` is then computed by exactly :meth:`attention_hessian`.
        ``holdout``: see :meth:`_cross_statistics`.

        Each batch runs the unchanged attention on both streams (one more attention pass than
        :meth:`attention_hessian`); the dense one's output replaces the dense input in place."""
        o = self.adapter.attention(self.layer).o
        if self.reference is None:
            return Statistics(self.attention_hessian(o))
        if self._ref_stage != "inputs":
            raise RuntimeError(f"layer {self.index}: attention_statistics needs the dense inputs; call it once, "
                               "before mlp_statistics")
        self._check_dense("o")
        seen: list[torch.Tensor] = []

        def pairs() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
            for j, (x, ref) in enumerate(zip(self.batches(), self._stream(self.reference), strict=True)):
                with self.timer("forward"):
                    mid = self._check(self.adapter.attention_block(self.layer, ref, self.ctx), "dense attention outputs")
                    self.adapter.attention_block(self.layer, x, self.ctx)
                dense_in, pruned_in = seen
                seen.clear()
                yield dense_in, pruned_in, (ref.to(torch.float32) - x.to(torch.float32)) if self.drift else None
                with self.timer("offload"):
                    self.reference[j] = self._to_ref_home(mid)

        handle = o.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        try:
            stats = self._cross_statistics(o, pairs(), f"layer {self.index}'s attention activations", holdout)
        finally:
            handle.remove()
        self._ref_stage = "mid"
        return stats

    @torch.no_grad()
    def mlp_statistics(self, holdout: int = 0) -> Statistics:
        """``down_proj``'s ``H`` (as :meth:`mlp_hessian`, after the possibly pruned attention) and,
        with a dense stream, its ``G`` (see :meth:`attention_statistics`): ``x`` is the dense model's
        FFN activation (dense attention, dense MLP, dense input), ``x̃`` the pruned stream's. The dense
        MLP's outputs replace the dense stream's entries in place (the next layer's dense inputs)."""
        if self.reference is None:
            return Statistics(self.mlp_hessian())
        down = self.adapter.mlp(self.layer).down
        self._dense_mid()
        if self._ref_stage != "mid":
            raise RuntimeError(f"layer {self.index}: mlp_statistics was already called for the dense stream")
        self._check_dense("down")
        seen: list[torch.Tensor] = []

        def pairs() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
            for j, (h, ref) in enumerate(zip(self.attention_outputs(), self._stream(self.reference), strict=True)):
                with self.timer("forward"):
                    out = self._check(self.adapter.mlp_block(self.layer, ref), "dense outputs")
                    dense_in = seen.pop()
                    z = self.adapter.mlp_hidden(self.layer, h)
                yield dense_in, z, (ref.to(torch.float32) - h.to(torch.float32)) if self.drift else None
                with self.timer("offload"):
                    self.reference[j] = self._to_ref_home(out)

        handle = down.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        try:
            stats = self._cross_statistics(down, pairs(), f"layer {self.index}'s MLP activations", holdout)
        finally:
            handle.remove()
        self._ref_stage = "outputs"
        return stats

    def _cross_statistics(self, linear: nn.Linear,
                          pairs: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
                          where: str, holdout: int) -> Statistics:
        """``H`` and ``G`` of ``linear`` from ``(dense input, pruned input, residual drift)`` per batch.

        ``holdout = k > 0`` also accumulates every k-th calibration window (counted over all ranks'
        windows, so the split does not depend on the process count) apart, and returns the ``H``
        and ``G`` of the other windows and of those (:attr:`Statistics.held`): what
        :func:`~slimgpt.solvers.obs.heldout_shrinkage` needs. ``H`` and ``G`` are over every window
        either way, summed exactly as without the split."""
        acc = HessianAccumulator(linear.in_features, device=self.device, sum_dtype=torch.float64, where=where)
        cross = CrossAccumulator(linear.out_features, linear.in_features, device=self.device, where=f"{where} (dense)")
        held = (HessianAccumulator(linear.in_features, device=self.device, sum_dtype=torch.float64, where=where),
                CrossAccumulator(linear.out_features, linear.in_features, device=self.device, where=where)) \
            if holdout else None
        W = linear.weight.detach().to(torch.float32)
        window = self.first_window
        for dense_in, pruned_in, drift in pairs:
            with self.timer("hessian"):
                acc.add(pruned_in)
                r = (dense_in.to(torch.float32) - pruned_in.to(torch.float32)) @ W.T
                if drift is not None:
                    r += drift
                cross.add(r, pruned_in)
                if held is not None:
                    rows = (torch.arange(window, window + pruned_in.shape[0]) % holdout) == holdout - 1
                    window += pruned_in.shape[0]
                    if bool(rows.any()):
                        rows = rows.to(pruned_in.device)
                        held[0].add(pruned_in[rows])
                        held[1].add(r[rows], pruned_in[rows])
            del dense_in, pruned_in, r, drift
        H, G = self._reduced(acc), self._reduced(cross)
        split = None
        if held is not None:
            for part in held:
                self._reduce(part)
            if 0 < held[0].count < acc.count:  # both parts have tokens
                H_held, G_held = held[0].finalize(), held[1].finalize()
                complement_(held[0], acc)
                complement_(held[1], cross)
                split = (held[0].finalize(), held[1].finalize(), H_held, G_held)
        return Statistics(H, G, split)

    @torch.no_grad()
    def reference_outputs(self) -> list[torch.Tensor]:
        """The dense layer's outputs on the dense stream (the next layer's dense inputs), where the
        dense inputs were kept; computed here for whatever the statistics did not already compute."""
        assert self.reference is not None, "no dense stream"
        self._dense_mid()
        if self._ref_stage == "mid":
            self._check_dense("down")
            for j, ref in enumerate(self._stream(self.reference)):
                with self.timer("forward"):
                    out = self._check(self.adapter.mlp_block(self.layer, ref), "dense outputs")
                with self.timer("offload"):
                    self.reference[j] = self._to_ref_home(out)
            self._ref_stage = "outputs"
        return self.reference

    def _dense_mid(self) -> None:
        """Advance the dense stream past the attention block (if it is not there yet)."""
        assert self.reference is not None
        if self._ref_stage != "inputs":
            return
        self._check_dense("o")
        for j, ref in enumerate(self._stream(self.reference)):
            with self.timer("forward"):
                mid = self._check(self.adapter.attention_block(self.layer, ref, self.ctx), "dense attention outputs")
            with self.timer("offload"):
                self.reference[j] = self._to_ref_home(mid)
        self._ref_stage = "mid"

    def _to_ref_home(self, t: torch.Tensor) -> torch.Tensor:
        """A dense-stream tensor to where the dense stream lives (pinned on the host for a GPU run,
        so the next layer's copies in are asynchronous)."""
        home = self._ref_home
        assert home is not None
        if t.device == home:
            return t
        if t.device.type == "cuda" and home.type == "cpu":
            h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            h.copy_(t)
            return h
        return t.to(home)

    @staticmethod
    def _weight_key(module: nn.Module) -> tuple:
        w = module.weight
        return (w.data_ptr(), tuple(w.shape), *checksum(w))

    def _check_dense(self, which: str) -> None:
        """The dense stream must run the dense weights: refuse (a method bug) once they were edited."""
        module = self.adapter.attention(self.layer).o if which == "o" else self.adapter.mlp(self.layer).down
        if self._weight_key(module) != self._dense_keys[which]:
            raise RuntimeError(f"layer {self.index}: {which}_proj was edited before the dense stream passed it; "
                               "take the compensation statistics before solving")

    def _accumulating_hook(self, acc: HessianAccumulator, seconds: list[float]) -> Callable[[nn.Module, tuple], None]:
        """A forward pre-hook adding the module's input to ``acc``, its own time added to ``seconds[0]``."""
        def hook(_m: nn.Module, args: tuple) -> None:
            self.timer.sync()  # the accumulation's own time, not the work still queued before it
            t = time.perf_counter()
            acc.add(args[0])
            self.timer.sync()
            seconds[0] += time.perf_counter() - t
        return hook

    def _reduced(self, acc: HessianAccumulator | CrossAccumulator) -> torch.Tensor:
        """``H`` over every rank's calibration tokens: the raw float64 sums and token counts are
        all-reduced before scaling, so ``H`` (rounded to fp32) is the single-process one."""
        self._reduce(acc)
        return acc.finalize()

    def _reduce(self, acc: HessianAccumulator | CrossAccumulator) -> None:
        """All-reduce ``acc``'s raw sum and token count in place (nothing outside torchrun)."""
        if distributed.is_distributed():
            with self.timer("communication"):
                distributed.all_reduce_sum(acc.sum, f"the Hessian reduction of layer {self.index}")
                acc.count = distributed.all_reduce_int(acc.count, f"the Hessian reduction of layer {self.index}")

    # ---- solving once ----------------------------------------------------------------------
    def solve(self, fn: Callable[[], T], *changed: torch.Tensor) -> T:
        """Run the solver ``fn`` once and share its outcome. ``fn`` edits ``changed`` (weights)
        in place and returns a picklable result (kept indices, errors). Under ``torchrun`` it runs
        on rank 0 only; the result and the edited weights are then broadcast, so every rank holds
        the same layer before the next activations are computed."""
        with self.timer("solver"):
            if not distributed.is_distributed():
                return fn()
            result = distributed.agree(fn, f"the solve of layer {self.index}")
        with self.timer("communication"):
            for t in changed:
                distributed.broadcast_(t, what=f"sharing the weights of layer {self.index}")
        return result

    def map_mlp_hidden(self, fn: Callable[[torch.Tensor], None]) -> None:
        """Call ``fn`` on down_proj's input for every batch (for methods with other statistics)."""
        with torch.no_grad():
            for h in self.attention_outputs():
                fn(self.adapter.mlp_hidden(self.layer, h))


@torch.no_grad()
def embed_batches(
    adapter: ModelAdapter, calib: torch.Tensor, batch_size: int, offload: torch.device
) -> list[torch.Tensor]:
    """Layer 0's inputs for every calibration window, in batches, kept on ``offload``."""
    emb = adapter.decoder.embed_tokens
    dev = emb.weight.device
    return [adapter.embed(ids.to(dev)).to(offload) for ids in calib.split(batch_size)]
