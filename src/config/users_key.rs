//! The server's `users` key, which takes two forms as in GT: the path of a users file
//! (`users: /etc/ferry/users.yaml`, the flag `--users FILE`) or the users themselves
//! (`users: {id1: {secret: s1}}`). A flag naming a file joins a config file's map; the
//! two together are written as a list, `users: [FILE, {id1: ...}]`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::de::value::MapAccessDeserializer;
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::file::UserOptions;
use super::ConfigError;

/// Where the server's users come from: a users file, users written out, or both.
#[derive(Debug, Clone, Default)]
pub struct UsersOption {
    /// A users file: a map of id to settings, re-read on reload.
    pub file: Option<PathBuf>,
    /// Users written out in the config file, by id.
    pub inline: BTreeMap<String, UserOptions>,
}

impl UsersOption {
    /// Users from the file at `path` (what `--users FILE` gives).
    pub fn file(path: impl Into<PathBuf>) -> Self {
        UsersOption { file: Some(path.into()), inline: BTreeMap::new() }
    }

    /// Parses the value of `--users`.
    pub fn from_flag(path: &str) -> Result<Self, ConfigError> {
        match path {
            "" => Err(ConfigError::new("users", "the users file's path is empty")),
            path => Ok(UsersOption::file(path)),
        }
    }

    /// Adds one form; each may be given once.
    fn add(&mut self, form: UsersForm) -> Result<(), &'static str> {
        match form {
            UsersForm::File(_) if self.file.is_some() => Err("more than one users file"),
            UsersForm::Inline(_) if !self.inline.is_empty() => Err("more than one map of users"),
            UsersForm::File(path) => {
                self.file = Some(path);
                Ok(())
            }
            UsersForm::Inline(users) => {
                self.inline = users;
                Ok(())
            }
        }
    }
}

/// One of the two forms.
enum UsersForm {
    File(PathBuf),
    Inline(BTreeMap<String, UserOptions>),
}

impl Serialize for UsersOption {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match (&self.file, self.inline.is_empty()) {
            (Some(file), true) => file.serialize(serializer),
            (None, _) => self.inline.serialize(serializer),
            (Some(file), false) => {
                let mut both = serializer.serialize_seq(Some(2))?;
                both.serialize_element(file)?;
                both.serialize_element(&self.inline)?;
                both.end()
            }
        }
    }
}

/// Reads a path, a map of users, or a list of those.
struct UsersVisitor;

impl<'de> Visitor<'de> for UsersVisitor {
    type Value = UsersOption;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the path of a users file, or a map of users by id")
    }

    fn visit_str<E: de::Error>(self, path: &str) -> Result<UsersOption, E> {
        UsersOption::from_flag(path).map_err(E::custom)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<UsersOption, A::Error> {
        let users = BTreeMap::deserialize(MapAccessDeserializer::new(map))?;
        Ok(UsersOption { file: None, inline: users })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<UsersOption, A::Error> {
        let mut users = UsersOption::default();
        while let Some(one) = seq.next_element::<UsersOption>()? {
            let forms = one.file.map(UsersForm::File).into_iter();
            let forms = forms.chain((!one.inline.is_empty()).then_some(UsersForm::Inline(one.inline)));
            for form in forms {
                users.add(form).map_err(de::Error::custom)?;
            }
        }
        Ok(users)
    }

    fn visit_unit<E: de::Error>(self) -> Result<UsersOption, E> {
        Ok(UsersOption::default())
    }
}

impl<'de> Deserialize<'de> for UsersOption {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(UsersVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<UsersOption, String> {
        serde_norway::from_str(yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn a_path_a_map_or_both() {
        let file = parse("/etc/ferry/users.yaml").unwrap();
        assert_eq!(file.file, Some(PathBuf::from("/etc/ferry/users.yaml")));
        assert!(file.inline.is_empty());
        let inline = parse("{a: {secret: s}, b: {secret: t, speed: 5}}").unwrap();
        assert_eq!((inline.file, inline.inline.len()), (None, 2));
        let both = parse("[users.yaml, {a: {secret: s}}]").unwrap();
        assert_eq!((both.file, both.inline.len()), (Some(PathBuf::from("users.yaml")), 1));
        // What serializes comes back the same (the flags are laid over a file this way).
        let json = serde_json::to_value(UsersOption { file: Some("u.yaml".into()), ..both }).unwrap();
        let back: UsersOption = serde_json::from_value(json).unwrap();
        assert_eq!((back.file, back.inline.len()), (Some(PathBuf::from("u.yaml")), 1));
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let unknown = parse("{a: {secret: s, sped: 5}}").unwrap_err();
        assert!(unknown.contains("sped"), "{unknown}");
        assert!(parse("[a.yaml, b.yaml]").unwrap_err().contains("more than one users file"));
        assert!(parse("5").unwrap_err().contains("path of a users file"));
    }
}
