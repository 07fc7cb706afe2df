//! The driving end: stream, request/response and connect-rate workloads, one thread per
//! connection.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::panic;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::{self, ScopedJoinHandle};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::checksum::{Checksum, Digest};
use super::conn::{Conn, Endpoint};
use super::prng::SplitMix64;
use super::report::{per_second, ConnectReport, RrReport, StreamConnReport, StreamReport};
use super::{Check, Error, SizeRange};

/// A peer that neither reads nor answers for this long is treated as gone, so no blocking
/// call can outlive a run by more than this.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds each connect attempt, since unanswered SYNs are otherwise retried for minutes, while
/// leaving room for one SYN retransmission (initial RTO 1 s): a single dropped SYN then shows
/// up as a slow connect in the latencies instead of as a failure.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
const RETRY_BACKOFF: Duration = Duration::from_millis(20);
/// Each stream message starts at a random offset into a pool this much larger than the
/// biggest message, so consecutive messages differ without generating fresh bytes per write.
const POOL_SLACK: usize = 4096;

#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub peer: Endpoint,
    /// Parallel connections (stream, rr) or connect loops (connect).
    pub conns: u32,
    pub duration: Duration,
    pub nodelay: bool,
    pub seed: u64,
    /// How long to keep retrying the first connect while the server comes up.
    pub connect_retry: Duration,
    /// Stream mode: a second thread waits in read() on each connection from before the first
    /// write, and reads the server's reply (see `READER_SETTLE`).
    pub reader_thread: bool,
}

/// How long a stream's writer waits after its reader thread said it is about to read, so that
/// the first write finds it inside read(): full-duplex applications with blocking I/O keep a
/// reader there for the connection's life, and the kernel counts it as a user of the socket.
const READER_SETTLE: Duration = Duration::from_millis(50);

/// Streams for the duration on every connection and checks each against the server's digest.
///
/// A checksum mismatch is reported (`checksum_ok: false`), not returned as an error, so the
/// caller still gets the numbers.
pub fn stream(opts: &ClientOptions, sizes: SizeRange, check: Check) -> Result<StreamReport, Error> {
    let connections = on_each_conn(opts, |seed| stream_conn(opts, sizes, check, seed))?;
    let bytes = connections.iter().map(|c| c.bytes).sum();
    let elapsed_s = connections.iter().map(|c| c.elapsed_s).fold(0.0, f64::max);
    Ok(StreamReport {
        peer: opts.peer.clone(),
        conns: opts.conns,
        msg_size: sizes,
        nodelay: opts.nodelay,
        seed: opts.seed,
        check,
        elapsed_s,
        bytes,
        msgs: connections.iter().map(|c| c.msgs).sum(),
        throughput_mbps: megabytes_per_s(bytes, elapsed_s),
        gbit_per_s: gbit_per_s(bytes, elapsed_s),
        checksum_ok: connections.iter().all(|c| c.checksum_ok),
        spurious_eagain: connections.iter().map(|c| c.spurious_eagain).sum(),
        connections,
    })
}

fn stream_conn(
    opts: &ClientOptions,
    sizes: SizeRange,
    check: Check,
    seed: u64,
) -> Result<StreamConnReport, Error> {
    let peer = &opts.peer;
    let mut stream = open(opts)?;
    let local = stream.local().map_err(io_err(
        "reading the local address of the connection to",
        peer,
    ))?;
    let mut rng = SplitMix64::new(seed);
    let mut pool = vec![0; sizes.max + POOL_SLACK];
    rng.fill(&mut pool);
    let mut sent = Checksum::new();
    let mut msgs = 0;
    let (start, (wire, spurious_eagain)) = thread::scope(|s| {
        let reader = if opts.reader_thread {
            Some(spawn_reader(s, &stream, peer)?)
        } else {
            None
        };
        let start = Instant::now();
        let deadline = start + opts.duration;
        while Instant::now() < deadline {
            let offset = rng.in_range(0, POOL_SLACK);
            let msg = &pool[offset..offset + rng.in_range(sizes.min, sizes.max)];
            stream.write_all(msg).map_err(io_err("sending to", peer))?;
            match check {
                Check::Checksum => sent.update(msg),
                Check::Length => sent.count(msg.len()),
            }
            msgs += 1;
        }
        stream
            .shutdown(Shutdown::Write)
            .map_err(io_err("closing the stream to", peer))?;
        let reply = match reader {
            Some(reader) => join(reader),
            None => read_reply(&mut stream),
        };
        Ok::<_, Error>((
            start,
            reply.map_err(io_err("reading the checksum reply from", peer))?,
        ))
    })?;
    let elapsed_s = start.elapsed().as_secs_f64();
    let sent = sent.digest();
    let received = Digest::from_wire(wire);
    Ok(StreamConnReport {
        spurious_eagain,
        local,
        bytes: sent.bytes,
        msgs,
        elapsed_s,
        throughput_mbps: megabytes_per_s(sent.bytes, elapsed_s),
        gbit_per_s: gbit_per_s(sent.bytes, elapsed_s),
        checksum: sent.checksum,
        server_checksum: received.checksum,
        server_bytes: received.bytes,
        checksum_ok: match check {
            Check::Checksum => stream_intact(sent, received),
            Check::Length => sent.bytes == received.bytes,
        },
    })
}

