//! Tests of the diff stage against real overlay mounts (root required): layers are produced
//! from the upperdir and from the double walk, unpacked onto a copy of the lower tree (by the
//! small applier in `apply.rs`, and by umoci), and the result compared with the merged tree.

mod apply;
mod fidelity;
mod fixture;
mod guards;
mod hardlinks;
mod hostile;
mod rawtar;
mod scenario;
mod squash;
mod umoci;

use crate::testing::tree::{self, CompareOpts};

use super::{write_layer, Options, Source, Stats};
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::Path;

/// Writes the layer into an unlinked temp file in `dir`, rewound for reading.
pub(crate) fn layer_file(source: &Source, opts: &Options, dir: &Path) -> (File, Stats) {
    let f = tempfile::tempfile_in(dir).unwrap();
    let (mut f, stats) = write_layer(source, opts, f).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    (f, stats)
}

/// The entry names of a layer, in order (PAX `path` applied).
pub(crate) fn entry_names(tar: impl std::io::Read) -> Vec<Vec<u8>> {
    rawtar::entries(tar).into_iter().map(|e| e.path).collect()
}

/// Unpacks `tar` onto a copy of `lower` and asserts the result equals `merged`.
pub(crate) fn assert_unpacks_to(
    mut tar: File,
    lower: &Path,
    merged: &Path,
    scratch: &Path,
    what: &str,
) {
    tar.seek(SeekFrom::Start(0)).unwrap(); // clones share the offset
    let root = scratch.join(format!("applied-{}", what.replace(' ', "_")));
    fixture::copy_tree(lower, &root);
    apply::apply(std::io::BufReader::new(tar), &root);
    let opts = CompareOpts::layer();
    tree::assert_same(
        &tree::snapshot(merged, &opts),
        &tree::snapshot(&root, &opts),
        &opts,
        what,
    );
}
