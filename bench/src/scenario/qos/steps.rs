//! The qos scenario's measurements: one function per step, each adding its samples.

use std::ffi::OsStr;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use simnode::{Pod, Proc};

use super::timeline::{self, Flow};
use super::{arms, Bench, Step, LO_LEAD_SECS, LO_TAIL_SECS, MBIT, STREAMS};
use crate::cpu::{self, CpuMeter};
use crate::error::Error;
use crate::interrupt;
use crate::load::{self, timeline::ReceiveTimeline, Report};
use crate::results::{Mode, Timeline};
use crate::testbed::{Listen, Place};
use crate::tools::{iperf3, sockperf};

/// Rate accuracy (tcp, udp) in the sink.
const RATE_PORT: u16 = 5201;
/// `lo`'s saturating iperf3 in the priority step, and its receiver's reporting interval.
const LO_PORT: u16 = 5202;
const LO_INTERVAL_SECS: f64 = 0.1;
const SOCKPERF_PORT: u16 = 11111;
/// The preemption step's load generator server (one per measurement).
const STREAM_PORT: u16 = 5003;
/// sockperf's request size: a small RPC.
const PING_SIZE: u64 = 64;
/// The load generator's write size for the bulk streams.
const STREAM_MSG: &str = "65536";
/// UDP datagram payload: one Ethernet frame with room for the headers.
const UDP_LEN: u32 = 1400;
/// Payload of a full TCP segment with timestamps on a 1500 B MTU, for retransmits / segments.
const SEGMENT_BYTES: u64 = 1448;
/// `hi` has its share once it receives this fraction of it over a window; `lo` has yielded
/// once it is within this tolerance above its guarantee.
const SHARE_FRACTION: f64 = 0.95;
const YIELD_TOLERANCE: f64 = 0.10;
const POLL: Duration = Duration::from_millis(10);

/// Sleeps `secs`, returning early with `Interrupted` on Ctrl-C.
fn pause(secs: f64) -> Result<(), Error> {
    let until = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < until {
        interrupt::check()?;
        std::thread::sleep(POLL.min(until.saturating_duration_since(Instant::now())));
    }
    Ok(())
}

fn bad(what: &str, problem: String) -> Error {
    Error::BadSample {
        what: what.to_owned(),
        problem,
    }
}

impl<'a> Bench<'a> {
    /// hi, lo and sink; borrowed from the node, not from `self`, so steps can record.
    fn pods(&self) -> (&'a Pod, &'a Pod, &'a Pod) {
        let node = self.node;
        (node.pod(0), node.pod(1), node.pod(2))
    }

    fn sink_v4(&self) -> IpAddr {
        IpAddr::V4(self.node.pod(2).ipv4())
    }

    fn timeout(&self, step: Step) -> Duration {
        Duration::from_secs_f64(self.plan.step_secs(step) * 3.0 + 15.0)
    }

    /// The servers that live for the whole run, all in the sink.
    pub(super) fn start_servers(&mut self) -> Result<Vec<Proc>, Error> {
        let sink = Place::Pod(self.node.pod(2));
        let iperf3 = |port: u16| vec!["-s".into(), "-p".into(), port.to_string()];
        Ok(vec![
            self.rec.server(
                sink,
                OsStr::new("iperf3"),
                &iperf3(RATE_PORT),
                Listen::Port(RATE_PORT),
                "iperf3-rate-server",
            )?,
            // -J and -i: its receive intervals go back to the client as JSON.
            self.rec.server(
                sink,
                OsStr::new("iperf3"),
                &[
                    "-s".into(),
                    "-J".into(),
                    "-i".into(),
                    format!("{LO_INTERVAL_SECS}"),
                    "-p".into(),
                    LO_PORT.to_string(),
                ],
                Listen::Port(LO_PORT),
                "iperf3-lo-server",
            )?,
            self.rec.server(
                sink,
                OsStr::new("sockperf"),
                &sockperf::server_args(SOCKPERF_PORT),
                Listen::Port(SOCKPERF_PORT),
                "sockperf-server",
            )?,
        ])
    }

