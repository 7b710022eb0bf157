//! `docs/openapi.json` is kept true against the real handlers: every documented operation is
//! driven with its documented example through a running gateway, every answer's status is
//! documented, and every body has the documented shape (required fields, types, enums).

use std::collections::BTreeSet;

use cardgate_tests::harness::{Card, Options, TestGateway};
use cardgate_tests::workspace_root;
use http::{Method, StatusCode};
use serde_json::{Value, json};

fn document() -> Value {
    let text = std::fs::read_to_string(workspace_root().join("docs/openapi.json")).expect("docs/openapi.json");
    serde_json::from_str(&text).expect("valid JSON")
}

fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(reference) => {
            let name = reference.trim_start_matches("#/components/schemas/");
            &doc["components"]["schemas"][name]
        }
        None => schema,
    }
}

fn type_matches(expected: &Value, value: &Value) -> bool {
    let one = |t: &str| match t {
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        "null" => value.is_null(),
        _ => true,
    };
    match expected {
        Value::String(t) => one(t),
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).any(one),
        _ => true,
    }
}

/// Checks `value` against the subset of JSON Schema the document uses; returns the problems.
fn check(doc: &Value, schema: &Value, value: &Value, at: &str, problems: &mut Vec<String>) {
    let schema = resolve(doc, schema);
    if !type_matches(&schema["type"], value) {
        problems.push(format!("{at}: expected type {}, got {value}", schema["type"]));
        return;
    }
    if let Some(options) = schema["enum"].as_array()
        && !options.contains(value)
    {
        problems.push(format!("{at}: {value} is not one of {options:?}"));
    }
    for required in schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
        if value.get(required).is_none() {
            problems.push(format!("{at}: required `{required}` is missing"));
        }
    }
    if let (Some(properties), Some(object)) = (schema["properties"].as_object(), value.as_object()) {
        for (name, field) in object {
            match properties.get(name) {
                Some(field_schema) => check(doc, field_schema, field, &format!("{at}.{name}"), problems),
                None if schema["additionalProperties"] == false => {
                    problems.push(format!("{at}: `{name}` is not documented"))
                }
                None => {}
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, item) in array.iter().enumerate() {
            check(doc, items, item, &format!("{at}[{i}]"), problems);
        }
    }
}

fn assert_documented(doc: &Value, operation: &Value, status: StatusCode, content_type: &str, body: &str, what: &str) {
    let response = &operation["responses"][status.as_str()];
    assert!(response.is_object(), "{what}: status {status} is not documented ({body})");
    let (media, payload) = response["content"].as_object().and_then(|c| c.iter().next()).expect("a documented body");
    assert_eq!(content_type, media, "{what}: content type");
    let mut problems = Vec::new();
    check(doc, &payload["schema"], &serde_json::from_str(body).expect("a JSON body"), what, &mut problems);
    assert!(problems.is_empty(), "{what}: {problems:#?}\n{body}");
}

fn today() -> String {
    let now = time::OffsetDateTime::now_utc() + time::Duration::hours(8);
    format!("{:04}-{:02}-{:02}", now.year(), u8::from(now.month()), now.day())
}

