"""`make bench`: run every bench/bench_*.py and write bench/results/latest.json and latest.md.

Each module exposes `run() -> list[dict]`; every dict is one row of the table:
{"name", "value", "unit", "baseline", "baseline_value", "ratio", "aim", "notes"}.
Every figure is a ratio against a baseline measured in the same run, on the same machine.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def to_markdown(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| benchmark | value | baseline | ratio | aim | notes |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if isinstance(r.get("ratio"), (int, float)) else "-"
        base = f"{r.get('baseline', '')}: {_fmt(r.get('baseline_value'))}" if r.get("baseline") else "-"
        lines.append(
            f"| {r['name']} | {_fmt(r['value'])} {r.get('unit', '')} | {base} | {ratio} | "
            f"{r.get('aim', '-')} | {r.get('notes', '')} |"
        )
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3g}"
    return "-" if v is None else str(v)


def main(argv: list[str]) -> int:
    only = set(argv)
    modules = sorted(p.stem for p in Path(__file__).parent.glob("bench_*.py"))
    rows: list[dict] = []
    for name in modules:
        if only and name.removeprefix("bench_") not in only:
            continue
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        module = importlib.import_module(f"bench.{name}")
        for row in module.run():
            row.setdefault("group", name.removeprefix("bench_"))
            rows.append(row)
            print(json.dumps(row), flush=True)
        print(f"   {time.perf_counter() - t0:.1f}s", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report = {"date": stamp, "machine": machine(), "rows": rows}
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=2))
    md = to_markdown(rows, f"Measured {stamp} on {machine()}.")
    (RESULTS / "latest.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