    /// One short stream from each sender, so ARP and the first connection's costs are paid
    /// outside the measurements.
    pub(super) fn warm_up(&mut self) -> Result<(), Error> {
        let (hi, lo, _) = self.pods();
        let (hi, lo) = (Place::Pod(hi), Place::Pod(lo));
        let server = self.stream_server(None, Mode::Baseline, 2, 0.5)?;
        for from in [hi, lo] {
            self.stream_client(from, 0.1, None, Mode::Baseline)?;
        }
        server.wait(Duration::from_secs(20))?;
        Ok(())
    }

    pub(super) fn step(&mut self, step: Step, arm: Mode, rep: usize) -> Result<(), Error> {
        match step {
            Step::Tcp(limit) => self.tcp(limit, 1, arm, rep),
            Step::Streams(limit) => self.tcp(limit, STREAMS, arm, rep),
            Step::Udp(limit) => self.udp(limit, arm, rep),
            Step::Idle => self.ping(None, arm, rep),
            Step::Saturated => self.saturated(arm, rep),
            Step::Preemption => self.preemption(arm, rep),
        }
    }

    fn add(&mut self, metric: &str, arm: Mode, unit: &'static str, rep: usize, value: f64) {
        self.collected.add(metric, arm, unit, rep, value);
    }

    /// `streams` TCP streams of `hi` into its limit: `tcp_*` figures for one, `tcp<n>_*` for
    /// several (CPU for one only).
    fn tcp(&mut self, limit: u64, streams: u32, arm: Mode, rep: usize) -> Result<(), Error> {
        let l = arms::quantity(limit);
        let meter = CpuMeter::new([self.node.cgroup_dir()]);
        let cpu_before = meter.seconds()?;
        let mut args = iperf3::tcp_args(self.sink_v4(), RATE_PORT, self.plan.iperf3_secs, "cubic");
        let (step, tcp) = if streams == 1 {
            (Step::Tcp(limit), "tcp".to_owned())
        } else {
            args.extend(["-P".into(), streams.to_string()]);
            (Step::Streams(limit), format!("tcp{streams}"))
        };
        let timeout = self.timeout(step);
        let out = self.rec.run(
            Place::Pod(self.node.pod(0)),
            OsStr::new("iperf3"),
            &args,
            timeout,
            (Some(rep), arm),
        )?;
        let cpu_s = meter.seconds()? - cpu_before;
        self.hi_sent = Some(Instant::now());
        let run = iperf3::parse(&out)?;
        let segments = (run.sent_bytes / SEGMENT_BYTES).max(1);
        self.add(
            &format!("rate-accuracy.{tcp}_rate.{l}"),
            arm,
            "Mbit/s",
            rep,
            run.gbit_per_s * 1000.0,
        );
        self.add(
            &format!("rate-accuracy.{tcp}_retrans.{l}"),
            arm,
            "% of segments",
            rep,
            run.retransmits as f64 * 100.0 / segments as f64,
        );
        if streams != 1 {
            return Ok(());
        }
        let what = format!("iperf3 tcp into limit {l}");
        let cpu = cpu::per_gbit(cpu_s, run.received_bytes as f64)
            .ok_or_else(|| bad(&what, format!("no CPU time measured ({cpu_s} s)")))?;
        self.add(
            &format!("cpu.tcp_per_gbit.{l}"),
            arm,
            "CPU-s/Gbit",
            rep,
            cpu,
        );
        Ok(())
    }

