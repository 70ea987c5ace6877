//! Raw SQL written once for both backends: the [`Sql`] renderer (numbered parameters bound as
//! often as they appear, kept prepared), SQL list helpers built from the domain's constants,
//! the stored form of "now", and the paging [`Cursor`].

use std::marker::PhantomData;

use chrono::{NaiveDateTime, SubsecRound, Utc};
use diesel::{
    QueryResult,
    backend::Backend,
    query_builder::{AstPass, Query, QueryFragment, QueryId},
    serialize::ToSql,
    sql_types::{HasSqlType, Untyped},
};

use super::Conn;

/// A position in a list ordered by creation time, then id: the last row of the previous page.
pub(crate) type Cursor = (NaiveDateTime, String);

/// Raw SQL, like `diesel::sql_query`, but kept as a prepared statement per connection (keyed by
/// its text). Diesel never caches `sql_query`, so PostgreSQL plans it again on every call, which
/// for the recursive queries here costs more than running them.
///
/// Write `$N` for the N-th `.bind::<SqlType, _>(value)`, as often and in any order: each one
/// is rendered as a placeholder of its own (`$k` on PostgreSQL, `?` on SQLite) with the value
/// bound again, so SQLite's numbering of `$N` by first appearance does not matter.
#[derive(Debug, Clone, Copy)]
pub struct Sql<'a>(&'a str);

/// A [`Sql`] query.
pub fn sql(text: &str) -> Sql<'_> {
    Sql(text)
}

/// A [`Sql`] query with its parameters so far; the last one bound is `value`.
#[derive(Debug, Clone, Copy)]
pub struct Bound<Q, V, ST> {
    earlier: Q,
    value: V,
    sql_type: PhantomData<ST>,
}

/// Binding the next parameter, for [`Sql`] and [`Bound`].
pub trait Bind: Sized {
    /// Binds `value` as the next `$N` parameter, of SQL type `ST`.
    fn bind<ST, V>(self, value: V) -> Bound<Self, V, ST> {
        Bound {
            earlier: self,
            value,
            sql_type: PhantomData,
        }
    }
}

impl Bind for Sql<'_> {}
impl<Q, V, ST> Bind for Bound<Q, V, ST> {}

/// The text and the parameters of a [`Sql`] query.
pub(crate) trait Params<DB: Backend> {
    /// The SQL text, with `$N` placeholders.
    fn text(&self) -> &str;
    /// How many parameters are bound.
    fn count(&self) -> usize;
    /// Pushes parameter `n` (from 1) as a placeholder and its value.
    fn push<'b>(&'b self, n: usize, out: &mut AstPass<'_, 'b, DB>) -> QueryResult<()>;
}

impl<DB: Backend> Params<DB> for Sql<'_> {
    fn text(&self) -> &str {
        self.0
    }

    fn count(&self) -> usize {
        0
    }

    fn push<'b>(&'b self, n: usize, _: &mut AstPass<'_, 'b, DB>) -> QueryResult<()> {
        Err(diesel::result::Error::QueryBuilderError(
            format!("${n} has no bound value").into(),
        ))
    }
}

impl<DB, Q, V, ST> Params<DB> for Bound<Q, V, ST>
where
    DB: Backend + HasSqlType<ST>,
    Q: Params<DB>,
    V: ToSql<ST, DB>,
{
    fn text(&self) -> &str {
        self.earlier.text()
    }

    fn count(&self) -> usize {
        self.earlier.count() + 1
    }

    fn push<'b>(&'b self, n: usize, out: &mut AstPass<'_, 'b, DB>) -> QueryResult<()> {
        if n == self.count() {
            out.push_bind_param::<ST, V>(&self.value)
        } else {
            self.earlier.push(n, out)
        }
    }
}

/// Renders `text`, replacing each `$N` with parameter N.
fn walk_params<'b, DB: Backend, P: Params<DB>>(
    params: &'b P,
    mut out: AstPass<'_, 'b, DB>,
) -> QueryResult<()> {
    let mut rest = params.text();
    let mut highest = 0;
    while let Some(dollar) = rest.find('$') {
        out.push_sql(&rest[..dollar]);
        let digits = rest[dollar + 1..]
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len() - dollar - 1);
        let n = rest[dollar + 1..dollar + 1 + digits].parse().map_err(|_| {
            diesel::result::Error::QueryBuilderError("a `$` without a parameter number".into())
        })?;
        params.push(n, &mut out)?;
        highest = highest.max(n);
        rest = &rest[dollar + 1 + digits..];
    }
    out.push_sql(rest);
    if highest < params.count() {
        return Err(diesel::result::Error::QueryBuilderError(
            format!("{} values bound, ${highest} used", params.count()).into(),
        ));
    }
    Ok(())
}

