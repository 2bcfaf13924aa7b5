//! The signed manifest: what a channel/arch boots, and who says so.
//!
//! On disk and over HTTP a manifest travels as a signed envelope:
//!
//! ```json
//! {"manifest":{"format":1,"channel":"stable",...},"signature":"<128 hex digits>"}
//! ```
//!
//! The signature is ed25519 over `b"phase-manifest-v1\0"` followed by the exact
//! bytes of the `manifest` value as they appear in the envelope. Verification
//! never re-serialises, so there is no canonical-JSON question: the bytes that
//! were signed are the bytes that are checked, then parsed.
//!
//! An HTTP seed may add `"urls":{"kernel":"http://HOST/CHANNEL/ARCH/kernel",...}`
//! beside `manifest` and `signature`, for shell inits that fetch artifacts
//! by URL ([`with_urls`]). Nothing signs or trusts it: [`SignedManifest::verify`]
//! ignores it and keeps the envelope without it.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::keys::{PublicKey, SecretKey, Signature};
use crate::{Error, Hash};

/// The manifest format this code writes and understands.
pub const FORMAT: u32 = 1;

/// Largest manifest envelope accepted, in bytes. A 1 GiB artifact in 64 KiB
/// chunks needs about 1.1 MiB of manifest, and the default chunk size keeps
/// any set at 32,768 chunks (2.2 MiB) at most; this leaves ample room.
pub const MAX_MANIFEST_BYTES: usize = 8 << 20;

/// Smallest and largest chunk sizes accepted in a manifest.
pub const MIN_CHUNK_SIZE: u32 = 4 << 10;
/// See [`MIN_CHUNK_SIZE`].
pub const MAX_CHUNK_SIZE: u32 = 4 << 20;

/// Largest artifact accepted (8 GiB): bounds what a manifest can make us allocate.
pub const MAX_ARTIFACT_SIZE: u64 = 8 << 30;

/// The artifact names a manifest may carry, in boot order.
pub const ARTIFACT_NAMES: [&str; 3] = ["kernel", "initramfs", "dtb"];

/// What a channel/arch boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Format version, [`FORMAT`].
    pub format: u32,
    /// Release channel, e.g. `stable`.
    pub channel: String,
    /// Architecture, e.g. `x86_64` or `aarch64`.
    pub arch: String,
    /// Monotonically increasing per publisher/channel/arch; a lower one is a rollback.
    pub sequence: u64,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// The key that signed this manifest.
    pub publisher: PublicKey,
    /// Kernel command line for the target, if the publisher set one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// Kernel, initramfs and optional dtb.
    pub artifacts: Vec<Artifact>,
    /// HTTP seeds known at publish time.
    #[serde(default)]
    pub seeds: Vec<String>,
    /// libp2p multiaddrs known at publish time.
    #[serde(default)]
    pub peers: Vec<String>,
}

/// One artifact, split into fixed-size chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// `kernel`, `initramfs`, `dtb`.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// blake3 of the whole artifact.
    pub hash: Hash,
    /// Every chunk but the last has this many bytes.
    pub chunk_size: u32,
    /// blake3 of each chunk, in order.
    pub chunks: Vec<Hash>,
}

impl Artifact {
    /// The byte length of chunk `index`.
    pub fn chunk_len(&self, index: usize) -> u64 {
        let cs = u64::from(self.chunk_size);
        let start = index as u64 * cs;
        self.size.saturating_sub(start).min(cs)
    }

    fn check(&self) -> Result<(), String> {
        if !ARTIFACT_NAMES.contains(&self.name.as_str()) {
            return Err(format!("unknown artifact name {:?}", self.name));
        }
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size) {
            return Err(format!(
                "{}: chunk size {} outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}",
                self.name, self.chunk_size
            ));
        }
        if self.size > MAX_ARTIFACT_SIZE {
            return Err(format!("{}: size {} too large", self.name, self.size));
        }
        let want = self.size.div_ceil(u64::from(self.chunk_size));
        if self.chunks.len() as u64 != want {
            return Err(format!(
                "{}: {} chunk hashes for {} bytes in {}-byte chunks (want {want})",
                self.name,
                self.chunks.len(),
                self.size,
                self.chunk_size
            ));
        }
        Ok(())
    }
}

