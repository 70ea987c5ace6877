//! Stores the domain enums as their text form on both backends.

use diesel::{
    backend::Backend,
    deserialize::{self, FromSql},
    serialize::{self, Output, ToSql},
    sql_types::Text,
};

use crate::domain::{
    DelegationStatus, DelegationType, EventKind, ExpiryReason, InstanceStatus, Scope, TaskStatus,
};

macro_rules! text_column {
    ($($name:ident),+) => {$(
        impl<DB: Backend> ToSql<Text, DB> for $name
        where
            str: ToSql<Text, DB>,
        {
            fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, DB>) -> serialize::Result {
                self.as_str().to_sql(out)
            }
        }

        impl<DB: Backend> FromSql<Text, DB> for $name
        where
            String: FromSql<Text, DB>,
        {
            fn from_sql(bytes: DB::RawValue<'_>) -> deserialize::Result<Self> {
                let text = String::from_sql(bytes)?;
                Self::parse(&text).ok_or_else(|| {
                    format!("unknown {} {text:?} in the database", stringify!($name)).into()
                })
            }
        }
    )+};
}

text_column!(
    Scope,
    InstanceStatus,
    TaskStatus,
    DelegationType,
    DelegationStatus,
    EventKind,
    ExpiryReason
);
