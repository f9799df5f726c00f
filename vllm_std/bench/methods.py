"""The bench's methods (a speculative config under a label) and workloads (visual tokens x batch)."""

import dataclasses
import importlib.util
from typing import Any

BASELINES = ("streaming", "recent_visual", "random")
"""STD's drafter with another selection: the paper's StreamingLLM drafter and two of our own."""
ADAPTIVE = ("adaptive", "adaptive_sparse")
"""Adaptive STD, with look-up drafts and without: its draft length varies by step, so it has no per-step
cost or fixed-gamma prediction of its own."""
ANSWERS = ("cycling", "one-pass")
"""The look-up fixture's answers: a clip's words cycling for the whole output (what ngram and suffix
decoding copy after one cycle), or one pass through a clip of every content word, no token twice."""


@dataclasses.dataclass(frozen=True)
class Method:
    """A speculative config under a readable label (`None`: no speculation)."""

    label: str
    kind: str  # one of METHODS; "server": a `--server`
    gamma: int = 0  # for ADAPTIVE, the most drafted
    top_k: int = 0

    def speculative_config(self) -> dict[str, Any] | None:
        if self.kind == "none":
            return None
        if self.kind == "ngram":
            return {"method": "ngram", "num_speculative_tokens": self.gamma, "prompt_lookup_max": 4}
        if self.kind == "suffix":
            return {"method": "suffix", "num_speculative_tokens": self.gamma}
        selection = self.kind if self.kind in BASELINES else "attention"
        config = {
            "method": "std",
            "num_speculative_tokens": self.gamma,
            "top_k": self.top_k,
            "selection": selection,
            "adaptive": self.kind in ADAPTIVE,
        }
        if self.kind == "adaptive_sparse":
            # Plain STD, sparse drafts only: what the look-up drafts add to adaptive STD.
            config["lookup"] = False
        if self.kind == "std_onehot":
            # Argmax drafts verified as one-hot: what drafting from the drafter's distribution is measured
            # against on sampled runs (greedy runs draft and verify the same either way).
            config["draft_probs"] = False
        return config


@dataclasses.dataclass(frozen=True)
class Workload:
    """A batch of `batch` questions about videos of `visual_tokens` visual tokens each; with `turn` > 1, the
    follow-up questions of turn `turn` of conversations about those videos (their KV from the prefix
    cache). `answers` (one of ANSWERS) says which of the look-up fixture's tasks is asked."""

    visual_tokens: int
    batch: int
    turn: int = 1
    answers: str = "cycling"

    @property
    def label(self) -> str:
        size = (
            f"{self.visual_tokens // 1024}k x{self.batch}"
            if self.visual_tokens >= 1024
            else (f"{self.visual_tokens} x{self.batch}")
        )
        if self.answers != "cycling":  # the cycling label is the one of earlier runs' tables
            size += f" {self.answers}"
        return size if self.turn == 1 else f"{size} turn {self.turn}"

    def turns(self, count: int) -> list["Workload"]:
        """This workload's turns 1..count."""
        return [dataclasses.replace(self, turn=t) for t in range(1, count + 1)]


METHODS = ["none", "std", "std_onehot", *ADAPTIVE, "ngram", "suffix", *BASELINES]

OPT_IN = ("std_onehot",)
"""Kinds run only where `--methods` names them: STD with one-hot verification is a comparison for sampled
runs (`--temperature`), the same engine as `std` on greedy ones."""


def suffix_decoding_installed() -> bool:
    """Whether vLLM's suffix decoding can run: it imports Arctic Inference's suffix tree."""
    return importlib.util.find_spec("arctic_inference") is not None


def methods(kinds: list[str], gammas: list[int], top_ks: list[int]) -> list[Method]:
    """Every method to run: STD (fixed gamma) at each gamma with the first K and at each K with the first
    gamma; STD with one-hot verification and the baselines at the first gamma and K; adaptive STD (with
    look-up drafts, then without) up to the largest gamma, at the first K."""
    gamma, k = gammas[0], top_ks[0]
    out = [Method("none", "none")] if "none" in kinds else []
    if "adaptive" in kinds:
        out.append(Method(f"adaptive g<={max(gammas)} K{k}", "adaptive", max(gammas), k))
    if "adaptive_sparse" in kinds:
        out.append(Method(f"adaptive g<={max(gammas)} K{k} sparse only", "adaptive_sparse", max(gammas), k))
    if "std" in kinds:
        sweep = dict.fromkeys([(g, k) for g in gammas] + [(gamma, kk) for kk in top_ks])
        out += [Method(f"std g{g} K{kk}", "std", g, kk) for g, kk in sweep]
    if "std_onehot" in kinds:
        out.append(Method(f"std-onehot g{gamma} K{k}", "std_onehot", gamma, k))
    out += [Method(f"{kind} g{gamma}", kind, gamma) for kind in ("ngram", "suffix") if kind in kinds]
    baselines = [kind for kind in BASELINES if kind in kinds]
    out += [Method(f"{kind} g{gamma} K{k}", kind, gamma, k) for kind in baselines]
    if "none" in kinds and len(out) > 1:
        # Adaptive STD and no speculation in a second engine each, last and in reverse order: how far two
        # identical engines differ on this machine (the run's noise), how far adaptive STD's timing-driven
        # choices differ between engines, and, run one after another, (none, adaptive, ..., adaptive, none)
        # pooled per method cancels a steady drift of the machine. Only adaptive STD as users get it (with
        # look-up drafts) is repeated: one engine more per run is enough noise measured.
        out += [dataclasses.replace(m, label=f"{m.label} again") for m in out if m.kind == "adaptive"]
        out.append(Method("none again", "none"))
    return out
