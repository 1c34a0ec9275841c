//! What peer-chosen words of a registration may hold. Service names and messages reach
//! logs, metric labels and the management API, so, like ids and tags, each has a small
//! alphabet and a length cap, and the server refuses a registration that breaks them.

use super::RegisterError;

/// Longest user id, in bytes.
pub const MAX_ID_LEN: usize = 64;

/// What a user id may be made of, for error messages.
pub const ID_RULE: &str = "1 to 64 ASCII letters, digits, '-', '_', '.' or '@'";

/// Whether `id` is a well-formed user id ([`ID_RULE`]). Servers refuse other ids at login,
/// before any cryptographic work, so ids in logs, hosts and the API are always plain.
pub fn is_valid_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
}

/// Longest service name, in bytes.
pub const MAX_SERVICE_NAME_LEN: usize = 128;

/// Longest service message, in bytes.
pub const MAX_SERVICE_MESSAGE_LEN: usize = 256;

/// What a service name may be made of (a local address such as `[::1]:8080` fits).
pub const SERVICE_NAME_RULE: &str =
    "1 to 128 ASCII letters, digits, '-', '_', '.', ':', '/', '@', '[' or ']'";

/// What a service message may be made of.
pub const SERVICE_MESSAGE_RULE: &str =
    "at most 256 ASCII letters, digits, spaces and - _ . , : ; / ( ) @ # + = ! ? ' %";

/// Whether `name` is a well-formed service name ([`SERVICE_NAME_RULE`]).
pub fn is_service_name(name: &str) -> bool {
    (1..=MAX_SERVICE_NAME_LEN).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:/@[]".contains(&b))
}

/// Whether `message` is a well-formed service message ([`SERVICE_MESSAGE_RULE`]).
pub fn is_service_message(message: &str) -> bool {
    message.len() <= MAX_SERVICE_MESSAGE_LEN
        && message.bytes().all(|b| b.is_ascii_alphanumeric() || b" -_.,:;/()@#+=!?'%".contains(&b))
}

/// Checks the name and message of a registration.
pub fn check_service(name: &str, message: Option<&str>) -> Result<(), RegisterError> {
    let invalid =
        |field: &str, rule: &str| RegisterError::InvalidService { field: field.into(), rule: rule.into() };
    if !is_service_name(name) {
        return Err(invalid("name", SERVICE_NAME_RULE));
    }
    if message.is_some_and(|m| !is_service_message(m)) {
        return Err(invalid("message", SERVICE_MESSAGE_RULE));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_short_and_plain() {
        for good in ["id1", "a", "alice@example.com", "A_b-c.d", &"x".repeat(MAX_ID_LEN)] {
            assert!(is_valid_id(good), "{good}");
        }
        for bad in ["", "a b", "a\nb", "é", "a/b", "a:b", &"x".repeat(MAX_ID_LEN + 1)] {
            assert!(!is_valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn names_and_messages() {
        for name in ["127.0.0.1:8080", "[::1]:22", "web_1", "tcp://db", "a@b"] {
            assert!(is_service_name(name), "{name}");
        }
        for name in ["", "evil\"} 999\nferry_clients 12345\n# x", "a b", "ü", &"x".repeat(129)] {
            assert!(!is_service_name(name), "{name:?}");
        }
        assert!(is_service_message("Bob's shop (staging), 50% done!"));
        assert!(is_service_message(""));
        assert!(
            !is_service_message("line\nbreak")
                && !is_service_message("\"quoted\"")
                && !is_service_message("<b>")
        );
        let err = check_service("ok", Some("{x}")).unwrap_err();
        assert!(err.to_string().starts_with("the service's message is not valid: use at most 256"), "{err}");
    }
}
