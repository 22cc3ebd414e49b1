"""Bake-off kernel, plain Python (the reference for the other routes' results)."""
import struct


def scan(data: bytes):
    le = struct.Struct("<IIII").unpack_from
    n = len(data)
    pos = 24
    flows = {}
    total = 0
    while pos + 16 <= n:
        sec, usec, incl, _ = le(data, pos)
        ts = sec + usec / 1e6
        f = pos + 16
        end = f + incl
        if end > n:
            break
        pos = end
        if incl < 34:
            continue
        et = data[f + 12] << 8 | data[f + 13]
        ip = f + 14
        if et == 0x8100:
            et = data[f + 16] << 8 | data[f + 17]
            ip = f + 18
        if et == 0x0800:
            proto = data[ip + 9]
            tot = data[ip + 2] << 8 | data[ip + 3]
            src, dst = data[ip + 12:ip + 16], data[ip + 16:ip + 20]
            l4 = ip + (data[ip] & 15) * 4
        elif et == 0x86DD:
            proto = data[ip + 6]
            tot = (data[ip + 4] << 8 | data[ip + 5]) + 40
            src, dst = data[ip + 8:ip + 24], data[ip + 24:ip + 40]
            l4 = ip + 40
        else:
            continue
        if l4 + 14 > end:
            continue
        flags = 0
        if proto == 6 or proto == 17:
            sport = data[l4] << 8 | data[l4 + 1]
            dport = data[l4 + 2] << 8 | data[l4 + 3]
            if proto == 6:
                flags = data[l4 + 13]
        else:
            sport = dport = 0
        if src < dst or (src == dst and sport <= dport):
            key, d = (proto, src, sport, dst, dport), 0
        else:
            key, d = (proto, dst, dport, src, sport), 1
        fl = flows.get(key)
        if fl is None:
            fl = flows[key] = [0, 0, 0, 0, 0.0, 0]
        fl[d] += 1
        fl[2 + d] += tot
        fl[4] = ts
        fl[5] |= flags
        total += 1
    check = sum(f[0] * 3 + f[1] * 5 + f[2] + f[3] * 7 + f[5] for f in flows.values())
    return len(flows), total, check
