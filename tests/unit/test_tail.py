"""The live conn.log tail: appends, partial lines, rotation, truncation, resume."""

from __future__ import annotations

import os
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.flows.tail import ConnLogTail, TailPosition
from gateway.flows.zeek import read_log
from test_zeek_parser import HEADER, LINE_A

OPEN_1 = HEADER  # opened 10:00; OPEN_2 is the next hour's file
OPEN_2 = HEADER.replace("#open\t2026-11-24-10-00-00", "#open\t2026-11-24-11-00-00")


def line(i: int) -> str:
    return LINE_A.replace("CHhAvVGS1DHFjwGM9", f"C{i:010d}").replace("\t136\t", f"\t{i}\t")


def log_text(header: str, first: int, n: int, close: bool = False) -> str:
    return header + "".join(line(i) for i in range(first, first + n)) + ("#close\tx\n" if close else "")


def uids(records) -> list[str]:
    return [r.uid for r in records]


def expected(first: int, n: int) -> list[str]:
    return [f"C{i:010d}" for i in range(first, first + n)]


def append(path, text: str | bytes) -> None:
    with open(path, "ab") as f:
        f.write(text.encode() if isinstance(text, str) else text)


@pytest.fixture
def conn_log(tmp_path):
    return tmp_path / "conn.log"


def test_appends_and_partial_lines(conn_log):
    append(conn_log, OPEN_1 + line(0) + line(1)[:30])
    tail = ConnLogTail(conn_log)
    records, pos = tail.poll()
    assert uids(records) == expected(0, 1)
    assert pos.offset == len(OPEN_1 + line(0)) and pos.header["fields"][0] == "ts"
    assert tail.poll()[0] == []  # nothing new; the partial line waits
    append(conn_log, line(1)[30:] + line(2))
    records, pos = tail.poll()
    assert uids(records) == expected(1, 2)
    assert pos.offset == conn_log.stat().st_size and pos.line_no == 11
    assert pos.identity == f"{conn_log.stat().st_dev}:{conn_log.stat().st_ino}"


def test_rotation_finishes_old_file_first(conn_log):
    append(conn_log, log_text(OPEN_1, 0, 3))
    tail = ConnLogTail(conn_log)
    assert uids(tail.poll()[0]) == expected(0, 3)
    append(conn_log, line(3) + line(4).rstrip("\n"))  # last line of the old file: no newline
    os.rename(conn_log, conn_log.with_name("conn.2026-11-24-10-00-00.log"))
    append(conn_log, log_text(OPEN_2, 5, 2))
    records, pos = tail.poll()
    assert uids(records) == expected(3, 4)
    assert tail.counters.rotations == 1
    assert (pos.inode, pos.offset) == (conn_log.stat().st_ino, conn_log.stat().st_size)


def test_path_missing_between_rename_and_new_file(conn_log):
    append(conn_log, log_text(OPEN_1, 0, 2))
    tail = ConnLogTail(conn_log)
    tail.poll()
    append(conn_log, line(2))
    os.rename(conn_log, conn_log.with_name("old.log"))
    assert uids(tail.poll()[0]) == expected(2, 1)  # still reading the renamed file
    append(conn_log, log_text(OPEN_2, 3, 1))
    assert uids(tail.poll()[0]) == expected(3, 1)


def test_truncation_rereads_from_zero_with_the_new_header(conn_log):
    append(conn_log, log_text(OPEN_1, 0, 5))
    tail = ConnLogTail(conn_log)
    assert len(tail.poll()[0]) == 5
    with open(conn_log, "wb") as f:  # copytruncate
        f.write(log_text(OPEN_2, 10, 1).encode())
    records, pos = tail.poll()
    assert uids(records) == expected(10, 1)
    assert tail.counters.truncations == 1 and pos.offset == conn_log.stat().st_size


def test_truncation_that_regrew_past_the_offset_is_seen(conn_log):
    append(conn_log, log_text(OPEN_1, 0, 2))
    tail = ConnLogTail(conn_log)
    tail.poll()
    with open(conn_log, "wb") as f:  # truncated and refilled before the next poll
        f.write(log_text(OPEN_2, 20, 6).encode())
    assert uids(tail.poll()[0]) == expected(20, 6)
    assert tail.counters.truncations == 1


def test_resume_from_saved_position(conn_log):
    append(conn_log, log_text(OPEN_1, 0, 3) + line(3)[:40])
    first = ConnLogTail(conn_log)
    got, pos = first.poll()
    first.close()
    saved = pos.to_json()
    append(conn_log, line(3)[40:] + line(4))
    second = ConnLogTail(conn_log, position=TailPosition.from_json(saved))
    more, _ = second.poll()
    assert uids(got + more) == expected(0, 5)


