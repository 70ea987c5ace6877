//! Who is calling: authentication only. A request proves who it is with a bearer token
//! (`authorization: Bearer …`, looked up by its SHA-256 digest in the tokens file) or with a
//! TLS client certificate (mTLS) whose subject common name is an instance id. What a caller
//! may then do is decided in one place, `repository::access`.
//!
//! The tokens file is TOML and holds digests, never tokens:
//!
//! ```toml
//! admin = ["<sha256 hex>"]            # operators: may do everything
//!
//! [instances]
//! global = ["<sha256 hex>"]           # one or more tokens per instance (for rotation)
//! project-a = "<sha256 hex>"
//! ```

use std::{collections::HashMap, fmt, path::Path, sync::Arc};

use anyhow::{Context, bail};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tonic::{Request, Status, service::Interceptor};

use crate::{domain::limits, error::Error};

/// The identity a request was authenticated as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The server runs without authentication: everything is allowed.
    Open,
    /// An operator's admin token: everything is allowed.
    Admin,
    /// A Hopper instance, by its id.
    Instance(String),
}

impl Caller {
    /// The key under which a create request's `request_id` is remembered: every caller has
    /// its own, so that one caller can neither take nor replay another's request ids. Ids
    /// cannot contain `/`, so the keys of different callers never meet.
    pub(crate) fn request_key(&self, request_id: String) -> String {
        match self {
            Self::Open => request_id,
            Self::Admin => format!("admin/{request_id}"),
            Self::Instance(me) => format!("instance/{me}/{request_id}"),
        }
    }

    /// The caller stored in the request by [`Authenticator`]. A request that did not pass
    /// through it has no identity and is refused.
    pub fn of<T>(request: &Request<T>) -> Result<Self, Error> {
        request
            .extensions()
            .get::<Self>()
            .cloned()
            .ok_or_else(|| Error::Unauthenticated("the request carries no identity".into()))
    }
}

/// SHA-256 digest of a token.
type Digest256 = [u8; 32];

/// The tokens file, as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    admin: Digests,
    #[serde(default)]
    instances: HashMap<String, Digests>,
}

/// One digest or a list of them.
#[derive(Deserialize)]
#[serde(untagged)]
enum Digests {
    One(String),
    Many(Vec<String>),
}

impl Default for Digests {
    fn default() -> Self {
        Self::Many(Vec::new())
    }
}

impl Digests {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(digest) => vec![digest],
            Self::Many(digests) => digests,
        }
    }
}

/// Known tokens by digest.
#[derive(Clone, Default)]
pub struct Tokens {
    by_digest: HashMap<Digest256, Caller>,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tokens({} known)", self.by_digest.len())
    }
}

impl Tokens {
    /// Reads and checks a tokens file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("could not read the tokens file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("bad tokens file {}", path.display()))
    }

    /// Parses the TOML of a tokens file. Every digest must be 64 hex digits and name one
    /// caller, every instance id must be a valid id, and there must be at least one token.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let file: TokensFile = toml::from_str(text)?;
        let mut tokens = Self::default();
        let admin = file
            .admin
            .into_vec()
            .into_iter()
            .map(|d| (d, Caller::Admin));
        let instances = file.instances.into_iter().flat_map(|(id, digests)| {
            let caller = Caller::Instance(id);
            digests
                .into_vec()
                .into_iter()
                .map(move |d| (d, caller.clone()))
        });
        for (digest, caller) in admin.chain(instances) {
            if let Caller::Instance(id) = &caller {
                limits::id("instances", id).map_err(|e| anyhow::anyhow!("instance {id:?}: {e}"))?;
            }
            let Some(bytes) = decode_hex(&digest) else {
                bail!("{digest:?} is not a SHA-256 digest (64 hex digits)");
            };
            if let Some(other) = tokens.by_digest.insert(bytes, caller.clone()) {
                bail!("digest {digest} is given to both {other:?} and {caller:?}");
            }
        }
        if tokens.by_digest.is_empty() {
            bail!("it defines no tokens");
        }
        Ok(tokens)
    }

    /// Who this token belongs to.
    fn caller(&self, token: &str) -> Option<&Caller> {
        self.by_digest.get(&sha256(token))
    }
}

