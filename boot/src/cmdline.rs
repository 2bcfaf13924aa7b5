//! The `phase.*` kernel command line: pure parsing, one edge function that
//! reads `/proc/cmdline`.
//!
//! Splitting follows the kernel's `next_arg()` (lib/cmdline.c): words are
//! separated by whitespace, double quotes group, the outer quotes of a value
//! (`key="a b"`) or of a whole word (`"key=a b"`) are removed, and `-` and `_`
//! are the same in parameter names. Everything after a bare `--` belongs to
//! init's argv and is not a kernel parameter.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use phase_content::PublicKey;

use crate::Error;

/// The longest command line we accept (the kernel's own limit is smaller
/// on every architecture: 2048 on x86_64 and arm64).
pub const MAX_CMDLINE: usize = 64 << 10;

/// One `key[=value]` word of a kernel command line, quotes removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param<'a> {
    /// The name as written (before `-`/`_` normalisation).
    pub key: &'a str,
    /// The value, if the word had a `=`.
    pub value: Option<&'a str>,
}

/// Splits a command line into parameters the way the kernel does.
pub fn split(cmdline: &str) -> Vec<Param<'_>> {
    let mut out = Vec::new();
    let mut rest = cmdline;
    loop {
        rest = rest.trim_start_matches(is_space);
        if rest.is_empty() {
            break;
        }
        let (param, tail) = next_arg(rest);
        rest = tail;
        if param.key == "--" && param.value.is_none() {
            break;
        }
        out.push(param);
    }
    out
}

fn is_space(c: char) -> bool {
    c.is_ascii_whitespace()
}

/// One word from the front of `s` (no leading whitespace): the kernel's `next_arg`.
fn next_arg(s: &str) -> (Param<'_>, &str) {
    let (quoted, s) = match s.strip_prefix('"') {
        Some(t) => (true, t),
        None => (false, s),
    };
    let mut in_quote = quoted;
    let mut equals = None;
    let mut end = s.len();
    for (i, c) in s.char_indices() {
        if is_space(c) && !in_quote {
            end = i;
            break;
        }
        if equals.is_none() && c == '=' {
            equals = Some(i);
        }
        if c == '"' {
            in_quote = !in_quote;
        }
    }
    let word = &s[..end];
    let tail = &s[end..];
    // The kernel drops a closing quote that ends the word when the word or
    // its value opened with one.
    let param = match equals {
        None => {
            let key = if quoted {
                word.strip_suffix('"').unwrap_or(word)
            } else {
                word
            };
            Param { key, value: None }
        }
        Some(eq) => {
            let key = &word[..eq];
            let raw = &word[eq + 1..];
            let value = match raw.strip_prefix('"') {
                Some(v) => v.strip_suffix('"').unwrap_or(v),
                None if quoted => raw.strip_suffix('"').unwrap_or(raw),
                None => raw,
            };
            Param {
                key,
                value: Some(value),
            }
        }
    };
    (param, tail)
}

/// `phase.mode`: where peers come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Seeds and the DHT (the default).
    #[default]
    Internet,
    /// Only the local network (mDNS and `phase.peers`).
    Lan,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Internet => "internet",
            Mode::Lan => "lan",
        })
    }
}

impl FromStr for Mode {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "internet" => Ok(Mode::Internet),
            "lan" => Ok(Mode::Lan),
            _ => Err(()),
        }
    }
}

/// The architecture this binary runs on, as used in channel paths.
pub fn running_arch() -> &'static str {
    std::env::consts::ARCH
}

/// What the `phase.*` parameters ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhaseConfig {
    /// `phase.provider=URL`: the bootstrap seed.
    pub provider: Option<String>,
    /// `phase.pubkey=HEX`: the pinned publisher key.
    pub pubkey: Option<PublicKey>,
    /// `phase.channel=` (default `stable`).
    pub channel: String,
    /// `phase.arch=` (default: the running architecture).
    pub arch: String,
    /// `phase.mode=internet|lan`.
    pub mode: Mode,
    /// `phase.peers=MULTIADDR,...`.
    pub peers: Vec<String>,
    /// `phase.linger=SECONDS`: keep serving this long after the fetch.
    pub linger: Option<u64>,
    /// `phase.min_sequence=N`: refuse any manifest with a lower sequence
    /// (rollback protection for a machine that has no state of its own).
    pub min_sequence: Option<u64>,
    /// `phase.metrics=PORT`: a booted node in serve mode answers Prometheus
    /// scrapes at `http://ADDR:PORT/metrics`.
    pub metrics: Option<u16>,
    /// `phase.test_disable_kexec=1`: TEST ONLY. Init sets
    /// `kernel.kexec_load_disabled=1` before the boot path, to prove the
    /// diagnosis of a kernel that refuses kexec.
    pub test_disable_kexec: bool,
    /// `phase.test_force_kexec_load=1`: TEST ONLY. Init answers
    /// `kexec_file_load` with ENOSYS without calling it, so the `kexec_load`
    /// fallback runs on a kernel that has both.
    pub test_force_kexec_load: bool,
    /// `phase.test_force_kexec_file_load=1`: TEST ONLY. Init answers
    /// `kexec_load` with ENOSYS without calling it, so an x86_64 kernel that
    /// takes `kexec_load` first (BIOS-booted, no lockdown) uses
    /// `kexec_file_load`.
    pub test_force_kexec_file_load: bool,
}

