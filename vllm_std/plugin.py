"""vLLM general-plugin entry point (group `vllm.general_plugins`, name `std`)."""


def register() -> None:
    """Called by vLLM in every process (API server, engine core, workers): cheap and idempotent.

    Only the engine-argument patches apply here; they touch `vllm.engine.arg_utils`, which vLLM has already
    imported when it loads plugins. The worker patch is applied by `STDProposer` itself, so processes that
    never run STD pay nothing.
    """
    from vllm_std.patches import ENGINE_PATCHES

    for patch in ENGINE_PATCHES:
        patch.apply()