    fn udp(&mut self, limit: u64, arm: Mode, rep: usize) -> Result<(), Error> {
        let l = arms::quantity(limit);
        let args = iperf3::udp_args(
            self.sink_v4(),
            RATE_PORT,
            self.plan.iperf3_secs,
            2 * limit,
            UDP_LEN,
        );
        let timeout = self.timeout(Step::Udp(limit));
        let out = self.rec.run(
            Place::Pod(self.node.pod(0)),
            OsStr::new("iperf3"),
            &args,
            timeout,
            (Some(rep), arm),
        )?;
        self.hi_sent = Some(Instant::now());
        let run = iperf3::parse(&out)?;
        let offered = run.sent_gbit_per_s * 1e9;
        if offered < 1.2 * limit as f64 {
            self.extras.notes.push(format!(
                "repetition {}, {}: iperf3 offered only {:.0} Mbit/s of UDP against the {l} \
                 limit, so the limit was barely tested",
                rep + 1,
                arm.name(),
                offered / MBIT
            ));
        }
        self.add(
            &format!("rate-accuracy.udp_rate.{l}"),
            arm,
            "Mbit/s",
            rep,
            run.gbit_per_s * 1000.0,
        );
        self.add(
            &format!("rate-accuracy.udp_offered.{l}"),
            arm,
            "Mbit/s",
            rep,
            offered / MBIT,
        );
        Ok(())
    }

    /// `hi`'s sockperf round trips to the sink; `state` names the condition (`None`: idle).
    fn ping(&mut self, state: Option<&str>, arm: Mode, rep: usize) -> Result<(), Error> {
        let state = state.unwrap_or("idle");
        let args = sockperf::ping_pong_args(
            self.sink_v4(),
            SOCKPERF_PORT,
            PING_SIZE,
            self.plan.sockperf_secs,
        );
        let timeout = self.timeout(Step::Idle);
        let out = self.rec.run(
            Place::Pod(self.node.pod(0)),
            OsStr::new("sockperf"),
            &args,
            timeout,
            (Some(rep), arm),
        )?;
        self.hi_sent = Some(Instant::now());
        let run = sockperf::parse(&out)?;
        for p in [50.0, 99.0] {
            let us = run
                .percentile(p)
                .ok_or_else(|| bad("sockperf ping-pong", format!("no {p} percentile")))?;
            self.add(
                &format!("priority.hi_rtt_p{p:.0}.{state}"),
                arm,
                "us",
                rep,
                us,
            );
        }
        Ok(())
    }

    /// `hi`'s round trips while `lo` saturates the sink with iperf3 for the whole of them;
    /// `lo`'s rate over the receiver intervals within sockperf's traffic (after its start-up
    /// sleep), so the figure is what `lo` got while `hi` was pinging.
    fn saturated(&mut self, arm: Mode, rep: usize) -> Result<(), Error> {
        let lo_secs = f64::from(self.plan.sockperf_secs)
            + sockperf::OVERHEAD_SECS
            + LO_LEAD_SECS
            + LO_TAIL_SECS;
        let args = iperf3::tcp_args_with_receiver_intervals(
            self.sink_v4(),
            LO_PORT,
            lo_secs.ceil() as u32,
            "cubic",
            LO_INTERVAL_SECS,
        );
        let lo_started = Instant::now();
        let lo = self.rec.start(
            Place::Pod(self.node.pod(1)),
            OsStr::new("iperf3"),
            &args,
            (Some(rep), arm),
        )?;
        pause(LO_LEAD_SECS)?;
        let ping_from = lo_started.elapsed().as_secs_f64() + sockperf::START_SLEEP_SECS;
        self.ping(Some("saturated"), arm, rep)?;
        let ping_to = lo_started.elapsed().as_secs_f64();
        let out = lo.wait(self.timeout(Step::Saturated))?;
        let inside: Vec<f64> = iperf3::receiver_intervals(&out)?
            .iter()
            .filter(|i| i.start >= ping_from && i.end <= ping_to)
            .map(|i| i.bits_per_second)
            .collect();
        if inside.is_empty() {
            return Err(bad(
                "lo's iperf3 while hi pinged",
                format!("no receiver interval within {ping_from:.2}..{ping_to:.2} s"),
            ));
        }
        self.add(
            "priority.lo_rate.saturated",
            arm,
            "Mbit/s",
            rep,
            inside.iter().sum::<f64>() / inside.len() as f64 / MBIT,
        );
        Ok(())
    }

