//! Registry authentication: `WWW-Authenticate` challenges, basic auth, and bearer tokens from the realm
//! named by the challenge (distribution's token protocol), with a token cache keyed by scope set.
//!
//! Scopes: pushing needs `repository:<target>:pull,push`; a cross-repo mount also needs
//! `repository:<source>:pull` in the *same* token, because the registry checks both on one request.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::header::{HeaderMap, HeaderValue, WWW_AUTHENTICATE};
use serde::Deserialize;
use tokio::sync::Mutex;
use url::Url;

use super::credentials::{Credential, Resolved};
use super::error::error_from_response;
use super::error::{RegistryError, Secret};

/// A parsed `WWW-Authenticate` challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parse the first Basic or Bearer challenge of a `WWW-Authenticate` value:
/// `Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:a:pull,push"`.
/// Quoted values may contain commas (scopes do), so this is a small tokenizer, not a split.
pub(crate) fn parse_challenge(value: &str) -> Option<Challenge> {
    let value = value.trim();
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let params = parse_params(rest);
    let get = |k: &str| {
        params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    if scheme.eq_ignore_ascii_case("basic") {
        Some(Challenge::Basic)
    } else if scheme.eq_ignore_ascii_case("bearer") {
        Some(Challenge::Bearer {
            realm: get("realm")?,
            service: get("service"),
            scope: get("scope"),
        })
    } else {
        None
    }
}

fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let name: String =
            std::iter::from_fn(|| chars.next_if(|c| *c != '=' && *c != ',')).collect();
        if name.is_empty() || chars.next() != Some('=') {
            return out;
        }
        let mut val = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => val.extend(chars.next()),
                    '"' => break,
                    c => val.push(c),
                }
            }
        } else {
            val = std::iter::from_fn(|| chars.next_if(|c| *c != ','))
                .collect::<String>()
                .trim()
                .to_string();
        }
        out.push((name.trim().to_string(), val));
    }
}

/// How this registry wants to be authenticated, learnt from `/v2/` or from a 401.
#[derive(Clone, Debug)]
enum Scheme {
    /// `/v2/` answered 200: send nothing.
    None,
    Basic,
    Bearer {
        realm: Url,
        service: Option<String>,
    },
}

struct Token {
    value: Secret,
    /// Some time before expiry (see `EXPIRY_MARGIN`).
    refresh_at: Instant,
}

struct State {
    scheme: Scheme,
    tokens: HashMap<String, Token>,
}

pub(crate) struct Authenticator {
    http: reqwest::Client,
    resolved: Resolved,
    state: Mutex<State>,
    /// Deadline of a token request.
    timeout: Duration,
    /// The registry's API root: an HTTPS registry's realm must be HTTPS too.
    registry: Url,
}

/// distribution's default when a token response has no `expires_in`.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Refresh this long before expiry (at most half the lifetime) so a token does not lapse mid-PATCH.
const EXPIRY_MARGIN: Duration = Duration::from_secs(30);

#[derive(Deserialize)]
struct TokenReply {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

impl Authenticator {
    pub(crate) fn new(
        http: reqwest::Client,
        resolved: Resolved,
        timeout: Duration,
        registry: Url,
    ) -> Authenticator {
        Authenticator {
            http,
            resolved,
            state: Mutex::new(State {
                scheme: Scheme::None,
                tokens: HashMap::new(),
            }),
            timeout,
            registry,
        }
    }

    /// Where the credential came from, for hints.
    pub(crate) fn source(&self) -> &str {
        &self.resolved.source
    }

    pub(crate) fn is_anonymous(&self) -> bool {
        self.resolved.credential == Credential::Anonymous
    }

    /// Learn the scheme from a 401's challenge. Returns false when there is no usable challenge; an
    /// error for a plain-HTTP realm named by an HTTPS registry (credentials would travel unencrypted).
    pub(crate) async fn learn(
        &self,
        headers: &HeaderMap,
        scopes: &[String],
    ) -> Result<bool, RegistryError> {
        let challenge = headers
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(parse_challenge);
        let scheme = match challenge {
            Some(Challenge::Basic) => Scheme::Basic,
            Some(Challenge::Bearer { realm, service, .. }) => match Url::parse(&realm) {
                Ok(realm) => {
                    self.refuse_plain_realm(&realm)?;
                    Scheme::Bearer { realm, service }
                }
                Err(_) => return Ok(false),
            },
            None => return Ok(false),
        };
        let mut st = self.state.lock().await;
        st.scheme = scheme;
        // The token for these scopes was refused (expired, revoked, or too narrow): fetch a new one.
        st.tokens.remove(&scopes.join(" "));
        Ok(true)
    }

