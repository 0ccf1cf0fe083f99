//! Outbound HTTP: the one shared `reqwest` client (rustls with the ring provider, webpki roots,
//! timeouts, user agent), the URL policy every outbound request obeys, and the token-bucket rate
//! limiter the identity resolver and the PDS client share.
//!
//! Why a preconfigured rustls `ClientConfig`: the workspace also links aws-lc (through the AWS
//! SDK of batch-export), and with two providers compiled in rustls cannot pick one by itself.
//! Building the config with `builder_with_provider(ring)` makes this client independent of the
//! process-default provider (`install_crypto_provider`), so it works even where nothing installed
//! one (tests, `inspect`). reqwest is built with `rustls-tls-manual-roots-no-provider`: it brings
//! no provider and no roots of its own (check: `cargo tree -i aws-lc-rs -e features` shows only
//! the AWS SDK).
//!
//! URL policy ([`check_url`]): `https://` anywhere; plain `http://` only to this machine
//! (`localhost`, 127.0.0.0/8, `[::1]`: the tests and the local PDS of the end-to-end test).
//! URLs taken from strangers (did:web hosts, PDS endpoints in DID documents) must moreover not
//! point at this machine unless the caller allows it ([`check_remote_url`]). Redirects are not
//! followed: neither a PLC directory nor a PDS answering `getRepo` redirects, and following one
//! would let a document send us to a host the policy never checked.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Url;
use tokio::time::Instant;

/// `User-Agent` of every outbound request: operators of a PDS that sees our traffic can tell
/// who we are and find the project.
pub const USER_AGENT: &str = concat!(
    "firehose-writer/",
    env!("CARGO_PKG_VERSION"),
    " (research data capture; atproto sync)"
);

/// Settings of the shared client.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// TCP + TLS connect.
    pub connect_timeout: Duration,
    /// Longest wait for the next bytes of a response (per read, so a 1 GiB repo that keeps
    /// arriving never times out, and a stalled one does).
    pub read_timeout: Duration,
    pub user_agent: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            user_agent: USER_AGENT.to_owned(),
        }
    }
}

#[derive(thiserror::Error, Debug)]
pub enum NetError {
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("building the HTTP client: {0}")]
    Client(String),
}

/// The rustls client configuration: ring provider, Mozilla's roots (webpki-roots), TLS 1.2 and
/// 1.3.
pub fn tls_config() -> Result<rustls::ClientConfig, NetError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| NetError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// Builds the shared client. It is cheap to clone (one connection pool); build it once and hand
/// clones to the identity resolver and the PDS client.
pub fn build_client(config: &HttpConfig) -> Result<reqwest::Client, NetError> {
    reqwest::Client::builder()
        .use_preconfigured_tls(tls_config()?)
        .connect_timeout(config.connect_timeout)
        .read_timeout(config.read_timeout)
        .user_agent(config.user_agent.clone())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| NetError::Client(e.to_string()))
}

/// Why a URL is refused by [`check_url`].
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum UrlError {
    #[error("not a URL: {0}")]
    Invalid(String),
    #[error("plain http:// is only allowed to localhost, 127.0.0.1 or [::1]: {0}")]
    InsecureHttp(String),
    #[error("unsupported URL scheme {0:?} (https:// only)")]
    Scheme(String),
    #[error("URL has no host: {0}")]
    NoHost(String),
    #[error("URL carries credentials, a query or a fragment: {0}")]
    Extra(String),
    #[error("URL points at this machine (loopback not allowed here): {0}")]
    Loopback(String),
}

/// [`check_url`], and unless `allow_loopback`, refuses URLs that point at this machine: the
/// hosts in DID documents and did:web identifiers are chosen by strangers, and must not make
/// the writer send requests to its own services (`/metrics`, a local database's HTTP port).
/// Tests and the local end-to-end setup (PDS and PLC on localhost) allow it.
pub fn check_remote_url(url: &str, allow_loopback: bool) -> Result<Url, UrlError> {
    let parsed = check_url(url)?;
    if !allow_loopback && is_loopback(&parsed) {
        return Err(UrlError::Loopback(url.chars().take(128).collect()));
    }
    Ok(parsed)
}

/// Whether `url` points at this machine: `localhost` (or a name under `.localhost`), a
/// loopback address (127.0.0.0/8, `::1`) or the unspecified address (which Linux connects to
/// this machine). `Url` has already normalised numeric forms such as `127.1`.
pub fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(name)) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            name == "localhost" || name.ends_with(".localhost")
        }
        Some(url::Host::Ipv4(ip)) => ip.is_loopback() || ip.is_unspecified(),
        Some(url::Host::Ipv6(ip)) => {
            ip.is_loopback()
                || ip.is_unspecified()
                || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        None => false,
    }
}

