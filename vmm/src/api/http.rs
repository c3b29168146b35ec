//! HTTP/1.1 request framing (with `httparse`) and response encoding for the API socket.
//!
//! Only what the API needs: a request line, at most [`MAX_HEADERS`] headers in at most
//! [`MAX_HEAD`] bytes, and a body of at most [`MAX_BODY`] bytes given by `Content-Length`.
//! Transfer codings (chunked) are refused: no endpoint takes a large body. HTTP/1.1 connections
//! stay open unless the client sends `Connection: close`; HTTP/1.0 ones close after the
//! response.

use serde::Serialize;
use thiserror::Error;

/// Largest request line plus headers, in bytes.
pub const MAX_HEAD: usize = 8 * 1024;
/// Largest request body, in bytes.
pub const MAX_BODY: usize = 8 * 1024;
/// Most headers in one request.
pub const MAX_HEADERS: usize = 32;

/// Why a request cannot be answered normally; each maps to a 4xx status.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HttpError {
    /// Not an HTTP/1.x request.
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
    /// Request line and headers are longer than [`MAX_HEAD`] or have too many headers.
    #[error(
        "the request head is larger than {MAX_HEAD} bytes or has more than {MAX_HEADERS} headers"
    )]
    HeadTooLarge,
    /// The body is longer than [`MAX_BODY`].
    #[error("the request body of {0} bytes is larger than the limit of {MAX_BODY} bytes")]
    BodyTooLarge(u64),
    /// A `Transfer-Encoding` header (chunked bodies are not supported).
    #[error("Transfer-Encoding is not supported: send the body with Content-Length")]
    TransferEncoding,
    /// The client did not send a complete request in time.
    #[error("the request was not complete in time")]
    Timeout,
    /// The server has as many connections as it serves.
    #[error("too many API connections; retry later")]
    TooManyConnections,
}

impl HttpError {
    /// The status code of the error response.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::Malformed(_) => 400,
            HttpError::HeadTooLarge => 431,
            HttpError::BodyTooLarge(_) => 413,
            HttpError::TransferEncoding => 411,
            HttpError::Timeout => 408,
            HttpError::TooManyConnections => 503,
        }
    }
}

/// One parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method, e.g. `GET`.
    pub method: String,
    /// The path without the query string.
    pub path: String,
    /// The body (empty without `Content-Length`).
    pub body: Vec<u8>,
    /// The client asked to close the connection after the response (or speaks HTTP/1.0).
    pub close: bool,
}

/// The head of a request: what [`parse`] needs beyond httparse's result.
struct Head {
    method: String,
    path: String,
    close: bool,
    body_len: usize,
}

fn head_of(req: &httparse::Request<'_, '_>) -> Result<Head, HttpError> {
    let mut close = req.version != Some(1);
    let mut body_len: Option<u64> = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::TransferEncoding);
        }
        if h.name.eq_ignore_ascii_case("connection") {
            close = value_has_token(h.value, "close")
                || (close && !value_has_token(h.value, "keep-alive"));
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = content_length(h.value)?;
            if body_len.is_some_and(|old| old != n) {
                return Err(HttpError::Malformed(
                    "conflicting Content-Length headers".into(),
                ));
            }
            body_len = Some(n);
        }
    }
    let n = body_len.unwrap_or(0);
    let body_len = usize::try_from(n)
        .ok()
        .filter(|&n| n <= MAX_BODY)
        .ok_or(HttpError::BodyTooLarge(n))?;
    let target = req.path.unwrap_or("/");
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    Ok(Head {
        method: req.method.unwrap_or("").to_string(),
        path: path.to_string(),
        close,
        body_len,
    })
}

fn value_has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

fn content_length(value: &[u8]) -> Result<u64, HttpError> {
    let bad = || HttpError::Malformed("Content-Length is not a number".into());
    let text = std::str::from_utf8(value.trim_ascii()).map_err(|_| bad())?;
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    // Longer than u64: certainly over the limit.
    Ok(text.parse().unwrap_or(u64::MAX))
}

/// Parses the request at the front of `buf`: `Ok(None)` while it is incomplete, else the request
/// and how many bytes of `buf` it used.
pub fn parse(buf: &[u8]) -> Result<Option<(Request, usize)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD => n,
        Ok(httparse::Status::Complete(_)) | Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(HttpError::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    };
    let head = head_of(&req)?;
    let end = head_len + head.body_len;
    let Some(body) = buf.get(head_len..end) else {
        return Ok(None);
    };
    let request = Request {
        method: head.method,
        path: head.path,
        body: body.to_vec(),
        close: head.close,
    };
    Ok(Some((request, end)))
}

