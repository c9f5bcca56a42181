//! `ferry demo`: a guided first run that must work out of the box.

use crate::util::*;
use std::fs;

#[test]
fn demo_runs_and_restores_byte_identical() {
    let env = Env::new();
    let out = env.ferry(&["demo"]);
    out.ok();
    let text = format!("{}{}", out.out(), out.stderr);
    assert!(text.contains("byte-identical"), "{text}");
    let names = env.names();
    for n in ["demo/v1", "demo/v2", "demo/v3"] {
        assert!(names.contains(&n.to_owned()), "{names:?}");
    }
    env.fsck_clean(false);
}

#[test]
fn demo_json_and_kept_files_match_the_store() {
    let env = Env::new();
    let keep = env.path("keep");
    let out = env.ferry(&[
        "--json",
        "demo",
        "--size",
        "6MiB",
        "--keep-files",
        keep.to_str().unwrap(),
    ]);
    out.ok();
    let report = out.json();
    assert_eq!(report["restored_identical"], true, "{report}");
    let steps = report["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 3, "{report}");
    // Later versions reuse most of the first.
    for step in &steps[1..] {
        let size = step["size"].as_u64().unwrap();
        let new = step["new_bytes"].as_u64().unwrap();
        assert!(new * 4 < size, "{step}");
    }
    for v in ["v1", "v2", "v3"] {
        let want = fs::read(keep.join(format!("{v}.tar"))).unwrap();
        let got = env.unstash_stdout(&format!("demo/{v}"));
        assert_bytes_eq(&got, &want, v);
        assert_eq!(
            env.inspect(&format!("demo/{v}"))["kind"],
            "docker-archive",
            "{v}"
        );
    }
    env.fsck_clean(true);
}
