//! The operations behind the RPCs. Each write is one transaction that loads what the rules in
//! [`crate::domain`] need, asks them, and writes through [`crate::store`]; a request that fails
//! anywhere writes nothing.

pub mod access;
mod completion;
pub mod delegations;
pub mod expiry;
pub mod instances;
pub mod tasks;

use chrono::DateTime;

use crate::{
    domain::limits,
    error::Error,
    store::{Conn, Cursor, idempotency, is_unique_violation, now},
};

/// One page of a listing.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    /// The records of this page.
    pub items: Vec<T>,
    /// Where the next page starts; empty on the last page.
    pub next_page_token: String,
}

/// A request for one page: a size already checked by [`limits::page_size`], and the token.
#[derive(Debug, Clone, Default)]
pub struct PageRequest {
    /// How many records at most.
    pub size: usize,
    /// `next_page_token` of the previous page; empty for the first.
    pub token: String,
}

impl<T> Page<T> {
    /// Cuts `rows` (read with a limit of `size + 1`) to `size`, and makes the next page's token
    /// from the last row kept if there were more.
    fn cut(mut rows: Vec<T>, size: usize, token: impl Fn(&T) -> String) -> Self {
        let next_page_token = if rows.len() > size {
            rows.truncate(size);
            rows.last().map(token).unwrap_or_default()
        } else {
            String::new()
        };
        Page {
            items: rows,
            next_page_token,
        }
    }
}

/// Decodes an id page token; a token that is not one this server made is INVALID_ARGUMENT.
fn id_cursor(token: &str) -> Result<Option<String>, Error> {
    limits::optional_id("page_token", token)
        .map_err(|_| Error::invalid("page_token", "is not a token from a previous page"))
}

/// Encodes a `(delegated_at, id)` cursor as `MICROS~ID`.
fn encode_cursor((at, id): &Cursor) -> String {
    format!("{}~{id}", at.and_utc().timestamp_micros())
}

/// Decodes a `MICROS~ID` page token.
fn decode_cursor(token: &str) -> Result<Option<Cursor>, Error> {
    if token.is_empty() {
        return Ok(None);
    }
    let forged = || Error::invalid("page_token", "is not a token from a previous page");
    let (micros, id) = token.split_once('~').ok_or_else(forged)?;
    let at = micros
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(forged)?;
    limits::id("page_token", id).map_err(|_| forged())?;
    Ok(Some((at.naive_utc(), id.to_owned())))
}

/// For a create request carrying a request_id: claims the id inside the caller's transaction
/// and returns `None` to go ahead, or the record the first request with this id created.
/// ALREADY_EXISTS if the id was used for a different request.
async fn replay<T: serde::de::DeserializeOwned>(
    conn: &mut Conn,
    request_id: Option<&str>,
    method: &'static str,
    request: &impl serde::Serialize,
) -> Result<Option<T>, Error> {
    let Some(request_id) = request_id else {
        return Ok(None);
    };
    let request = serde_json::to_string(request).map_err(|e| Error::Internal(e.to_string()))?;
    let Some(earlier) = idempotency::claim(conn, request_id, method, &request, now()).await? else {
        return Ok(None);
    };
    if earlier.method != method || earlier.request != request {
        return Err(Error::AlreadyExists {
            entity: "request",
            id: format!(
                "{} (it was used for a different {} request)",
                // Without the caller's scope (see `Caller::request_key`).
                request_id.rsplit('/').next().unwrap_or(request_id),
                earlier.method
            ),
        });
    }
    let response = earlier
        .response
        .ok_or_else(|| Error::Internal("unrecorded request".into()))?;
    serde_json::from_str(&response)
        .map(Some)
        .map_err(|e| Error::Internal(e.to_string()))
}

/// Records what a claimed request created, for its retries.
async fn remember(
    conn: &mut Conn,
    request_id: Option<&str>,
    created: &impl serde::Serialize,
) -> Result<(), Error> {
    let Some(request_id) = request_id else {
        return Ok(());
    };
    let response = serde_json::to_string(created).map_err(|e| Error::Internal(e.to_string()))?;
    Ok(idempotency::record(conn, request_id, &response).await?)
}

/// A new random, time-ordered id.
fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Maps a unique violation on insert to ALREADY_EXISTS for `entity` `id`.
fn taken(entity: &'static str, id: &str) -> impl FnOnce(diesel::result::Error) -> Error {
    move |err| {
        if is_unique_violation(&err) {
            Error::AlreadyExists {
                entity,
                id: id.to_owned(),
            }
        } else {
            err.into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::now;

    #[test]
    fn cursors_round_trip_and_forgeries_are_refused() {
        let cursor = (now(), "0193a1b2-0000-7000-8000-000000000000".to_owned());
        assert_eq!(
            decode_cursor(&encode_cursor(&cursor)).unwrap(),
            Some(cursor)
        );
        assert_eq!(decode_cursor("").unwrap(), None);
        for forged in [
            "x",
            "12~",
            "abc~id",
            "1~a b",
            "99999999999999999999~id",
            "1~'; --",
        ] {
            let err = decode_cursor(forged).unwrap_err();
            assert!(err.to_string().starts_with("page_token: "), "{forged}");
        }
        assert!(id_cursor("a/b").is_err());
        assert_eq!(id_cursor("").unwrap(), None);
    }

    #[test]
    fn pages_are_cut_at_their_size() {
        let page = Page::cut(vec![1, 2, 3], 2, |n| n.to_string());
        assert_eq!(
            page,
            Page {
                items: vec![1, 2],
                next_page_token: "2".into()
            }
        );
        let last = Page::cut(vec![1, 2], 2, |n| n.to_string());
        assert_eq!(last.next_page_token, "");
    }
}
