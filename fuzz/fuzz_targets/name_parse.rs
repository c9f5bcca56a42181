//! store::name::Name::parse: an accepted name is a safe relative path
//! (no `..` or `.` part, no NUL or other control, not absolute, bounded
//! length, only the allowed characters), survives its serde round trip,
//! and refusals stay readable.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::{Component, Path};
use store::gc::Policy;
use store::name::{Name, MAX_NAME_LEN, MAX_PART_LEN};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    // A gc prefix is parsed as a name too (trailing `/` allowed).
    let _ = Policy {
        prefix: Some(s.to_string()),
        keep_last: None,
        max_age: None,
    }
    .validate();

    let name = match Name::parse(s) {
        Ok(n) => n,
        Err(e) => {
            assert!(
                e.name().chars().count() <= 300,
                "error keeps the whole name"
            );
            let _ = e.to_string();
            return;
        }
    };
    assert_eq!(name.as_str(), s);
    assert!(!s.is_empty() && s.len() <= MAX_NAME_LEN);
    assert!(!s.contains('\0') && !s.chars().any(char::is_control));
    assert!(!s.starts_with('/') && !s.ends_with('/'));
    assert!(!s.contains('\\'));
    assert!(s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._+@=:-/".contains(c)));
    for part in name.parts() {
        assert!(!part.is_empty() && part.len() <= MAX_PART_LEN);
        assert!(part != "." && part != ".." && !part.starts_with('.'));
        assert!(!part.ends_with(".ref"));
    }
    // On disk the ref is refs/<name>.ref: it must stay under refs/.
    let on_disk = format!("refs/{s}.ref");
    let comps: Vec<_> = Path::new(&on_disk).components().collect();
    assert!(comps.iter().all(|c| matches!(c, Component::Normal(_))));
    assert_eq!(comps.len(), name.parts().count() + 1);

    assert!(name.starts_with_prefix(s) && name.starts_with_prefix(""));
    let shown = name.to_string();
    assert_eq!(Name::parse(&shown).as_ref(), Ok(&name));
    let json = serde_json::to_string(&name).unwrap();
    assert_eq!(serde_json::from_str::<Name>(&json).unwrap(), name);
});
