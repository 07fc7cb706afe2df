//! `quicklane loadgen ...`: arguments, and the JSON lines written to stdout.

use std::io::{self, Write};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use nix::{
    sched::{sched_setaffinity, CpuSet},
    unistd::Pid,
};
use serde::Serialize;

use super::client::{self, ClientOptions};
use super::report::{Event, Report};
use super::server::{Server, ServerOptions, Service, STREAM_READ_SIZE};
use super::{parse_msg_size, timeline, Check, Endpoint, Error, Mode, SizeRange};

/// quicklane's TCP load generator; prints JSON lines on stdout.
#[derive(Debug, Parser)]
#[command(name = "loadgen")]
pub struct LoadgenArgs {
    #[command(subcommand)]
    pub command: LoadgenCommand,
}

#[derive(Debug, Subcommand)]
pub enum LoadgenCommand {
    /// Accept connections and sink, echo or drop them.
    Server(ServerArgs),
    /// Drive a stream, rr or connect workload against a server.
    Client(ClientArgs),
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Address to listen on, e.g. `0.0.0.0:5001` or `[::]:5001` (port 0 picks a free port),
    /// or `unix:PATH` for an AF_UNIX stream socket (stream and rr modes).
    #[arg(long, value_name = "ADDR:PORT|unix:PATH", value_parser = Endpoint::parse_named)]
    pub listen: Endpoint,

    #[arg(long, value_enum, default_value_t = Mode::Stream)]
    pub mode: Mode,

    /// Request and response size in rr mode; must equal the client's --msg-size.
    #[arg(
        long,
        value_name = "BYTES",
        value_parser = parse_msg_size,
        required_if_eq("mode", "rr")
    )]
    pub msg_size: Option<usize>,

    /// Stop accepting after this many seconds.
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = parse_secs)]
    pub duration: Duration,

    /// Connect mode: echo each client's one-byte hello before closing (the client's --hello).
    #[arg(long)]
    pub hello: bool,

    /// Stream mode: bytes asked for per read() (an application's read size matters to the
    /// bypass: its reader holds the socket lock while it copies).
    #[arg(long, value_name = "BYTES", value_parser = parse_msg_size)]
    pub read_size: Option<usize>,

    /// Stream mode: hash what arrives (checksum) or only count it (length), matching the
    /// client's --check.
    #[arg(long, value_enum, default_value_t = Check::Checksum)]
    pub check: Check,

    /// Exit once this many connections have been served.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_conns: Option<u64>,

    /// Leave Nagle's algorithm on for accepted connections.
    #[arg(long)]
    pub no_nodelay: bool,

    /// Stream mode: report each connection's bytes received per 1 ms bucket, for up to N ms
    /// after its first byte, on a time axis shared by all connections of this server.
    #[arg(
        long,
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..=timeline::MAX_BUCKETS as i64)
    )]
    pub timeline_buckets: Option<u32>,

    /// Run on this CPU only: a measurement whose two ends the scheduler may place on one
    /// CPU or on two between runs spreads far wider than the effects it is after.
    #[arg(long, value_name = "CPU")]
    pub cpu: Option<usize>,
}

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Server address, e.g. `10.77.1.2:5001` or `[::1]:5001`, or `unix:PATH` (stream and rr
    /// modes).
    #[arg(long, value_name = "ADDR:PORT|unix:PATH", value_parser = Endpoint::parse_named)]
    pub connect: Endpoint,

    #[arg(long, value_enum)]
    pub mode: Mode,

    /// Message size (stream) or request and response size (rr).
    #[arg(long, value_name = "BYTES", value_parser = parse_msg_size)]
    pub msg_size: Option<usize>,

    /// Stream mode: have the server vouch for every byte (checksum) or only for the count
    /// (length: for throughput, where hashing on both ends would cost as much CPU as the path
    /// being measured); the server's --check must match.
    #[arg(long, value_enum, default_value_t = Check::Checksum)]
    pub check: Check,

    /// Stream mode: draw each message's size uniformly from MIN..=MAX.
    #[arg(long, value_name = "MIN:MAX", conflicts_with = "msg_size")]
    pub random_sizes: Option<SizeRange>,

    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_secs)]
    pub duration: Duration,

    /// Parallel connections (stream, rr) or connect loops (connect).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        value_parser = clap::value_parser!(u32).range(1..=4096)
    )]
    pub conns: u32,

    /// Seed for message sizes and payloads; the same seed sends the same bytes.
    #[arg(long, value_name = "S", default_value_t = 1)]
    pub seed: u64,

    /// Connect mode: stop after this many attempts in total even if time remains.
    #[arg(long, value_name = "N", default_value_t = 200_000)]
    pub max_connects: u64,

    /// Connect mode: send one byte on each connection and wait for the server's echo (the
    /// server's --hello) before closing, so every connection carries data.
    #[arg(long)]
    pub hello: bool,

    /// Leave Nagle's algorithm on, as qperf does.
    #[arg(long)]
    pub no_nodelay: bool,

    /// Stream mode: keep a second thread waiting in read() on each connection while the first
    /// writes, as a full-duplex application with blocking I/O does; it reads the reply.
    #[arg(long)]
    pub reader_thread: bool,

    /// Keep retrying the first connect this long while the server comes up.
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_secs)]
    pub connect_retry: Duration,

    /// Run on this CPU only: a measurement whose two ends the scheduler may place on one
    /// CPU or on two between runs spreads far wider than the effects it is after.
    #[arg(long, value_name = "CPU")]
    pub cpu: Option<usize>,
}

