//! The sink both sources write to: turns nodes into tar entries, applying what does not depend
//! on where a change was found — hardlink groups, mtime clamping, limits, stats, and the
//! deferral that lets a directory holding only mount stubs disappear. Everything the sandbox
//! chooses and a reader could misread is refused here, naming the path: names that are
//! whiteouts in the layer format (`.wh.*`), paths no unpacker can create, xattr names a PAX
//! record cannot carry, headers Go's tar reader rejects, and sparse files whose holes would be
//! written out as zeros past a budget.

use super::fsx::hook;
use super::meta::Meta;
use super::tarw::{ContentError, EntryKind, Header, HeaderError, TarWriter};
use super::{display, DiffError, Options, Stats, DEFAULT_MAX_HOLE_BYTES, MAX_PATH_BYTES};
use rustix::fs::FileType;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};

/// Content is streamed through a buffer this large, so a 1 GiB sparse file costs 1 MiB.
const CONTENT_BUF: usize = 1 << 20;

pub(crate) struct Sink<'o, W: Write> {
    tar: TarWriter<BufWriter<W>>,
    opts: &'o Options,
    stats: Stats,
    /// (dev, ino) of every emitted multi-link inode → its first path. Later names repeat the
    /// metadata they read themselves (the same inode), so memory is one path per group.
    links: HashMap<(u64, u64), Vec<u8>>,
    /// Bytes of paths held in `links`, bounded by `MAX_LINK_PATH_BYTES`.
    link_bytes: usize,
    /// Bytes of holes written out as zeros so far.
    holes: u64,
    /// Directories whose entry waits for the first entry beneath them.
    pending: Vec<(Vec<u8>, Meta)>,
    buf: Vec<u8>,
    /// Keeps contents outside the tar (`Options::content`).
    store: Option<super::ContentHook>,
}