def test_resume_after_rotation_while_down(conn_log):
    append(conn_log, log_text(OPEN_1, 0, 2))
    first = ConnLogTail(conn_log)
    got, pos = first.poll()
    first.close()
    append(conn_log, line(2) + "#close\tx\n")
    os.rename(conn_log, conn_log.with_name("conn.10:00:00-11:00:00.log"))
    append(conn_log, log_text(OPEN_2, 3, 2))
    second = ConnLogTail(conn_log, position=TailPosition.from_json(pos.to_json()))
    more, pos2 = second.poll()
    assert uids(got + more) == expected(0, 5)
    assert second.counters.rotations == 1 and pos2.inode == conn_log.stat().st_ino


def test_resume_when_the_rotated_file_is_gone(conn_log, caplog):
    append(conn_log, log_text(OPEN_1, 0, 2))
    first = ConnLogTail(conn_log)
    _, pos = first.poll()
    first.close()
    conn_log.unlink()  # archived as .gz elsewhere
    append(conn_log, log_text(OPEN_2, 7, 1) + "x" * 2000 + "\n")  # avoid reusing the inode's size
    second = ConnLogTail(conn_log, position=pos)
    records, _ = second.poll()
    assert uids(records) == expected(7, 1)
    if pos.inode != conn_log.stat().st_ino:
        assert second.counters.lost_files == 1
        assert "gone" in caplog.text
    else:  # the filesystem reused the inode: the fingerprint tells the files apart
        assert second.counters.truncations == 1


def test_resume_after_truncation_while_down(conn_log):
    append(conn_log, log_text(OPEN_1, 0, 4))
    first = ConnLogTail(conn_log)
    _, pos = first.poll()
    first.close()
    with open(conn_log, "wb") as f:
        f.write(log_text(OPEN_2, 30, 1).encode())
    second = ConnLogTail(conn_log, position=pos)
    assert uids(second.poll()[0]) == expected(30, 1)
    assert second.counters.truncations == 1


def test_missing_file_then_created(conn_log):
    tail = ConnLogTail(conn_log)
    records, pos = tail.poll()
    assert records == [] and (pos.inode, pos.offset) == (0, 0)
    append(conn_log, log_text(OPEN_1, 0, 1))
    assert uids(tail.poll()[0]) == expected(0, 1)


def test_poll_budget_and_caught_up(conn_log):
    append(conn_log, log_text(OPEN_1, 0, 40))
    tail = ConnLogTail(conn_log, read_size=500, max_bytes_per_poll=1000)
    got = []
    polls = 0
    while True:
        records, _ = tail.poll()
        got += records
        polls += 1
        if tail.caught_up:
            break
    assert uids(got) == expected(0, 40) and polls > 5


def test_rejections_are_collected(conn_log):
    append(conn_log, OPEN_1 + line(0) + "junk\n" + line(1))
    tail = ConnLogTail(conn_log)
    assert len(tail.poll()[0]) == 2
    (rej,) = tail.drain_rejections()
    assert rej.line_no == 10 and rej.source == str(conn_log)
    assert tail.counters.rejected == 1


def test_position_validation():
    pos = TailPosition("conn.log", 1, 2, 3, header=None, line_no=4)
    assert TailPosition.from_json(pos.to_json()) == pos
    with pytest.raises(ValueError):
        TailPosition("conn.log", 1, 2, -3)
    with pytest.raises(ValueError):
        TailPosition.from_json("[1, 2]")
    with pytest.raises(ValueError):
        TailPosition.from_json("{")
    with pytest.raises(ValueError):
        TailPosition("conn.log", 1, 2, 3, header={"format": "xml"})
    with pytest.raises(TypeError):
        ConnLogTail("conn.log", position={"offset": 1})  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    steps=st.lists(
        st.tuples(st.integers(1, 900), st.booleans()),  # (bytes to append, restart after poll)
        min_size=1,
        max_size=40,
    ),
    switch=st.sampled_from(["rename", "truncate"]),  # how the second log replaces the first
    switch_early=st.booleans(),  # as soon as the first is written, or only at the end
)
def test_random_appends_restarts_and_a_switch_lose_and_duplicate_nothing(tmp_path_factory, steps, switch, switch_early):
    path = tmp_path_factory.mktemp("tail") / "conn.log"
    files = [log_text(OPEN_1, 0, 12, close=True).encode(), log_text(OPEN_2, 12, 12).encode()]
    want = uids(read_log(files[0])[0] + read_log(files[1])[0])

    def replace_log() -> None:  # only ever after a poll that read everything written
        if switch == "rename":
            os.rename(path, path.with_name(f"conn.{os.urandom(4).hex()}.log"))
        else:
            open(path, "wb").close()  # copytruncate

    current, written = 0, 0
    tail = ConnLogTail(path)
    got = []
    path.touch()
    for size, restart in steps:
        if written == len(files[current]) and current == 0 and switch_early:
            replace_log()
            current, written = 1, 0
        chunk = files[current][written : written + size]
        append(path, chunk)
        written += len(chunk)
        records, pos = tail.poll()
        got += records
        if restart:
            tail.close()
            tail = ConnLogTail(path, position=TailPosition.from_json(pos.to_json()))
    # Write the rest and drain.
    append(path, files[current][written:])
    if current == 0:
        got += tail.poll()[0]
        replace_log()
        append(path, files[1])
    got += tail.poll()[0]
    assert uids(got) == want


