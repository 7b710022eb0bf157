//! `docs/openapi.json` is kept true against the real handlers: every documented operation is
//! driven with its documented example through a running gateway; what is sent (body, path
//! parameters, headers) is what the document allows, every answer's status is documented, and
//! every body has the documented shape (required fields, types, enums, lengths, patterns,
//! bounds, formats, the groups of names given one of). `tests/conformance/run` goes further,
//! with generated requests.

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
    check_bounds(schema, value, at, problems);
    for part in schema["allOf"].as_array().into_iter().flatten() {
        check(doc, part, value, at, problems);
    }
    let passing = |branches: &Vec<Value>| {
        branches
            .iter()
            .filter(|branch| {
                let mut found = Vec::new();
                check(doc, branch, value, at, &mut found);
                found.is_empty()
            })
            .count()
    };
    if let Some(branches) = schema["oneOf"].as_array()
        && passing(branches) != 1
    {
        problems.push(format!("{at}: {} of oneOf {branches:?} hold, not exactly one", passing(branches)));
    }
    if let Some(excluded) = schema.get("not") {
        let mut found = Vec::new();
        check(doc, excluded, value, at, &mut found);
        if found.is_empty() {
            problems.push(format!("{at}: holds `not` {excluded}"));
        }
    }
    if let Some(branches) = schema["anyOf"].as_array()
        && passing(branches) == 0
    {
        problems.push(format!("{at}: none of anyOf {branches:?} holds"));
    }
}

/// The document's limits on one value: lengths and `pattern` of a string (JSON Schema applies
/// them to strings only), bounds of a number, sizes of an array, and the `date`/`date-time`
/// formats.
fn check_bounds(schema: &Value, value: &Value, at: &str, problems: &mut Vec<String>) {
    let limit = |key: &str| schema[key].as_u64().map(|n| n as usize);
    if let Some(text) = value.as_str() {
        let chars = text.chars().count();
        if limit("minLength").is_some_and(|n| chars < n) || limit("maxLength").is_some_and(|n| chars > n) {
            problems
                .push(format!("{at}: {chars} characters, outside {}..={}", schema["minLength"], schema["maxLength"]));
        }
        if let Some(pattern) = schema["pattern"].as_str() {
            let regex = regex::Regex::new(pattern).unwrap_or_else(|e| panic!("{at}: pattern {pattern}: {e}"));
            if !regex.is_match(text) {
                problems.push(format!("{at}: {text:?} does not match {pattern}"));
            }
        }
        let parses = match schema["format"].as_str() {
            Some("date-time") => {
                time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).is_ok()
            }
            Some("date") => time::Date::parse(text, time::macros::format_description!("[year]-[month]-[day]")).is_ok(),
            _ => true,
        };
        if !parses {
            problems.push(format!("{at}: {text:?} is not a {}", schema["format"]));
        }
    }
    if let Some(number) = value.as_f64() {
        let below = schema["minimum"].as_f64().is_some_and(|m| number < m);
        if below || schema["maximum"].as_f64().is_some_and(|m| number > m) {
            problems.push(format!("{at}: {value} outside {}..={}", schema["minimum"], schema["maximum"]));
        }
    }
    if let Some(array) = value.as_array()
        && (limit("minItems").is_some_and(|n| array.len() < n) || limit("maxItems").is_some_and(|n| array.len() > n))
    {
        problems.push(format!("{at}: {} items, outside {}..={}", array.len(), schema["minItems"], schema["maxItems"]));
    }
}

/// Checks a request the test is about to send against what the document says the operation
/// takes: its body, its path parameters and its headers. A real client validating against the
/// document must be able to send what the gateway takes.
fn assert_request_documented(
    doc: &Value,
    operation: &Value,
    path_values: &[(&str, &str)],
    headers: &[(&str, &str)],
    body: Option<&str>,
    what: &str,
) {
    let mut problems = Vec::new();
    for parameter in operation["parameters"].as_array().into_iter().flatten() {
        let name = parameter["name"].as_str().unwrap_or_default();
        let given = match parameter["in"].as_str() {
            Some("path") => path_values.iter().find(|(n, _)| *n == name).map(|(_, v)| *v),
            Some("header") => headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| *v),
            _ => continue,
        };
        match given {
            Some(given) => check(doc, &parameter["schema"], &json!(given), &format!("{what} {name}"), &mut problems),
            None if parameter["required"] == true => problems.push(format!("{what}: required {name} not sent")),
            None => {}
        }
    }
    if let Some(body) = body {
        let schema = &operation["requestBody"]["content"]["application/json"]["schema"];
        check(doc, schema, &serde_json::from_str(body).expect("a JSON body"), &format!("{what} body"), &mut problems);
    }
    assert!(
        problems.is_empty(),
        "{what}: the request the gateway takes is not what the document allows: {problems:#?}"
    );
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
        let path_values = [
            ("id", settlement_id.as_str()),
            ("encounter_id", encounter_id.as_str()),
            ("feedetl_sn", "2"),
            ("settlement_id", encounter_settlement.as_str()),
        ];
        let what = format!("{method} {template}");
        let documented_body = request_body.filter(|_| operation["requestBody"].is_object());
        assert_request_documented(&doc, operation, &path_values, &headers, documented_body, &what);
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
        }
    }
    // The pairs a line or a bill needs one of (a bill's total: total_fen or medfee_sumamt) are
    // checked in `the_national_names_are_what_the_gateway_takes`.
    assert!(checked >= 12, "{checked} required fields checked");
}

