"""The selection kernels one at a time, for the per-kernel microbenchmarks.

``gallop_kernels.ops.select.launcher.select`` runs all selection kernels in one call; its
``SelectionPlan`` exposes the passes as separate steps. This module drives those steps for a group
of one tensor with the "gallop" score, restoring the small device buffers a step mutates before
each timed call, so each stage can be timed alone and repeatedly. ``TritonStages.check()``
compares the staged result with ``launcher.select`` (the CPU quick mode runs it in the interpreter),
so a launcher change this module does not follow is caught.

Stages (each leaves the device state the next one needs):

1. ``score_histogram()``: kernel 1, the fused score + histogram of the top digit (pass 0);
2. ``radix_select()``: kernel 2, the bucket choices and the refining passes (reading θ and g, or the
   captured candidate buffer), down to the exact threshold on the device, no host round trip;
3. ``compaction()``: kernel 3, per-chunk counts, their scans and the ordered write of the k
   indices into a preallocated output (the launcher's one host sync is not included).
"""

from __future__ import annotations

import torch


class TritonStages:
    def __init__(self, theta: torch.Tensor, grad: torch.Tensor, k: int, score_eps: float = 1e-8) -> None:
        from gallop_kernels.ops.select import launcher as S

        self.S = S
        self.theta, self.grad, self.k = theta, grad, int(k)
        self.eps = float(score_eps)
        self.plan = S.SelectionPlan([theta], [grad], "gallop", self.eps, 0, None, theta.device)
        self.state, self.hist = self.plan.new_state(self.k)
        self.levels = len(self.plan.digits)
        self.state0 = self.state.clone()
        self.cnt_gt0 = self.plan.cnt_gt.clone()
        self.state_final = self.state.clone()
        self.cnt_gt_final = self.plan.cnt_gt.clone()
        self.out = torch.empty(self.k, dtype=self.plan.index_dtypes[0], device=theta.device)

    # ---- the timed stages ----------------------------------------------------------------------

    def score_histogram(self) -> None:
        """Kernel 1: pass 0 (reads θ and g once, histograms the top digit)."""
        self.state.copy_(self.state0)
        self.plan.cnt_gt.copy_(self.cnt_gt0)
        self.hist[0].zero_()
        self.plan.histogram_pass(0, self.state, self.hist[0])

    def radix_select(self) -> None:
        """Kernel 2: bucket choice after pass 0 and the refining passes, to the exact threshold."""
        self.state.copy_(self.state0)
        self.plan.cnt_gt.copy_(self.cnt_gt0)
        self.hist[1:].zero_()
        for level in range(self.levels):
            if level > 0:
                self.plan.histogram_pass(level, self.state, self.hist[level])
            self.plan.choose_bucket(level, self.hist[level], self.state)
        self.state_final.copy_(self.state)
        self.cnt_gt_final.copy_(self.plan.cnt_gt)

    def compaction(self) -> None:
        """Kernel 3: per-chunk counts, device scans, ordered write of the k indices."""
        self.state.copy_(self.state_final)
        self.plan.cnt_gt.copy_(self.cnt_gt_final)
        take, take_excl, ties, _ = self.plan.compact_counts(self.state)
        self.plan.write(self.state, take, take_excl, ties, [self.out])

    def run_all(self) -> torch.Tensor:
        self.score_histogram()
        self.radix_select()
        self.compaction()
        return self.out

    def check(self) -> None:
        """Raise AssertionError unless the staged kernels select what ``launcher.select`` selects,
        also when a stage is repeated (as the timing loop does)."""
        self.run_all()
        self.radix_select()
        self.compaction()
        self.compaction()
        staged = self.out.to(torch.int64).cpu()
        (full,) = self.S.select([self.theta], [self.grad], self.k, "gallop", score_eps=self.eps)
        full = full.to(torch.int64).cpu()
        if not torch.equal(staged, full):
            raise AssertionError(
                "benchmarks/stages.py no longer matches gallop_kernels/ops/select/launcher.py: the staged "
                f"kernels selected a different set ({staged.numel()} vs {full.numel()} indices)"
            )
