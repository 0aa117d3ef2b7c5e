//! Signing keys for DPoP proofs: the [`DpopSigner`] trait, the ES256 key and public JWKs.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use p256::pkcs8::DecodePrivateKey;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::BoxError;

/// Signs DPoP proofs: the JWS algorithm, the public key as a JWK, and the signature of a JWS
/// signing input (`base64url(header) "." base64url(claims)`).
///
/// [`Es256Key`] is the built-in implementation; implement this trait to keep the private key
/// in an HSM or a platform key store.
///
/// ```
/// use tower_auth_refresh::dpop::{DpopSigner, Es256Key};
///
/// let key = Es256Key::generate();
/// assert_eq!(key.algorithm(), "ES256");
/// let signature = key.sign(b"header.claims").unwrap();
/// assert_eq!(signature.len(), 64);
/// assert_eq!(key.public_jwk().thumbprint().len(), 43);
/// ```
pub trait DpopSigner: fmt::Debug + Send + Sync + 'static {
    /// The JWS `alg` of the signatures (`"ES256"`).
    fn algorithm(&self) -> &str;

    /// The public key, put in the `jwk` header of each proof.
    fn public_jwk(&self) -> &PublicJwk;

    /// The JWS signature of `signing_input` (for ES256: `r || s`, 64 bytes).
    ///
    /// # Errors
    ///
    /// Whatever keeps the key from signing (a key store that is unavailable); the request
    /// then fails unsent with [`ProofFailed`](crate::error::ProofFailed).
    fn sign(&self, signing_input: &[u8]) -> Result<Vec<u8>, BoxError>;
}

/// A public key as a JSON Web Key (RFC 7517), with its RFC 7638 thumbprint.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PublicJwk {
    /// An elliptic-curve key (`kty: EC`).
    Ec {
        /// The curve (`"P-256"`).
        crv: String,
        /// The x coordinate, base64url without padding.
        x: String,
        /// The y coordinate, base64url without padding.
        y: String,
    },
}

impl PublicJwk {
    /// The JWK as a JSON object (the required members only).
    pub fn to_json(&self) -> Value {
        let Self::Ec { crv, x, y } = self;
        let mut map = Map::new();
        map.insert("crv".into(), Value::String(crv.clone()));
        map.insert("kty".into(), Value::String("EC".into()));
        map.insert("x".into(), Value::String(x.clone()));
        map.insert("y".into(), Value::String(y.clone()));
        Value::Object(map)
    }

    /// The RFC 7638 thumbprint: base64url(SHA-256) of the required members in lexicographic
    /// order, without whitespace (the `jkt` a server binds a token to).
    ///
    /// ```
    /// use tower_auth_refresh::dpop::PublicJwk;
    ///
    /// // The P-256 key of RFC 7517 appendix A.1.
    /// let jwk = PublicJwk::Ec {
    ///     crv: "P-256".into(),
    ///     x: "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU".into(),
    ///     y: "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0".into(),
    /// };
    /// assert_eq!(jwk.thumbprint(), "oKIywvGUpTVTyxMQ3bwIIeQUudfr_CkLMjCE19ECD-U");
    /// ```
    pub fn thumbprint(&self) -> String {
        // serde_json keeps the map's keys sorted (no `preserve_order`) and writes compactly.
        let canonical = self.to_json().to_string();
        URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
    }
}

/// Why a key could not be read. Never carries key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DpopKeyError {
    /// The bytes are not a PKCS#8 DER P-256 private key.
    #[error("dpop: not a PKCS#8 DER P-256 private key")]
    Pkcs8,
    /// The text is not a JSON object.
    #[error("dpop: the JWK is not a JSON object")]
    JwkNotJson,
    /// A required JWK member is missing or not a string.
    #[error("dpop: the JWK has no string member {0:?}")]
    JwkMember(&'static str),
    /// The JWK is not an EC P-256 key.
    #[error("dpop: the JWK is not an EC P-256 key")]
    JwkCurve,
    /// The private scalar `d` is not a valid P-256 private key.
    #[error("dpop: the JWK's private key is invalid")]
    JwkPrivate,
    /// The JWK's `x`/`y` do not belong to its private key.
    #[error("dpop: the JWK's public key does not match its private key")]
    JwkMismatch,
}

