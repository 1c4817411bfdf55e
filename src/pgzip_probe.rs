//! What each deflate setting costs on a real corpus: an ignored test, run by hand.
//!
//! ```text
//! tar -C / -cf /var/tmp/corpus.tar usr/share usr/bin some-random-file
//! COMMITTER_DEFLATE_CORPUS=/var/tmp/corpus.tar COMMITTER_DEFLATE_EVERY=4 \
//!   cargo test --release deflate_settings -- --ignored --nocapture
//! ```
//!
//! Every `EVERY`-th 1 MiB block of the corpus (default 4) is deflated as `ParGzEncoder` would,
//! under each setting in `COMMITTER_DEFLATE_SETTINGS` (default: levels 1-6 with and without the
//! stored-block detection; a setting is `LEVEL[+nodetect][+noprime]`). The figures are the
//! compressed size of those blocks and the compressing thread's CPU time (so a busy machine
//! changes them little), scaled to the whole corpus.

use super::{BlockDeflater, BLOCK, DICT};
use std::io::Read;

fn thread_cpu() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

#[test]
#[ignore = "a measurement: needs COMMITTER_DEFLATE_CORPUS, prints a table"]
fn deflate_settings() {
    let path = std::env::var("COMMITTER_DEFLATE_CORPUS").expect("COMMITTER_DEFLATE_CORPUS=FILE");
    let every: usize = std::env::var("COMMITTER_DEFLATE_EVERY")
        .map(|v| v.parse().expect("COMMITTER_DEFLATE_EVERY=N"))
        .unwrap_or(4);
    let settings = std::env::var("COMMITTER_DEFLATE_SETTINGS").unwrap_or_else(|_| {
        "1+nodetect 2+nodetect 3+nodetect 4+nodetect 5+nodetect 6+nodetect 1 2 3 4 5 6".into()
    });
    let total = std::fs::metadata(&path).unwrap().len() as f64;
    println!(
        "corpus {path}: {:.0} MB, every {every}th 1 MiB block",
        total / 1e6
    );
    println!(
        "| setting | size, whole corpus (MB) | ratio | CPU s per GB (1 core) | stored blocks |"
    );
    println!("|---|---:|---:|---:|---:|");
    for setting in settings.split_whitespace() {
        let mut parts = setting.split('+');
        let level: u32 = parts.next().unwrap().parse().unwrap();
        let mut d = BlockDeflater::new(level);
        for p in parts {
            match p {
                "nodetect" => d.detect = false,
                "noprime" => d.prime = false,
                _ => panic!("unknown setting part {p}"),
            }
        }
        let mut f = std::fs::File::open(&path).unwrap();
        let (mut inb, mut outb, mut cpu, mut blocks, mut stored) = (0u64, 0u64, 0f64, 0, 0);
        let mut dict = Vec::new();
        let mut buf = vec![0u8; BLOCK];
        for i in 0.. {
            let mut n = 0;
            while n < BLOCK {
                match f.read(&mut buf[n..]).unwrap() {
                    0 => break,
                    k => n += k,
                }
            }
            if n == 0 {
                break;
            }
            let data = &buf[..n];
            if i % every == 0 {
                let t0 = thread_cpu();
                let out = d.deflate(data, &dict, n < BLOCK).unwrap();
                cpu += thread_cpu() - t0;
                inb += n as u64;
                outb += out.len() as u64;
                blocks += 1;
                if out.len() > n {
                    stored += 1;
                }
            }
            dict = data[n.saturating_sub(DICT)..].to_vec();
            if n < BLOCK {
                break;
            }
        }
        let scale = total / inb as f64;
        println!(
            "| {setting} | {:.1} | {:.4} | {:.2} | {stored}/{blocks} |",
            outb as f64 * scale / 1e6,
            outb as f64 / inb as f64,
            cpu / inb as f64 * 1e9,
        );
    }
}
