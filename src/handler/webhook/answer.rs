//! The receiver's answer: done, retried (as long as its `Retry-After` asks) or dead-lettered,
//! with an excerpt of what it said.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::StatusCode;
use reqwest::header::{LOCATION, RETRY_AFTER};

use crate::handler::HandlerError;

/// How much of an error answer's body is kept for the log and the dead-letter list.
pub(super) const EXCERPT_BYTES: usize = 256;

/// How much of a successful answer's body is read, and for how long, to reuse its connection.
const DRAIN_BYTES: usize = 64 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// Classifies the receiver's answer.
pub(super) async fn outcome(response: reqwest::Response) -> Result<(), HandlerError> {
    let status = response.status();
    if status.is_success() {
        // Read the (usually tiny) answer on the side, so the connection goes back to the pool
        // for the next event; the delivery is done either way. The task is bounded in time and
        // owns nothing the daemon waits for at shutdown.
        tokio::spawn(tokio::time::timeout(DRAIN_TIME, read_body(response, DRAIN_BYTES)));
        return Ok(());
    }
    if status.is_redirection() {
        let location = response.headers().get(LOCATION).map(|v| excerpt(v.as_bytes())).unwrap_or_default();
        return Err(HandlerError::permanent(format!(
            "receiver answered {status} (redirects are not followed); location: {location}"
        )));
    }
    let wait = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| retry_after(v, SystemTime::now()));
    let body = body_excerpt(response).await;
    let message = format!("receiver answered {status}: {body}");
    if status == StatusCode::REQUEST_TIMEOUT || status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        let error = HandlerError::retry(message);
        Err(match wait {
            Some(delay) => error.retry_after(delay),
            None => error,
        })
    } else {
        Err(HandlerError::permanent(message))
    }
}

/// A failure to get an answer at all: worth retrying. The error is shown without its URL,
/// which may hold credentials.
pub(super) fn transport_error(error: reqwest::Error) -> HandlerError {
    let error = error.without_url();
    let what = if error.is_timeout() {
        "request timed out"
    } else if error.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    HandlerError::retry(format!("{what}: {}", chain(&error))).with_source(error)
}

/// The first [`EXCERPT_BYTES`] of the answer's body, on one line.
async fn body_excerpt(response: reqwest::Response) -> String {
    let kept = read_body(response, EXCERPT_BYTES + 1).await;
    if kept.is_empty() {
        return "(empty body)".to_owned();
    }
    excerpt(&kept)
}

/// The answer's body up to the end, an error, or the first chunk that makes it `limit` bytes.
async fn read_body(mut response: reqwest::Response, limit: usize) -> Vec<u8> {
    let mut kept = Vec::new();
    while kept.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => kept.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    kept
}

/// Up to [`EXCERPT_BYTES`] of `bytes` as one line of text, `…` marking a cut.
pub(super) fn excerpt(bytes: &[u8]) -> String {
    let cut = bytes.len() > EXCERPT_BYTES;
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(EXCERPT_BYTES)]);
    // A character split by the cut decodes as U+FFFD: drop it.
    let text = if cut { text.trim_end_matches('\u{FFFD}') } else { &text };
    let mut line = text
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if cut {
        line.push('…');
    }
    line
}

/// How long a `Retry-After` value asks to wait: delta-seconds or an HTTP date (IMF-fixdate).
pub(super) fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = UNIX_EPOCH + Duration::from_secs(http_date(value)?);
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Unix seconds of an IMF-fixdate, `Sun, 06 Nov 1994 08:49:37 GMT` (RFC 9110 §5.6.7).
pub(super) fn http_date(text: &str) -> Option<u64> {
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let fields: Vec<&str> = text.split_ascii_whitespace().collect();
    let [weekday, day, month, year, time, "GMT"] = fields[..] else { return None };
    if !weekday.ends_with(',') {
        return None;
    }
    let day: u64 = day.parse().ok()?;
    let month = MONTHS.iter().position(|m| *m == month)? as u64 + 1;
    let year: u64 = year.parse().ok()?;
    let mut hms = time.split(':').map(|p| p.parse::<u64>().ok());
    let (h, m, s) = (hms.next()??, hms.next()??, hms.next()??);
    if hms.next().is_some() || !(1..=31).contains(&day) || year < 1970 || h > 23 || m > 59 || s > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + s)
}

/// Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm), for years from
/// 1970.
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// An error with its sources: "a: b: c".
pub(super) fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
