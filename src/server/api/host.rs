//! The `Host` check of a token-less API: without a token the API is open to anyone who
//! reaches loopback, and a web page can reach loopback through DNS rebinding (a name of
//! the attacker's that resolves to 127.0.0.1 after the page loaded). Such a request still
//! carries the attacker's name as `Host`, so only loopback names are let in.

/// Whether `host` (a `Host` header value) names loopback: `localhost`, `127.0.0.1` or
/// `[::1]`, with or without a port.
///
/// Any port is fine: the page that rebinds chooses the name, not the port, and a
/// forwarded port (`ssh -L 8000:localhost:7500`) arrives with its own.
pub(crate) fn is_loopback_host(host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        // `[::1]` has colons of its own; a port follows the closing bracket.
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    name.eq_ignore_ascii_case("localhost") || name == "127.0.0.1" || name == "[::1]"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_names_pass() {
        for host in ["localhost", "LocalHost:7500", "127.0.0.1", "127.0.0.1:7500", "[::1]", "[::1]:7500"] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "",
            "attacker.example",
            "attacker.example:7500",
            "localhost.attacker.example",
            "127.0.0.1.nip.io",
            "::1",
            "[::1]:",
            "localhost:",
            "localhost:port",
            "127.0.0.2",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }
}
