//! Where a request's time goes inside Envoy: the wall time of each stage of a stream, measured
//! with the host's clock at marks in the callbacks, logged as means every
//! [`REQUESTS_PER_LINE`] streams of a worker. Only in builds with the `stage-timing` feature
//! (`make bench-stages`); the shipped module's marks compile to nothing.
//!
//! `perf` sees Envoy's JIT code only as addresses and node's V8 prices host calls differently,
//! so this is the one view of the filter's time inside the host that runs it. The no-op filter of
//! the benchmark includes this file too, so both are measured at the same callback boundaries.
//! Each mark is a host call (a clock read, about 0.2 µs in Envoy 1.40), counted in the stage it
//! ends; compare stages between builds or filters, not with uninstrumented totals.

/// The stages of one stream, in the order their marks end them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// From the previous stream's done callback to this stream's context: the filter dropping
    /// the previous context, then Envoy reading and decoding the next request (and any idle time,
    /// which a saturated worker does not have).
    BetweenStreams,
    /// The filter creating its per-stream context.
    Create,
    /// Envoy, from the context's creation to the request headers callback.
    CreateToRequest,
    /// The request headers read from the host.
    HeaderRead,
    /// The headers parsed into the request's facts.
    Parse,
    /// The engine deciding (clock read and per-worker caches included).
    Engine,
    /// The rest of the request headers callback: executing the decision (header writes).
    Act,
    /// Envoy, from the request headers callback to the response headers callback (routing and,
    /// in the benchmark, the `direct_response`).
    RequestToResponse,
    /// The response headers callback.
    Response,
    /// Envoy, from the response headers callback to the stream's end (encoding, access log).
    ResponseToLog,
    /// Envoy, from the log callback to the done callback.
    LogToDone,
    /// The done callback.
    Done,
}

/// Streams whose means make one log line.
pub const REQUESTS_PER_LINE: u64 = 20_000;

/// What one log line starts with (the benchmark looks for it in Envoy's log).
pub const LINE_PREFIX: &str = "stage timing";

/// Every stage, in stream order.
pub const STAGES: [Stage; 12] = [
    Stage::BetweenStreams,
    Stage::Create,
    Stage::CreateToRequest,
    Stage::HeaderRead,
    Stage::Parse,
    Stage::Engine,
    Stage::Act,
    Stage::RequestToResponse,
    Stage::Response,
    Stage::ResponseToLog,
    Stage::LogToDone,
    Stage::Done,
];

impl Stage {
    /// The name in log lines and benchmark reports (no spaces: lines are `name=ns` words).
    pub fn name(self) -> &'static str {
        match self {
            Stage::BetweenStreams => "envoy:between-streams",
            Stage::Create => "create",
            Stage::CreateToRequest => "envoy:create>request",
            Stage::HeaderRead => "header_read",
            Stage::Parse => "parse",
            Stage::Engine => "engine",
            Stage::Act => "act",
            Stage::RequestToResponse => "envoy:request>response",
            Stage::Response => "response",
            Stage::ResponseToLog => "envoy:response>log",
            Stage::LogToDone => "envoy:log>done",
            Stage::Done => "done",
        }
    }

    fn index(self) -> usize {
        STAGES.iter().position(|s| *s == self).unwrap_or(0)
    }
}

/// Sums per stage over one worker's streams.
#[derive(Default)]
pub struct StageClock {
    last_ns: u64,
    /// When the last stream's done callback ended (0: none yet, or the sums just started over).
    ended_ns: u64,
    sums: [(u64, u64); STAGES.len()],
    /// The longest single occurrence of each stage since the last line.
    maxima: [u64; STAGES.len()],
}

impl StageClock {
    /// Starts timing a stream at `now_ns` (its first mark), ending [`Stage::BetweenStreams`] when
    /// a stream ended before.
    pub fn start(&mut self, now_ns: u64) {
        if self.ended_ns > 0 {
            self.add(Stage::BetweenStreams, now_ns.saturating_sub(self.ended_ns));
        }
        self.last_ns = now_ns;
    }