/// Parses a base URL (PLC directory, PDS endpoint) and applies the policy: `https`, or `http`
/// to a loopback host; no credentials, query or fragment (we append paths and queries).
pub fn check_url(url: &str) -> Result<Url, UrlError> {
    let shown = || url.chars().take(128).collect::<String>();
    let parsed = Url::parse(url).map_err(|_| UrlError::Invalid(shown()))?;
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(UrlError::NoHost(shown()));
    }
    match parsed.scheme() {
        "https" => {}
        "http" if is_loopback(&parsed) => {}
        "http" => return Err(UrlError::InsecureHttp(shown())),
        other => return Err(UrlError::Scheme(other.chars().take(16).collect())),
    }
    if !parsed.username().is_empty()
        || parsed.password().is_some()
        || parsed.query().is_some()
        || parsed.fragment().is_some()
    {
        return Err(UrlError::Extra(shown()));
    }
    Ok(parsed)
}

/// The `host[:port]` key a URL's per-host limits are kept under.
pub fn host_key(url: &Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(host), Some(port)) => format!("{host}:{port}"),
        (Some(host), None) => host.to_owned(),
        (None, _) => String::new(),
    }
}

/// A token bucket: `rate` tokens per second, at most `burst` saved up. [`acquire`] takes a
/// token, waiting for it if there is none; waiters are served in the order they asked (each
/// reserves its slot at once: the balance may go negative and a waiter sleeps off its share), so
/// no caller starves. A rate that is not a positive finite number means "unlimited".
///
/// [`acquire`]: RateLimiter::acquire
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    /// (tokens, when they were counted).
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    pub fn new(rate: f64, burst: u32) -> RateLimiter {
        let burst = f64::from(burst.max(1));
        RateLimiter {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    fn unlimited(&self) -> bool {
        !(self.rate.is_finite() && self.rate > 0.0)
    }

    /// How long the caller must wait for the token it takes now.
    fn reserve(&self) -> Duration {
        if self.unlimited() {
            return Duration::ZERO;
        }
        // A poisoned lock only means another caller panicked mid-update of two numbers; the
        // numbers are still usable.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(state.1).as_secs_f64();
        state.0 = (state.0 + elapsed * self.rate).min(self.burst);
        state.1 = now;
        state.0 -= 1.0;
        if state.0 >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-state.0 / self.rate)
        }
    }

    /// Takes one token, sleeping until it is available.
    pub async fn acquire(&self) {
        let wait = self.reserve();
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Exponential backoff: `initial * 2^(attempt-1)`, capped at `max` (attempt 1 waits `initial`).
pub fn backoff_delay(initial: Duration, max: Duration, attempt: u32) -> Duration {
    let factor = 1u32
        .checked_shl(attempt.saturating_sub(1).min(30))
        .unwrap_or(u32::MAX);
    initial.saturating_mul(factor).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_policy() {
        assert!(check_url("https://plc.directory").is_ok());
        assert!(check_url("http://127.0.0.1:2582").is_ok());
        assert!(check_url("http://localhost:2582/").is_ok());
        assert!(check_url("http://[::1]:80").is_ok());
        assert_eq!(
            check_url("http://plc.example.com"),
            Err(UrlError::InsecureHttp("http://plc.example.com".into()))
        );
        assert!(matches!(
            check_url("ftp://example.com"),
            Err(UrlError::Scheme(_))
        ));
        assert!(matches!(
            check_url("https://u:p@example.com"),
            Err(UrlError::Extra(_))
        ));
        assert!(matches!(check_url("nonsense"), Err(UrlError::Invalid(_))));
        // A loopback name inside another host is not loopback.
        assert!(check_url("http://localhost.example.com").is_err());
        // Numeric spellings of loopback are loopback.
        assert!(check_url("http://127.1:80").is_ok());
        assert!(check_url("http://2130706433").is_ok());
        for url in [
            "https://localhost",
            "https://127.0.0.7:443",
            "https://[::1]",
            "https://0.0.0.0",
            "http://a.localhost",
            "https://[::ffff:127.0.0.1]",
        ] {
            assert!(
                matches!(check_remote_url(url, false), Err(UrlError::Loopback(_))),
                "{url}"
            );
            assert!(check_remote_url(url, true).is_ok(), "{url}");
        }
        assert!(check_remote_url("https://pds.example.com", false).is_ok());
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let s = Duration::from_secs;
        assert_eq!(backoff_delay(s(30), s(3600), 1), s(30));
        assert_eq!(backoff_delay(s(30), s(3600), 2), s(60));
        assert_eq!(backoff_delay(s(30), s(3600), 7), s(1920));
        assert_eq!(backoff_delay(s(30), s(3600), 8), s(3600));
        assert_eq!(backoff_delay(s(30), s(3600), u32::MAX), s(3600));
    }

    #[test]
    fn limiter_reserves_in_order() {
        let limiter = RateLimiter::new(10.0, 2);
        assert_eq!(limiter.reserve(), Duration::ZERO);
        assert_eq!(limiter.reserve(), Duration::ZERO);
        let third = limiter.reserve();
        let fourth = limiter.reserve();
        assert!(third > Duration::from_millis(50) && third <= Duration::from_millis(100));
        assert!(fourth > third);
        let unlimited = RateLimiter::new(0.0, 1);
        for _ in 0..100 {
            assert_eq!(unlimited.reserve(), Duration::ZERO);
        }
    }

    #[test]
    fn client_builds_without_a_process_provider() {
        assert!(build_client(&HttpConfig::default()).is_ok());
    }
}
