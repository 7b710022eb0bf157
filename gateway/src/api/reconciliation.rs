//! Reconciliation: an institution's business day (UTC+8) as its bureau reconciles it, and
//! closing it.
//!
//! A settlement counts on the day it was made, a reversal on the day it was made (with the
//! detail line flagged `reversed`), so a day's totals never change once it is over. Closing
//! a day fixes them formally: the ledger keeps the totals of the moment it was closed and
//! answers those ever after, and no later event can land on it — a correction (a reversal)
//! lands on the day it is made.

use http::StatusCode;
use serde::Deserialize;
use serde_json::json;

use super::flow::{business_date, query_pairs};
use super::{ApiError, ApiResponse, Identity};
use crate::ledger::{ClosedDay, LedgerError, Reconciliation, UTC_OFFSET_SECS, business_day};
use crate::service::Gateway;

/// How long after a day ends it can be closed: longer than any settlement or reversal takes
/// from the moment it is dated to its commit, so nothing dated on a day commits after it
/// was closed.
pub const CLOSE_GRACE_SECS: i64 = 600;

/// `GET /v1/reconciliation?date=YYYY-MM-DD[&page=N][&page_size=M]`: the calling institution's
/// business day (UTC+8): settled totals, reversals, net, per payer, per insurance type and
/// clearing type, and one page of details; for a closed day, the totals fixed when it closed.
pub async fn get(gateway: &Gateway, identity: &Identity, query: Option<&str>) -> Result<ApiResponse, ApiError> {
    let mut date = None;
    let (mut page, mut page_size) = (1u32, 100u32);
    for (key, value) in query_pairs(query)? {
        let number = |v: &str| v.parse::<u32>().map_err(|_| ApiError::invalid(format!("{key}: not a number")));
        match key {
            "date" => date = Some(business_date(value)?),
            "page" => page = number(&value)?,
            "page_size" => page_size = number(&value)?,
            other => return Err(ApiError::invalid(format!("unknown query parameter `{other}`"))),
        }
    }
    let date = date.ok_or_else(|| ApiError::invalid("date: required, YYYY-MM-DD"))?;
    if page == 0 || !(1..=1000).contains(&page_size) {
        return Err(ApiError::invalid("page: from 1; page_size: 1 to 1000"));
    }
    let day = day(gateway, &identity.institution, &date, page, page_size).await?;
    answer(StatusCode::OK, &day, identity)
}

/// `POST /v1/reconciliation/closures` with `{"date": "YYYY-MM-DD"}`: closes the calling
/// institution's day (national 3201's confirmation): from then on its totals are the ones
/// answered now. The day must be over (its end plus [`CLOSE_GRACE_SECS`]) and hold no
/// settlement still pending or unknown. Closing a closed day answers its first closing.
pub async fn close(gateway: &Gateway, identity: &Identity, body: CloseBody) -> Result<ApiResponse, ApiError> {
    let date = business_date(body.date)?;
    let institution = identity.institution.as_str();
    if let Some(closed) = gateway.ledger.closed_day(institution, &date).await? {
        return answer(StatusCode::OK, &closed_day(gateway, institution, &date, 1, 100, &closed).await?, identity);
    }
    let now = gateway.clock.now();
    let closable_from = day_start(&date).map(|start| start + 86_400 + CLOSE_GRACE_SECS);
    if closable_from.is_none_or(|from| now < from) {
        return Err(ApiError::client(
            StatusCode::CONFLICT,
            "day_not_over",
            format!(
                "{date} is not over: a day can be closed from {} minutes after its end (UTC+8); today is {}",
                CLOSE_GRACE_SECS / 60,
                business_day(now)
            ),
        ));
    }
    let open = gateway
        .ledger
        .unresolved()
        .await?
        .into_iter()
        .filter(|u| u.institution == institution && business_day(u.created_at) == date)
        .count();
    if open > 0 {
        return Err(ApiError::client(
            StatusCode::CONFLICT,
            "day_has_unresolved",
            format!(
                "{open} settlement(s) of {date} are still pending or unknown: retry them (or let the gateway resolve \
                 them) before closing the day"
            ),
        ));
    }
    let live = gateway.ledger.reconciliation(institution, &date, 1, 100).await?;
    let totals = serde_json::to_string(&live.day_totals()).map_err(|e| LedgerError::Storage(e.to_string()))?;
    let closed = gateway.ledger.close_day(institution, &date, ClosedDay { closed_at: now, totals }).await?;
    tracing::info!(institution, date, "business day closed");
    let day = live.closed(&closed)?;
    answer(StatusCode::OK, &day, identity)
}

/// `POST /v1/reconciliation/closures`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloseBody {
    /// The business day to close, `YYYY-MM-DD` (UTC+8).
    pub date: String,
}

/// A day as answered: live, or as it was closed.
async fn day(
    gateway: &Gateway,
    institution: &str,
    date: &str,
    page: u32,
    page_size: u32,
) -> Result<Reconciliation, ApiError> {
    match gateway.ledger.closed_day(institution, date).await? {
        Some(closed) => closed_day(gateway, institution, date, page, page_size, &closed).await,
        None => Ok(gateway.ledger.reconciliation(institution, date, page, page_size).await?),
    }
}

/// A closed day: the totals fixed when it closed, and one page of its lines (read alone: the
/// live sums were two thirds of a page on SQLite).
async fn closed_day(
    gateway: &Gateway,
    institution: &str,
    date: &str,
    page: u32,
    page_size: u32,
    closed: &ClosedDay,
) -> Result<Reconciliation, ApiError> {
    let details = gateway.ledger.day_details(institution, date, page, page_size).await?;
    let day = Reconciliation { date: date.to_owned(), details, page, page_size, ..Reconciliation::default() };
    Ok(day.closed(closed)?)
}

fn answer(status: StatusCode, day: &Reconciliation, identity: &Identity) -> Result<ApiResponse, ApiError> {
    let mut answer = serde_json::to_value(day).map_err(|e| LedgerError::Storage(e.to_string()))?;
    answer["institution_id"] = json!(identity.institution);
    Ok(ApiResponse::json(status, answer.to_string()))
}

/// The first moment (seconds since the epoch) of a business day.
fn day_start(date: &str) -> Option<i64> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let day = time::Date::parse(date, &format).ok()?;
    Some(day.midnight().assume_utc().unix_timestamp() - UTC_OFFSET_SECS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_day_starts_at_midnight_in_china() {
        // 2026-12-01T00:00:00+08:00 is 2026-11-30T16:00:00Z.
        assert_eq!(day_start("2026-12-01"), Some(1_796_054_400));
        assert_eq!(business_day(1_796_054_400), "2026-12-01");
        assert_eq!(business_day(1_796_054_399), "2026-11-30");
        assert_eq!(day_start("2026-02-30"), None);
    }
}
