//! Publisher keys: ed25519, with one text form used everywhere.
//!
//! A public key is written as 64 lowercase hex digits: on the kernel command
//! line (`phase.pubkey=`), after `--pubkey`, in manifests and in logs. A key
//! file holds the 32-byte secret seed as 64 hex digits and a newline.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::str::FromStr;

use ed25519_dalek::{Signer, Verifier};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::Error;

/// Domain separation: a signature over a manifest can never be mistaken for
/// a signature over anything else made with the same key.
const MANIFEST_CONTEXT: &[u8] = b"phase-manifest-v1\0";

/// A publisher's public key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(ed25519_dalek::VerifyingKey);

/// A publisher's secret key.
pub struct SecretKey(ed25519_dalek::SigningKey);

/// A detached ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(ed25519_dalek::Signature);

impl SecretKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Self {
        SecretKey(ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng))
    }

    /// The key for a 32-byte seed.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        SecretKey(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    /// The 32-byte seed (secret).
    pub fn seed(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// Signs manifest bytes (with the manifest context prefix).
    pub fn sign_manifest(&self, bytes: &[u8]) -> Signature {
        let mut msg = Vec::with_capacity(MANIFEST_CONTEXT.len() + bytes.len());
        msg.extend_from_slice(MANIFEST_CONTEXT);
        msg.extend_from_slice(bytes);
        Signature(self.0.sign(&msg))
    }

    /// Reads a key file written by [`SecretKey::write_new`].
    pub fn read(path: &Path) -> Result<Self, Error> {
        let text = fs::read_to_string(path).map_err(|source| Error::Io {
            what: "read key file",
            path: path.to_owned(),
            source,
        })?;
        let mut seed = [0u8; 32];
        let t = text.trim();
        if t.len() != 64 || hex::decode_to_slice(t, &mut seed).is_err() {
            return Err(Error::BadKeyFile {
                path: path.to_owned(),
            });
        }
        Ok(Self::from_seed(seed))
    }

    /// Writes this key to a new file with mode 0600, refusing to overwrite.
    ///
    /// The file appears complete or not at all: it is written beside its
    /// final name and linked into place.
    pub fn write_new(&self, path: &Path) -> Result<(), Error> {
        let io = |what, source| Error::Io {
            what,
            path: path.to_owned(),
            source,
        };
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let mut tmp = tempfile::Builder::new()
            .prefix(".key-")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .tempfile_in(dir)
            .map_err(|e| io("create key file", e))?;
        writeln!(tmp, "{}", hex::encode(self.seed())).map_err(|e| io("write key file", e))?;
        tmp.as_file()
            .sync_all()
            .map_err(|e| io("sync key file", e))?;
        tmp.persist_noclobber(path)
            .map_err(|e| io("create key file", e.error))?;
        Ok(())
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(public {})", self.public())
    }
}

impl PublicKey {
    /// Verifies a manifest signature made by [`SecretKey::sign_manifest`].
    pub fn verify_manifest(&self, bytes: &[u8], sig: &Signature) -> bool {
        let mut msg = Vec::with_capacity(MANIFEST_CONTEXT.len() + bytes.len());
        msg.extend_from_slice(MANIFEST_CONTEXT);
        msg.extend_from_slice(bytes);
        self.0.verify(&msg, &sig.0).is_ok()
    }

    /// The raw 32 bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }
}

/// Why a string is not a key or signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid {what} (want {digits} hex digits): {input:?}")]
pub struct ParseKeyError {
    what: &'static str,
    digits: usize,
    input: String,
}

impl FromStr for PublicKey {
    type Err = ParseKeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseKeyError {
            what: "ed25519 public key",
            digits: 64,
            input: s.chars().take(80).collect(),
        };
        let mut b = [0u8; 32];
        if s.len() != 64 {
            return Err(err());
        }
        hex::decode_to_slice(s, &mut b).map_err(|_| err())?;
        ed25519_dalek::VerifyingKey::from_bytes(&b)
            .map(PublicKey)
            .map_err(|_| err())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0.to_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for Signature {
    type Err = ParseKeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut b = [0u8; 64];
        if s.len() != 128 || hex::decode_to_slice(s, &mut b).is_err() {
            return Err(ParseKeyError {
                what: "ed25519 signature",
                digits: 128,
                input: s.chars().take(80).collect(),
            });
        }
        Ok(Signature(ed25519_dalek::Signature::from_bytes(&b)))
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0.to_bytes()))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({self})")
    }
}

macro_rules! text_serde {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
text_serde!(PublicKey);
text_serde!(Signature);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn sign_verify_round_trip(seed in any::<[u8; 32]>(), msg in proptest::collection::vec(any::<u8>(), 0..512)) {
            let k = SecretKey::from_seed(seed);
            let sig = k.sign_manifest(&msg);
            let pk: PublicKey = k.public().to_string().parse().unwrap();
            let sig2: Signature = sig.to_string().parse().unwrap();
            prop_assert!(pk.verify_manifest(&msg, &sig2));
            let mut bad = msg.clone();
            bad.push(0);
            prop_assert!(!pk.verify_manifest(&bad, &sig2));
        }
    }

    #[test]
    fn key_file_is_private_and_not_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let k = SecretKey::generate();
        k.write_new(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(SecretKey::read(&path).unwrap().public(), k.public());
        assert!(SecretKey::generate().write_new(&path).is_err());
        assert_eq!(SecretKey::read(&path).unwrap().public(), k.public());
    }
}
