"""vLLM general-plugin entry point (group `vllm.general_plugins`, name `std`)."""

import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any

ExceptHook = Callable[[type[BaseException], BaseException, TracebackType | None], Any]


def register() -> None:
    """Called by vLLM in every process (API server, engine core, workers): cheap and idempotent.

    The engine-argument patches and the CPU kernel fix apply here: vLLM has imported their targets when it
    loads plugins, and a worker loads plugins just before it registers its CPU kernel fallbacks. The runner
    patch is applied by `STDProposer` itself, so processes that never run STD pay nothing for it.
    """
    from vllm_std.patches import PLUGIN_PATCHES

    for patch in PLUGIN_PATCHES:
        patch.apply()
    if not isinstance(sys.excepthook, _OneLineSTDErrors):
        sys.excepthook = _OneLineSTDErrors(sys.excepthook)


class _OneLineSTDErrors:
    """Ends a process that dies of a bad STD setting with the setting's one-line message, not a traceback.

    Settings that need the model or the other engine flags (`vllm_std.patches.check_engine`) are refused
    while vLLM builds its config, after argparse; this keeps that refusal as terse as argparse's.
    """

    def __init__(self, previous: ExceptHook) -> None:
        self.previous = previous

    def __call__(self, kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
        from vllm_std.config import STDConfigError

        if isinstance(error, STDConfigError):
            print(f"error: {error}", file=sys.stderr)
        else:
            self.previous(kind, error, tb)