/// The server's digest of a stream, and the spurious EAGAINs on the way.
type Reply = ([u8; Digest::WIRE_LEN], u64);

fn read_reply(stream: &mut Conn) -> io::Result<Reply> {
    let mut wire = [0; Digest::WIRE_LEN];
    let mut spurious_eagain = 0;
    read_exact_retrying(stream, &mut wire, &mut spurious_eagain)?;
    Ok((wire, spurious_eagain))
}

/// Starts a thread that reads the reply on its own handle of `stream`, and returns once it
/// is (all but surely) waiting inside read().
fn spawn_reader<'s>(
    s: &'s thread::Scope<'s, '_>,
    stream: &Conn,
    peer: &Endpoint,
) -> Result<ScopedJoinHandle<'s, io::Result<Reply>>, Error> {
    let mut theirs = stream
        .try_clone()
        .map_err(io_err("opening a reader handle on the connection to", peer))?;
    let (ready, started) = std::sync::mpsc::channel();
    let reader = s.spawn(move || {
        let _ = ready.send(());
        read_reply(&mut theirs)
    });
    let _ = started.recv();
    thread::sleep(READER_SETTLE);
    Ok(reader)
}

/// Whether the server received exactly what was sent.
#[must_use]
pub fn stream_intact(sent: Digest, received: Digest) -> bool {
    sent == received
}

/// Ping-pongs `msg_size`-byte requests on every connection for the duration.
///
/// Responses that differ from their request are counted in `mismatches`, not returned as an
/// error, so the caller still gets the latencies.
pub fn rr(opts: &ClientOptions, msg_size: usize) -> Result<RrReport, Error> {
    let workers = on_each_conn(opts, |seed| rr_conn(opts, msg_size, seed))?;
    let mut latency = latency_histogram();
    for worker in &workers {
        latency
            .add(&worker.latency)
            .expect("histograms share their bounds");
    }
    let elapsed_s = workers
        .iter()
        .map(|w| w.elapsed.as_secs_f64())
        .fold(0.0, f64::max);
    Ok(RrReport {
        peer: opts.peer.clone(),
        conns: opts.conns,
        msg_size,
        nodelay: opts.nodelay,
        elapsed_s,
        transactions: latency.len(),
        tps: per_second(latency.len(), elapsed_s),
        p50_us: quantile_us(&latency, 0.5),
        p90_us: quantile_us(&latency, 0.9),
        p99_us: quantile_us(&latency, 0.99),
        p999_us: quantile_us(&latency, 0.999),
        mean_us: latency.mean() / 1e3,
        min_us: latency.min() as f64 / 1e3,
        max_us: latency.max() as f64 / 1e3,
        mismatches: workers.iter().map(|w| w.mismatches).sum(),
        spurious_eagain: workers.iter().map(|w| w.spurious_eagain).sum(),
    })
}

#[derive(Debug)]
struct RrConn {
    latency: Histogram<u64>,
    elapsed: Duration,
    mismatches: u64,
    spurious_eagain: u64,
}

