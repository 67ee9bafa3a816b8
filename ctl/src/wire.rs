//! `tessera bench-wire`: the loopback TCP limit that NVMe/TCP figures are compared with. A tiny
//! request/response server and client in one process exchange messages of the sizes an NVMe/TCP
//! command and its response have (for a 4 KiB read: a 72-byte capsule out, 4 KiB + a 24-byte
//! header back), with the same depth and number of connections, and no storage protocol at all.
//!
//! By default the server runs in a separate process (this binary, `bench-wire --serve`), as a
//! target and its load generator do: every round trip then crosses between two processes, like
//! an NVMe/TCP command does. `--in-process` runs both ends in one process, where a round trip
//! can complete without leaving a worker thread (a lower bound no separate target can reach).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Arguments of `tessera bench-wire`.
#[derive(clap::Args, Debug, Clone)]
pub struct WireArgs {
    /// Request size in bytes.
    #[arg(long, default_value_t = 72)]
    req: usize,
    /// Response size in bytes.
    #[arg(long, default_value_t = 4096 + 24)]
    resp: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 32)]
    qd: usize,
    /// Connections.
    #[arg(long, default_value_t = 1)]
    conns: usize,
    /// Run time in seconds.
    #[arg(long, default_value_t = 5.0)]
    time: f64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Run the server in this process instead of a separate one.
    #[arg(long)]
    in_process: bool,
    /// Only serve: listen on this address, print the bound address on stdout and answer until
    /// stdin closes (what the client side starts in a child process).
    #[arg(long, hide = true)]
    serve: Option<SocketAddr>,
}

#[derive(serde::Serialize)]
struct WireReport {
    server: &'static str,
    req: usize,
    resp: usize,
    qd: usize,
    conns: usize,
    ops: u64,
    seconds: f64,
    ops_per_s: f64,
    mib_per_s: f64,
    lat_p50_us: f64,
    lat_p99_us: f64,
}

async fn serve_conn(mut s: TcpStream, req: usize, resp: usize) {
    // Batched like a good server: answer every whole request that has arrived with one write.
    let _ = s.set_nodelay(true);
    let mut rbuf = vec![0u8; (req * 64).clamp(256 * 1024, 8 << 20)];
    // At most ~1 MiB per write, and at least one response.
    let per_write = (1usize << 20).div_ceil(resp).max(1);
    let wbuf = vec![0x5Au8; resp * per_write];
    let mut pending = 0usize;
    loop {
        let n = match s.read(&mut rbuf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending += n;
        let mut whole = pending / req;
        pending %= req;
        while whole > 0 {
            let k = whole.min(per_write);
            if s.write_all(wbuf.get(..k * resp).unwrap_or_default()).await.is_err() {
                return;
            }
            whole -= k;
        }
    }
}

async fn client(addr: SocketAddr, a: &WireArgs, until: Instant) -> std::io::Result<(u64, Vec<u64>)> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let (mut rd, mut wr) = s.into_split();
    let reqs = vec![0xA5u8; a.req * a.qd];
    // Large enough to take a whole window of responses in one read.
    let mut rbuf = vec![0u8; (a.resp * a.qd).clamp(256 * 1024, 8 << 20)];
    let mut starts = std::collections::VecDeque::with_capacity(a.qd);
    let mut lats = Vec::new();
    wr.write_all(&reqs).await?;
    let t = Instant::now();
    starts.extend(std::iter::repeat_n(t, a.qd));
    let (mut ops, mut pending) = (0u64, 0usize);
    while !starts.is_empty() {
        let n = rd.read(&mut rbuf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        pending += n;
        let done = pending / a.resp;
        pending %= a.resp;
        let now = Instant::now();
        for _ in 0..done {
            if let Some(t0) = starts.pop_front() {
                lats.push((now - t0).as_nanos() as u64);
                ops += 1;
            }
        }
        if now < until && done > 0 {
            wr.write_all(reqs.get(..done * a.req).unwrap_or_default()).await?;
            starts.extend(std::iter::repeat_n(Instant::now(), done));
        }
    }
    Ok((ops, lats))
}

async fn accept_loop(l: TcpListener, req: usize, resp: usize) {
    while let Ok((s, _)) = l.accept().await {
        tokio::spawn(serve_conn(s, req, resp));
    }
}

/// `--serve`: answers on `addr` until stdin reaches end of file (the parent went away).
async fn serve_until_stdin_closes(addr: SocketAddr, req: usize, resp: usize) -> Result<String, String> {
    let l = TcpListener::bind(addr).await.map_err(|e| e.to_string())?;
    println!("{}", l.local_addr().map_err(|e| e.to_string())?);
    tokio::spawn(accept_loop(l, req, resp));
    let _ = tokio::task::spawn_blocking(|| std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new())).await;
    Ok(String::new())
}

