//! The bureau's item catalogue: what decides a bill line's class, its class B self-pay share
//! and its price cap — not the class the institution asserts.
//!
//! The file is CSV with a header row, one row per item and validity window:
//!
//! ```text
//! code,name,class,self_pay_bp,price_cap_fen,valid_from,valid_to,restricted
//! XA0001,Amoxicillin capsules,class_a,,,2026-01-01,,false
//! XB0002,CT scan,02,1000,30000,2026-01-01,2026-12-31,false
//! ```
//!
//! - `class`: `class_a` / `class_b` / `class_c`, the national codes `01` / `02` / `03`, or
//!   甲 / 乙 / 丙.
//! - `self_pay_bp` (class B): the share the patient pays first, in basis points; empty: the
//!   payer's general ratio. `price_cap_fen`: the highest unit price the funds count; empty: none.
//! - `valid_from`, `valid_to`: business days (`YYYY-MM-DD`, UTC+8), both included; empty: open.
//!   A code may have several rows whose windows do not overlap (a price or class that changes).
//! - `restricted`: `true` for a restricted-use item; empty: `false`.
//!
//! Every problem of the file is reported at once, with its row.

use std::collections::HashMap;

use cardgate_sdk::{BillLine, CatalogueEntry, Fen, ItemCategory};
use serde::{Deserialize, Serialize};

use crate::config::{CatalogueConfig, LinePolicy};
use crate::ledger::is_business_day;

/// Rows valid in a window.
#[derive(Debug, Clone)]
struct Window {
    from: Option<String>,
    to: Option<String>,
    entry: CatalogueEntry,
}

impl Window {
    fn holds(&self, day: &str) -> bool {
        self.from.as_deref().is_none_or(|f| f <= day) && self.to.as_deref().is_none_or(|t| day <= t)
    }
}

/// A loaded catalogue and what to do with lines it disagrees with.
#[derive(Debug, Clone)]
pub struct Catalogue {
    items: HashMap<String, Vec<Window>>,
    not_in_catalogue: LinePolicy,
    class_mismatch: LinePolicy,
}

/// A line whose class the catalogue changed, as the answer shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reclassified {
    /// The line's index in the bill.
    pub line: usize,
    /// Its code.
    pub code: String,
    /// The class the institution sent.
    pub asserted: ItemCategory,
    /// The class it was settled as.
    pub class: ItemCategory,
    /// `not_in_catalogue` or `class_mismatch`.
    pub reason: String,
}

/// Why a bill is refused under a `refuse` policy: the stable code and the detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// `item_not_in_catalogue` or `item_class_mismatch`.
    pub code: &'static str,
    /// Which line, and why.
    pub detail: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Row {
    code: String,
    #[allow(dead_code)]
    name: String,
    class: String,
    self_pay_bp: Option<u32>,
    price_cap_fen: Option<Fen>,
    valid_from: Option<String>,
    valid_to: Option<String>,
    restricted: Option<bool>,
}

/// A class as the catalogue and the API write it: ours, the national `chrgitm_lv` code or the
/// Chinese name.
pub fn parse_class(text: &str) -> Option<ItemCategory> {
    match text {
        "class_a" | "01" | "甲" | "甲类" => Some(ItemCategory::ClassA),
        "class_b" | "02" | "乙" | "乙类" => Some(ItemCategory::ClassB),
        "class_c" | "03" | "丙" | "丙类" => Some(ItemCategory::ClassC),
        _ => None,
    }
}

fn class_name(class: ItemCategory) -> &'static str {
    match class {
        ItemCategory::ClassA => "class_a",
        ItemCategory::ClassB => "class_b",
        _ => "class_c",
    }
}

impl Catalogue {
    /// Reads the configured catalogue; every problem of the file, with its row.
    pub fn load(config: &CatalogueConfig) -> Result<Self, Vec<String>> {
        let path = &config.path;
        let text = std::fs::read(path).map_err(|e| vec![format!("{}: {e}", path.display())])?;
        let items =
            parse(&text).map_err(|p| p.into_iter().map(|m| format!("{}: {m}", path.display())).collect::<Vec<_>>())?;
        Ok(Self { items, not_in_catalogue: config.not_in_catalogue, class_mismatch: config.class_mismatch })
    }

