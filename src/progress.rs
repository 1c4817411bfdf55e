//! Progress of a commit, in the order its bytes move: the tar read from the sandbox (total
//! unknown until it ends), its compression (against the tar's size), the upload of the new
//! layer (against the layer's size). The stages overlap: the compressor runs during the read
//! and the upload during the compression; the stage shown is the earliest one still running,
//! with the later ones' counts beside it, and an upload whose total is not known yet (it streams
//! what the compressor produces) shows no bar and no ETA until the layer's size is known. The stages bump relaxed atomic counters on their hot path;
//! a ticker shows them — a live bar on a terminal (`indicatif`), JSON `progress` events or
//! text lines every 2 s when stderr is piped, nothing with `--quiet`.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Off,
    Bar,
    Json,
    Text,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Preparing,
    Reading,
    Compressing,
    Uploading,
}

const STAGES: [Stage; 4] = [
    Stage::Preparing,
    Stage::Reading,
    Stage::Compressing,
    Stage::Uploading,
];

/// The counters; one static instance (`C`), a local one in tests.
struct Counters {
    stage: AtomicU8,
    read: AtomicU64,
    compress_in: AtomicU64,
    compress_total: AtomicU64,
    layer_out: AtomicU64,
    sent: AtomicU64,
    sent_total: AtomicU64,
    /// A compressing layer writer has begun (its stage follows the read).
    compressing: std::sync::atomic::AtomicBool,
    /// The capture is done (a compressor starting later shows its stage at once).
    captured: std::sync::atomic::AtomicBool,
    /// The layer is uploaded as it is compressed; its size is not known yet.
    streaming: std::sync::atomic::AtomicBool,
    stage_since: Mutex<Option<Instant>>,
}

