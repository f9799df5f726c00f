"""`STDProposer`: the sparse drafter, plugged into vLLM as a `custom_class` proposer.

Lifecycle inside a worker: vLLM builds it with the config (`__init__`), calls `load_model` with the target
model (the drafter *is* the target: nothing to load), and after the KV cache exists the runner patch calls
`bind_runner`, which validates the engine and hooks every decoder attention layer for prefill scoring.
Around every forward pass of the target, `target_step` plans what the hooks score; after it, `propose` drafts
up to gamma tokens per request that has a selection: `RoundPlanner` chooses how many and from which source
(with `adaptive`, the default, what the cost model predicts fastest, which may be none, or the request's
look-up draft), and `SparseDrafter` runs the sparse drafter's steps.

Losslessness rests on three facts: drafts are verified by vLLM's own dense forward and rejection sampler;
the drafter writes KV only at positions `>= n - 1` (the verifier rewrites them before reading them); and it
reads the cache through compacted block tables, never changing a block.
"""

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from vllm_std.backends import adapter_for
from vllm_std.backends.base import AttentionAdapter
from vllm_std.calibration import StepOverhead
from vllm_std.capture import PrefillScorer
from vllm_std.config import STDConfig, unsupported
from vllm_std.engine_checks import refused_compilation
from vllm_std.metrics import STDMetrics
from vllm_std.patches import WORKER_PATCHES
from vllm_std.rounds import Round, RoundPlanner
from vllm_std.runner_view import RunnerView
from vllm_std.self_check import SelfCheckFailed, StartupSelfCheck
from vllm_std.sparse_drafter import SparseDrafter

# Under "vllm." so that vLLM's own logging configuration prints it.
logger = logging.getLogger(f"vllm.{__name__}")