    /// Items in the catalogue (codes).
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the catalogue has no item.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The entry of `code` valid on `day` (`YYYY-MM-DD`).
    pub fn entry(&self, code: &str, day: &str) -> Option<&CatalogueEntry> {
        self.items.get(code)?.iter().find(|w| w.holds(day)).map(|w| &w.entry)
    }

    /// Classifies a bill's lines for `day`: each line found gets the catalogue's entry and class;
    /// one not found, or asserting another class, is refused or reclassified as configured.
    /// Answers the lines reclassified.
    pub fn classify(&self, lines: &mut [BillLine], day: &str) -> Result<Vec<Reclassified>, Refusal> {
        let mut changed = Vec::new();
        for (index, line) in lines.iter_mut().enumerate() {
            let asserted = line.category;
            let (class, reason) = match self.entry(&line.code, day) {
                None if self.not_in_catalogue == LinePolicy::Refuse => {
                    return Err(Refusal {
                        code: "item_not_in_catalogue",
                        detail: format!("lines[{index}]: code {} is not in the catalogue on {day}", line.code),
                    });
                }
                None => {
                    line.catalogue = None;
                    (ItemCategory::ClassC, "not_in_catalogue")
                }
                Some(entry) if entry.class != asserted && self.class_mismatch == LinePolicy::Refuse => {
                    return Err(Refusal {
                        code: "item_class_mismatch",
                        detail: format!(
                            "lines[{index}]: code {} is {} in the catalogue, not {}",
                            line.code,
                            class_name(entry.class),
                            class_name(asserted)
                        ),
                    });
                }
                Some(entry) => {
                    line.catalogue = Some(entry.clone());
                    (entry.class, "class_mismatch")
                }
            };
            if class != asserted {
                line.category = class;
                changed.push(Reclassified {
                    line: index,
                    code: line.code.clone(),
                    asserted,
                    class,
                    reason: reason.to_owned(),
                });
            }
        }
        Ok(changed)
    }
}

