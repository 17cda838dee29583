"""Score the cost model on published runs (harness/costmodel/published_runs.yaml) and write JSON:
every row's predicted, published and error, each table's mean and max |error|, the software profile and
system it was predicted with, what was assumed and which constants the table scores in-sample. It also writes
each table's summary to harness/costmodel/published_scores.json, which `harness estimate` and `plan` quote as the
model's track record on the system asked about.

    python benchmarks/costmodel_published.py [--out results/costmodel_published.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.costmodel.published import score_all, summarize  # noqa: E402
from harness.costmodel.track_record import SCORES  # noqa: E402

TARGET_MEAN, TARGET_MAX = 0.08, 0.15
"""What a table must meet for the cost model to be trusted on it (mean and worst |error| over its rows)."""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "results" / "costmodel_published.json"))
    args = parser.parse_args()
    tables = score_all()
    result = {
        "date": datetime.date.today().isoformat(),
        "target": {"mean_abs_error": TARGET_MEAN, "max_abs_error": TARGET_MAX},
        "tables": tables,
        "met": {t["id"]: t["mean_abs_error"] <= TARGET_MEAN and t["max_abs_error"] <= TARGET_MAX for t in tables},
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    SCORES.write_text(json.dumps({"written_by": "benchmarks/costmodel_published.py", "tables": summarize(tables)},
                                 indent=1, ensure_ascii=False) + "\n")
    for t in tables:
        metric = t["metric"] + (" relative" if t["relative"] else "")
        print(f"{t['id']:24} {t['software']:20} {metric:24} mean {t['mean_abs_error']:6.1%}  "
              f"max {t['max_abs_error']:6.1%}")
        for r in t["rows"]:
            print(f"    {r['name']:12} predicted {r['predicted']:10.4g} published {r['published']:10.4g} "
                  f"error {r['error']:+6.1%}")
    print(f"wrote {args.out} and {SCORES.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
