"""`vllm-std bench`: STD against no speculation, vLLM's ngram and suffix decoding and baseline selections, on
the same requests (`workloads`), each method a speculative config (`methods`).

Each method has its own offline engine (`engines`, one process each; `server` measures running `vllm serve`
instances instead); by default all are alive at once and take turns on every batch, so that they share the
machine's drift. A workload is a number of visual tokens and a batch size; its batches are the same for every
method, each with its own synthetic videos (so vLLM's prefix cache spares no prefill). Figures come from
vLLM's own metrics (per-request time per output token, spec-decode counters) and STD's (drafting time),
differenced around each batch. From them the run fits the cost model (`analysis`, `vllm_std.cost_model`):
dense one-token steps from the runs without speculation, STD's draft and verify steps from its runs, and sets
the model's predicted speedup beside each measured one.
Outputs, in `--out`: `bench.json` (all figures and the environment), `bench.md` (a table shaped like the
paper's Table 1) and PNG plots (`report`)."""
