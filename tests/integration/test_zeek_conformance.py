"""Conformance with real Zeek on the six sample traces (tests/fixtures/zeek-samples).

Each case runs the real command path (capture file -> `fedgate flows` -> conn.log written by
the Zeek TSV writer -> read back) and compares with the conn.log Zeek wrote for the trace:
every Zeek record is produced, and duration (1e-5 s), bytes, packets, ip_bytes, conn_state,
history and missed_bytes agree.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from gateway.commands.flows import flows
from gateway.flows.conformance import CORE_FIELDS, compare_records, load_manifest, read_baseline
from gateway.flows.zeek import iter_records

pytestmark = pytest.mark.integration



def _cases():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "fixtures" / "zeek-samples"
    return load_manifest(root)


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c["case"])
def test_sample_trace_matches_zeek(case, fixtures_dir, tmp_path):
    folder = fixtures_dir / "zeek-samples" / case["case"]
    out = tmp_path / "conn.log"
    args = [str(folder / case["trace"]), "-o", str(out), "--no-progress", "--json-summary"]
    if case["ignore_checksums"]:
        args.append("-C")
    if case["bare_mode"]:
        args.append("-b")
        for script in case["scripts_loaded"]:
            name = script.rsplit("/", 1)[-1]
            if "/protocols/" in script and name != "conn":
                args += ["--load", name]
    result = CliRunner().invoke(flows, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output

    baseline = read_baseline(folder / case["baseline"])
    assert len(baseline) == case["records"]
    with open(out, "rb") as f:
        produced = list(iter_records(f))
    cmp = compare_records(baseline, produced)
    assert not cmp.missing, f"records Zeek wrote that we did not: {cmp.missing}"
    assert cmp.matched == len(baseline)
    assert not cmp.mismatches, "\n".join(f"{k} {name}: zeek={a!r} ours={b!r}" for k, name, a, b in cmp.mismatches)
    assert all(cmp.agree[f] == cmp.matched for f in CORE_FIELDS)
    assert not cmp.extra, f"records we wrote that Zeek did not: {cmp.extra}"
