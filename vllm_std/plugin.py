"""vLLM general-plugin entry point (group `vllm.general_plugins`, name `std`)."""


def register() -> None:
    """Called by vLLM in every process (API server, engine core, workers): cheap and idempotent.

    The engine-argument patches and the CPU kernel fix apply here: vLLM has imported their targets when it
    loads plugins, and a worker loads plugins just before it registers its CPU kernel fallbacks. The runner
    patch is applied by `STDProposer` itself, so processes that never run STD pay nothing for it.
    """
    from vllm_std.patches import PLUGIN_PATCHES

    for patch in PLUGIN_PATCHES:
        patch.apply()
