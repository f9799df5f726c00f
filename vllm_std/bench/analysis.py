"""The bench's arithmetic: batches pooled per method and workload into records (outputs compared with no
speculation's), speedups against no speculation, and the cost model fitted to the measured steps. No vLLM."""

import dataclasses
import statistics
from typing import Any

from vllm_std.bench.engines import BY_LABEL
from vllm_std.bench.methods import ADAPTIVE, BASELINES, Method, Workload
from vllm_std.cost_model import CostModel, fit_step_cost, fit_verify_cost


def _pooled(values: list[Any]) -> Any:
    """Sums one metric's differences over batches: numbers, `(count, sum)` pairs, per-position lists."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if isinstance(present[0], (tuple, list)):
        return type(present[0])(map(sum, zip(*present, strict=True)))
    return sum(present)


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """One method on one workload, its batches (`vllm_std.bench.engines.sample`) pooled: outputs, time per
    output token, acceptance, STD's drafting time, its decisions and the sources of its draft tokens (the
    look-up share: draft tokens copied from the request's own text, of all STD drafted)."""
    concatenated = ("token_ids", "prompt_tokens")
    pooled = {
        key: _pooled([s[key] for s in samples]) for key in samples[0] if key not in (*concatenated, *BY_LABEL)
    }
    by_label = {
        key: {value: _pooled([s[key][value] for s in samples]) for value in values}
        for key, (_, _, values) in BY_LABEL.items()
    }
    sources = by_label["draft_tokens_by_source"]
    proposed = sum(n or 0 for n in sources.values())
    token_ids = [ids for s in samples for ids in s["token_ids"]]
    prompt_tokens = [n for s in samples for n in s["prompt_tokens"]]
    tpot, decode = pooled["tpot"], pooled["decode"]
    drafts, draft_tokens = pooled["drafts"] or 0, pooled["draft_tokens"] or 0
    accepted = pooled["accepted_tokens"] or 0
    draft_time = pooled["draft_time"] or (0, 0.0)
    chosen = pooled["chosen_gamma"] or (0, 0.0)
    return {
        "token_ids": token_ids,
        "prompt_tokens": sum(prompt_tokens) / len(prompt_tokens),
        "batches": len(samples),
        "wall_seconds": pooled["wall_seconds"],
        "output_tokens": sum(map(len, token_ids)) / len(token_ids),  # a request's, on average
        "output_tokens_per_second": sum(map(len, token_ids)) / pooled["wall_seconds"],
        "tpot_seconds": tpot[1] / tpot[0],
        # Per batch, in the order run: how far the machine moved between batches (the spread of a ratio).
        "tpot_seconds_by_batch": [s["tpot"][1] / s["tpot"][0] for s in samples],
        "decode_seconds": decode[1] / decode[0],
        "drafts": drafts,
        "draft_tokens": draft_tokens,
        "accepted_tokens": accepted,
        "acceptance_rate": accepted / draft_tokens if draft_tokens else None,
        "mean_acceptance_length": 1 + accepted / drafts if drafts else None,
        "accepted_at": conditional_acceptance([n / drafts for n in pooled["accepted_per_pos"] or []])
        if drafts
        else [],
        "draft_steps": draft_time[0],
        "draft_seconds": draft_time[1],
        "mean_chosen_gamma": chosen[1] / chosen[0] if chosen[0] else None,
        **by_label,
        "lookup_share": (sources["lookup"] or 0) / proposed if proposed else None,
    }


def method_records(
    plan: list[Method],
    workloads: list[Workload],
    samples: dict[tuple[str, str], list[dict[str, Any]]],
    temperature: float,
) -> list[dict[str, Any]]:
    """Each method's figures on each workload (`summarize`), its outputs compared with the first method's
    (no speculation, or the first server), and its speedups against no speculation's where that ran.
    Sampled (`temperature` > 0), an output differs from no speculation's legitimately, so the comparison is
    None: that sampling stays lossless is what the test suite's distribution test checks
    (tests/test_std_sampling.py)."""
    records: list[dict[str, Any]] = []
    reference: dict[str, list[list[int]]] = {}
    for method in plan:
        for workload in workloads:
            record = summarize(samples[method.label, workload.label])
            token_ids = record.pop("token_ids")
            reference.setdefault(workload.label, token_ids)
            record |= dataclasses.asdict(method) | dataclasses.asdict(workload)
            record["method"], record["workload"] = method.label, workload.label
            record["identical_to_no_speculation"] = (
                token_ids == reference[workload.label] if temperature == 0 else None
            )
            if method.top_k:
                record["sparse_context"] = (
                    min(method.top_k, workload.visual_tokens)
                    + record["prompt_tokens"]
                    - workload.visual_tokens
                )
            if method.gamma and method.kind not in ADAPTIVE:  # adaptive's length varies: no per-step cost
                step_costs(record, method.gamma)
            records.append(record)
    none = {r["workload"]: r for r in records if r["method"] == "none"}
    for r in records:
        if r["workload"] in none:
            base = none[r["workload"]]
            r["speedup_tpot"] = base["tpot_seconds"] / r["tpot_seconds"]
            r["speedup_tpot_by_batch"] = [
                a / b for a, b in zip(base["tpot_seconds_by_batch"], r["tpot_seconds_by_batch"], strict=True)
            ]
            r["speedup_throughput"] = r["output_tokens_per_second"] / base["output_tokens_per_second"]
    return records


