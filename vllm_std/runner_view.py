"""The one seam between STD and vLLM's V1 model runner: everything STD reads from or runs through it.

A `custom_class` proposer receives only token ids, but STD needs the runner's requests (multimodal
placeholder ranges, block ids, M-RoPE deltas), its batch layout, its model and its attention metadata
builder. Keeping every such access here means a vLLM upgrade touches one file, and tests pin what it uses.
"""

from typing import Any

import torch

from vllm_std.capture import BatchRow, VisualRequest
from vllm_std.config import STDConfig, STDConfigError


class RunnerView:
    """Typed access to a bound `GPUModelRunner` (or its CPU subclass)."""

    def __init__(self, runner: Any, config: STDConfig) -> None:
        from vllm.distributed import get_tp_group
        from vllm.model_executor.layers.attention.attention import Attention
        from vllm.model_executor.models.utils import extract_layer_index

        self.runner = runner
        self.config = config
        self.vllm_config = runner.vllm_config
        groups = runner.kv_cache_config.kv_cache_groups
        if len(groups) != 1 or len(runner.attn_groups[0]) != 1:
            raise STDConfigError(
                "speculative_config.method 'std' needs one full-attention KV cache group with one attention "
                f"backend; this model has {len(groups)} groups: run without STD"
            )
        self.attn_group = runner.attn_groups[0][0]
        self.block_size: int = groups[0].kv_cache_spec.block_size
        if self.attn_group.kernel_block_size not in (None, self.block_size):
            raise STDConfigError(
                f"speculative_config.method 'std' needs kernel block size == KV block size "
                f"({self.attn_group.kernel_block_size} != {self.block_size}); use the default --block-size"
            )
        self.layer_names: list[str] = sorted(self.attn_group.layer_names, key=extract_layer_index)
        forward_context = self.vllm_config.compilation_config.static_forward_context
        self.layers: list[Attention] = [forward_context[name] for name in self.layer_names]
        self.backend_name: str = self.attn_group.backend.get_name()
        self._tp_group = get_tp_group()

    # Batch and requests -------------------------------------------------------------------------------

    def batch_rows(self) -> list[BatchRow]:
        """Rows of the forward pass being run, in the runner's request order."""
        batch = self.runner.input_batch
        num_reqs = batch.num_reqs
        starts = self.runner.query_start_loc.cpu[: num_reqs + 1].tolist()
        computed = batch.num_computed_tokens_cpu[:num_reqs].tolist()
        return [
            BatchRow(req_id, start, end - start, done)
            for req_id, start, end, done in zip(batch.req_ids, starts, starts[1:], computed, strict=False)
        ]

    def live_req_ids(self) -> set[str]:
        return set(self.runner.requests)

    def visual_request(self, req_id: str) -> VisualRequest:
        state = self.runner.requests[req_id]
        features = [f for f in state.mm_features if f.modality in self.config.modalities]
        spans = tuple((f.mm_position.offset, f.mm_position.length) for f in features)
        embeds = tuple(f.mm_position.is_embed for f in features)
        return VisualRequest(req_id, state.num_prompt_tokens, spans, embeds)

    def batch_req_ids(self) -> list[str]:
        return list(self.runner.input_batch.req_ids)

    def block_ids(self, req_id: str) -> list[int]:
        return self.runner.requests[req_id].block_ids[0]

    def remaining_tokens(self, req_id: str) -> int:
        """Tokens the request may still generate (its `max_tokens` minus what it has)."""
        state = self.runner.requests[req_id]
        max_tokens = getattr(state.sampling_params, "max_tokens", None)
        return self.max_model_len if max_tokens is None else max_tokens - len(state.output_token_ids)

    def sampling_seed(self, req_id: str) -> int | None:
        """The request's own `seed`, if it sets one."""
        return getattr(self.runner.requests[req_id].sampling_params, "seed", None)

    @property
    def sampling_metadata(self) -> Any:
        """The batch's sampling parameters as vLLM's sampler read them in the step just run (row order)."""
        return self.runner.input_batch.sampling_metadata

    @property
    def seed(self) -> int:
        """The engine's seed (the same on every rank)."""
        return self.vllm_config.model_config.seed or 0

    def num_prompt_tokens(self, req_id: str) -> int:
        return self.runner.requests[req_id].num_prompt_tokens

    def position_delta(self, req_id: str) -> int:
        """M-RoPE offset of generated tokens (0 for 1-D RoPE models)."""
        if not self.runner.uses_mrope:
            return 0
        return self.runner.requests[req_id].mrope_position_delta or 0

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def kv_caches(self) -> list[torch.Tensor]:
        """Every layer's paged KV cache, in vLLM's per-layer `[blocks, ...]` views."""
        return list(self.runner.kv_caches)

    @property
    def vocab_size(self) -> int:
        return self.vllm_config.model_config.get_vocab_size()

    @property
    def max_model_len(self) -> int:
        return self.runner.max_model_len

    @property
    def num_kv_blocks(self) -> int:
        return self.runner.kv_cache_config.num_blocks

    @property
    def max_num_seqs(self) -> int:
        return self.vllm_config.scheduler_config.max_num_seqs

    def broadcast_from_rank0(self, obj: Any) -> Any:
        """Rank 0's `obj` on every tensor-parallel rank (as is where there is one rank)."""
        group = self._tp_group
        return obj if group.world_size == 1 else group.broadcast_object(obj, src=0)

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` holds on any tensor-parallel rank (all ranks must take the same branch)."""
        group = self._tp_group
        if group.world_size == 1:
            return flag
        import torch.distributed as dist

        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group.cpu_group)
        return bool(value.item())

    @property
    def tp_rank(self) -> int:
        """This worker's tensor-parallel rank: only rank 0 logs and writes metrics."""
        return self._tp_group.rank_in_group

    # Running the model --------------------------------------------------------------------------------

    def draft_logits(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        attn_metadata: dict[str, Any],
        graphs: bool = True,
    ) -> torch.Tensor:
        """One forward of the target model over the given tokens and per-layer metadata (a draft step, or a
        step of the start-up calibration or self-check); logits for every token.

        Inputs go through the runner's own persistent buffers, exactly as its forward passes do: the model
        was compiled once (no guards) against views of those buffers, and vLLM's piecewise CUDA graphs were
        captured on them. With `graphs` and piecewise graphs captured (`piecewise_drafts`), the batch is
        padded to a captured size and replays them: attention and the KV write run eagerly between the
        pieces and read the per-layer metadata and true slots given here; padded rows write to slot -1.
        """
        from vllm.config import CUDAGraphMode
        from vllm.forward_context import set_forward_context

        runner, model = self.runner, self.runner.model
        num = token_ids.shape[0]
        mode, descriptor = CUDAGraphMode.NONE, None
        if graphs and self.piecewise_drafts:
            mode, descriptor = runner.cudagraph_dispatcher.dispatch(
                num, valid_modes={CUDAGraphMode.PIECEWISE, CUDAGraphMode.NONE}
            )
        padded = descriptor.num_tokens if mode == CUDAGraphMode.PIECEWISE else num
        ids = runner.input_ids.gpu[:padded]
        ids[:num].copy_(token_ids)
        ids[num:].zero_()
        inputs_embeds = None
        input_ids: torch.Tensor | None = ids
        if runner.supports_mm_inputs:
            runner.inputs_embeds.gpu[:padded].copy_(model.embed_input_ids(ids))
            inputs_embeds = runner.inputs_embeds.gpu[:padded]
            if not model.requires_raw_input_tokens:
                input_ids = None
        if runner.uses_mrope:
            pos = runner.mrope_positions.gpu[:, :padded]
            pos[:, :num].copy_(positions.expand(runner.mrope_num_dims, -1))
            pos[:, num:].zero_()
        else:
            pos = runner.positions[:padded]
            pos[:num].copy_(positions)
            pos[num:].zero_()
        if padded > num:
            slots = torch.cat([slots, slots.new_full((padded - num,), -1)])
        slot_mapping = dict.fromkeys(self.layer_names, slots)
        with set_forward_context(
            attn_metadata,
            self.vllm_config,
            num_tokens=padded,
            cudagraph_runtime_mode=mode,
            batch_descriptor=descriptor,
            slot_mapping=slot_mapping,
        ):
            hidden = model(
                input_ids=input_ids, positions=pos, intermediate_tensors=None, inputs_embeds=inputs_embeds
            )
        return model.compute_logits(hidden[:num])

    @property
    def piecewise_drafts(self) -> bool:
        """Whether draft steps can replay vLLM's piecewise CUDA graphs of the target: graphs were captured,
        and attention and the KV write are splitting ops (run eagerly between the pieces, so they read the
        drafter's per-layer metadata and slots, not what the graphs captured)."""
        compilation = self.vllm_config.compilation_config
        splitting_ops = compilation.splitting_ops or ()
        return (
            not self.vllm_config.model_config.enforce_eager
            and compilation.cudagraph_mode.has_piecewise_cudagraphs()
            and "vllm::unified_attention_with_output" in splitting_ops
            and "vllm::unified_kv_cache_update" in splitting_ops
        )

    @property
    def full_draft_graphs(self) -> bool:
        """Whether STD may capture full graphs of its draft step (`vllm_std.draft_graphs`)."""
        from vllm_std.draft_graphs import full_graphs_allowed

        return full_graphs_allowed(
            self.device.type,
            self.backend_name,
            self.vllm_config.model_config.enforce_eager,
            self.vllm_config.compilation_config.cudagraph_mode,
        )

    @property
    def cudagraph_capture_sizes(self) -> list[int]:
        """The batch sizes (in tokens) vLLM captured its graphs for."""
        return list(self.vllm_config.compilation_config.cudagraph_capture_sizes or [])

    @property
    def max_cudagraph_capture_size(self) -> int | None:
        """vLLM's largest capture size: the batches up to which its builders prepare metadata for graphs."""
        return self.vllm_config.compilation_config.max_cudagraph_capture_size

    def dense_metadata(self, common: Any) -> dict[str, Any]:
        """Per-layer metadata as the target builds it: one build of `common` read by every layer."""
        built = self.attn_group.get_metadata_builder().build(common_prefix_len=0, common_attn_metadata=common)
        return dict.fromkeys(self.layer_names, built)

    def common_metadata(
        self, seq_lens: torch.Tensor, block_table: torch.Tensor, slots: torch.Tensor, query_len: int = 1
    ) -> Any:
        """vLLM's backend-independent metadata for `B` requests of `query_len` new tokens each."""
        from vllm.v1.attention.backend import CommonAttentionMetadata

        num = seq_lens.shape[0]
        device = self.runner.device
        query_start_loc = torch.arange(num + 1, dtype=torch.int32) * query_len
        return CommonAttentionMetadata(
            query_start_loc=query_start_loc.to(device),
            query_start_loc_cpu=query_start_loc,
            seq_lens=seq_lens.to(device),
            num_reqs=num,
            num_actual_tokens=num * query_len,
            max_query_len=query_len,
            max_seq_len=int(seq_lens.max()),
            block_table_tensor=block_table.to(device),
            slot_mapping=slots.to(device),
            causal=True,
        )
