"""`make bench`: run every bench/bench_*.py and write bench/results/latest.json and latest.md.

Each module exposes `run() -> list[dict]`; every dict is one row of the table:
{"name", "value", "unit", "baseline", "baseline_value", "ratio", "aim", "notes"}.
Every figure is a ratio against a baseline measured in the same run, on the same machine.

    python -m bench.run                    # all
    python -m bench.run --only train,generate   # writes partial.json / partial.md instead
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    """CPU, cores, load at the start (the machines are shared), Python and torch versions."""
    cpu = platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    load = f", load {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    try:
        import torch

        torch_version = f", torch {torch.__version__}"
    except ImportError:
        torch_version = ""
    return f"{cpu}, {os.cpu_count()} cores{load}, Python {platform.python_version()}{torch_version}"


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


def selected(argv: list[str]) -> set[str]:
    """Benchmarks named on the command line (`train profile` or `--only train,profile`); empty = all."""
    names: set[str] = set()
    args = iter(argv)
    for arg in args:
        if arg == "--only":
            arg = next(args, "")
        names.update(n.removeprefix("bench_") for n in arg.removeprefix("--only=").split(",") if n)
    return names


def main(argv: list[str]) -> int:
    only = selected(argv)
    modules = sorted(p.stem for p in Path(__file__).parent.glob("bench_*.py"))
    unknown = only - {m.removeprefix("bench_") for m in modules}
    if unknown:
        print(
            f"unknown benchmark(s): {', '.join(sorted(unknown))}; choose from "
            f"{', '.join(m.removeprefix('bench_') for m in modules)}",
            file=sys.stderr,
        )
        return 2
    host = machine()  # before the runs: the load figure is the other users' load
    rows: list[dict] = []
    failed: list[str] = []
    for name in modules:
        if only and name.removeprefix("bench_") not in only:
            continue
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            results = importlib.import_module(f"bench.{name}").run()
        except Exception as e:  # one broken benchmark must not lose the others' figures
            traceback.print_exc()
            failed.append(name)
            results = [{"name": f"{name}: FAILED", "value": None, "notes": f"{type(e).__name__}: {e}"[:200]}]
        for row in results:
            row.setdefault("group", name.removeprefix("bench_"))
            rows.append(row)
            print(json.dumps(row), flush=True)
        print(f"   {time.perf_counter() - t0:.1f}s", flush=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = to_markdown(rows, f"Measured {stamp} on {host}.")
    # a partial run does not replace the full table (its rows would come from another run)
    stem = "partial" if only else "latest"
    write(RESULTS / f"{stem}.json", json.dumps({"date": stamp, "machine": host, "rows": rows}, indent=2))
    write(RESULTS / f"{stem}.md", md)
    print(md)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
