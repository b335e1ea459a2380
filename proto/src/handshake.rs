//! The version handshake and the rules a hello must follow.

use crate::limits::Limits;

/// The protocol version this build speaks, sent in every hello. Raise it
/// with any change to the frames or their meaning.
pub const PROTOCOL_VERSION: u32 = 1;

/// The oldest relay protocol version this build's daemon still serves.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

const _: () = assert!(MIN_PROTOCOL_VERSION <= PROTOCOL_VERSION);

/// The TLS ALPN of the tunnel. It names the framing (length-prefixed bincode
/// frames), not the protocol version, so a relay of another version still
/// completes the handshake and gets a [`Reject`](crate::Frame::Reject) that
/// says what to upgrade, instead of a bare TLS failure.
pub const ALPN: &[u8] = b"outbox-relay/1";

/// Why a MID server name in a hello is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("MID server name is empty, expected 1 to {limit} letters, digits, '.', '_' or '-'")]
    Empty { limit: usize },
    #[error("MID server name is {found} bytes long, expected at most {limit}")]
    TooLong { found: usize, limit: usize },
    #[error(
        "MID server name {name:?} has {found:?} at byte {at}, expected only letters, digits, '.', '_' or '-'"
    )]
    BadCharacter {
        name: String,
        found: char,
        at: usize,
    },
}

/// The daemon's rule for the protocol version in a relay's hello: any
/// version from [`MIN_PROTOCOL_VERSION`] to [`PROTOCOL_VERSION`]. Otherwise
/// the reason for the [`Reject`](crate::Frame::Reject), naming both sides'
/// versions and which side to upgrade.
pub fn check_version(relay: u32) -> Result<(), String> {
    check_version_within(relay, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION)
}

/// The rule for a MID server name, the same as for every name in Outbox:
/// 1 to `limits.max_name` ASCII letters, digits, `.`, `_` and `-`, so it
/// fits in URLs, file names and log lines as is.
pub fn check_name(name: &str, limits: &Limits) -> Result<(), NameError> {
    let limit = limits.max_name;
    if name.is_empty() {
        return Err(NameError::Empty { limit });
    }
    if name.len() > limit {
        return Err(NameError::TooLong {
            found: name.len(),
            limit,
        });
    }
    match name
        .char_indices()
        .find(|&(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        Some((at, found)) => Err(NameError::BadCharacter {
            name: name.to_owned(),
            found,
            at,
        }),
        None => Ok(()),
    }
}

fn check_version_within(relay: u32, min: u32, max: u32) -> Result<(), String> {
    let ours = if min == max {
        format!("version {max}")
    } else {
        format!("versions {min} to {max}")
    };
    if relay > max {
        Err(format!(
            "relay speaks protocol version {relay}, this daemon speaks {ours}; upgrade the daemon"
        ))
    } else if relay < min {
        Err(format!(
            "relay speaks protocol version {relay}, this daemon speaks {ours}; upgrade the relay"
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_version_is_supported() {
        assert_eq!(check_version(PROTOCOL_VERSION), Ok(()));
        assert_eq!(check_version(MIN_PROTOCOL_VERSION), Ok(()));
    }

    #[test]
    fn unsupported_versions_name_both_sides() {
        assert_eq!(
            check_version(2).unwrap_err(),
            "relay speaks protocol version 2, this daemon speaks version 1; upgrade the daemon"
        );
        assert_eq!(
            check_version(0).unwrap_err(),
            "relay speaks protocol version 0, this daemon speaks version 1; upgrade the relay"
        );
        assert_eq!(
            check_version_within(1, 2, 3).unwrap_err(),
            "relay speaks protocol version 1, this daemon speaks versions 2 to 3; upgrade the relay"
        );
        assert_eq!(check_version_within(2, 2, 3), Ok(()));
        assert_eq!(check_version_within(3, 2, 3), Ok(()));
        assert!(check_version_within(u32::MAX, 2, 3).is_err());
    }

    #[test]
    fn names() {
        let limits = Limits::default();
        for good in ["dc1", "a", "DC-1.eu_west", &"x".repeat(128)] {
            assert_eq!(check_name(good, &limits), Ok(()), "{good}");
        }
        #[rustfmt::skip]
        let bad = [
            ("", "MID server name is empty, expected 1 to 128 letters, digits, '.', '_' or '-'"),
            (&"x".repeat(129), "MID server name is 129 bytes long, expected at most 128"),
            ("dc 1", "MID server name \"dc 1\" has ' ' at byte 2, expected only letters, digits, '.', '_' or '-'"),
            ("dc/1", "MID server name \"dc/1\" has '/' at byte 2, expected only letters, digits, '.', '_' or '-'"),
            ("dcé", "MID server name \"dcé\" has 'é' at byte 2, expected only letters, digits, '.', '_' or '-'"),
            ("dc\n", "MID server name \"dc\\n\" has '\\n' at byte 2, expected only letters, digits, '.', '_' or '-'"),
        ];
        for (name, message) in bad {
            assert_eq!(check_name(name, &limits).unwrap_err().to_string(), message);
        }
    }
}
