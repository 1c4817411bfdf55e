//! A small token service for a registry started with `auth: token`: GET with basic auth (the classic
//! docker flow) and POST `grant_type=refresh_token` (identity tokens). Tokens are RS256 JWTs whose `x5c`
//! header carries a self-signed certificate that is also the registry's `rootcertbundle` (distribution
//! accepts an x5c chain ending in a trusted root, a `kid` of a trusted key, or a `jwk`). Signing is done
//! by the `openssl` CLI: RS256 is PKCS#1 v1.5 over SHA-256, exactly what `openssl dgst -sign` prints.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use tokio::io::BufReader;
use tokio::net::TcpListener;

use super::http::{read_body, read_head, write_resp, Head, Resp};

pub const USER: &str = "alice";
pub const PASSWORD: &str = "s3cret-token-pass";
pub const IDENTITY_TOKEN: &str = "idtok-alice-refresh-42";
/// Must match scripts/registry.sh.
const SERVICE: &str = "committer-test-registry";
const ISSUER: &str = "committer-test-issuer";

#[derive(Clone, Debug)]
pub struct TokenRequest {
    pub method: String,
    pub scopes: Vec<String>,
}

struct Keys {
    key: PathBuf,
    x5c: String,
}

pub struct TokenService {
    pub realm: String,
    pub cert: PathBuf,
    pub requests: Arc<Mutex<Vec<TokenRequest>>>,
    _dir: tempfile::TempDir,
}

impl TokenService {
    pub async fn start() -> TokenService {
        TokenService::start_with(None).await
    }

    /// `refuse_post`: answer the OAuth2 POST with this status and take the identity token as a
    /// password on the GET instead, as Artifactory and ACR do.
    pub async fn start_with(refuse_post: Option<u16>) -> TokenService {
        let dir = tempfile::tempdir().unwrap();
        let (key, cert) = (dir.path().join("token.key"), dir.path().join("token.crt"));
        let ok = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=committer test token issuer",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success(), "openssl req");
        let der = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert)
            .output()
            .unwrap()
            .stdout;
        let keys = Arc::new(Keys {
            key,
            x5c: base64::engine::general_purpose::STANDARD.encode(der),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let realm = format!("http://{}/token", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let reqs = requests.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (keys, reqs) = (keys.clone(), reqs.clone());
                tokio::spawn(async move {
                    let mut conn = BufReader::new(stream);
                    while let Ok(Some(head)) = read_head(&mut conn).await {
                        let Ok(body) = read_body(&mut conn, &head).await else {
                            return;
                        };
                        let resp = match refuse_post {
                            Some(status) if head.method == "POST" => Resp::new(status),
                            _ => answer(&head, &body, &keys, &reqs).await,
                        };
                        if write_resp(&mut conn, &resp, false).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        TokenService {
            realm,
            cert,
            requests,
            _dir: dir,
        }
    }

    /// Every scope asked for so far.
    pub fn scopes(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| r.scopes.clone())
            .collect()
    }
}

async fn answer(
    head: &Head,
    body: &[u8],
    keys: &Arc<Keys>,
    reqs: &Arc<Mutex<Vec<TokenRequest>>>,
) -> Resp {
    let (user, scopes) = match head.method.as_str() {
        "GET" => (basic_user(head), head.queries("scope")),
        "POST" => {
            let form: Vec<(String, String)> =
                url::form_urlencoded::parse(body).into_owned().collect();
            let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            let ok = get("grant_type").as_deref() == Some("refresh_token")
                && get("refresh_token").as_deref() == Some(IDENTITY_TOKEN);
            let scopes = get("scope")
                .map(|s| s.split(' ').map(str::to_string).collect())
                .unwrap_or_default();
            (ok.then(|| USER.to_string()), scopes)
        }
        _ => return Resp::new(405),
    };
    let Some(user) = user else {
        return Resp::new(401)
            .json(&serde_json::json!({"details": "invalid username or password"}));
    };
    reqs.lock().unwrap().push(TokenRequest {
        method: head.method.clone(),
        scopes: scopes.clone(),
    });
    let jwt = sign(keys.clone(), claims(&user, &scopes)).await;
    let field = if head.method == "POST" {
        "access_token"
    } else {
        "token"
    };
    Resp::new(200).json(&serde_json::json!({ field: jwt, "expires_in": 300 }))
}

fn basic_user(head: &Head) -> Option<String> {
    let b64 = head.header("authorization")?.strip_prefix("Basic ")?;
    let raw = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    (u == USER && (p == PASSWORD || p == IDENTITY_TOKEN) || u == "<token>" && p == IDENTITY_TOKEN)
        .then(|| USER.to_string())
}

/// Grant every action asked for on `repository:` scopes.
fn claims(user: &str, scopes: &[String]) -> serde_json::Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let access: Vec<serde_json::Value> = scopes
        .iter()
        .filter_map(|s| {
            let rest = s.strip_prefix("repository:")?;
            let (name, actions) = rest.rsplit_once(':')?;
            Some(serde_json::json!({"type": "repository", "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
        })
        .collect();
    serde_json::json!({
        "iss": ISSUER, "sub": user, "aud": SERVICE,
        "exp": now + 300, "nbf": now - 10, "iat": now, "jti": format!("{now}-{}", scopes.len()),
        "access": access,
    })
}

async fn sign(keys: Arc<Keys>, claims: serde_json::Value) -> String {
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [keys.x5c]});
    let input = format!(
        "{}.{}",
        b64(&serde_json::to_vec(&header).unwrap()),
        b64(&serde_json::to_vec(&claims).unwrap())
    );
    let data = input.clone();
    let sig = tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let mut child = Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(&keys.key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(data.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap().stdout
    })
    .await
    .unwrap();
    format!("{input}.{}", b64(&sig))
}