    /// Ends `stage` at `now_ns`. After [`Stage::Done`] of every [`REQUESTS_PER_LINE`]-th stream,
    /// returns the line to log and starts over.
    pub fn end(&mut self, stage: Stage, now_ns: u64) -> Option<String> {
        self.add(stage, now_ns.saturating_sub(self.last_ns));
        self.last_ns = now_ns;
        if stage != Stage::Done {
            return None;
        }
        self.ended_ns = now_ns;
        let streams = self.sums[stage.index()].0;
        if streams < REQUESTS_PER_LINE {
            return None;
        }
        // Per stream, whether or not every stream passed every mark (a host this policy does not
        // list skips the engine's): the stages of a line add up to the streams' time.
        let mut line = format!("{LINE_PREFIX} (ns per stream, mean of {streams}):");
        for (s, (n, sum)) in STAGES.iter().zip(self.sums) {
            if n > 0 {
                line.push_str(&format!(" {}={}", s.name(), sum / streams));
            }
        }
        // The longest occurrences show what a tail latency is made of.
        for (s, max) in STAGES.iter().zip(self.maxima) {
            if max > 0 {
                line.push_str(&format!(" max:{}={max}", s.name()));
            }
        }
        self.sums = Default::default();
        self.maxima = Default::default();
        // The log call would count as time between streams.
        self.ended_ns = 0;
        Some(line)
    }
}

impl StageClock {
    fn add(&mut self, stage: Stage, ns: u64) {
        let i = stage.index();
        self.sums[i].0 += 1;
        self.sums[i].1 += ns;
        self.maxima[i] = self.maxima[i].max(ns);
    }
}

#[cfg(feature = "stage-timing")]
mod host {
    use super::{Stage, StageClock};
    use std::cell::RefCell;

    thread_local! {
        static CLOCK: RefCell<StageClock> = RefCell::new(StageClock::default());
    }

    fn now_ns() -> u64 {
        proxy_wasm::hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }

    pub fn start() {
        let now = now_ns();
        CLOCK.with(|c| c.borrow_mut().start(now));
    }

    pub fn end(stage: Stage) {
        let now = now_ns();
        if let Some(line) = CLOCK.with(|c| c.borrow_mut().end(stage, now)) {
            log::warn!("{line}");
            // The log call is not part of the next stage.
            let now = now_ns();
            CLOCK.with(|c| c.borrow_mut().start(now));
        }
    }
}

/// Says, once per VM at configuration, that this build times its stages: the benchmark's smoke
/// test looks for [`LINE_PREFIX`] to prove the shipped module does not.
#[inline(always)]
pub fn announce() {
    #[cfg(feature = "stage-timing")]
    log::warn!("{LINE_PREFIX}: on, one line per {REQUESTS_PER_LINE} streams of each worker");
}

/// Starts a stream's timing (its context being created).
#[inline(always)]
pub fn start() {
    #[cfg(feature = "stage-timing")]
    host::start();
}

/// Ends `stage` now.
#[inline(always)]
pub fn end(stage: Stage) {
    #[cfg(feature = "stage-timing")]
    host::end(stage);
    #[cfg(not(feature = "stage-timing"))]
    let _ = stage;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_get_the_time_since_the_previous_mark_and_a_line_every_batch() {
        let mut c = StageClock::default();
        let mut line = None;
        let mut t = 1_000;
        for _ in 0..REQUESTS_PER_LINE {
            c.start(t);
            t += 100;
            assert_eq!(c.end(Stage::Create, t), None);
            t += 2_500;
            assert_eq!(c.end(Stage::HeaderRead, t), None);
            t += 40;
            line = c.end(Stage::Done, t);
        }
        let line = line.expect("a line after the batch");
        assert!(line.starts_with(LINE_PREFIX), "{line}");
        assert!(
            line.contains(": envoy:between-streams=0 create=100 header_read=2500 done=40 "),
            "{line}"
        );
        assert!(
            line.ends_with(" max:create=100 max:header_read=2500 max:done=40"),
            "{line}"
        );
        // The sums start over; the time between streams counts from a stream's end.
        c.start(t + 1_000);
        assert_eq!(c.end(Stage::Done, t + 1_007), None);
        c.start(t + 1_307);
        assert_eq!(c.sums[Stage::BetweenStreams.index()], (1, 300));
    }

    #[test]
    fn a_stage_some_streams_skip_is_averaged_over_all_streams() {
        let mut c = StageClock::default();
        let mut line = None;
        for i in 0..REQUESTS_PER_LINE {
            let t = i * 10_000;
            c.start(t);
            if i % 2 == 0 {
                assert_eq!(c.end(Stage::Engine, t + 1_000), None);
            }
            line = c.end(Stage::Done, t + 2_000);
        }
        let line = line.expect("a line after the batch");
        assert!(line.contains(" engine=500 "), "{line}");
        assert!(line.contains(" done=1500 "), "{line}");
        assert!(line.contains(" max:engine=1000 "), "{line}");
    }

    #[test]
    fn names_are_distinct() {
        let names: std::collections::HashSet<_> = STAGES.iter().map(|s| s.name()).collect();
        assert_eq!(names.len(), STAGES.len());
    }
}
