//! A loopback TCP proxy that cuts the connection carrying the client's N-th byte (counted over all
//! connections, client → server), once: a reset in the middle of a request, in front of a real registry.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct CuttingProxy {
    pub addr: SocketAddr,
    pub cut: Arc<AtomicBool>,
    /// Every byte the client sent, for counting requests.
    pub sent: Arc<std::sync::Mutex<Vec<u8>>>,
}

impl CuttingProxy {
    pub async fn start(upstream: String, cut_after: u64) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
        let total = Arc::new(AtomicU64::new(0));
        let (cut2, sent2) = (cut.clone(), sent.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (cut, sent, total) = (cut2.clone(), sent2.clone(), total.clone());
                tokio::spawn(pipe(client, server, cut_after, cut, sent, total));
            }
        });
        CuttingProxy { addr, cut, sent }
    }

    /// How many times the client sent `needle` (e.g. "POST /v2/").
    pub fn count(&self, needle: &str) -> usize {
        let sent = self.sent.lock().unwrap();
        sent.windows(needle.len())
            .filter(|w| *w == needle.as_bytes())
            .count()
    }
}

async fn pipe(
    client: TcpStream,
    server: TcpStream,
    cut_after: u64,
    cut: Arc<AtomicBool>,
    sent: Arc<std::sync::Mutex<Vec<u8>>>,
    total: Arc<AtomicU64>,
) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let back = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut sr, &mut cw).await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match cr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let before = total.fetch_add(n as u64, Ordering::SeqCst);
        let mut n = n;
        let cutting = !cut.load(Ordering::SeqCst) && before + n as u64 > cut_after;
        if cutting {
            n = (cut_after - before.min(cut_after)) as usize;
            cut.store(true, Ordering::SeqCst);
        }
        sent.lock().unwrap().extend_from_slice(&buf[..n]);
        if sw.write_all(&buf[..n]).await.is_err() || cutting {
            break;
        }
    }
    // Dropping both halves closes the connection in the middle of whatever was being sent.
    back.abort();
}
