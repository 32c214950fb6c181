//! The AdmissionReview v1 envelope: strict decoding of what the API server
//! sends and encoding of our answer.

use k8s_openapi::ByteString;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionReview};
use serde::{Deserialize, Serialize};

use crate::bounded::{ECHO_MAX, MESSAGE_MAX, WARNINGS_MAX, bounded};
use crate::error::Error;
use crate::rules::Decision;

pub const API_VERSION: &str = "admission.k8s.io/v1";
pub const KIND: &str = "AdmissionReview";

/// Decode an `admission.k8s.io/v1` AdmissionReview body into its request.
pub fn decode_request(body: &[u8]) -> Result<AdmissionRequest<DynamicObject>, Error> {
    // One full parse on the hot path; the type is checked on the parsed review. Only when
    // the parse fails is the type probed on its own, so a v1beta1 review is reported as
    // such rather than as whichever field the full decode tripped over.
    match serde_json::from_slice::<AdmissionReview<DynamicObject>>(body) {
        Ok(review) => {
            check_type(&review.types.api_version, &review.types.kind)?;
            let request: AdmissionRequest<DynamicObject> =
                review.try_into().map_err(|_| Error::MissingRequest)?;
            // The uid is echoed in the answer and in logs: it must be one.
            if request.uid.is_empty() || request.uid.len() > 128 {
                return Err(Error::InvalidUid {
                    found: bounded(&request.uid, ECHO_MAX),
                });
            }
            Ok(request)
        }
        Err(parse_error) => {
            #[derive(Deserialize)]
            #[serde(rename_all = "camelCase")]
            struct TypeProbe {
                #[serde(default)]
                api_version: String,
                #[serde(default)]
                kind: String,
            }
            let probe: TypeProbe = serde_json::from_slice(body).map_err(Error::MalformedReview)?;
            check_type(&probe.api_version, &probe.kind)?;
            Err(Error::MalformedReview(parse_error))
        }
    }
}

fn check_type(api_version: &str, kind: &str) -> Result<(), Error> {
    if api_version != API_VERSION {
        return Err(Error::UnsupportedReview {
            field: "apiVersion",
            found: bounded(api_version, ECHO_MAX),
            expected: API_VERSION,
        });
    }
    if kind != KIND {
        return Err(Error::UnsupportedReview {
            field: "kind",
            found: bounded(kind, ECHO_MAX),
            expected: KIND,
        });
    }
    Ok(())
}

/// Encode the AdmissionReview answering request `uid` with `decision`.
///
/// Written by hand rather than with kube's `AdmissionResponse`, which
/// serializes the patch as a JSON array of numbers; the API contract is a
/// base64 string.
pub fn encode_response(uid: &str, decision: &Decision) -> Result<Vec<u8>, Error> {
    // Messages and warnings quote what the request carried: bounded, whatever it was.
    let bound_all = |warnings: &[String]| -> Vec<String> {
        warnings
            .iter()
            .take(WARNINGS_MAX)
            .map(|w| bounded(w, MESSAGE_MAX))
            .collect()
    };
    let response = match decision {
        Decision::Allow { patch, warnings } => {
            let patch = patch
                .as_ref()
                .map(|patch| serde_json::to_vec(patch).map(ByteString))
                .transpose()
                .map_err(Error::EncodeResponse)?;
            ResponseBody {
                uid,
                allowed: true,
                status: None,
                patch_type: patch.as_ref().map(|_| "JSONPatch"),
                patch,
                warnings: bound_all(warnings),
            }
        }
        Decision::Deny {
            code,
            message,
            warnings,
        } => ResponseBody {
            uid,
            allowed: false,
            status: Some(StatusBody {
                status: "Failure",
                code: if (400..=599).contains(code) {
                    *code
                } else {
                    403
                },
                message: bounded(message, MESSAGE_MAX),
            }),
            patch: None,
            patch_type: None,
            warnings: bound_all(warnings),
        },
    };
    serde_json::to_vec(&ReviewBody {
        api_version: API_VERSION,
        kind: KIND,
        response,
    })
    .map_err(Error::EncodeResponse)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReviewBody<'a> {
    api_version: &'static str,
    kind: &'static str,
    response: ResponseBody<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResponseBody<'a> {
    uid: &'a str,
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<StatusBody>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<ByteString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<String>,
}

/// The subset of `metav1.Status` the API server reads from a denial.
#[derive(Serialize)]
struct StatusBody {
    status: &'static str,
    code: u16,
    message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn review(api_version: &str, kind: &str, request: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({"apiVersion": api_version, "kind": kind, "request": request}))
            .expect("fixture serializes")
    }

    fn pod_request() -> Value {
        json!({
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": "CREATE",
            "userInfo": {"username": "alice"},
            "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}},
            "oldObject": null,
            "dryRun": true
        })
    }

    #[test]
    fn decodes_a_v1_review() {
        let request = decode_request(&review(API_VERSION, KIND, pod_request())).expect("decodes");
        assert_eq!(request.uid, "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert!(request.dry_run);
    }

    #[test]
    fn rejects_what_is_not_a_v1_review() {
        let cases: [(Vec<u8>, &str); 5] = [
            (b"{not json".to_vec(), "malformed_review"),
            (
                review("admission.k8s.io/v1beta1", KIND, pod_request()),
                "unsupported_review",
            ),
            (
                review(API_VERSION, "Pod", pod_request()),
                "unsupported_review",
            ),
            (review(API_VERSION, KIND, Value::Null), "missing_request"),
            (
                review(API_VERSION, KIND, json!({"uid": "x"})),
                "malformed_review",
            ),
        ];
        for (body, kind) in cases {
            let error = decode_request(&body).expect_err("must be rejected");
            assert_eq!(error.kind(), kind, "{error}");
        }
    }

    #[test]
    fn denial_codes_outside_the_error_range_become_403() {
        let body = encode_response("u", &Decision::deny(200, "no")).expect("encodes");
        let value: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(value["response"]["status"]["code"], 403);
        assert_eq!(value["response"]["allowed"], false);
    }

    #[test]
    fn plain_allow_has_no_patch_fields() {
        let body = encode_response("u", &Decision::allow()).expect("encodes");
        let value: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(
            value,
            json!({"apiVersion": API_VERSION, "kind": KIND, "response": {"uid": "u", "allowed": true}})
        );
    }
}
