//! The one child-process harness of the end-to-end tests (`tests/`) and of
//! the storm and VM harnesses (`storm`, `vms`).
//!
//! A [`Proc`] leads its own process group, is registered with [`cleanup`]
//! (so Ctrl-C in a harness that installed the handler kills it) and is killed
//! by that group, by PID, on drop. Every stdout and stderr line is kept, up to
//! [`MAX_KEPT_BYTES`]; past that the oldest lines are dropped and counted, and
//! every failure message says how many. Waiting is on a condition variable
//! woken by each new line, never by polling.
//!
//! ```no_run
//! use std::process::Command;
//! use std::time::Duration;
//! use simulations::proc::Proc;
//!
//! let mut c = Command::new("sh");
//! c.args(["-c", "echo one; echo two"]);
//! let p = Proc::spawn("sh", c)?;
//! p.wait_for(Duration::from_secs(5), |l| l == "one");
//! // `wait_for` continues after the line it returned: "one" is behind it now.
//! p.wait_for(Duration::from_secs(5), |l| l == "two");
//! # Ok::<(), anyhow::Error>(())
//! ```

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::cleanup;

/// Output kept per process before the oldest lines are dropped: far above
/// what any test or storm node prints, low enough that a runaway child cannot
/// take the machine's memory.
pub const MAX_KEPT_BYTES: usize = 64 << 20;

/// Bookkeeping cost charged per line on top of its text, so a flood of empty
/// lines is bounded too.
const LINE_OVERHEAD: usize = 48;

/// One line of output (stdout or stderr, without the line ending).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// When it was read, since the process was started.
    pub at: Duration,
    /// The text.
    pub text: String,
}

impl std::ops::Deref for Line {
    type Target = str;
    fn deref(&self) -> &str {
        &self.text
    }
}

impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// A wake-up shared by several processes, for a harness that waits for the
/// next line of any of them (a storm's nodes). It rings on every line and
/// when an output stream closes.
#[derive(Debug, Clone, Default)]
pub struct Bell(Arc<(Mutex<u64>, Condvar)>);

impl Bell {
    /// How many times it has rung; pass this to [`Bell::wait`] before
    /// scanning, so a ring during the scan is not missed.
    pub fn rung(&self) -> u64 {
        self.0.0.lock().map(|n| *n).unwrap_or(0)
    }

    /// Waits until it rings after `since` (see [`Bell::rung`]) or `timeout` passes.
    pub fn wait(&self, since: u64, timeout: Duration) {
        let (m, cv) = &*self.0;
        let Ok(n) = m.lock() else { return };
        let _ = cv.wait_timeout_while(n, timeout, |n| *n == since);
    }

    fn ring(&self) {
        let (m, cv) = &*self.0;
        if let Ok(mut n) = m.lock() {
            *n = n.wrapping_add(1);
        }
        cv.notify_all();
    }
}

/// How to start a [`Proc`].
#[derive(Debug, Clone, Default)]
pub struct Options {
    echo: bool,
    bell: Option<Bell>,
}

impl Options {
    /// Also print every line on stderr, prefixed with the name and the time.
    pub fn with_echo(mut self, echo: bool) -> Options {
        self.echo = echo;
        self
    }

    /// Ring `bell` on every line.
    pub fn with_bell(mut self, bell: Bell) -> Options {
        self.bell = Some(bell);
        self
    }
}

#[derive(Debug, Default)]
struct Kept {
    lines: VecDeque<Line>,
    bytes: usize,
    /// Lines dropped from the front; the absolute index of `lines[0]`.
    dropped: u64,
    /// Output streams not yet at end of file.
    open: u8,
}

impl Kept {
    fn push(&mut self, line: Line) {
        self.bytes += line.text.len() + LINE_OVERHEAD;
        self.lines.push_back(line);
        while self.bytes > MAX_KEPT_BYTES {
            let Some(old) = self.lines.pop_front() else {
                break;
            };
            self.bytes -= old.text.len() + LINE_OVERHEAD;
            self.dropped += 1;
        }
    }

    /// The first line at absolute index `from` or later matching `pred`,
    /// with its absolute index.
    fn find(&self, from: u64, pred: &impl Fn(&str) -> bool) -> Option<(u64, &Line)> {
        let skip = from.saturating_sub(self.dropped);
        let skip = usize::try_from(skip).unwrap_or(usize::MAX);
        self.lines
            .iter()
            .enumerate()
            .skip(skip)
            .find(|(_, l)| pred(&l.text))
            .map(|(i, l)| (self.dropped + i as u64, l))
    }

    fn end(&self) -> u64 {
        self.dropped + self.lines.len() as u64
    }
}

#[derive(Debug)]
struct Shared {
    kept: Mutex<Kept>,
    cv: Condvar,
    bell: Option<Bell>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Kept> {
        // A pump thread cannot panic while holding the lock; if one did, the
        // lines are still worth reading.
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self) {
        self.cv.notify_all();
        if let Some(b) = &self.bell {
            b.ring();
        }
    }
}

