//! Bake-off kernel, Rust (std only, C ABI, loaded with ctypes): the same table as kernel_cy.pyx.
#[derive(Clone, Copy)]
struct Flow { key: [u8; 38], used: bool, pkts: [u64; 2], nbytes: [u64; 2], last: f64, flags: u32 }

const EMPTY: Flow = Flow { key: [0; 38], used: false, pkts: [0; 2], nbytes: [0; 2], last: 0.0, flags: 0 };

fn be16(b: &[u8], i: usize) -> u32 { (b[i] as u32) << 8 | b[i + 1] as u32 }
fn le32(b: &[u8], i: usize) -> u32 { u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]) }
fn fnv(k: &[u8]) -> u64 {
    let mut h: u64 = 1469598103934665603;
    for &x in k { h = (h ^ x as u64).wrapping_mul(1099511628211); }
    h
}

#[no_mangle]
pub extern "C" fn scan(ptr: *const u8, len: usize, out: *mut u64) {
    let b = unsafe { std::slice::from_raw_parts(ptr, len) };
    let n = b.len();
    let mut pos = 24usize;
    let mut cap = 1usize << 16;
    let mut table = vec![EMPTY; cap];
    let (mut used, mut total) = (0u64, 0u64);
    while pos + 16 <= n {
        let incl = le32(b, pos + 8) as usize;
        let ts = le32(b, pos) as f64 + le32(b, pos + 4) as f64 / 1e6;
        let f = pos + 16;
        let end = f + incl;
        if end > n { break; }
        pos = end;
        if incl < 34 { continue; }
        let mut et = be16(b, f + 12);
        let mut ip = f + 14;
        if et == 0x8100 { et = be16(b, f + 16); ip = f + 18; }
        let (proto, tot, alen, src, dst, l4);
        if et == 0x0800 {
            proto = b[ip + 9] as u32; tot = be16(b, ip + 2) as u64; alen = 4usize;
            src = ip + 12; dst = ip + 16; l4 = ip + ((b[ip] & 15) as usize) * 4;
        } else if et == 0x86DD {
            proto = b[ip + 6] as u32; tot = be16(b, ip + 4) as u64 + 40; alen = 16usize;
            src = ip + 8; dst = ip + 24; l4 = ip + 40;
        } else { continue; }
        if l4 + 14 > end { continue; }
        let (mut sport, mut dport, mut flags) = (0u32, 0u32, 0u32);
        if proto == 6 || proto == 17 {
            sport = be16(b, l4); dport = be16(b, l4 + 2);
            if proto == 6 { flags = b[l4 + 13] as u32; }
        }
        let (mut s, mut d) = (&b[src..src + alen], &b[dst..dst + alen]);
        let mut dir = 0usize;
        if s > d || (s == d && sport > dport) {
            dir = 1;
            std::mem::swap(&mut s, &mut d);
            std::mem::swap(&mut sport, &mut dport);
        }
        let mut key = [0u8; 38];
        key[0] = proto as u8; key[1] = alen as u8;
        key[2..2 + alen].copy_from_slice(s);
        key[18..18 + alen].copy_from_slice(d);
        key[34] = (sport >> 8) as u8; key[35] = sport as u8; key[36] = (dport >> 8) as u8; key[37] = dport as u8;
        let mut mask = cap - 1;
        let mut i = (fnv(&key) as usize) & mask;
        while table[i].used && table[i].key != key { i = (i + 1) & mask; }
        if !table[i].used {
            table[i].used = true;
            table[i].key = key;
            used += 1;
            if (used as usize) * 2 > cap {
                let old = std::mem::replace(&mut table, vec![EMPTY; cap * 2]);
                cap *= 2;
                mask = cap - 1;
                for fl in old.into_iter().filter(|f| f.used) {
                    let mut j = (fnv(&fl.key) as usize) & mask;
                    while table[j].used { j = (j + 1) & mask; }
                    table[j] = fl;
                }
                i = (fnv(&key) as usize) & mask;
                while table[i].key != key { i = (i + 1) & mask; }
            }
        }
        let fl = &mut table[i];
        fl.pkts[dir] += 1;
        fl.nbytes[dir] += tot;
        fl.last = ts;
        fl.flags |= flags;
        total += 1;
    }
    let check: u64 = table.iter().filter(|f| f.used)
        .map(|f| f.pkts[0] * 3 + f.pkts[1] * 5 + f.nbytes[0] + f.nbytes[1] * 7 + f.flags as u64).sum();
    unsafe { *out = used; *out.add(1) = total; *out.add(2) = check; }
}