/// A server in a child process; it exits when the returned child's stdin is dropped.
fn spawn_server(a: &WireArgs) -> Result<(std::process::Child, SocketAddr), String> {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args(["bench-wire", "--serve", "127.0.0.1:0", "--req", &a.req.to_string(), "--resp", &a.resp.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the wire server: {e}"))?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        std::io::BufReader::new(out).read_line(&mut line).map_err(|e| e.to_string())?;
    }
    let addr = line.trim().parse().map_err(|_| format!("wire server printed {line:?}, not its address"))?;
    Ok((child, addr))
}

/// Runs the measurement and returns the text to print.
pub fn run(a: WireArgs) -> Result<String, String> {
    if a.req == 0 || a.resp == 0 || a.qd == 0 || a.conns == 0 {
        return Err("--req, --resp, --qd and --conns must be at least 1".into());
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    if let Some(addr) = a.serve {
        return rt.block_on(serve_until_stdin_closes(addr, a.req, a.resp));
    }
    let mut child = None;
    let r = rt.block_on(async {
        let addr = if a.in_process {
            let l = TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
            let addr = l.local_addr().map_err(|e| e.to_string())?;
            tokio::spawn(accept_loop(l, a.req, a.resp));
            addr
        } else {
            let (c, addr) = spawn_server(&a)?;
            child = Some(c);
            addr
        };
        measure(&a, addr).await
    });
    if let Some(mut c) = child {
        drop(c.stdin.take());
        let _ = c.wait();
    }
    r
}

async fn measure(a: &WireArgs, addr: SocketAddr) -> Result<String, String> {
    {
        let start = Instant::now();
        let until = start + Duration::from_secs_f64(a.time);
        let a = std::sync::Arc::new(a.clone());
        let tasks: Vec<_> = (0..a.conns)
            .map(|_| {
                let a = a.clone();
                tokio::spawn(async move { client(addr, &a, until).await })
            })
            .collect();
        let (mut ops, mut lats) = (0, Vec::new());
        for t in tasks {
            let (o, l) = t.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
            ops += o;
            lats.extend(l);
        }
        let secs = start.elapsed().as_secs_f64();
        lats.sort_unstable();
        let pct =
            |q: f64| lats.get(((lats.len() as f64 * q) as usize).min(lats.len().saturating_sub(1))).map_or(0.0, |&n| n as f64 / 1000.0);
        let r = WireReport {
            server: if a.in_process { "in-process" } else { "separate process" },
            req: a.req,
            resp: a.resp,
            qd: a.qd,
            conns: a.conns,
            ops,
            seconds: secs,
            ops_per_s: ops as f64 / secs,
            mib_per_s: ops as f64 * a.req.max(a.resp) as f64 / secs / (1 << 20) as f64,
            lat_p50_us: pct(0.5),
            lat_p99_us: pct(0.99),
        };
        if a.json {
            return serde_json::to_string(&r).map(|s| s + "\n").map_err(|e| e.to_string());
        }
        Ok(format!(
            "loopback TCP ({} server) req={} resp={} qd={} conns={}: {:.0} ops/s, {:.1} MiB/s, latency us p50 {:.1} p99 {:.1}\n",
            r.server, r.req, r.resp, r.qd, r.conns, r.ops_per_s, r.mib_per_s, r.lat_p50_us, r.lat_p99_us
        ))
    }
}
