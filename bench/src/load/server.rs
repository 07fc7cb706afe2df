//! The receiving end: sinks streams, echoes requests, or accepts and drops connections.

use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::panic;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::checksum::Checksum;
use super::conn::{Conn, Endpoint, Listener};
use super::report::{ServerConnReport, ServerReport};
use super::timeline;
use super::{Check, Error, Mode};

/// How long connections still open at the server's deadline get to finish, e.g. those of a
/// client that started a little after the server.
const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// Longest any blocking wait lasts before the deadline is checked again.
const POLL: Duration = Duration::from_millis(100);
/// A peer that stops reading our replies for this long is treated as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Stream mode's default `read()` size.
pub const STREAM_READ_SIZE: usize = 256 << 10;

/// How long a connect-mode server waits for a client's hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(1);

/// What the server does with each accepted connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// Read to EOF, then send back the [`Digest`](super::checksum::Digest) of what arrived,
    /// hashed or only counted.
    Stream(Check),
    /// Echo every `msg_size`-byte request; the size is agreed out of band, by flag.
    Rr { msg_size: usize },
    /// Accept and close at once; with `hello`, first echo the client's one-byte hello.
    Connect { hello: bool },
}

impl Service {
    fn mode(self) -> Mode {
        match self {
            Self::Stream(_) => Mode::Stream,
            Self::Rr { .. } => Mode::Rr,
            Self::Connect { .. } => Mode::Connect,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub listen: Endpoint,
    pub service: Service,
    /// Stop accepting after this long.
    pub duration: Duration,
    /// Stop accepting after this many connections and exit once they are done.
    pub max_conns: Option<u64>,
    pub nodelay: bool,
    /// Stream mode: record bytes received per millisecond for up to this many milliseconds
    /// after each connection's first byte (see [`timeline`]).
    pub timeline_buckets: Option<usize>,
    /// Stream mode: bytes asked for per `read()`. An application's read size matters to the
    /// bypass: its reader holds the socket lock while it copies.
    pub read_size: usize,
}

/// A bound server; binding is separate from [`Server::run`] so the caller can announce the
/// address (port 0 picks one) before any client is started.
#[derive(Debug)]
pub struct Server {
    listener: Listener,
    addr: Endpoint,
    opts: ServerOptions,
}

impl Server {
    pub fn bind(opts: ServerOptions) -> Result<Self, Error> {
        if matches!(opts.service, Service::Connect { .. }) && opts.listen.tcp().is_none() {
            return Err(Error::Usage(
                "connect mode measures TCP connection setup: it needs an ADDR:PORT",
            ));
        }
        let bind_err = |source| Error::Bind {
            addr: opts.listen.clone(),
            source,
        };
        let listener = Listener::bind(&opts.listen).map_err(bind_err)?;
        // Non-blocking so a quiet listener can never hold the server past its deadline.
        listener.set_nonblocking(true).map_err(bind_err)?;
        widen_backlog(&listener).map_err(bind_err)?;
        let addr = listener.local().map_err(bind_err)?;
        Ok(Self {
            listener,
            addr,
            opts,
        })
    }

    #[must_use]
    pub fn local_addr(&self) -> &Endpoint {
        &self.addr
    }

    /// Serves until the duration is up or `max_conns` connections have been handled, then
    /// waits (bounded by a short grace period) for connections still open.
    pub fn run(self) -> Result<ServerReport, Error> {
        let accept_err = |source| Error::Accept {
            addr: self.addr.clone(),
            source,
        };
        let start = Instant::now();
        let deadline = start + self.opts.duration;
        let drain_deadline = deadline + DRAIN_GRACE;
        let max_conns = self.opts.max_conns.unwrap_or(u64::MAX);
        let mut conns = 0;
        let mut handlers: Vec<JoinHandle<ServerConnReport>> = Vec::new();
        while conns < max_conns {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            if !wait_readable(&self.listener, (deadline - now).min(POLL)).map_err(accept_err)? {
                continue;
            }
            // Drain the backlog before polling again: connect-rate clients fill it quickly.
            while conns < max_conns {
                let (stream, peer) = match self.listener.accept() {
                    Ok(accepted) => accepted,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    // The peer reset before we got to it; connect-rate clients do so on purpose.
                    Err(e)
                        if matches!(
                            e.kind(),
                            ErrorKind::ConnectionAborted | ErrorKind::Interrupted
                        ) =>
                    {
                        break
                    }
                    Err(source) => return Err(accept_err(source)),
                };
                conns += 1;
                let nodelay = self.opts.nodelay;
                match self.opts.service {
                    Service::Connect { hello: false } => drop(stream),
                    // Inline, not a thread per connection: one byte each way is quick, and a
                    // client that never sends it costs at most HELLO_TIMEOUT.
                    Service::Connect { hello: true } => answer_hello(stream),
                    Service::Stream(check) => {
                        // One origin for every connection: their series share a time axis.
                        let recorder = self
                            .opts
                            .timeline_buckets
                            .map(|cap| timeline::Recorder::new(start, cap));
                        let how = Sink {
                            check,
                            nodelay,
                            read_size: self.opts.read_size,
                            deadline: drain_deadline,
                        };
                        handlers.push(thread::spawn(move || sink(stream, peer, how, recorder)));
                    }
                    Service::Rr { msg_size } => handlers.push(thread::spawn(move || {
                        echo(stream, peer, msg_size, nodelay, drain_deadline)
                    })),
                }
            }
        }
        let connections: Vec<ServerConnReport> = handlers
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| panic::resume_unwind(p)))
            .collect();
        Ok(ServerReport {
            listen: self.addr.clone(),
            mode: self.opts.service.mode(),
            elapsed_s: start.elapsed().as_secs_f64(),
            conns,
            bytes: connections.iter().map(|c| c.bytes).sum(),
            connections,
        })
    }
}

