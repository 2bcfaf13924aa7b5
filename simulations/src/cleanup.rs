//! Everything a storm creates, so it is removed on drop, on error and on Ctrl-C.
//!
//! Processes are killed by process group (each child leads its own), by PID,
//! never by name; namespaces are deleted by the names this process made.

use std::os::unix::process::CommandExt;
use std::sync::{Mutex, Once};

static PGIDS: Mutex<Vec<i32>> = Mutex::new(Vec::new());
static NAMESPACES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Records a child process group to kill at cleanup.
pub fn register_pgid(pgid: i32) {
    if let Ok(mut v) = PGIDS.lock() {
        v.push(pgid);
    }
}

/// Forgets a process group that has been reaped.
pub fn forget_pgid(pgid: i32) {
    if let Ok(mut v) = PGIDS.lock() {
        v.retain(|&p| p != pgid);
    }
}

/// Records a namespace to delete at cleanup.
pub fn register_ns(name: &str) {
    if let Ok(mut v) = NAMESPACES.lock() {
        v.push(name.to_owned());
    }
}

/// Forgets a namespace that has been deleted.
pub fn forget_ns(name: &str) {
    if let Ok(mut v) = NAMESPACES.lock() {
        v.retain(|n| n != name);
    }
}

/// Kills every registered process group and deletes every registered namespace.
pub fn run_all() {
    let pgids: Vec<i32> = PGIDS
        .lock()
        .map(|mut v| std::mem::take(&mut *v))
        .unwrap_or_default();
    for p in pgids {
        // SAFETY: kill(2) on a process group this process created.
        unsafe {
            libc::kill(-p, libc::SIGKILL);
        }
    }
    let names: Vec<String> = NAMESPACES
        .lock()
        .map(|mut v| std::mem::take(&mut *v))
        .unwrap_or_default();
    for n in names.iter().rev() {
        // Its own process group: a signal sent to ours (Ctrl-C, `timeout -s INT`)
        // must not kill the cleanup itself.
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", n])
            .process_group(0)
            .status();
    }
}

/// Installs a Ctrl-C / SIGTERM handler that cleans up and exits with 130.
pub fn install_signal_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            eprintln!("\ninterrupted: removing namespaces and processes");
            run_all();
            std::process::exit(130);
        });
    });
}
