//! The PAX tar entry writer: every header field set by hand so output is byte-for-byte
//! deterministic and free of GNU extensions (containerd rejects GNU sparse entries, and the
//! ecosystem writes long names as PAX `path`/`linkpath`, not GNU `L`/`K` headers).

use std::io::{self, Read, Write};

const BLOCK: usize = 512;

/// The tar type of one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EntryKind {
    Regular,
    Link,
    Symlink,
    Char,
    Block,
    Dir,
    Fifo,
}

impl EntryKind {
    fn flag(self) -> u8 {
        match self {
            EntryKind::Regular => b'0',
            EntryKind::Link => b'1',
            EntryKind::Symlink => b'2',
            EntryKind::Char => b'3',
            EntryKind::Block => b'4',
            EntryKind::Dir => b'5',
            EntryKind::Fifo => b'6',
        }
    }
}

/// Everything one header says. `path` is relative with no leading `/`; directories carry a
/// trailing `/` (added by the caller).
#[derive(Debug, Clone)]
pub(crate) struct Header<'a> {
    pub path: &'a [u8],
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    pub mtime: i64,
    pub link: &'a [u8],
    pub dev: (u32, u32),
    pub xattrs: &'a [(Vec<u8>, Vec<u8>)],
}

/// A content stream ended before the size its header promised.
#[derive(Debug)]
pub(crate) enum ContentError {
    Short { got: u64 },
    Read(io::Error),
    Write(io::Error),
}

/// Go's archive/tar (containerd, Docker, umoci) refuses a PAX header larger than this.
pub(crate) const MAX_PAX_BYTES: usize = 1 << 20;

/// A header that cannot be written.
#[derive(Debug)]
pub(crate) enum HeaderError {
    PaxTooLarge { bytes: usize, limit: usize },
    Write(io::Error),
}

pub(crate) struct TarWriter<W: Write> {
    out: W,
    /// Bytes of the tar so far, counting content kept elsewhere (`kept`).
    pos: u64,
}

impl<W: Write> TarWriter<W> {
    pub fn new(out: W) -> Self {
        TarWriter { out, pos: 0 }
    }

    /// Where the next byte of the tar goes.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Content of `size` bytes that a [`super::ContentStore`] keeps outside this stream: the
    /// tar's position moves past it and its padding, nothing is written.
    pub fn kept(&mut self, size: u64) {
        self.pos += padded(size);
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// Writes the PAX extended header (if anything needs one) and the ustar header; nothing is
    /// written when the PAX header would be too large for readers.
    pub fn header(&mut self, h: &Header) -> Result<(), HeaderError> {
        let pax = pax_records(h);
        if pax.len() > MAX_PAX_BYTES {
            return Err(HeaderError::PaxTooLarge {
                bytes: pax.len(),
                limit: MAX_PAX_BYTES,
            });
        }
        self.write_header(h, &pax).map_err(HeaderError::Write)
    }

    fn write_header(&mut self, h: &Header, pax: &[u8]) -> io::Result<()> {
        if !pax.is_empty() {
            let name = pax_entry_name(h.path);
            let mut x = ustar_block(&name, b'x', 0o644, 0, 0, pax.len() as u64, 0, b"", (0, 0));
            set_checksum(&mut x);
            self.put(&x)?;
            self.put(pax)?;
            self.pad(pax.len() as u64)?;
        }
        let mut b = ustar_block(
            h.path,
            h.kind.flag(),
            h.mode,
            h.uid,
            h.gid,
            h.size,
            h.mtime,
            h.link,
            h.dev,
        );
        set_checksum(&mut b);
        self.put(&b)
    }

    /// Copies exactly `size` bytes of content through `buf`, then pads to the block size. Reads
    /// never ask for more than what is left, so a file that grew is cut at `size`; one that
    /// shrank is reported as `Short` and nothing is padded.
    pub fn content(
        &mut self,
        r: &mut impl Read,
        size: u64,
        buf: &mut [u8],
    ) -> Result<(), ContentError> {
        let mut done = 0u64;
        while done < size {
            let want = buf
                .len()
                .min(usize::try_from(size - done).unwrap_or(usize::MAX));
            let n = match r.read(&mut buf[..want]) {
                Ok(0) => return Err(ContentError::Short { got: done }),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ContentError::Read(e)),
            };
            self.put(&buf[..n]).map_err(ContentError::Write)?;
            done += n as u64;
        }
        self.pad(size).map_err(ContentError::Write)
    }

    /// The two zero blocks that end the archive; returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.put(&[0u8; 2 * BLOCK])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn pad(&mut self, size: u64) -> io::Result<()> {
        let rem = (size % BLOCK as u64) as usize;
        if rem != 0 {
            self.put(&[0u8; BLOCK][..BLOCK - rem])?;
        }
        Ok(())
    }
}

/// `size` rounded up to whole 512-byte blocks: what content and its padding take in a tar.
pub(crate) fn padded(size: u64) -> u64 {
    size.div_ceil(BLOCK as u64) * BLOCK as u64
}

/// The largest value an octal field of `len` bytes holds (len-1 digits + NUL).
fn octal_max(len: usize) -> u64 {
    (1u64 << (3 * (len as u32 - 1))) - 1
}

/// Header names must be plain ASCII to be read the same everywhere; anything else goes to PAX.
fn fits_ustar_name(s: &[u8]) -> bool {
    s.len() <= 100 && s.iter().all(|&c| (0x20..0x7f).contains(&c))
}

