//! Container image metadata, read from what [`TarSplitter`] collected.
//!
//! ferry never re-serialises an archive, so image metadata (tags, config
//! digest, layers with their diff_ids and where their bytes lie) is read from
//! the small files and the file spans that the splitter kept while the
//! archive streamed past. Three layouts are recognised:
//!
//! - [`ImageKind::DockerArchive`]: `docker save` before Docker 25 — a
//!   top-level `manifest.json` naming `<hex>.json` configs and
//!   `<id>/layer.tar` layers.
//! - [`ImageKind::DockerOciArchive`]: `docker save` from Docker 25 on — the
//!   same `manifest.json`, pointing into `blobs/sha256/`, beside an OCI
//!   `index.json` and `oci-layout`.
//! - [`ImageKind::OciLayout`]: a tar of an OCI image layout — `oci-layout`,
//!   `index.json`, and everything else in `blobs/`.
//!
//! Detection is best effort: anything malformed or missing gives `None`,
//! never an error or a panic.
//!
//! [`TarSplitter`]: crate::tarsplit::TarSplitter

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::tarsplit::Collected;

/// Which layout an image archive has.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum ImageKind {
    /// `docker save` output in the legacy layout (before Docker 25).
    DockerArchive,
    /// `docker save` output in the Docker 25+ layout (OCI blobs plus `manifest.json`).
    DockerOciArchive,
    /// A tar of an OCI image layout.
    OciLayout,
}

/// What `ferry inspect` shows about a stashed image.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ImageInfo {
    /// The archive's layout.
    pub kind: ImageKind,
    /// Image names and tags (`RepoTags`, or OCI `ref.name` annotations).
    pub tags: Vec<String>,
    /// Digest of the image config (`sha256:<hex>`), when it can be told.
    pub config_digest: Option<String>,
    /// The layers, base first.
    pub layers: Vec<LayerInfo>,
}

/// One layer of an image and where its bytes lie in the archive.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct LayerInfo {
    /// The layer's path inside the archive.
    pub path: String,
    /// The digest of the uncompressed layer, from the config's `rootfs.diff_ids`.
    pub diff_id: Option<String>,
    /// Size of the layer's bytes in the archive.
    pub size: u64,
    /// Offset of the layer's bytes in the archive stream.
    pub offset: u64,
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const REF_NAME: &str = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// How many nested image indexes are followed.
const MAX_INDEX_DEPTH: usize = 4;

/// Detect an image archive and read its metadata from what the splitter
/// collected. `None` when the input is not a recognised image archive, or
/// its metadata is malformed or incomplete (for instance a layer that the
/// manifest names is not in the archive).
pub fn detect(c: &Collected) -> Option<ImageInfo> {
    if !c.is_tar {
        return None;
    }
    let oci = c.file("oci-layout").is_some() && c.file("index.json").is_some();
    if let Some(manifest) = c.file("manifest.json") {
        if let Some(info) = docker(c, manifest, oci) {
            return Some(info);
        }
    }
    if oci {
        return oci_layout(c);
    }
    None
}

#[derive(Deserialize)]
struct DockerManifest {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers", default)]
    layers: Vec<String>,
}

