//! Reading request bodies and query strings so that every mistake names its field.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use serde::de::{DeserializeOwned, DeserializeSeed};
use serde_json::Value;
use sha2::{Digest, Sha256};

use std::time::Duration;

use super::ApiState;
use super::error::ApiError;

/// The raw body of a JSON request: the Content-Type must be JSON (415 otherwise, also when it is
/// missing: a browser's no-cors request carries none or a form type); a body past
/// `api.max_body_bytes` is refused with 413.
pub struct JsonBody(pub Bytes);

impl FromRequest<ApiState> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &ApiState) -> Result<Self, ApiError> {
        let ct = req
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or("").to_ascii_lowercase());
        let essence = ct
            .as_deref()
            .map(|c| c.split(';').next().unwrap_or("").trim());
        if !essence.is_some_and(|e| e == "application/json" || e.ends_with("+json")) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                match essence {
                    Some(e) => format!("Content-Type must be application/json, not `{e}`"),
                    None => "Content-Type: application/json is required".to_string(),
                },
            )
            .field("Content-Type"));
        }
        let deadline = Duration::from_secs(state.settings.body_timeout_secs);
        let read = tokio::time::timeout(deadline, Bytes::from_request(req, state));
        let bytes = read
            .await
            .map_err(|_| body_timeout(deadline))?
            .map_err(|r| {
                if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body_too_large",
                        "the request body is larger than api.max_body_bytes",
                    )
                } else {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "unreadable_body",
                        format!("the request body could not be read: {}", r.body_text()),
                    )
                }
            })?;
        // Refuse before parsing what would build more values than the bound (a batch of a
        // million `{}` is 16 MiB of text but gigabytes of parsed structs). A body shorter than
        // the bound cannot exceed it: each counted value takes at least one byte.
        let max = state.settings.max_json_values;
        if bytes.len() > max && crate::domain::bounded::count_values(&bytes) > max {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_many_values",
                format!("the request body holds more than {max} JSON values (api.max_json_values)"),
            ));
        }
        Ok(JsonBody(bytes))
    }
}

/// 408: the client did not send its body within `api.body_timeout_secs`.
pub fn body_timeout(deadline: Duration) -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "body_timeout",
        format!(
            "the request body did not arrive within {} s (api.body_timeout_secs)",
            deadline.as_secs()
        ),
    )
}

/// Parses JSON straight into `T`; errors name the field (`to[0]`, `emails[2].subject`).
/// The body must be a JSON object.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => {}
        None => {
            return Err(ApiError::bad_request(
                "malformed_json",
                "body",
                "the body is empty; expected a JSON object",
            ));
        }
        Some(_) => {
            return Err(match serde_json::from_slice::<Value>(bytes) {
                Ok(_) => {
                    ApiError::bad_request("invalid_field", "body", "the body must be a JSON object")
                }
                Err(e) => malformed(&e),
            });
        }
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let v = serde_path_to_error::deserialize(&mut de).map_err(data_error)?;
    de.end().map_err(|e| malformed(&e))?;
    Ok(v)
}

/// Converts an already parsed JSON value into `T`, naming the field on error.
pub fn from_value<T: DeserializeOwned>(v: Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(data_error)
}

/// Like [`parse`], with a seed that carries runtime bounds (a batch's `api.max_batch`).
pub fn parse_seeded<'de, S: DeserializeSeed<'de>>(
    bytes: &'de [u8],
    seed: S,
) -> Result<S::Value, ApiError> {
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        // Not an object: let `parse` say what it is.
        return parse::<Value>(bytes).and_then(|_| {
            Err(ApiError::bad_request(
                "invalid_field",
                "body",
                "the body must be a JSON object",
            ))
        });
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let mut track = serde_path_to_error::Track::new();
    let v = seed
        .deserialize(serde_path_to_error::Deserializer::new(&mut de, &mut track))
        .map_err(|e| data_error(serde_path_to_error::Error::new(track.path(), e)))?;
    de.end().map_err(|e| malformed(&e))?;
    Ok(v)
}

/// [`parse_seeded`] from an already parsed JSON value.
pub fn from_value_seeded<'de, S: DeserializeSeed<'de>>(
    v: &'de Value,
    seed: S,
) -> Result<S::Value, ApiError> {
    let mut track = serde_path_to_error::Track::new();
    seed.deserialize(serde_path_to_error::Deserializer::new(v, &mut track))
        .map_err(|e| data_error(serde_path_to_error::Error::new(track.path(), e)))
}

/// The body is not JSON at all.
fn malformed(e: &serde_json::Error) -> ApiError {
    ApiError::bad_request(
        "malformed_json",
        "body",
        format!("the body is not valid JSON: {e}"),
    )
}

