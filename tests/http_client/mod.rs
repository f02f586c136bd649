//! A small blocking HTTP client for the service tests and the load test (ureq), with a
//! hand-built multipart/form-data body.
#![allow(dead_code)]

use std::net::SocketAddr;

pub enum Part<'a> {
    Text(&'a str),
    File(&'a str, &'a [u8]),
}

/// (content type, body) of a multipart/form-data request.
pub fn multipart(fields: &[(&str, Part)]) -> (String, Vec<u8>) {
    let boundary = "----slot4acir-test-boundary-7f3a9c";
    let mut body = Vec::new();
    for (name, part) in fields {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match part {
            Part::Text(t) => {
                body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
                );
                body.extend_from_slice(t.as_bytes());
            }
            Part::File(file, bytes) => {
                body.extend_from_slice(
                    format!(
                        "Content-Disposition: form-data; name=\"{name}\"; filename=\"{file}\"\r\n\
                         Content-Type: application/octet-stream\r\n\r\n"
                    )
                    .as_bytes(),
                );
                body.extend_from_slice(bytes);
            }
        }
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

pub struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        Self {
            base: format!("http://{addr}"),
            agent,
        }
    }

    fn finish(
        resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> (u16, String, Vec<u8>) {
        let mut resp = resp.expect("HTTP request failed");
        let status = resp.status().as_u16();
        let ctype = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = resp
            .body_mut()
            .read_to_vec()
            .expect("reading the response body");
        (status, ctype, body)
    }

    /// (status, content type, body bytes)
    pub fn get_bytes(&self, path: &str) -> (u16, String, Vec<u8>) {
        Self::finish(self.agent.get(&format!("{}{path}", self.base)).call())
    }

    /// (status, content type, body text)
    pub fn get(&self, path: &str) -> (u16, String, String) {
        let (s, c, b) = self.get_bytes(path);
        (s, c, String::from_utf8_lossy(&b).into_owned())
    }

    pub fn post(&self, path: &str, content_type: &str, body: &[u8]) -> (u16, String, String) {
        let (s, c, b) = Self::finish(
            self.agent
                .post(&format!("{}{path}", self.base))
                .header("Content-Type", content_type)
                .send(body),
        );
        (s, c, String::from_utf8_lossy(&b).into_owned())
    }
}