/// A child process in its own process group whose output is kept line by
/// line. Killed (its group, by PID) on drop.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: std::process::Child,
    started: Instant,
    shared: Arc<Shared>,
    /// Absolute index of the first line [`Proc::wait_for`] has not passed.
    cursor: Mutex<u64>,
    reaped: Option<ExitStatus>,
}

fn pump(
    r: impl Read + Send + 'static,
    shared: Arc<Shared>,
    started: Instant,
    echo: Option<String>,
) {
    std::thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    // Lossy: a guest console prints the odd non-UTF-8 byte,
                    // and one must not end the stream.
                    let text = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\r', '\n'])
                        .to_owned();
                    let at = started.elapsed();
                    if let Some(name) = &echo {
                        eprintln!("[{name} {:>6.1}s] {text}", at.as_secs_f64());
                    }
                    shared.lock().push(Line { at, text });
                    shared.notify();
                }
            }
        }
        {
            let mut k = shared.lock();
            k.open = k.open.saturating_sub(1);
        }
        shared.notify();
    });
}

impl Proc {
    /// Spawns `cmd` (stdin from /dev/null) as the leader of a new process group.
    pub fn spawn(name: &str, cmd: Command) -> anyhow::Result<Proc> {
        Proc::spawn_with(name, cmd, &Options::default())
    }

