//! The CLI's HTTP client for the daemon's API.

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use super::{token_files, CliError};

pub struct ApiClient {
    base: String,
    token: Option<String>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl ApiClient {
    pub fn new(api: Option<String>, token: Option<String>) -> Result<ApiClient, CliError> {
        let base = api
            .or_else(|| std::env::var("OUTBOX_API").ok())
            .unwrap_or_else(|| "http://127.0.0.1:8425".to_string());
        if !base.starts_with("http://") {
            return Err(CliError::Usage(format!(
                "--api {base:?}: the API is plain HTTP on a local or private address; give http://HOST:PORT"
            )));
        }
        let token = token
            .or_else(|| std::env::var("OUTBOX_TOKEN").ok())
            .or_else(|| {
                token_files().into_iter().find_map(|p| {
                    std::fs::read_to_string(p)
                        .ok()
                        .map(|t| t.trim().to_string())
                        .filter(|t| !t.is_empty())
                })
            });
        Ok(ApiClient {
            base: base.trim_end_matches('/').to_string(),
            token,
            client: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Bytes)>,
        headers: &[(&str, String)],
    ) -> Result<(StatusCode, Bytes), CliError> {
        let url = format!("{}{path}", self.base);
        let mut b = Request::builder().method(method).uri(&url);
        if let Some(t) = &self.token {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        for (k, v) in headers {
            b = b.header(*k, v);
        }
        let req = match body {
            Some((ct, bytes)) => b.header(header::CONTENT_TYPE, ct).body(Full::new(bytes)),
            None => b.body(Full::new(Bytes::new())),
        }
        .map_err(|e| CliError::Usage(format!("{url}: {e}")))?;
        let resp = self.client.request(req).await.map_err(|e| {
            CliError::Refused(format!(
                "cannot reach outboxd at {}: {} (is it running? see --api)",
                self.base,
                outbox_remote::error_chain(&e)
            ))
        })?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| CliError::Refused(format!("reading the answer: {e}")))?
            .to_bytes();
        if !status.is_success() {
            let msg = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| {
                    let error = v.get("error")?.as_str()?.to_string();
                    let problems: Vec<String> = v
                        .get("problems")
                        .and_then(Value::as_array)
                        .map(|a| {
                            a.iter()
                                .filter_map(|p| p.as_str().map(|s| format!("  {s}")))
                                .collect()
                        })
                        .unwrap_or_default();
                    Some(if problems.is_empty() {
                        error
                    } else {
                        format!(
                            "the integration file has {} problem(s):\n{}",
                            problems.len(),
                            problems.join("\n")
                        )
                    })
                })
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            let hint = if status == StatusCode::UNAUTHORIZED {
                " (give --token, set OUTBOX_TOKEN, or run where the daemon's api-token file is readable)"
            } else {
                ""
            };
            return Err(CliError::Refused(format!("{msg}{hint}")));
        }
        Ok((status, bytes))
    }

    pub async fn get(&self, path: &str) -> Result<Value, CliError> {
        let (_, b) = self.call(Method::GET, path, None, &[]).await?;
        parse(&b)
    }

    pub async fn get_text(&self, path: &str) -> Result<String, CliError> {
        let (_, b) = self.call(Method::GET, path, None, &[]).await?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    pub async fn post(&self, path: &str, body: Option<&Value>) -> Result<Value, CliError> {
        let body = body.map(|v| ("application/json", Bytes::from(v.to_string())));
        let (_, b) = self.call(Method::POST, path, body, &[]).await?;
        parse(&b)
    }

    pub async fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        body: Bytes,
        headers: &[(&str, String)],
    ) -> Result<Value, CliError> {
        let (_, b) = self
            .call(Method::POST, path, Some((content_type, body)), headers)
            .await?;
        parse(&b)
    }
}

fn parse(b: &[u8]) -> Result<Value, CliError> {
    serde_json::from_slice(b)
        .map_err(|e| CliError::Refused(format!("the daemon's answer is not JSON: {e}")))
}

/// Percent-encodes one path segment.
pub fn seg(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
