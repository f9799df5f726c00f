"""`STDProposer`: the sparse drafter, plugged into vLLM as a `custom_class` proposer.

Lifecycle inside a worker: vLLM builds it with the config (`__init__`), calls `load_model` with the target
model (the drafter *is* the target: nothing to load), and after the KV cache exists the runner patch calls
`bind_runner`, which validates the engine and hooks every decoder attention layer for prefill scoring.
Then, after every step, `propose` drafts up to gamma tokens per request that has a selection: with
`adaptive` (the default) as many as `GammaPolicy` predicts fastest for that request, which may be none.

Losslessness rests on three facts: drafts are verified by vLLM's own dense forward and rejection sampler;
the drafter writes KV only at positions `>= n - 1` (the verifier rewrites them before reading them); and it
reads the cache through compacted block tables, never changing a block.
"""

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from vllm_std.backends import adapter_for
from vllm_std.backends.base import AttentionAdapter
from vllm_std.calibration import StartupCalibration, StepOverhead
from vllm_std.capture import PrefillScorer
from vllm_std.config import STDConfig, unsupported
from vllm_std.cost_model import CostModel
from vllm_std.draft_sampler import DraftSampler
from vllm_std.draft_step import DraftRequest, draft_step_inputs
from vllm_std.engine_checks import refused_compilation
from vllm_std.gamma_policy import Decision, GammaPolicy
from vllm_std.lookup import LookupDrafter, lookup_drafter
from vllm_std.metrics import STDMetrics
from vllm_std.patches import WORKER_PATCHES
from vllm_std.runner_view import RunnerView
from vllm_std.self_check import SelfCheckFailed, StartupSelfCheck

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
    lookup: list[int]