impl Manifest {
    /// The artifact called `name`, if present.
    pub fn artifact(&self, name: &str) -> Option<&Artifact> {
        self.artifacts.iter().find(|a| a.name == name)
    }

    /// Structural checks beyond the signature: format, names, chunk counts.
    pub fn check(&self) -> Result<(), Error> {
        let bad = |reason: String| Error::BadManifest { reason };
        if self.format != FORMAT {
            return Err(bad(format!(
                "format {} (this plasmd reads format {FORMAT})",
                self.format
            )));
        }
        for (what, v) in [("channel", &self.channel), ("arch", &self.arch)] {
            if !valid_component(v) {
                return Err(bad(format!("invalid {what} {v:?}")));
            }
        }
        if self.artifact("kernel").is_none() {
            return Err(bad("no kernel artifact".into()));
        }
        for (i, a) in self.artifacts.iter().enumerate() {
            a.check().map_err(bad)?;
            if self.artifacts[..i].iter().any(|b| b.name == a.name) {
                return Err(bad(format!("artifact {:?} listed twice", a.name)));
            }
        }
        Ok(())
    }

    /// Signs this manifest, producing the envelope.
    pub fn sign(&self, key: &SecretKey) -> Result<SignedManifest, Error> {
        if key.public() != self.publisher {
            return Err(Error::BadManifest {
                reason: "publisher field does not match the signing key".into(),
            });
        }
        self.check()?;
        let body = serde_json::to_string(self).map_err(|e| Error::BadManifest {
            reason: e.to_string(),
        })?;
        let signature = key.sign_manifest(body.as_bytes());
        Ok(SignedManifest {
            manifest: self.clone(),
            root: Hash::of(body.as_bytes()),
            envelope: envelope_bytes(&body, &signature),
        })
    }
}

/// Channel and arch become path components and URL segments.
pub fn valid_component(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope<'a> {
    #[serde(borrow)]
    manifest: &'a RawValue,
    signature: Signature,
    /// Unsigned artifact URLs from an HTTP seed: accepted, never used.
    #[serde(default, borrow)]
    urls: Option<&'a RawValue>,
}

fn envelope_bytes(body: &str, signature: &Signature) -> Vec<u8> {
    format!("{{\"manifest\":{body},\"signature\":\"{signature}\"}}\n").into_bytes()
}

/// `envelope` (as [`SignedManifest::envelope`] gives it) with an unsigned
/// `"urls"` object naming each artifact's absolute URL, in the order given.
pub fn with_urls<'a>(
    envelope: &[u8],
    urls: impl IntoIterator<Item = (&'a str, String)>,
) -> Vec<u8> {
    let map: serde_json::Map<String, serde_json::Value> = urls
        .into_iter()
        .map(|(name, url)| (name.to_owned(), serde_json::Value::String(url)))
        .collect();
    let text = String::from_utf8_lossy(envelope);
    let Some(open) = text.trim_end().strip_suffix('}') else {
        return envelope.to_vec();
    };
    format!("{open},\"urls\":{}}}\n", serde_json::Value::Object(map)).into_bytes()
}

/// A manifest whose signature has been checked, with the exact bytes it came in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedManifest {
    manifest: Manifest,
    root: Hash,
    envelope: Vec<u8>,
}

impl SignedManifest {
    /// Parses an envelope and checks its signature against the pinned key.
    ///
    /// Fails if the bytes are not an envelope, the signature does not verify
    /// with `pinned`, the manifest names another publisher, or the manifest is
    /// structurally invalid.
    pub fn verify(bytes: &[u8], pinned: &PublicKey) -> Result<Self, Error> {
        let (body, sig, unsigned) = split_envelope(bytes)?;
        if !pinned.verify_manifest(body.get().as_bytes(), &sig) {
            return Err(Error::BadSignature {
                key: Box::new(*pinned),
            });
        }
        let manifest: Manifest =
            serde_json::from_str(body.get()).map_err(|e| Error::BadManifest {
                reason: e.to_string(),
            })?;
        if manifest.publisher != *pinned {
            return Err(Error::BadManifest {
                reason: format!(
                    "signed by the pinned key but names publisher {}",
                    manifest.publisher
                ),
            });
        }
        manifest.check()?;
        // What travels on (to peers, into files) is the signed part only.
        let envelope = if unsigned {
            envelope_bytes(body.get(), &sig)
        } else {
            bytes.to_vec()
        };
        Ok(SignedManifest {
            root: Hash::of(body.get().as_bytes()),
            manifest,
            envelope,
        })
    }

