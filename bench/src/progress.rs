//! Progress on stderr: what runs, which repetition, and an estimate of the time left that
//! corrects the plan's estimate by the pace measured so far.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::results::Mode;

#[derive(Debug)]
pub struct Progress {
    started: Instant,
    /// Planned seconds of all steps, and of the steps finished so far.
    planned: f64,
    planned_done: f64,
    steps: usize,
    step: usize,
}

impl Progress {
    pub fn new(planned_secs: f64, steps: usize) -> Self {
        Self {
            started: Instant::now(),
            planned: planned_secs,
            planned_done: 0.0,
            steps,
            step: 0,
        }
    }

    /// Announces the next step.
    pub fn begin(&mut self, rep: usize, reps: usize, mode: Mode, what: &str) {
        self.step += 1;
        let line = format!(
            "[{:>3}/{}] rep {}/{} {:<11} {what:<44} ~{} left",
            self.step,
            self.steps,
            rep + 1,
            reps,
            mode.name(),
            clock(self.left())
        );
        let mut err = std::io::stderr().lock();
        // Progress is best effort: a closed stderr must not stop the measurement.
        let _ = writeln!(err, "{line}");
    }

    /// Marks the current step done; `planned_secs` is what the plan expected it to take.
    pub fn end(&mut self, planned_secs: f64) {
        self.planned_done += planned_secs;
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    fn left(&self) -> Duration {
        let remaining = (self.planned - self.planned_done).max(0.0);
        let pace = if self.planned_done > 0.0 {
            self.started.elapsed().as_secs_f64() / self.planned_done
        } else {
            1.0
        };
        Duration::from_secs_f64(remaining * pace)
    }
}

/// `1m05s`, `42s`.
pub fn clock(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 60 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_format() {
        assert_eq!(clock(Duration::from_secs(42)), "42s");
        assert_eq!(clock(Duration::from_secs(65)), "1m05s");
    }

    #[test]
    fn time_left_follows_the_plan_before_any_step() {
        let mut p = Progress::new(100.0, 10);
        assert_eq!(p.left().as_secs(), 100);
        p.end(100.0);
        assert_eq!(p.left(), Duration::ZERO);
    }
}