def _capturing() -> bool:
    """Whether a CUDA graph is being captured on this thread's stream (vLLM's warm-up): no hook may act."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class STDProposer:
    """Drafts with the target model reading only its top-K visual blocks per layer plus all other tokens."""

    OVERHEAD_REFRESH = 16
    IDLE_REFRESH = 8

    def __init__(self, vllm_config: Any) -> None:
        self.vllm_config = vllm_config
        self.config = STDConfig.from_vllm_config(vllm_config)
        self.num_speculative_tokens = self.config.num_speculative_tokens
        for patch in WORKER_PATCHES:
            patch.apply()
        self.view: RunnerView | None = None
        self.adapter: AttentionAdapter | None = None
        self.scorer: PrefillScorer | None = None
        self.metrics: STDMetrics | None = None
        self._started = False  # `after_warm_up` ran
        self.disabled = False  # by a failed start-up self-check
        # Adaptive gamma: rank 0 decides every draft length (the others receive them), from these.
        self.cost: CostModel | None = None
        self.policy: GammaPolicy | None = None
        self.overhead = StepOverhead()
        self._priced: tuple[CostModel, CostModel] | None = None
        self._priced_steps = 0
        self._live: set[str] = set()  # the requests vLLM held at the last planned step
        self._batch: list[str] = []  # and the rows of its forward pass
        self._idle_steps = 0  # steps since, each like the one before it
        # Of those, how many more the last decisions (none drafting) still cover, and for how many requests.
        self._idle_left = 0
        self._idle_eligible = 0
        self._drafted = False  # whether the last step drafted: the step being run then verifies
        self._verifying: dict[str, int] = {}  # drafts each request verifies in the step being run
        self._step_rows: list[tuple[float, int]] | None = None
        self._round_end: float | None = None
        # The last round's draft probabilities for vLLM's rejection sampler (`take_last_draft_probs`), and
        # the generator its unseeded draws come from, seeded alike on every rank.
        self._draft_probs: torch.Tensor | None = None
        self._generator: torch.Generator | None = None
        self.lookup: LookupDrafter | None = None  # look-up drafts (`lookup`, with `adaptive`)
        self._looked_up: set[str] = set()  # the requests whose last round was their look-up draft

    def load_model(self, target_model: Any) -> None:
        """Nothing to load: the drafter shares the target's weights and KV cache."""

    def bind_runner(self, runner: Any) -> None:
        """Called once the KV cache exists, before vLLM warms up and captures its CUDA graphs: validate,
        then hook the attention layers for scoring (the hooks act only in steps `target_step` plans)."""
        if self.view is not None:
            return
        view = RunnerView(runner, self.config)
        self.adapter = adapter_for(view.backend_name)
        for layer in view.layers:
            self.adapter.check_layer(layer.impl)
        refusal = refused_compilation(view.vllm_config.compilation_config)
        if refusal is not None:
            raise unsupported(*refusal)
        self.metrics = STDMetrics.for_worker(self.vllm_config, view.tp_rank)
        self.scorer = PrefillScorer(
            self.config, len(view.layers), view.block_size, view.layers[0].impl.scale, self.metrics
        )
        for index, layer in enumerate(view.layers):
            self._hook(layer.impl, index)
        self._generator = torch.Generator(device=view.device).manual_seed(view.seed)
        if self.config.lookup and self.config.adaptive:
            self.lookup = lookup_drafter(view.max_model_len)
        self.view = view

    def after_warm_up(self) -> None:
        """Called once vLLM has warmed up (and captured its CUDA graphs), before any request: the self-check,
        then the cost model. A failed self-check turns STD off for this engine, which serves on without
        speculation; every rank takes the same branch (their forward passes hold collectives)."""
        if self.view is None or self.adapter is None or self._started:
            return
        self._started = True
        view, adapter = self.view, self.adapter
        start = time.perf_counter()
        error = None
        try:
            StartupSelfCheck(view, adapter).run()
        except Exception as exc:  # a kernel may raise anything; each is a failed check
            error = (
                exc if isinstance(exc, SelfCheckFailed) else SelfCheckFailed(f"{type(exc).__name__}: {exc}")
            )
        if view.any_rank(error is not None):
            self.disabled = True
            if view.tp_rank == 0:
                logger.warning(
                    "STD self-check failed on the %s attention backend (%s); STD is off for this engine, "
                    "which serves without speculation",
                    view.backend_name,
                    error if error is not None else "on another tensor-parallel rank",
                )
            if self.metrics is not None:
                self.metrics.drafter_fault("self_check")
            return
        self_check_seconds = time.perf_counter() - start
        if self.config.adaptive:
            self._calibrate(view, adapter)
        if view.tp_rank == 0:
            self._log_settings(view, self_check_seconds)

    def _calibrate(self, view: RunnerView, adapter: AttentionAdapter) -> None:
        """The cost model for adaptive gamma: the saved profile, or a measurement now (on every rank, as the
        forward passes hold collectives; rank 0's is used)."""
        start = time.perf_counter()
        if self.config.cost_profile is not None:
            self.cost, source = CostModel.load(self.config.cost_profile), self.config.cost_profile
        else:
            calibration = StartupCalibration(view, adapter, self.num_speculative_tokens)
            self.cost, source = calibration.run(), "measured at start-up"
        if view.tp_rank != 0:
            return
        self.policy = GammaPolicy(
            self.num_speculative_tokens, self.config.probe_interval, self.config.min_gain
        )
        context = 4096
        logger.info(
            "STD cost model (%s, %.1f s): at batch 1 and %d tokens of context, a dense step %.2f ms, a draft "
            "step %.2f ms, a verify step of %d tokens %.2f ms (before the engine's own per-step overhead)",
            source,
            time.perf_counter() - start,
            context,
            1e3 * self.cost.dense(1, context),
            1e3 * self.cost.draft(1, context),
            self.num_speculative_tokens + 1,
            1e3 * self.cost.verify(1, context, self.num_speculative_tokens),
        )

    def _log_settings(self, view: RunnerView, self_check_seconds: float) -> None:
        """The one start-up line with the resolved settings (TP rank 0 only)."""
        logger.info(
            "STD on: gamma=%s%d top_k=%d (%d blocks of %d) selection=%s modalities=%s min_visual_tokens=%d "
            "look-up drafts=%s draft_probs=%s; %d layers, %s (self-check passed in %.2f s)",
            "adaptive up to " if self.config.adaptive else "",
            self.config.num_speculative_tokens,
            self.config.top_k,
            self.config.top_k_blocks(view.block_size),
            view.block_size,
            self.config.selection,
            ",".join(self.config.modalities),
            self.config.min_visual_tokens,
            self.lookup.name if self.lookup is not None else "off",
            self.config.draft_probs,
            len(view.layers),
            view.backend_name,
            self_check_seconds,
        )

    def _hook(self, impl: Any, index: int) -> None:
        original = impl.forward

        def forward(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs):
            out = original(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)
            if self.scorer.planned and attn_metadata is not None and not _capturing():
                try:
                    self.scorer.observe(index, query, self._key_reader(layer, kv_cache))
                except Exception as exc:
                    self._scoring_fault("scoring", exc)
            return out

        impl.forward = forward

    @contextlib.contextmanager
    def target_step(self) -> Iterator[None]:
        """Around each forward pass of the target (`GPUModelRunnerModelForwardPatch`): plan what the layer
        hooks capture in it, then close the plan. Planned here, not from a hook in the first layer: a step
        replayed as a CUDA graph runs no Python in its layers, yet its acceptance must be learnt."""
        if self.view is None or self.scorer is None or self.disabled:
            yield
            return
        try:
            self._plan_step()
        except Exception as exc:
            self._scoring_fault("planning", exc)
        try:
            yield
        finally:
            self.scorer.end_step()

    def _key_reader(self, layer: Any, kv_cache: torch.Tensor) -> Callable[[str, int], torch.Tensor]:
        """Reads a request's keys of this layer back from the paged cache (for `PrefillScorer`)."""
        assert self.view is not None and self.adapter is not None
        view, adapter = self.view, self.adapter

        def read(req_id: str, num_tokens: int) -> torch.Tensor:
            block_ids = torch.tensor(view.block_ids(req_id), dtype=torch.long, device=kv_cache.device)
            return adapter.read_keys(layer, kv_cache, block_ids, num_tokens)

        return read

    def _plan_step(self) -> None:
        """Before a target forward pass: admit new requests to scoring, plan what the layer hooks capture,
        and note each row's drafts to verify (acceptance) and context (step overhead) for `_learn`.

        A step like the one before (the same requests, none prefilling for scoring, no drafts to verify: a
        batch that does not draft) has nothing to plan; it is planned in full once every `IDLE_REFRESH`
        steps all the same, so that the plain step's overhead stays measured."""
        assert self.view is not None and self.scorer is not None
        batch = self.view.batch_req_ids()
        if (
            batch == self._batch
            and not self._drafted
            and not self.scorer.pending
            and self._idle_steps < self.IDLE_REFRESH
        ):
            self._idle_steps += 1
            self.scorer.plan_step(())
            self._step_rows, self._verifying = None, {}
            return
        self._batch, self._idle_steps = batch, 0
        live = self.view.live_req_ids()
        if live != self._live:  # a request arrived or left since the last step
            self._live = live
            self.scorer.forget(live)
            if self.policy is not None:
                self.policy.forget(live)
            if self.lookup is not None:
                self.lookup.forget(live)
        rows = self.view.batch_rows()
        for row in rows:
            if not self.scorer.known(row.req_id):
                self.scorer.admit(self.view.visual_request(row.req_id))
        self.scorer.plan_step(rows)
        if self.policy is not None:
            shape = [(row.chunk_start, row.num_rows, self.view.num_prompt_tokens(row.req_id)) for row in rows]
            self._step_rows = StepOverhead.decode_rows(shape)
            self._verifying = {
                row.req_id: row.num_rows - 1
                for row, (start, _, prompt) in zip(rows, shape, strict=True)
                if start >= prompt
            }

    def _learn(self, sampled_token_ids: list[list[int]], now: float) -> None:
        """After a target step (rank 0, adaptive): each verified round's acceptance, and the step's overhead
        beyond its forward pass."""
        assert self.view is not None and self.policy is not None and self.cost is not None
        if self._verifying:
            for req_id, sampled in zip(self.view.batch_req_ids(), sampled_token_ids, strict=True):
                drafted = self._verifying.get(req_id, 0)
                if drafted and sampled:
                    self.policy.record(req_id, drafted, len(sampled) - 1, req_id in self._looked_up)
        if self._round_end is not None and self._step_rows is not None:
            drafts = sum(d for _, d in self._step_rows)
            self.overhead.observe(now - self._round_end, self.cost.step_seconds(self._step_rows), drafts)

    def release(self, req_ids: set[str]) -> None:
        """vLLM dropped these requests (finished or aborted): so does every per-request table here."""
        if self.scorer is not None:
            self.scorer.release(req_ids)
        if self.policy is not None:
            self.policy.release(req_ids)
        if self.lookup is not None:
            self.lookup.release(req_ids)
        self._live -= req_ids

    def _scoring_fault(self, stage: str, exc: Exception) -> None:
        """A fault while planning or scoring a step: the prompts being scored decode without drafts."""
        assert self.scorer is not None
        self._step_rows, self._verifying = None, {}
        self._fault(stage, exc, self.scorer.abandon())

    def _fault(self, stage: str, exc: Exception, req_ids: list[str]) -> None:
        """Drafts are optional: a fault of the drafter costs the requests it touched their drafts (the
        target's forward pass and outputs are untouched), never the engine. One line names them."""
        if self.view is None or self.view.tp_rank == 0:
            logger.warning(
                "STD %s failed (%s: %s); %s decode without drafts, the engine goes on",
                stage,
                type(exc).__name__,
                exc,
                f"requests {', '.join(req_ids)}" if req_ids else "no request",
                exc_info=logger.isEnabledFor(logging.DEBUG),
            )
        if self.metrics is not None:
            self.metrics.drafter_fault(stage)

    def propose(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens_no_spec: Any,
        token_ids_cpu: Any,
        slot_mappings: Any = None,
    ) -> list[list[int]]:
        """Draft token ids per request, in the runner's batch order (`[]` where nothing is drafted). A fault
        while drafting gives the step no drafts and its drafting requests none from then on."""
        self._draft_probs = None
        try:
            return self._propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)
        except Exception as exc:
            self._draft_probs = None
            self._drafted = False
            self._round_end = time.perf_counter()
            try:
                batch = self.view.batch_req_ids() if self.view is not None else []
            except Exception:
                batch = []
            abandoned = self.scorer.abandon_selections(batch) if self.scorer is not None else []
            self._fault("drafting", exc, abandoned)
            return [[] for _ in sampled_token_ids]

    def _propose(
        self, sampled_token_ids: list[list[int]], num_tokens_no_spec: Any, token_ids_cpu: Any
    ) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in sampled_token_ids]
        if self.view is None or self.scorer is None or self.disabled:
            return drafts
        eligible: tuple[list[Eligible], list[int]] | None = None
        if self._idle_steps and self._idle_left:
            # A batch that drafts nothing, unless one of its requests now finds a look-up draft (the same on
            # every rank: the tokens are).
            if self.lookup is not None:
                eligible = self._eligible(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)
            if eligible is None or not any(e.lookup for e in eligible[0]):
                self._repeat_idle()
                return drafts
        self._idle_left = 0
        if self.policy is not None:
            self._learn(sampled_token_ids, time.perf_counter())
        if eligible is None:
            eligible = self._eligible(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)
        requests, looked_up = self._draftable(*eligible)
        self._drafted = bool(requests or looked_up)
        batch = self.view.batch_req_ids()
        self._looked_up = {batch[row] for row in looked_up}
        if not self._drafted:
            self._round_end = time.perf_counter()
            return drafts
        for row, tokens in looked_up.items():
            drafts[row] = tokens
        longest = max([r.num_drafts for r in requests] + [len(t) for t in looked_up.values()])
        sampler = self._sampler([r.row for r in requests] + list(looked_up), len(sampled_token_ids), longest)
        if requests:
            self._draft_sparse(requests, token_ids_cpu, drafts, sampler)
        if sampler is not None:
            for row, tokens in looked_up.items():
                sampler.certain(row, tokens)
        self._draft_probs = None if sampler is None else sampler.probs
        self._round_end = time.perf_counter()
        if self.metrics is not None:
            self.metrics.drafts_proposed(
                sum(r.num_drafts for r in requests), sum(map(len, looked_up.values()))
            )
        return drafts

    def _draft_sparse(
        self,
        requests: list[DraftRequest],
        token_ids_cpu: Any,
        drafts: list[list[int]],
        sampler: DraftSampler | None,
    ) -> None:
        """The sparse drafter's steps for `requests`, their drafts appended to `drafts` by batch row."""
        tokens = torch.tensor([int(token_ids_cpu[r.row, r.num_tokens - 1]) for r in requests])
        start = time.perf_counter()
        for step in range(max(r.num_drafts for r in requests)):
            active = [i for i, r in enumerate(requests) if r.num_drafts > step]
            logits = self._draft_step([requests[i] for i in active], tokens[active], step)
            if sampler is None:
                next_tokens = logits.argmax(dim=-1).cpu()
            else:
                positions = [requests[i].position(step) for i in active]
                next_tokens = sampler.sample(logits, [requests[i].row for i in active], step, positions)
            for i, token in zip(active, next_tokens.tolist(), strict=True):
                drafts[requests[i].row].append(token)
            tokens[active] = next_tokens
        seconds = time.perf_counter() - start
        if self.metrics is not None:
            self.metrics.draft_seconds.observe(seconds)
        if self.cost is not None and self.policy is not None:
            self.overhead.observe_drafting(seconds, self._predicted_drafting(requests))

    def _repeat_idle(self) -> None:
        """A step of an unchanged batch (`_plan_step` found nothing to plan) that the last decisions, none
        drafting, still cover: they are counted again, on every rank alike, without looking at a request.
        Such steps are most steps of a batch where STD does not pay, so what they cost is STD's floor."""
        self._idle_left -= 1
        if self.policy is not None:
            self.policy.repeat_idle()
        if self.metrics is not None:
            self.metrics.not_paying(self._idle_eligible)
        self._round_end = time.perf_counter()

    def _predicted_drafting(self, requests: list[DraftRequest]) -> tuple[float, int]:
        """The round's draft forward passes as the cost model predicts them, and how many steps it ran."""
        assert self.cost is not None and self.view is not None
        contexts = [r.selection.drafter_context(r.num_tokens) for r in requests]
        steps = max(r.num_drafts for r in requests)
        seconds = 0.0
        for step in range(steps):
            active = [c for c, r in zip(contexts, requests, strict=True) if r.num_drafts > step]
            seconds += self.cost.draft(len(active), sum(active) / len(active))
        return seconds, steps

    def _eligible(
        self, sampled_token_ids: list[list[int]], num_tokens_no_spec: Any, token_ids_cpu: Any
    ) -> tuple[list[Eligible], list[int]]:
        """The batch's requests that may draft this step (a selection, a token sampled), each with the most
        it may draft and its look-up draft (with `lookup`); and the contexts of the others."""
        assert self.view is not None and self.scorer is not None
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
                self.num_speculative_tokens,
                len(view.block_ids(req_id)) * block_size - (n - 1),
                view.max_model_len - n,
                view.remaining_tokens(req_id) - 1,
            )
            lookup: list[int] = []
            if self.lookup is not None and limit > 0:
                if not self.lookup.known(req_id):
                    prompt = view.num_prompt_tokens(req_id)
                    visual = view.visual_request(req_id).visual().numpy()
                    self.lookup.admit(req_id, token_ids_cpu[row, :prompt], visual)
                lookup = self.lookup.propose(req_id, token_ids_cpu[row, :n], limit)
            eligible.append(Eligible(row, req_id, n, limit, lookup))
        return eligible, others

    def _draftable(
        self, eligible: list[Eligible], others: list[int]
    ) -> tuple[list[DraftRequest], dict[int, list[int]]]:
        """The round: the requests that draft with the sparse drafter, and the look-up drafts, by row."""
        assert self.view is not None and self.scorer is not None
        if not eligible:
            return [], {}
        sparse, looked_up = [], {}
        for e, (gamma, lookup) in zip(eligible, self._gammas(eligible, others), strict=True):
            k = min(gamma, e.limit)
            if k <= 0:
                continue
            if lookup:
                looked_up[e.row] = e.lookup[:k]
                continue
            selection = self.scorer.selections[e.req_id]
            physical = torch.tensor(self.view.block_ids(e.req_id), dtype=torch.int32)
            sparse.append(
                DraftRequest(e.row, selection, e.n, k, physical, self.view.position_delta(e.req_id))
            )
        return sparse, looked_up

    def _gammas(self, eligible: list[Eligible], others: list[int]) -> list[tuple[int, bool]]:
        """Each eligible request's draft length and whether it is its look-up draft: gamma sparse drafts, or
        with `adaptive` the policy's choice on rank 0 for the whole batch (the requests that may not draft,
        of contexts `others`, share its steps), sent to the other ranks (their own timings would differ,
        and the ranks must draft in lockstep) with how many of the next steps it covers if none drafts
        (`_repeat_idle`)."""
        assert self.view is not None and self.scorer is not None
        if not self.config.adaptive:
            fixed = self._chosen([Decision(self.num_speculative_tokens, "fixed")] * len(eligible))
            return [(gamma, False) for gamma in fixed]
        plan = None
        if self.policy is not None:
            cost, probe_cost = self._priced_costs()
            drafting = [
                (e.req_id, float(e.n), float(self.scorer.selections[e.req_id].drafter_context(e.n)))
                for e in eligible
            ]
            lookups = [len(e.lookup) for e in eligible] if self.lookup is not None else None
            decisions = self.policy.decide(cost, drafting, others, probe_cost, lookups)
            chosen = list(zip(self._chosen(decisions), [d.looked_up for d in decisions], strict=True))
            plan = chosen, 0 if any(gamma for gamma, _ in chosen) else self.policy.idle_steps_ahead()
        chosen, self._idle_left = self.view.broadcast_from_rank0(plan)
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
        a millisecond)."""
        assert self.cost is not None
        if self._priced is None or self._priced_steps >= self.OVERHEAD_REFRESH:
            fixed = self.overhead.fixed
            self._priced = (
                self.cost.with_overhead(fixed, *self.overhead.rounds()),
                self.cost.with_overhead(fixed),
            )
            self._priced_steps = 0
        self._priced_steps += 1
        return self._priced

    def _sampler(self, rows: list[int], num_rows: int, longest: int) -> DraftSampler | None:
        """The round's draws of sampled requests' drafts, for the requests of batch rows `rows` (None with
        `draft_probs` off: argmax drafts, which vLLM verifies as certain)."""
        assert self.view is not None and self._generator is not None
        if not self.config.draft_probs:
            return None
        batch = self.view.batch_req_ids()
        seeds = {row: self.view.sampling_seed(batch[row]) for row in rows}
        return DraftSampler(self.view.sampling_metadata, seeds, num_rows, longest, self._generator)

    def take_last_draft_probs(self) -> torch.Tensor | None:
        """The last round's draft probabilities, `[batch rows, drafts, vocab]`, or None where no drafting
        request samples; vLLM's runner reads them once (`GPUModelRunnerProposeDraftTokenIdsPatch`) and its
        rejection sampler verifies the drafts with them."""
        probs, self._draft_probs = self._draft_probs, None
        return probs

    def _draft_step(self, requests: list[DraftRequest], tokens: torch.Tensor, step: int) -> torch.Tensor:
        """The logits of one draft step over the requests' compacted views."""
        assert self.view is not None and self.adapter is not None
        inputs = draft_step_inputs(self.view, self.adapter, requests, step)
        return self.view.draft_logits(tokens, inputs.positions, inputs.slots, inputs.metadata)
