"""Which requests draft in a round, how many tokens, and from which source: the sparse drafter or their
look-up draft (`vllm_std.lookup`). With a fixed gamma every eligible request drafts gamma sparse tokens;
with adaptive gamma rank 0 prices the batch's choices with the cost model (`GammaPolicy.decide`) and sends
its decisions to the other ranks, then learns from each verified round and from the steps' timings."""

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

from vllm_std.backends.base import AttentionAdapter
from vllm_std.calibration import StartupCalibration, StepOverhead
from vllm_std.capture import PrefillScorer
from vllm_std.config import STDConfig
from vllm_std.cost_model import CostModel
from vllm_std.draft_step import DraftRequest, KeptBlocks
from vllm_std.gamma_policy import Decision, GammaPolicy
from vllm_std.lookup import NO_DRAFT, LookupDraft, LookupMatcher, lookup_drafter
from vllm_std.metrics import STDMetrics
from vllm_std.runner_view import RunnerView

if TYPE_CHECKING:
    from vllm_std.sparse_drafter import SparseDrafter

# Under "vllm." so that vLLM's own logging configuration prints it.
logger = logging.getLogger(f"vllm.{__name__}")


@dataclasses.dataclass(frozen=True)
class Eligible:
    """A request that may draft this step: its batch row, id, tokens so far, the most drafts it may make,
    and its look-up draft (up to that many tokens; empty where none was found or look-ups are off)."""

    row: int
    req_id: str
    n: int
    limit: int
    lookup: LookupDraft


@dataclasses.dataclass(frozen=True)
class Round:
    """A round's drafts: the requests that draft with the sparse drafter, and the look-up drafts by row."""

    sparse: list[DraftRequest]
    looked_up: dict[int, list[int]]