/// Runs the load generator, printing its JSON lines to stdout.
///
/// Fails after printing the report if a stream checksum or an rr response did not match, so
/// the process exits non-zero while the numbers stay available.
pub fn run(args: LoadgenArgs) -> Result<(), Error> {
    run_with_output(args, &mut io::stdout())
}

/// [`run`], writing the JSON lines to `out` (flushed after each line).
pub fn run_with_output(args: LoadgenArgs, out: &mut impl Write) -> Result<(), Error> {
    match args.command {
        LoadgenCommand::Server(args) => serve(&args, out),
        LoadgenCommand::Client(args) => drive(&args, out),
    }
}

fn serve(args: &ServerArgs, out: &mut impl Write) -> Result<(), Error> {
    pin(args.cpu)?;
    let service = match args.mode {
        Mode::Stream => Service::Stream(args.check),
        _ if args.check != Check::Checksum => {
            return Err(Error::Usage("--check needs --mode stream"));
        }
        Mode::Rr => Service::Rr {
            msg_size: args
                .msg_size
                .ok_or(Error::Usage("rr mode needs --msg-size"))?,
        },
        Mode::Connect => Service::Connect { hello: args.hello },
    };
    if !matches!(service, Service::Stream(_)) {
        if args.timeline_buckets.is_some() {
            return Err(Error::Usage("--timeline-buckets needs --mode stream"));
        }
        if args.read_size.is_some() {
            return Err(Error::Usage("--read-size needs --mode stream"));
        }
    }
    let server = Server::bind(ServerOptions {
        listen: args.listen.clone(),
        service,
        duration: args.duration,
        max_conns: args.max_conns,
        nodelay: !args.no_nodelay,
        timeline_buckets: args.timeline_buckets.map(|n| n as usize),
        read_size: args.read_size.unwrap_or(STREAM_READ_SIZE),
    })?;
    emit(
        out,
        &Event::Listening {
            addr: server.local_addr().clone(),
        },
    )?;
    emit(out, &Report::Server(server.run()?))
}