#[tokio::test]
async fn every_documented_operation_behaves_as_documented() {
    let doc = document();
    let gw = TestGateway::start(Options::default()).await;
    let card = Card::beijing();
    let mut settlement_id = String::new();
    let order = [
        ("/v1/inquiries", "post"),
        ("/v1/quotes", "post"),
        ("/v1/settlements", "post"),
        ("/v1/settlements/{id}", "get"),
        ("/v1/settlements/{id}/reversal", "post"),
        ("/v1/settlements", "get"),
        ("/v1/reconciliation", "get"),
        ("/v1/reconciliation/closures", "post"),
        ("/v1/encounters", "post"),
        ("/v1/encounters/{encounter_id}", "get"),
        ("/v1/encounters/{encounter_id}/fees", "post"),
        ("/v1/encounters/{encounter_id}/fees/{feedetl_sn}", "delete"),
        ("/v1/encounters/{encounter_id}/admission", "post"),
        ("/v1/encounters/{encounter_id}/quotes", "post"),
        ("/v1/encounters/{encounter_id}/settlements", "post"),
        ("/v1/encounters/{encounter_id}/discharge", "post"),
        ("/v1/encounters/{encounter_id}/discharge", "delete"),
        ("/v1/encounters/{encounter_id}/settlements/{settlement_id}/withdrawal", "post"),
    ];
    let (mut encounter_id, mut encounter_settlement) = (String::new(), String::new());
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, ops)| ops.as_object().expect("operations").keys().map(move |m| (path.clone(), m.clone())))
        .collect();
    let driven: BTreeSet<(String, String)> = order.iter().map(|(p, m)| (p.to_string(), m.to_string())).collect();
    assert_eq!(documented, driven, "the document and this test cover the same operations");
    for (template, method) in order {
        let operation = &doc["paths"][template][method];
        let path = template
            .replace("{id}", &settlement_id)
            .replace("{encounter_id}", &encounter_id)
            .replace("{feedetl_sn}", "2")
            .replace("{settlement_id}", &encounter_settlement);
        // A hospital's encounters; the rest as the pharmacy's till.
        let client = if template.starts_with("/v1/encounters") { &gw.hospital } else { &gw.pharmacy };
        let token = gw.token(&card, 120);
        let example = operation["requestBody"]["content"]["application/json"]["example"].to_string();
        let body = example.replace("{{token}}", &token);
        let query = operation["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["in"] == "query" && (p["required"] == true || p.get("example").is_some()))
            .map(|p| {
                format!(
                    "{}={}",
                    p["name"].as_str().unwrap_or_default(),
                    p["example"].as_str().unwrap_or_default().replace("{{today}}", &today())
                )
            })
            .collect::<Vec<_>>()
            .join("&");
        let uri = if query.is_empty() { path.clone() } else { format!("{path}?{query}") };
        let http_method = match method {
            "post" => Method::POST,
            "delete" => Method::DELETE,
            _ => Method::GET,
        };
        let key = format!("openapi-{template}");
        let keyed = ["/v1/settlements", "/v1/encounters", "/v1/encounters/{encounter_id}/settlements"];
        let headers: Vec<(&str, &str)> = if keyed.contains(&template) && method == "post" {
            vec![("idempotency-key", key.as_str())]
        } else {
            vec![]
        };
        let request_body = (method == "post").then_some(body.as_str());
        let reply = client.send(http_method.clone(), &uri, &headers, request_body).await.expect("answer");
        assert!(reply.status.is_success(), "{method} {template}: {} {}", reply.status, reply.body);
        assert_documented(
            &doc,
            operation,
            reply.status,
            &reply.content_type,
            &reply.body,
            &format!("{method} {template}"),
        );
        if template == "/v1/settlements" && method == "post" {
            settlement_id = reply.json()["settlement_id"].as_str().expect("id").to_owned();
        }
        if template == "/v1/encounters" {
            encounter_id = reply.json()["encounter_id"].as_str().expect("id").to_owned();
        }
        if template == "/v1/encounters/{encounter_id}/settlements" {
            encounter_settlement = reply.json()["settlement_id"].as_str().expect("id").to_owned();
        }
        // Refusals are documented too: a bad body, or an unknown id.
        let bad_uri = if settlement_id.is_empty() { uri.clone() } else { uri.replace(&settlement_id, "S-none") };
        let bad = client.send(http_method, &bad_uri, &headers, Some("{}")).await.expect("answer");
        if !bad.status.is_success() {
            assert_documented(
                &doc,
                operation,
                bad.status,
                &bad.content_type,
                &bad.body,
                &format!("{method} {template} refused"),
            );
        }
    }
}

#[test]
fn every_served_endpoint_is_documented() {
    let doc = document();
    let labels: BTreeSet<&str> = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object().expect("operations").keys().map(move |m| {
                let method = match m.as_str() {
                    "post" => Method::POST,
                    "delete" => Method::DELETE,
                    _ => Method::GET,
                };
                let path = path.replace("{id}", "S1").replace("{encounter_id}", "E1").replace("{settlement_id}", "S1");
                cardgate::api::endpoint(&method, &path.replace("{feedetl_sn}", "1"))
            })
        })
        .collect();
    let served: BTreeSet<&str> = [
        "inquiries",
        "quotes",
        "settlements",
        "settlements_list",
        "settlement",
        "reversal",
        "reconciliation",
        "reconciliation_closure",
        "encounters",
        "encounter",
        "encounter_fees",
        "encounter_fee_withdrawal",
        "encounter_admission_change",
        "encounter_quote",
        "encounter_settlement",
        "encounter_discharge",
        "encounter_discharge_withdrawal",
        "encounter_withdrawal",
    ]
    .into();
    assert_eq!(labels, served);
}

