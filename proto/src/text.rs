//! Text from the peer, made safe to log.

use std::borrow::Cow;

/// `text` with control characters escaped (`\n`, `\u{1b}`), so text a
/// peer sent (a relay's name, a close reason, a reject reason) cannot
/// start a log line of its own or drive a terminal. Text without them is
/// returned as it is.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert!(matches!(printable("dc1 café"), Cow::Borrowed("dc1 café")));
        assert_eq!(printable("dc1\nFORGED line"), "dc1\\nFORGED line");
        assert_eq!(printable("a\r\u{1b}[31mb\u{85}"), "a\\r\\u{1b}[31mb\\u{85}");
    }
}