fn drive(args: &ClientArgs, out: &mut impl Write) -> Result<(), Error> {
    pin(args.cpu)?;
    let opts = ClientOptions {
        peer: args.connect.clone(),
        conns: args.conns,
        duration: args.duration,
        nodelay: !args.no_nodelay,
        seed: args.seed,
        connect_retry: args.connect_retry,
        reader_thread: args.reader_thread,
    };
    if args.check != Check::Checksum && args.mode != Mode::Stream {
        return Err(Error::Usage("--check needs --mode stream"));
    }
    if args.reader_thread && args.mode != Mode::Stream {
        return Err(Error::Usage("--reader-thread needs --mode stream"));
    }
    match args.mode {
        Mode::Stream => {
            let sizes = args
                .random_sizes
                .or(args.msg_size.map(SizeRange::fixed))
                .ok_or(Error::Usage(
                    "stream mode needs --msg-size or --random-sizes",
                ))?;
            let report = client::stream(&opts, sizes, args.check)?;
            let mismatched = report.connections.iter().filter(|c| !c.checksum_ok).count();
            emit(out, &Report::Stream(report))?;
            if mismatched > 0 {
                return Err(Error::ChecksumMismatch {
                    peer: opts.peer.clone(),
                    check: args.check,
                    mismatched,
                    conns: opts.conns as usize,
                });
            }
            Ok(())
        }
        Mode::Rr => {
            if args.random_sizes.is_some() {
                return Err(Error::Usage(
                    "rr mode takes a fixed --msg-size, not --random-sizes",
                ));
            }
            let msg_size = args
                .msg_size
                .ok_or(Error::Usage("rr mode needs --msg-size"))?;
            let report = client::rr(&opts, msg_size)?;
            let (mismatches, transactions) = (report.mismatches, report.transactions);
            emit(out, &Report::Rr(report))?;
            if mismatches > 0 {
                return Err(Error::ResponseMismatch {
                    peer: opts.peer.clone(),
                    mismatches,
                    transactions,
                });
            }
            Ok(())
        }
        Mode::Connect => emit(
            out,
            &Report::Connect(client::connect(&opts, args.max_connects, args.hello)?),
        ),
    }
}

/// Keeps this thread, and the threads it starts from here on, on `cpu`.
fn pin(cpu: Option<usize>) -> Result<(), Error> {
    let Some(cpu) = cpu else {
        return Ok(());
    };
    let mut set = CpuSet::new();
    set.set(cpu)
        .and_then(|()| sched_setaffinity(Pid::from_raw(0), &set))
        .map_err(|source| Error::Pin { cpu, source })
}

fn emit(out: &mut impl Write, line: &impl Serialize) -> Result<(), Error> {
    let line = serde_json::to_string(line).expect("reports serialize to JSON");
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(Error::Output)
}

/// Longest accepted duration; far beyond any benchmark, and far from `Instant` overflow.
const MAX_SECS: f64 = 7.0 * 86_400.0;

