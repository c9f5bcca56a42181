//! Builds a synthetic store with many chunks, for measuring `ferry gc` at
//! scale without terabytes of data: N tiny distinct chunks in packs, and
//! names whose manifests refer to them (every name 1/NAMES of the chunks).
//!
//! `cargo run --release -p ferry-store --example synth_store -- DIR CHUNKS NAMES`

use std::io::Write;
use store::backend::Kind;
use store::compress::Codec;
use store::manifest::{ChunkRef, Header, Manifest, StashKind};
use store::name::Name;
use store::pack::PackWriter;
use store::repo::Store;
use store::tarsplit::Part;
use store::{ChunkId, ManifestId};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (dir, chunks, names) = match &args[..] {
        [_, d, c, n] => (d.clone(), c.parse::<u64>()?, n.parse::<u64>()?),
        _ => return Err("usage: synth_store DIR CHUNKS NAMES".into()),
    };
    let store = Store::open(&dir)?;
    let backend = store.backend();
    let per_name = chunks / names;
    let mut writer = PackWriter::new(backend)?;
    let mut recipe = Vec::with_capacity(per_name as usize);
    let mut name_no = 0;
    for i in 0..chunks {
        let raw = format!("synthetic chunk {i:016x} ferry gc scale test padding").into_bytes();
        let id = ChunkId::of(&raw);
        writer.add(id, Codec::Raw, raw.len() as u32, &raw)?;
        if writer.is_full() {
            writer.finish(backend)?;
            writer = PackWriter::new(backend)?;
        }
        recipe.push(ChunkRef {
            id,
            len: raw.len() as u32,
        });
        if recipe.len() as u64 == per_name {
            let size = recipe.iter().map(|c| c.len as u64).sum();
            let m = Manifest {
                header: Header {
                    kind: StashKind::Stream,
                    size,
                    sha256: String::new(),
                    source: None,
                    image: None,
                },
                meta: Vec::new(),
                content: std::mem::take(&mut recipe),
                layout: [(Part::Content, size)].into_iter().collect(),
            };
            let bytes = m.encode();
            let id = ManifestId::of(&bytes);
            backend.put(Kind::Manifest, &id.to_hex(), &bytes)?;
            store::refs::set(backend, &Name::parse(&format!("synth/{name_no:06}"))?, &id)?;
            name_no += 1;
            print!("\r{i} chunks, {name_no} names");
            std::io::stdout().flush()?;
        }
    }
    writer.finish(backend)?;
    println!("\ndone: {chunks} chunks, {name_no} names in {dir}");
    Ok(())
}
