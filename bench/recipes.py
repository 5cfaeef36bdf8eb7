"""The tiny CPU recipe on several catalogs: how it travels (`make recipes`, ~6 min a catalog on 2 cores).

    python -m bench.recipes                                   # every kind, configs/tiny-cpu.yaml as shipped
    python -m bench.recipes --kinds numerals,close --set train.max_minutes=3 --tag short
    python -m bench.recipes --kinds numerals --tower-from meanmax --set train.epochs=24 --tag s2-ep24

Per catalog kind: a 2,000-row synthetic catalog (seed 0, made once under the work folder), one full
`train` of the config from the random preset, `eval` on the test split. One row per catalog: stage 1's
validation accuracy (the tower alone) and the final model's on the same photos, its test accuracy and macro-F1 with 95%
bootstrap intervals, price median APE beside the true-category median-price baseline, seconds per
step. Writes bench/results/recipes-TAG.json and .md; a catalog already measured under TAG is kept.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, TINY_CONFIG, _publish, _staging

KINDS = ("fashion", "home", "longtail", "numerals", "close")
TUNED_ON = ("fashion", "home", "longtail")  # the others are held out: the recipe was never tuned on them
RESULTS = REPO / "bench" / "results"


def catalog(work: Path, kind: str, rows: int = 2000, seed: int = 0) -> Path:
    from productvlm.data.synth import synthesize

    target = work / f"catalog-{kind}-{rows}-{seed}"
    if not target.is_dir():
        tmp = _staging(target)
        synthesize(tmp, rows=rows, seed=seed, overwrite=True, progress=False, kind=kind)
        _publish(tmp, target)
    return target


def measure(
    kind: str, work: Path, tag: str, overrides: list[str], tower_from: str | None = None
) -> dict[str, Any]:
    """`tower_from`: start from that tag's stage 1 on this catalog (its base-model and vision-pretrained
    folders copied in), so that stage-2 variants are compared on the very same tower (`main` refuses
    stage-1 overrides beside it)."""
    from productvlm.config import load_config
    from productvlm.evaluation.run import run_eval
    from productvlm.training.run import train

    data, run = catalog(work, kind), work / f"run-{tag}-{kind}"
    if tower_from and not (run / "config.yaml").is_file():
        for folder in ("base-model", "vision-pretrained"):
            shutil.copytree(work / f"run-{tower_from}-{kind}" / folder, run / folder, dirs_exist_ok=True)
    cfg = load_config(
        TINY_CONFIG, [f"data.dir={data}", f"output_dir={run}", "tracking.backend=none", *overrides]
    )
    t0 = time.perf_counter()
    result = train(cfg, resume=(run / "config.yaml").is_file(), progress=False)
    trained = time.perf_counter() - t0
    evaluated = run_eval(
        result.final_dir, data, "test", run / "eval", batch_size=32, max_new_tokens=48, progress=False
    )
    m = evaluated.metrics
    stage1 = (
        json.loads((run / "vision-pretrained" / "vision_pretrain.json").read_text())
        if (run / "vision-pretrained" / "vision_pretrain.json").is_file()
        else {}
    )
    last = json.loads((run / "train_log.jsonl").read_text().splitlines()[-1])
    oracle = m["baselines"].get("median_price_per_true_category", {}).get("price", {})
    return {
        "kind": kind,
        "held_out": kind not in TUNED_ON,
        "stage1_validation_accuracy": stage1.get("validation_accuracy"),
        "stage1_epochs": stage1.get("epochs_run", stage1.get("epochs")),
        "stage1_seconds": stage1.get("seconds"),
        "final_validation_accuracy": last.get("final_validation_category_accuracy"),
        "accuracy": m["category"]["accuracy"],
        "accuracy_ci95": m["category"].get("accuracy_ci95"),
        "macro_f1": m["category"]["macro_f1"],
        "macro_f1_ci95": m["category"].get("macro_f1_ci95"),
        "majority": m["baselines"].get("majority_category", {}).get("category", {}).get("accuracy"),
        "median_ape": m["price"].get("median_ape"),
        "oracle_median_ape": oracle.get("median_ape"),
        "train_seconds": round(trained, 1),
        "steps": result.steps,
        "overrides": overrides,
    }


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def ci(pair) -> str:
    return f" [{100 * pair[0]:.1f}, {100 * pair[1]:.1f}]" if pair else ""


def markdown(rows: list[dict[str, Any]], tag: str) -> str:
    lines = [
        f"recipe `{tag}` ({' '.join(rows[0]['overrides']) if rows else ''})",
        "",
        "| catalog | stage 1 tower / model (validation) | test accuracy | macro-F1 | majority | median APE (oracle) | training |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        held = " (held out)" if r["held_out"] else ""
        lines.append(
            f"| {r['kind']}{held} | {pct(r['stage1_validation_accuracy'])} / {pct(r.get('final_validation_accuracy'))} | **{pct(r['accuracy'])}**{ci(r['accuracy_ci95'])} "
            f"| {pct(r['macro_f1'])}{ci(r['macro_f1_ci95'])} | {pct(r['majority'])} "
            f"| {pct(r['median_ape'])} ({pct(r['oracle_median_ape'])}) | {r['train_seconds']:.0f} s |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config key=value")
    p.add_argument("--tag", default="shipped")
    p.add_argument("--work", type=Path, default=RESULTS / "tmp" / "recipes")
    p.add_argument("--tower-from", help="start from this tag's stage 1 (same catalog): stage-2 variants")
    a = p.parse_args(argv)
    stage1 = [o for o in a.overrides if o.startswith("train.vision_pretrain.")]
    if a.tower_from and stage1:
        p.error(f"--tower-from copies {a.tower_from}'s stage 1, so {', '.join(stage1)} would change nothing")
    from productvlm.cli import quiet_library_progress

    quiet_library_progress()
    out = RESULTS / f"recipes-{a.tag}.json"
    done = {r["kind"]: r for r in json.loads(out.read_text())} if out.is_file() else {}
    for kind in a.kinds.split(","):
        if kind not in done:
            done[kind] = measure(kind, a.work, a.tag, a.overrides, a.tower_from)
            out.write_text(json.dumps(list(done.values()), indent=2) + "\n")
        print(markdown([done[kind]], a.tag).splitlines()[-1], flush=True)
    rows = [done[k] for k in KINDS if k in done]
    (RESULTS / f"recipes-{a.tag}.md").write_text(markdown(rows, a.tag))
    print(markdown(rows, a.tag))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
