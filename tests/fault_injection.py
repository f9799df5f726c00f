"""Faults on demand, for the tests that check the drafter contains them: a worker extension (vLLM's
`worker_extension_cls`, called through `LLM.collective_rpc` offline or `POST /collective_rpc` on a server in
dev mode) that makes the STD drafter's next block scoring, block selection or drafting round raise once."""

STAGES = ("scoring", "selection", "drafting")


class FaultInjector:
    def inject_fault(self, stage: str) -> None:
        """The next `stage` raises once: scoring a layer, selecting a prompt's blocks, or the third draft step
        of a round."""
        import vllm_std.capture as capture

        drafter = self.model_runner.drafter  # type: ignore[attr-defined]
        target, name = {
            "scoring": (drafter.scorer, "_score_layer"),
            "selection": (capture, "select_blocks"),
            "drafting": (drafter.sparse, "forward"),
        }[stage]
        original = getattr(target, name)

        def failing(*args, **kwargs):
            if stage == "drafting" and args[2] != 2:
                return original(*args, **kwargs)
            setattr(target, name, original)
            raise RuntimeError(f"injected {stage} fault")

        setattr(target, name, failing)
