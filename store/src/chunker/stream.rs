//! Push-based chunking of streams with a bounded buffer.

use super::{parallel, Chunk, Chunker};
use std::io::{self, Read};

/// Decided chunks handed to the consumer: `data` holds their bytes back to
/// back, the first byte at stream offset `base`.
#[derive(Debug)]
pub struct Batch<'a> {
    /// The bytes of `chunks`, contiguous.
    pub data: &'a [u8],
    /// Stream offset of `data[0]`.
    pub base: u64,
    /// The chunks, with stream offsets.
    pub chunks: &'a [Chunk],
}

impl Batch<'_> {
    /// The bytes of one of this batch's chunks.
    pub fn bytes(&self, chunk: &Chunk) -> &[u8] {
        let start = (chunk.offset - self.base) as usize;
        &self.data[start..start + chunk.len as usize]
    }
}

/// Chunks a stream pushed to it piece by piece, with the same cut points
/// as [`Chunker::cuts`] over the whole stream, holding at most `capacity`
/// bytes. Each full buffer is chunked and hashed in parallel.
#[derive(Debug)]
pub struct StreamChunker {
    chunker: Chunker,
    /// Always `capacity` long; `buf[..filled]` holds data.
    buf: Vec<u8>,
    filled: usize,
    /// Stream offset of `buf[0]`.
    base: u64,
}

impl StreamChunker {
    /// Default buffer: 16 MiB, enough to keep two cores busy per batch.
    pub const DEFAULT_CAPACITY: usize = 16 << 20;

    /// A stream chunker holding up to `capacity` bytes (at least twice the
    /// maximum chunk size).
    pub fn new(chunker: Chunker, capacity: usize) -> Self {
        let capacity = capacity.max(2 * chunker.max_size());
        StreamChunker {
            chunker,
            buf: vec![0; capacity],
            filled: 0,
            base: 0,
        }
    }

    /// Bytes pushed so far.
    pub fn position(&self) -> u64 {
        self.base + self.filled as u64
    }

    /// Appends `data`, handing every batch of chunks that becomes decided to
    /// `sink`. Stops at the first error of `sink`.
    pub fn push<E>(
        &mut self,
        mut data: &[u8],
        sink: &mut impl FnMut(Batch<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        while !data.is_empty() {
            let take = (self.buf.len() - self.filled).min(data.len());
            self.buf[self.filled..self.filled + take].copy_from_slice(&data[..take]);
            self.filled += take;
            data = &data[take..];
            if self.filled == self.buf.len() {
                self.process(false, sink)?;
            }
        }
        Ok(())
    }

    /// Ends the stream: hands over the remaining chunks.
    pub fn finish<E>(
        &mut self,
        sink: &mut impl FnMut(Batch<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        self.process(true, sink)
    }

    /// Reads `reader` to its end and chunks it (reading straight into the
    /// buffer, no extra copy); returns the bytes read.
    pub fn chunk_reader<E: From<io::Error>>(
        &mut self,
        reader: &mut dyn Read,
        sink: &mut impl FnMut(Batch<'_>) -> Result<(), E>,
    ) -> Result<u64, E> {
        let start = self.position();
        loop {
            if self.filled == self.buf.len() {
                self.process(false, sink)?;
            }
            match reader.read(&mut self.buf[self.filled..]) {
                Ok(0) => break,
                Ok(n) => self.filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
        self.finish(sink)?;
        Ok(self.position() - start)
    }

    fn process<E>(
        &mut self,
        eof: bool,
        sink: &mut impl FnMut(Batch<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let data = &self.buf[..self.filled];
        let (mut chunks, next) = parallel::chunk_and_hash(&self.chunker, data, eof);
        for chunk in &mut chunks {
            chunk.offset += self.base;
        }
        if !chunks.is_empty() {
            sink(Batch {
                data: &data[..next],
                base: self.base,
                chunks: &chunks,
            })?;
        }
        self.buf.copy_within(next..self.filled, 0);
        self.filled -= next;
        self.base += next as u64;
        Ok(())
    }
}