class RoundPlanner:
    """Chooses each round's drafts and learns what they yield (the cost model and policy live on rank 0)."""

    OVERHEAD_REFRESH = 16

    def __init__(
        self, view: RunnerView, config: STDConfig, scorer: PrefillScorer, metrics: STDMetrics | None
    ) -> None:
        self.view, self.config, self.scorer, self.metrics = view, config, scorer, metrics
        self.gamma = config.num_speculative_tokens
        self.lookup: LookupMatcher | None = (
            lookup_drafter(view.max_model_len) if config.lookup and config.adaptive else None
        )
        self.cost: CostModel | None = None
        self.policy: GammaPolicy | None = None
        self.overhead = StepOverhead()
        self.kept = KeptBlocks(view.device)
        self._priced: tuple[CostModel, CostModel] | None = None
        self._priced_steps = 0
        # Of the next steps of an unchanged batch, how many the last decisions (none drafting) still cover,
        # and for how many requests.
        self.idle_left = 0
        self._idle_eligible = 0
        self._looked_up: set[str] = set()  # the requests whose last round was their look-up draft

    def calibrate(self, adapter: AttentionAdapter, drafter: "SparseDrafter") -> None:
        """The cost model for adaptive gamma: the saved profile, or a measurement now (on every rank, as the
        forward passes hold collectives; rank 0's is used)."""
        start = time.perf_counter()
        if self.config.cost_profile is not None:
            self.cost, source = CostModel.load(self.config.cost_profile), self.config.cost_profile
        else:
            calibration = StartupCalibration(self.view, adapter, self.gamma, drafter)
            self.cost, source = calibration.run(), "measured at start-up"
        if self.view.tp_rank != 0:
            return
        self.policy = GammaPolicy(self.gamma, self.config.probe_interval, self.config.min_gain)
        context = 4096
        logger.info(
            "STD cost model (%s, %.1f s): at batch 1 and %d tokens of context, a dense step %.2f ms, a draft "
            "step %.2f ms, a verify step of %d tokens %.2f ms (before the engine's own per-step overhead)",
            source,
            time.perf_counter() - start,
            context,
            1e3 * self.cost.dense(1, context),
            1e3 * self.cost.draft(1, context),
            self.gamma + 1,
            1e3 * self.cost.verify(1, context, self.gamma),
        )

    def eligible(
        self, sampled_token_ids: list[list[int]], num_tokens_no_spec: Any, token_ids_cpu: Any
    ) -> tuple[list[Eligible], list[int]]:
        """The batch's requests that may draft this step (a selection, a token sampled), each with the most
        it may draft and its look-up draft (with `lookup`); and the contexts of the others."""
        view, block_size = self.view, self.view.block_size
        eligible, others = [], []
        for row, req_id in enumerate(view.batch_req_ids()):
            n = int(num_tokens_no_spec[row])
            if req_id not in self.scorer.selections or not sampled_token_ids[row]:
                others.append(n)
                continue
            # Draft KV goes to positions n-1 .. n+k-2: stay inside allocated blocks and the model's length,
            # and draft no more than the request may still emit besides the verifier's own token.
            limit = min(
                self.gamma,
                len(view.block_ids(req_id)) * block_size - (n - 1),
                view.max_model_len - n,
                view.remaining_tokens(req_id) - 1,
            )
            lookup = NO_DRAFT
            if self.lookup is not None and limit > 0:
                if not self.lookup.known(req_id):
                    prompt = view.num_prompt_tokens(req_id)
                    visual = view.visual_request(req_id).visual().numpy()
                    self.lookup.admit(req_id, token_ids_cpu[row, :prompt], visual)
                lookup = self.lookup.propose(req_id, token_ids_cpu[row, :n], limit)
            eligible.append(Eligible(row, req_id, n, limit, lookup))
        return eligible, others

    def plan(self, eligible: list[Eligible], others: list[int]) -> Round:
        """The round for the `eligible` requests, in a batch that also holds requests of contexts `others`."""
        if not eligible:
            self._looked_up = set()
            return Round([], {})
        sparse, looked_up = [], {}
        for e, (gamma, lookup) in zip(eligible, self._gammas(eligible, others), strict=True):
            k = min(gamma, e.limit)
            if k <= 0:
                continue
            if lookup:
                looked_up[e.row] = e.lookup.tokens[:k]
                continue
            selection = self.scorer.selections[e.req_id]
            block_ids = self.view.block_ids(e.req_id)
            kept = self.kept.of(e.req_id, selection, block_ids)
            delta = self.view.position_delta(e.req_id)
            sparse.append(DraftRequest(e.row, selection, e.n, k, kept, block_ids, delta))
        self._looked_up = {e.req_id for e in eligible if e.row in looked_up}
        return Round(sparse, looked_up)

    def _gammas(self, eligible: list[Eligible], others: list[int]) -> list[tuple[int, bool]]:
        """Each eligible request's draft length and whether it is its look-up draft: gamma sparse drafts, or
        with `adaptive` the policy's choice on rank 0 for the whole batch (the requests that may not draft,
        of contexts `others`, share its steps), sent to the other ranks (their own timings would differ,
        and the ranks must draft in lockstep) with how many of the next steps it covers if none drafts
        (`repeat_idle`)."""
        if not self.config.adaptive:
            fixed = self._chosen([Decision(self.gamma, "fixed")] * len(eligible))
            return [(gamma, False) for gamma in fixed]
        plan = None
        if self.policy is not None:
            cost, probe_cost = self._priced_costs()
            drafting = [
                (e.req_id, float(e.n), float(self.scorer.selections[e.req_id].drafter_context(e.n)))
                for e in eligible
            ]
            lookups = None
            if self.lookup is not None:
                lookups = [(len(e.lookup.tokens), e.lookup.match) for e in eligible]
            decisions = self.policy.decide(cost, drafting, others, probe_cost, lookups)
            chosen = list(zip(self._chosen(decisions), [d.looked_up for d in decisions], strict=True))
            idle = not any(gamma for gamma, _ in chosen) and not self.overhead.settling
            plan = chosen, self.policy.idle_steps_ahead() if idle else 0
        chosen, self.idle_left = self.view.broadcast_from_rank0(plan)
        self._idle_eligible = len(eligible)
        return chosen

    def _chosen(self, decisions: list[Decision]) -> list[int]:
        """The decisions' draft lengths, the decisions counted on `/metrics` (rank 0)."""
        if self.metrics is not None:
            self.metrics.gammas_chosen(decisions)
        return [d.gamma for d in decisions]

    def _priced_costs(self) -> tuple[CostModel, CostModel]:
        """The cost model with the engine's measured overheads, and with only a plain step's (what a due
        probe round sizes its probes by: a round's own overheads are measured from rounds), read again every
        `OVERHEAD_REFRESH` steps (medians over the last 64 steps move slowly; reading them costs a tenth of
        a millisecond), and at every step of the engine's first ones, while they are still being measured
        (until then the forward passes alone are priced, which on a small model hides what drafting
        saves: the engine's own work per step). An all-zero plan is checked again under new prices."""
        assert self.cost is not None and self.policy is not None
        stale = self._priced_steps >= self.OVERHEAD_REFRESH or self.overhead.settling
        if self._priced is None or stale:
            fixed = self.overhead.fixed
            self._priced = (
                self.cost.with_overhead(fixed, *self.overhead.rounds()),
                self.cost.with_overhead(fixed),
            )
            self._priced_steps = 0
            self.policy.costs_changed()
        self._priced_steps += 1
        return self._priced

    def learn(
        self,
        verifying: dict[str, int],
        step_rows: list[tuple[float, int]] | None,
        sampled_token_ids: list[list[int]],
        since_round: float | None,
    ) -> None:
        """After a target step (rank 0, adaptive): each verified round's acceptance (`verifying`: the drafts
        each request verified, of its sparse or look-up draft), and the step's overhead beyond its forward
        pass (`since_round`: seconds since the last round ended; `step_rows`: the step's rows)."""
        if self.policy is None or self.cost is None:
            return
        if verifying:
            for req_id, sampled in zip(self.view.batch_req_ids(), sampled_token_ids, strict=True):
                drafted = verifying.get(req_id, 0)
                if drafted and sampled:
                    self.policy.record(req_id, drafted, len(sampled) - 1, req_id in self._looked_up)
        if since_round is not None and step_rows is not None:
            drafts = sum(d for _, d in step_rows)
            self.overhead.observe(since_round, self.cost.step_seconds(step_rows), drafts)

    def drafted(self, seconds: float, requests: list[DraftRequest]) -> None:
        """The sparse drafter's round took `seconds`: against the cost model's prediction, what a draft step
        costs beyond its forward pass."""
        if self.cost is None or self.policy is None:
            return
        contexts = [r.selection.drafter_context(r.num_tokens) for r in requests]
        steps = max(r.num_drafts for r in requests)
        predicted = 0.0
        for step in range(steps):
            active = [c for c, r in zip(contexts, requests, strict=True) if r.num_drafts > step]
            predicted += self.cost.draft(len(active), sum(active) / len(active))
        self.overhead.observe_drafting(seconds, (predicted, steps))

    def repeat_idle(self) -> None:
        """A step of an unchanged batch that the last decisions, none drafting, still cover: they are
        counted again, on every rank alike, without looking at a request. Such steps are most steps of a
        batch where STD does not pay, so what they cost is STD's floor."""
        self.idle_left -= 1
        if self.policy is not None:
            self.policy.repeat_idle()
        if self.metrics is not None:
            self.metrics.not_paying(self._idle_eligible)

    def release(self, req_ids: set[str]) -> None:
        self.kept.release(req_ids)
        if self.policy is not None:
            self.policy.release(req_ids)
        if self.lookup is not None:
            self.lookup.release(req_ids)

    def forget(self, live_req_ids: set[str]) -> None:
        self.kept.forget(live_req_ids)
        if self.policy is not None:
            self.policy.forget(live_req_ids)
        if self.lookup is not None:
            self.lookup.forget(live_req_ids)
