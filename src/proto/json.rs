//! `google.protobuf.Struct` <-> `serde_json::Value`, beside the proto: the server converts
//! requests and records with it, and hopperctl its `--result` flags and `-o json` output.
//!
//! Protobuf numbers are doubles: a whole number that a double holds exactly comes back as a
//! JSON integer, so `{"a": 1}` sent through grpcurl is stored as `1`, not `1.0`.

use prost_types::{ListValue, Struct, Value, value::Kind};
use serde_json::{Map, Number, Value as Json};

use crate::error::Error;

/// Largest integer a double holds exactly (2^53).
const MAX_EXACT: f64 = 9_007_199_254_740_992.0;

/// Converts a request Struct; INVALID_ARGUMENT names `field` if a number is NaN or infinite.
pub(crate) fn from_struct(field: &'static str, value: Struct) -> Result<Json, Error> {
    value
        .fields
        .into_iter()
        .map(|(key, value)| Ok((key, from_value(field, value)?)))
        .collect::<Result<Map<_, _>, _>>()
        .map(Json::Object)
}

fn from_value(field: &'static str, value: Value) -> Result<Json, Error> {
    Ok(match value.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::BoolValue(b)) => Json::Bool(b),
        Some(Kind::StringValue(s)) => Json::String(s),
        Some(Kind::NumberValue(n)) if n.fract() == 0.0 && n.abs() <= MAX_EXACT => {
            // Exact: whole and within ±2^53.
            Json::Number(Number::from(n as i64))
        }
        Some(Kind::NumberValue(n)) => Json::Number(
            Number::from_f64(n)
                .ok_or_else(|| Error::invalid(field, "holds a number that is NaN or infinite"))?,
        ),
        Some(Kind::StructValue(s)) => from_struct(field, s)?,
        Some(Kind::ListValue(list)) => Json::Array(
            list.values
                .into_iter()
                .map(|v| from_value(field, v))
                .collect::<Result<_, _>>()?,
        ),
    })
}

/// Converts a stored document for a response. A document that is not an object (written by
/// something other than this service) is wrapped as `{"value": …}`.
pub(crate) fn to_struct(value: Json) -> Struct {
    match value {
        Json::Object(map) => Struct {
            fields: map.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
        },
        other => Struct {
            fields: [("value".to_owned(), to_value(other))].into(),
        },
    }
}

fn to_value(value: Json) -> Value {
    let kind = match value {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Json::String(s) => Kind::StringValue(s),
        Json::Array(items) => Kind::ListValue(ListValue {
            values: items.into_iter().map(to_value).collect(),
        }),
        Json::Object(_) => Kind::StructValue(to_struct(value)),
    };
    Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn documents_round_trip_with_integers_kept() {
        let doc = json!({
            "count": 1, "big": 9007199254740992_i64, "ratio": 0.5, "neg": -3,
            "ok": true, "none": null, "name": "x", "list": [1, "a", {"deep": [2.5]}]
        });
        let back = from_struct("result", to_struct(doc.clone())).unwrap();
        assert_eq!(back, doc);
        assert!(!back.to_string().contains("1.0"));
    }

    #[test]
    fn non_finite_numbers_are_refused_and_scalars_are_wrapped() {
        let bad = Struct {
            fields: [(
                "x".to_owned(),
                Value {
                    kind: Some(Kind::NumberValue(f64::NAN)),
                },
            )]
            .into(),
        };
        assert_eq!(
            from_struct("result", bad).unwrap_err().to_string(),
            "result: holds a number that is NaN or infinite"
        );
        assert_eq!(
            from_struct("r", to_struct(json!(7))).unwrap(),
            json!({"value": 7})
        );
        let empty = Value { kind: None };
        assert_eq!(from_value("r", empty).unwrap(), Json::Null);
    }
}
