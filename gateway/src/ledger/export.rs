//! A business day's events as CSV, for finance: `cardgate ledger export` (the ledger opened
//! by the command) and `GET /admin/ledger/export` (the running gateway's own ledger — the only
//! way while it runs on an engine that allows one process at a time).

use super::{Ledger, LedgerError};

/// The first line of every export.
pub const HEADER: &str = "institution_id,event,settlement_id,state,terminal_id,card,created_at,total_fen,fund_pay_fen,\
account_pay_fen,cash_pay_fen,insurance_type,clearing_type\n";

/// Events read from the ledger at a time: each page is handed on as one piece of CSV. Each
/// page reads the whole day again (its order), so fewer, larger pages: a day of 100,000 events
/// took 23.5 s in pages of 1,000 and 3.1 s in pages of 10,000 (SQLite, docs/BENCHMARKS.md), a
/// page a few MiB while it is written out.
pub const PAGE: u32 = 10_000;

/// Each institution's events of `date` (settlements made that day and reversals made that
/// day), page by page: each page's lines go to `sink` as one piece of CSV, which answers
/// whether to go on (false: its reader went away). Answers how many lines were handed on.
pub async fn day_csv<F: Future<Output = bool>>(
    ledger: &dyn Ledger,
    institutions: &[String],
    date: &str,
    mut sink: impl FnMut(String) -> F,
) -> Result<u64, LedgerError> {
    let mut lines = 0u64;
    for id in institutions {
        for page in 1.. {
            let details = ledger.day_details(id, date, page, PAGE).await?;
            let mut csv = String::with_capacity(details.len() * 160);
            for d in &details {
                csv += &format!(
                    "{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
                    field(id),
                    d.event,
                    field(&d.settlement_id),
                    d.state,
                    field(&d.terminal_id),
                    field(&d.card),
                    d.created_at,
                    d.total_fen,
                    d.fund_pay_fen,
                    d.account_pay_fen,
                    d.cash_pay_fen,
                    field(&d.insurance_type),
                    field(&d.clearing_type)
                );
            }
            lines += details.len() as u64;
            if !csv.is_empty() && !sink(csv).await {
                return Ok(lines);
            }
            if details.len() < PAGE as usize {
                break;
            }
        }
    }
    Ok(lines)
}

/// The characters a spreadsheet reads as the start of a formula (OWASP's list for CSV
/// injection, CWE-1236).
const FORMULA_START: [char; 6] = ['=', '+', '-', '@', '\t', '\r'];

/// Quotes a CSV field when it needs it. A text field that a spreadsheet would run as a formula
/// (a till may name its terminal `=HYPERLINK(...)`, and finance opens the export in one) is
/// written as text: quoted, after a `'`. Amounts, times and states are the gateway's own and
/// never pass through here.
fn field(value: &str) -> String {
    if value.starts_with(FORMULA_START) {
        format!("\"'{}\"", value.replace('"', "\"\""))
    } else if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_quoted_only_when_they_must_be() {
        assert_eq!(field("POS-01"), "POS-01");
        assert_eq!(field("a,b"), "\"a,b\"");
        assert_eq!(field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(field("two\nlines"), "\"two\nlines\"");
        assert_eq!(field("POS-01-"), "POS-01-");
    }

    #[test]
    fn a_field_a_spreadsheet_would_run_is_written_as_text() {
        assert_eq!(field("=HYPERLINK(\"http://x\",\"y\")"), "\"'=HYPERLINK(\"\"http://x\"\",\"\"y\"\")\"");
        assert_eq!(field("+1"), "\"'+1\"");
        assert_eq!(field("-2+3"), "\"'-2+3\"");
        assert_eq!(field("@SUM(A1)"), "\"'@SUM(A1)\"");
        assert_eq!(field("\tx"), "\"'\tx\"");
        assert_eq!(field("\rx"), "\"'\rx\"");
    }
}
