//! A small internet in network namespaces for P2P tests: a public namespace (server and
//! STUN, and the router between the two NATs) and two private namespaces, each behind a
//! NAT namespace of its own. Everything is deleted on drop, also when a test fails.
//!
//! ```text
//! private[0] 10.1.0.2 -- 10.1.0.1 nat[0] 198.51.100.2 -- 198.51.100.1 public
//! private[1] 10.2.0.2 -- 10.2.0.1 nat[1] 203.0.113.2  -- 203.0.113.1  public
//! ```
//!
//! A NAT masquerades what leaves its WAN side and drops what arrives there unasked (a
//! home router's firewall: no conntrack entry is made for such packets, so a peer's early
//! punch cannot spoil the mapping). [`NatKind::Cone`] keeps a socket's port for every
//! destination (Linux masquerade does, while the port is free): punching works.
//! [`NatKind::Symmetric`] picks a random port per destination (`fully-random`): the port
//! STUN saw is not the one a peer would have to reach, and punching fails.

use super::netns::{veth, Netns};

/// How a NAT maps a private socket to public ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    /// The same public port for every destination (endpoint-independent mapping).
    Cone,
    /// A new random public port per destination.
    Symmetric,
}

/// The namespaces of the lab.
pub struct NatLab {
    /// The server's namespace, also the router between the NATs.
    pub public: Netns,
    /// The NAT routers.
    pub nat: [Netns; 2],
    /// The hosts behind them.
    pub private: [Netns; 2],
}

/// The public namespace's address as seen from behind NAT `side`.
pub fn public_ip(side: usize) -> &'static str {
    ["198.51.100.1", "203.0.113.1"][side]
}

impl NatLab {
    /// Builds the lab with the NATs of `kinds`.
    pub fn new(kinds: [NatKind; 2]) -> NatLab {
        let public = Netns::new("pub");
        let nat = [Netns::new("nat0"), Netns::new("nat1")];
        let private = [Netns::new("priv0"), Netns::new("priv1")];
        public.sysctl("net.ipv4.ip_forward=1");
        let wan = [("198.51.100.1/24", "198.51.100.2/24"), ("203.0.113.1/24", "203.0.113.2/24")];
        for side in 0..2 {
            let (router, host) = (&nat[side], &private[side]);
            let (outside, inside) = wan[side];
            veth(&public, &format!("wan{side}"), outside, router, "wan", inside);
            let lan = format!("10.{}.0", side + 1);
            veth(router, "lan", &format!("{lan}.1/24"), host, "eth", &format!("{lan}.2/24"));
            router.sysctl("net.ipv4.ip_forward=1");
            router.ip(&["route", "add", "default", "via", public_ip(side)]);
            host.ip(&["route", "add", "default", "via", &format!("{lan}.1")]);
            let random = match kinds[side] {
                NatKind::Cone => "",
                NatKind::Symmetric => " fully-random",
            };
            router.nft(&format!(
                "table ip nat {{
                    chain post {{ type nat hook postrouting priority 100; oifname \"wan\" masquerade{random}; }}
                }}
                table ip firewall {{
                    chain pre {{ type filter hook prerouting priority 0; iifname \"wan\" ct state new drop; }}
                }}"
            ));
        }
        NatLab { public, nat, private }
    }

    /// Drops UDP between the two NATs (TCP to the server still passes), until [`unblock_udp`](Self::unblock_udp).
    pub fn block_udp(&self) {
        self.public.nft(
            "table ip between {
                chain forward_udp { type filter hook forward priority 0; meta l4proto udp drop; }
            }",
        );
    }

    /// Lets UDP between the NATs pass again.
    pub fn unblock_udp(&self) {
        self.public.nft("delete table ip between");
    }
}