    /// Reads the publisher key a manifest claims, without trusting it.
    ///
    /// For tools that show an unverified manifest; never a substitute for a pinned key.
    pub fn claimed_publisher(bytes: &[u8]) -> Result<PublicKey, Error> {
        #[derive(Deserialize)]
        struct Claim {
            publisher: PublicKey,
        }
        let (body, _, _) = split_envelope(bytes)?;
        let c: Claim = serde_json::from_str(body.get()).map_err(|e| Error::BadManifest {
            reason: e.to_string(),
        })?;
        Ok(c.publisher)
    }

    /// Refuses a manifest older than one already seen (rollback protection).
    pub fn check_not_older(&self, highest_seen: Option<u64>) -> Result<(), Error> {
        match highest_seen {
            Some(seen) if self.manifest.sequence < seen => Err(Error::Rollback {
                channel: self.manifest.channel.clone(),
                arch: self.manifest.arch.clone(),
                got: self.manifest.sequence,
                seen,
            }),
            _ => Ok(()),
        }
    }

    /// The verified manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// blake3 of the signed manifest bytes: the swarm's key for this release.
    pub fn root(&self) -> Hash {
        self.root
    }

    /// The envelope exactly as received or written (without an HTTP seed's
    /// unsigned `urls`).
    pub fn envelope(&self) -> &[u8] {
        &self.envelope
    }
}