    /// A load generator stream server in the sink recording receive timelines for `conns`
    /// connections that stream for up to `secs`.
    fn stream_server(
        &mut self,
        rep: Option<usize>,
        arm: Mode,
        conns: u32,
        secs: f64,
    ) -> Result<crate::testbed::Running, Error> {
        // Room for process starts and the slower connection's drain.
        let buckets = ((secs + 2.0) * 1000.0).min(load::timeline::MAX_BUCKETS as f64) as u64;
        let args: Vec<String> = [
            "loadgen",
            "server",
            "--listen",
            &format!("[::]:{STREAM_PORT}"),
            "--mode",
            "stream",
            "--max-conns",
            &conns.to_string(),
            "--duration",
            &format!("{:.1}", secs + 30.0),
            "--timeline-buckets",
            &buckets.to_string(),
        ]
        .into_iter()
        .map(String::from)
        .collect();
        let exe = self.ctx.exe.clone();
        self.rec.measured_server(
            Place::Pod(self.node.pod(2)),
            exe.as_os_str(),
            &args,
            Listen::Port(STREAM_PORT),
            (rep, arm),
        )
    }

    fn stream_args(&self, secs: f64) -> Vec<String> {
        [
            "loadgen",
            "client",
            "--mode",
            "stream",
            "--msg-size",
            STREAM_MSG,
            "--connect",
            &format!("{}:{STREAM_PORT}", self.node.pod(2).ipv4()),
            "--duration",
            &format!("{secs}"),
        ]
        .into_iter()
        .map(String::from)
        .collect()
    }

    /// Runs a stream client to completion.
    fn stream_client(
        &mut self,
        from: Place<'_>,
        secs: f64,
        rep: Option<usize>,
        arm: Mode,
    ) -> Result<String, Error> {
        let args = self.stream_args(secs);
        let exe = self.ctx.exe.clone();
        let timeout = Duration::from_secs_f64(secs * 3.0 + 15.0);
        self.rec
            .run(from, exe.as_os_str(), &args, timeout, (rep, arm))
    }

    /// `lo` streams alone (for a phase, and until `hi` has been idle for `HI_IDLE_SECS`), then
    /// `hi` streams for a phase; the sink's timelines give the preemption times and both
    /// flows' rates.
    fn preemption(&mut self, arm: Mode, rep: usize) -> Result<(), Error> {
        let phase = self.plan.phase_secs;
        let (hi, lo, _) = self.pods();
        let (hi_addr, lo_addr) = (IpAddr::V4(hi.ipv4()), IpAddr::V4(lo.ipv4()));
        let (hi, lo) = (Place::Pod(hi), Place::Pod(lo));
        let idle = self.hi_sent.map(|t| t.elapsed().as_secs_f64());
        let alone = self.plan.lo_alone_secs(Some(idle.unwrap_or(f64::INFINITY)));
        let server = self.stream_server(Some(rep), arm, 2, alone + phase)?;
        // lo outlasts hi by a little, so the contended span is contended to its end.
        let lo_args = self.stream_args(alone + phase + 0.3);
        let exe = self.ctx.exe.clone();
        let lo_run = self
            .rec
            .start(lo, exe.as_os_str(), &lo_args, (Some(rep), arm))?;
        pause(alone)?;
        if let Some(sent) = self.hi_sent {
            self.add(
                "preemption.hi_idle",
                arm,
                "s",
                rep,
                sent.elapsed().as_secs_f64(),
            );
        }
        self.stream_client(hi, phase, Some(rep), arm)?;
        self.hi_sent = Some(Instant::now());
        let timeout = self.timeout(Step::Preemption);
        lo_run.wait(timeout)?;
        let out = server.wait(timeout)?;
        let what = "the preemption step's stream server";
        let Report::Server(report) = load::parse_report(out.lines().last().unwrap_or_default())
            .map_err(|e| bad(what, e.to_string()))?
        else {
            return Err(bad(what, "not a server report".into()));
        };
        let series = |addr: IpAddr| -> Result<ReceiveTimeline, Error> {
            report
                .connections
                .iter()
                .find(|c| c.peer.tcp().is_some_and(|peer| same_host(peer, addr)))
                .and_then(|c| c.timeline.clone())
                .ok_or_else(|| bad(what, format!("no timeline for the stream from {addr}")))
        };
        let (hi_t, lo_t) = (series(hi_addr)?, series(lo_addr)?);
        self.judge_preemption(&hi_t, &lo_t, arm, rep);
        Ok(())
    }

