"""The benchmark suite's output: the printed table, the Markdown tables and the PNG plot.

Everything here reads only the report that ``bench_suite.py`` writes as JSON, so the tables and the
plot can be drawn again from a results file::

    python benchmarks/suite_report.py benchmarks/results/suite_<date>.json   # writes the .md and .png beside it
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from harness.savers import CONTROL, METHODS

ORDER = (*METHODS, CONTROL)


def order(results: list[dict[str, Any]]) -> list[str]:
    """The methods of a report in the suite's order, then any the suite no longer has (older reports)."""
    present = {name for r in results for name in r["methods"]}
    return [n for n in ORDER if n in present] + sorted(present - set(ORDER))


NOTES = [
    "Medians of the timed rounds, with [min, max]; every method runs once per round, round-robin, so all "
    "see the same background load: compare ratios from one run.",
    "Stall: how long the call blocks the caller (for DCP and Lightning it includes model.state_dict()). "
    "Durable: from the call until the checkpoint is fsynced. Throughput: model parameter bytes / durable.",
    "Lost training time per save: (wall time from the save call to the end of the training steps run "
    "until the save was durable, plus 3 more) - (those steps x the baseline step time); the baseline is "
    "the median step of the save-free windows just before and after the round. no_save is the control: "
    "the same motions without a save, its spread is the noise floor.",
    "Extra RSS: peak resident memory during the call (kernel high-water mark, plus the private memory "
    "of child processes, sampled) above the RSS before it, plus memory the method keeps between calls "
    "(bgsave's snapshot buffers, DCP's checkpoint process, copy_limit's buffers). Page cache is not RSS.",
    "bgsave and sync_torch_save save the module (torch.save of it, or of bgsave's copy); DCP and "
    "Lightning save model.state_dict(): the same tensors.",
    "Durability: bgsave fsyncs the .pt, the sidecar and the directory; sync_torch_save fsyncs the file; "
    "DCP's FileSystemWriter fsyncs its data files and .metadata (not the directory); Lightning's "
    "TorchCheckpointIO does not fsync, so the suite fsyncs the file after Lightning's save, in Lightning's "
    "writer thread. Lightning writes through an fsspec transaction: a temp file in TMPDIR, then a move "
    "(a rename only when TMPDIR is on the same filesystem; see machine.tmp_filesystem).",
    "dcp_process runs with a 1-rank gloo process group on 127.0.0.1, which DCP's process mode needs; its "
    "checkpoint process is spawned once (in an untimed probe save) and reused.",
]

COLUMNS = ["method", "stall s", "durable s", "GB/s", "extra RSS MB (x model)"]


def fmt_s(entry: dict[str, Any] | None, spread: bool = True) -> str:
    if not entry:
        return "-"
    text = f"{entry['median_s']:.3g}"
    return f"{text} [{entry['min_s']:.3g}, {entry['max_s']:.3g}]" if spread else text


def rows(result: dict[str, Any], threads: list[int]) -> list[list[str]]:
    """One row a method: stall, durable, throughput, extra RSS, then lost time for each thread count."""
    out = []
    methods = result["methods"]
    for name in order([result]):
        m = methods.get(name)
        if m is None:
            continue
        rss = m.get("extra_rss_bytes")
        gbps = m.get("throughput_gbps")
        out.append(
            [
                name,
                fmt_s(m.get("stall")),
                fmt_s(m.get("durable")),
                "-" if gbps is None else f"{gbps:.2f}",
                "-" if rss is None else f"{rss / 2**20:.0f} ({rss / result['model_bytes']:.2f})",
                *(fmt_s(m.get("lost", {}).get(str(t))) for t in threads),
            ]
        )
    return out


def target_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            f"{t['size_mb']} MB",
            t["target"],
            "-" if t["value"] is None else f"{t['value']:.3g}",
            t["limit"],
            {True: "pass", False: "FAIL", None: "n/a"}[t["pass"]] + (f" ({t['note']})" if t.get("note") else ""),
        ]
        for result in results
        for t in result["targets"]
    ]


def lost_columns(threads: list[int]) -> list[str]:
    return [f"lost s, {t} thread{'s' if t > 1 else ''}" for t in threads]


def aligned(header: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in [header, *body]]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def markdown(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header), *body]]


def sections(report: dict[str, Any], render: Any, heading: Any = str) -> list[str]:
    """The per-size tables and the targets table, rendered by ``render(header, body)``, titled by ``heading``."""
    threads = report["settings"]["threads"]
    lines: list[str] = []
    for result in report["results"]:
        lines += [heading(f"{result['size_mb']} MB ({result['model_bytes'] / 1e6:.0f} MB of parameters)"), ""]
        lines += render(COLUMNS + lost_columns(threads), rows(result, threads))
        lines += [f"skipped {name}: {why}" for name, why in result["skipped"].items()]
        lines.append("")
    lines += [heading("bgsave's targets (ratios within this run)"), ""]
    lines += render(["size", "target", "value", "limit", "result"], target_rows(report["results"]))
    return lines


