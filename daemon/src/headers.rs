//! Headers as an attempt records them.

use std::fmt;

use http::{header, HeaderMap};
use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The headers of a request or a response as an attempt records them: name
/// and value pairs in the order they were sent or received, the values of
/// a repeated name joined with `", "`, credentials masked.
///
/// All of them share one string, so recording a delivery's headers costs
/// two allocations instead of two per header and the nodes of a tree: this
/// runs twice per delivery. Stored and shown as a map, as the
/// `BTreeMap<String, String>` it replaced was, so attempts written before
/// read back as they were.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers {
    text: String,
    /// Per header, where its name ends and where its value ends in `text`.
    ends: Vec<(usize, usize)>,
}

impl Headers {
    /// `headers` with credentials masked: `Authorization`,
    /// `Proxy-Authorization` and any value marked sensitive keep their
    /// scheme (`Basic ***`) and nothing else; a value without a scheme is
    /// `***`.
    pub fn masked(headers: &HeaderMap) -> Headers {
        let mut out = Headers {
            text: String::with_capacity(headers.len() * 32),
            ends: Vec::with_capacity(headers.len()),
        };
        for (name, value) in headers {
            let secret = name == header::AUTHORIZATION
                || name == header::PROXY_AUTHORIZATION
                || value.is_sensitive();
            out.start(name.as_str());
            if secret {
                // A scheme is kept only when credentials follow it: a
                // value of one word is all secret.
                let mut words = value.to_str().unwrap_or("").split_whitespace();
                let scheme = match (words.next(), words.next()) {
                    (Some(scheme), Some(_)) => scheme,
                    _ => "",
                };
                out.text.push_str(scheme);
                if !scheme.is_empty() {
                    out.text.push(' ');
                }
                out.text.push_str(outbox_secret::MASK);
            } else {
                match value.to_str() {
                    Ok(v) => out.text.push_str(v),
                    Err(_) => out
                        .text
                        .push_str(&String::from_utf8_lossy(value.as_bytes())),
                }
            }
            out.end();
        }
        out
    }

    /// Adds a header; a value for the name added last joins its value.
    fn push(&mut self, name: &str, value: &str) {
        self.start(name);
        self.text.push_str(value);
        self.end();
    }

    /// Opens the value of `name`: a new entry, or, when `name` is the last
    /// entry's, that entry's value continued after `", "` (the last value
    /// is at the end of the text).
    fn start(&mut self, name: &str) {
        if self.last_name() == Some(name) {
            self.text.push_str(", ");
        } else {
            self.text.push_str(name);
            self.ends.push((self.text.len(), self.text.len()));
        }
    }

    /// The name of the last entry.
    fn last_name(&self) -> Option<&str> {
        let (&(name_end, _), before) = self.ends.split_last()?;
        let start = before.last().map_or(0, |&(_, value_end)| value_end);
        Some(&self.text[start..name_end])
    }

    /// Closes the value opened by `start` where the text ends now.
    fn end(&mut self) {
        if let Some(last) = self.ends.last_mut() {
            last.1 = self.text.len();
        }
    }

    /// The value recorded for `name`.
    #[cfg(test)]
    fn get(&self, name: &str) -> Option<&str> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// Names and values, in the order they were recorded.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.ends.iter().scan(0, |start, &(name_end, value_end)| {
            let pair = (
                &self.text[*start..name_end],
                &self.text[name_end..value_end],
            );
            *start = value_end;
            Some(pair)
        })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.ends.len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
}

impl Serialize for Headers {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.ends.len()))?;
        for (name, value) in self.iter() {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Headers {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Headers, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = Headers;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of header names to values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Headers, A::Error> {
                let mut out = Headers::default();
                while let Some((name, value)) = map.next_entry::<String, String>()? {
                    out.push(&name, &value);
                }
                Ok(out)
            }
        }
        deserializer.deserialize_map(Entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use std::collections::BTreeMap;

    #[test]
    fn credentials_are_masked_and_repeated_names_joined() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic c2VjcmV0"),
        );
        h.append("x-other", HeaderValue::from_static("a"));
        h.append("x-other", HeaderValue::from_static("b"));
        let mut token = HeaderValue::from_static("t0ps3cret");
        token.set_sensitive(true);
        h.insert("x-api-key", token);
        h.insert("x-raw", HeaderValue::from_bytes(b"caf\xe9").unwrap());
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("rawtoken"),
        );
        let m = Headers::masked(&h);
        assert_eq!(m.get("authorization"), Some("Basic ***"));
        assert_eq!(m.get("x-other"), Some("a, b"));
        assert_eq!(
            m.get("x-api-key"),
            Some("***"),
            "no scheme: all of it is secret"
        );
        assert_eq!(m.get("x-raw"), Some("caf\u{fffd}"));
        assert_eq!(m.get("proxy-authorization"), Some("***"));
        assert_eq!(m.len(), 5);
    }

    #[test]
    fn stored_as_the_map_it_replaced() {
        let config = bincode::config::standard();
        let mut old = BTreeMap::new();
        old.insert("content-type".to_string(), "application/json".to_string());
        old.insert("x-b".to_string(), "2".to_string());
        let bytes = bincode::serde::encode_to_vec(&old, config).unwrap();
        let (read, _): (Headers, _) = bincode::serde::decode_from_slice(&bytes, config).unwrap();
        assert_eq!(
            read.iter().collect::<Vec<_>>(),
            vec![("content-type", "application/json"), ("x-b", "2")]
        );
        assert_eq!(bincode::serde::encode_to_vec(&read, config).unwrap(), bytes);
        assert_eq!(
            serde_json::to_string(&read).unwrap(),
            serde_json::to_string(&old).unwrap()
        );
        let back: Headers = serde_json::from_str(r#"{"a":"1","b":""}"#).unwrap();
        assert_eq!(back.iter().collect::<Vec<_>>(), vec![("a", "1"), ("b", "")]);
        assert!(Headers::default().is_empty());
    }
}
