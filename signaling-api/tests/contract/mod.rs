//! Every response the REST tests get is checked against the OpenAPI document the server
//! generates (the one checked in as docs/openapi.json): the operation is looked up by method and
//! path template, the status must be one it documents, the content type one it documents for
//! that status, and a JSON body must validate against the response's schema (its `$ref`s
//! resolved to the document's components). A path or method the document does not have may
//! only be answered by the router's fallbacks: 404 or 405 in the error shape.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::{json, Value};

struct Contract {
    doc: Value,
    /// Path templates, split into segments (`None`: a `{parameter}`).
    templates: Vec<(String, Vec<Option<String>>)>,
    validators: Mutex<HashMap<String, Arc<jsonschema::Validator>>>,
}

fn contract() -> &'static Contract {
    static CONTRACT: OnceLock<Contract> = OnceLock::new();
    CONTRACT.get_or_init(|| {
        let doc = signaling_api::openapi::openapi_document();
        let templates = doc["paths"]
            .as_object()
            .expect("paths")
            .keys()
            .map(|t| {
                let segments = t
                    .split('/')
                    .map(|s| if s.starts_with('{') && s.ends_with('}') { None } else { Some(s.to_owned()) })
                    .collect();
                (t.clone(), segments)
            })
            .collect();
        Contract { doc, templates, validators: Mutex::new(HashMap::new()) }
    })
}

impl Contract {
    /// The template `path` matches, the one with the most literal segments if several do.
    fn template(&self, path: &str) -> Option<&str> {
        let parts: Vec<&str> = path.split('/').collect();
        self.templates
            .iter()
            .filter(|(_, segs)| {
                segs.len() == parts.len()
                    && segs.iter().zip(&parts).all(|(seg, part)| match seg {
                        Some(lit) => lit == part,
                        None => !part.is_empty(),
                    })
            })
            .max_by_key(|(_, segs)| segs.iter().filter(|s| s.is_some()).count())
            .map(|(t, _)| t.as_str())
    }

    /// A validator for `schema` (inline or a `$ref`) with the document's components beside it.
    fn validator(&self, key: &str, schema: &Value) -> Arc<jsonschema::Validator> {
        let mut cache = self.validators.lock().unwrap();
        if let Some(v) = cache.get(key) {
            return Arc::clone(v);
        }
        let mut root = json!({ "$schema": "https://json-schema.org/draft/2020-12/schema" });
        root["components"] = self.doc["components"].clone();
        match schema.as_object() {
            Some(obj) => {
                for (k, v) in obj {
                    root[k] = v.clone();
                }
            }
            None => root["allOf"] = json!([schema]),
        }
        let v = Arc::new(
            jsonschema::options()
                .with_draft(jsonschema::Draft::Draft202012)
                .build(&root)
                .unwrap_or_else(|e| panic!("schema of {key} does not compile: {e}")),
        );
        cache.insert(key.to_owned(), Arc::clone(&v));
        v
    }
}

/// Panics unless the response conforms to the document.
pub fn check(method: &str, uri: &str, status: u16, content_type: Option<&str>, body: &[u8]) {
    let c = contract();
    let path = uri.split('?').next().unwrap_or(uri);
    let method_key = method.to_ascii_lowercase();
    let op = c.template(path).and_then(|t| c.doc["paths"][t].get(method_key.as_str()).map(|op| (t, op)));
    let Some((template, op)) = op else {
        // No such operation: only the router's fallbacks may answer, in the error shape.
        assert!(
            status == 404 || status == 405,
            "{method} {uri} answered {status}, but the OpenAPI document has no operation {method} {path}"
        );
        check_body(c, &format!("fallback {status}"), &json!({ "$ref": "#/components/schemas/ErrorBody" }), body, uri);
        return;
    };
    let what = format!("{method} {template} → {status}");
    let Some(response) = op["responses"].get(status.to_string()) else {
        let documented: Vec<&String> = op["responses"].as_object().unwrap().keys().collect();
        panic!("{method} {uri} answered {status}, not documented for {method} {template} (documented: {documented:?})");
    };
    let Some(content) = response.get("content").and_then(Value::as_object) else {
        assert!(body.is_empty(), "{what} documents no body, got {:?}", String::from_utf8_lossy(body));
        return;
    };
    let ctype = content_type.unwrap_or_else(|| panic!("{what} has no Content-Type"));
    let essence = ctype.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let Some(media) = content.get(&essence) else {
        panic!("{what}: Content-Type {ctype} is not documented (documented: {:?})", content.keys().collect::<Vec<_>>());
    };
    if essence == "application/json" {
        check_body(c, &format!("{what} {essence}"), &media["schema"], body, uri);
    }
}

fn check_body(c: &Contract, key: &str, schema: &Value, body: &[u8], uri: &str) {
    let value: Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{key} ({uri}): body is not JSON ({e}): {:?}", String::from_utf8_lossy(body)));
    let validator = c.validator(key, schema);
    let errors: Vec<String> =
        validator.iter_errors(&value).map(|e| format!("{} at {}", e, e.instance_path())).collect();
    assert!(errors.is_empty(), "{key} ({uri}): the body does not match the OpenAPI schema: {errors:#?}\nbody: {value}");
}

/// The check itself fails where it should: an undocumented status, a body of the wrong shape,
/// an unknown operation answering 2xx.
#[test]
fn the_check_catches_what_the_document_does_not_allow() {
    let fails = |f: fn()| std::panic::catch_unwind(f).is_err();
    assert!(fails(|| check("GET", "/v1/rooms", 418, Some("application/json"), b"{}")));
    assert!(fails(|| check("GET", "/v1/rooms", 200, Some("application/json"), br#"{"rooms":[{"room_id":1}]}"#)));
    assert!(fails(|| check("GET", "/v1/rooms", 200, Some("text/plain"), br#"{"rooms":[]}"#)));
    assert!(fails(|| check("PUT", "/v1/rooms", 200, Some("application/json"), br#"{"rooms":[]}"#)));
    assert!(fails(|| check(
        "GET",
        "/v1/rooms/r_1",
        404,
        Some("application/json"),
        br#"{"error":{"code":"nope","message":"x"}}"#
    )));
    assert!(fails(|| check("DELETE", "/v1/rooms/r_1", 204, None, b"surprise")));
    check("GET", "/v1/rooms?x=1", 200, Some("application/json"), br#"{"rooms":[]}"#);
    check(
        "GET",
        "/v1/rooms/r_1",
        404,
        Some("application/json"),
        br#"{"error":{"code":"not_found","message":"room not found"}}"#,
    );
    check(
        "PATCH",
        "/v1/rooms",
        405,
        Some("application/json"),
        br#"{"error":{"code":"method_not_allowed","message":"x"}}"#,
    );
    check("DELETE", "/v1/rooms/r_1", 204, None, b"");
}
