//! The storm network: a bridge in a hub namespace, and one namespace per host
//! joined to it by a veth pair shaped with tbf on both ends.
//!
//! Addresses are 10.77.0.0/16 and exist only inside namespaces this process
//! creates; nothing is routed to the machine's own network.

use std::process::Command;

use anyhow::{Context, bail};

use crate::cleanup;

/// Runs a command, failing with its stderr.
pub fn sh(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One host's namespace.
#[derive(Debug, Clone)]
pub struct Host {
    /// Namespace name.
    pub ns: String,
    /// Its address on the bridge.
    pub ip: String,
    /// The veth end in the hub namespace.
    pub hub_if: String,
}

/// Link shaping for one host: bit/s each way.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Host upload (egress of its eth0).
    pub up_bps: u64,
    /// Host download (egress of the hub's veth end).
    pub down_bps: u64,
}

/// The storm network. Dropping it deletes every namespace it made.
#[derive(Debug)]
pub struct Topology {
    /// The hub namespace holding the bridge.
    pub hub: String,
    /// The seed host.
    pub seed: Host,
    /// The node hosts.
    pub nodes: Vec<Host>,
}

fn tbf(ns: &str, dev: &str, bps: u64) -> anyhow::Result<()> {
    // burst: at least rate/HZ; 64 KiB keeps tbf accurate at 20-1000 Mbit/s.
    // latency bounds the queue (about 100 ms of data).
    let rate = format!("{bps}bit");
    sh(&[
        "ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate",
        &rate, "burst", "64kb", "latency", "100ms",
    ])?;
    Ok(())
}

impl Topology {
    /// Creates the hub, the seed and `n` nodes with the given shapes.
    /// `tag` makes names unique per run (use the PID).
    pub fn create(
        tag: &str,
        n: usize,
        seed_shape: Shape,
        node_shape: Shape,
    ) -> anyhow::Result<Topology> {
        if n > 250 {
            bail!("at most 250 nodes per storm network (got {n})");
        }
        let hub = format!("pst{tag}h");
        let mk_ns = |name: &str| -> anyhow::Result<()> {
            sh(&["ip", "netns", "add", name])?;
            cleanup::register_ns(name);
            sh(&["ip", "-n", name, "link", "set", "lo", "up"])?;
            Ok(())
        };
        mk_ns(&hub)?;
        let mut topo = Topology {
            hub: hub.clone(),
            seed: Host {
                ns: String::new(),
                ip: String::new(),
                hub_if: String::new(),
            },
            nodes: Vec::new(),
        };
        sh(&["ip", "-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        sh(&["ip", "-n", &hub, "link", "set", "br0", "up"])?;
        let add = |idx: usize, name: String, shape: Shape| -> anyhow::Result<Host> {
            mk_ns(&name)?;
            let hub_if = format!("v{idx}");
            let ip = format!("10.77.{}.{}", idx / 250, idx % 250 + 1);
            sh(&[
                "ip", "-n", &name, "link", "add", "eth0", "type", "veth", "peer", "name", &hub_if,
                "netns", &hub,
            ])?;
            sh(&[
                "ip", "-n", &hub, "link", "set", &hub_if, "master", "br0", "up",
            ])?;
            sh(&[
                "ip",
                "-n",
                &name,
                "addr",
                "add",
                &format!("{ip}/16"),
                "dev",
                "eth0",
            ])?;
            sh(&["ip", "-n", &name, "link", "set", "eth0", "up"])?;
            // mDNS needs a multicast route.
            sh(&[
                "ip",
                "-n",
                &name,
                "route",
                "add",
                "224.0.0.0/4",
                "dev",
                "eth0",
            ])?;
            tbf(&name, "eth0", shape.up_bps)?;
            tbf(&hub, &hub_if, shape.down_bps)?;
            Ok(Host {
                ns: name,
                ip,
                hub_if,
            })
        };
        topo.seed = add(0, format!("pst{tag}s"), seed_shape)?;
        for i in 0..n {
            let h = add(i + 1, format!("pst{tag}n{i}"), node_shape)?;
            topo.nodes.push(h);
        }
        Ok(topo)
    }

    /// Bytes sent by a host's eth0 so far (all traffic, headers included).
    pub fn tx_bytes(host: &Host) -> anyhow::Result<u64> {
        let s = sh(&[
            "ip",
            "netns",
            "exec",
            &host.ns,
            "cat",
            "/sys/class/net/eth0/statistics/tx_bytes",
        ])?;
        s.trim().parse().context("parsing tx_bytes")
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let mut all: Vec<String> = self.nodes.iter().map(|h| h.ns.clone()).collect();
        all.push(self.seed.ns.clone());
        all.push(self.hub.clone());
        for ns in all.into_iter().filter(|n| !n.is_empty()) {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
            cleanup::forget_ns(&ns);
        }
    }
}
