//! Deduplication: the same data twice, shifted data, and docker archives
//! rebuilt with new timestamps or one changed file.

use crate::util::*;
use serde_json::Value;

fn num(report: &Value, field: &str) -> u64 {
    report[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} missing in {report}"))
}

#[test]
fn same_data_twice_stores_almost_nothing() {
    let env = Env::new();
    let data = mixed_bytes(10, 6 << 20);
    let size = data.len() as u64;
    let first = env.stash_stdin("main/one", &data);
    // `mixed_bytes` repeats some of its own blocks: most, not all, is new.
    assert_eq!(
        num(&first, "new_bytes") + num(&first, "reused_bytes"),
        size,
        "{first}"
    );
    assert!(num(&first, "new_bytes") * 10 > size * 9, "{first}");
    assert!(num(&first, "stored_bytes") > 0, "{first}");

    for name in ["main/two", "main/one"] {
        let again = env.stash_stdin(name, &data);
        assert!(
            num(&again, "new_bytes") * 100 < size,
            "second stash stored {} new bytes of {size}: {again}",
            num(&again, "new_bytes")
        );
        assert!(num(&again, "stored_bytes") * 100 < size, "{again}");
        assert!(num(&again, "reused_bytes") * 100 > size * 99, "{again}");
    }
    assert_bytes_eq(&env.unstash_stdout("main/two"), &data, "main/two");
    assert_bytes_eq(&env.unstash_stdout("main/one"), &data, "main/one");

    // du: two names of the same bytes cost one copy.
    let du = env.ferry(&["--json", "du"]);
    du.ok();
    let du = du.json();
    assert_eq!(num(&du, "names"), 2, "{du}");
    assert_eq!(num(&du, "logical_bytes"), 2 * size, "{du}");
    assert!(num(&du, "pack_bytes") < size + size / 20, "{du}");
    assert_eq!(num(&du, "unreferenced_stored_bytes"), 0, "{du}");
    env.ferry(&["rm", "main/two"]).ok();
    let du = env.ferry(&["--json", "du"]).json();
    assert_eq!(num(&du, "names"), 1, "{du}");
    assert_eq!(num(&du, "logical_bytes"), size, "{du}");
    assert_eq!(num(&du, "unreferenced_stored_bytes"), 0, "{du}");
}

#[test]
fn shifted_data_stores_little() {
    let env = Env::new();
    let data = mixed_bytes(11, 6 << 20);
    env.stash_stdin("main/base", &data);
    // Insert 100 bytes near the start and change 10 bytes in the middle.
    let mut changed = random_bytes(12, 100);
    changed.extend_from_slice(&data);
    let mid = changed.len() / 2;
    changed[mid..mid + 10].copy_from_slice(b"0123456789");
    let report = env.stash_stdin("main/shifted", &changed);
    let size = changed.len() as u64;
    // Two edits cost a few chunks (at most 256 KiB each), not the file.
    assert!(
        num(&report, "new_bytes") < 1 << 20,
        "stored {} new bytes of {size}: {report}",
        num(&report, "new_bytes")
    );
    assert_bytes_eq(&env.unstash_stdout("main/shifted"), &changed, "shifted");
}

fn big_layers() -> Vec<Vec<LayerFile>> {
    (1..=3).map(|i| layer_files(100 + i, 14, 900_000)).collect()
}

/// Stash an image, then the same files re-tarred with new mtimes (every
/// tar header, the diff_ids, the config and so the layer names change).
fn retar_costs_little(layout: Layout, max_percent: u64) {
    let env = Env::new();
    let layers = big_layers();
    let v1 = image_archive(layout, &layers, "example/app:v1", 1_700_000_000);
    let v2 = image_archive(layout, &layers, "example/app:v1", 1_700_086_400);
    assert_ne!(v1.bytes, v2.bytes);
    assert_ne!(
        v1.layers[0].1, v2.layers[0].1,
        "diff_ids change with mtimes"
    );
    env.stash_stdin("main/img", &v1.bytes);
    let report = env.stash_stdin("pr/1/img", &v2.bytes);
    let size = v2.bytes.len() as u64;
    let new = num(&report, "new_bytes");
    assert!(
        new * 100 < size * max_percent,
        "{layout:?}: re-tarred image stored {new} new bytes of {size} ({:.1}%): {report}",
        new as f64 * 100.0 / size as f64
    );
    assert_bytes_eq(&env.unstash_stdout("pr/1/img"), &v2.bytes, "v2");
    assert_bytes_eq(&env.unstash_stdout("main/img"), &v1.bytes, "v1");
}

#[test]
fn docker_legacy_retar_with_new_mtimes_stores_little() {
    // The legacy layout has a changed `<id>/json` next to every layer and a
    // changed config, each costing up to a chunk of the content stream.
    retar_costs_little(Layout::DockerLegacy, 8);
}

#[test]
fn docker25_retar_with_new_mtimes_stores_little() {
    retar_costs_little(Layout::DockerOci, 5);
}

#[test]
fn oci_layout_retar_with_new_mtimes_stores_little() {
    retar_costs_little(Layout::OciTar, 5);
}

#[test]
fn one_changed_file_in_one_layer_costs_about_that_file() {
    let env = Env::new();
    let mut layers = big_layers();
    let v1 = image_archive(Layout::DockerOci, &layers, "example/app:v1", 1_700_000_000);
    env.stash_stdin("main/img", &v1.bytes);
    // Replace one big file of the middle layer by new random bytes.
    let victim = layers[1]
        .iter_mut()
        .max_by_key(|f| f.data.len())
        .expect("a file");
    let changed = victim.data.len() as u64;
    victim.data = random_bytes(999, victim.data.len());
    let v2 = image_archive(Layout::DockerOci, &layers, "example/app:v2", 1_700_000_000);
    let report = env.stash_stdin("main/img", &v2.bytes);
    let size = v2.bytes.len() as u64;
    let new = num(&report, "new_bytes");
    assert!(new >= changed, "the changed file must be stored: {report}");
    assert!(
        new < changed + size / 20,
        "one changed file of {changed} bytes cost {new} new bytes of {size}: {report}"
    );
    assert_bytes_eq(&env.unstash_stdout("main/img"), &v2.bytes, "v2");
}