    /// [`Proc::spawn`] with [`Options`].
    pub fn spawn_with(name: &str, mut cmd: Command, opts: &Options) -> anyhow::Result<Proc> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        cleanup::register_pgid(child.id() as i32);
        let shared = Arc::new(Shared {
            kept: Mutex::new(Kept {
                open: 2,
                ..Kept::default()
            }),
            cv: Condvar::new(),
            bell: opts.bell.clone(),
        });
        let echo = opts.echo.then(|| name.to_owned());
        match child.stdout.take() {
            Some(o) => pump(o, shared.clone(), started, echo.clone()),
            None => shared.lock().open -= 1,
        }
        match child.stderr.take() {
            Some(e) => pump(e, shared.clone(), started, echo),
            None => shared.lock().open -= 1,
        }
        Ok(Proc {
            name: name.to_owned(),
            child,
            started,
            shared,
            cursor: Mutex::new(0),
            reaped: None,
        })
    }

    /// The name given at spawn, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// When it was started ([`Line::at`] counts from here).
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The process id, which is also its process group id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for a line after the last one this returned
    /// (or [`Proc::wait_for`] returned) that satisfies `pred`, and moves past it.
    pub fn try_wait_for(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<Line> {
        let mut cursor = self.cursor.lock().unwrap_or_else(|p| p.into_inner());
        let hit = self.scan(*cursor, timeout, &pred)?;
        *cursor = hit.0 + 1;
        Some(hit.1)
    }

    /// [`Proc::try_wait_for`], panicking with the output on timeout.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Line {
        self.try_wait_for(timeout, pred).unwrap_or_else(|| {
            panic!(
                "{}: no expected line within {timeout:?}; output:\n{}",
                self.name,
                self.output()
            )
        })
    }

    /// [`Proc::try_wait_for`], failing with `what` and the output on timeout.
    pub fn expect(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> anyhow::Result<Line> {
        self.try_wait_for(timeout, pred).with_context(|| {
            format!(
                "{}: no line {what:?} within {timeout:?}; output:\n{}",
                self.name,
                self.output()
            )
        })
    }

    /// The first line ever printed (still kept) that satisfies `pred`, if
    /// one comes within `timeout`; like [`Proc::wait_for_first`], it leaves
    /// the cursor alone.
    pub fn try_wait_for_first(
        &self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<Line> {
        self.scan(0, timeout, &pred).map(|(_, l)| l)
    }

    /// The first line ever printed (still kept) that satisfies `pred`, waiting
    /// up to `timeout`; panics with the output on timeout. It ignores and
    /// does not move [`Proc::wait_for`]'s cursor: for a line that is printed
    /// once and may reach us out of order with the other stream's lines.
    pub fn wait_for_first(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Line {
        self.try_wait_for_first(timeout, pred).unwrap_or_else(|| {
            panic!(
                "{}: no expected line within {timeout:?}; output:\n{}",
                self.name,
                self.output()
            )
        })
    }

    fn scan(
        &self,
        from: u64,
        timeout: Duration,
        pred: &impl Fn(&str) -> bool,
    ) -> Option<(u64, Line)> {
        let deadline = Instant::now() + timeout;
        let mut k = self.shared.lock();
        let mut from = from;
        loop {
            if let Some((i, l)) = k.find(from, pred) {
                return Some((i, l.clone()));
            }
            from = from.max(k.end());
            let left = deadline.checked_duration_since(Instant::now())?;
            // Both streams closed: no line can come any more, so fail now
            // rather than at the deadline.
            if left.is_zero() || k.open == 0 {
                return None;
            }
            k = self
                .shared
                .cv
                .wait_timeout(k, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The lines after absolute index `*cursor`, moving `*cursor` past them:
    /// for a harness reading several processes in turn (see [`Bell`]).
    pub fn lines_after(&self, cursor: &mut u64) -> Vec<Line> {
        let k = self.shared.lock();
        let from = (*cursor).max(k.dropped);
        let skip = usize::try_from(from - k.dropped).unwrap_or(usize::MAX);
        let new: Vec<Line> = k.lines.iter().skip(skip).cloned().collect();
        *cursor = k.end();
        new
    }

    /// Every line kept so far.
    pub fn lines(&self) -> Vec<Line> {
        self.shared.lock().lines.iter().cloned().collect()
    }

    /// Every line kept so far, joined, headed by a note when lines were dropped.
    pub fn output(&self) -> String {
        let k = self.shared.lock();
        let mut s = String::new();
        if k.dropped > 0 {
            s.push_str(&format!(
                "[{} earliest lines dropped: more than {} MiB of output]\n",
                k.dropped,
                MAX_KEPT_BYTES >> 20
            ));
        }
        for (i, l) in k.lines.iter().enumerate() {
            if i > 0 {
                s.push('\n');
            }
            s.push_str(&l.text);
        }
        s
    }

    /// Sends `signal` to the process group.
    pub fn signal(&self, signal: libc::c_int) {
        if self.reaped.is_some() {
            return;
        }
        // SAFETY: kill(2) on the process group this child leads; it is not
        // reaped yet, so the id cannot have been reused.
        unsafe {
            libc::kill(-(self.child.id() as libc::pid_t), signal);
        }
    }

    /// Whether it has exited, and how (reaping it if so).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.reaped.is_none() {
            self.reaped = self.child.try_wait().ok().flatten();
            if self.reaped.is_some() {
                cleanup::forget_pgid(self.child.id() as i32);
            }
        }
        self.reaped
    }

    /// Waits up to `timeout` for it to exit; panics with the output if it does not.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return s;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                panic!(
                    "{}: did not exit within {timeout:?}; output:\n{}",
                    self.name,
                    self.output()
                );
            };
            let k = self.shared.lock();
            // Both pipes closing is the exit event std offers; once they have
            // closed, only the short gap until the kernel lets us reap is polled.
            let step = if k.open == 0 {
                Duration::from_millis(5)
            } else {
                left
            };
            let _ = self
                .shared
                .cv
                .wait_timeout(k, step.min(left))
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Kills the process group now and reaps the leader.
    pub fn kill(&mut self) {
        if self.reaped.is_some() {
            return;
        }
        self.signal(libc::SIGKILL);
        self.reaped = self.child.wait().ok();
        cleanup::forget_pgid(self.child.id() as i32);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Proc {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        Proc::spawn("sh", c).expect("spawn sh")
    }

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn wait_for_moves_on_and_wait_for_first_does_not() {
        let p = sh("echo a; echo b; echo a; echo e >&2");
        assert!(p.wait_for(T, |l| l == "a").at < T);
        assert_eq!(p.wait_for(T, |l| l == "b").text, "b");
        // The second "a", not the first again.
        p.wait_for(T, |l| l == "a");
        assert!(
            p.try_wait_for(Duration::from_millis(200), |l| l == "a")
                .is_none()
        );
        assert_eq!(p.wait_for_first(T, |l| l == "a").text, "a");
        // stderr is kept too; relative to stdout it may come in any order.
        assert_eq!(p.wait_for_first(T, |l| l == "e").text, "e");
    }

    #[test]
    fn keeps_far_more_than_ten_thousand_unread_lines() {
        let mut p = sh("seq 1 50000");
        assert!(p.wait_exit(T).success());
        let last = p.wait_for(T, |l| l == "50000");
        assert_eq!(last.text, "50000");
        assert_eq!(p.lines().len(), 50_000);
        let mut cur = 49_990;
        assert_eq!(p.lines_after(&mut cur).len(), 10);
        assert_eq!(cur, 50_000);
    }

    #[test]
    fn past_the_cap_the_oldest_are_dropped_and_counted() {
        let mut k = Kept::default();
        let big = "x".repeat(1 << 20);
        for i in 0..70 {
            k.push(Line {
                at: Duration::ZERO,
                text: format!("{i}{big}"),
            });
        }
        assert!(k.bytes <= MAX_KEPT_BYTES);
        assert!(k.dropped >= 6, "dropped {}", k.dropped);
        assert_eq!(k.end(), 70);
        assert!(k.lines[0].text.starts_with(&k.dropped.to_string()));
    }

    #[test]
    fn kill_reaches_the_whole_group_and_a_timeout_fails() {
        let mut p = sh("sleep 1000 & echo started; wait");
        p.wait_for(T, |l| l == "started");
        assert!(
            p.try_wait_for(Duration::from_millis(100), |l| l == "never")
                .is_none()
        );
        p.kill();
        assert!(p.try_wait().is_some_and(|s| !s.success()));
        // The backgrounded sleep holds the pipes open: they close, so the
        // wait ends before its deadline, only if the group's kill reached it.
        let t = Instant::now();
        assert!(p.try_wait_for(T, |_| false).is_none());
        assert!(t.elapsed() < T / 2, "the grandchild outlived the kill");
    }
}