fn data_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let inner = e.inner();
    if inner.is_syntax() || inner.is_eof() || inner.is_io() {
        return malformed(inner);
    }
    let msg = inner.to_string();
    if msg.starts_with(super::emails::BATCH_CAP) {
        return ApiError::bad_request("invalid_batch", "emails", strip_position(&msg));
    }
    let path = e.path().to_string();
    let base = if path == "." { String::new() } else { path };
    if let Some(rest) = msg.strip_prefix("unknown field `")
        && let Some(name) = rest.split('`').next()
    {
        // serde_path_to_error already ends the path with the unknown key; older paths stop
        // at the parent.
        let last = base.rsplit('.').next().unwrap_or("");
        let field = if base.is_empty() {
            name.to_string()
        } else if last == name {
            base
        } else {
            format!("{base}.{name}")
        };
        let msg = strip_position(&msg);
        return ApiError::bad_request("unknown_field", field, msg);
    }
    let field = if base.is_empty() {
        "body".to_string()
    } else {
        base
    };
    let msg = strip_position(&msg);
    ApiError::bad_request("invalid_field", field.clone(), format!("{field}: {msg}"))
}

/// serde_json appends " at line L column C"; the field path says more.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// Parses a query string into `T` (which should deny unknown fields).
pub fn query<T: DeserializeOwned>(raw: Option<&str>) -> Result<T, ApiError> {
    serde_urlencoded::from_str(raw.unwrap_or("")).map_err(|e| {
        let msg = e.to_string();
        let field = msg
            .split('`')
            .nth(1)
            .filter(|_| msg.starts_with("unknown field"))
            .unwrap_or("query")
            .to_string();
        ApiError::bad_request("invalid_query", field, msg)
    })
}

/// A digest of what a request asks for: method, path and the body's JSON in canonical form
/// (object keys sorted), so the same payload matches whatever its key order or whitespace.
pub fn fingerprint(method: &str, path: &str, body: &Value) -> String {
    let mut h = Sha256::new();
    h.update(method.as_bytes());
    h.update(b" ");
    h.update(path.as_bytes());
    h.update(b"\n");
    canonical(body, &mut h);
    hex::encode(h.finalize())
}

fn canonical(v: &Value, h: &mut Sha256) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            h.update(b"{");
            for k in keys {
                h.update(
                    serde_json::to_string(k)
                        .expect("a string serializes")
                        .as_bytes(),
                );
                h.update(b":");
                canonical(&m[k], h);
                h.update(b",");
            }
            h.update(b"}");
        }
        Value::Array(a) => {
            h.update(b"[");
            for x in a {
                canonical(x, h);
                h.update(b",");
            }
            h.update(b"]");
        }
        other => h.update(other.to_string().as_bytes()),
    }
}

/// A `limit` query parameter: `default` when absent, else 1 to `max` (400 naming `limit`).
pub fn page_size(raw: Option<&str>, default: u32, max: u32) -> Result<u32, ApiError> {
    match raw {
        None => Ok(default),
        Some(s) => match s.parse::<u32>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(ApiError::bad_request(
                "invalid_query",
                "limit",
                format!("`{}` is not a page size from 1 to {max}", s.escape_debug()),
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NewEmail;

    #[test]
    fn errors_name_the_field() {
        let cases: [(&str, &str, &str); 6] = [
            (r#"{"to": "a@b"}"#, "invalid_field", "to"),
            (r#"{"to": [1]}"#, "invalid_field", "to[0]"),
            (r#"{"tto": []}"#, "unknown_field", "tto"),
            (
                r#"{"attachments": [{"filename": "a", "content_type": "x", "content": "", "size": 1}]}"#,
                "unknown_field",
                "attachments[0].size",
            ),
            (r#"{"to": ["#, "malformed_json", "body"),
            (r#"[]"#, "invalid_field", "body"),
        ];
        for (body, code, field) in cases {
            let e = parse::<NewEmail>(body.as_bytes()).unwrap_err();
            assert_eq!(e.body.code, code, "{body}");
            assert_eq!(e.body.field.as_deref(), Some(field), "{body}");
        }
        let e = parse::<NewEmail>(br#"{} x"#).unwrap_err();
        assert_eq!(e.body.code, "malformed_json");
    }

    #[test]
    fn fingerprint_ignores_key_order_and_whitespace_only() {
        let a: Value = serde_json::from_str(r#"{"a": 1, "b": {"x": [1, 2], "y": "s"}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"b":{"y":"s","x":[1,2]},"a":1}"#).unwrap();
        let c: Value = serde_json::from_str(r#"{"b":{"y":"s","x":[2,1]},"a":1}"#).unwrap();
        assert_eq!(fingerprint("POST", "/p", &a), fingerprint("POST", "/p", &b));
        assert_ne!(fingerprint("POST", "/p", &a), fingerprint("POST", "/p", &c));
        assert_ne!(fingerprint("POST", "/p", &a), fingerprint("POST", "/q", &a));
    }
}
