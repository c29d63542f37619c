//! `accept_proxy_from`: which peers may put a PROXY header in front of a connection.
//!
//! A PROXY header is a claim: "the client is 192.0.2.7". mxlb believes it for balancing,
//! per-source limits, logs, and the header it passes on to Postfix, whose greylisting and
//! blocklist checks then judge the claimed address. Anyone who can reach an `accept_proxy`
//! listener could otherwise claim any address (and walk around the per-source limits), so a
//! listener can name the upstream balancers it trusts, as HAProxy does with
//! `tcp-request connection expect-proxy layer4 if { src … }` and NGINX with
//! `set_real_ip_from`. A peer outside the list is closed before a byte of it is read.

use std::net::IpAddr;

use ipnet::IpNet;

/// The address blocks a listener accepts PROXY headers from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustedUpstreams {
    blocks: Vec<IpNet>,
}

impl TrustedUpstreams {
    /// Parses `entries`: each an address (`192.0.2.10`, `2001:db8::1`) or a block in CIDR
    /// notation (`10.0.0.0/8`). The error names the entry and the accepted forms.
    pub fn parse<'a>(entries: impl IntoIterator<Item = &'a str>) -> Result<Self, EntryError> {
        let blocks = entries
            .into_iter()
            .enumerate()
            .map(|(index, entry)| {
                parse_entry(entry).map_err(|message| EntryError { index, message })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TrustedUpstreams { blocks })
    }

    /// Whether `peer` (the socket's own peer address, never a claimed one) is trusted. An
    /// IPv4 client on a dual-stack `[::]` listener arrives as `::ffff:a.b.c.d`: it is
    /// judged as the IPv4 address it is.
    pub fn allows(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.blocks.iter().any(|block| block.contains(&peer))
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// The blocks, in the order written (an address is its /32 or /128).
    pub fn blocks(&self) -> &[IpNet] {
        &self.blocks
    }
}

/// An entry of `accept_proxy_from` that is neither an address nor a CIDR block.
#[derive(Debug, PartialEq, Eq)]
pub struct EntryError {
    /// Position in the list, from 0.
    pub index: usize,
    pub message: String,
}

fn parse_entry(entry: &str) -> Result<IpNet, String> {
    if let Ok(addr) = entry.parse::<IpAddr>() {
        return Ok(IpNet::from(addr.to_canonical()));
    }
    let block: IpNet = entry.parse().map_err(|_| {
        format!(
            "{entry:?} is not an IP address or a CIDR block (write e.g. \"192.0.2.10\", \
             \"10.0.0.0/8\" or \"2001:db8::/32\")"
        )
    })?;
    if block.trunc() != block {
        return Err(format!(
            "{entry:?} has host bits set below its /{}: write {:?}",
            block.prefix_len(),
            block.trunc().to_string()
        ));
    }
    Ok(block)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted(entries: &[&str]) -> TrustedUpstreams {
        TrustedUpstreams::parse(entries.iter().copied()).unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn addresses_and_blocks_match() {
        let list = trusted(&["192.0.2.10", "10.0.0.0/8", "2001:db8::/32"]);
        for peer in ["192.0.2.10", "10.1.2.3", "10.255.255.255", "2001:db8::7"] {
            assert!(list.allows(ip(peer)), "{peer}");
        }
        for peer in ["192.0.2.11", "11.0.0.1", "2001:db9::1", "::1", "127.0.0.1"] {
            assert!(!list.allows(ip(peer)), "{peer}");
        }
    }

    #[test]
    fn mapped_ipv4_peers_are_judged_as_ipv4() {
        let list = trusted(&["127.0.0.1", "10.0.0.0/8"]);
        assert!(list.allows(ip("::ffff:127.0.0.1")));
        assert!(list.allows(ip("::ffff:10.9.8.7")));
        assert!(!list.allows(ip("::ffff:192.0.2.1")));
        // A mapped entry is the IPv4 address too.
        assert!(trusted(&["::ffff:192.0.2.1"]).allows(ip("192.0.2.1")));
    }

    #[test]
    fn an_empty_list_trusts_nobody() {
        let list = trusted(&[]);
        assert!(list.is_empty());
        assert!(!list.allows(ip("127.0.0.1")));
    }

    #[test]
    fn bad_entries_are_named_with_their_position() {
        let error = TrustedUpstreams::parse(["10.0.0.0/8", "mail.example.com"]).unwrap_err();
        assert_eq!(error.index, 1);
        assert!(
            error.message.contains("\"mail.example.com\""),
            "{}",
            error.message
        );
        assert!(error.message.contains("10.0.0.0/8"), "{}", error.message);

        let error = TrustedUpstreams::parse(["10.0.0.0/33"]).unwrap_err();
        assert_eq!(error.index, 0);

        let error = TrustedUpstreams::parse(["10.1.0.0/8"]).unwrap_err();
        assert!(
            error.message.contains("\"10.0.0.0/8\""),
            "{}",
            error.message
        );
    }
}