/// Seconds in `(0, MAX_SECS]`; fractions allowed so tests can run for 0.3 s.
fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|e| format!("bad number of seconds {s:?}: {e}"))?;
    if secs > 0.0 && secs <= MAX_SECS {
        Ok(Duration::from_secs_f64(secs))
    } else {
        Err(format!("{s} is not a number of seconds in (0, {MAX_SECS}]"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<LoadgenArgs, clap::Error> {
        LoadgenArgs::try_parse_from(std::iter::once("loadgen").chain(args.iter().copied()))
    }

    #[test]
    fn server_defaults() {
        let LoadgenCommand::Server(server) =
            parse(&["server", "--listen", "[::]:5001"]).unwrap().command
        else {
            panic!("not a server");
        };
        assert_eq!(server.listen, "[::]:5001".parse().unwrap());
        assert_eq!(server.mode, Mode::Stream);
        assert_eq!(server.duration, Duration::from_secs(30));
        assert_eq!(server.max_conns, None);
        assert!(!server.no_nodelay);
        assert_eq!(server.timeline_buckets, None);
    }

    #[test]
    fn timelines_are_bounded_and_for_streams_only() {
        let LoadgenCommand::Server(server) = parse(&[
            "server",
            "--listen",
            "[::]:5001",
            "--timeline-buckets",
            "2000",
        ])
        .unwrap()
        .command
        else {
            panic!("not a server");
        };
        assert_eq!(server.timeline_buckets, Some(2000));
        for n in ["0", "100001"] {
            assert!(
                parse(&["server", "--listen", "[::]:1", "--timeline-buckets", n]).is_err(),
                "{n} accepted"
            );
        }
        let args = parse(&[
            "server",
            "--listen",
            "127.0.0.1:0",
            "--mode",
            "connect",
            "--timeline-buckets",
            "10",
        ])
        .unwrap();
        let err = run_with_output(args, &mut Vec::new()).unwrap_err();
        assert!(matches!(err, Error::Usage(_)), "{err}");
    }

    #[test]
    fn client_flags() {
        let LoadgenCommand::Client(client) = parse(&[
            "client",
            "--connect",
            "10.77.1.2:5001",
            "--mode",
            "stream",
            "--random-sizes",
            "1:1048576",
            "--duration",
            "0.3",
            "--conns",
            "4",
            "--seed",
            "9",
            "--no-nodelay",
        ])
        .unwrap()
        .command
        else {
            panic!("not a client");
        };
        assert_eq!(client.mode, Mode::Stream);
        assert_eq!(
            client.random_sizes,
            Some(SizeRange {
                min: 1,
                max: 1 << 20
            })
        );
        assert_eq!(client.duration, Duration::from_millis(300));
        assert_eq!((client.conns, client.seed), (4, 9));
        assert!(client.no_nodelay);
        assert_eq!(client.max_connects, 200_000);
        assert_eq!(client.connect_retry, Duration::from_secs(5));
    }

    #[test]
    fn bad_arguments_are_rejected() {
        for args in [
            &["server", "--listen", "0.0.0.0:1", "--mode", "rr"][..],
            &["server", "--listen", "localhost:1"],
            &["server", "--listen", "0.0.0.0:1", "--duration", "0"],
            &["server", "--listen", "0.0.0.0:1", "--duration", "-1"],
            &["server", "--listen", "0.0.0.0:1", "--duration", "inf"],
            &["server", "--listen", "0.0.0.0:1", "--duration", "NaN"],
            &["server", "--listen", "0.0.0.0:1", "--duration", "1e19"],
            &["server", "--listen", "0.0.0.0:1", "--max-conns", "0"],
            &["client", "--connect", "127.0.0.1:1", "--mode", "udp"],
            &[
                "client",
                "--connect",
                "127.0.0.1:1",
                "--mode",
                "rr",
                "--msg-size",
                "0",
            ],
            &[
                "client",
                "--connect",
                "127.0.0.1:1",
                "--mode",
                "rr",
                "--conns",
                "0",
            ],
            &[
                "client",
                "--connect",
                "127.0.0.1:1",
                "--mode",
                "stream",
                "--msg-size",
                "5",
                "--random-sizes",
                "1:5",
            ],
        ] {
            assert!(parse(args).is_err(), "{args:?} accepted");
        }
    }

    #[test]
    fn a_cpu_the_process_cannot_have_is_refused_before_anything_starts() {
        let cpu = CpuSet::count().to_string();
        for args in [
            &["server", "--listen", "127.0.0.1:0", "--cpu", &cpu][..],
            &[
                "client",
                "--connect",
                "127.0.0.1:9",
                "--mode",
                "connect",
                "--cpu",
                &cpu,
            ],
        ] {
            let mut out = Vec::new();
            let err = run_with_output(parse(args).unwrap(), &mut out).unwrap_err();
            assert!(matches!(err, Error::Pin { .. }), "{args:?}: {err}");
            assert!(err.to_string().contains(&format!("CPU {cpu}")), "{err}");
            assert!(out.is_empty(), "nothing was reported");
        }
    }

    #[test]
    fn missing_sizes_are_usage_errors_before_any_connect() {
        for (mode, extra) in [
            ("stream", &[][..]),
            ("rr", &[][..]),
            ("rr", &["--random-sizes", "1:2"][..]),
        ] {
            let mut args = vec!["client", "--connect", "127.0.0.1:9", "--mode", mode];
            args.extend_from_slice(extra);
            let err = run_with_output(parse(&args).unwrap(), &mut Vec::new()).unwrap_err();
            assert!(matches!(err, Error::Usage(_)), "{mode} {extra:?}: {err}");
        }
    }

    #[test]
    fn embeds_as_a_hidden_subcommand() {
        #[derive(Debug, Parser)]
        struct Quicklane {
            #[command(subcommand)]
            command: Command,
        }
        #[derive(Debug, Subcommand)]
        enum Command {
            #[command(hide = true)]
            Loadgen(LoadgenArgs),
        }
        let Command::Loadgen(args) = Quicklane::try_parse_from([
            "quicklane",
            "loadgen",
            "server",
            "--listen",
            "127.0.0.1:0",
        ])
        .unwrap()
        .command;
        assert!(matches!(args.command, LoadgenCommand::Server(_)));
    }
}