#[derive(Deserialize)]
struct ImageConfig {
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    digest: String,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct OciIndex {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct OciManifest {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

/// A `manifest.json`-based archive (legacy, or Docker 25+ when `oci` is set).
fn docker(c: &Collected, manifest: &[u8], oci: bool) -> Option<ImageInfo> {
    let entries: Vec<DockerManifest> = serde_json::from_slice(manifest).ok()?;
    // `docker save a b` lists several images; the first one is described.
    let first = entries.into_iter().next()?;
    let diff_ids = diff_ids(c, &first.config)?;
    let layers = first
        .layers
        .iter()
        .enumerate()
        .map(|(i, path)| layer(c, path, diff_ids.get(i).cloned()))
        .collect::<Option<Vec<_>>>()?;
    let kind = if oci || first.config.starts_with("blobs/") {
        ImageKind::DockerOciArchive
    } else {
        ImageKind::DockerArchive
    };
    Some(ImageInfo {
        kind,
        tags: first.repo_tags.unwrap_or_default(),
        config_digest: digest_from_path(&first.config),
        layers,
    })
}

/// An OCI image layout: `index.json` → image manifest → config and layers.
fn oci_layout(c: &Collected) -> Option<ImageInfo> {
    let index: OciIndex = serde_json::from_slice(c.file("index.json")?).ok()?;
    for desc in &index.manifests {
        let Some(manifest) = resolve_manifest(c, desc, 0) else {
            continue;
        };
        let tags = index
            .manifests
            .iter()
            .filter(|d| d.digest == desc.digest)
            .filter_map(|d| {
                d.annotations
                    .get(REF_NAME)
                    .or_else(|| d.annotations.get(CONTAINERD_NAME))
                    .cloned()
            })
            .collect();
        let diff_ids = diff_ids(c, &blob_path(&manifest.config.digest)?)?;
        let layers = manifest
            .layers
            .iter()
            .enumerate()
            .map(|(i, d)| layer(c, &blob_path(&d.digest)?, diff_ids.get(i).cloned()))
            .collect::<Option<Vec<_>>>()?;
        return Some(ImageInfo {
            kind: ImageKind::OciLayout,
            tags,
            config_digest: Some(manifest.config.digest),
            layers,
        });
    }
    None
}

/// The first image manifest reachable from `desc` whose blob is present,
/// following nested indexes.
fn resolve_manifest(c: &Collected, desc: &Descriptor, depth: usize) -> Option<OciManifest> {
    let blob = c.file(&blob_path(&desc.digest)?)?;
    match desc.media_type.as_deref() {
        Some(OCI_INDEX | DOCKER_LIST) => {
            if depth >= MAX_INDEX_DEPTH {
                return None;
            }
            let index: OciIndex = serde_json::from_slice(blob).ok()?;
            index
                .manifests
                .iter()
                .find_map(|d| resolve_manifest(c, d, depth + 1))
        }
        Some(OCI_MANIFEST | DOCKER_MANIFEST) | None => {
            let manifest: OciManifest = serde_json::from_slice(blob).ok()?;
            match manifest.media_type.as_deref() {
                None | Some(OCI_MANIFEST | DOCKER_MANIFEST) => Some(manifest),
                Some(_) => None,
            }
        }
        Some(_) => None,
    }
}

/// The config's `rootfs.diff_ids`; empty when the config is not in the
/// archive, `None` when it is there but malformed.
fn diff_ids(c: &Collected, config_path: &str) -> Option<Vec<String>> {
    let Some(bytes) = c.file(config_path) else {
        return Some(Vec::new());
    };
    let config: ImageConfig = serde_json::from_slice(bytes).ok()?;
    Some(config.rootfs.map(|r| r.diff_ids).unwrap_or_default())
}

fn layer(c: &Collected, path: &str, diff_id: Option<String>) -> Option<LayerInfo> {
    let (offset, size) = c.locate(path)?;
    Some(LayerInfo {
        path: path.to_owned(),
        diff_id,
        size,
        offset,
    })
}

/// `blobs/<algorithm>/<encoded>` for a digest `<algorithm>:<encoded>`, if
/// the digest is well formed.
fn blob_path(digest: &str) -> Option<String> {
    let (alg, enc) = digest.split_once(':')?;
    let alg_ok = !alg.is_empty()
        && alg
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b));
    let enc_ok = !enc.is_empty()
        && enc
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"=_-".contains(&b));
    (alg_ok && enc_ok).then(|| format!("blobs/{alg}/{enc}"))
}

