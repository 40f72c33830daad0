//! Request-body validation helpers: typed access to JSON attributes with Neutron's wording.

use crate::error::{NResult, NeutronError};
use serde_json::{Map, Value};
use std::collections::HashSet;

/// A request body for one resource, consumed attribute by attribute so that whatever is left
/// at the end is an unrecognized attribute.
pub struct Body {
    map: Map<String, Value>,
}

impl Body {
    /// `{"<resource>": {...}}` -> the inner object.
    pub fn from_value(v: Value, resource: &str) -> NResult<Self> {
        match v {
            Value::Object(mut outer) => match outer.remove(resource) {
                Some(Value::Object(map)) => Ok(Self { map }),
                Some(_) => Err(NeutronError::bad_request(format!(
                    "Invalid input for {resource}. Reason: must be a dictionary."
                ))),
                None => Err(NeutronError::bad_request(format!(
                    "Resource body required: expected '{resource}'."
                ))),
            },
            _ => Err(NeutronError::bad_request("Body contains invalid data")),
        }
    }

    pub fn from_map(map: Map<String, Value>) -> Self {
        Self { map }
    }

    pub fn contains(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    pub fn take_raw(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key)
    }

    pub fn string(&mut self, key: &str) -> NResult<Option<String>> {
        self.string_max(key, 255)
    }

    pub fn string_max(&mut self, key: &str, max: usize) -> NResult<Option<String>> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::String(s)) => {
                if s.chars().count() > max {
                    Err(NeutronError::invalid_attr(
                        key,
                        format!("'{s}' exceeds maximum length of {max}"),
                    ))
                } else {
                    Ok(Some(s))
                }
            }
            Some(v) => Err(NeutronError::invalid_attr(key, format!("'{v}' is not a valid string"))),
        }
    }

    /// A string that may also be JSON null.
    pub fn opt_string(&mut self, key: &str) -> NResult<Option<Option<String>>> {
        match self.map.get(key) {
            Some(Value::Null) => {
                self.map.remove(key);
                Ok(Some(None))
            }
            _ => Ok(self.string(key)?.map(Some)),
        }
    }

    /// Booleans as Neutron accepts them: true/false, or the strings "true"/"false" (any case).
    pub fn boolean(&mut self, key: &str) -> NResult<Option<bool>> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(v) => parse_bool(&v)
                .map(Some)
                .ok_or_else(|| NeutronError::invalid_attr(key, format!("'{v}' is not a valid boolean value"))),
        }
    }

    pub fn integer(&mut self, key: &str) -> NResult<Option<i64>> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Number(n)) if n.is_i64() => Ok(n.as_i64()),
            Some(Value::String(s)) if s.trim().parse::<i64>().is_ok() => Ok(s.trim().parse().ok()),
            Some(v) => Err(NeutronError::invalid_attr(key, format!("'{v}' is not an integer"))),
        }
    }

    pub fn string_list(&mut self, key: &str) -> NResult<Option<Vec<String>>> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|i| match i {
                    Value::String(s) => Ok(s),
                    other => Err(NeutronError::invalid_attr(
                        key,
                        format!("'{other}' is not a valid string"),
                    )),
                })
                .collect::<NResult<Vec<_>>>()
                .map(Some),
            Some(v) => Err(NeutronError::invalid_attr(key, format!("'{v}' is not a list"))),
        }
    }

    /// A list of objects (or null, treated as empty).
    pub fn object_list(&mut self, key: &str) -> NResult<Option<Vec<Map<String, Value>>>> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Null) => Ok(Some(vec![])),
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|i| match i {
                    Value::Object(m) => Ok(m),
                    other => Err(NeutronError::invalid_attr(
                        key,
                        format!("'{other}' is not a dictionary"),
                    )),
                })
                .collect::<NResult<Vec<_>>>()
                .map(Some),
            Some(v) => Err(NeutronError::invalid_attr(key, format!("'{v}' is not a list"))),
        }
    }

    /// Fails with Neutron's "Unrecognized attribute(s)" if anything is left.
    pub fn finish(self) -> NResult<()> {
        if self.map.is_empty() {
            Ok(())
        } else {
            let mut keys: Vec<&String> = self.map.keys().collect();
            keys.sort();
            let names: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
            Err(NeutronError::bad_request(format!(
                "Unrecognized attribute(s) '{}'",
                names.join(", ")
            )))
        }
    }
}

