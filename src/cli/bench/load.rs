//! The load generator: `clients` keep-alive mTLS connections, each a single task that writes a
//! prepared request and reads the answer itself.
//!
//! It does not use the general client (`crate::client`): that one runs hyper's connection task
//! beside the caller and passes every request and answer between the two, which costs a task
//! wake-up and a header map per request. The load generator shares the two CPUs with the
//! daemon it measures, so whatever it spends is taken from the daemon's figure; its own CPU per
//! operation is reported beside the daemon's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::raw::timing::cpu_seconds;
use super::scrape::{CommitTotals, Commits};
use super::threads::ByThread;
use crate::client::Client;

/// Largest answer the load generator accepts (a 256-item batch answer is ~25 KB).
const MAX_ANSWER: usize = 1 << 20;

/// One measured window.
pub struct Sample {
    /// Latency of every successful request, microseconds.
    latencies_us: Vec<u32>,
    errors: u64,
    ops: f64,
    seconds: f64,
    server_cpu_s: Option<f64>,
    server_threads: Option<ByThread>,
    commits: Option<CommitTotals>,
    client_cpu_s: Option<f64>,
}

/// The server a window measures: its process, for CPU time, and for a daemon its admin
/// listener, for the audit group commits.
#[derive(Clone, Copy)]
pub struct Server {
    pub pid: Option<u32>,
    pub admin: Option<SocketAddr>,
}

/// One or more windows of the same phase, summed.
pub struct Load {
    pub ops_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
    /// CPU of the measured server process per operation, when its pid is known.
    pub server_cpu_us_per_op: Option<f64>,
    /// The same, by kind of thread.
    pub server_threads_us_per_op: Option<ByThread>,
    /// The daemon's audit group commits.
    pub commits: Option<Commits>,
    /// CPU of this process (the load generator) per operation.
    pub client_cpu_us_per_op: Option<f64>,
}

impl Load {
    pub fn from_samples(samples: Vec<Sample>) -> Self {
        let ops: f64 = samples.iter().map(|s| s.ops).sum();
        let seconds: f64 = samples.iter().map(|s| s.seconds).sum();
        let cpu = |f: fn(&Sample) -> Option<f64>| -> Option<f64> {
            samples
                .iter()
                .map(f)
                .sum::<Option<f64>>()
                .map(|c| c * 1e6 / ops.max(1.0))
        };
        let server_cpu_us_per_op = cpu(|s| s.server_cpu_s);
        let client_cpu_us_per_op = cpu(|s| s.client_cpu_s);
        let server_threads_us_per_op = samples
            .iter()
            .map(|s| s.server_threads)
            .try_fold(ByThread::default(), |sum, t| Some(sum.plus(t?)))
            .map(|t| t.per_op(ops));
        let commits = samples
            .iter()
            .map(|s| s.commits)
            .try_fold(CommitTotals::default(), |sum, c| Some(sum.plus(c?)))
            .and_then(|c| c.over(seconds));
        let errors = samples.iter().map(|s| s.errors).sum();
        let mut all: Vec<u32> = samples.into_iter().flat_map(|s| s.latencies_us).collect();
        all.sort_unstable();
        let pct = |p: f64| {
            all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
                .map_or(0.0, |&us| us as f64 / 1000.0)
        };
        Self {
            ops_per_s: ops / seconds.max(f64::MIN_POSITIVE),
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            errors,
            server_cpu_us_per_op,
            server_threads_us_per_op,
            commits,
            client_cpu_us_per_op,
        }
    }
}

/// What to send and how to judge the answer.
#[derive(Clone)]
pub struct Target {
    pub client: Client,
    pub method: &'static str,
    /// Each request goes to one of these, picked at random per request.
    pub paths: Vec<String>,
    pub body: Bytes,
    /// Operations one successful answer stands for.
    pub per_call: usize,
    /// Extra check of a 2xx answer's body (batches: every item carries a result).
    pub check: fn(&[u8]) -> bool,
}

impl Target {
    fn request(&self, path: &str) -> Bytes {
        let mut head = format!(
            "{} {} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\n",
            self.method,
            path,
            self.client.authority()
        );
        if self.method != "GET" {
            head.push_str(&format!("content-length: {}\r\n", self.body.len()));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&self.body);
        Bytes::from(bytes)
    }
}