fn parse(text: &[u8]) -> Result<HashMap<String, Vec<Window>>, Vec<String>> {
    let mut reader = csv::ReaderBuilder::new().trim(csv::Trim::All).from_reader(text);
    let mut items: HashMap<String, Vec<Window>> = HashMap::new();
    let mut problems = Vec::new();
    for (index, row) in reader.deserialize::<Row>().enumerate() {
        // Row 1 is the header.
        let at = index + 2;
        let row = match row {
            Ok(row) => row,
            Err(e) => {
                problems.push(format!("row {at}: {e}"));
                continue;
            }
        };
        let mut bad = |m: String| problems.push(format!("row {at}: {m}"));
        if row.code.is_empty() || row.code.len() > 64 {
            bad("code: 1 to 64 characters".into());
        }
        let Some(class) = parse_class(&row.class) else {
            bad(format!("class: `{}` is none of class_a, class_b, class_c (01, 02, 03)", row.class));
            continue;
        };
        if row.self_pay_bp.is_some_and(|bp| bp > 10_000) {
            bad("self_pay_bp: above 10000".into());
        }
        if row.price_cap_fen.is_some_and(|cap| cap < 0) {
            bad("price_cap_fen: negative".into());
        }
        let day = |d: Option<String>| d.filter(|d| !d.is_empty());
        let (from, to) = (day(row.valid_from), day(row.valid_to));
        for (key, d) in [("valid_from", &from), ("valid_to", &to)] {
            if d.as_deref().is_some_and(|d| !is_business_day(d)) {
                bad(format!("{key}: not a date YYYY-MM-DD"));
            }
        }
        if let (Some(f), Some(t)) = (&from, &to)
            && f > t
        {
            bad("valid_from is after valid_to".into());
        }
        let window = Window {
            from,
            to,
            entry: CatalogueEntry {
                class,
                self_pay_bp: row.self_pay_bp,
                price_cap_fen: row.price_cap_fen,
                restricted: row.restricted.unwrap_or(false),
            },
        };
        let windows = items.entry(row.code.clone()).or_default();
        let overlaps = |w: &Window| {
            let starts_before_end = match (&window.from, &w.to) {
                (Some(f), Some(t)) => f <= t,
                _ => true,
            };
            let ends_after_start = match (&window.to, &w.from) {
                (Some(t), Some(f)) => f <= t,
                _ => true,
            };
            starts_before_end && ends_after_start
        };
        if windows.iter().any(overlaps) {
            problems.push(format!("row {at}: code {} has another row valid on some of the same days", row.code));
        }
        windows.push(window);
    }
    if problems.is_empty() { Ok(items) } else { Err(problems) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "code,name,class,self_pay_bp,price_cap_fen,valid_from,valid_to,restricted
XA0001,Amoxicillin,class_a,,,,,
XB0002,CT scan,02,2000,30000,2026-01-01,2026-06-30,false
XB0002,CT scan,02,1500,28000,2026-07-01,,
XC0003,\"Single room, quiet\",丙,,,,,true
";

    fn catalogue(not_in: LinePolicy, mismatch: LinePolicy) -> Catalogue {
        Catalogue { items: parse(FILE.as_bytes()).expect("parses"), not_in_catalogue: not_in, class_mismatch: mismatch }
    }

    fn line(code: &str, category: ItemCategory) -> BillLine {
        BillLine {
            code: code.into(),
            name: "x".into(),
            category,
            quantity: cardgate_sdk::Decimal4::ONE,
            unit_price_fen: cardgate_sdk::Decimal4::from_whole(100).expect("100"),
            amount_fen: 100,
            catalogue: None,
        }
    }

    #[test]
    fn entries_follow_their_validity_windows() {
        let c = catalogue(LinePolicy::Reclassify, LinePolicy::Reclassify);
        assert_eq!(c.len(), 3);
        assert_eq!(c.entry("XB0002", "2026-03-01").and_then(|e| e.self_pay_bp), Some(2000));
        assert_eq!(c.entry("XB0002", "2026-06-30").and_then(|e| e.price_cap_fen), Some(30000));
        assert_eq!(c.entry("XB0002", "2026-07-01").and_then(|e| e.self_pay_bp), Some(1500));
        assert!(c.entry("XB0002", "2025-12-31").is_none());
        assert_eq!(
            c.entry("XC0003", "2026-01-01").map(|e| (e.class, e.restricted)),
            Some((ItemCategory::ClassC, true))
        );
    }

    #[test]
    fn the_catalogue_decides_the_class_or_refuses_as_configured() {
        let mut lines = vec![
            line("XA0001", ItemCategory::ClassA),
            line("XC0003", ItemCategory::ClassA),
            line("ZZ9", ItemCategory::ClassB),
        ];
        let c = catalogue(LinePolicy::Reclassify, LinePolicy::Reclassify);
        let changed = c.classify(&mut lines, "2026-03-01").expect("reclassifies");
        assert_eq!(
            changed.iter().map(|r| (r.line, r.class, r.reason.as_str())).collect::<Vec<_>>(),
            [(1, ItemCategory::ClassC, "class_mismatch"), (2, ItemCategory::ClassC, "not_in_catalogue")]
        );
        assert_eq!(lines[1].category, ItemCategory::ClassC);
        assert!(lines[0].catalogue.is_some() && lines[2].catalogue.is_none());

        let mut lines = vec![line("XC0003", ItemCategory::ClassA)];
        let refusal = catalogue(LinePolicy::Reclassify, LinePolicy::Refuse).classify(&mut lines, "2026-03-01");
        assert_eq!(refusal.map_err(|r| r.code), Err("item_class_mismatch"));
        let mut lines = vec![line("ZZ9", ItemCategory::ClassC)];
        let refusal = catalogue(LinePolicy::Refuse, LinePolicy::Refuse).classify(&mut lines, "2026-03-01");
        assert_eq!(refusal.map_err(|r| r.code), Err("item_not_in_catalogue"));
    }

    #[test]
    fn every_problem_of_a_file_is_reported_with_its_row() {
        let bad = "code,name,class,self_pay_bp,price_cap_fen,valid_from,valid_to,restricted
A1,a,class_d,,,,,
A2,b,01,20000,-5,2026-13-01,,
A3,c,01,,,2026-05-01,2026-04-01,
A5,c,01,,,2026-01-01,2026-06-30,
A5,c,01,,,2026-06-01,,
A4,d,01,,,,,maybe
";
        let problems = parse(bad.as_bytes()).expect_err("refused");
        let text = problems.join("\n");
        for expected in [
            "row 2: class",
            "row 3: self_pay_bp",
            "row 3: price_cap_fen",
            "row 3: valid_from",
            "row 4: valid_from is after",
            "row 6: code A5 has another row",
            "row 7:",
        ] {
            assert!(text.contains(expected), "{expected} in:\n{text}");
        }
    }
}
