//! A hand-written HTTP/1.1 server core for the fakes: read a request head, read (or partly read) its
//! body, write a response. Hand-written so a test can do what a real server never does on purpose —
//! hang up in the middle of a request body.

use std::io;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

pub struct Head {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    pub fn query(&self, key: &str) -> Option<String> {
        let q = self.target.split_once('?')?.1;
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
    }

    #[cfg_attr(not(feature = "lab"), allow(dead_code))] // the token service's tests
    pub fn queries(&self, key: &str) -> Vec<String> {
        let q = self.target.split_once('?').map(|(_, q)| q).unwrap_or("");
        url::form_urlencoded::parse(q.as_bytes())
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
            .collect()
    }
}

pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn new(status: u16) -> Resp {
        Resp {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }
    pub fn header(mut self, k: &str, v: impl Into<String>) -> Resp {
        self.headers.push((k.to_string(), v.into()));
        self
    }
    pub fn body(mut self, b: impl Into<Vec<u8>>) -> Resp {
        self.body = b.into();
        self
    }
    pub fn json(self, v: &serde_json::Value) -> Resp {
        self.header("Content-Type", "application/json")
            .body(serde_json::to_vec(v).unwrap())
    }
    /// An OCI error document.
    pub fn oci_error(status: u16, code: &str) -> Resp {
        Resp::new(status)
            .json(&serde_json::json!({"errors":[{"code": code, "message": code.to_lowercase()}]}))
    }
}

pub type Conn = BufReader<TcpStream>;

/// The next request head on a kept-alive connection; `None` when the client closed it.
pub async fn read_head(conn: &mut Conn) -> io::Result<Option<Head>> {
    let mut line = String::new();
    if conn.read_line(&mut line).await? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        conn.read_line(&mut h).await?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok(Some(Head {
        method,
        target,
        headers,
    }))
}

/// The whole body (Content-Length or chunked).
pub async fn read_body(conn: &mut Conn, head: &Head) -> io::Result<Vec<u8>> {
    if head
        .header("transfer-encoding")
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    {
        let mut body = Vec::new();
        loop {
            let mut size = String::new();
            conn.read_line(&mut size).await?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
            let mut chunk = vec![0; n + 2];
            conn.read_exact(&mut chunk).await?;
            body.extend_from_slice(&chunk[..n]);
            if n == 0 {
                return Ok(body);
            }
        }
    }
    let len: usize = head
        .header("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    read_exactly(conn, len).await
}

pub async fn read_exactly(conn: &mut Conn, len: usize) -> io::Result<Vec<u8>> {
    let mut body = vec![0; len];
    conn.read_exact(&mut body).await?;
    Ok(body)
}

pub async fn write_resp(conn: &mut Conn, resp: &Resp, head_only: bool) -> io::Result<()> {
    let mut out = format!("HTTP/1.1 {} X\r\n", resp.status);
    let mut has_len = false;
    for (k, v) in &resp.headers {
        has_len |= k.eq_ignore_ascii_case("content-length");
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has_len {
        out.push_str(&format!("Content-Length: {}\r\n", resp.body.len()));
    }
    out.push_str("\r\n");
    let stream = conn.get_mut();
    stream.write_all(out.as_bytes()).await?;
    if !head_only {
        stream.write_all(&resp.body).await?;
    }
    stream.flush().await
}
