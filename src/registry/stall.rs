//! The stall watch of a streamed request body: when it last moved, so that a connection that
//! stops taking bytes is cut (`Client::execute_watched`), while a body that waits for its own
//! producer (a layer still being compressed) is not counted as stalled.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// When a streamed body last moved, for [`Client::execute_watched`].
#[derive(Clone)]
pub(crate) struct Progress {
    started: Instant,
    last_ms: Arc<AtomicU64>,
    /// The body waits for its producer (a layer still being compressed), not for the network.
    producing: Arc<AtomicBool>,
}

impl Progress {
    pub(crate) fn new() -> Progress {
        Progress {
            started: Instant::now(),
            last_ms: Default::default(),
            producing: Default::default(),
        }
    }

    pub(crate) fn touch(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.last_ms.store(now, Ordering::Relaxed);
    }

    /// The connection asked for more and the body has none yet (`true`), or has some (`false`).
    pub(crate) fn producing(&self, waiting: bool) {
        self.touch();
        self.producing.store(waiting, Ordering::Relaxed);
    }

    pub(crate) fn idle(&self) -> Duration {
        if self.producing.load(Ordering::Relaxed) {
            return Duration::ZERO;
        }
        let last = self.last_ms.load(Ordering::Relaxed);
        self.started
            .elapsed()
            .saturating_sub(Duration::from_millis(last))
    }
}
