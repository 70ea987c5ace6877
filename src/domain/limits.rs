//! Input limits and the shape of ids, checked before anything touches the database.

use crate::error::Error;

/// Longest caller-chosen id.
pub(crate) const MAX_ID_LEN: usize = 64;
/// Longest instance name and `delegated_by`.
pub(crate) const MAX_NAME_LEN: usize = 256;
/// Longest task title.
pub(crate) const MAX_TITLE_LEN: usize = 512;
/// Longest rejection reason.
pub(crate) const MAX_REASON_LEN: usize = 4 * 1024;
/// Longest notes and task description.
pub(crate) const MAX_NOTES_LEN: usize = 16 * 1024;
/// Largest result or config, as JSON text.
pub(crate) const MAX_JSON_BYTES: usize = 1024 * 1024;
/// Deepest nesting of objects and arrays in a result or config.
pub(crate) const MAX_JSON_DEPTH: usize = 32;
/// Page size used when a request asks for 0.
pub(crate) const DEFAULT_PAGE_SIZE: usize = 50;
/// Largest page; larger requests are lowered to it.
pub(crate) const MAX_PAGE_SIZE: usize = 500;

/// Checks an id: 1 to 64 characters of ASCII letters, digits, '.', '_' or '-', starting with a
/// letter or digit. This keeps ids safe in URLs, logs and shell scripts.
pub fn id(field: &'static str, value: &str) -> Result<(), Error> {
    if value.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    if value.len() > MAX_ID_LEN {
        return Err(Error::invalid(
            field,
            format!("is longer than {MAX_ID_LEN} characters"),
        ));
    }
    let mut chars = value.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        return Err(Error::invalid(
            field,
            "must be letters, digits, '.', '_' or '-', starting with a letter or digit",
        ));
    }
    Ok(())
}

/// Checks an optional id: empty means absent.
pub(crate) fn optional_id(field: &'static str, value: &str) -> Result<Option<String>, Error> {
    if value.is_empty() {
        return Ok(None);
    }
    id(field, value)?;
    Ok(Some(value.to_owned()))
}

/// Checks a text's length in bytes; `required` also refuses an empty or blank text.
pub fn text(field: &'static str, value: &str, max: usize, required: bool) -> Result<(), Error> {
    if required && value.trim().is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    if value.len() > max {
        return Err(Error::invalid(field, format!("is longer than {max} bytes")));
    }
    Ok(())
}

/// Checks the size and nesting depth of a JSON document.
pub fn json(field: &'static str, value: &serde_json::Value) -> Result<(), Error> {
    fn depth(value: &serde_json::Value) -> usize {
        match value {
            serde_json::Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
            serde_json::Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }
    if depth(value) > MAX_JSON_DEPTH {
        return Err(Error::invalid(
            field,
            format!("nests deeper than {MAX_JSON_DEPTH} levels"),
        ));
    }
    let len = serde_json::to_vec(value).map_or(usize::MAX, |bytes| bytes.len());
    if len > MAX_JSON_BYTES {
        return Err(Error::invalid(
            field,
            format!("is larger than {MAX_JSON_BYTES} bytes as JSON"),
        ));
    }
    Ok(())
}

/// Turns a requested page size into the one served: 0 means the default, larger than the
/// maximum means the maximum, negative is refused.
pub fn page_size(requested: i32) -> Result<usize, Error> {
    match usize::try_from(requested) {
        Err(_) => Err(Error::invalid("page_size", "must not be negative")),
        Ok(0) => Ok(DEFAULT_PAGE_SIZE),
        Ok(n) => Ok(n.min(MAX_PAGE_SIZE)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_short_safe_words() {
        for good in ["global", "proj-1", "a", "0193.x_y", &"a".repeat(64)] {
            assert!(id("id", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-a",
            "a b",
            "a/b",
            "x'; DROP TABLE tasks; --",
            "é",
            &"a".repeat(65),
        ] {
            let err = id("id", bad).unwrap_err();
            assert!(err.to_string().starts_with("id: "), "{bad}: {err}");
        }
        assert_eq!(optional_id("parent_id", "").unwrap(), None);
        assert_eq!(optional_id("parent_id", "p").unwrap().as_deref(), Some("p"));
    }

    #[test]
    fn texts_and_json_have_limits() {
        assert!(text("title", "  ", 10, true).is_err());
        assert!(text("notes", "", 10, false).is_ok());
        assert!(text("notes", "12345678901", 10, false).is_err());
        assert!(json("result", &serde_json::json!({"a": 1})).is_ok());
        let huge = serde_json::Value::String("x".repeat(MAX_JSON_BYTES));
        assert!(json("result", &huge).is_err());
        let mut deep = serde_json::json!(1);
        for _ in 0..MAX_JSON_DEPTH {
            deep = serde_json::json!([deep]);
        }
        assert!(json("result", &deep).is_ok());
        assert!(json("result", &serde_json::json!({"a": deep})).is_err());
    }

    #[test]
    fn page_sizes_are_defaulted_and_capped() {
        assert_eq!(page_size(0).unwrap(), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(7).unwrap(), 7);
        assert_eq!(page_size(i32::MAX).unwrap(), MAX_PAGE_SIZE);
        assert!(page_size(-1).is_err());
    }
}