/// The digest a config path encodes: `blobs/<alg>/<enc>` or `<64 hex>.json`.
fn digest_from_path(path: &str) -> Option<String> {
    let path = path.strip_prefix("./").unwrap_or(path);
    if let Some(rest) = path.strip_prefix("blobs/") {
        let (alg, enc) = rest.split_once('/')?;
        let digest = format!("{alg}:{enc}");
        return blob_path(&digest).map(|_| digest);
    }
    let hex = path.strip_suffix(".json")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| format!("sha256:{}", hex.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tarsplit::{Part, TarSplitter};

    fn tar_of(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(1_700_000_000);
            b.append_data(&mut h, name, data.as_slice()).unwrap();
        }
        b.into_inner().unwrap()
    }

    /// Split `archive` in odd-sized pieces and detect.
    fn run(archive: &[u8]) -> Option<ImageInfo> {
        let mut s = TarSplitter::new();
        let mut replay = Vec::new();
        let mut sink = |_: Part, b: &[u8]| replay.extend_from_slice(b);
        for piece in archive.chunks(777) {
            s.feed(piece, &mut sink);
        }
        s.finish(&mut sink);
        assert_eq!(replay, archive);
        detect(&s.into_collected())
    }

    /// Offset and size of `name`'s data, as the tar crate sees it.
    fn position(archive: &[u8], name: &str) -> (u64, u64) {
        let mut ar = tar::Archive::new(archive);
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            if e.path().unwrap().to_str() == Some(name) {
                return (e.raw_file_position(), e.size());
            }
        }
        panic!("{name} not in archive");
    }

    fn check_layers(archive: &[u8], info: &ImageInfo, expect: &[(&str, &str)]) {
        assert_eq!(info.layers.len(), expect.len());
        for (layer, (path, diff_id)) in info.layers.iter().zip(expect) {
            assert_eq!(layer.path.trim_start_matches("./"), *path);
            assert_eq!(layer.diff_id.as_deref(), Some(*diff_id));
            let (offset, size) = position(archive, &layer.path);
            assert_eq!((layer.offset, layer.size), (offset, size), "{path}");
            assert!(offset % 512 == 0 && offset > 0);
        }
    }

    fn hex(c: char) -> String {
        c.to_string().repeat(64)
    }

    fn layers() -> (Vec<u8>, Vec<u8>) {
        (
            tar_of(&[("etc/hello", b"hello\n".to_vec())]),
            tar_of(&[("app/data", vec![3u8; 3000])]),
        )
    }

    fn config() -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "rootfs": {"type": "layers", "diff_ids": ["sha256:d1", "sha256:d2"]},
        }))
        .unwrap()
    }

    #[test]
    fn legacy_docker_archive() {
        let (l1, l2) = layers();
        let cfg = format!("{}.json", hex('c'));
        let manifest = serde_json::json!([{
            "Config": cfg,
            "RepoTags": ["example/app:latest", "example/app:1.0"],
            "Layers": ["1111/layer.tar", "2222/layer.tar"],
        }]);
        let archive = tar_of(&[
            ("1111/VERSION", b"1.0".to_vec()),
            ("1111/json", b"{}".to_vec()),
            ("1111/layer.tar", l1),
            ("2222/layer.tar", l2),
            (&cfg, config()),
            ("manifest.json", serde_json::to_vec(&manifest).unwrap()),
            ("repositories", b"{}".to_vec()),
        ]);
        let info = run(&archive).unwrap();
        assert_eq!(info.kind, ImageKind::DockerArchive);
        assert_eq!(info.tags, ["example/app:latest", "example/app:1.0"]);
        assert_eq!(info.config_digest, Some(format!("sha256:{}", hex('c'))));
        check_layers(
            &archive,
            &info,
            &[
                ("1111/layer.tar", "sha256:d1"),
                ("2222/layer.tar", "sha256:d2"),
            ],
        );
        // The report serialises.
        let json = serde_json::to_string(&info).unwrap();
        assert_eq!(serde_json::from_str::<ImageInfo>(&json).unwrap(), info);
    }

    fn oci_blobs(layer2: Vec<u8>, layer2_type: &str) -> (Vec<(String, Vec<u8>)>, String) {
        let (l1, _) = layers();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": format!("sha256:{}", hex('c')), "size": 1},
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar",
                 "digest": format!("sha256:{}", hex('1')), "size": 1},
                {"mediaType": layer2_type,
                 "digest": format!("sha256:{}", hex('2')), "size": 1},
            ],
        });
        let blobs = vec![
            (format!("blobs/sha256/{}", hex('1')), l1),
            (format!("blobs/sha256/{}", hex('2')), layer2),
            (format!("blobs/sha256/{}", hex('c')), config()),
            (
                format!("blobs/sha256/{}", hex('m')),
                serde_json::to_vec(&manifest).unwrap(),
            ),
        ];
        (blobs, format!("sha256:{}", hex('m')))
    }

    #[test]
    fn docker_25_archive() {
        let (_, l2) = layers();
        let (blobs, manifest_digest) = oci_blobs(l2, "application/vnd.oci.image.layer.v1.tar");
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": manifest_digest, "size": 1,
                "annotations": {CONTAINERD_NAME: "docker.io/example/app:latest", REF_NAME: "latest"}}],
        });
        let docker_manifest = serde_json::json!([{
            "Config": format!("blobs/sha256/{}", hex('c')),
            "RepoTags": ["example/app:latest"],
            "Layers": [format!("blobs/sha256/{}", hex('1')), format!("blobs/sha256/{}", hex('2'))],
        }]);
        let mut files: Vec<(&str, Vec<u8>)> = Vec::new();
        files.extend(blobs.iter().map(|(n, d)| (n.as_str(), d.clone())));
        files.push(("index.json", serde_json::to_vec(&index).unwrap()));
        files.push((
            "manifest.json",
            serde_json::to_vec(&docker_manifest).unwrap(),
        ));
        files.push(("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()));
        let archive = tar_of(&files);
        let info = run(&archive).unwrap();
        assert_eq!(info.kind, ImageKind::DockerOciArchive);
        assert_eq!(info.tags, ["example/app:latest"]);
        assert_eq!(info.config_digest, Some(format!("sha256:{}", hex('c'))));
        let p1 = format!("blobs/sha256/{}", hex('1'));
        let p2 = format!("blobs/sha256/{}", hex('2'));
        check_layers(&archive, &info, &[(&p1, "sha256:d1"), (&p2, "sha256:d2")]);
    }

    #[test]
    fn oci_layout_through_nested_index() {
        // A big compressed-looking layer (listed as a span, not captured).
        let big: Vec<u8> = (0..5u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let (blobs, manifest_digest) =
            oci_blobs(big, "application/vnd.oci.image.layer.v1.tar+gzip");
        let inner_index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": format!("sha256:{}", hex('9')), "size": 1},
                {"mediaType": OCI_MANIFEST, "digest": manifest_digest, "size": 1},
            ],
        });
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": OCI_INDEX, "digest": format!("sha256:{}", hex('i')),
                "size": 1, "annotations": {REF_NAME: "v2"}}],
        });
        // Named the way `tar -C layout .` names them.
        let mut files: Vec<(String, Vec<u8>)> = blobs
            .into_iter()
            .map(|(n, d)| (format!("./{n}"), d))
            .collect();
        files.push((
            format!("./blobs/sha256/{}", hex('i')),
            serde_json::to_vec(&inner_index).unwrap(),
        ));
        files.push(("./index.json".into(), serde_json::to_vec(&index).unwrap()));
        files.push((
            "./oci-layout".into(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        ));
        let files: Vec<(&str, Vec<u8>)> =
            files.iter().map(|(n, d)| (n.as_str(), d.clone())).collect();
        let archive = tar_of(&files);
        let info = run(&archive).unwrap();
        assert_eq!(info.kind, ImageKind::OciLayout);
        assert_eq!(info.tags, ["v2"]);
        assert_eq!(info.config_digest, Some(format!("sha256:{}", hex('c'))));
        let p1 = format!("blobs/sha256/{}", hex('1'));
        let p2 = format!("blobs/sha256/{}", hex('2'));
        check_layers(&archive, &info, &[(&p1, "sha256:d1"), (&p2, "sha256:d2")]);
    }

    #[test]
    fn malformed_or_foreign_inputs_give_none() {
        assert_eq!(run(b"plain bytes, not a tar"), None);
        assert_eq!(run(&tar_of(&[("a.txt", b"hi".to_vec())])), None);
        assert_eq!(
            run(&tar_of(&[("manifest.json", b"{not json".to_vec())])),
            None
        );
        assert_eq!(run(&tar_of(&[("manifest.json", b"[]".to_vec())])), None);
        // A layer the manifest names is missing.
        let manifest = br#"[{"Config":"c.json","RepoTags":null,"Layers":["x/layer.tar"]}]"#;
        assert_eq!(run(&tar_of(&[("manifest.json", manifest.to_vec())])), None);
        // A malformed config.
        let (l1, _) = layers();
        let manifest = br#"[{"Config":"c.json","Layers":["x/layer.tar"]}]"#;
        let archive = tar_of(&[
            ("x/layer.tar", l1),
            ("c.json", b"{\"rootfs\": 3}".to_vec()),
            ("manifest.json", manifest.to_vec()),
        ]);
        assert_eq!(run(&archive), None);
        // OCI index whose manifest blob is missing, and one that is garbage.
        let index = format!(
            r#"{{"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"sha256:{}"}}]}}"#,
            hex('m')
        );
        let files = [
            ("oci-layout", b"{}".to_vec()),
            ("index.json", index.into_bytes()),
        ];
        assert_eq!(run(&tar_of(&files)), None);
        let mut files = files.to_vec();
        let blob = format!("blobs/sha256/{}", hex('m'));
        files.push((blob.as_str(), b"\xff\xfe".to_vec()));
        assert_eq!(run(&tar_of(&files)), None);
        let files = [
            ("oci-layout", b"{}".to_vec()),
            (
                "index.json",
                br#"{"manifests":[{"digest":"../../etc/passwd"}]}"#.to_vec(),
            ),
        ];
        assert_eq!(run(&tar_of(&files)), None);
    }

    #[test]
    fn digests_from_paths() {
        assert_eq!(
            digest_from_path(&format!("{}.json", hex('a'))),
            Some(format!("sha256:{}", hex('a')))
        );
        assert_eq!(
            digest_from_path("blobs/sha256/abc"),
            Some("sha256:abc".into())
        );
        assert_eq!(digest_from_path("config.json"), None);
        assert_eq!(digest_from_path("blobs/sha256/../x"), None);
        assert_eq!(blob_path("sha256:ab/cd"), None);
        assert_eq!(blob_path("nocolon"), None);
    }
}