fn rr_conn(opts: &ClientOptions, msg_size: usize, seed: u64) -> Result<RrConn, Error> {
    let peer = &opts.peer;
    let mut stream = open(opts)?;
    let mut request = vec![0; msg_size];
    SplitMix64::new(seed).fill(&mut request);
    let mut response = vec![0; msg_size];
    let mut latency = latency_histogram();
    let mut mismatches = 0;
    let mut spurious_eagain = 0;
    let start = Instant::now();
    let deadline = start + opts.duration;
    for transaction in 0u64.. {
        // Numbering the requests makes a stale or replayed response a mismatch.
        let stamp = transaction.to_le_bytes();
        let stamp_len = stamp.len().min(msg_size);
        request[..stamp_len].copy_from_slice(&stamp[..stamp_len]);
        let sent_at = Instant::now();
        if sent_at >= deadline {
            break;
        }
        stream
            .write_all(&request)
            .map_err(io_err("sending a request to", peer))?;
        read_exact_retrying(&mut stream, &mut response, &mut spurious_eagain)
            .map_err(io_err("reading a response from", peer))?;
        latency.saturating_record(sent_at.elapsed().as_nanos() as u64);
        if response != request {
            mismatches += 1;
        }
    }
    Ok(RrConn {
        latency,
        elapsed: start.elapsed(),
        mismatches,
        spurious_eagain,
    })
}

/// `read_exact` for a blocking socket with a read timeout, retrying EAGAIN that arrives before
/// the timeout could have expired.
///
/// A socket in a sockhash reads through tcp_bpf's recvmsg, which returns EAGAIN to a
/// *blocking* reader that was woken by a segment on the normal TCP path (a FIN, or a message
/// that was not redirected) while its redirect queue was empty. Applications that treat that
/// as an error break; we retry and count, so the effect stays visible in the report.
fn read_exact_retrying(stream: &mut Conn, buf: &mut [u8], spurious: &mut u64) -> io::Result<()> {
    let mut filled = 0;
    let mut deadline = Instant::now() + IO_TIMEOUT;
    while filled < buf.len() {
        match stream.read(&mut buf[filled..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                filled += n;
                deadline = Instant::now() + IO_TIMEOUT;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                *spurious += 1;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Opens and closes connections on every thread for the duration, or until `max_connects`
/// attempts have been made in total; with `hello`, each exchanges one byte each way first.
pub fn connect(
    opts: &ClientOptions,
    max_connects: u64,
    hello: bool,
) -> Result<ConnectReport, Error> {
    let Some(peer) = opts.peer.tcp() else {
        return Err(Error::Usage(
            "connect mode measures TCP connection setup: it needs an ADDR:PORT",
        ));
    };
    // Wait for the server here, outside the measured window, the way the other modes do.
    let Conn::Tcp(first) = connect_with_retry(&opts.peer, opts.connect_retry)? else {
        unreachable!("a TCP peer gives a TCP connection");
    };
    if hello {
        say_hello(&first).map_err(io_err("exchanging a hello with", &opts.peer))?;
    }
    reset_on_close(&first);
    let attempts = AtomicU64::new(0);
    let start = Instant::now();
    let deadline = start + opts.duration;
    let workers: Vec<ConnectWorker> = thread::scope(|s| {
        let handles: Vec<_> = (0..opts.conns)
            .map(|_| s.spawn(|| connect_loop(peer, deadline, &attempts, max_connects, hello)))
            .collect();
        handles.into_iter().map(join).collect()
    });
    let elapsed_s = start.elapsed().as_secs_f64();
    let mut latency = latency_histogram();
    for worker in &workers {
        latency
            .add(&worker.latency)
            .expect("histograms share their bounds");
    }
    Ok(ConnectReport {
        peer: opts.peer.clone(),
        threads: opts.conns,
        elapsed_s,
        connects: latency.len(),
        connects_per_s: per_second(latency.len(), elapsed_s),
        errors: workers.iter().map(|w| w.errors).sum(),
        first_error: workers.iter().find_map(|w| w.first_error.clone()),
        p50_us: quantile_us(&latency, 0.5),
        p99_us: quantile_us(&latency, 0.99),
    })
}

#[derive(Debug)]
struct ConnectWorker {
    latency: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
}

fn connect_loop(
    peer: SocketAddr,
    deadline: Instant,
    attempts: &AtomicU64,
    max_connects: u64,
    hello: bool,
) -> ConnectWorker {
    let mut worker = ConnectWorker {
        latency: latency_histogram(),
        errors: 0,
        first_error: None,
    };
    loop {
        let started = Instant::now();
        if started >= deadline || attempts.fetch_add(1, Ordering::Relaxed) >= max_connects {
            return worker;
        }
        let attempt = TcpStream::connect_timeout(&peer, ATTEMPT_TIMEOUT).and_then(|stream| {
            let said = if hello { say_hello(&stream) } else { Ok(()) };
            reset_on_close(&stream);
            said
        });
        match attempt {
            Ok(()) => {
                worker
                    .latency
                    .saturating_record(started.elapsed().as_nanos() as u64);
            }
            Err(e) => {
                worker.errors += 1;
                worker.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
}

/// One byte to the server and its echo back.
fn say_hello(mut stream: &TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(ATTEMPT_TIMEOUT))?;
    stream.write_all(b"h")?;
    let mut echo = [0u8; 1];
    stream.read_exact(&mut echo)?;
    if echo == *b"h" {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the hello came back changed",
        ))
    }
}

/// Closes with an RST instead of a FIN: the client closes first, so a normal close would
/// leave every connection in `TIME_WAIT` and exhaust ephemeral ports within seconds.
fn reset_on_close(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the descriptor is open for as long as `stream` lives, and the option value is a
    // `linger` whose exact size is passed along.
    // A failure only means an ordinary close, which is still correct, so it is not checked.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Runs `work` on `opts.conns` threads, each with its own seed, returning the first error.
fn on_each_conn<T: Send>(
    opts: &ClientOptions,
    work: impl Fn(u64) -> Result<T, Error> + Sync,
) -> Result<Vec<T>, Error> {
    // Seeds are drawn from the run's generator rather than derived as `seed + i`, because
    // SplitMix64 streams from neighbouring seeds are the same sequence shifted by one.
    let mut seeds = SplitMix64::new(opts.seed);
    let seeds: Vec<u64> = (0..opts.conns).map(|_| seeds.next_u64()).collect();
    thread::scope(|s| {
        let handles: Vec<_> = seeds
            .iter()
            .map(|&seed| {
                let work = &work;
                s.spawn(move || work(seed))
            })
            .collect();
        handles.into_iter().map(join).collect()
    })
}

fn join<T>(handle: ScopedJoinHandle<'_, T>) -> T {
    handle.join().unwrap_or_else(|p| panic::resume_unwind(p))
}

fn open(opts: &ClientOptions) -> Result<Conn, Error> {
    let stream = connect_with_retry(&opts.peer, opts.connect_retry)?;
    let configure = |stream: &Conn| {
        stream.set_nodelay(opts.nodelay)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))
    };
    configure(&stream).map_err(io_err("configuring the connection to", &opts.peer))?;
    Ok(stream)
}

fn connect_with_retry(peer: &Endpoint, retry_for: Duration) -> Result<Conn, Error> {
    let start = Instant::now();
    loop {
        match Conn::connect(peer, ATTEMPT_TIMEOUT) {
            Ok(stream) => return Ok(stream),
            Err(source) if start.elapsed() + RETRY_BACKOFF >= retry_for => {
                return Err(Error::Connect {
                    peer: peer.clone(),
                    waited: start.elapsed(),
                    source,
                })
            }
            Err(_) => thread::sleep(RETRY_BACKOFF),
        }
    }
}

fn io_err<'a>(op: &'static str, peer: &'a Endpoint) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        peer: peer.clone(),
        source,
    }
}

/// Nanosecond latencies from 1 ns to a minute at 3 significant digits.
fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("constant bounds are valid")
}

