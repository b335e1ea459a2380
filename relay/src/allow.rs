//! The allow-list: which targets this relay may reach.
//!
//! An entry is `host:port` (a name or an address, matched exactly, names
//! case-insensitively) or a CIDR block (`10.20.0.0/16`, any port). The list
//! is checked before anything is resolved or connected: a target named by a
//! `host:port` entry is allowed as is; any other target must be an address,
//! or a name whose every resolved address falls in a CIDR block — and then
//! the relay connects only to those checked addresses, so a name cannot be
//! re-pointed between the check and the connection. Empty list: nothing is
//! allowed.

use std::net::IpAddr;

use ipnet::IpNet;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    HostPort { host: String, port: u16 },
    Net(IpNet),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    entries: Vec<Entry>,
}

/// The verdict for a target before resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed by a `host:port` entry or an address inside a CIDR block.
    Allowed,
    /// A name not listed by `host:port`: allowed only if every address it
    /// resolves to is inside a CIDR block ([`AllowList::allows_addr`]).
    ResolveAndCheck,
    Denied,
}

impl AllowList {
    /// Parses the entries; an error names the bad one.
    pub fn parse(entries: &[String]) -> Result<AllowList, String> {
        let mut out = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            let e = e.trim();
            if let Ok(net) = e.parse::<IpNet>() {
                out.push(Entry::Net(net));
                continue;
            }
            if let Ok(ip) = e.parse::<IpAddr>() {
                out.push(Entry::Net(IpNet::from(ip)));
                continue;
            }
            let (host, port) = split_host_port(e).map_err(|bad| match bad {
                NotHostPort::Shape => format!(
                    "allow[{i}]: {e:?} is neither host:port (\"jira.internal:443\") nor a CIDR block (\"10.20.0.0/16\")"
                ),
                NotHostPort::PortZero => format!("allow[{i}]: {e:?} {PORT_ZERO}"),
            })?;
            out.push(Entry::HostPort {
                host: host.to_ascii_lowercase(),
                port,
            });
        }
        Ok(AllowList { entries: out })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Checks `host:port` of a target URL.
    pub fn check(&self, host: &str, port: u16) -> Verdict {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let by_name = self.entries.iter().any(|e| match e {
            Entry::HostPort { host: h, port: p } => *h == host && *p == port,
            Entry::Net(_) => false,
        });
        if by_name {
            return Verdict::Allowed;
        }
        match host.parse::<IpAddr>() {
            Ok(ip) if self.allows_addr(ip) => Verdict::Allowed,
            Ok(_) => Verdict::Denied,
            Err(_) if self.entries.iter().any(|e| matches!(e, Entry::Net(_))) => {
                Verdict::ResolveAndCheck
            }
            Err(_) => Verdict::Denied,
        }
    }

    /// True when `ip` is inside a CIDR entry.
    pub fn allows_addr(&self, ip: IpAddr) -> bool {
        self.entries.iter().any(|e| match e {
            Entry::Net(n) => n.contains(&ip),
            Entry::HostPort { .. } => false,
        })
    }
}

/// Why a text is no `host:port` a relay can connect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotHostPort {
    /// Not shaped `host:port` at all.
    Shape,
    /// Port 0.
    PortZero,
}

/// What follows the text when its port is 0.
pub(crate) const PORT_ZERO: &str = "names port 0, which nothing listens on";

/// `host:port` (`[v6]:port` too) as its parts; port 0 is refused.
pub(crate) fn split_host_port(e: &str) -> Result<(&str, u16), NotHostPort> {
    let (host, port) = e.rsplit_once(':').ok_or(NotHostPort::Shape)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains('/') {
        return Err(NotHostPort::Shape);
    }
    match port.parse().map_err(|_| NotHostPort::Shape)? {
        0 => Err(NotHostPort::PortZero),
        port => Ok((host, port)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> AllowList {
        AllowList::parse(&entries.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn empty_allows_nothing() {
        let l = list(&[]);
        assert_eq!(l.check("127.0.0.1", 80), Verdict::Denied);
        assert_eq!(l.check("jira.internal", 443), Verdict::Denied);
    }

    #[test]
    fn host_port_entries_match_exactly() {
        let l = list(&["Jira.Internal:443", "127.0.0.1:8080"]);
        assert_eq!(l.check("jira.internal", 443), Verdict::Allowed);
        assert_eq!(l.check("jira.internal", 80), Verdict::Denied);
        assert_eq!(l.check("127.0.0.1", 8080), Verdict::Allowed);
        assert_eq!(l.check("127.0.0.1", 8081), Verdict::Denied);
        assert_eq!(l.check("other.internal", 443), Verdict::Denied);
    }

    #[test]
    fn cidr_entries_match_addresses_and_ask_names_to_resolve() {
        let l = list(&["10.20.0.0/16", "::1"]);
        assert_eq!(l.check("10.20.3.4", 1), Verdict::Allowed);
        assert_eq!(l.check("10.21.0.1", 1), Verdict::Denied);
        assert_eq!(l.check("[::1]", 443), Verdict::Allowed);
        assert_eq!(l.check("jira.internal", 443), Verdict::ResolveAndCheck);
        assert!(l.allows_addr("10.20.255.255".parse().unwrap()));
        assert!(!l.allows_addr("192.168.0.1".parse().unwrap()));
    }

    #[test]
    fn bad_entries_are_named() {
        let e = AllowList::parse(&["jira".into()]).unwrap_err();
        assert!(e.starts_with("allow[0]: \"jira\""), "{e}");
        assert!(AllowList::parse(&["10.0.0.0/33".into()]).is_err());
        assert!(AllowList::parse(&["host:notaport".into()]).is_err());
    }
}
