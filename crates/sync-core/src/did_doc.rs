//! DID documents: extracting what atproto needs (signing key, PDS endpoint, claimed handle) from a
//! resolved document, per <https://atproto.com/specs/did>.
//!
//! Only the signing key is required; a document without a usable PDS service or handle still
//! verifies signatures. Documents are hostile input: nothing here panics, and anything echoed back
//! in an error is truncated.

use std::collections::HashMap;

use serde_json::Value;

use crate::crypto::{KeyError, KeyType, PublicKey};
use crate::ids::{Did, IdError};

/// How much of a rejected string value is echoed back inside a [`DidDocError`].
const ECHO_MAX: usize = 64;

/// What atproto needs from a DID document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AtprotoIdentity {
    pub did: Did,
    /// The `#atproto` verification method: the key that signs repo commits.
    pub signing_key: PublicKey,
    /// The `#atproto_pds` service endpoint, if it is an http(s) URL.
    pub pds_endpoint: Option<String>,
    /// The first `at://` entry of `alsoKnownAs`, without the prefix. Informational only: it is
    /// not validated, and a handle is only trustworthy once it resolves back to this DID.
    pub handle: Option<String>,
}

#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum DidDocError {
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("{0} is not a JSON object")]
    NotObject(&'static str),
    #[error("DID document map key is not a DID: {0}")]
    MapKey(#[source] IdError),
    #[error("DID document has no string id")]
    MissingId,
    #[error("DID document id {found:?} is not the expected {expected:?}")]
    IdMismatch { expected: String, found: String },
    #[error("verificationMethod is not an array")]
    VerificationMethodNotArray,
    #[error("no #atproto verification method")]
    NoAtprotoKey,
    #[error("#atproto verification method has unsupported type {0:?}")]
    UnsupportedKeyType(String),
    #[error("#atproto verification method has no string publicKeyMultibase")]
    MissingPublicKey,
    #[error("#atproto verification method key: {0}")]
    Key(#[from] KeyError),
}

impl DidDocError {
    /// Short stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            DidDocError::Json(_) => "bad_json",
            DidDocError::NotObject(_) => "not_object",
            DidDocError::MapKey(_) => "bad_did",
            DidDocError::MissingId => "missing_id",
            DidDocError::IdMismatch { .. } => "id_mismatch",
            DidDocError::VerificationMethodNotArray => "bad_verification_method",
            DidDocError::NoAtprotoKey => "no_atproto_key",
            DidDocError::UnsupportedKeyType(_) => "unsupported_key_type",
            DidDocError::MissingPublicKey => "missing_public_key",
            DidDocError::Key(_) => "bad_key",
        }
    }
}

/// Parses a DID document (JSON). `id` must equal `expected`. The signing key is the first
/// verification method whose `id` is `#atproto` or `<did>#atproto`, of type `Multikey` (or one of
/// the legacy `EcdsaSecp256k1VerificationKey2019` / `EcdsaSecp256r1VerificationKey2019`). The PDS
/// is the first service whose `id` is `#atproto_pds` or `<did>#atproto_pds`, kept only if its type
/// is `AtprotoPersonalDataServer` and its `serviceEndpoint` an http(s) URL string.
pub fn parse_did_document(expected: &Did, doc: &Value) -> Result<AtprotoIdentity, DidDocError> {
    let doc = doc
        .as_object()
        .ok_or(DidDocError::NotObject("DID document"))?;
    let id = doc
        .get("id")
        .and_then(Value::as_str)
        .ok_or(DidDocError::MissingId)?;
    if id != expected.as_str() {
        return Err(DidDocError::IdMismatch {
            expected: echo(expected.as_str()),
            found: echo(id),
        });
    }

    let methods = match doc.get("verificationMethod") {
        None | Some(Value::Null) => return Err(DidDocError::NoAtprotoKey),
        Some(Value::Array(methods)) => methods,
        Some(_) => return Err(DidDocError::VerificationMethodNotArray),
    };
    let method = methods
        .iter()
        .find(|m| is_fragment(m.get("id"), expected, "#atproto"))
        .ok_or(DidDocError::NoAtprotoKey)?;
    let signing_key = parse_verification_method(method)?;

    let pds_endpoint = doc
        .get("service")
        .and_then(Value::as_array)
        .and_then(|services| {
            services
                .iter()
                .find(|s| is_fragment(s.get("id"), expected, "#atproto_pds"))
        })
        .filter(|s| s.get("type").and_then(Value::as_str) == Some("AtprotoPersonalDataServer"))
        .and_then(|s| s.get("serviceEndpoint"))
        .and_then(Value::as_str)
        .filter(|url| is_http_url(url))
        .map(str::to_owned);

    let handle = doc
        .get("alsoKnownAs")
        .and_then(Value::as_array)
        .and_then(|aka| {
            aka.iter()
                .filter_map(Value::as_str)
                .find_map(|s| s.strip_prefix("at://"))
        })
        .filter(|h| !h.is_empty())
        .map(str::to_owned);

    Ok(AtprotoIdentity {
        did: expected.clone(),
        signing_key,
        pds_endpoint,
        handle,
    })
}