pub fn parse_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Some(true),
            "false" | "0" | "no" | "off" => Some(false),
            _ => None,
        },
        Value::Number(n) => match n.as_i64() {
            Some(1) => Some(true),
            Some(0) => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// A UUID in canonical form, the only form Neutron ids take.
pub fn is_uuid(s: &str) -> bool {
    uuid::Uuid::try_parse(s).is_ok()
}

/// Tags: at most `max_len` characters, no commas or slashes (they break the tags URL and
/// filters).
pub fn validate_tag(tag: &str, max_len: usize) -> NResult<()> {
    if tag.is_empty() || tag.contains(',') || tag.contains('/') {
        return Err(NeutronError::invalid_input(format!("'{tag}' is not a valid tag")));
    }
    if tag.chars().count() > max_len {
        return Err(NeutronError::invalid_input(format!(
            "'{tag}' exceeds maximum length of {max_len}"
        )));
    }
    Ok(())
}

/// 400 for more tags on one resource than `max` (checked on the distinct tags).
pub fn too_many_tags(max: usize) -> NeutronError {
    NeutronError::new(
        400,
        "TagLimitExceeded",
        format!("The number of tags exceeds the maximum {max}."),
    )
}

/// A tag list as stored: each tag valid, duplicates dropped (first one kept, order kept), at
/// most `max_tags` distinct tags. Linear in the list (a set remembers what was seen), and an
/// over-long list fails as soon as the limit is crossed.
pub fn unique_tags(tags: Vec<String>, max_tags: usize, max_len: usize) -> NResult<Vec<String>> {
    let mut seen: HashSet<String> = HashSet::new();
    let mut out = Vec::new();
    for t in tags {
        validate_tag(&t, max_len)?;
        if seen.insert(t.clone()) {
            if out.len() >= max_tags {
                return Err(too_many_tags(max_tags));
            }
            out.push(t);
        }
    }
    Ok(out)
}

/// Neutron's DNS name format check (`_validate_dns_format`): labels of 1-63 letters, digits
/// and hyphens, not starting or ending with a hyphen, a top label not all digits, at most
/// `max_len` characters without the trailing dot. Empty is fine.
pub fn dns_format(data: &str, max_len: usize) -> Result<(), String> {
    if data.is_empty() {
        return Ok(());
    }
    let trimmed = data.strip_suffix('.').unwrap_or(data);
    if trimmed.len() > max_len {
        return Err(format!("'{trimmed}' exceeds the {max_len} character FQDN limit"));
    }
    let labels: Vec<&str> = trimmed.split('.').collect();
    for l in &labels {
        if l.is_empty() {
            return Err(format!("Encountered an empty component in '{data}'"));
        }
        if l.starts_with('-') || l.ends_with('-') {
            return Err(format!("Name '{l}' must not start or end with a hyphen"));
        }
        if l.len() > 63 || !l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(format!(
                "Name '{l}' must be 1-63 characters long, each of which can only be alphanumeric or a hyphen"
            ));
        }
    }
    if labels.len() > 1 && labels[labels.len() - 1].chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("TLD '{}' must not be all numeric", labels[labels.len() - 1]));
    }
    Ok(())
}

/// A port's `dns_name`: a label or an FQDN (Neutron's `validate_dns_name`).
pub fn dns_name(data: &str) -> Result<(), String> {
    dns_format(data, 255)
}

/// A network's `dns_domain`: empty, or an FQDN ending with a dot (`validate_dns_domain`).
pub fn dns_domain(data: &str) -> Result<(), String> {
    dns_format(data, 255)?;
    if !data.is_empty() && !data.ends_with('.') {
        return Err(format!("'{data}' is not a FQDN"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_attributes_are_reported() {
        let mut b = Body::from_value(json!({"network": {"name": "a", "bogus": 1}}), "network").unwrap();
        assert_eq!(b.string("name").unwrap().as_deref(), Some("a"));
        let e = b.finish().unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("bogus"));
    }

    #[test]
    fn dns_names() {
        assert!(dns_name("").is_ok());
        assert!(dns_name("vm-1").is_ok());
        assert!(dns_name("vm-1.example.org.").is_ok());
        assert!(dns_name("-vm").is_err());
        assert!(dns_name("vm_1").is_err());
        assert!(dns_name("a..b").is_err());
        assert!(dns_name("host.123").is_err());
        assert!(dns_name(&"a".repeat(64)).is_err());
        assert!(dns_domain("example.org.").is_ok());
        assert!(dns_domain("example.org").is_err());
        assert!(dns_domain("").is_ok());
    }

    #[test]
    fn wrong_types_rejected() {
        let mut b = Body::from_value(json!({"network": {"name": 5, "admin_state_up": "maybe"}}), "network").unwrap();
        assert!(b.string("name").is_err());
        assert!(b.boolean("admin_state_up").is_err());
        assert!(Body::from_value(json!([1]), "network").is_err());
        assert!(Body::from_value(json!({"port": {}}), "network").is_err());
    }

    #[test]
    fn bools_accept_neutron_spellings() {
        assert_eq!(parse_bool(&json!("True")), Some(true));
        assert_eq!(parse_bool(&json!(false)), Some(false));
        assert_eq!(parse_bool(&json!("nope")), None);
    }

    #[test]
    fn tags_dedup_in_order_and_limits_hold() {
        let t = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            unique_tags(t(&["b", "a", "b", "c", "a"]), 3, 60).unwrap(),
            t(&["b", "a", "c"])
        );
        // The limit counts distinct tags: duplicates of an accepted one never trip it.
        assert_eq!(unique_tags(t(&["a"; 200]), 1, 60).unwrap(), t(&["a"]));
        let e = unique_tags(t(&["a", "b", "c"]), 2, 60).unwrap_err();
        assert_eq!((e.status, e.kind.as_str()), (400, "TagLimitExceeded"));
        assert!(unique_tags(vec!["x".repeat(60)], 1, 60).is_ok());
        let e = unique_tags(vec!["x".repeat(61)], 1, 60).unwrap_err();
        assert_eq!((e.status, e.kind.as_str()), (400, "InvalidInput"));
        assert!(unique_tags(t(&["a,b"]), 5, 60).is_err());
    }
}
