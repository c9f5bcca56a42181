//! `ferry bench` and the choice of chunking kernel, through the binary.

use crate::util::{assert_bytes_eq, mixed_bytes, run, Env};

/// The kernel stash picks on this machine by default.
fn fastest() -> &'static str {
    if cfg!(target_arch = "x86_64") {
        "lanes-asm"
    } else {
        "lanes"
    }
}

#[test]
fn bench_reports_every_kernel_and_the_one_stash_uses() {
    let env = Env::new();
    // The default kernel: no override from the environment running the tests.
    let ferry = |args: &[&str]| {
        run(
            env.cmd().env_remove("FERRY_CHUNKER_KERNEL").args(args),
            None,
        )
    };
    let out = ferry(&[
        "--json",
        "bench",
        "--size",
        "2MiB",
        "--runs",
        "1",
        "--threads",
        "1",
    ]);
    out.ok();
    let report = out.json();
    assert_eq!(report["kernel"], fastest(), "{report}");
    assert_eq!(report["size"], 2 << 20);
    let rows = report["rows"].as_array().expect("rows");
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    let mut kernels = vec!["reference", "lanes"];
    if cfg!(target_arch = "x86_64") {
        kernels.push("lanes-asm");
    }
    for k in kernels {
        assert!(
            names.contains(&format!("chunk ({k})").as_str()),
            "{names:?}"
        );
    }
    for row in ["chunk + blake3", "chunk, then blake3"] {
        assert!(names.contains(&row), "{names:?}");
    }
    for r in rows {
        let gbps = r["gb_per_s"].as_f64().expect("a number");
        assert!(gbps.is_finite() && gbps > 0.0, "{r}");
    }

    // The human table names the kernel too.
    let text = ferry(&["bench", "--size", "1MiB", "--runs", "1"]);
    text.ok();
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert!(
        stdout.contains(&format!("kernel {}", fastest())),
        "{stdout}"
    );

    // FERRY_CHUNKER_KERNEL picks another one.
    let out = run(
        env.cmd()
            .env("FERRY_CHUNKER_KERNEL", "reference")
            .args(["--json", "bench", "--size", "1MiB", "--runs", "1"]),
        None,
    );
    out.ok();
    assert_eq!(out.json()["kernel"], "reference");
}

/// Every kernel cuts the same chunks: the same data stashed into separate
/// stores with each kernel gives the same manifest, and each unstashes.
#[test]
fn every_kernel_stashes_the_same_manifest() {
    let data = mixed_bytes(11, 24 << 20);
    let mut manifests = Vec::new();
    for kernel in ["reference", "lanes", "lanes-asm"] {
        let env = Env::new();
        let out = run(
            env.cmd()
                .env("FERRY_CHUNKER_KERNEL", kernel)
                .args(["--json", "stash", "k/data", "-"]),
            Some(&data),
        );
        out.ok();
        let report = out.json();
        assert!(report["chunks"].as_u64().unwrap() > 100, "{report}");
        manifests.push((kernel, report["manifest"].clone()));
        assert_bytes_eq(&env.unstash_stdout("k/data"), &data, kernel);
    }
    for (kernel, m) in &manifests {
        assert_eq!(m, &manifests[0].1, "{kernel} vs {}", manifests[0].0);
    }
}
