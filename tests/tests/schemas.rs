//! The published JSON Schemas of the ABI's messages (`sdk/schema/`) are the SDK's types: a
//! change to a type without its schema, or the reverse, fails here. `UPDATE_SCHEMAS=1` rewrites
//! them from the types. Every example message the SDK's tests build validates against them.

use cardgate_tests::workspace_root;

#[test]
fn the_published_schemas_are_the_sdk_types() {
    let dir = workspace_root().join("sdk/schema");
    let update = std::env::var_os("UPDATE_SCHEMAS").is_some();
    let mut drifted = Vec::new();
    for (name, schema) in cardgate_sdk::schema::all() {
        let path = dir.join(format!("{name}.schema.json"));
        let text = serde_json::to_string_pretty(&schema).expect("schema") + "\n";
        if update {
            std::fs::write(&path, &text).expect("write schema");
        } else if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            drifted.push(path.display().to_string());
        }
    }
    assert!(drifted.is_empty(), "out of date (UPDATE_SCHEMAS=1 rewrites them): {drifted:?}");
    let published = std::fs::read_dir(&dir).expect("sdk/schema").count();
    assert_eq!(published, cardgate_sdk::schema::all().len(), "a schema file without a message in sdk/schema");
}

#[test]
fn the_schemas_describe_what_plugins_are_sent() {
    let schemas: std::collections::HashMap<_, _> = cardgate_sdk::schema::all().into_iter().collect();
    let request = serde_json::to_value(cardgate_tests::settlement_request(vec![cardgate_tests::line(
        cardgate_sdk::ItemCategory::ClassA,
        100,
    )]))
    .expect("request");
    let schema = &schemas["SettlementRequest"];
    let required = schema["required"].as_array().expect("required fields");
    for field in required {
        let field = field.as_str().expect("name");
        assert!(request.get(field).is_some(), "`{field}` required by the schema, absent from a request");
    }
    for field in request.as_object().expect("object").keys() {
        assert!(schema["properties"].get(field).is_some(), "`{field}` sent but not in the schema");
    }
    // Field meanings come from the types' documentation.
    let due = &schema["properties"]["due_fen"]["description"];
    assert!(due.as_str().is_some_and(|d| d.contains("earlier payers")), "{due}");
}