/// PAX records in a fixed order: path, linkpath, uid, gid, size, mtime, then xattrs by name.
fn pax_records(h: &Header) -> Vec<u8> {
    let mut out = Vec::new();
    if !fits_ustar_name(h.path) {
        record(&mut out, b"path", h.path);
    }
    if !fits_ustar_name(h.link) {
        record(&mut out, b"linkpath", h.link);
    }
    if h.uid > octal_max(8) {
        record(&mut out, b"uid", h.uid.to_string().as_bytes());
    }
    if h.gid > octal_max(8) {
        record(&mut out, b"gid", h.gid.to_string().as_bytes());
    }
    if h.size > octal_max(12) {
        record(&mut out, b"size", h.size.to_string().as_bytes());
    }
    if h.mtime < 0 || h.mtime as u64 > octal_max(12) {
        record(&mut out, b"mtime", h.mtime.to_string().as_bytes());
    }
    let mut xattrs: Vec<&(Vec<u8>, Vec<u8>)> = h.xattrs.iter().collect();
    xattrs.sort();
    for (name, value) in xattrs {
        let mut key = b"SCHILY.xattr.".to_vec();
        key.extend_from_slice(name);
        record(&mut out, &key, value);
    }
    out
}

/// One `"%d %s=%s\n"` record; the length counts its own digits.
fn record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let rest = 1 + key.len() + 1 + value.len() + 1; // ' ' key '=' value '\n'
    let mut len = rest + 1;
    while len.to_string().len() + rest != len {
        len = len.to_string().len() + rest;
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// A stable name for the `x` header, like Go's `dir/PaxHeaders.0/base`, kept ASCII and short.
fn pax_entry_name(path: &[u8]) -> Vec<u8> {
    let trimmed = path.strip_suffix(b"/").unwrap_or(path);
    let base = trimmed.rsplit(|&c| c == b'/').next().unwrap_or(b"");
    let mut name = b"PaxHeaders.0/".to_vec();
    name.extend(
        base.iter()
            .take(80)
            .map(|&c| if (0x21..0x7f).contains(&c) { c } else { b'_' }),
    );
    name
}

/// An octal field, or zero when the value only fits in PAX (which then carries it).
fn put_octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let v = if value > octal_max(field.len()) {
        0
    } else {
        value
    };
    let s = format!("{v:0digits$o}");
    field[..digits].copy_from_slice(s.as_bytes());
    field[digits] = 0;
}

#[allow(clippy::too_many_arguments)]
fn ustar_block(
    path: &[u8],
    flag: u8,
    mode: u32,
    uid: u64,
    gid: u64,
    size: u64,
    mtime: i64,
    link: &[u8],
    dev: (u32, u32),
) -> [u8; BLOCK] {
    let mut b = [0u8; BLOCK];
    let n = path.len().min(100);
    b[..n].copy_from_slice(&path[..n]);
    put_octal(&mut b[100..108], u64::from(mode & 0o7777));
    put_octal(&mut b[108..116], uid);
    put_octal(&mut b[116..124], gid);
    put_octal(&mut b[124..136], size);
    put_octal(&mut b[136..148], u64::try_from(mtime).unwrap_or(0));
    b[156] = flag;
    let n = link.len().min(100);
    b[157..157 + n].copy_from_slice(&link[..n]);
    b[257..263].copy_from_slice(b"ustar\0");
    b[263..265].copy_from_slice(b"00");
    // uname/gname (265..329) stay empty: ids are what unpackers apply.
    if matches!(flag, b'3' | b'4') {
        put_octal(&mut b[329..337], u64::from(dev.0));
        put_octal(&mut b[337..345], u64::from(dev.1));
    }
    b
}

/// Sum of all header bytes with the checksum field read as spaces; 6 octal digits, NUL, space.
fn set_checksum(b: &mut [u8; BLOCK]) {
    b[148..156].fill(b' ');
    let sum: u32 = b.iter().map(|&c| u32::from(c)).sum();
    let s = format!("{sum:06o}");
    b[148..154].copy_from_slice(s.as_bytes());
    b[154] = 0;
    b[155] = b' ';
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_length_counts_itself() {
        let mut out = Vec::new();
        record(&mut out, b"path", b"x");
        assert_eq!(out, b"9 path=x\n");
        let mut out = Vec::new();
        let v = vec![b'a'; 91]; // 1+4+1+91+1 = 98: two digits would make 100, which has three
        record(&mut out, b"path", &v);
        assert!(out.starts_with(b"101 path="));
        assert_eq!(out.len(), 101);
    }

    #[test]
    fn long_non_ascii_and_large_values_go_to_pax_in_fixed_order() {
        let x = vec![
            (b"user.b".to_vec(), b"2".to_vec()),
            (b"user.a".to_vec(), vec![0, 1]),
        ];
        let h = Header {
            path: b"caf\xe9",
            kind: EntryKind::Regular,
            mode: 0o4755,
            uid: 3_000_000,
            gid: 5,
            size: 0,
            mtime: -5,
            link: b"",
            dev: (0, 0),
            xattrs: &x,
        };
        let recs = pax_records(&h);
        let text = String::from_utf8_lossy(&recs);
        let keys: Vec<&str> = text
            .lines()
            .map(|l| l.split_once(' ').unwrap().1.split('=').next().unwrap())
            .collect();
        assert_eq!(
            keys,
            [
                "path",
                "uid",
                "mtime",
                "SCHILY.xattr.user.a",
                "SCHILY.xattr.user.b"
            ]
        );
    }
}
