"""The benchmark's Markdown table and plots, from `bench.json`'s content (`vllm_std.bench.command`)."""

import collections
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _grid(rows: list[dict[str, Any]], cell: Callable[[dict[str, Any]], str]) -> str:
    """Methods x workloads from rows that carry a "method" and a "workload", each cell `cell(row)`."""
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    by_method: dict[str, dict[str, dict[str, Any]]] = collections.defaultdict(dict)
    for r in rows:
        by_method[r["method"]][r["workload"]] = r
    lines = [
        "| method | " + " | ".join(workloads) + " |",
        "| --- |" + " --- |" * len(workloads),
    ]
    for method, cells in by_method.items():
        row = (cell(cells[w]) if w in cells else "" for w in workloads)
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _acceptance_and_speedup(r: dict[str, Any]) -> str:
    acceptance = "—" if r["acceptance_rate"] is None else f"{100 * r['acceptance_rate']:.0f} %"
    speed = f"{r.get('speedup_tpot', float('nan')):.2f}x"
    if "predicted_speedup" in r:
        speed += f" ({r['predicted_speedup']:.2f}x)"
    if r.get("lookup_share"):
        speed += f" · {100 * r['lookup_share']:.0f} % look-up"
    return f"{acceptance} / {speed}" + (" ✗" if r["identical_to_no_speculation"] is False else "")


def markdown_table(records: list[dict[str, Any]]) -> str:
    """Methods x workloads, like the paper's Table 1: acceptance rate / speedup in time per output token
    (measured; the cost model's prediction in brackets; for adaptive STD with look-up drafts, the share of
    its draft tokens that were look-ups); a cross marks output that differs from no speculation (never a
    sampled run's, which is not compared: None)."""
    return _grid(records, _acceptance_and_speedup)


def one_pass_note(records: list[dict[str, Any]]) -> str:
    """What the one-pass workloads are and how long their outputs were (empty if none ran)."""
    lengths = {round(r["output_tokens"]) for r in records if r.get("answers") == "one-pass"}
    if not lengths:
        return ""
    return (
        "\n`one-pass`: each video has one marked clip of all 48 content words, so that the answer (the "
        "marker's name, then the clip's words: 49 tokens) holds no token twice; a request's output stops at "
        f"the answer's end, or sooner at the run's output length: {', '.join(map(str, sorted(lengths)))} "
        "tokens a request here. The other workloads ask about a clip of 12 words, whose answer cycles "
        "through them for the whole output length.\n"
    )


def sampling_note(temperature: float) -> str:
    """How the outputs were sampled, and so whether the table's crosses mean anything."""
    if temperature == 0:
        return "Greedy outputs (temperature 0): ✗ marks one that differs from no speculation's."
    return (
        f"Outputs sampled at temperature {temperature:g}, so not compared token by token with no "
        "speculation's (a sampled output differs from it legitimately; that sampling stays lossless is "
        "checked by the test suite's distribution test, tests/test_std_sampling.py)."
    )


def markdown(result: dict[str, Any]) -> str:
    """`bench.md`: the run's settings, the methods x workloads table and the pooled one."""
    environment = result["environment"]
    code = ""  # runs recorded before vllm-std named its own version leave it out
    if "vllm_std" in environment:
        # 40 hex digits, `+` for uncommitted changes; None for a wheel
        commit = environment["vllm_std_commit"]
        at = f" at `{commit[:12]}{commit[40:]}`" if commit else ""
        code = f"vllm-std {environment['vllm_std']}{at}, "
    header = (
        f"# vllm-std bench\n\nModel `{result['model']}`; {code}vLLM {environment['vllm']}, "
        f"{environment['cpus']} CPUs. Cells: acceptance / speedup in time per output token vs no speculation "
        "(cost model's prediction in brackets; `· N % look-up`: the share of STD's draft tokens copied from "
        f"the request's own text). {sampling_note(result['command']['temperature'])}\n\n"
    )
    records = result["records"]
    return header + markdown_table(records) + one_pass_note(records) + pooled_table(result["pooled"])