/// `parent/name`, or `name` at the root.
pub(crate) fn join_path(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(parent.len() + name.len() + 1);
    if !parent.is_empty() {
        p.extend_from_slice(parent);
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

impl<'o, W: Write> Sink<'o, W> {
    pub fn new(out: W, opts: &'o Options, source: &'static str) -> Self {
        Sink {
            tar: TarWriter::new(BufWriter::with_capacity(256 * 1024, out)),
            opts,
            stats: Stats {
                source,
                ..Stats::default()
            },
            links: HashMap::new(),
            link_bytes: 0,
            holes: 0,
            pending: Vec::new(),
            buf: vec![0; CONTENT_BUF],
            store: opts.content.clone().inspect(|h| lock(h).reset()),
        }
    }

    pub fn options(&self) -> &'o Options {
        self.opts
    }

    /// Ends the archive and returns the caller's writer.
    pub fn finish(self) -> Result<(W, Stats), DiffError> {
        let buffered = self.tar.finish().map_err(DiffError::Write)?;
        let out = buffered
            .into_inner()
            .map_err(|e| DiffError::Write(e.into_error()))?;
        Ok((out, self.stats))
    }

    /// A directory entry, written now.
    pub fn dir(&mut self, rel: &[u8], meta: &Meta) -> Result<(), DiffError> {
        self.flush_pending()?;
        self.write_dir(rel, meta)
    }

    /// A directory entry written only if something is later emitted beneath it.
    pub fn defer_dir(&mut self, rel: &[u8], meta: &Meta) {
        self.pending.push((rel.to_vec(), meta.clone()));
    }

    /// Leaving directory `rel`: if its entry is still deferred, nothing beneath it was emitted.
    pub fn end_dir(&mut self, rel: &[u8]) {
        if self.pending.last().is_some_and(|(p, _)| p == rel) {
            self.pending.pop();
        }
    }

    /// `parent/.wh.name`: deletes `name` from the layers below.
    pub fn whiteout(&mut self, parent: &[u8], name: &[u8]) -> Result<(), DiffError> {
        check_name(&join_path(parent, name))?;
        let mut wh = b".wh.".to_vec();
        wh.extend_from_slice(name);
        self.marker(&join_path(parent, &wh))
    }

    /// `dir/.wh..wh..opq`: hides everything the layers below have in `dir`.
    pub fn opaque(&mut self, dir: &[u8]) -> Result<(), DiffError> {
        self.marker(&join_path(dir, b".wh..wh..opq"))
    }

    /// A non-directory node; `file` is the open regular file whose content follows.
    pub fn node(
        &mut self,
        rel: &[u8],
        meta: &Meta,
        file: Option<&mut File>,
    ) -> Result<(), DiffError> {
        let Some(kind) = entry_kind(meta.st.ftype) else {
            return Ok(());
        }; // sockets
        self.flush_pending()?;
        if meta.st.nlink > 1 {
            let key = (meta.st.dev, meta.st.ino);
            if let Some(first) = self.links.get(&key) {
                let first = first.clone();
                return self.write(rel, EntryKind::Link, meta, &first, 0);
            }
            self.track_link(key, rel)?;
        }
        if kind != EntryKind::Regular {
            return self.write(rel, kind, meta, &meta.target, 0);
        }
        let size = meta.st.size;
        self.check_holes(rel, meta)?;
        if let Some(limit) = self
            .opts
            .max_bytes
            .filter(|l| self.stats.content_bytes + size > *l)
        {
            return Err(DiffError::LimitExceeded {
                what: "bytes of content",
                limit,
            });
        }
        self.write(rel, kind, meta, b"", size)?;
        let file = file.expect("a regular node comes with its open file");
        hook::fire(
            hook::Stage::BeforeRead,
            rel.rsplit(|&c| c == b'/').next().unwrap_or(rel),
        );
        if !self.stored(rel, file, size)? {
            self.tar
                .content(file, size, &mut self.buf)
                .map_err(|e| content_error(rel, size, e))?;
        }
        self.stats.files += 1;
        self.stats.content_bytes += size;
        Ok(())
    }

    /// Hands the content to the store, if there is one and it keeps it.
    fn stored(&mut self, rel: &[u8], file: &File, size: u64) -> Result<bool, DiffError> {
        let Some(store) = &self.store else {
            return Ok(false);
        };
        match lock(store).keep(file, size, self.tar.position()) {
            Ok(super::Kept::Inline) => Ok(false),
            Ok(super::Kept::Stored) => {
                self.tar.kept(size);
                Ok(true)
            }
            Ok(super::Kept::Short(got)) => {
                Err(content_error(rel, size, ContentError::Short { got }))
            }
            Err(e) => Err(DiffError::io("capturing", rel)(e)),
        }
    }

    fn track_link(&mut self, key: (u64, u64), rel: &[u8]) -> Result<(), DiffError> {
        self.link_bytes += rel.len() + LINK_OVERHEAD;
        if self.link_bytes > MAX_LINK_PATH_BYTES {
            return Err(DiffError::LimitExceeded {
                what: "bytes of hardlinked paths held in memory",
                limit: MAX_LINK_PATH_BYTES as u64,
            });
        }
        self.links.insert(key, rel.to_vec());
        Ok(())
    }

    /// A file whose apparent size exceeds what it has on disk carries its holes as zeros.
    fn check_holes(&mut self, rel: &[u8], meta: &Meta) -> Result<(), DiffError> {
        let st = &meta.st;
        self.holes += st.size.saturating_sub(st.allocated);
        let limit = self.opts.max_hole_bytes.unwrap_or(DEFAULT_MAX_HOLE_BYTES);
        if self.holes > limit {
            return Err(DiffError::Sparse {
                path: display(rel),
                size: st.size,
                allocated: st.allocated,
                limit,
            });
        }
        Ok(())
    }

    fn flush_pending(&mut self) -> Result<(), DiffError> {
        for (rel, meta) in std::mem::take(&mut self.pending) {
            self.write_dir(&rel, &meta)?;
        }
        Ok(())
    }

    fn write_dir(&mut self, rel: &[u8], meta: &Meta) -> Result<(), DiffError> {
        let mut path = rel.to_vec();
        path.push(b'/');
        self.write(&path, EntryKind::Dir, meta, b"", 0)
    }

    fn marker(&mut self, path: &[u8]) -> Result<(), DiffError> {
        self.flush_pending()?;
        check_path(path)?;
        self.count()?;
        self.stats.whiteouts += 1;
        let h = Header {
            path,
            kind: EntryKind::Regular,
            mode: 0,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: self.opts.source_date_epoch.unwrap_or(0),
            link: b"",
            dev: (0, 0),
            xattrs: &[],
        };
        self.tar.header(&h).map_err(|e| header_error(path, e))
    }

    fn count(&mut self) -> Result<(), DiffError> {
        if let Some(limit) = self.opts.max_files.filter(|l| self.stats.entries >= *l) {
            return Err(DiffError::LimitExceeded {
                what: "entries",
                limit,
            });
        }
        self.stats.entries += 1;
        Ok(())
    }

    fn write(
        &mut self,
        path: &[u8],
        kind: EntryKind,
        meta: &Meta,
        link: &[u8],
        size: u64,
    ) -> Result<(), DiffError> {
        check_name(path.strip_suffix(b"/").unwrap_or(path))?;
        check_xattr_names(path, meta)?;
        self.count()?;
        let st = &meta.st;
        let mtime = match self.opts.source_date_epoch {
            Some(epoch) => st.mtime.0.min(epoch),
            None => st.mtime.0,
        };
        let dev = (rustix::fs::major(st.rdev), rustix::fs::minor(st.rdev));
        if matches!(kind, EntryKind::Char | EntryKind::Block)
            && (dev.0 > 0o7777777 || dev.1 > 0o7777777)
        {
            let why = format!(
                "device number {}:{} does not fit a tar header",
                dev.0, dev.1
            );
            return Err(DiffError::Unrepresentable {
                path: display(path),
                why,
            });
        }
        let h = Header {
            path,
            kind,
            mode: st.mode,
            uid: u64::from(st.uid),
            gid: u64::from(st.gid),
            size,
            mtime,
            link,
            dev,
            xattrs: &meta.xattrs,
        };
        self.tar.header(&h).map_err(|e| header_error(path, e))
    }
}

fn lock(h: &super::ContentHook) -> std::sync::MutexGuard<'_, dyn super::ContentStore + 'static> {
    h.0.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Hardlink tracking may hold this many bytes of first paths (a million groups of ordinary
/// paths fit many times over).
const MAX_LINK_PATH_BYTES: usize = 256 << 20;
/// What one tracked group costs besides its path (map slot, key, Vec header), roughly.
const LINK_OVERHEAD: usize = 64;

/// `rel` (no trailing `/`) must not be named like a whiteout and must be creatable.
fn check_name(rel: &[u8]) -> Result<(), DiffError> {
    check_path(rel)?;
    let base = rel.rsplit(|&c| c == b'/').next().unwrap_or(rel);
    if base.starts_with(b".wh.") {
        return Err(DiffError::ReservedName { path: display(rel) });
    }
    Ok(())
}

fn check_path(path: &[u8]) -> Result<(), DiffError> {
    let len = path.strip_suffix(b"/").unwrap_or(path).len();
    if len > MAX_PATH_BYTES {
        return Err(DiffError::PathTooLong {
            path: display(path),
            len,
            limit: MAX_PATH_BYTES,
        });
    }
    Ok(())
}

/// A PAX record is `key=value` split at the first `=`: a name holding one would be misread.
fn check_xattr_names(path: &[u8], meta: &Meta) -> Result<(), DiffError> {
    match meta.xattrs.iter().find(|(n, _)| n.contains(&b'=')) {
        Some((name, _)) => Err(DiffError::XattrName {
            path: display(path.strip_suffix(b"/").unwrap_or(path)),
            name: String::from_utf8_lossy(name).into_owned(),
        }),
        None => Ok(()),
    }
}

fn header_error(path: &[u8], e: HeaderError) -> DiffError {
    match e {
        HeaderError::PaxTooLarge { bytes, limit } => DiffError::HeaderTooLarge {
            path: display(path.strip_suffix(b"/").unwrap_or(path)),
            what: "PAX header (path, link target and extended attributes)",
            bytes: bytes as u64,
            limit: limit as u64,
        },
        HeaderError::Write(e) => DiffError::Write(e),
    }
}

fn entry_kind(t: FileType) -> Option<EntryKind> {
    Some(match t {
        FileType::RegularFile => EntryKind::Regular,
        FileType::Symlink => EntryKind::Symlink,
        FileType::CharacterDevice => EntryKind::Char,
        FileType::BlockDevice => EntryKind::Block,
        FileType::Fifo => EntryKind::Fifo,
        FileType::Directory => EntryKind::Dir,
        _ => return None,
    })
}

fn content_error(rel: &[u8], size: u64, e: ContentError) -> DiffError {
    match e {
        ContentError::Short { got } => DiffError::FileChanged {
            path: display(rel),
            expected: format!("{size} bytes"),
            found: format!("end of file after {got} bytes"),
        },
        ContentError::Read(e) => DiffError::io("read", rel)(e),
        ContentError::Write(e) => DiffError::Write(e),
    }
}