def print_report(report: dict[str, Any]) -> None:
    print()
    print("\n".join(sections(report, aligned)))
    print()


def write_markdown(report: dict[str, Any], path: Path) -> None:
    m = report["machine"]
    v = report["versions"]
    s = report["settings"]
    fs = m.get("target_filesystem", {})
    head = [
        f"# Benchmark suite, {report['started_utc']}",
        "",
        f"`{report['command']}` ({report['wall_s']:.0f} s). Machine: {m['cpu_model']}, {m['logical_cpus']} CPUs, "
        f"{m['memory_bytes'] / 2**30:.0f} GiB; target {fs.get('fstype', '?')} on {fs.get('device', '?')}; "
        f"load average at start {', '.join(f'{x:.2f}' for x in m['load_average'])}. "
        + ", ".join(f"{k} {val}" for k, val in v.items() if val)
        + f". {s['repeats']} rounds after a warm-up; training steps calibrated to {s['step_ms']:.0f} ms "
        f"(batch by threads: {s['calibrated_batch_by_threads']}); bgsave max_pending={s['bgsave_max_pending']}.",
        "",
    ]
    body = sections(report, markdown, lambda title: f"## {title}")
    notes = ["", "## Notes", "", *(f"- {n}" for n in report["notes"]), ""]
    path.write_text("\n".join(head + body + notes))


def write_plot(report: dict[str, Any], path: Path) -> bool:
    """Two panels, log scale: stall and lost training time by size and method. False without matplotlib.

    Lines are methods (colour) and, for lost time, thread counts (line style); bars span min to max.
    The grey band is the no_save control's largest deviation: lost times inside it are noise.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        return False
    results = report["results"]
    sizes = [r["size_mb"] for r in results]
    threads = report["settings"]["threads"]
    methods = [name for name in order(results) if name != CONTROL]
    colors = {name: f"C{i}" for i, name in enumerate(methods)}
    styles = ["-", "--", ":", "-."]
    fig, (stall_ax, lost_ax) = plt.subplots(1, 2, figsize=(13, 5.5))

    def draw(ax: Any, entries: list[dict[str, Any] | None], color: str, style: str) -> list[float]:
        points = [(x, e) for x, e in zip(sizes, entries, strict=True) if e and e["median_s"] > 0]
        if points:
            med = [e["median_s"] for _, e in points]
            # A log axis cannot show a bar reaching zero or below: such bars stop at a tenth of the median.
            low = [m - max(e["min_s"], m / 10) for m, (_, e) in zip(med, points, strict=True)]
            high = [e["max_s"] - m for m, (_, e) in zip(med, points, strict=True)]
            xs = [x for x, _ in points]
            ax.errorbar(xs, med, yerr=[low, high], color=color, linestyle=style, marker="o", capsize=3)
        return [e["median_s"] for _, e in points]

    shown: list[float] = []
    for name in methods:
        per_size = [r["methods"].get(name) or {} for r in results]
        shown += draw(stall_ax, [m.get("stall") for m in per_size], colors[name], "-")
        for i, t in enumerate(threads):
            shown += draw(lost_ax, [m.get("lost", {}).get(str(t)) for m in per_size], colors[name], styles[i % 4])
    noise = [
        max(abs(lost["min_s"]), abs(lost["max_s"]))
        for r in results
        for lost in r["methods"].get(CONTROL, {}).get("lost", {}).values()
    ]
    floor = min(shown, default=1e-3) / 3
    if noise:
        lost_ax.axhspan(floor, max(noise), color="0.85", zorder=0)
    method_keys = [Line2D([], [], color=colors[n], marker="o", label=n) for n in methods]
    thread_keys = [
        Line2D([], [], color="0.3", linestyle=styles[i % 4], label=f"{t} training thread{'s' if t > 1 else ''}")
        for i, t in enumerate(threads)
    ]
    noise_key = [Line2D([], [], color="0.85", linewidth=8, label="noise (no_save control)")] if noise else []
    for ax, title, keys in (
        (stall_ax, "stall per save (s)", method_keys),
        (lost_ax, "lost training time per save (s); values <= 0 not drawn", method_keys + thread_keys + noise_key),
    ):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor)
        ax.set_xticks(sizes, [f"{s} MB" for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel("model size")
        ax.set_title(title)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(handles=keys, fontsize=8)
    m = report["machine"]
    fig.suptitle(f"{report['started_utc'][:10]}: {m['cpu_model']}, {m['logical_cpus']} CPUs; medians, bars min to max")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    path = Path(argv[0])
    report = json.loads(path.read_text())
    print_report(report)
    write_markdown(report, path.with_suffix(".md"))
    write_plot(report, path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