fn quantile_us(latency: &Histogram<u64>, quantile: f64) -> f64 {
    latency.value_at_quantile(quantile) as f64 / 1e3
}

fn megabytes_per_s(bytes: u64, secs: f64) -> f64 {
    per_second(bytes, secs) / 1e6
}

fn gbit_per_s(bytes: u64, secs: f64) -> f64 {
    per_second(bytes, secs) * 8.0 / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_intact_needs_both_checksum_and_length() {
        let sent = Digest {
            checksum: 1,
            bytes: 10,
        };
        assert!(stream_intact(sent, sent));
        assert!(!stream_intact(
            sent,
            Digest {
                checksum: 2,
                ..sent
            }
        ));
        assert!(!stream_intact(sent, Digest { bytes: 9, ..sent }));
    }

    #[test]
    fn connect_to_a_closed_port_names_the_peer_and_the_wait() {
        let peer = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let started = Instant::now();
        let err = connect_with_retry(&peer.into(), Duration::from_millis(200)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(3));
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("connect to {peer} failed after 0.")),
            "{msg}"
        );
        assert!(msg.contains("refused"), "{msg}");
    }

    #[test]
    fn rates_use_decimal_units() {
        assert!((megabytes_per_s(3_000_000, 2.0) - 1.5).abs() < 1e-12);
        assert!((gbit_per_s(125_000_000, 1.0) - 1.0).abs() < 1e-12);
    }
}
