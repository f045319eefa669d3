//! Keeps `gateway/openapi.yaml` true: every provider-API response the tests receive is checked against
//! it (status code listed for the operation, `apns-id` present, body present exactly when documented and
//! valid against the documented schema, reason in the documented enum for that status).
//!
//! It implements the small part of OpenAPI 3 / JSON Schema the document uses: `$ref` within the
//! document, `type`, `required`, `properties`, `additionalProperties: false` and `enum`.

use std::sync::OnceLock;

use serde_json::Value;

/// The document as JSON, loaded once per test binary.
pub fn document() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/gateway/openapi.yaml");
        let text = std::fs::read_to_string(path).expect("gateway/openapi.yaml is readable");
        serde_yaml::from_str(&text).expect("gateway/openapi.yaml is valid YAML")
    })
}

/// Follows `$ref` (`#/a/b/c`) until a node that is not a reference.
pub fn resolve(node: &Value) -> &Value {
    let mut node = node;
    while let Some(reference) = node.get("$ref").and_then(Value::as_str) {
        let pointer = reference.strip_prefix('#').expect("only local references");
        node = document().pointer(pointer).unwrap_or_else(|| panic!("dangling reference {reference}"));
    }
    node
}

/// The documented operation for a request path (and method, when documented there).
fn operation(method: &str, path: &str) -> &'static Value {
    let paths = document()["paths"].as_object().expect("paths");
    let template = if path.starts_with("/v1/status/") {
        "/v1/status/{deviceToken}/{apnsId}"
    } else {
        // Pushes, and every path the API does not have (their 404 BadPath is documented on the push).
        "/3/device/{deviceToken}"
    };
    let item = paths.get(template).unwrap_or_else(|| panic!("{template} is not documented"));
    let methods = item.as_object().expect("path item");
    methods
        .get(&method.to_ascii_lowercase())
        // 405s answer a method the path does not have; they are documented on the one it has.
        .or_else(|| methods.values().next())
        .expect("an operation")
}

/// The documented operation for a broadcast, or for a request on the channels port: any path there other
/// than the two channel paths is documented (404 `BadPath`) on the first.
fn channel_operation(method: &str, path: &str) -> &'static Value {
    let template = if path.starts_with("/4/broadcasts/apps/") {
        "/4/broadcasts/apps/{bundleId}"
    } else if path.starts_with("/1/apps/") && path.ends_with("/all-channels") {
        "/1/apps/{bundleId}/all-channels"
    } else {
        "/1/apps/{bundleId}/channels"
    };
    let item = document()["paths"].get(template).unwrap_or_else(|| panic!("{template} is not documented"));
    let methods = item.as_object().expect("path item");
    methods
        .get(&method.to_ascii_lowercase())
        .or_else(|| ["post", "get"].iter().find_map(|m| methods.get(*m)))
        .expect("an operation")
}

/// Checks one response against the document, panicking with a description of the first mismatch.
pub fn check_response(method: &str, path: &str, status: u16, apns_id: Option<&str>, body: &[u8]) {
    let context = format!("{method} {path} -> {status} {}", String::from_utf8_lossy(body));
    check(operation(method, path), &context, status, |name| name != "apns-id" || apns_id.is_some(), body);
}

/// Checks one answer of the channels port, or to a broadcast, against the document, its headers included.
pub fn check_channel_response(method: &str, path: &str, status: u16, headers: &http::HeaderMap, body: &[u8]) {
    let context = format!("{method} {path} -> {status} {}", String::from_utf8_lossy(body));
    check(channel_operation(method, path), &context, status, |name| headers.contains_key(name), body);
}

/// Checks a response against operation `op`: its status is documented, every documented required header
/// is `present`, and the body is exactly what the document says.
fn check(op: &Value, context: &str, status: u16, present: impl Fn(&str) -> bool, body: &[u8]) {
    let response = op["responses"]
        .get(status.to_string())
        .map(resolve)
        .unwrap_or_else(|| panic!("{context}: status {status} is not documented for this operation"));
    if let Some(headers) = response.get("headers").and_then(Value::as_object) {
        for (name, header) in headers {
            if resolve(header)["required"].as_bool() == Some(true) {
                assert!(present(name), "{context}: the documented header {name} is missing");
            }
        }
    }
    match response.pointer("/content/application~1json/schema") {
        None => assert!(body.is_empty(), "{context}: the document says this response has no body"),
        Some(schema) => {
            let value: Value = serde_json::from_slice(body)
                .unwrap_or_else(|e| panic!("{context}: the body is not the documented JSON ({e})"));
            if let Err(problem) = validate(schema, &value) {
                panic!("{context}: {problem}");
            }
        }
    }
}

/// Validates `value` against a (small) JSON schema.
pub fn validate(schema: &Value, value: &Value) -> Result<(), String> {
    let schema = resolve(schema);
    if let Some(kind) = schema.get("type").and_then(Value::as_str) {
        let ok = match kind {
            "object" => value.is_object(),
            "string" => value.is_string(),
            "integer" => value.is_u64() || value.is_i64(),
            "boolean" => value.is_boolean(),
            "array" => value.is_array(),
            "number" => value.is_number(),
            other => return Err(format!("schema type {other} is not supported by this checker")),
        };
        if !ok {
            return Err(format!("{value} is not of type {kind}"));
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        return Err(format!("{value} is not one of the documented values {allowed:?}"));
    }
    if let Some(object) = value.as_object() {
        let properties = schema.get("properties").and_then(Value::as_object);
        for required in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
            let name = required.as_str().unwrap_or_default();
            if !object.contains_key(name) {
                return Err(format!("required property {name} is missing from {value}"));
            }
        }
        for (name, field) in object {
            match properties.and_then(|p| p.get(name)) {
                Some(field_schema) => validate(field_schema, field).map_err(|e| format!("{name}: {e}"))?,
                None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    return Err(format!("property {name} is not documented"));
                }
                None => {}
            }
        }
    }
    Ok(())
}

/// The reasons the document lists for `status` on the push operation.
pub fn documented_reasons(operation_path: &str, method: &str, status: u16) -> Vec<String> {
    let op = &document()["paths"][operation_path][method];
    let Some(response) = op["responses"].get(status.to_string()).map(resolve) else { return Vec::new() };
    let schema = response.pointer("/content/application~1json/schema").map(resolve);
    schema
        .and_then(|s| s.pointer("/properties/reason/enum"))
        .and_then(Value::as_array)
        .map(|values| values.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}
