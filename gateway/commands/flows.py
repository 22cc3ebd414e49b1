"""``fedgate flows``: capture files -> a Zeek-compatible conn.log.

Parses options and calls :func:`gateway.flows.pcap.convert_captures`; the summary goes
through :mod:`gateway.output`.
"""

from __future__ import annotations

import ipaddress
import sys

import click

from gateway.flows.conntrack import PROTOCOL_SERVER_PORTS
from gateway.output import emit_mapping

# protocol scripts whose ports and analyzers --load can name (one list, in conntrack)
PROTOCOL_CHOICES = tuple(sorted(PROTOCOL_SERVER_PORTS))


def _local_nets(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    if text.strip().lower() in ("", "none"):
        return ()
    nets = []
    for part in text.split(","):
        part = part.strip()
        try:
            ipaddress.ip_network(part, strict=False)
        except ValueError as exc:
            raise click.BadParameter(f"{part!r} is not a CIDR network ({exc})", param_hint="--local-nets") from None
        nets.append(part)
    return tuple(nets)


def _workers(ctx, param, value: str) -> int | str:
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= 64:
        raise click.BadParameter(f"{value!r} is not 'auto' or a number from 1 to 64")
    return n


@click.command("flows")
@click.argument("pcaps", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", default="-", show_default=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="Where to write the conn log ('-' = stdout).")
@click.option("--format", "fmt", type=click.Choice(["zeek", "json"]), default="zeek", show_default=True,
              help="Zeek TSV (with header) or Zeek JSON lines.")
@click.option("-C", "--ignore-checksums", is_flag=True, help="Do not verify IP/TCP/UDP/ICMP checksums (zeek -C).")
@click.option("--local-nets", metavar="CIDR,...", default=None,
              help="Networks for local_orig/local_resp (default: Zeek's private address space; 'none' leaves them unset).")
@click.option("-b", "--bare", is_flag=True,
              help="Zeek bare mode (zeek -b): with --load, only those protocols orient flows and set service.")
@click.option("--load", "loaded", multiple=True, type=click.Choice(PROTOCOL_CHOICES),
              help="With --bare: a protocol script that is loaded (repeatable), e.g. --load http.")
@click.option("-f", "--filter", "bpf", metavar="FILTER",
              help="Capture filter, tcpdump syntax subset (host, net, port, portrange, tcp/udp/icmp, ip/ip6, "
                   "and/or/not), e.g. -f 'udp port 53'.")
@click.option("--workers", default="auto", show_default=True, metavar="N|auto", callback=_workers,
              help="Processes per file, split by address pair (same records; the order of the lines "
                   "depends on N). auto: one per core, up to 8, for inputs of 32 MiB or more; else 1.")
@click.option("--json-summary", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
def flows(pcaps, output, fmt, ignore_checksums, local_nets, bare, loaded, bpf, workers, json_summary, progress):
    """Turn pcap/pcapng files (also .gz) into a Zeek conn.log.

    Connections are tracked the way Zeek does (history, conn_state, byte counts from TCP
    sequence numbers, flips, timeouts); connections still open at the end of a file are
    flushed.  Malformed packets are counted per reason and skipped.

    \b
    Examples:
      fedgate flows capture.pcap -o conn.log
      fedgate flows a.pcapng b.pcap.gz --format json -o conn.json
      fedgate flows trace.pcap -C --local-nets 10.0.0.0/8,192.168.0.0/16 --json-summary
      fedgate flows trace.pcap -b --load http -o conn.log
      fedgate flows trace.pcap -f 'udp port 53 or icmp' -o dns.log
    """
    from gateway.flows.conntrack import likely_server_ports_for
    from gateway.flows.pcap import CaptureError, convert_captures

    from gateway.flows.bpf import FilterSyntaxError, compile_filter

    nets = _local_nets(local_nets)
    if bpf:
        try:
            compile_filter(bpf)
        except FilterSyntaxError as exc:
            raise click.BadParameter(str(exc), param_hint="--filter") from None
    # -b alone keeps every protocol's ports: the scripts a bare run loads are unknown here,
    # and they are usually those of the protocol in the trace
    protocols = tuple(loaded) if bare and loaded else None
    lsp = likely_server_ports_for(protocols)
    to_stdout = output == "-"
    show_progress = sys.stderr.isatty() if progress is None else progress

    def run(on_progress):
        if to_stdout:
            return convert_captures(pcaps, sys.stdout.buffer, fmt=fmt, ignore_checksums=ignore_checksums,
                                    local_nets=nets, likely_server_ports=lsp, protocols=protocols,
                                    bpf=bpf, workers=workers, on_progress=on_progress)
        with open(output, "wb") as out:
            return convert_captures(pcaps, out, fmt=fmt, ignore_checksums=ignore_checksums, local_nets=nets,
                                    likely_server_ports=lsp, protocols=protocols, bpf=bpf, workers=workers,
                                    on_progress=on_progress)

    try:
        if show_progress:
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

            from gateway.output import progress_label

            with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                          console=Console(stderr=True), transient=True) as bar:
                tasks: dict[str, int] = {}

                def on_progress(path, done, total):
                    if path not in tasks:
                        tasks[path] = bar.add_task(progress_label(click.format_filename(path)), total=total)
                    bar.update(tasks[path], completed=done)

                stats = run(on_progress)
        else:
            stats = run(None)
    except CaptureError as exc:
        raise click.ClickException(str(exc)) from None

    # warnings (truncated files) were already logged to stderr by the reader
    summary = stats.as_dict()
    if not json_summary:
        summary.pop("warnings")
        for key in ("skipped_by_reason", "weird_by_reason"):
            summary[key] = ", ".join(f"{k}={v}" for k, v in summary[key].items()) or "-"
    if to_stdout:
        # the log owns stdout: the summary goes to stderr
        saved, sys.stdout = sys.stdout, sys.stderr
        try:
            emit_mapping(summary, as_json=json_summary, title="fedgate flows")
        finally:
            sys.stdout = saved
    else:
        emit_mapping(summary, as_json=json_summary, title="fedgate flows")