/// Parses a JSON object mapping DID -> DID document (the format of `relay-capture/did_docs.json`)
/// into identities. A document that fails to parse is reported under its DID without affecting
/// the others; only input that is not such a map at all (bad JSON, not an object, a key that is
/// not a DID) fails the whole call.
pub fn parse_did_doc_map(
    json: &str,
) -> Result<HashMap<Did, Result<AtprotoIdentity, DidDocError>>, DidDocError> {
    let value: Value = serde_json::from_str(json).map_err(|e| DidDocError::Json(e.to_string()))?;
    let Value::Object(map) = value else {
        return Err(DidDocError::NotObject("DID document map"));
    };
    let mut out = HashMap::with_capacity(map.len());
    for (key, doc) in &map {
        let did = Did::parse(key).map_err(DidDocError::MapKey)?;
        let parsed = parse_did_document(&did, doc);
        out.insert(did, parsed);
    }
    Ok(out)
}

/// The key of one `#atproto` verification method.
fn parse_verification_method(method: &Value) -> Result<PublicKey, DidDocError> {
    let kind = method.get("type").and_then(Value::as_str).unwrap_or("");
    let multibase = || {
        method
            .get("publicKeyMultibase")
            .and_then(Value::as_str)
            .ok_or(DidDocError::MissingPublicKey)
    };
    let key = match kind {
        "Multikey" => PublicKey::from_multikey(multibase()?)?,
        "EcdsaSecp256k1VerificationKey2019" => {
            PublicKey::from_legacy_multibase(KeyType::K256, multibase()?)?
        }
        "EcdsaSecp256r1VerificationKey2019" => {
            PublicKey::from_legacy_multibase(KeyType::P256, multibase()?)?
        }
        other => return Err(DidDocError::UnsupportedKeyType(echo(other))),
    };
    Ok(key)
}

/// Whether `id` is `fragment` (relative) or `<did><fragment>` (absolute).
fn is_fragment(id: Option<&Value>, did: &Did, fragment: &str) -> bool {
    let Some(id) = id.and_then(Value::as_str) else {
        return false;
    };
    id == fragment || id.strip_prefix(did.as_str()) == Some(fragment)
}

/// A plausible `http://` or `https://` URL: non-empty host, and no whitespace, control or
/// non-ASCII characters (the endpoint is later used to build request URLs as-is).
fn is_http_url(url: &str) -> bool {
    let Some(rest) = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
    else {
        return false;
    };
    let host_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    host_end > 0 && rest.bytes().all(|b| b.is_ascii_graphic())
}

/// Copy of `s` for an error message, cut to about [`ECHO_MAX`] bytes so hostile inputs stay small.
fn echo(s: &str) -> String {
    if s.len() <= ECHO_MAX {
        return s.to_owned();
    }
    let mut end = ECHO_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…(+{} bytes)", &s[..end], s.len() - end)
}
