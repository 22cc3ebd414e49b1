"""Capture filters on replayed files (tcpdump syntax subset) and the `fedgate flows` command."""

from __future__ import annotations

import ipaddress
import json

import pytest
from click.testing import CliRunner

from gateway.commands.flows import flows
from gateway.flows.bpf import FilterSyntaxError, compile_filter
from gateway.flows.packets import Packet


def pkt(src, dst, proto, sport=0, dport=0):
    return Packet(1.0, ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed, proto, sport, dport, 40, 0)


DNS = pkt("10.0.0.1", "8.8.8.8", 17, 40000, 53)
WEB = pkt("10.0.0.1", "93.184.216.34", 6, 40001, 443)
PING6 = pkt("2001:db8::1", "2001:db8::2", 58, 128, 0)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("udp port 53", [True, False, False]),
        ("port 53 or port 443", [True, True, False]),
        ("tcp and dst port 443", [False, True, False]),
        ("not tcp", [True, False, True]),
        ("host 8.8.8.8", [True, False, False]),
        ("src net 10.0.0.0/8 and not (udp)", [False, True, False]),
        ("ip6", [False, False, True]),
        ("icmp6 || udp", [True, False, True]),
        ("portrange 400-500", [False, True, False]),
        ("ip proto 58", [False, False, True]),
        ("", [True, True, True]),
    ],
)
def test_filter_subset(text, expected):
    f = compile_filter(text)
    assert [f(p) for p in (DNS, WEB, PING6)] == expected


@pytest.mark.parametrize("text", ["vlan 10", "port", "host nowhere", "(tcp", "tcp and", "ether host 1"])
def test_unsupported_or_broken_filters_are_errors(text):
    with pytest.raises(FilterSyntaxError):
        compile_filter(text)


def _sample(fixtures_dir):
    return str(fixtures_dir / "zeek-samples" / "core.pcapng-pktsrc" / "pcapng-multi-interface.pcapng")


def test_flows_command_filter_and_summary(fixtures_dir, tmp_path):
    out = tmp_path / "conn.json"
    res = CliRunner().invoke(flows, [_sample(fixtures_dir), "-C", "--format", "json", "-o", str(out),
                                     "-f", "host 10.0.0.4", "--json-summary", "--no-progress"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert {r["id.orig_h"] for r in lines} == {"10.0.0.4"} and len(lines) == 2
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["flows"] == 2 and summary["filtered"] == 2 and summary["packets"] == 6


def test_flows_command_errors_are_clear(fixtures_dir, tmp_path):
    notpcap = tmp_path / "notes.txt"
    notpcap.write_text("hello")
    res = CliRunner().invoke(flows, [str(notpcap), "--no-progress"])
    assert res.exit_code == 1 and "notes.txt: not a pcap/pcapng file" in res.output
    res = CliRunner().invoke(flows, [_sample(fixtures_dir), "-f", "vlan 3", "--no-progress"])
    assert res.exit_code == 2 and "unsupported filter term" in res.output
    res = CliRunner().invoke(flows, [_sample(fixtures_dir), "--local-nets", "10.0.0.0/33", "--no-progress"])
    assert res.exit_code == 2 and "not a CIDR" in res.output


def test_flows_command_local_nets_and_table_summary(fixtures_dir, tmp_path):
    out = tmp_path / "conn.log"
    res = CliRunner().invoke(flows, [_sample(fixtures_dir), "-C", "-o", str(out), "--local-nets", "1.1.1.0/24",
                                     "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "packets" in res.output and "flows" in res.output  # the table summary
    rows = [line.split("\t") for line in out.read_text().splitlines() if not line.startswith("#")]
    assert len(rows) == 3 and {(r[12], r[13]) for r in rows} == {("F", "T")}