/// A response to encode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// `Content-Type` (none for an empty body).
    pub content_type: &'static str,
    /// Body.
    pub body: Vec<u8>,
    /// `Allow` header (405 responses).
    pub allow: Option<&'static str>,
}

/// JSON content type.
pub const JSON: &str = "application/json";
/// Prometheus text exposition format.
pub const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

impl Response {
    /// `status` with `value` as the JSON body.
    pub fn json(status: u16, value: &impl Serialize) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => Response {
                status,
                content_type: JSON,
                body,
                allow: None,
            },
            Err(e) => Self::error(500, &format!("cannot encode the response: {e}")),
        }
    }

    /// `204 No Content`.
    pub fn no_content() -> Self {
        Response {
            status: 204,
            content_type: "",
            body: Vec::new(),
            allow: None,
        }
    }

    /// `status` with `{"error": message}`.
    pub fn error(status: u16, message: &str) -> Self {
        let body = serde_json::to_vec(&ErrorBody { error: message })
            .unwrap_or_else(|_| b"{\"error\":\"internal error\"}".to_vec());
        Response {
            status,
            content_type: JSON,
            body,
            allow: None,
        }
    }

    /// The error response of a framing error.
    pub fn from_error(e: &HttpError) -> Self {
        Self::error(e.status(), &e.to_string())
    }

    /// `200` with a text body of `content_type`.
    pub fn text(content_type: &'static str, body: String) -> Self {
        Response {
            status: 200,
            content_type,
            body: body.into_bytes(),
            allow: None,
        }
    }

    /// The bytes on the wire; `close` adds `Connection: close`.
    pub fn encode(&self, close: bool) -> Vec<u8> {
        let mut head = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        head.push_str("Server: iovmm\r\n");
        if !self.content_type.is_empty() {
            head.push_str(&format!("Content-Type: {}\r\n", self.content_type));
        }
        if self.status != 204 {
            head.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        if let Some(allow) = self.allow {
            head.push_str(&format!("Allow: {allow}\r\n"));
        }
        if close {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(&self.body);
        out
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn one(raw: &[u8]) -> Request {
        let (req, used) = parse(raw).unwrap().unwrap();
        assert_eq!(used, raw.len());
        req
    }

    #[test]
    fn requests_parse_with_query_body_and_connection_handling() {
        let r = one(b"GET /api/v1/vm.info?x=1 HTTP/1.1\r\nHost: localhost\r\n\r\n");
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("GET", "/api/v1/vm.info")
        );
        assert!(!r.close && r.body.is_empty());
        let r = one(b"PUT /p HTTP/1.1\r\nContent-Length: 2\r\nConnection: Close\r\n\r\n{}");
        assert_eq!((r.body.as_slice(), r.close), (&b"{}"[..], true));
        assert!(one(b"GET / HTTP/1.0\r\n\r\n").close);
        assert!(!one(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").close);
    }

    #[test]
    fn incomplete_requests_wait_and_pipelined_ones_are_split() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap(), None);
        assert_eq!(
            parse(b"PUT / HTTP/1.1\r\nContent-Length: 4\r\n\r\nab").unwrap(),
            None
        );
        let two = b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n";
        let (a, used) = parse(two).unwrap().unwrap();
        assert_eq!(a.path, "/a");
        assert_eq!(parse(&two[used..]).unwrap().unwrap().0.path, "/b");
    }

    #[test]
    fn hostile_requests_get_the_right_4xx() {
        let status = |raw: &[u8]| parse(raw).unwrap_err().status();
        assert_eq!(status(b"\x00\x01garbage\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"), 400);
        assert_eq!(
            status(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"PUT / HTTP/1.1\r\nContent-Length: 99999\r\n\r\n"),
            413
        );
        let huge = b"PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n";
        assert_eq!(status(huge), 413);
        assert_eq!(
            status(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            411
        );
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(status(long.as_bytes()), 431);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(
            status(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()),
            431
        );
    }

    #[test]
    fn responses_encode_status_headers_and_body() {
        let r = Response::error(404, "no such endpoint \"/x\"");
        let text = String::from_utf8(r.encode(true)).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"), "{text}");
        assert!(text.contains("Content-Type: application/json\r\n"));
        assert!(text.contains("Connection: close\r\n"));
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "no such endpoint \"/x\"");
        assert!(text.contains(&format!("Content-Length: {}\r\n", body.len())));
        let nc = String::from_utf8(Response::no_content().encode(false)).unwrap();
        assert_eq!(nc, "HTTP/1.1 204 No Content\r\nServer: iovmm\r\n\r\n");
    }
}