/// The SHA-256 digest of a token.
fn sha256(token: &str) -> Digest256 {
    Sha256::digest(token.as_bytes()).into()
}

/// The lowercase hex SHA-256 digest of a token, as the tokens file wants it.
pub fn digest_hex(token: &str) -> String {
    sha256(token).iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hex(hex: &str) -> Option<Digest256> {
    let hex = hex.as_bytes();
    // from_str_radix alone would take a sign ("+f").
    if hex.len() != 64 || !hex.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let mut out = [0; 32];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

/// Identifies every request to the Hopper services and stores its [`Caller`] in the request
/// extensions; UNAUTHENTICATED if it cannot. Without tokens and certificates, every caller is
/// [`Caller::Open`].
#[derive(Debug, Clone, Default)]
pub struct Authenticator {
    tokens: Option<Arc<Tokens>>,
    certificates: bool,
}

impl Authenticator {
    /// No authentication: everyone may do everything.
    pub fn open() -> Self {
        Self::default()
    }

    /// Authentication by `tokens`, and by client certificates if `certificates` (the server's
    /// TLS then verifies them against a client CA).
    pub fn new(tokens: Option<Tokens>, certificates: bool) -> Self {
        Self {
            tokens: tokens.map(Arc::new),
            certificates,
        }
    }

    /// Whether requests go unauthenticated.
    pub(crate) fn is_open(&self) -> bool {
        self.tokens.is_none() && !self.certificates
    }

    /// Who sent `request`.
    pub(crate) fn identify<T>(&self, request: &Request<T>) -> Result<Caller, Error> {
        if self.is_open() {
            return Ok(Caller::Open);
        }
        let by_token = self.token_caller(request)?;
        let by_certificate = if self.certificates {
            certificate_caller(request)?
        } else {
            None
        };
        match (by_token, by_certificate) {
            (Some(Caller::Instance(token)), Some(Caller::Instance(cert))) if token != cert => {
                Err(Error::Unauthenticated(format!(
                    "the bearer token belongs to instance {token} but the client certificate \
                     names instance {cert}"
                )))
            }
            (Some(caller), _) | (None, Some(caller)) => Ok(caller),
            (None, None) => Err(Error::Unauthenticated(if self.certificates {
                "no credentials: send `authorization: Bearer <token>` metadata or a client \
                 certificate"
                    .into()
            } else {
                "no credentials: send `authorization: Bearer <token>` metadata".into()
            })),
        }
    }

    fn token_caller<T>(&self, request: &Request<T>) -> Result<Option<Caller>, Error> {
        let Some(value) = request.metadata().get("authorization") else {
            return Ok(None);
        };
        let malformed = || Error::Unauthenticated("authorization must be `Bearer <token>`".into());
        let value = value.to_str().map_err(|_| malformed())?;
        let (scheme, token) = value.split_once(' ').ok_or_else(malformed)?;
        let token = token.trim();
        if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
            return Err(malformed());
        }
        let Some(tokens) = &self.tokens else {
            return Err(Error::Unauthenticated(
                "this server takes client certificates, not bearer tokens".into(),
            ));
        };
        tokens
            .caller(token)
            .cloned()
            .map(Some)
            .ok_or_else(|| Error::Unauthenticated("unknown bearer token".into()))
    }
}

/// The instance a verified client certificate names in its subject common name.
fn certificate_caller<T>(request: &Request<T>) -> Result<Option<Caller>, Error> {
    let Some(chain) = request.peer_certs() else {
        return Ok(None);
    };
    let Some(leaf) = chain.first() else {
        return Ok(None);
    };
    let unnamed =
        || Error::Unauthenticated("the client certificate names no instance (subject CN)".into());
    let (_, certificate) =
        x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|_| unnamed())?;
    // Exactly one common name: with two, which instance is meant would be a guess.
    let mut names = certificate.subject().iter_common_name();
    let name = match (names.next(), names.next()) {
        (Some(cn), None) => cn.as_str().map_err(|_| unnamed())?,
        (Some(_), Some(_)) => {
            return Err(Error::Unauthenticated(
                "the client certificate has more than one common name".into(),
            ));
        }
        (None, _) => return Err(unnamed()),
    };
    limits::id("certificate common name", name).map_err(|_| {
        Error::Unauthenticated(format!(
            "the client certificate's common name {name:?} is not an instance id"
        ))
    })?;
    Ok(Some(Caller::Instance(name.to_owned())))
}