/// Run `clients` connections against `target` for the warm-up and measured window; `server`
/// (as far as known) and this process are clocked over the measured window.
pub fn drive(
    rt: &tokio::runtime::Runtime,
    target: Target,
    clients: usize,
    warmup: std::time::Duration,
    measured: std::time::Duration,
    server: Server,
) -> Result<Sample, String> {
    let requests: Arc<Vec<Bytes>> =
        Arc::new(target.paths.iter().map(|p| target.request(p)).collect());
    if requests.is_empty() {
        return Err("no request path".into());
    }
    let target = Arc::new(target);
    let start = Instant::now() + warmup;
    let end = start + measured;
    rt.block_on(async {
        let mut tasks = Vec::new();
        for c in 0..clients {
            let (target, requests) = (target.clone(), requests.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0u64;
                let Ok(mut tls) = target.client.connect_tls().await else {
                    return (lat, 1);
                };
                let mut buf = Vec::with_capacity(4096);
                // A cheap per-client xorshift spreads requests over the paths.
                let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ (c as u64 + 1);
                while Instant::now() < end {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let request = &requests[(x % requests.len() as u64) as usize];
                    let t0 = Instant::now();
                    let ok = match exchange(&mut tls, request, &mut buf).await {
                        Ok((status, body)) => {
                            (200..300).contains(&status) && (target.check)(&buf[body..])
                        }
                        Err(_) => false,
                    };
                    if t0 >= start {
                        if ok {
                            lat.push(t0.elapsed().as_micros() as u32);
                        } else {
                            errors += 1;
                        }
                    }
                    if !ok {
                        // The connection may be out of step; start a fresh one.
                        match target.client.connect_tls().await {
                            Ok(t) => tls = t,
                            Err(_) => break,
                        }
                    }
                }
                (lat, errors)
            }));
        }
        tokio::time::sleep_until(start.into()).await;
        let snapshot = || {
            (
                server.pid.and_then(|p| cpu_seconds(&p.to_string())),
                cpu_seconds("self"),
                server.pid.and_then(ByThread::read),
                server.admin.and_then(CommitTotals::read),
            )
        };
        let cpu0 = snapshot();
        tokio::time::sleep_until(end.into()).await;
        let cpu1 = snapshot();
        let mut all = Vec::new();
        let mut errors = 0;
        for t in tasks {
            let (lat, e) = t.await.map_err(|e| e.to_string())?;
            all.extend(lat);
            errors += e;
        }
        let spent = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| b - a);
        Ok(Sample {
            ops: (all.len() * target.per_call) as f64,
            latencies_us: all,
            errors,
            seconds: measured.as_secs_f64(),
            server_cpu_s: spent(cpu0.0, cpu1.0),
            server_threads: cpu0.2.zip(cpu1.2).map(|(a, b)| b.since(a)),
            commits: cpu0.3.zip(cpu1.3).map(|(a, b)| b.since(a)),
            client_cpu_s: spent(cpu0.1, cpu1.1),
        })
    })
}

/// One request and its answer on a keep-alive connection: the status and where the body starts
/// in `buf` (which then holds exactly the answer).
async fn exchange<S>(
    stream: &mut S,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> Result<(u16, usize), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream.write_all(request).await.map_err(|e| e.to_string())?;
    buf.clear();
    let (status, head_len, body_len) = loop {
        read_more(stream, buf).await?;
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let len = resp
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| {
                        std::str::from_utf8(h.value)
                            .ok()?
                            .trim()
                            .parse::<usize>()
                            .ok()
                    })
                    .ok_or("answer without content-length")?;
                break (resp.code.unwrap_or(0), head_len, len);
            }
            Ok(httparse::Status::Partial) => continue,
            Err(e) => return Err(e.to_string()),
        }
    };
    let total = head_len + body_len;
    if total > MAX_ANSWER {
        return Err("answer too large".into());
    }
    while buf.len() < total {
        read_more(stream, buf).await?;
    }
    if buf.len() > total {
        return Err("bytes after the answer".into());
    }
    Ok((status, head_len))
}

async fn read_more<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> Result<(), String> {
    if buf.len() >= MAX_ANSWER {
        return Err("answer too large".into());
    }
    buf.reserve(4096);
    let n = stream.read_buf(buf).await.map_err(|e| e.to_string())?;
    if n == 0 {
        return Err("connection closed".into());
    }
    Ok(())
}
