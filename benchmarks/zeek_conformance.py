"""Per-field agreement with real Zeek on the sample traces (tests/fixtures/zeek-samples).

    python benchmarks/zeek_conformance.py [--samples DIR] [--json]

For each case of the manifest the trace is converted with the case's Zeek flags (-C, -b and
the loaded protocol scripts) and compared with Zeek's conn.log: records matched on the
5-tuple, then duration (1e-5 s), byte/packet counts, conn_state, history, missed_bytes;
service is reported apart.  Prints one table per case and the totals.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from gateway.flows.conformance import (
    CORE_FIELDS,
    Comparison,
    case_options,
    compare_records,
    load_manifest,
    read_baseline,
)
from gateway.flows.pcap import CaptureStats

ROOT = Path(__file__).resolve().parents[1]


def run_case(folder: Path, case: dict) -> Comparison:
    opts = case_options(case)
    stats = CaptureStats()
    from gateway.flows.conntrack import ConnTracker
    from gateway.flows.pcap import iter_frames, records_from_frames

    with open(folder / case["trace"], "rb") as f:
        tracker = ConnTracker(likely_server_ports=opts["likely_server_ports"], protocols=opts["protocols"])
        produced = list(records_from_frames(iter_frames(f, stats), ignore_checksums=opts["ignore_checksums"],
                                            stats=stats, tracker=tracker))
    return compare_records(read_baseline(folder / case["baseline"]), produced)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", default=str(ROOT / "tests" / "fixtures" / "zeek-samples"))
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    args = ap.parse_args(argv)
    root = Path(args.samples)
    total = Comparison()
    per_case = {}
    for case in load_manifest(root):
        cmp = run_case(root / case["case"], case)
        per_case[case["case"]] = cmp
        total.merge(cmp)
    if args.json:
        doc = {name: {"baseline": c.baseline, "candidate": c.candidate, "matched": c.matched,
                      "agree": c.agree, "core_agreement": c.core_agreement} for name, c in per_case.items()}
        doc["total"] = {"baseline": total.baseline, "matched": total.matched, "agree": total.agree,
                        "core_agreement": total.core_agreement}
        json.dump(doc, sys.stdout, indent=1)
        print()
        return 0
    console = Console(width=max(Console().width, 100))
    cases = Table(title="Records per case")
    for col in ("case", "zeek", "ours", "matched", "missing", "extra", "core agreement"):
        cases.add_column(col, justify="left" if col == "case" else "right")
    for name, c in list(per_case.items()) + [("TOTAL", total)]:
        cases.add_row(name, str(c.baseline), str(c.candidate), str(c.matched), str(len(c.missing)),
                      str(len(c.extra)), f"{100 * c.core_agreement:.2f}%")
    console.print(cases)
    fields = Table(title="Agreement with Zeek per field (over matched records)")
    for col in ("field", "agree", "compared", "pct"):
        fields.add_column(col, justify="left" if col == "field" else "right")
    for f in CORE_FIELDS + ("service",):
        pct = 100 * total.agree[f] / total.matched if total.matched else 0.0
        label = f + " (reported apart)" if f == "service" else f
        fields.add_row(label, str(total.agree[f]), str(total.matched), f"{pct:.2f}%")
    console.print(fields)
    console.print(f"matched {total.matched}/{total.baseline} records; core-field agreement "
                  f"{100 * total.core_agreement:.2f}%; missing {len(total.missing)}, extra {len(total.extra)}")
    for key, name, a, b in total.mismatches[:20]:
        console.print(f"  {key} {name}: zeek={a!r} ours={b!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