/// std listens with a backlog of 128, which a connect-rate client overruns during a scheduling
/// hiccup of a few milliseconds; each dropped SYN then costs a 1 s retransmission. Listening
/// again on a listening socket only changes its backlog (the kernel caps it at
/// `net.core.somaxconn`).
fn widen_backlog(listener: &Listener) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor the listener keeps open.
    if unsafe { libc::listen(listener.as_raw_fd(), libc::SOMAXCONN) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Waits up to `timeout` for a pending connection.
fn wait_readable(listener: &Listener, timeout: Duration) -> io::Result<bool> {
    let mut pollfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // Rounded up so a sub-millisecond remainder still sleeps rather than spins.
    let timeout_ms = libc::c_int::try_from(timeout.as_millis() + 1).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pollfd` is a single valid entry that outlives the call, and the listener keeps
    // its descriptor open for the duration.
    match unsafe { libc::poll(&raw mut pollfd, 1, timeout_ms) } {
        -1 => {
            let err = io::Error::last_os_error();
            if err.kind() == ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(err)
            }
        }
        0 => Ok(false),
        _ => Ok(true),
    }
}

fn configure(stream: &Conn, nodelay: bool) -> io::Result<()> {
    // Accepted sockets inherit O_NONBLOCK from the listener on BSD-derived systems.
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(POLL))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    stream.set_nodelay(nodelay)
}

/// One `read`, retried across read timeouts until `deadline`; 0 means EOF.
fn read_some(stream: &mut Conn, buf: &mut [u8], deadline: Instant) -> io::Result<usize> {
    loop {
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                ErrorKind::TimedOut,
                "connection still open at the server's drain deadline",
            ));
        }
        match stream.read(buf) {
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            done => return done,
        }
    }
}

/// How one stream connection is read.
#[derive(Debug, Clone, Copy)]
struct Sink {
    check: Check,
    nodelay: bool,
    read_size: usize,
    deadline: Instant,
}

fn sink(
    mut stream: Conn,
    peer: Endpoint,
    how: Sink,
    mut recorder: Option<timeline::Recorder>,
) -> ServerConnReport {
    let mut sum = Checksum::new();
    let outcome = sink_into(&mut stream, how, &mut sum, recorder.as_mut());
    let digest = sum.digest();
    ServerConnReport {
        peer,
        bytes: digest.bytes,
        checksum: (how.check == Check::Checksum).then_some(digest.checksum),
        transactions: None,
        error: outcome.err().map(|e| e.to_string()),
        timeline: recorder.map(timeline::Recorder::finish),
    }
}

fn sink_into(
    stream: &mut Conn,
    how: Sink,
    sum: &mut Checksum,
    mut recorder: Option<&mut timeline::Recorder>,
) -> io::Result<()> {
    configure(stream, how.nodelay)?;
    let mut buf = vec![0; how.read_size];
    loop {
        match read_some(stream, &mut buf, how.deadline)? {
            0 => return stream.write_all(&sum.digest().to_wire()),
            n => {
                if let Some(r) = recorder.as_deref_mut() {
                    r.record(n);
                }
                match how.check {
                    Check::Checksum => sum.update(&buf[..n]),
                    Check::Length => sum.count(n),
                }
            }
        }
    }
}

fn echo(
    mut stream: Conn,
    peer: Endpoint,
    msg_size: usize,
    nodelay: bool,
    deadline: Instant,
) -> ServerConnReport {
    let mut transactions = 0;
    let outcome = echo_into(&mut stream, msg_size, nodelay, &mut transactions, deadline);
    ServerConnReport {
        peer,
        bytes: transactions * msg_size as u64,
        checksum: None,
        transactions: Some(transactions),
        error: outcome.err().map(|e| e.to_string()),
        timeline: None,
    }
}

fn echo_into(
    stream: &mut Conn,
    msg_size: usize,
    nodelay: bool,
    transactions: &mut u64,
    deadline: Instant,
) -> io::Result<()> {
    configure(stream, nodelay)?;
    let mut msg = vec![0; msg_size];
    loop {
        let mut filled = 0;
        while filled < msg_size {
            match read_some(stream, &mut msg[filled..], deadline)? {
                0 if filled == 0 => return Ok(()),
                0 => {
                    return Err(io::Error::new(
                        ErrorKind::UnexpectedEof,
                        format!("peer closed after {filled} of {msg_size} request bytes"),
                    ))
                }
                n => filled += n,
            }
        }
        stream.write_all(&msg)?;
        *transactions += 1;
    }
}

/// Echoes a connect-mode client's one-byte hello. A client that resets, closes or stays silent
/// instead is its own failure to report, so errors here only end the connection.
fn answer_hello(mut stream: Conn) {
    let mut byte = [0u8; 1];
    let _ = stream
        .set_read_timeout(Some(HELLO_TIMEOUT))
        .and_then(|()| stream.read_exact(&mut byte))
        .and_then(|()| stream.write_all(&byte));
}