def test_json_log_and_resume(conn_log):
    lines = [
        '{"ts":%d.5,"uid":"C%010d","id.orig_h":"10.0.0.1","id.orig_p":1,"id.resp_h":"10.0.0.2","id.resp_p":2,"proto":"udp"}\n'
        % (i, i)
        for i in range(4)
    ]
    append(conn_log, "".join(lines[:2]) + lines[2][:20])
    first = ConnLogTail(conn_log)
    got, pos = first.poll()
    first.close()
    assert pos.header["format"] == "json"
    append(conn_log, lines[2][20:] + lines[3])
    more, _ = ConnLogTail(conn_log, position=TailPosition.from_json(pos.to_json())).poll()
    assert uids(got + more) == expected(0, 4)


def test_budget_runs_out_inside_a_rotated_file(conn_log):
    append(conn_log, log_text(OPEN_1, 0, 2))
    tail = ConnLogTail(conn_log, read_size=300, max_bytes_per_poll=600)
    got, _ = tail.poll()
    append(conn_log, "".join(line(i) for i in range(2, 30)))
    os.rename(conn_log, conn_log.with_name("old.log"))
    append(conn_log, log_text(OPEN_2, 30, 5))
    positions = []
    while True:
        records, pos = tail.poll()
        got += records
        positions.append(pos)
        if tail.caught_up:
            break
    assert uids(got) == expected(0, 35)
    assert tail.counters.rotations == 1
    # While the old file was being drained, positions still named it (a restart finds it).
    assert positions[0].inode != conn_log.stat().st_ino and positions[-1].inode == conn_log.stat().st_ino


def test_close_then_poll_resumes_where_it_stopped(conn_log):
    append(conn_log, log_text(OPEN_1, 0, 2))
    tail = ConnLogTail(conn_log)
    got, _ = tail.poll()
    tail.close()
    append(conn_log, line(2))
    got += tail.poll()[0]
    assert uids(got) == expected(0, 3)
    assert tail.counters.records == 3


def archive(path, archive_dir, name: str) -> None:
    """What Zeek's archiver does: gzip the rotated log into a dated folder, drop the original."""
    import gzip

    archive_dir.mkdir(parents=True, exist_ok=True)
    (archive_dir / name).write_bytes(gzip.compress(path.read_bytes()))
    path.unlink()


def test_resume_finds_the_rotated_file_in_the_gzip_archive(tmp_path):
    spool, logs = tmp_path / "spool", tmp_path / "logs"
    spool.mkdir()
    conn_log = spool / "conn.log"
    append(conn_log, log_text(OPEN_1, 0, 3))
    first = ConnLogTail(conn_log)
    got, pos = first.poll()
    first.close()
    append(conn_log, "".join(line(i) for i in range(3, 40)) + "#close\tx\n")  # written while down
    rotated = spool / "conn.2026-11-24-10-00-00.log"
    os.rename(conn_log, rotated)
    (logs / "2026-11-24").mkdir(parents=True)
    (logs / "2026-11-24" / "other.log.gz").write_bytes(b"\x1f\x8bnot really gzip")
    archive(rotated, logs / "2026-11-24", "conn.10:00:00-11:00:00.log.gz")
    append(conn_log, log_text(OPEN_2, 40, 2))

    globs = [str(logs / "*" / "*.log.gz")]
    lost = ConnLogTail(conn_log, position=pos)
    assert uids(lost.poll()[0]) == expected(40, 2)  # without the archive, 3..39 are gone:
    # counted as lost, or as a truncation when the new file reused the old one's inode
    assert lost.counters.lost_files + lost.counters.truncations == 1

    # Drained a little at a time, with a restart in the middle of the archive.
    tail = ConnLogTail(conn_log, position=pos, archive_globs=globs, read_size=700, max_bytes_per_poll=1400)
    records, mid = tail.poll()
    got += records
    tail.close()
    assert not tail.caught_up and mid.inode == pos.inode  # still the archived file's identity
    tail = ConnLogTail(conn_log, position=TailPosition.from_json(mid.to_json()), archive_globs=globs)
    got += tail.poll()[0]
    assert uids(got) == expected(0, 42)
    assert tail.counters.lost_files == 0 and tail.counters.rotations == 1


