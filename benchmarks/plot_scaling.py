"""The scaling curves of `benchmarks/scale.py --quota` as a PNG, from the run's printed tables.

    .venv/bin/python benchmarks/scale.py --quota 0.2 … | tee scale-quota.txt
    .venv/bin/python benchmarks/plot_scaling.py scale-quota.txt docs/scaling-quota.png

Left: processors — the events table's steady rate and the rate counted to complete KPI tables, against M; right:
collectors — acknowledged events/s against N; each with the ideal line M × (the rate of one).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def _rows(text: str, pattern: str) -> list[tuple[str, ...]]:
    return re.findall(pattern, text, re.MULTILINE)


def main(source: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    text = source.read_text(encoding="utf-8")
    # one section per run of processors ("scaling with a CPU budget per process: …"): the first is the curve,
    # later ones (M = 8 at a smaller budget, say) are points of their own
    sections = re.split(r"^(?=scaling with a CPU budget per process: )", text, flags=re.MULTILINE)[1:]
    runs = []
    for section in sections:
        events = int(re.search(r"^scaling with a CPU budget per process: ([\d,]+) events", section,
                               re.MULTILINE)[1].replace(",", ""))
        quota = re.search(r"each processor ([\d.]+) core", section)[1]
        rows = _rows(section.split("\n\n")[0], r"^\|\s+\d+ \|\s+(\d+) \|\s+[\d.]+ \|\s+[\d,]+ \|"
                     r"\s+([\d,]+|—) \|\s+(?:[\d.]+|nan) \|\s+([\d.]+|—) \|")
        runs.append((quota, [int(r[0]) for r in rows], [float(r[1].replace(",", "")) for r in rows],
                     [events / float(r[2]) for r in rows]))
    quota, m, steady, to_kpi = runs[0]
    collectors = _rows(text, r"^\|\s+(\d+) \|\s+([\d,]+) \|\s+[\d.]+ \|\s+[\d.]+ \|")
    n = [int(row[0]) for row in collectors]
    acked = [float(row[1].replace(",", "")) for row in collectors]

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(m, steady, "o-", label="events table, steady")
    left.plot(m, [m_ * steady[0] for m_ in m], ":", color="grey", label="ideal (M × one)")
    left.plot(m, to_kpi, "s-", label="to complete KPI tables")
    for other_quota, other_m, other_steady, other_kpi in runs[1:]:
        left.plot(other_m, other_steady, "D", label=f"events table, steady, {other_quota} core each")
        left.plot(other_m, other_kpi, "X", label=f"to complete KPI tables, {other_quota} core each")
        m = sorted(set(m) | set(other_m))
    left.set(title=f"processors, {quota} core each", xlabel="processors (M)", ylabel="events/s", xticks=m)
    left.legend()
    if n:
        right.plot(n, acked, "o-", label="acknowledged")
        right.plot(n, [n_ * acked[0] for n_ in n], ":", color="grey", label="ideal (N × one)")
        right.set(title=f"collectors, {quota} core each", xlabel="collectors (N)", ylabel="events/s", xticks=n)
        right.legend()
    for axis in (left, right):
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