impl Default for PhaseConfig {
    fn default() -> Self {
        PhaseConfig {
            provider: None,
            pubkey: None,
            channel: "stable".into(),
            arch: running_arch().into(),
            mode: Mode::Internet,
            peers: Vec::new(),
            linger: None,
            min_sequence: None,
            metrics: None,
            test_disable_kexec: false,
            test_force_kexec_load: false,
            test_force_kexec_file_load: false,
        }
    }
}

/// A `phase.*` parameter we do not know: reported, never fatal, so an older
/// initramfs boots a newer command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// The parameter name as written.
    pub key: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown kernel parameter {:?} ignored", self.key)
    }
}

impl PhaseConfig {
    /// Parses the `phase.*` parameters of a whole command line; other
    /// parameters are ignored. A known key with a bad value is an error.
    pub fn parse(cmdline: &str) -> Result<(PhaseConfig, Vec<Warning>), Error> {
        if cmdline.len() > MAX_CMDLINE {
            return Err(Error::Cmdline {
                key: String::new(),
                value: format!("{} bytes", cmdline.len()),
                reason: "command line too long",
            });
        }
        let mut cfg = PhaseConfig::default();
        let mut warnings = Vec::new();
        for p in split(cmdline) {
            let norm = p.key.replace('-', "_");
            let Some(name) = norm.strip_prefix("phase.") else {
                continue;
            };
            let bad = |reason: &'static str| Error::Cmdline {
                key: p.key.to_owned(),
                value: p.value.unwrap_or("").to_owned(),
                reason,
            };
            let value = p.value.unwrap_or("");
            match name {
                // A `"` inside a value cannot be written back on a command line (the
                // kernel has no escape for it), and no URL or multiaddr holds one.
                "provider" | "peers" if value.contains('"') => {
                    return Err(bad("want no double quote inside the value (%22 in a URL)"));
                }
                "provider" => {
                    // Trailing slashes are dropped, so `/` alone is as empty as nothing.
                    let url = value.trim_end_matches('/');
                    if url.is_empty() {
                        return Err(bad("want a URL"));
                    }
                    cfg.provider = Some(url.to_owned());
                }
                "pubkey" => {
                    cfg.pubkey = Some(value.parse().map_err(|_| bad("want 64 hex digits"))?)
                }
                "channel" | "arch" => {
                    if !phase_content::valid_component(value) {
                        return Err(bad("want a plain name (letters, digits, . _ -)"));
                    }
                    if name == "channel" {
                        cfg.channel = value.to_owned();
                    } else {
                        cfg.arch = value.to_owned();
                    }
                }
                "mode" => cfg.mode = value.parse().map_err(|()| bad("want internet or lan"))?,
                "peers" => {
                    cfg.peers = value
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                }
                "linger" => {
                    cfg.linger = Some(value.parse().map_err(|_| bad("want whole seconds"))?)
                }
                "min_sequence" => {
                    cfg.min_sequence = Some(value.parse().map_err(|_| bad("want a whole number"))?)
                }
                "metrics" => {
                    cfg.metrics = Some(
                        value
                            .parse()
                            .map_err(|_| bad("want a TCP port (0-65535)"))?,
                    )
                }
                "test_disable_kexec" | "test_force_kexec_load" | "test_force_kexec_file_load" => {
                    let on = match p.value {
                        None | Some("1") | Some("y") => true,
                        Some("0") | Some("n") => false,
                        // A build without the knobs ignores them (plasmd says
                        // so): a bad value must not stop a production boot.
                        Some(_) if !cfg!(feature = "test-knobs") => true,
                        Some(_) => return Err(bad("want 1 or 0")),
                    };
                    match name {
                        "test_disable_kexec" => cfg.test_disable_kexec = on,
                        "test_force_kexec_load" => cfg.test_force_kexec_load = on,
                        _ => cfg.test_force_kexec_file_load = on,
                    }
                }
                _ => warnings.push(Warning {
                    key: p.key.to_owned(),
                }),
            }
        }
        Ok((cfg, warnings))
    }

    /// Renders the parameters that differ from the defaults as command line
    /// words, quoting values with whitespace; [`PhaseConfig::parse`] reads
    /// them back.
    pub fn to_cmdline(&self) -> String {
        let mut words: Vec<String> = Vec::new();
        let mut push = |k: &str, v: &str| {
            if v.is_empty() || v.contains(is_space) {
                words.push(format!("phase.{k}=\"{v}\""));
            } else {
                words.push(format!("phase.{k}={v}"));
            }
        };
        if let Some(p) = &self.provider {
            push("provider", p);
        }
        if let Some(k) = &self.pubkey {
            push("pubkey", &k.to_string());
        }
        let d = PhaseConfig::default();
        if self.channel != d.channel {
            push("channel", &self.channel);
        }
        if self.arch != d.arch {
            push("arch", &self.arch);
        }
        if self.mode != d.mode {
            push("mode", &self.mode.to_string());
        }
        if !self.peers.is_empty() {
            push("peers", &self.peers.join(","));
        }
        if let Some(l) = self.linger {
            push("linger", &l.to_string());
        }
        if let Some(n) = self.min_sequence {
            push("min_sequence", &n.to_string());
        }
        if let Some(m) = self.metrics {
            push("metrics", &m.to_string());
        }
        if self.test_disable_kexec {
            push("test_disable_kexec", "1");
        }
        if self.test_force_kexec_load {
            push("test_force_kexec_load", "1");
        }
        if self.test_force_kexec_file_load {
            push("test_force_kexec_file_load", "1");
        }
        words.join(" ")
    }
}