def pooled_table(pooled: list[dict[str, Any]]) -> str:
    """The methods run twice, each against no speculation with both runs of each pooled (empty if none)."""
    if not pooled:
        return ""
    heading = (
        "\nBoth runs pooled (time per output token over a method's two runs against no speculation's two; "
        "runs ordered so that a steady drift cancels): from the means over all batches / the median of the "
        "batches' ratios (which a stall during one batch does not move). `none again`: the second engine "
        "without speculation against the first, the run's noise:\n\n"
    )
    return heading + _grid(pooled, lambda p: f"{p['speedup_tpot']:.2f}x / {p['speedup_tpot_median']:.2f}x")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot(
    records: list[dict[str, Any]],
    x: str,
    group: tuple[str, ...],
    path: Path,
    title: str,
    y: str = "speedup_tpot",
    fixed: dict[str, Any] | None = None,
) -> None:
    """Fixed-gamma STD runs against `x`, one line per value of the `group` fields: measured `y` (dots) and,
    for speedup, the cost model's prediction (dashed); only runs whose `fixed` fields have those values."""
    lines: dict[Any, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in records:
        if r["kind"] == "std" and r.get(y) is not None and all(r[k] == v for k, v in (fixed or {}).items()):
            lines[" ".join(str(r[g]) for g in group)].append(r)
    if not lines or all(len({r[x] for r in rs}) < 2 for rs in lines.values()):
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for key, rs in sorted(lines.items(), key=lambda kv: str(kv[0])):
        rs = sorted(rs, key=lambda r: r[x])
        (line,) = ax.plot([r[x] for r in rs], [r[y] for r in rs], "o-", label=key)
        predicted = [(r[x], r["predicted_speedup"]) for r in rs if "predicted_speedup" in r]
        if predicted and y == "speedup_tpot":
            ax.plot(*zip(*predicted, strict=True), "--", color=line.get_color(), alpha=0.7)
    if y == "speedup_tpot":
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_ylabel("speedup (solid: measured, dashed: cost model)")
    else:
        ax.set_ylabel(y.replace("_", " "))
    ax.set_xlabel(x)
    ax.set_title(title)
    _save(plt, fig, ax, path)


def _plot_methods(records: list[dict[str, Any]], path: Path) -> None:
    """Per workload, each method family's speedup (its best run where it was swept): adaptive STD beside
    the best fixed gamma, the baselines, and no speculation at 1."""
    workloads = list(dict.fromkeys(r["workload"] for r in records))
    best: dict[str, dict[str, float]] = collections.defaultdict(dict)
    for r in records:
        if "speedup_tpot" in r and r["kind"] != "none" and not r["method"].endswith(" again"):
            cell = best[r["kind"]]
            cell[r["workload"]] = max(cell.get(r["workload"], 0.0), r["speedup_tpot"])
    if not best:
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 4))
    width = 0.8 / len(best)
    for i, (kind, cells) in enumerate(best.items()):
        xs = [j + i * width for j in range(len(workloads))]
        label = "std (best fixed gamma, K)" if kind == "std" else kind
        ax.bar(xs, [cells.get(w, 0.0) for w in workloads], width, label=label)
    ax.axhline(1.0, color="grey", lw=0.8)
    ticks = [j + 0.4 - width / 2 for j in range(len(workloads))]
    # Labels such as "8k x4 one-pass" overlap once there are more than a few workloads: slant them.
    slanted = len(workloads) > 4
    ax.set_xticks(ticks, workloads, rotation=30 if slanted else 0, ha="right" if slanted else "center")
    ax.set_xlabel("workload (visual tokens x batch)")
    ax.set_ylabel("speedup vs no speculation (TPOT)")
    ax.set_title("Methods side by side")
    _save(plt, fig, ax, path)


def _save(plt: Any, fig: Any, ax: Any, path: Path) -> None:
    """Writes the figure with its legend beside the plot, never over the data."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(result: dict[str, Any], out: Path) -> None:
    records = result["records"]
    (out / "bench.md").write_text(markdown(result))
    _plot_methods(records, out / "methods.png")
    std = [r for r in records if r["kind"] == "std"]
    if not std:
        return
    # The sweeps of `vllm_std.bench.methods`: gamma at the first K, K at the first gamma.
    first = {"gamma": std[0]["gamma"], "top_k": std[0]["top_k"]}
    workload, method = ("visual_tokens", "batch", "turn", "answers"), ("method", "turn", "answers")
    _plot(
        records,
        "gamma",
        workload,
        out / "speedup_vs_gamma.png",
        "STD: speedup vs gamma",
        fixed={"top_k": first["top_k"]},
    )
    _plot(
        records,
        "top_k",
        workload,
        out / "speedup_vs_top_k.png",
        "STD: speedup vs K",
        fixed={"gamma": first["gamma"]},
    )
    _plot(
        records,
        "top_k",
        workload,
        out / "acceptance_vs_top_k.png",
        "STD: acceptance vs K",
        y="acceptance_rate",
        fixed={"gamma": first["gamma"]},
    )
    _plot(
        records,
        "visual_tokens",
        (*method, "batch"),
        out / "speedup_vs_visual_tokens.png",
        "STD: speedup vs video length",
    )
    _plot(
        records,
        "batch",
        (*method, "visual_tokens"),
        out / "speedup_vs_batch.png",
        "STD: speedup vs batch size",
    )
