//! A strict little tar reader for tests, written from the POSIX spec rather than borrowed from
//! the `tar` crate (whose PAX parser splits records on newlines, so it cannot read a name or an
//! xattr value containing one). It checks every header checksum and the ustar magic, reads PAX
//! records by their length prefix, and applies `path`, `linkpath`, `uid`, `gid`, `size`, `mtime`
//! and `SCHILY.xattr.*` to the entry that follows.

use std::io::Read;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Entry {
    pub path: Vec<u8>,
    pub kind: u8,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    pub mtime: i64,
    pub link: Vec<u8>,
    pub dev: (u32, u32),
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn cstr(b: &[u8]) -> Vec<u8> {
    b[..b.iter().position(|&c| c == 0).unwrap_or(b.len())].to_vec()
}

fn octal(b: &[u8]) -> u64 {
    let s = std::str::from_utf8(&cstr(b)).unwrap().trim().to_string();
    if s.is_empty() {
        0
    } else {
        u64::from_str_radix(&s, 8).unwrap_or_else(|e| panic!("octal field {s:?}: {e}"))
    }
}

fn parse_header(h: &[u8; 512]) -> Entry {
    assert_eq!(&h[257..265], b"ustar\x0000", "not a POSIX ustar header");
    let sum: u64 = h
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            if (148..156).contains(&i) {
                32
            } else {
                u64::from(c)
            }
        })
        .sum();
    assert_eq!(octal(&h[148..156]), sum, "header checksum");
    let mut path = cstr(&h[345..500]);
    if !path.is_empty() {
        path.push(b'/');
    }
    path.extend(cstr(&h[..100]));
    Entry {
        path,
        kind: h[156],
        mode: octal(&h[100..108]) as u32,
        uid: octal(&h[108..116]),
        gid: octal(&h[116..124]),
        size: octal(&h[124..136]),
        mtime: octal(&h[136..148]) as i64,
        link: cstr(&h[157..257]),
        dev: (octal(&h[329..337]) as u32, octal(&h[337..345]) as u32),
        xattrs: Vec::new(),
    }
}

/// `"%d key=value\n"` records, by length prefix.
pub(crate) fn pax_records(mut data: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let sp = data.iter().position(|&c| c == b' ').expect("record length");
        let len: usize = std::str::from_utf8(&data[..sp]).unwrap().parse().unwrap();
        let rec = &data[sp + 1..len];
        assert_eq!(data[len - 1], b'\n', "record must end in a newline");
        let eq = rec.iter().position(|&c| c == b'=').expect("key=value");
        out.push((rec[..eq].to_vec(), rec[eq + 1..rec.len() - 1].to_vec()));
        data = &data[len..];
    }
    out
}

fn apply_pax(e: &mut Entry, records: Vec<(Vec<u8>, Vec<u8>)>) {
    let num = |v: &[u8]| std::str::from_utf8(v).unwrap().parse::<i64>().unwrap();
    for (k, v) in records {
        match &k[..] {
            b"path" => e.path = v,
            b"linkpath" => e.link = v,
            b"uid" => e.uid = num(&v) as u64,
            b"gid" => e.gid = num(&v) as u64,
            b"size" => e.size = num(&v) as u64,
            b"mtime" => e.mtime = num(&v),
            _ => match k.strip_prefix(b"SCHILY.xattr.") {
                Some(name) => e.xattrs.push((name.to_vec(), v)),
                None => panic!("unexpected PAX record {:?}", String::from_utf8_lossy(&k)),
            },
        }
    }
}

fn skip_padding(r: &mut impl Read, size: u64) {
    let pad = (512 - size % 512) % 512;
    std::io::copy(&mut r.take(pad), &mut std::io::sink()).unwrap();
}

/// Calls `f` with each entry and a reader of exactly its content; checks the end blocks.
pub(crate) fn for_each(mut r: impl Read, mut f: impl FnMut(&Entry, &mut dyn Read)) {
    let mut pax = None;
    loop {
        let mut h = [0u8; 512];
        r.read_exact(&mut h)
            .expect("archive ends with two zero blocks");
        if h.iter().all(|&c| c == 0) {
            r.read_exact(&mut h).unwrap();
            assert!(h.iter().all(|&c| c == 0), "second end block");
            return;
        }
        let mut e = parse_header(&h);
        if e.kind == b'x' {
            let mut data = vec![0u8; e.size as usize];
            r.read_exact(&mut data).unwrap();
            skip_padding(&mut r, e.size);
            pax = Some(pax_records(&data));
            continue;
        }
        if let Some(p) = pax.take() {
            apply_pax(&mut e, p);
        }
        let mut content = (&mut r).take(e.size);
        f(&e, &mut content);
        std::io::copy(&mut content, &mut std::io::sink()).unwrap();
        skip_padding(&mut r, e.size);
    }
}

/// All entries, content skipped.
pub(crate) fn entries(r: impl Read) -> Vec<Entry> {
    let mut out = Vec::new();
    for_each(r, |e, _| out.push(e.clone()));
    out
}