impl QueryId for Sql<'_> {
    type QueryId = ();
    // Not static: the statement cache keys the query by its text and bind types instead.
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q, V, ST> QueryId for Bound<Q, V, ST> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl Query for Sql<'_> {
    type SqlType = Untyped;
}

impl<Q, V, ST> Query for Bound<Q, V, ST> {
    type SqlType = Untyped;
}

impl<DB: Backend> QueryFragment<DB> for Sql<'_> {
    fn walk_ast<'b>(&'b self, out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        walk_params(self, out)
    }
}

impl<DB, Q, V, ST> QueryFragment<DB> for Bound<Q, V, ST>
where
    DB: Backend,
    Self: Params<DB>,
{
    fn walk_ast<'b>(&'b self, out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        walk_params(self, out)
    }
}

/// `column` is one of the text values of the JSON array bound as `param` (`$N`): one statement
/// text whatever the number of values, so it stays prepared on each connection (diesel
/// prepares an `eq_any` query afresh on every call). On PostgreSQL the array is unpacked once
/// (`ARRAY(…)`) and compared with `= ANY`, which the planner answers from the column's index.
pub(crate) fn is_member(conn: &Conn, column: &str, param: &str) -> String {
    match conn {
        Conn::Pg(_) => format!(
            "{column} = ANY(ARRAY(SELECT jsonb_array_elements_text(CAST({param} AS jsonb))))"
        ),
        Conn::Sqlite(_) => format!("{column} IN (SELECT value FROM json_each({param}))"),
    }
}

/// Enum values as a list of SQL literals (`'pending', 'accepted'`), for statement texts built
/// from the domain's constants. Literals rather than parameters: SQLite re-prepares a
/// statement every time a parameter compared with the column of a partial index
/// (`task_delegations.status`) is bound, and a literal lets either planner use that index.
/// The values are the enums' own fixed words, never input.
pub(crate) fn literals(values: &[&'static str]) -> String {
    let quoted: Vec<String> = values.iter().map(|v| format!("'{v}'")).collect();
    quoted.join(", ")
}

/// The database's clock as an SQL expression of the stored timestamp type (UTC): the one clock
/// every replica agrees on, for deadlines. Both read it once per statement (PostgreSQL's
/// `statement_timestamp()` is stable, so it can bound an index scan).
pub(crate) fn clock(conn: &Conn) -> &'static str {
    match conn {
        Conn::Pg(_) => PG_CLOCK,
        Conn::Sqlite(_) => SQLITE_CLOCK,
    }
}

/// [`clock`] on PostgreSQL.
pub(crate) const PG_CLOCK: &str = "CAST(statement_timestamp() AT TIME ZONE 'UTC' AS TIMESTAMP)";
/// [`clock`] on SQLite.
pub(crate) const SQLITE_CLOCK: &str = "strftime('%Y-%m-%d %H:%M:%f', 'now')";

/// The current time as stored: UTC, truncated to microseconds, which both backends keep exactly.
pub fn now() -> NaiveDateTime {
    Utc::now().naive_utc().trunc_subsecs(6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_renders_each_placeholder_with_its_own_value() {
        use diesel::sql_types::{BigInt, Text};
        let query = sql("SELECT $2, $1 WHERE x = $1")
            .bind::<Text, _>("a")
            .bind::<BigInt, _>(7_i64);
        assert_eq!(
            diesel::debug_query::<diesel::pg::Pg, _>(&query).to_string(),
            r#"SELECT $1, $2 WHERE x = $3 -- binds: [7, "a", "a"]"#
        );
        assert_eq!(
            diesel::debug_query::<diesel::sqlite::Sqlite, _>(&query).to_string(),
            r#"SELECT ?, ? WHERE x = ? -- binds: [7, "a", "a"]"#
        );
        let mut builder = diesel::pg::PgQueryBuilder::default();
        let unused = sql("SELECT $1").bind::<Text, _>("a").bind::<Text, _>("b");
        assert!(unused.to_sql(&mut builder, &diesel::pg::Pg).is_err());
        let missing = sql("SELECT $2").bind::<Text, _>("a");
        assert!(missing.to_sql(&mut builder, &diesel::pg::Pg).is_err());
    }
}
