"""Which compiled route for the flows hot path: the same kernel four ways, one run.

    python -m benchmarks.routes.bakeoff --pcap FILE [--repeat 3]

The kernel is the core of decoding and tracking: walk the pcap records, decode Ethernet
(+ one 802.1Q tag), IPv4/IPv6 and the TCP/UDP ports, and find-or-insert the canonical
5-tuple in an open-addressing table (FNV-1a, linear probing, grown at half full) that
counts packets and bytes per direction, the last time and the OR of the TCP flags.
Routes: Cython (kernel_cy.pyx, built here with the project's compiler), Cython over
the plain-Python kernel unchanged (what compiling the reference as it is buys), Rust (kernel_rs.rs,
std only - crates.io is out of reach - built as a cdylib with rustc and called through
ctypes), numba (kernel_nb.py, JIT; compile time shown apart) and plain Python (the
reference every route's result must equal).  Prints seconds (best of --repeat) and
ns/packet, and the build time of each route.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build_cython(tmp: Path, source: str = "kernel_cy.pyx"):
    t = time.perf_counter()
    name = Path(source).stem
    c = tmp / f"{name}.c"
    subprocess.run([sys.executable, "-m", "cython", "-3", str(HERE / source), "-o", str(c)], check=True)
    so = tmp / (name + sysconfig.get_config_var("EXT_SUFFIX"))
    inc = sysconfig.get_paths()["include"]
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", f"-I{inc}", str(c), "-o", str(so)], check=True)
    spec = importlib.util.spec_from_file_location(name, so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.scan, time.perf_counter() - t


def build_rust(tmp: Path):
    t = time.perf_counter()
    so = tmp / "libkernel_rs.so"
    subprocess.run(["rustc", "-O", "--edition", "2021", "--crate-type", "cdylib", "-C", "target-cpu=x86-64-v2",
                    str(HERE / "kernel_rs.rs"), "-o", str(so)], check=True)
    lib = ctypes.CDLL(str(so))
    lib.scan.argtypes = (ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_uint64))

    def scan(data: bytes):
        out = (ctypes.c_uint64 * 3)()
        lib.scan(data, len(data), out)
        return tuple(out)

    return scan, time.perf_counter() - t


def build_numba(data: bytes):
    from benchmarks.routes import kernel_nb

    t = time.perf_counter()
    kernel_nb.scan(data[:24 + 16 + 60])  # compiles (or loads the cache)
    return kernel_nb.scan, time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pcap", required=True)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--routes", default="python,cython-py,cython,rust,numba")
    args = ap.parse_args(argv)
    data = Path(args.pcap).read_bytes()
    from benchmarks.routes import kernel_py

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        builders = {"python": lambda: (kernel_py.scan, 0.0), "cython": lambda: build_cython(Path(tmp)),
                    "cython-py": lambda: build_cython(Path(tmp), "kernel_py.py"),
                    "rust": lambda: build_rust(Path(tmp)), "numba": lambda: build_numba(data)}
        expect = None
        for name in args.routes.split(","):
            scan, built = builders[name]()
            best = float("inf")
            for _ in range(args.repeat if name != "python" else 1):
                t = time.perf_counter()
                result = scan(data)
                best = min(best, time.perf_counter() - t)
            if expect is None:
                expect = result
            rows.append((name, best, result[1], built, result == expect))
    print(f"{'route':8} {'seconds':>8} {'ns/packet':>10} {'build s':>8}  equal")
    for name, sec, packets, built, same in rows:
        print(f"{name:8} {sec:8.3f} {sec / packets * 1e9:10.1f} {built:8.1f}  {same}")
    print(f"packets {rows[0][2]:,}; flows and checksum {expect}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
