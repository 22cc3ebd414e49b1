"""Start many gateway processes cheaply: import torch once, fork one process per gateway.

The experiment harness runs seven gateways per strategy on two CPU cores; each fresh
interpreter spends ~6 CPU-seconds importing torch and transformers before it does any
work. This server (``python -m gateway.fl.forkserver``) imports the gateway code once,
single-threaded, and then forks a child per request. Every child is a separate OS
process running :func:`gateway.fl.run.main` with its own store, MQTT connection and
model, exactly as if started from the command line.

Protocol on stdin/stdout, one JSON object per line:

* request  ``{"argv": ["--gateway-id", "gw-a", ...], "log": "/path/gw-a.log"}``
* reply    ``{"pid": 12345}``

Children's stdout and stderr go to ``log``. The server reaps children as they exit; at
EOF on stdin it sends SIGTERM to the children still running and waits for them.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time


def _child(argv: list[str], log_path: str) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    code = 0
    try:
        from gateway.fl.run import main

        main.main(args=argv, prog_name="gateway.fl.run", standalone_mode=False)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - report and exit non-zero
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def serve() -> None:
    # Heavy imports once, before any fork (the point of this server).
    import gateway.fl.client  # noqa: F401
    import gateway.fl.learner  # noqa: F401
    import gateway.fl.run  # noqa: F401
    from transformers import OPTForSequenceClassification  # noqa: F401

    children: set[int] = set()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    stdin = sys.stdin.buffer
    buf = b""
    try:
        while True:
            ready, _, _ = select.select([stdin], [], [], 0.2)
            _reap(children)
            if not ready:
                continue
            chunk = os.read(stdin.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if not line.strip():
                    continue
                req = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _child(list(req["argv"]), str(req["log"]))
                children.add(pid)
                sys.stdout.write(json.dumps({"pid": pid}) + "\n")
                sys.stdout.flush()
    finally:
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        while children and time.monotonic() < deadline:
            _reap(children)
            time.sleep(0.1)
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        while children:
            _reap(children, block=True)


def _reap(children: set[int], *, block: bool = False) -> None:
    while children:
        try:
            pid, _ = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if pid == 0:
            return
        children.discard(pid)
        if block:
            return


class ForkServer:
    """Client side: start the server, ask for gateway processes, stop them."""

    def __init__(self, *, env: dict | None = None):
        import subprocess

        self.proc = subprocess.Popen([sys.executable, "-m", "gateway.fl.forkserver"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env)
        self.pids: list[int] = []

    def spawn(self, argv: list[str], log_path: str) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps({"argv": argv, "log": log_path}) + "\n").encode())
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the gateway fork server exited")
        pid = int(json.loads(line)["pid"])
        self.pids.append(pid)
        return pid

    @staticmethod
    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        try:  # a zombie not yet reaped by the server counts as gone
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(")")[-1].split()[0] != "Z"
        except OSError:
            return True

    def terminate_all(self, timeout: float = 15.0) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while any(self.alive(p) for p in self.pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.pids = []

    def close(self) -> None:
        self.terminate_all()
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=20)
        except Exception:  # noqa: BLE001
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":  # pragma: no cover
    serve()
