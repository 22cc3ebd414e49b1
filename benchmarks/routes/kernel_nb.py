"""Bake-off kernel, numba: the same table as kernel_cy.pyx over numpy arrays."""
import numpy as np
from numba import njit


@njit(cache=True)
def _fnv(k):
    h = np.uint64(1469598103934665603)
    for x in k:
        h = (h ^ np.uint64(x)) * np.uint64(1099511628211)
    return h


@njit(cache=True)
def _scan(b):
    n = len(b)
    pos = 24
    cap = 1 << 16
    keys = np.zeros((cap, 38), np.uint8)
    used_at = np.zeros(cap, np.bool_)
    cnt = np.zeros((cap, 4), np.uint64)
    last = np.zeros(cap, np.float64)
    flg = np.zeros(cap, np.uint32)
    used = 0
    total = 0
    key = np.zeros(38, np.uint8)
    while pos + 16 <= n:
        incl = np.int64(b[pos + 8]) | np.int64(b[pos + 9]) << 8 | np.int64(b[pos + 10]) << 16 | np.int64(b[pos + 11]) << 24
        sec = np.int64(b[pos]) | np.int64(b[pos + 1]) << 8 | np.int64(b[pos + 2]) << 16 | np.int64(b[pos + 3]) << 24
        us = np.int64(b[pos + 4]) | np.int64(b[pos + 5]) << 8 | np.int64(b[pos + 6]) << 16 | np.int64(b[pos + 7]) << 24
        ts = sec + us / 1e6
        f = pos + 16
        end = f + incl
        if end > n:
            break
        pos = end
        if incl < 34:
            continue
        et = np.int64(b[f + 12]) << 8 | b[f + 13]
        ip = f + 14
        if et == 0x8100:
            et = np.int64(b[f + 16]) << 8 | b[f + 17]
            ip = f + 18
        if et == 0x0800:
            proto = np.int64(b[ip + 9]); tot = np.int64(b[ip + 2]) << 8 | b[ip + 3]; alen = 4
            src = ip + 12; dst = ip + 16; l4 = ip + (b[ip] & 15) * 4
        elif et == 0x86DD:
            proto = np.int64(b[ip + 6]); tot = (np.int64(b[ip + 4]) << 8 | b[ip + 5]) + 40; alen = 16
            src = ip + 8; dst = ip + 24; l4 = ip + 40
        else:
            continue
        if l4 + 14 > end:
            continue
        sport = dport = flags = 0
        if proto == 6 or proto == 17:
            sport = np.int64(b[l4]) << 8 | b[l4 + 1]
            dport = np.int64(b[l4 + 2]) << 8 | b[l4 + 3]
            if proto == 6:
                flags = b[l4 + 13]
        c = 0
        for k in range(alen):
            if b[src + k] != b[dst + k]:
                c = 1 if b[src + k] > b[dst + k] else -1
                break
        d = 0
        if c > 0 or (c == 0 and sport > dport):
            d = 1
            src, dst = dst, src
            sport, dport = dport, sport
        key[:] = 0
        key[0] = proto; key[1] = alen
        key[2:2 + alen] = b[src:src + alen]
        key[18:18 + alen] = b[dst:dst + alen]
        key[34] = sport >> 8; key[35] = sport & 255; key[36] = dport >> 8; key[37] = dport & 255
        mask = cap - 1
        i = np.int64(_fnv(key) & np.uint64(mask))
        while used_at[i] and not np.array_equal(keys[i], key):
            i = (i + 1) & mask
        if not used_at[i]:
            used_at[i] = True
            keys[i] = key
            used += 1
            if used * 2 > cap:
                nk = np.zeros((cap * 2, 38), np.uint8); nu = np.zeros(cap * 2, np.bool_)
                nc = np.zeros((cap * 2, 4), np.uint64); nl = np.zeros(cap * 2, np.float64); nf = np.zeros(cap * 2, np.uint32)
                m2 = cap * 2 - 1
                for j in range(cap):
                    if used_at[j]:
                        t = np.int64(_fnv(keys[j]) & np.uint64(m2))
                        while nu[t]:
                            t = (t + 1) & m2
                        nu[t] = True; nk[t] = keys[j]; nc[t] = cnt[j]; nl[t] = last[j]; nf[t] = flg[j]
                keys, used_at, cnt, last, flg = nk, nu, nc, nl, nf
                cap *= 2
                mask = cap - 1
                i = np.int64(_fnv(key) & np.uint64(mask))
                while not np.array_equal(keys[i], key):
                    i = (i + 1) & mask
        cnt[i, d] += 1
        cnt[i, 2 + d] += tot
        last[i] = ts
        flg[i] |= flags
        total += 1
    check = np.uint64(0)
    for j in range(cap):
        if used_at[j]:
            check += cnt[j, 0] * 3 + cnt[j, 1] * 5 + cnt[j, 2] + cnt[j, 3] * 7 + flg[j]
    return used, total, check


def scan(data: bytes):
    used, total, check = _scan(np.frombuffer(data, np.uint8))
    return int(used), int(total), int(check)