def exit_status(records: list[dict[str, Any]]) -> int:
    """1 if any output differs from no speculation's; sampled runs, not compared (None), pass."""
    return 1 if any(r["identical_to_no_speculation"] is False for r in records) else 0


def conditional_acceptance(reached: list[float]) -> list[float]:
    """vLLM counts, per position i, the rounds whose first i + 1 drafts were all accepted; the cost model
    wants the chance that draft i + 1 is accepted given drafts 1..i were."""
    previous = [1.0, *reached[:-1]] if reached else []
    return [r / p if p > 0 else 0.0 for r, p in zip(reached, previous, strict=True)]


def pooled_speedups(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each method run twice (a `... again` run), its speedup over no speculation with both runs of each
    pooled: time per output token of the two runs without speculation over the method's two, from their
    means over all batches, and the median over batches of the same ratio batch by batch (the same requests
    on all four engines, back to back), which a stall of the machine during one batch does not move. The
    runs go none, method, ..., method again, none again, so a steady drift of the machine cancels. Also, as
    the run's noise, the second engine without speculation against the first (`none again`)."""
    by_label = {(r["method"], r["workload"]): r for r in records}
    out = []
    for r in records:
        workload = r["workload"]
        none = [by_label.get((label, workload)) for label in ("none", "none again")]
        again = by_label.get((f"{r['method']} again", workload))
        if None in none:
            continue
        if r["method"] == "none again":
            base, runs = none[:1], [r]
        elif r["kind"] != "none" and again is not None:
            base, runs = none, [r, again]
        else:
            continue
        by_batch = [
            sum(b) / sum(m)
            for b, m in zip(
                zip(*(x["tpot_seconds_by_batch"] for x in base), strict=True),
                zip(*(x["tpot_seconds_by_batch"] for x in runs), strict=True),
                strict=True,
            )
        ]
        out.append(
            {
                "method": r["method"],
                "workload": workload,
                "speedup_tpot": sum(x["tpot_seconds"] for x in base) / sum(x["tpot_seconds"] for x in runs),
                "speedup_tpot_median": statistics.median(by_batch),
                "speedup_tpot_by_batch": by_batch,
            }
        )
    return out


def step_context(record: dict[str, Any], sparse: bool = False) -> float:
    """A decode step's context on average over a request's output: the prompt (with `sparse`, the kept
    visual tokens plus text, what a draft step reads) plus half the output (a one-pass request's output
    ends sooner than the others')."""
    return record["sparse_context" if sparse else "prompt_tokens"] + record["output_tokens"] / 2


def fit_cost_model(records: list[dict[str, Any]]) -> CostModel | None:
    """Dense steps from the runs without speculation; draft and verify steps from STD's runs, each at its
    context (`step_context`)."""
    dense = [r for r in records if r["kind"] == "none"]
    std = [r for r in records if r["kind"] == "std" and r["draft_steps"]]
    if len(dense) < 1 or not std:
        return None
    dense_cost = fit_step_cost(
        [r["batch"] for r in dense], [step_context(r) for r in dense], [r["tpot_seconds"] for r in dense]
    )
    draft_cost = fit_step_cost(
        [r["batch"] for r in std],
        [step_context(r, sparse=True) for r in std],
        [r["draft_step_seconds"] for r in std],
    )
    verify_cost = fit_verify_cost(
        [r["batch"] for r in std],
        [step_context(r) for r in std],
        [r["gamma"] for r in std],
        [r["verify_step_seconds"] for r in std],
    )
    return CostModel(dense_cost, draft_cost, verify_cost)


def predict(records: list[dict[str, Any]], cost_model: CostModel) -> None:
    """Adds the cost model's predicted speedup to each fixed-gamma run of STD's drafter that accepted
    anything (adaptive runs choose their own gamma step by step: no single prediction)."""
    for r in records:
        if r["kind"] in ("std", "std_onehot", *BASELINES) and r["accepted_at"]:
            r["predicted_speedup"] = cost_model.speedup(
                r["batch"], step_context(r), step_context(r, sparse=True), r["accepted_at"], r["gamma"]
            )


def step_costs(record: dict[str, Any], gamma: int) -> None:
    """Adds the per-step costs of an STD-family run: drafting time per draft step and the verify step time
    (a drafting step's decode time less its drafting). Drafting steps are counted per engine step, and
    decode time per request; a batch's requests decode in the same steps, so the workload's decode time is
    one request's times the number of batches."""
    steps = record["draft_steps"]
    if not steps:
        return
    decode = record["decode_seconds"] * record["batches"]
    record["draft_step_seconds"] = record["draft_seconds"] / steps / gamma
    record["verify_step_seconds"] = (decode - record["draft_seconds"]) / steps
