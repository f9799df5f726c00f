"""The benchmark's Markdown table and plots, from `bench.json`'s content (`vllm_std.bench`)."""

import collections
from pathlib import Path
from typing import Any


def markdown_table(records: list[dict[str, Any]]) -> str:
    """Methods x workloads, like the paper's Table 1: acceptance rate / speedup in time per output token
    (measured; the cost model's prediction in brackets); a cross marks output that differs from no
    speculation."""
    workloads = list(dict.fromkeys(r["workload"] for r in records))
    by_method: dict[str, dict[str, dict[str, Any]]] = collections.defaultdict(dict)
    for r in records:
        by_method[r["method"]][r["workload"]] = r
    lines = [
        "| method | " + " | ".join(workloads) + " |",
        "| --- |" + " --- |" * len(workloads),
    ]
    for method, cells in by_method.items():
        row = []
        for w in workloads:
            r = cells.get(w)
            if r is None:
                row.append("")
                continue
            acceptance = "—" if r["acceptance_rate"] is None else f"{100 * r['acceptance_rate']:.0f} %"
            speed = f"{r.get('speedup_tpot', float('nan')):.2f}x"
            if "predicted_speedup" in r:
                speed += f" ({r['predicted_speedup']:.2f}x)"
            row.append(f"{acceptance} / {speed}" + ("" if r["identical_to_no_speculation"] else " ✗"))
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _plot(records: list[dict[str, Any]], x: str, group: str, path: Path, title: str) -> None:
    """Measured (dots) and predicted (dashed) speedup of STD runs against `x`, one line per `group`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[Any, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in records:
        if r["kind"] == "std" and "speedup_tpot" in r:
            lines[r[group]].append(r)
    if not lines or all(len({r[x] for r in rs}) < 2 for rs in lines.values()):
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, rs in sorted(lines.items(), key=lambda kv: str(kv[0])):
        rs = sorted(rs, key=lambda r: r[x])
        (line,) = ax.plot([r[x] for r in rs], [r["speedup_tpot"] for r in rs], "o-", label=f"{group} {key}")
        predicted = [(r[x], r["predicted_speedup"]) for r in rs if "predicted_speedup" in r]
        if predicted:
            ax.plot(*zip(*predicted, strict=True), "--", color=line.get_color(), alpha=0.7)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel(x)
    ax.set_ylabel("speedup vs no speculation (solid: measured, dashed: cost model)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(result: dict[str, Any], out: Path) -> None:
    records = result["records"]
    header = (
        f"# vllm-std bench\n\nModel `{result['model']}`; vLLM {result['environment']['vllm']}, "
        f"{result['environment']['cpus']} CPUs. Cells: acceptance / speedup in time per output token vs no "
        "speculation (cost model's prediction in brackets).\n\n"
    )
    (out / "bench.md").write_text(header + markdown_table(records))
    _plot(records, "gamma", "workload", out / "speedup_vs_gamma.png", "STD: speedup vs gamma")
    _plot(records, "top_k", "workload", out / "speedup_vs_top_k.png", "STD: speedup vs K")
    _plot(
        records,
        "visual_tokens",
        "batch",
        out / "speedup_vs_visual_tokens.png",
        "STD: speedup vs video length",
    )
    _plot(records, "batch", "visual_tokens", out / "speedup_vs_batch.png", "STD: speedup vs batch size")