/// Every `{name}` in a path is a declared, required path parameter of each of its operations,
/// and every declared path parameter is in the path: what OpenAPI requires, and what client
/// generators and conformance tools read (without it they cannot call the operation at all).
#[test]
fn every_path_parameter_is_declared() {
    let doc = document();
    let mut checked = 0;
    for (path, operations) in doc["paths"].as_object().expect("paths") {
        let in_path: BTreeSet<&str> =
            path.split('/').filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}'))).collect();
        for (method, operation) in operations.as_object().expect("operations") {
            let declared: BTreeSet<&str> = operation["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["in"] == "path")
                .inspect(|p| assert_eq!(p["required"], true, "{method} {path}: {} must be required", p["name"]))
                .filter_map(|p| p["name"].as_str())
                .collect();
            assert_eq!(declared, in_path, "{method} {path}: declared path parameters");
            checked += in_path.len();
        }
    }
    assert!(checked >= 13, "{checked} path parameters checked");
}

/// Where the gateway takes a field under our name or the national one, the document says so
/// and the two agree: of a bill line's `category` / `chrgitm_lv`, `quantity` / `cnt` and
/// `unit_price_fen` / `pric` exactly one is given (neither or both is refused), of
/// `amount_fen` / `det_item_fee_sumamt` at least one; the bill's optional `institution_id` /
/// `fixmedins_code` and `insurance_type` / `insutype` are given under one name or not at all.
#[tokio::test]
async fn the_national_names_are_what_the_gateway_takes() {
    let doc = document();
    let gw = TestGateway::start(Options::default()).await;
    let card = Card::beijing();
    let content = &doc["paths"]["/v1/settlements"]["post"]["requestBody"]["content"]["application/json"];
    let example = content["example"].clone();
    let line = example["lines"][0].clone();
    let yuan = |fen: &Value| json!(format!("{:.2}", fen.as_f64().expect("fen") / 100.0));
    // Each name of ours, its national name and a value for it; `None`: ours is in the example.
    let national = |ours: &str| -> (&str, Value, Option<Value>) {
        match ours {
            "category" => ("chrgitm_lv", line["category"].clone(), None),
            "quantity" => ("cnt", line["quantity"].clone(), None),
            "unit_price_fen" => ("pric", yuan(&line["unit_price_fen"]), None),
            "amount_fen" => ("det_item_fee_sumamt", yuan(&line["amount_fen"]), None),
            "institution_id" => {
                ("fixmedins_code", json!(cardgate::dev::PHARMACY), Some(json!(cardgate::dev::PHARMACY)))
            }
            "insurance_type" => ("insutype", json!("310"), Some(json!("310"))),
            "total_fen" => ("medfee_sumamt", yuan(&example["total_fen"]), None),
            other => panic!("no national name for {other}"),
        }
    };
    // (group, in a line?) for every group of names the document gives the line and the bill.
    let groups = |schema: &str| {
        let schema = resolve(&doc, &doc["components"]["schemas"][schema]);
        schema["allOf"].as_array().cloned().expect("the groups of names")
    };
    let all: Vec<(Value, bool)> = groups("BillLine")
        .into_iter()
        .map(|g| (g, true))
        .chain(groups("Bill").into_iter().map(|g| (g, false)))
        .collect();
    let mut checked = 0;
    for (group, in_line) in all {
        let (kind, inner) = group.as_object().and_then(|g| g.iter().next()).expect("one keyword");
        let names: Vec<&str> = match kind.as_str() {
            "not" => inner["required"].as_array().expect("names").iter().filter_map(Value::as_str).collect(),
            _ => inner.as_array().expect("branches").iter().filter_map(|b| b["required"][0].as_str()).collect(),
        };
        let (ours, theirs) = (names[0], names[1]);
        let (expected, national_value, our_value) = national(ours);
        assert_eq!(expected, theirs, "the pair {names:?}");
        let base = if in_line { line.clone() } else { example.clone() };
        let our_value = our_value.unwrap_or_else(|| base[ours].clone());
        let mut neither = base;
        neither.as_object_mut().expect("object").remove(ours);
        let mut alone = neither.clone();
        alone[theirs] = national_value;
        let mut both = alone.clone();
        both[ours] = our_value.clone();
        // A client that writes every field sends the other name as null: where the gateway
        // reads null as "not given" (the prices and amounts of a line), the document says so.
        let mut with_null = neither.clone();
        with_null[ours] = our_value;
        with_null[theirs] = Value::Null;
        let null_is_absent = matches!(ours, "unit_price_fen" | "amount_fen" | "total_fen");
        let variants = [
            ("neither", neither, kind == "not"),
            ("the national name alone", alone, true),
            ("both", both, kind == "anyOf"),
            ("ours, and the national name null", with_null, null_is_absent),
        ];
        for (how, variant, taken) in variants {
            let mut body = if in_line { example.clone() } else { variant.clone() };
            if in_line {
                body["lines"][0] = variant;
            }
            body["token"] = json!(gw.token(&card, 120));
            let mut problems = Vec::new();
            check(&doc, &content["schema"], &body, "body", &mut problems);
            assert_eq!(problems.is_empty(), taken, "{ours}/{theirs}, {how}: the document says {problems:?}");
            let key = format!("names-{}", cardgate_tests::harness::now_nanos());
            let text = body.to_string();
            let reply = gw
                .pharmacy
                .send(Method::POST, "/v1/settlements", &[("idempotency-key", key.as_str())], Some(&text))
                .await;
            let reply = reply.expect("answer");
            assert_eq!(reply.status.is_success(), taken, "{ours}/{theirs}, {how}: {} {}", reply.status, reply.body);
            if !taken {
                assert_eq!(reply.json()["code"], "invalid_request", "{ours}/{theirs}, {how}");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 28, "seven pairs, four ways each");
}
