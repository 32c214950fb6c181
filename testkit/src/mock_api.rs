//! A scripted Kubernetes API server for tests: each expected call is checked for method,
//! path and body, and answered; a missing call times out, an extra one fails the test.

use std::time::Duration;

use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::Value;

pub type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// A kube Client wired to a mock, and the mock's handle.
pub fn client() -> (Client, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), handle)
}

/// One request as seen by the mock.
pub struct Seen {
    pub method: String,
    pub path_and_query: String,
    pub body: Value,
    respond: tower_test::mock::SendResponse<Response<Body>>,
}

impl Seen {
    pub fn path(&self) -> &str {
        self.path_and_query.split('?').next().unwrap_or_default()
    }

    pub fn reply(self, status: u16, body: Value) {
        let bytes = serde_json::to_vec(&body).expect("json");
        self.respond.send_response(
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Body::from(bytes))
                .expect("response"),
        );
    }
}

/// Waits for the next request (fails after 5 s: an expected call never came).
pub async fn next(handle: &mut Handle) -> Seen {
    let (req, respond) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("timed out waiting for an API call")
        .expect("the client went away");
    let method = req.method().to_string();
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let bytes = req.into_body().collect_bytes().await.expect("body");
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()))
    };
    Seen {
        method,
        path_and_query,
        body,
        respond,
    }
}

/// A Kubernetes Status object for error replies.
pub fn status(code: u16, reason: &str, message: &str) -> Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Status", "status": "Failure",
        "code": code, "reason": reason, "message": message, "metadata": {}
    })
}