/// An ES256 (ECDSA P-256 with SHA-256) DPoP key.
///
/// Its `Debug` shows the public key thumbprint only; the private key never appears in
/// `Debug`, `Display`, errors or traces.
///
/// ```
/// use tower_auth_refresh::dpop::{DpopSigner, Es256Key};
///
/// let key = Es256Key::generate();
/// let again = Es256Key::from_jwk(&key.to_private_jwk()).unwrap();
/// assert_eq!(again.public_jwk(), key.public_jwk());
/// assert!(format!("{key:?}").contains(&key.public_jwk().thumbprint()));
/// ```
#[derive(Clone)]
pub struct Es256Key {
    key: SigningKey,
    jwk: PublicJwk,
}

impl fmt::Debug for Es256Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Es256Key")
            .field("thumbprint", &self.jwk.thumbprint())
            .finish_non_exhaustive()
    }
}

impl Es256Key {
    /// A new random key from the operating system's generator.
    pub fn generate() -> Self {
        Self::from_signing_key(SigningKey::random(&mut rand_core::OsRng))
    }

    /// A key from a PKCS#8 DER private key (`openssl genpkey -algorithm EC -pkeyopt
    /// ec_paramgen_curve:P-256 -outform DER`).
    ///
    /// # Errors
    ///
    /// [`DpopKeyError::Pkcs8`] if `der` is not a P-256 PKCS#8 private key.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, DpopKeyError> {
        SigningKey::from_pkcs8_der(der)
            .map(Self::from_signing_key)
            .map_err(|_| DpopKeyError::Pkcs8)
    }

    /// A key from a private JWK (`{"kty":"EC","crv":"P-256","x":..,"y":..,"d":..}`).
    ///
    /// # Errors
    ///
    /// A [`DpopKeyError`] if the text is not such a JWK, or its `x`/`y` do not match `d`.
    pub fn from_jwk(jwk: &str) -> Result<Self, DpopKeyError> {
        let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(jwk) else {
            return Err(DpopKeyError::JwkNotJson);
        };
        let member = |name: &'static str| match fields.get(name) {
            Some(Value::String(s)) => Ok(s.as_str()),
            _ => Err(DpopKeyError::JwkMember(name)),
        };
        if member("kty")? != "EC" || member("crv")? != "P-256" {
            return Err(DpopKeyError::JwkCurve);
        }
        let d = URL_SAFE_NO_PAD
            .decode(member("d")?)
            .map_err(|_| DpopKeyError::JwkPrivate)?;
        let key = SigningKey::from_slice(&d).map_err(|_| DpopKeyError::JwkPrivate)?;
        let key = Self::from_signing_key(key);
        let PublicJwk::Ec { x, y, .. } = &key.jwk;
        if member("x")? != x || member("y")? != y {
            return Err(DpopKeyError::JwkMismatch);
        }
        Ok(key)
    }

    /// The private key as a JWK, to keep it between runs. This text is the secret: store
    /// it like one.
    pub fn to_private_jwk(&self) -> String {
        let mut json = self.jwk.to_json();
        if let Value::Object(map) = &mut json {
            map.insert(
                "d".into(),
                Value::String(URL_SAFE_NO_PAD.encode(self.key.to_bytes())),
            );
        }
        json.to_string()
    }

    /// The public key, to verify proofs.
    pub fn verifying_key(&self) -> VerifyingKey {
        *self.key.verifying_key()
    }

    fn from_signing_key(key: SigningKey) -> Self {
        let point = key.verifying_key().to_encoded_point(false);
        let coordinate = |c: Option<&p256::FieldBytes>| {
            URL_SAFE_NO_PAD.encode(c.map(|c| &c[..]).unwrap_or_default())
        };
        let jwk = PublicJwk::Ec {
            crv: "P-256".into(),
            x: coordinate(point.x()),
            y: coordinate(point.y()),
        };
        Self { key, jwk }
    }
}

impl DpopSigner for Es256Key {
    fn algorithm(&self) -> &str {
        "ES256"
    }

    fn public_jwk(&self) -> &PublicJwk {
        &self.jwk
    }

    fn sign(&self, signing_input: &[u8]) -> Result<Vec<u8>, BoxError> {
        let signature: Signature = self.key.try_sign(signing_input)?;
        Ok(signature.to_bytes().to_vec())
    }
}
