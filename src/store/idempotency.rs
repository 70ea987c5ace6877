//! The `idempotent_requests` table: which create request a request_id was used for, and what
//! it created.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::{Conn, schema::idempotent_requests as ir, with_conn};

/// A recorded request.
#[derive(Debug, Clone, PartialEq, Queryable, Selectable)]
#[diesel(table_name = ir)]
pub(crate) struct Recorded {
    /// The RPC it was for.
    pub method: String,
    /// The validated request, as canonical JSON.
    pub request: String,
    /// What it created, as JSON; `None` only inside the transaction that claimed it.
    pub response: Option<String>,
}

/// Claims `request_id` for this request. Returns `None` if the claim is new, or the earlier
/// request that holds the id. A concurrent claim of the same id waits for the first
/// transaction to end (the primary key), then sees what it recorded.
pub(crate) async fn claim(
    conn: &mut Conn,
    request_id: &str,
    method: &str,
    request: &str,
    now: NaiveDateTime,
) -> QueryResult<Option<Recorded>> {
    let inserted = with_conn!(conn, |c| diesel::insert_into(ir::table)
        .values((
            ir::request_id.eq(request_id),
            ir::method.eq(method),
            ir::request.eq(request),
            ir::created_at.eq(now),
        ))
        .on_conflict_do_nothing()
        .execute(c)
        .await)?;
    if inserted == 1 {
        return Ok(None);
    }
    with_conn!(conn, |c| ir::table
        .find(request_id)
        .select(Recorded::as_select())
        .first(c)
        .await
        .map(Some))
}

/// Records what the claimed request created.
pub async fn record(conn: &mut Conn, request_id: &str, response: &str) -> QueryResult<()> {
    with_conn!(conn, |c| diesel::update(ir::table.find(request_id))
        .set(ir::response.eq(response))
        .execute(c)
        .await
        .map(drop))
}