    fn refuse_plain_realm(&self, realm: &Url) -> Result<(), RegistryError> {
        if self.registry.scheme() == "https" && realm.scheme() != "https" {
            return Err(RegistryError::protocol(
                "GET",
                realm,
                format!(
                    "{} names a plain-HTTP token service; refusing to send credentials unencrypted",
                    super::error::host_port(&self.registry)
                ),
            ));
        }
        Ok(())
    }

    /// The `Authorization` value for a request needing `scopes`, fetching a token when needed.
    pub(crate) async fn authorization(
        &self,
        scopes: &[String],
    ) -> Result<Option<HeaderValue>, RegistryError> {
        let key = scopes.join(" ");
        // The lock is held only to read and write the cache: a slow token service must not stall
        // every other transfer (two tasks may then fetch the same token once; harmless).
        let (realm, service) = {
            let st = self.state.lock().await;
            match (&st.scheme, &self.resolved.credential) {
                (_, Credential::RegistryToken(t)) => {
                    return header(format!("Bearer {}", t.expose()))
                }
                (Scheme::None, _) => return Ok(None),
                (Scheme::Basic, Credential::Basic { username, password }) => {
                    return header(basic(username, password))
                }
                (Scheme::Basic, _) => return Ok(None),
                (Scheme::Bearer { realm, service }, _) => {
                    let fresh = st
                        .tokens
                        .get(&key)
                        .filter(|t| t.refresh_at > Instant::now());
                    if let Some(t) = fresh {
                        return header(format!("Bearer {}", t.value.expose()));
                    }
                    (realm.clone(), service.clone())
                }
            }
        };
        let t = self.fetch_token(&realm, service.as_deref(), scopes).await?;
        let value = format!("Bearer {}", t.value.expose());
        self.state.lock().await.tokens.insert(key, t);
        header(value)
    }
}

impl Authenticator {
    async fn fetch_token(
        &self,
        realm: &Url,
        service: Option<&str>,
        scopes: &[String],
    ) -> Result<Token, RegistryError> {
        let (method, resp) = match &self.resolved.credential {
            Credential::IdentityToken { username, token } => {
                let resp = self.oauth_refresh(realm, service, scopes, token).await?;
                // Registries without the OAuth2 POST endpoint take the identity token as a password
                // on the classic GET (containerd falls back the same way): 404/405, and Artifactory
                // and ACR answer 400/401.
                if matches!(resp.status().as_u16(), 400 | 401 | 404 | 405) {
                    (
                        "GET",
                        self.token_get(realm, service, scopes, Some((username, token)))
                            .await?,
                    )
                } else {
                    ("POST", resp)
                }
            }
            Credential::Basic { username, password } => (
                "GET",
                self.token_get(realm, service, scopes, Some((username, password)))
                    .await?,
            ),
            _ => ("GET", self.token_get(realm, service, scopes, None).await?),
        };
        let url = resp.url().clone();
        if !resp.status().is_success() {
            let hint = match resp.status().as_u16() {
                401 | 403 => self.rejected_hint(realm),
                n => format!(
                    "the token service at {} answered HTTP {n}",
                    super::error::host_port(realm)
                ),
            };
            return Err(error_from_response(method, &url, resp, Some(hint)).await);
        }
        token_from(method, &url, resp).await
    }
}

/// The token in a token service's successful answer, valid until a margin before it expires.
async fn token_from(
    method: &str,
    url: &Url,
    resp: reqwest::Response,
) -> Result<Token, RegistryError> {
    let reply: TokenReply = resp.json().await.map_err(|_| {
        RegistryError::protocol(
            method,
            url,
            "the token service answered without a JSON token",
        )
    })?;
    let value = reply.token.or(reply.access_token).filter(|t| !t.is_empty());
    let value = value.ok_or_else(|| {
        RegistryError::protocol(method, url, "the token service answered without a token")
    })?;
    let life = reply
        .expires_in
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_TOKEN_LIFETIME);
    let margin = EXPIRY_MARGIN.min(life / 2);
    Ok(Token {
        value: Secret::new(value),
        refresh_at: Instant::now() + life - margin,
    })
}

