//! Helpers for the end-to-end tests in `tests/tests/`: build and locate the
//! `plasmd` binary, run it as a child that is killed (by PID) on drop, and
//! wait for what it prints instead of sleeping.

pub mod selfhost;
pub mod swarm;
pub mod vm;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_owned()
}

/// `target/<profile>` of the running test binary (`…/target/release/deps/x` -> `…/target/release`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_owned()
}

/// Path of the host `plasmd` binary, built once per test process with the same profile.
pub fn plasmd() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = profile_dir();
        let profile = dir.file_name().and_then(|s| s.to_str()).unwrap_or("debug");
        let cargo_profile = if profile == "debug" { "dev" } else { profile };
        let target_dir = dir.parent().expect("target dir").to_owned();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(workspace_root())
            .args([
                "build",
                "--locked",
                "-p",
                "plasmd",
                "--profile",
                cargo_profile,
            ])
            .env("CARGO_TARGET_DIR", &target_dir)
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build -p plasmd failed");
        dir.join("plasmd")
    })
    .clone()
}

/// A child process killed by PID (its whole process group) when dropped, whose
/// stdout and stderr lines are collected for waiting and for failure messages.
pub struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Mutex<Vec<String>>,
    name: String,
}

impl Proc {
    /// Spawns `cmd` in its own process group with piped output.
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        use std::os::unix::process::CommandExt;
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let (tx, rx) = mpsc::sync_channel(10_000);
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        for r in [
            Box::new(out) as Box<dyn std::io::Read + Send>,
            Box::new(err),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines() {
                    let Ok(line) = line else { break };
                    // A full channel drops lines rather than blocking the child.
                    let _ = tx.try_send(line);
                }
            });
        }
        Proc {
            child,
            lines: rx,
            seen: Mutex::new(Vec::new()),
            name: name.to_owned(),
        }
    }

    /// The child's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until a line satisfies `pred`, returning it; panics with the
    /// output so far after `timeout`.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.lock().expect("lock").push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "{}: timed out after {timeout:?}; output so far:\n{}",
                    self.name,
                    self.output()
                ),
            }
        }
    }

    /// Everything read so far (drains pending lines first).
    pub fn output(&self) -> String {
        let mut seen = self.seen.lock().expect("lock");
        while let Ok(l) = self.lines.try_recv() {
            seen.push(l);
        }
        seen.join("\n")
    }

    /// Waits for exit, up to `timeout`; returns the exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            if Instant::now() > deadline {
                panic!(
                    "{}: did not exit within {timeout:?}:\n{}",
                    self.name,
                    self.output()
                );
            }
            // Poll the child at a short interval; there is no portable exit event.
            let _ = self.lines.recv_timeout(Duration::from_millis(20)).map(|l| {
                self.seen.lock().expect("lock").push(l);
            });
        }
    }

    /// Kills the process group now.
    pub fn kill(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on our own child's process group.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

/// A running `plasmd serve` on loopback.
pub struct Seed {
    /// The process.
    pub proc: Proc,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The publisher public key from the banner.
    pub pubkey: String,
}

impl Seed {
    /// Starts `plasmd serve -a artifacts -p 0` on 127.0.0.1 with its state in `state`.
    pub fn start(artifacts: &Path, state: &Path, extra: &[&str]) -> Seed {
        let mut cmd = Command::new(plasmd());
        // mDNS off: a test seed on loopback must not multicast on the host's real interfaces.
        cmd.env("PLASMD_MDNS", "0")
            .arg("serve")
            .arg("-a")
            .arg(artifacts)
            .args(["-p", "0", "--bind", "127.0.0.1", "--state"])
            .arg(state)
            .args(extra);
        let proc = Proc::spawn("plasmd serve", cmd);
        let pk = proc.wait_for(Duration::from_secs(60), |l| l.contains("public key "));
        let pubkey = pk
            .split("public key ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .expect("key in banner")
            .to_owned();
        let line = proc.wait_for(Duration::from_secs(60), |l| l.contains("serving http://"));
        let url = line
            .split("serving ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .expect("url in banner")
            .to_owned();
        Seed { proc, url, pubkey }
    }
}

/// Deterministic pseudo-random bytes (xorshift), so a test's artifacts differ
/// in every chunk without a random dependency.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Writes `DIR/CHANNEL/ARCH/{kernel,initramfs}` of the given sizes; returns DIR.
pub fn make_artifacts(
    root: &Path,
    channel: &str,
    arch: &str,
    kernel: usize,
    initramfs: usize,
) -> PathBuf {
    let dir = root.join("artifacts");
    let a = dir.join(channel).join(arch);
    std::fs::create_dir_all(&a).expect("mkdir");
    std::fs::write(a.join("kernel"), pseudo_random(kernel, 1)).expect("write");
    std::fs::write(a.join("initramfs"), pseudo_random(initramfs, 2)).expect("write");
    dir
}