def _capturing() -> bool:
    """Whether a CUDA graph is being captured on this thread's stream (vLLM's warm-up): no hook may act."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class STDProposer:
    """Drafts with the target model reading only its top-K visual blocks per layer plus all other tokens."""

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
        self.rounds: RoundPlanner | None = None  # which requests draft, how many tokens, from what
        self.sparse: SparseDrafter | None = None  # runs the sparse draft steps
        self._live: set[str] = set()  # the requests vLLM held at the last planned step
        self._batch: list[str] = []  # and the rows of its forward pass
        self._idle_steps = 0  # steps since, each like the one before it
        self._drafted = False  # whether the last step drafted: the step being run then verifies
        self._verifying: dict[str, int] = {}  # drafts each request verifies in the step being run
        self._step_rows: list[tuple[float, int]] | None = None
        self._round_end: float | None = None
        # The last round's draft probabilities for vLLM's rejection sampler (`take_last_draft_probs`).
        self._draft_probs: torch.Tensor | None = None

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
        self.adapter.check_builder(view.attn_group.get_metadata_builder())
        refusal = refused_compilation(view.vllm_config.compilation_config)
        if refusal is not None:
            raise unsupported(*refusal)
        self.metrics = STDMetrics.for_worker(self.vllm_config, view.tp_rank)
        self.scorer = PrefillScorer(
            self.config, len(view.layers), view.block_size, view.layers[0].impl.scale, self.metrics
        )
        for index, layer in enumerate(view.layers):
            self._hook(layer.impl, index)
        self.rounds = RoundPlanner(view, self.config, self.scorer, self.metrics)
        self.sparse = SparseDrafter(view, self.adapter, self.config)
        self.view = view

    def after_warm_up(self) -> None:
        """Called once vLLM has warmed up (and captured its CUDA graphs), before any request: STD's own full
        graphs of the draft step where the engine allows them, the self-check, then the cost model.

        A capture that raises, or a self-check that fails on the full graphs, drops them with one warning
        line: the draft steps run on vLLM's piecewise graphs, checked again. A self-check failing there turns
        STD off for this engine, which serves on without speculation. Every rank takes the same branch
        (their forward passes hold collectives)."""
        if self.view is None or self.adapter is None or self.sparse is None or self._started:
            return
        self._started = True
        view = self.view
        start = time.perf_counter()
        error = self._attempt(self.sparse.capture_graphs)
        if view.any_rank(error is not None):
            self._drop_graphs("capture", error)
        elif self.sparse.graphs is not None:
            error = self._attempt(self._self_check)
            if view.any_rank(error is not None):
                self._drop_graphs("self-check", error)
        # The piecewise path, checked with the graphs set aside: it serves every batch they do not hold.
        graphs, self.sparse.graphs = self.sparse.graphs, None
        error = self._attempt(self._self_check)
        self.sparse.graphs = graphs
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
        if self.config.adaptive and self.rounds is not None:
            self.rounds.calibrate(self.adapter, self.sparse)
        if view.tp_rank == 0:
            self._log_settings(view, self_check_seconds)

    def _self_check(self) -> None:
        assert self.view is not None and self.adapter is not None and self.sparse is not None
        StartupSelfCheck(self.view, self.adapter, self.sparse).run()

    @staticmethod
    def _attempt(action: Callable[[], None]) -> SelfCheckFailed | None:
        """Runs a start-up check; what it raised, as a failed check (a kernel may raise anything)."""
        try:
            action()
        except SelfCheckFailed as exc:
            return exc
        except Exception as exc:
            return SelfCheckFailed(f"{type(exc).__name__}: {exc}")
        return None

    def _drop_graphs(self, stage: str, error: SelfCheckFailed | None) -> None:
        """STD's full graphs failed at `stage`: draft steps go back to vLLM's piecewise graphs."""
        assert self.view is not None and self.sparse is not None
        self.sparse.graphs = None
        if self.view.tp_rank == 0:
            logger.warning(
                "STD's full CUDA graphs of the draft step failed their %s on the %s attention backend (%s); "
                "draft steps run %s instead",
                stage,
                self.view.backend_name,
                error if error is not None else "on another tensor-parallel rank",
                self.sparse.describe(),
            )

    def _log_settings(self, view: RunnerView, self_check_seconds: float) -> None:
        """The one start-up line with the resolved settings (TP rank 0 only)."""
        logger.info(
            "STD on: gamma=%s%d top_k=%d (%d blocks of %d) selection=%s modalities=%s min_visual_tokens=%d "
            "look-up drafts=%s draft_probs=%s; %d layers, %s, draft steps %s (self-check passed in %.2f s)",
            "adaptive up to " if self.config.adaptive else "",
            self.config.num_speculative_tokens,
            self.config.top_k,
            self.config.top_k_blocks(view.block_size),
            view.block_size,
            self.config.selection,
            ",".join(self.config.modalities),
            self.config.min_visual_tokens,
            self.rounds.lookup.name if self.rounds and self.rounds.lookup else "off",
            self.config.draft_probs,
            len(view.layers),
            view.backend_name,
            self.sparse.describe() if self.sparse else "off",
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
        and note each row's drafts to verify (acceptance) and context (step overhead) for
        `RoundPlanner.learn`.

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
            if self.rounds is not None:
                self.rounds.forget(live)
        rows = self.view.batch_rows()
        for row in rows:
            if not self.scorer.known(row.req_id):
                self.scorer.admit(self.view.visual_request(row.req_id))
        self.scorer.plan_step(rows)
        if self.rounds is not None and self.rounds.policy is not None:
            shape = [(row.chunk_start, row.num_rows, self.view.num_prompt_tokens(row.req_id)) for row in rows]
            self._step_rows = StepOverhead.decode_rows(shape)
            self._verifying = {
                row.req_id: row.num_rows - 1
                for row, (start, _, prompt) in zip(rows, shape, strict=True)
                if start >= prompt
            }

    def release(self, req_ids: set[str]) -> None:
        """vLLM dropped these requests (finished or aborted): so does every per-request table here."""
        if self.scorer is not None:
            self.scorer.release(req_ids)
        if self.rounds is not None:
            self.rounds.release(req_ids)
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
        if self.view is None or self.scorer is None or self.rounds is None or self.disabled:
            return drafts
        rounds = self.rounds
        eligible = None
        if self._idle_steps and rounds.idle_left:
            # A batch that drafts nothing, unless one of its requests now finds a look-up draft (the same on
            # every rank: the tokens are).
            if rounds.lookup is not None:
                eligible = rounds.eligible(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)
            if eligible is None or not any(e.lookup.tokens for e in eligible[0]):
                rounds.repeat_idle()
                self._round_end = time.perf_counter()
                return drafts
        rounds.idle_left = 0
        now = time.perf_counter()
        since_round = None if self._round_end is None else now - self._round_end
        rounds.learn(self._verifying, self._step_rows, sampled_token_ids, since_round)
        if eligible is None:
            eligible = rounds.eligible(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)
        chosen = rounds.plan(*eligible)
        self._drafted = bool(chosen.sparse or chosen.looked_up)
        if self._drafted:
            self._draft(chosen, drafts, token_ids_cpu)
        self._round_end = time.perf_counter()
        return drafts

    def _draft(self, chosen: Round, drafts: list[list[int]], token_ids_cpu: Any) -> None:
        """The round's drafts into `drafts` (by batch row), with their probabilities where any samples."""
        assert self.sparse is not None and self.rounds is not None
        sparse, looked_up = chosen.sparse, chosen.looked_up
        for row, tokens in looked_up.items():
            drafts[row] = tokens
        longest = max([r.num_drafts for r in sparse] + [len(t) for t in looked_up.values()])
        sampler = self.sparse.sampler([r.row for r in sparse] + list(looked_up), len(drafts), longest)
        if sparse:
            seconds = self.sparse.run(sparse, token_ids_cpu, drafts, sampler)
            if self.metrics is not None:
                self.metrics.draft_seconds.observe(seconds)
            self.rounds.drafted(seconds, sparse)
        if sampler is not None:
            for row, tokens in looked_up.items():
                sampler.certain(row, tokens)
        self._draft_probs = None if sampler is None else sampler.probs
        if self.metrics is not None:
            self.metrics.drafts_proposed(sum(r.num_drafts for r in sparse), sum(map(len, looked_up.values())))

    def take_last_draft_probs(self) -> torch.Tensor | None:
        """The last round's draft probabilities, `[batch rows, drafts, vocab]`, or None where no drafting
        request samples; vLLM's runner reads them once (`GPUModelRunnerProposeDraftTokenIdsPatch`) and its
        rejection sampler verifies the drafts with them."""
        probs, self._draft_probs = self._draft_probs, None
        return probs