def test_truncated_archive_gives_what_it_could_and_one_rejection(tmp_path):
    import gzip

    conn_log = tmp_path / "conn.log"
    append(conn_log, log_text(OPEN_1, 0, 2))
    first = ConnLogTail(conn_log)
    _, pos = first.poll()
    first.close()
    append(conn_log, "".join(line(i) for i in range(2, 200)))
    packed = gzip.compress(conn_log.read_bytes())
    conn_log.unlink()
    (tmp_path / "conn.old.log.gz").write_bytes(packed[: len(packed) * 3 // 4])
    append(conn_log, log_text(OPEN_2, 500, 1))
    tail = ConnLogTail(conn_log, position=pos, archive_globs=[str(tmp_path / "*.gz")])
    records = tail.poll()[0]
    got = uids(records)
    assert got[-1] == "C0000000500" and len(got) > 2
    assert got[:-1] == expected(2, len(got) - 1)  # what the archive still held, in order
    (rej,) = tail.drain_rejections()
    assert "truncated" in rej.reason


def test_two_rotations_while_down_read_every_archived_file_in_order(tmp_path):
    """Down for two rotations: the file being read and the next hour's one were both
    archived; a restart reads the rest of the first, all of the second (also across a
    restart inside it), then the live file."""
    spool, logs = tmp_path / "spool", tmp_path / "logs"
    spool.mkdir()
    conn_log = spool / "conn.log"
    open_3 = HEADER.replace("#open\t2026-11-24-10-00-00", "#open\t2026-11-24-12-00-00")
    append(conn_log, log_text(OPEN_1, 0, 3))
    first = ConnLogTail(conn_log)
    got, pos = first.poll()
    first.close()
    # while down: the 10:00 file ends and is archived, the 11:00 file too, 12:00 is live
    append(conn_log, "".join(line(i) for i in range(3, 20)) + "#close\tx\n")
    archive(conn_log, logs / "2026-11-24", "conn.10:00:00-11:00:00.log.gz")
    append(conn_log, log_text(OPEN_2, 20, 30, close=True))
    time.sleep(0.01)  # archives get increasing modification times, as rotation gives them
    archive(conn_log, logs / "2026-11-24", "conn.11:00:00-12:00:00.log.gz")
    append(conn_log, log_text(open_3, 50, 5))

    globs = [str(logs / "*" / "conn.*.log.gz")]
    tail = ConnLogTail(conn_log, position=pos, archive_globs=globs, read_size=600, max_bytes_per_poll=3000)
    while True:
        records, mid = tail.poll()
        got += records
        if tail.caught_up:
            break
        tail.close()  # a restart at every poll, inside the archives too
        tail = ConnLogTail(conn_log, position=TailPosition.from_json(mid.to_json()), archive_globs=globs,
                           read_size=600, max_bytes_per_poll=3000)
    assert uids(got) == expected(0, 55)
    assert tail.counters.lost_files == 0


@pytest.mark.parametrize("rename", ["conn.{n}", "conn.log.{n}"], ids=["zeek", "logrotate"])
def test_two_rotations_while_down_renamed_beside_the_log(conn_log, rename):
    """Rotated files still in the spool directory (renamed, not yet archived) are read in
    order, without archive_globs, and the live file once."""
    append(conn_log, log_text(OPEN_1, 0, 3))
    first = ConnLogTail(conn_log)
    got, pos = first.poll()
    first.close()
    spool = conn_log.parent
    append(conn_log, "".join(line(i) for i in range(3, 10)) + "#close\tx\n")
    names = ["2026-11-24-10-00-00.log", "2026-11-24-11-00-00.log"] if rename == "conn.{n}" else ["1", "2"]
    os.rename(conn_log, spool / rename.format(n=names[0]))
    append(conn_log, log_text(OPEN_2, 10, 10, close=True))
    time.sleep(0.01)
    os.rename(conn_log, spool / rename.format(n=names[1]))
    append(conn_log, log_text(OPEN_1.replace("10-00-00", "12-00-00"), 20, 4))

    tail = ConnLogTail(conn_log, position=pos)
    got += tail.poll()[0]
    got += tail.poll()[0]
    assert uids(got) == expected(0, 24)
    assert tail.counters.lost_files == 0 and tail.counters.rotations == 2
