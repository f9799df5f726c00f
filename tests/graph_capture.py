"""A worker extension (vLLM's `worker_extension_cls`) for the test that STD's layer hooks stand still while
a CUDA graph is captured: it makes STD's capture check answer "capturing" on the CPU, where no graph is."""


class AlwaysCapturing:
    def capture_forever(self) -> None:
        import vllm_std.proposer as proposer

        proposer._capturing = lambda: True
