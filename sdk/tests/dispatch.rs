//! `dispatch` decodes each settlement request into the previous one's allocations on the same
//! thread: the plugin must see exactly what a fresh decode gives, whatever came before —
//! fields absent now but present before, fewer lines, a delegate gone, a malformed request in
//! between.

use std::sync::Mutex;

use cardgate_sdk::{Operation, Plugin, PluginError, SettlementRequest, Split, dispatch};
use serde_json::{Value, json};

/// Records every request it is given; answers the whole bill as cash.
struct Recorder {
    seen: Mutex<Vec<SettlementRequest>>,
    /// The capacity of each request's `lines`: a reused request keeps the larger one.
    capacity: Mutex<Vec<usize>>,
}

impl Plugin for Recorder {
    type Config = ();

    fn new((): ()) -> Result<Self, PluginError> {
        Ok(Self { seen: Mutex::new(Vec::new()), capacity: Mutex::new(Vec::new()) })
    }

    fn quote(&self, request: &SettlementRequest) -> Result<Split, PluginError> {
        self.seen.lock().expect("lock").push(request.clone());
        self.capacity.lock().expect("lock").push(request.lines.capacity());
        Ok(Split {
            funds: Vec::new(),
            account_pay_fen: 0,
            cash_pay_fen: request.due_fen,
            eligible_self_pay_fen: 0,
            eligible_borne_fen: 0,
            year_to_date_delta: Default::default(),
            breakdown: Vec::new(),
        })
    }
}

fn line(code: &str, amount: i64) -> Value {
    json!({ "code": code, "name": format!("item {code}"), "category": "class_a", "quantity": 1,
            "unit_price_fen": amount, "amount_fen": amount })
}

fn requests() -> Vec<Value> {
    let card = json!({ "card_id": "110105199001011234", "holder_name": "张三", "insured_region": "110105",
                       "insurance_types": ["310", "390"],
                       "delegate": { "card_id": "110105196001011111", "name": "李四", "relation": "parent" } });
    let full = json!({
        "settlement_id": "S1", "card": card,
        "institution": { "id": "P1", "level": "pharmacy", "region": "110105" },
        "insurance_type": "310",
        "lines": (0..12).map(|i| line(&format!("X{i:02}"), 100 + i)).collect::<Vec<_>>(),
        "total_fen": 1266, "due_fen": 1266,
        "prior": [{ "payer": "basic-medical", "fund_pay_fen": 5, "account_pay_fen": 6, "eligible_self_pay_fen": 7 }],
        "year_to_date": { "year": 2026, "deductible_fen": 80000, "fund_paid_fen": 1 },
        "use_account": false
    });
    // The same shape with every optional part left out, one line, no delegate, another name.
    let bare = json!({
        "settlement_id": "S2",
        "card": { "card_id": "440305198001012222", "holder_name": "王五", "insured_region": "440305",
                  "insurance_types": ["390"] },
        "institution": { "id": "H2", "level": "tertiary", "region": "440305" },
        "insurance_type": "390", "lines": [line("Y1", 50)], "total_fen": 50, "due_fen": 50
    });
    let mut delegate_without_name = full.clone();
    delegate_without_name["settlement_id"] = json!("S3");
    delegate_without_name["card"]["delegate"] = json!({ "card_id": "110105196001013333", "relation": "child" });
    vec![full.clone(), bare.clone(), full, delegate_without_name, bare]
}

#[test]
fn every_request_is_seen_as_a_fresh_decode_gives_it_whatever_came_before() {
    let plugin = Recorder::new(()).expect("plugin");
    let mut sent = requests();
    // After them, a malformed request (refused; the half-overwritten request is dropped, not
    // kept) and one more.
    sent.push(json!("malformed"));
    sent.push(requests()[0].clone());
    let mut expected = Vec::new();
    for (i, request) in sent.iter().enumerate() {
        let operation = if i % 2 == 0 { Operation::Quote } else { Operation::Settle };
        if request == "malformed" {
            let refused = dispatch(&plugin, operation, br#"{"settlement_id": "broken", "lines": [{"code": 1"#);
            assert!(refused.is_err());
            continue;
        }
        let bytes = serde_json::to_vec(request).expect("encode");
        dispatch(&plugin, operation, &bytes).expect("answer");
        expected.push(serde_json::from_slice::<SettlementRequest>(&bytes).expect("fresh decode"));
    }
    let seen = plugin.seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), expected.len());
    for (i, (seen, expected)) in seen.iter().zip(&expected).enumerate() {
        assert_eq!(seen, expected, "request {i}");
    }
    // Spot checks of the defaults that must come back after a request that set them.
    assert!(seen[1].card.delegate.is_none() && seen[1].prior.is_empty() && seen[1].use_account);
    assert_eq!((seen[1].lines.len(), seen[1].year_to_date.deductible_fen), (1, 0));
    assert_eq!(seen[3].card.delegate.as_ref().map(|d| d.name.clone()), Some(None));
    // The requests were decoded in place: the one-line bills after the twelve-line one still
    // hold room for twelve lines; after the refused request, the next is decoded afresh.
    let capacity = plugin.capacity.lock().expect("lock").clone();
    assert!(capacity[1] >= 12 && capacity[4] >= 12, "{capacity:?}");
    assert_eq!(seen[5].lines.len(), 12);
}