/// Reads `/proc/cmdline` (or another file) and parses it: the only function
/// here that touches the system.
pub fn read(path: &Path) -> Result<(String, PhaseConfig, Vec<Warning>), Error> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
    let text = String::from_utf8_lossy(&bytes).trim_end().to_owned();
    let (cfg, w) = PhaseConfig::parse(&text)?;
    Ok((text, cfg, w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kv(s: &str) -> Vec<(String, Option<String>)> {
        split(s)
            .into_iter()
            .map(|p| (p.key.to_owned(), p.value.map(str::to_owned)))
            .collect()
    }

    #[test]
    fn splits_like_the_kernel() {
        assert_eq!(
            kv(r#"console=ttyS0  quiet a="b c" "d=e f" ro -- phase.x=1"#),
            vec![
                ("console".into(), Some("ttyS0".into())),
                ("quiet".into(), None),
                ("a".into(), Some("b c".into())),
                ("d".into(), Some("e f".into())),
                ("ro".into(), None),
            ]
        );
        assert_eq!(kv("k=v=w"), vec![("k".into(), Some("v=w".into()))]);
        assert_eq!(kv("\"quoted\""), vec![("quoted".into(), None)]);
        assert_eq!(
            kv("a=\"unterminated b"),
            vec![("a".into(), Some("unterminated b".into()))]
        );
        assert!(kv(" \t\n").is_empty());
    }

    #[test]
    fn parses_phase_keys_with_defaults_and_warnings() {
        let key = phase_content::SecretKey::from_seed([7; 32]).public();
        let line = format!(
            "console=ttyS0 phase.provider=http://10.0.2.100:80/ phase.pubkey={key} \
             phase.mode=lan phase.peers=/ip4/1.2.3.4/tcp/1,/dns/x/tcp/2 phase.linger=30 \
             phase.metrics=9100 phase.frobnicate=yes phase-channel=beta phase.min-sequence=7"
        );
        let (cfg, warnings) = PhaseConfig::parse(&line).expect("parses");
        assert_eq!(cfg.provider.as_deref(), Some("http://10.0.2.100:80"));
        assert_eq!(cfg.pubkey, Some(key));
        assert_eq!(cfg.channel, "stable", "phase-channel is not phase.channel");
        assert_eq!(cfg.arch, running_arch());
        assert_eq!(cfg.mode, Mode::Lan);
        assert_eq!(cfg.peers.len(), 2);
        assert_eq!(cfg.linger, Some(30));
        assert_eq!(cfg.min_sequence, Some(7), "- and _ are the same in names");
        assert_eq!(cfg.metrics, Some(9100));
        assert!(!cfg.test_disable_kexec);
        assert!(!cfg.test_force_kexec_load);
        assert_eq!(
            warnings,
            vec![Warning {
                key: "phase.frobnicate".into()
            }]
        );
        let (cfg, _) =
            PhaseConfig::parse("phase.test-disable-kexec phase.channel=beta").expect("parses");
        assert!(cfg.test_disable_kexec);
        assert!(!cfg.test_force_kexec_load);
        assert_eq!(cfg.channel, "beta");
        let (cfg, _) = PhaseConfig::parse("phase.test_force_kexec_load=1").expect("parses");
        assert!(cfg.test_force_kexec_load);
        let maybe = PhaseConfig::parse("phase.test_force_kexec_load=maybe");
        #[cfg(feature = "test-knobs")]
        assert!(maybe.is_err());
        #[cfg(not(feature = "test-knobs"))]
        assert!(
            maybe.expect("parses").0.test_force_kexec_load,
            "set, to be ignored"
        );
    }

    #[test]
    fn bad_values_of_known_keys_are_errors() {
        for line in [
            "phase.mode=wan",
            "phase.pubkey=abc",
            "phase.linger=-1",
            "phase.min_sequence=two",
            "phase.min_sequence=",
            "phase.metrics=70000",
            "phase.metrics=",
            "phase.channel=../x",
            "phase.provider=",
            "phase.provider=/",
            "phase.provider=///",
            "phase.provider=\"/\"",
        ] {
            let e = PhaseConfig::parse(line).expect_err(line);
            assert!(e.to_string().contains("phase."), "{line}: {e}");
        }
    }

    #[test]
    fn provider_of_only_slashes_is_refused_not_empty() {
        for line in ["phase.provider=/", "phase.provider=///"] {
            let e = PhaseConfig::parse(line).expect_err(line);
            assert!(e.to_string().contains("want a URL"), "{line}: {e}");
        }
        let (cfg, _) = PhaseConfig::parse("phase.provider=http://seed//").expect("parses");
        assert_eq!(cfg.provider.as_deref(), Some("http://seed"));
    }

    #[test]
    fn quotes_inside_free_text_values_are_refused() {
        // Found by fuzz/fuzz_targets/cmdline.rs: the value `a"b phase.mode=lan` (an
        // unclosed quote swallows the rest of the line) rendered back as a line
        // whose `phase.mode` was `lan"`.
        for line in [
            "phase.provider=a\"b phase.mode=lan",
            "phase.provider=http://x/\"y\"",
            "phase.peers=/ip4/1.2.3.4/tcp/1,\"a b",
        ] {
            let e = PhaseConfig::parse(line).expect_err(line);
            assert!(e.to_string().contains("double quote"), "{line}: {e}");
        }
        // Quotes around a whole value are still just quoting.
        let (cfg, _) =
            PhaseConfig::parse("\"phase.provider=http://x\" phase.peers=\"/ip4/1.2.3.4/tcp/1\"")
                .expect("parses");
        assert_eq!(cfg.provider.as_deref(), Some("http://x"));
        assert_eq!(cfg.peers, ["/ip4/1.2.3.4/tcp/1"]);
    }

    fn value() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9:/._,= -]{1,30}"
    }

    fn component() -> impl Strategy<Value = String> {
        "[a-z0-9][a-z0-9._-]{0,15}"
    }

    proptest! {
        #[test]
        fn render_then_parse_round_trips(
            provider in proptest::option::of(value().prop_filter("no trailing slash", |v| !v.ends_with('/'))),
            seed in proptest::option::of(any::<[u8; 32]>()),
            channel in component(),
            arch in component(),
            lan in any::<bool>(),
            peers in proptest::collection::vec("[a-z0-9/.]{1,20}", 0..4),
            linger in proptest::option::of(any::<u64>()),
            min_sequence in proptest::option::of(any::<u64>()),
            metrics in proptest::option::of(any::<u16>()),
            test_disable_kexec in any::<bool>(),
            test_force_kexec_load in any::<bool>(),
            test_force_kexec_file_load in any::<bool>(),
            noise in "[a-z =\"]{0,20}",
        ) {
            let cfg = PhaseConfig {
                provider,
                pubkey: seed.map(|s| phase_content::SecretKey::from_seed(s).public()),
                channel,
                arch,
                mode: if lan { Mode::Lan } else { Mode::Internet },
                peers,
                linger,
                min_sequence,
                metrics,
                test_disable_kexec,
                test_force_kexec_load,
                test_force_kexec_file_load,
            };
            // Other parameters (even odd quoting) before ours do not leak into ours.
            let line = format!("console=ttyS0 {} {}", noise.replace('"', ""), cfg.to_cmdline());
            let (back, warnings) = PhaseConfig::parse(&line).expect("parses");
            prop_assert_eq!(back, cfg);
            prop_assert!(warnings.is_empty());
        }

        #[test]
        fn split_never_panics(s in "\\PC{0,200}") {
            let _ = split(&s);
            let _ = PhaseConfig::parse(&s);
        }
    }
}