    fn judge_preemption(
        &mut self,
        hi_t: &ReceiveTimeline,
        lo_t: &ReceiveTimeline,
        arm: Mode,
        rep: usize,
    ) {
        let hi = Flow {
            first_ms: hi_t.first_ms,
            bytes: &hi_t.bytes,
        };
        let lo = Flow {
            first_ms: lo_t.first_ms,
            bytes: &lo_t.bytes,
        };
        let (t0, end) = (hi.first_ms, hi.end_ms());
        let share = (self.plan.capacity_bps - self.plan.guarantee_bps) as f64;
        let guarantee = self.plan.guarantee_bps as f64;
        let span = end.saturating_sub(t0);
        // Never reached within hi's stream: its length is a lower bound, and said so.
        let mut bounded = |found: Option<u64>, who: &str| -> f64 {
            found.map_or_else(
                || {
                    self.extras.notes.push(format!(
                        "repetition {}, {}: {who} within the {span} ms hi streamed; its \
                         preemption time is recorded as {span} ms, a lower bound",
                        rep + 1,
                        arm.name()
                    ));
                    span as f64
                },
                |ms| ms as f64,
            )
        };
        let hi_time = bounded(
            timeline::hi_preemption_ms(&hi, share, SHARE_FRACTION),
            "hi never reached 95 % of its share",
        );
        let lo_time = bounded(
            timeline::lo_yield_ms(&lo, t0, end, guarantee, YIELD_TOLERANCE),
            "lo never came within 10 % of its guarantee",
        );
        // Steady state: the second half of hi's stream, short of its closing window.
        let (from, to) = (t0 + span / 2, end.saturating_sub(timeline::WINDOW_MS));
        let alone_from = lo.first_ms + t0.saturating_sub(lo.first_ms) / 2;
        let samples = [
            ("preemption.hi_time", "ms", hi_time),
            ("preemption.lo_time", "ms", lo_time),
            (
                "preemption.hi_rate.contended",
                "Mbit/s",
                hi.mean_bps(from, to) / MBIT,
            ),
            (
                "preemption.lo_rate.contended",
                "Mbit/s",
                lo.mean_bps(from, to) / MBIT,
            ),
            (
                "preemption.lo_rate.alone",
                "Mbit/s",
                lo.mean_bps(alone_from, t0) / MBIT,
            ),
        ];
        for (metric, unit, value) in samples {
            self.add(metric, arm, unit, rep, value);
        }
        for (name, t) in [("preemption.hi", hi_t), ("preemption.lo", lo_t)] {
            self.extras.timelines.push(Timeline {
                name: name.into(),
                mode: arm,
                rep,
                bucket_ms: t.bucket_ms as f64,
                start_ms: t.first_ms as f64 - t0 as f64,
                bytes: t.bytes.clone(),
            });
        }
    }
}

/// Whether `peer` (as a `[::]` listener sees it, possibly v4-mapped) is `addr`.
fn same_host(peer: SocketAddr, addr: IpAddr) -> bool {
    peer.ip().to_canonical() == addr
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapped_peers_match_their_v4_address() {
        let mapped: SocketAddr = "[::ffff:10.77.0.2]:40000".parse().unwrap();
        assert!(same_host(mapped, "10.77.0.2".parse().unwrap()));
        assert!(!same_host(mapped, "10.77.1.2".parse().unwrap()));
        let plain: SocketAddr = "10.77.1.2:40000".parse().unwrap();
        assert!(same_host(plain, "10.77.1.2".parse().unwrap()));
    }
}