/// The signed body, its signature, and whether unsigned fields came along.
fn split_envelope(bytes: &[u8]) -> Result<(&RawValue, Signature, bool), Error> {
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(Error::BadManifest {
            reason: format!(
                "{} bytes, more than the {MAX_MANIFEST_BYTES}-byte limit",
                bytes.len()
            ),
        });
    }
    let env: Envelope<'_> = serde_json::from_slice(bytes).map_err(|e| Error::BadManifest {
        reason: format!("not a signed manifest envelope: {e}"),
    })?;
    Ok((env.manifest, env.signature, env.urls.is_some()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::chunk_hashes;
    use proptest::prelude::*;

    pub(crate) fn sample(key: &SecretKey, seq: u64) -> Manifest {
        let data = vec![7u8; 10_000];
        Manifest {
            format: FORMAT,
            channel: "stable".into(),
            arch: "x86_64".into(),
            sequence: seq,
            created: 1_700_000_000,
            publisher: key.public(),
            cmdline: Some("console=ttyS0 \"quoted arg\"".into()),
            artifacts: vec![Artifact {
                name: "kernel".into(),
                size: data.len() as u64,
                hash: Hash::of(&data),
                chunk_size: 4096,
                chunks: chunk_hashes(&data, 4096),
            }],
            seeds: vec!["http://127.0.0.1:8080".into()],
            peers: vec![],
        }
    }

    #[test]
    fn unsigned_urls_are_ignored_and_dropped() {
        let k = SecretKey::from_seed([5; 32]);
        let s = sample(&k, 3).sign(&k).unwrap();
        let with = with_urls(
            s.envelope(),
            [(
                "kernel",
                "http://10.0.0.1:8080/stable/x86_64/kernel".to_owned(),
            )],
        );
        let text = String::from_utf8(with.clone()).unwrap();
        assert!(
            text.contains(r#""urls":{"kernel":"http://10.0.0.1:8080/stable/x86_64/kernel"}"#),
            "{text}"
        );
        let v = SignedManifest::verify(&with, &k.public()).unwrap();
        assert_eq!(
            v.envelope(),
            s.envelope(),
            "the unsigned part does not travel on"
        );
        assert_eq!(v.root(), s.root());
        // Any other field is still refused.
        let other = String::from_utf8(s.envelope().to_vec())
            .unwrap()
            .trim_end()
            .trim_end_matches('}')
            .to_owned()
            + r#","extra":1}"#;
        assert!(SignedManifest::verify(other.as_bytes(), &k.public()).is_err());
    }

    #[test]
    fn sign_and_verify() {
        let k = SecretKey::from_seed([1; 32]);
        let s = sample(&k, 3).sign(&k).unwrap();
        let v = SignedManifest::verify(s.envelope(), &k.public()).unwrap();
        assert_eq!(v.manifest(), s.manifest());
        assert_eq!(v.root(), s.root());
    }

    #[test]
    fn wrong_key_is_refused() {
        let k = SecretKey::from_seed([1; 32]);
        let other = SecretKey::from_seed([2; 32]);
        let s = sample(&k, 3).sign(&k).unwrap();
        let e = SignedManifest::verify(s.envelope(), &other.public()).unwrap_err();
        assert!(matches!(e, Error::BadSignature { .. }), "{e}");
    }

    #[test]
    fn tampered_byte_is_refused() {
        let k = SecretKey::from_seed([1; 32]);
        let s = sample(&k, 3).sign(&k).unwrap();
        let text = String::from_utf8(s.envelope().to_vec()).unwrap();
        let tampered = text.replace("\"sequence\":3", "\"sequence\":4");
        assert_ne!(text, tampered);
        assert!(matches!(
            SignedManifest::verify(tampered.as_bytes(), &k.public()),
            Err(Error::BadSignature { .. })
        ));
        // Whitespace inside the signed value counts as tampering too.
        let spaced = text.replace("\"sequence\":3", "\"sequence\": 3");
        assert!(SignedManifest::verify(spaced.as_bytes(), &k.public()).is_err());
    }

    #[test]
    fn rollback_is_refused() {
        let k = SecretKey::from_seed([1; 32]);
        let s = sample(&k, 3).sign(&k).unwrap();
        assert!(s.check_not_older(None).is_ok());
        assert!(s.check_not_older(Some(3)).is_ok());
        assert!(matches!(
            s.check_not_older(Some(4)),
            Err(Error::Rollback {
                got: 3,
                seen: 4,
                ..
            })
        ));
    }

    #[test]
    fn inconsistent_chunk_list_is_refused() {
        let k = SecretKey::from_seed([1; 32]);
        let mut m = sample(&k, 1);
        m.artifacts[0].chunks.pop();
        assert!(matches!(m.sign(&k), Err(Error::BadManifest { .. })));
    }

    #[test]
    fn garbage_is_refused() {
        let k = SecretKey::from_seed([1; 32]);
        for bad in [
            &b""[..],
            b"{}",
            b"[1,2]",
            b"{\"manifest\":{},\"signature\":\"00\"}",
        ] {
            assert!(SignedManifest::verify(bad, &k.public()).is_err());
        }
    }

    fn arb_manifest() -> impl Strategy<Value = (u64, Option<String>, Vec<u8>, u32)> {
        (
            any::<u64>(),
            proptest::option::of(".{0,40}"),
            proptest::collection::vec(any::<u8>(), 0..20_000),
            prop_oneof![Just(4096u32), Just(8192), Just(65536)],
        )
    }

    proptest! {
        #[test]
        fn envelope_round_trip((seq, cmdline, data, cs) in arb_manifest()) {
            let k = SecretKey::from_seed([9; 32]);
            let mut m = sample(&k, seq);
            m.cmdline = cmdline;
            m.artifacts[0] = Artifact {
                name: "kernel".into(),
                size: data.len() as u64,
                hash: Hash::of(&data),
                chunk_size: cs,
                chunks: chunk_hashes(&data, cs),
            };
            let s = m.sign(&k).unwrap();
            let v = SignedManifest::verify(s.envelope(), &k.public()).unwrap();
            prop_assert_eq!(v.manifest(), &m);
        }

        #[test]
        fn verify_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let k = SecretKey::from_seed([9; 32]);
            let _ = SignedManifest::verify(&bytes, &k.public());
        }
    }
}
