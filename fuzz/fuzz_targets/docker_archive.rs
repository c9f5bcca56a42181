//! store::image over what store::tarsplit collects: detecting docker-save
//! and OCI archives never panics, is deterministic, every layer it reports
//! lies inside the input, and the result survives the manifest header's
//! JSON round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use store::image::{self, ImageInfo};
use store::manifest::{Header, Manifest, StashKind};
use store::tarsplit::TarSplitter;

fuzz_target!(|data: &[u8]| {
    let mut s = TarSplitter::new();
    let mut sink = |_, _: &[u8]| {};
    s.feed(data, &mut sink);
    s.finish(&mut sink);
    let collected = s.into_collected();
    let Some(info) = image::detect(&collected) else {
        return;
    };
    assert_eq!(image::detect(&collected).as_ref(), Some(&info));
    assert!(collected.is_tar, "an image detected in something not a tar");
    for l in &info.layers {
        let end = l.offset.checked_add(l.size);
        assert!(
            end.is_some_and(|e| e <= data.len() as u64),
            "layer {:?} at {} + {} lies past the end of a {}-byte input",
            l.path,
            l.offset,
            l.size,
            data.len()
        );
    }
    let json = serde_json::to_vec(&info).expect("image info serialises");
    let back: ImageInfo = serde_json::from_slice(&json).expect("image info parses back");
    assert_eq!(back, info);

    // Stored in a manifest header, it must decode to the same thing.
    let m = Manifest {
        header: Header {
            kind: StashKind::DockerArchive,
            size: 0,
            sha256: String::new(),
            source: None,
            image: Some(info),
        },
        meta: Vec::new(),
        content: Vec::new(),
        layout: Default::default(),
    };
    assert_eq!(
        Manifest::decode(&m.encode()).expect("own manifest decodes"),
        m
    );
});