std::thread_local! {
    /// This thread captures the sandbox's tar (its layer writer counts as the read).
    static READING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks the calling thread as the sandbox's reader until the guard drops: its tar bytes count
/// as read, while another thread compresses them at the same time.
pub fn reading_thread() -> ReadingThread {
    #[cfg(any(debug_assertions, feature = "lab"))]
    test_panic_point();
    READING.with(|r| r.set(true));
    ReadingThread(())
}

pub struct ReadingThread(());

/// Debug and lab builds only, on the thread that reads the paused sandbox: `COMMITTER_TEST_PANIC=reading`
/// panics there, as a bug would (a test sees a panic end in one line, exit 1 and a running sandbox);
/// `COMMITTER_TEST_STALL=reading` holds the read for a minute (a test kills the process while the
/// sandbox is paused, however fast the capture), `reading:N` for N seconds (a test sees the pause
/// however slowly it polls, and the commit then goes on).
#[cfg(any(debug_assertions, feature = "lab"))]
fn test_panic_point() {
    if std::env::var_os("COMMITTER_TEST_PANIC").is_some_and(|v| v == "reading") {
        panic!("COMMITTER_TEST_PANIC=reading");
    }
    if let Some(v) = std::env::var_os("COMMITTER_TEST_STALL") {
        let seconds = match v.to_str().and_then(|v| v.strip_prefix("reading")) {
            Some("") => 60,
            Some(n) => n
                .strip_prefix(':')
                .and_then(|n| n.parse().ok())
                .unwrap_or(0),
            None => 0,
        };
        std::thread::sleep(Duration::from_secs(seconds));
    }
}

fn on_reading_thread() -> bool {
    READING.with(|r| r.get())
}

static C: Counters = Counters::new();
static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// A layer writer starts. An uncompressed pass is the read of the sandbox (a second read, as
/// after an inexact upperdir, counts from 0 again); a compressing pass compresses the tar being
/// read (counting from 0 again when it starts over).
pub fn begin_pass(compressing: bool) {
    C.begin_pass(compressing)
}
/// The read is done: the compression's total is what it produced.
pub fn captured() {
    C.captured()
}
/// Uncompressed tar bytes into a layer writer: read from the sandbox, or compressed.
pub fn add_tar(n: u64) {
    C.add_tar(n)
}
/// Compressed bytes out of a compressing layer writer.
pub fn add_layer(n: u64) {
    C.add_layer(n)
}
/// The upload of the new layer (`total` bytes) starts.
pub fn begin_upload(total: u64) {
    C.begin_upload(total)
}
/// The upload of the new layer starts while it is compressed: its size is not known yet.
pub fn begin_streamed_upload() {
    C.sent.store(0, Ordering::Relaxed);
    C.sent_total.store(0, Ordering::Relaxed);
    C.streaming.store(true, Ordering::Relaxed);
}
/// The streamed layer is compressed whole (`total` bytes): what is left is its upload.
pub fn upload_total_known(total: u64) {
    C.sent_total.store(total, Ordering::Relaxed);
    C.streaming.store(false, Ordering::Relaxed);
    C.set_stage(Stage::Uploading);
}
pub fn add_sent(n: u64) {
    C.sent.fetch_add(n, Ordering::Relaxed);
}
/// The registry holds `n` bytes of the upload (after a retry re-synchronised it).
pub fn set_sent(n: u64) {
    C.sent.store(n, Ordering::Relaxed);
}
pub fn totals() -> Totals {
    C.totals()
}

/// What the counters say now.
#[derive(Debug, Clone, Copy)]
pub struct Totals {
    pub read: u64,
    pub compressed_in: u64,
    pub layer: u64,
    pub uploaded: u64,
}

/// The current stage's counter, its total (None while reading), and its mean rate.
struct Current {
    stage: Stage,
    done: u64,
    total: Option<u64>,
    per_sec: f64,
}

impl Counters {
    const fn new() -> Counters {
        Counters {
            stage: AtomicU8::new(0),
            read: AtomicU64::new(0),
            compress_in: AtomicU64::new(0),
            compress_total: AtomicU64::new(0),
            layer_out: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            sent_total: AtomicU64::new(0),
            compressing: std::sync::atomic::AtomicBool::new(false),
            captured: std::sync::atomic::AtomicBool::new(false),
            streaming: std::sync::atomic::AtomicBool::new(false),
            stage_since: Mutex::new(None),
        }
    }

    fn set_stage(&self, s: Stage) {
        self.stage.store(s as u8, Ordering::Relaxed);
        *self.stage_since.lock().expect("progress lock") = Some(Instant::now());
    }

    fn stage(&self) -> Stage {
        STAGES[self.stage.load(Ordering::Relaxed) as usize % STAGES.len()]
    }

    fn begin_pass(&self, compressing: bool) {
        // A writer off the reading thread builds the layer from the capture (an uncompressed
        // one too: the per-file capture's tar is reassembled after the resume).
        if compressing || !on_reading_thread() {
            self.compress_in.store(0, Ordering::Relaxed);
            self.layer_out.store(0, Ordering::Relaxed);
            self.compressing.store(true, Ordering::Relaxed);
            // Started after the capture ended: its stage is now.
            if self.captured.load(Ordering::Relaxed) {
                self.captured();
            }
        } else {
            self.read.store(0, Ordering::Relaxed);
            self.captured.store(false, Ordering::Relaxed);
            self.set_stage(Stage::Reading);
        }
    }

    fn captured(&self) {
        self.captured.store(true, Ordering::Relaxed);
        if self.compressing.load(Ordering::Relaxed) {
            let read = self.read.load(Ordering::Relaxed);
            self.compress_total.store(read, Ordering::Relaxed);
            self.set_stage(Stage::Compressing);
        }
    }

    fn add_tar(&self, n: u64) {
        let counter = match on_reading_thread() {
            true => &self.read,
            false => &self.compress_in,
        };
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn add_layer(&self, n: u64) {
        if !on_reading_thread() {
            self.layer_out.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn begin_upload(&self, total: u64) {
        self.sent.store(0, Ordering::Relaxed);
        self.sent_total.store(total, Ordering::Relaxed);
        self.streaming.store(false, Ordering::Relaxed);
        self.set_stage(Stage::Uploading);
    }

    fn totals(&self) -> Totals {
        Totals {
            read: self.read.load(Ordering::Relaxed),
            compressed_in: self.compress_in.load(Ordering::Relaxed),
            layer: self.layer_out.load(Ordering::Relaxed),
            uploaded: self.sent.load(Ordering::Relaxed),
        }
    }

    fn current(&self) -> Current {
        let stage = self.stage();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (done, total) = match stage {
            Stage::Preparing => (0, None),
            Stage::Reading => (load(&self.read), None),
            Stage::Compressing => (load(&self.compress_in), Some(load(&self.compress_total))),
            Stage::Uploading if self.streaming.load(Ordering::Relaxed) => (load(&self.sent), None),
            Stage::Uploading => (load(&self.sent), Some(load(&self.sent_total))),
        };
        let secs = self
            .stage_since
            .lock()
            .expect("progress lock")
            .map_or(0.0, |t| t.elapsed().as_secs_f64());
        let done = total.map_or(done, |t| done.min(t));
        Current {
            stage,
            done,
            total,
            per_sec: if secs > 0.05 { done as f64 / secs } else { 0.0 },
        }
    }
}

impl Current {
    fn eta_secs(&self) -> Option<u64> {
        let left = self.total?.saturating_sub(self.done);
        (self.per_sec > 0.0).then(|| (left as f64 / self.per_sec).ceil() as u64)
    }
    fn verb(&self) -> &'static str {
        match self.stage {
            Stage::Preparing => "preparing",
            Stage::Reading => "reading",
            Stage::Compressing => "compressing",
            Stage::Uploading => "uploading",
        }
    }
}

static TICKER: Mutex<Option<tokio::task::JoinHandle<()>>> = Mutex::new(None);

/// Starts showing progress in `mode` (inside a tokio runtime); `stop` ends it.
pub fn start(mode: Mode) {
    C.set_stage(Stage::Preparing);
    let ticker = match mode {
        Mode::Off => return,
        Mode::Bar => tokio::spawn(bar_ticker()),
        Mode::Json | Mode::Text => tokio::spawn(event_ticker(mode == Mode::Json)),
    };
    if let Some(old) = TICKER.lock().expect("progress lock").replace(ticker) {
        old.abort();
    }
}

/// Stops the ticker and clears the bar, so the lines printed next stand alone. Safe to call
/// any number of times.
pub fn stop() {
    if let Some(t) = TICKER.lock().expect("progress lock").take() {
        t.abort();
    }
    if let Some(bar) = BAR.lock().expect("progress lock").take() {
        bar.finish_and_clear();
    }
}

/// Runs `f` (which writes a line to stderr) with the bar hidden, so lines and bar do not mix.
pub fn suspend<R>(f: impl FnOnce() -> R) -> R {
    let bar = BAR.lock().expect("progress lock").clone();
    match bar {
        Some(b) => b.suspend(f),
        None => f(),
    }
}

fn style(stage: Stage, total_known: bool) -> ProgressStyle {
    let template = match stage {
        Stage::Preparing => "{spinner} {prefix:12} {elapsed}",
        _ if !total_known => "{spinner} {prefix:12} {decimal_bytes:>10}  {msg}",
        _ => "{spinner} {prefix:12} [{bar:30}] {decimal_bytes:>10}/{decimal_total_bytes:<10} {msg}",
    };
    ProgressStyle::with_template(template)
        .expect("a constant template")
        .progress_chars("=> ")
}

/// A fresh bar for a stage (a reset bar would first redraw with the old stage's style).
fn stage_bar(now: &Current) -> ProgressBar {
    let target = ProgressDrawTarget::stderr_with_hz(10);
    ProgressBar::with_draw_target(now.total, target)
        .with_style(style(now.stage, now.total.is_some()))
        .with_prefix(now.verb())
}

async fn bar_ticker() {
    let mut shown: Option<(Stage, bool)> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let now = C.current();
        let mut slot = BAR.lock().expect("progress lock");
        let key = (now.stage, now.total.is_some());
        if shown != Some(key) || slot.is_none() {
            if let Some(old) = slot.take() {
                old.finish_and_clear();
            }
            *slot = Some(stage_bar(&now));
            shown = Some(key);
        }
        if let Some(bar) = slot.as_ref() {
            // Our own rate and ETA: since the stage began, not since this bar was drawn.
            let mut msg = format!("{:>10}/s", human_bytes(now.per_sec as u64));
            if let Some(eta) = now.eta_secs() {
                msg += &format!("  ETA {eta} s");
            }
            if let Some(sent) = C.streamed() {
                msg += &format!("  uploaded {}", human_bytes(sent));
            }
            bar.set_message(msg);
            bar.set_position(now.done);
        }
    }
}

async fn event_ticker(json: bool) {
    let started = Instant::now();
    // An event every 2 s, and one as each stage begins (a short commit still shows each).
    let every = Duration::from_secs(2);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let (mut last_stage, mut last_event) = (Stage::Preparing, Instant::now());
    loop {
        tick.tick().await;
        let now = C.current();
        if now.stage == Stage::Preparing {
            // Nothing moves yet; a stuck containerd is named by its deadline's error instead.
            continue;
        }
        if now.stage == last_stage && last_event.elapsed() < every {
            continue;
        }
        (last_stage, last_event) = (now.stage, Instant::now());
        let t = totals();
        let fields = serde_json::json!({
            "event": "progress",
            "stage": now.verb(),
            "elapsedMs": started.elapsed().as_millis() as u64,
            "readBytes": t.read,
            "compressedBytes": t.compressed_in,
            "compressTotal": C.compress_total.load(Ordering::Relaxed),
            "layerBytes": t.layer,
            "uploadedBytes": t.uploaded,
            "uploadTotal": C.upload_total(),
            "bytesPerSec": now.per_sec.round() as u64,
            "etaSeconds": now.eta_secs(),
        });
        let msg = if json {
            "progress".to_string()
        } else {
            text_line(&now)
        };
        crate::log::event(2, &msg, fields);
    }
}

fn text_line(now: &Current) -> String {
    let mut line = format!("progress: {} {}", now.verb(), human_bytes(now.done));
    if let Some(total) = now.total.filter(|t| *t > 0) {
        line += &format!(" of {} ({}%)", human_bytes(total), now.done * 100 / total);
    }
    line += &format!(", {}/s", human_bytes(now.per_sec as u64));
    if let Some(eta) = now.eta_secs() {
        line += &format!(", ETA {eta} s");
    }
    if let Some(sent) = C.streamed() {
        line += &format!(", {} uploaded so far", human_bytes(sent));
    }
    line
}

impl Counters {
    /// Bytes of a streamed upload, while the layer's size is unknown and an earlier stage shows.
    fn streamed(&self) -> Option<u64> {
        (self.streaming.load(Ordering::Relaxed) && self.stage() != Stage::Uploading)
            .then(|| self.sent.load(Ordering::Relaxed))
    }

    /// The upload's total; None while it streams a layer still being compressed.
    fn upload_total(&self) -> Option<u64> {
        (!self.streaming.load(Ordering::Relaxed)).then(|| self.sent_total.load(Ordering::Relaxed))
    }
}

/// `1.5 MB`-style sizes (decimal units, as registries and `docker images` show them).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_compress_pass_counts_against_the_tar_read_and_does_not_bump_the_read() {
        let c = Counters::new();
        c.begin_pass(true);
        let reading = std::thread::scope(|s| {
            s.spawn(|| {
                let _r = reading_thread();
                c.begin_pass(false);
                c.add_tar(600);
                c.add_layer(600);
            });
            // The compressor, meanwhile, on another thread.
            s.spawn(|| {
                c.add_tar(200);
                c.add_layer(50);
            });
            c.stage()
        });
        assert_ne!(reading, Stage::Compressing, "the read shows first");
        c.captured();
        let (t, now) = (c.totals(), c.current());
        assert_eq!((t.read, t.compressed_in, t.layer), (600, 200, 50));
        assert_eq!((now.done, now.total), (200, Some(600)));
        c.begin_upload(50);
        c.sent.fetch_add(80, Ordering::Relaxed);
        assert_eq!(
            c.current().done,
            50,
            "a retried chunk never shows more than the total"
        );
        assert_eq!(human_bytes(45_300_000), "45.3 MB");
    }

    #[test]
    fn a_streamed_upload_has_no_total_until_the_layer_is_compressed() {
        let c = Counters::new();
        c.begin_pass(true);
        c.captured();
        c.sent.store(0, Ordering::Relaxed);
        c.streaming.store(true, Ordering::Relaxed);
        c.sent.fetch_add(70, Ordering::Relaxed);
        assert_eq!(c.upload_total(), None);
        assert_eq!(c.streamed(), Some(70), "shown beside the compression");
        c.sent_total.store(100, Ordering::Relaxed);
        c.streaming.store(false, Ordering::Relaxed);
        c.set_stage(Stage::Uploading);
        let now = c.current();
        assert_eq!((now.done, now.total), (70, Some(100)));
        assert_eq!(c.upload_total(), Some(100));
        assert_eq!(now.eta_secs().is_some(), now.per_sec > 0.0);
    }
}
