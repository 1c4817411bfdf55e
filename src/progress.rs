//! Progress of a long commit: byte counters bumped by the stages (tar bytes read from the
//! sandbox, compressed layer bytes written, bytes sent to the registry), and a reporter that
//! logs them every few seconds — as JSON events when stderr is not a terminal, as one
//! self-overwriting line when it is. Counters are relaxed atomics: cheap on the hot path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

static TAR: AtomicU64 = AtomicU64::new(0);
static LAYER: AtomicU64 = AtomicU64::new(0);
static SENT: AtomicU64 = AtomicU64::new(0);

pub fn add_tar(n: u64) {
    TAR.fetch_add(n, Ordering::Relaxed);
}
pub fn add_layer(n: u64) {
    LAYER.fetch_add(n, Ordering::Relaxed);
}
pub fn add_sent(n: u64) {
    SENT.fetch_add(n, Ordering::Relaxed);
}

#[derive(Clone, Copy)]
struct Sample {
    tar: u64,
    layer: u64,
    sent: u64,
}

fn sample() -> Sample {
    Sample {
        tar: TAR.load(Ordering::Relaxed),
        layer: LAYER.load(Ordering::Relaxed),
        sent: SENT.load(Ordering::Relaxed),
    }
}

/// Reports progress until the returned handle is aborted. Quiet for commits shorter than `every`.
pub fn start_reporter(every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let started = Instant::now();
        let mut last = (started, sample());
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tick.tick().await;
            let now = (Instant::now(), sample());
            let secs = now.0.duration_since(last.0).as_secs_f64().max(0.001);
            let rate = |a: u64, b: u64| (a.saturating_sub(b)) as f64 / secs / 1e6;
            let (s, p) = (now.1, last.1);
            crate::log::event(
                2,
                &format!(
                    "progress: read {} MB, compressed {} MB, uploaded {} MB ({:.0} MB/s read, {:.0} MB/s up)",
                    s.tar / 1_000_000,
                    s.layer / 1_000_000,
                    s.sent / 1_000_000,
                    rate(s.tar, p.tar),
                    rate(s.sent, p.sent)
                ),
                serde_json::json!({
                    "event": "progress",
                    "elapsedMs": started.elapsed().as_millis() as u64,
                    "tarBytes": s.tar, "layerBytes": s.layer, "uploadedBytes": s.sent,
                    "readMBps": (rate(s.tar, p.tar) * 10.0).round() / 10.0,
                    "uploadMBps": (rate(s.sent, p.sent) * 10.0).round() / 10.0,
                }),
            );
            last = now;
        }
    })
}