impl Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = self.identify(&request)?;
        let name = match &caller {
            Caller::Open => "open",
            Caller::Admin => "admin",
            Caller::Instance(id) => id,
        };
        tracing::Span::current().record("caller", name);
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_token(value: &str) -> Request<()> {
        let mut request = Request::new(());
        request
            .metadata_mut()
            .insert("authorization", value.parse().unwrap());
        request
    }

    fn tokens() -> Tokens {
        Tokens::parse(&format!(
            "admin = [{:?}]\n[instances]\nglobal = {:?}\norch-1 = [{:?}, {:?}]\n",
            digest_hex("root-secret"),
            digest_hex("g-secret"),
            digest_hex("o-old"),
            digest_hex("o-new"),
        ))
        .unwrap()
    }

    #[test]
    fn tokens_name_their_callers() {
        let auth = Authenticator::new(Some(tokens()), false);
        let who = |value: &str| auth.identify(&with_token(value));
        assert_eq!(who("Bearer root-secret"), Ok(Caller::Admin));
        assert_eq!(
            who("bearer g-secret"),
            Ok(Caller::Instance("global".into()))
        );
        assert_eq!(who("Bearer o-old"), Ok(Caller::Instance("orch-1".into())));
        assert_eq!(who("Bearer o-new"), Ok(Caller::Instance("orch-1".into())));
        for bad in ["Bearer nope", "Bearer ", "Basic abc", "g-secret"] {
            assert!(matches!(who(bad), Err(Error::Unauthenticated(_))), "{bad}");
        }
        let missing = auth.identify(&Request::new(())).unwrap_err();
        assert!(missing.to_string().contains("no credentials"), "{missing}");
    }

    #[test]
    fn an_open_server_lets_everyone_in() {
        let auth = Authenticator::open();
        assert!(auth.is_open());
        assert_eq!(auth.identify(&Request::new(())), Ok(Caller::Open));
        assert_eq!(auth.identify(&with_token("Bearer x")), Ok(Caller::Open));
    }

    #[test]
    fn a_certificate_only_server_refuses_tokens_and_anonymous_calls() {
        let auth = Authenticator::new(None, true);
        let err = auth.identify(&with_token("Bearer x")).unwrap_err();
        assert!(err.to_string().contains("client certificates"), "{err}");
        let err = auth.identify(&Request::new(())).unwrap_err();
        assert!(err.to_string().contains("client certificate"), "{err}");
    }

    #[test]
    fn the_interceptor_stores_the_caller() {
        let mut auth = Authenticator::new(Some(tokens()), false);
        let request = auth.call(with_token("Bearer g-secret")).unwrap();
        assert_eq!(Caller::of(&request), Ok(Caller::Instance("global".into())));
        let status = auth.call(Request::new(())).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert!(Caller::of(&Request::new(())).is_err());
    }

    #[test]
    fn bad_tokens_files_are_refused_with_the_reason() {
        let g = digest_hex("g");
        for (text, reason) in [
            ("", "defines no tokens"),
            ("admin = [\"abc\"]", "not a SHA-256 digest"),
            (&format!("admin = {g:?}\n[instances]\nx = {g:?}"), "both"),
            (&format!("[instances]\n\"bad id!\" = {g:?}"), "bad id!"),
            (&format!("admins = [{g:?}]"), "unknown field"),
        ] {
            let err = format!("{:#}", Tokens::parse(text).unwrap_err());
            assert!(err.contains(reason), "{text}: {err}");
        }
        let dir = tempfile::tempdir().unwrap();
        let err = Tokens::load(&dir.path().join("missing.toml")).unwrap_err();
        assert!(format!("{err:#}").contains("could not read"), "{err:#}");
    }

    #[test]
    fn digests_are_lowercase_hex() {
        assert_eq!(
            digest_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            decode_hex(&digest_hex("abc").to_uppercase()),
            Some(sha256("abc"))
        );
        assert_eq!(decode_hex(&"zz".repeat(32)), None);
        assert_eq!(decode_hex(&"+f".repeat(32)), None);
    }
}