impl Authenticator {
    pub(crate) fn rejected_hint(&self, at: &Url) -> String {
        let host = super::error::host_port(at);
        if self.is_anonymous() {
            format!(
                "{host} wants credentials and none were found ({}): add them to --registry-config",
                self.source()
            )
        } else {
            format!(
                "{host} rejected the credentials from {}: check credentials in --registry-config",
                self.source()
            )
        }
    }

    async fn token_get(
        &self,
        realm: &Url,
        service: Option<&str>,
        scopes: &[String],
        basic_auth: Option<(&String, &Secret)>,
    ) -> Result<reqwest::Response, RegistryError> {
        let mut url = realm.clone();
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            for s in scopes {
                q.append_pair("scope", s);
            }
            if let Some((user, _)) = basic_auth {
                q.append_pair("account", user);
            }
        }
        let mut req = self.http.get(url.clone());
        if let Some((user, pass)) = basic_auth {
            let mut hv = HeaderValue::from_str(&basic(user, pass))
                .map_err(|_| RegistryError::Config("bad credential characters".into()))?;
            hv.set_sensitive(true);
            req = req.header(reqwest::header::AUTHORIZATION, hv);
        }
        req.timeout(self.timeout)
            .send()
            .await
            .map_err(|e| RegistryError::transport("GET", &url, e))
    }

    /// OAuth2 refresh-token grant (docker's identity tokens).
    async fn oauth_refresh(
        &self,
        realm: &Url,
        service: Option<&str>,
        scopes: &[String],
        token: &Secret,
    ) -> Result<reqwest::Response, RegistryError> {
        // Built in its own scope: the serializer is not Send and must not live across the await.
        let body = {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "refresh_token")
                .append_pair("refresh_token", token.expose())
                .append_pair("client_id", "committer")
                .append_pair("scope", &scopes.join(" "));
            if let Some(s) = service {
                form.append_pair("service", s);
            }
            form.finish()
        };
        self.http
            .post(realm.clone())
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body)
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| RegistryError::transport("POST", realm, e))
    }
}

/// A sensitive `Authorization` value (never printed by reqwest's Debug).
fn header(value: String) -> Result<Option<HeaderValue>, RegistryError> {
    let mut hv = HeaderValue::from_str(&value).map_err(|_| {
        RegistryError::Config(
            "the credential contains characters not allowed in an HTTP header".into(),
        )
    })?;
    hv.set_sensitive(true);
    Ok(Some(hv))
}

fn basic(user: &str, pass: &Secret) -> String {
    let raw = format!("{user}:{}", pass.expose());
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// `repository:NAME:ACTIONS`
pub(crate) fn repo_scope(repository: &str, actions: &str) -> String {
    format!("repository:{repository}:{actions}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_with_commas_in_scope() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:a/b:pull,push",error="insufficient_scope""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:a/b:pull,push".into()),
            })
        );
    }

    #[tokio::test]
    async fn an_https_registry_naming_a_plain_http_realm_is_refused() {
        let resolved = Resolved {
            credential: Credential::Anonymous,
            source: "test".into(),
        };
        let registry = Url::parse("https://r.example/v2/").unwrap();
        let auth = Authenticator::new(
            reqwest::Client::new(),
            resolved,
            Duration::from_secs(1),
            registry,
        );
        let mut headers = HeaderMap::new();
        let challenge = r#"Bearer realm="http://auth.example/token",service="r""#;
        headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
        let e = auth.learn(&headers, &[]).await.unwrap_err();
        assert!(e.to_string().contains("plain-HTTP token service"), "{e}");
        let ok = r#"Bearer realm="https://auth.example/token",service="r""#;
        headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static(ok));
        assert!(auth.learn(&headers, &[]).await.unwrap());
    }

    #[test]
    fn parses_basic_and_rejects_unknown() {
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate abc"), None);
        assert_eq!(parse_challenge("Bearer service=x"), None);
    }
}
