//! Ref names: hierarchical, path-like names such as `main/ci_gpu`,
//! `pr/1234/ci_gpu` or `build/5678/tvm_lib`.
//!
//! A name is at most 255 bytes of parts separated by `/`; each part is 1 to
//! 128 bytes of `[A-Za-z0-9._+@=:-]`, is not `.` or `..`, does not start with
//! `.` and does not end in `.ref`. These rules make every valid name a safe
//! relative path (`refs/<name>.ref` on disk) and a safe object key.

use std::fmt;
use std::str::FromStr;

/// Longest name, in bytes.
pub const MAX_NAME_LEN: usize = 255;
/// Longest part of a name (between two `/`), in bytes.
pub const MAX_PART_LEN: usize = 128;

/// A validated ref name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

/// Why a name was refused; see [`NameError`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameProblem {
    /// The name is empty.
    #[error("the name is empty; use parts like main/ci_gpu")]
    Empty,
    /// The name is longer than [`MAX_NAME_LEN`] bytes.
    #[error("the name is {len} bytes long; the limit is {MAX_NAME_LEN}")]
    TooLong {
        /// The name's length in bytes.
        len: usize,
    },
    /// The name starts with `/`.
    #[error("absolute names are not allowed; drop the leading /")]
    Absolute,
    /// The name ends with `/`.
    #[error("the name must not end with /")]
    TrailingSlash,
    /// Two `/` in a row.
    #[error("empty parts (//) are not allowed")]
    EmptyPart,
    /// A backslash.
    #[error("backslash is not allowed; use / to separate parts")]
    Backslash,
    /// A control character (including NUL).
    #[error("control character {0:?} is not allowed")]
    Control(char),
    /// A whitespace character.
    #[error("whitespace {0:?} is not allowed")]
    Whitespace(char),
    /// Any other character outside `[A-Za-z0-9._+@=:-]` and `/`.
    #[error("character {0:?} is not allowed; use letters, digits, / and . _ + @ = : -")]
    Character(char),
    /// A `.` part.
    #[error("\".\" is not allowed as a path part")]
    Dot,
    /// A `..` part.
    #[error("\"..\" is not allowed as a path part")]
    DotDot,
    /// A part starting with `.`.
    #[error("part {0:?} starts with '.', which is not allowed")]
    Hidden(String),
    /// A part ending in `.ref`, which is reserved for ref files.
    #[error("part {0:?} ends in .ref, which is reserved")]
    RefSuffix(String),
    /// A part longer than [`MAX_PART_LEN`] bytes.
    #[error("a part is {len} bytes long; the limit is {MAX_PART_LEN}")]
    PartTooLong {
        /// The part's length in bytes.
        len: usize,
    },
}

/// A refused name and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid name {name:?}: {problem}")]
pub struct NameError {
    name: String,
    problem: NameProblem,
}

impl NameError {
    /// Why the name was refused.
    pub fn problem(&self) -> &NameProblem {
        &self.problem
    }

    /// The refused name (shortened if it was very long).
    pub fn name(&self) -> &str {
        &self.name
    }
}

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '@' | '=' | ':' | '-' | '/')
}

fn check(s: &str) -> Result<(), NameProblem> {
    if s.is_empty() {
        return Err(NameProblem::Empty);
    }
    if s.starts_with('/') {
        return Err(NameProblem::Absolute);
    }
    for c in s.chars() {
        if allowed(c) {
            continue;
        }
        return Err(if c == '\\' {
            NameProblem::Backslash
        } else if c.is_control() {
            NameProblem::Control(c)
        } else if c.is_whitespace() {
            NameProblem::Whitespace(c)
        } else {
            NameProblem::Character(c)
        });
    }
    if s.len() > MAX_NAME_LEN {
        return Err(NameProblem::TooLong { len: s.len() });
    }
    if s.ends_with('/') {
        return Err(NameProblem::TrailingSlash);
    }
    for part in s.split('/') {
        match part {
            "" => return Err(NameProblem::EmptyPart),
            "." => return Err(NameProblem::Dot),
            ".." => return Err(NameProblem::DotDot),
            _ if part.starts_with('.') => return Err(NameProblem::Hidden(part.to_string())),
            _ if part.ends_with(".ref") => return Err(NameProblem::RefSuffix(part.to_string())),
            _ if part.len() > MAX_PART_LEN => {
                return Err(NameProblem::PartTooLong { len: part.len() })
            }
            _ => {}
        }
    }
    Ok(())
}