/// The request schema an example follows: a `oneOf` branch whose required fields it has.
fn request_schema<'a>(doc: &'a Value, schema: &'a Value, example: &Value) -> &'a Value {
    let schema = resolve(doc, schema);
    let Some(branches) = schema["oneOf"].as_array() else { return schema };
    branches
        .iter()
        .map(|b| resolve(doc, b))
        .find(|b| {
            b["required"].as_array().into_iter().flatten().filter_map(Value::as_str).all(|r| example.get(r).is_some())
        })
        .expect("a branch the example follows")
}

fn required(schema: &Value) -> Vec<String> {
    schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str).map(str::to_owned).collect()
}

/// Request bodies as documented are what the handlers take: a field (or a line field) the
/// document does not list is refused, and so is a body without any field it requires.
#[tokio::test]
async fn request_schemas_say_exactly_what_the_handlers_take() {
    let doc = document();
    let gw = TestGateway::start(Options::default()).await;
    let card = Card::beijing();
    let mut checked = 0;
    for (template, method) in [("/v1/inquiries", "post"), ("/v1/quotes", "post"), ("/v1/settlements", "post")] {
        let content = &doc["paths"][template][method]["requestBody"]["content"]["application/json"];
        let example = content["example"].clone();
        let schema = request_schema(&doc, &content["schema"], &example);
        assert_eq!(schema["additionalProperties"], false, "{template}: the document must say it is closed");
        let send = |body: Value| {
            let (client, token) = (gw.pharmacy.clone(), gw.token(&card, 120));
            let key = format!("drift-{}", cardgate_tests::harness::now_nanos());
            async move {
                let body = body.to_string().replace("{{token}}", &token);
                client
                    .send(Method::POST, template, &[("idempotency-key", key.as_str())], Some(&body))
                    .await
                    .expect("answer")
            }
        };
        assert!(send(example.clone()).await.status.is_success(), "{template}: the example itself is taken");
        let mut extra = example.clone();
        extra["undocumented_field"] = json!(1);
        let refused = send(extra).await;
        assert_eq!(
            (refused.status, refused.json()["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_request")),
            "{template}"
        );
        for field in required(schema) {
            let mut without = example.clone();
            without.as_object_mut().expect("object").remove(&field);
            let reply = send(without).await;
            assert!(
                reply.status.is_client_error(),
                "{template} without required `{field}`: {} {}",
                reply.status,
                reply.body
            );
            checked += 1;
        }
        if example.get("lines").is_some() {
            let line_schema = resolve(&doc, &schema["properties"]["lines"]["items"]);
            assert_eq!(line_schema["additionalProperties"], false, "{template}: lines are closed");
            let mut extra_line = example.clone();
            extra_line["lines"][0]["vat_fen"] = json!(0);
            assert_eq!(
                send(extra_line).await.status,
                StatusCode::BAD_REQUEST,
                "{template}: an undocumented line field"
            );
            for field in required(line_schema) {
                let mut without = example.clone();
                without["lines"][0].as_object_mut().expect("line").remove(&field);
                let reply = send(without).await;
                assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{template} line without `{field}`: {}", reply.body);
                checked += 1;
            }
            // One of each documented pair is required: the price and the amount, ours or national.
            for (field, national) in [("unit_price_fen", "pric"), ("amount_fen", "det_item_fee_sumamt")] {
                assert!(line_schema["properties"][national].is_object(), "{template}: `{national}` is documented");
                let mut without = example.clone();
                without["lines"][0].as_object_mut().expect("line").remove(field);
                let reply = send(without).await;
                assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{template} line without `{field}` or `{national}`");
                checked += 1;
            }
        }
    }
    assert!(checked >= 20, "{checked} required fields checked");
}
