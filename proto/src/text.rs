//! Text from the peer, made safe to log; and the one rule for a log level
//! that both the daemon's and the relay's configs check.

use std::borrow::Cow;

/// `text` with control characters, line and paragraph separators and
/// bidirectional overrides escaped (`\n`, `\u{1b}`, `\u{202e}`), so text
/// a peer sent (a relay's name, a close reason, a reject reason) cannot
/// start a log line of its own, drive a terminal, or reorder what is shown.
/// Text without them is returned as it is.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(unsafe_char) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{061c}'
        )
        || ('\u{202a}'..='\u{202e}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert!(matches!(printable("dc1 café"), Cow::Borrowed("dc1 café")));
        assert_eq!(printable("dc1\nFORGED line"), "dc1\\nFORGED line");
        assert_eq!(printable("a\r\u{1b}[31mb\u{85}"), "a\\r\\u{1b}[31mb\\u{85}");
        assert_eq!(
            printable("x\u{2028}y\u{202e}z\u{2066}"),
            "x\\u{2028}y\\u{202e}z\\u{2066}"
        );
    }
}

/// What a `log.level` that [`bare_log_word`] finds is told.
pub const NOT_A_LOG_LEVEL: &str =
    "is not a level: use error, warn, info, debug, trace or off, or TARGET=LEVEL";

/// A log filter that is one plain word and no level (`"loud"`), if it is
/// that: valid for tracing (everything from a target of that name, so
/// nothing at all is logged), but never what a level setting means. A word
/// beside others (`"info,outbox_daemon"`), a path (`"hyper::proto"`) or
/// `TARGET=LEVEL` is a filter as tracing reads it.
pub fn bare_log_word(filter: &str) -> Option<&str> {
    const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
    let word = filter.trim();
    let level = LEVELS.iter().any(|l| l.eq_ignore_ascii_case(word));
    (!word.is_empty() && !level && !word.contains([',', '=', '[', ':'])).then_some(word)
}

/// A parser's message on one line, for a log line or a problem list: its
/// lines trimmed, blank ones left out, joined with ", " (TOML's messages
/// come with a drawing of the line, which neither can show).
pub fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Byte `at` of `text`, moved back to the start of its character (and
/// into the text).
pub fn char_boundary(text: &str, at: usize) -> usize {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// The line and column (from 1; columns in characters) of byte `at` of
/// `text`, as a parser's error is placed for a user. An error at the very
/// end of a text that ends in a newline (an unclosed array) is placed at
/// the end of the last line rather than on the empty line after it.
pub fn line_column(text: &str, at: usize) -> (usize, usize) {
    let at = char_boundary(text, at);
    let before = match text[..at].strip_suffix('\n') {
        Some(trimmed) if at == text.len() => trimmed,
        _ => &text[..at],
    };
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (
        before.matches('\n').count() + 1,
        before[line_start..].chars().count() + 1,
    )
}

#[cfg(test)]
mod place_tests {
    use super::*;

    #[test]
    fn places_count_lines_and_characters() {
        let text = "a = 1\nb = \"é\" x\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 10), (2, 5));
        // Inside the two bytes of "é": its start.
        assert_eq!(line_column(text, 12), (2, 6));
        // At the very end: the end of the last line.
        assert_eq!(line_column(text, text.len()), (2, 10));
        assert_eq!(
            one_line("expected `]`\n  |\n\n  found x\n"),
            "expected `]`, |, found x"
        );
    }
}

#[cfg(test)]
mod log_level_tests {
    use super::bare_log_word;

    #[test]
    fn a_log_filter_is_levels_and_target_levels() {
        for good in [
            "info",
            "OFF",
            "warn,outbox_daemon=debug",
            "info,[req]=trace",
            "info,outbox_daemon",
            "hyper::proto",
            "",
        ] {
            assert_eq!(bare_log_word(good), None, "{good}");
        }
        assert_eq!(bare_log_word(" loud "), Some("loud"));
    }
}