impl Name {
    /// Validates `s` as a ref name.
    pub fn parse(s: &str) -> Result<Name, NameError> {
        match check(s) {
            Ok(()) => Ok(Name(s.to_string())),
            Err(problem) => Err(NameError {
                // Keep error messages readable for absurdly long input.
                name: s.chars().take(300).collect(),
                problem,
            }),
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The parts between the `/`.
    pub fn parts(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// Whether `prefix` is a whole-part prefix of this name: `main` matches
    /// `main` and `main/x` but not `mainline/x`. A trailing `/` on the
    /// prefix is ignored; the empty prefix matches every name.
    pub fn starts_with_prefix(&self, prefix: &str) -> bool {
        let prefix = prefix.trim_end_matches('/');
        if prefix.is_empty() {
            return true;
        }
        match self.0.strip_prefix(prefix) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Name({:?})", self.0)
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl FromStr for Name {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Name::parse(s)
    }
}

impl TryFrom<&str> for Name {
    type Error = NameError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Name::parse(s)
    }
}

impl serde::Serialize for Name {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Name {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Name::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_names() {
        let long_part = "a".repeat(MAX_PART_LEN);
        let long_name = format!(
            "{long_part}/{}",
            "b".repeat(MAX_NAME_LEN - MAX_PART_LEN - 1)
        );
        assert_eq!(long_name.len(), MAX_NAME_LEN);
        for name in [
            "main/ci_gpu",
            "pr/1234/ci_gpu",
            "build/5678/tvm_lib",
            "x",
            "a.b/c-d/e_f/g+h/i@j/k=l/m:n",
            "v1.2.3",
            "a..b",
            "ref",
            "x.refs",
            "a/b.re",
            long_part.as_str(),
            long_name.as_str(),
        ] {
            let parsed = Name::parse(name).unwrap_or_else(|e| panic!("{name:?} refused: {e}"));
            assert_eq!(parsed.as_str(), name);
            assert_eq!(parsed.to_string(), name);
        }
    }

    #[test]
    fn refuses_invalid_names() {
        let too_long = format!("{}/{}/{}", "a".repeat(128), "a".repeat(128), "a");
        let long_part = format!("x/{}", "a".repeat(MAX_PART_LEN + 1));
        let table: &[(&str, NameProblem, &str)] = &[
            ("", NameProblem::Empty, "the name is empty"),
            ("/main/x", NameProblem::Absolute, "absolute names"),
            ("/", NameProblem::Absolute, "absolute names"),
            ("main/", NameProblem::TrailingSlash, "must not end with /"),
            ("a//b", NameProblem::EmptyPart, "empty parts (//)"),
            (
                "a/../b",
                NameProblem::DotDot,
                r#"invalid name "a/../b": ".." is not allowed as a path part"#,
            ),
            ("..", NameProblem::DotDot, r#"".." is not allowed"#),
            ("a/./b", NameProblem::Dot, r#""." is not allowed"#),
            (".", NameProblem::Dot, r#""." is not allowed"#),
            ("a\\b", NameProblem::Backslash, "backslash"),
            (
                "a\0b",
                NameProblem::Control('\0'),
                r"control character '\0'",
            ),
            ("a\nb", NameProblem::Control('\n'), "control character"),
            ("a\x7fb", NameProblem::Control('\x7f'), "control character"),
            ("a b", NameProblem::Whitespace(' '), "whitespace ' '"),
            ("a\u{a0}b", NameProblem::Whitespace('\u{a0}'), "whitespace"),
            ("main/é", NameProblem::Character('é'), "character 'é'"),
            ("a*b", NameProblem::Character('*'), "character '*'"),
            ("a?b", NameProblem::Character('?'), "letters, digits"),
            (
                ".hidden",
                NameProblem::Hidden(".hidden".into()),
                "starts with '.'",
            ),
            (
                "a/.git/b",
                NameProblem::Hidden(".git".into()),
                "starts with '.'",
            ),
            (
                "main.ref/x",
                NameProblem::RefSuffix("main.ref".into()),
                "ends in .ref",
            ),
            ("a/x.ref", NameProblem::RefSuffix("x.ref".into()), ".ref"),
            (
                &too_long,
                NameProblem::TooLong { len: 259 },
                "259 bytes long; the limit is 255",
            ),
            (
                &long_part,
                NameProblem::PartTooLong { len: 129 },
                "129 bytes long; the limit is 128",
            ),
        ];
        for (input, problem, message) in table {
            let err = Name::parse(input).expect_err(input);
            assert_eq!(err.problem(), problem, "{input:?}");
            let text = err.to_string();
            assert!(text.contains(message), "{input:?}: {text}");
            assert!(text.starts_with("invalid name "), "{text}");
        }
    }

    #[test]
    fn very_long_input_is_shortened_in_the_error() {
        let err = Name::parse(&"a".repeat(100_000)).unwrap_err();
        assert!(err.to_string().len() < 500);
    }

    #[test]
    fn prefix_matches_whole_parts() {
        let table = [
            ("main/x", "main", true),
            ("main/x", "main/", true),
            ("main", "main", true),
            ("main/x/y", "main/x", true),
            ("mainline/x", "main", false),
            ("main/xy", "main/x", false),
            ("main/x", "main/x/y", false),
            ("pr/1234/ci", "pr/123", false),
            ("pr/1234/ci", "", true),
            ("pr/1234/ci", "pr", true),
        ];
        for (name, prefix, expected) in table {
            let name = Name::parse(name).unwrap();
            assert_eq!(name.starts_with_prefix(prefix), expected, "{name} {prefix}");
        }
    }

    #[test]
    fn serde_round_trip_and_validation() {
        let name = Name::parse("pr/1/ci").unwrap();
        let json = serde_json::to_string(&name).unwrap();
        assert_eq!(json, r#""pr/1/ci""#);
        assert_eq!(serde_json::from_str::<Name>(&json).unwrap(), name);
        let err = serde_json::from_str::<Name>(r#""a/../b""#).unwrap_err();
        assert!(err.to_string().contains(".."), "{err}");
    }

    #[test]
    fn parts_and_conversions() {
        let name: Name = "a/b/c".parse().unwrap();
        assert_eq!(name.parts().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(AsRef::<str>::as_ref(&name), "a/b/c");
        assert_eq!(Name::try_from("a/b/c").unwrap(), name);
    }
}
