//! Batch compression codecs (attribute bits 0–2).
//!
//! Spool encodes and decodes `none`, `lz4` (LZ4 frame format, as Kafka) and `zstd`. `gzip` and
//! `snappy` batches are accepted and stored as they are (their record count bounded by what
//! their bytes could expand to), but decoding them into records returns
//! [`BatchError::Unsupported`]. LZ4 and zstd batches are decompressed on append to check their
//! records, as a stream (`Compression::reader`).
//! Decompression is bounded by [`crate::DecodeLimits::max_decompressed_bytes`]: a decompression bomb
//! stops at the limit instead of allocating.

use std::io::{BufRead, BufReader, Read, Write};

use super::BatchError;

/// Compression codec of a batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Compression {
    /// Records stored as they are.
    #[default]
    None,
    /// gzip (stored, not decoded by Spool).
    Gzip,
    /// Snappy (stored, not decoded by Spool).
    Snappy,
    /// LZ4 frame format.
    Lz4,
    /// Zstandard.
    Zstd,
}

impl Compression {
    pub(crate) fn from_attribute(bits: i16) -> Result<Compression, BatchError> {
        Ok(match bits {
            0 => Compression::None,
            1 => Compression::Gzip,
            2 => Compression::Snappy,
            3 => Compression::Lz4,
            4 => Compression::Zstd,
            other => return Err(BatchError::BadAttributes(other)),
        })
    }

    pub(crate) fn attribute(self) -> i16 {
        match self {
            Compression::None => 0,
            Compression::Gzip => 1,
            Compression::Snappy => 2,
            Compression::Lz4 => 3,
            Compression::Zstd => 4,
        }
    }

    /// Parses `none`, `lz4`, `zstd` (and the stored-only `gzip`, `snappy`).
    pub fn parse(name: &str) -> Option<Compression> {
        Some(match name.to_ascii_lowercase().as_str() {
            "none" => Compression::None,
            "gzip" => Compression::Gzip,
            "snappy" => Compression::Snappy,
            "lz4" => Compression::Lz4,
            "zstd" => Compression::Zstd,
            _ => return None,
        })
    }

    /// Compresses `data` into `out` (appending).
    pub fn compress(self, data: &[u8], out: &mut Vec<u8>) -> Result<(), BatchError> {
        match self {
            Compression::None => {
                out.extend_from_slice(data);
                Ok(())
            }
            Compression::Lz4 => {
                let mut enc = lz4_flex::frame::FrameEncoder::new(out);
                enc.write_all(data)
                    .map_err(|e| BatchError::Decompress(format!("lz4 encode: {e}")))?;
                enc.finish()
                    .map_err(|e| BatchError::Decompress(format!("lz4 encode: {e}")))?;
                Ok(())
            }
            Compression::Zstd => {
                let compressed = zstd::bulk::compress(data, 1)
                    .map_err(|e| BatchError::Decompress(format!("zstd encode: {e}")))?;
                out.extend_from_slice(&compressed);
                Ok(())
            }
            Compression::Gzip | Compression::Snappy => {
                Err(BatchError::Unsupported("encoding gzip or snappy batches"))
            }
        }
    }

    /// Decompresses `data`, refusing to produce more than `limit` bytes.
    pub fn decompress(self, data: &[u8], limit: u32) -> Result<Vec<u8>, BatchError> {
        let mut out = Vec::new();
        self.decompress_into(data, limit, &mut out)?;
        Ok(out)
    }

    /// [`Compression::decompress`] into `out` (cleared first), reusing its allocation: for
    /// callers that decompress batch after batch.
    pub fn decompress_into(
        self,
        data: &[u8],
        limit: u32,
        out: &mut Vec<u8>,
    ) -> Result<(), BatchError> {
        let limit = u64::from(limit);
        out.clear();
        let read = match self {
            Compression::None => {
                out.extend_from_slice(data);
                return Ok(());
            }
            Compression::Lz4 => lz4_flex::frame::FrameDecoder::new(data)
                .take(limit + 1)
                .read_to_end(out),
            Compression::Zstd => {
                zstd_decoder(data, limit).and_then(|d| d.take(limit + 1).read_to_end(out))
            }
            Compression::Gzip | Compression::Snappy => {
                return Err(BatchError::Unsupported("decoding gzip or snappy batches"));
            }
        };
        read.map_err(|e| BatchError::Decompress(e.to_string()))?;
        if out.len() as u64 > limit {
            return Err(BatchError::Limit {
                what: super::DECOMPRESSED_SIZE,
                limit,
                actual: out.len() as u64,
            });
        }
        Ok(())
    }

    /// A streaming decoder over `data` (a batch's records region), for walking records
    /// without holding them all: memory is the codec's own state (LZ4: one block of at most
    /// 4 MiB; zstd: its window, capped by [`zstd_window_log_max`]) plus a 16 KiB buffer. The
    /// caller bounds how much it reads.
    pub(crate) fn reader<'a>(
        self,
        data: &'a [u8],
        limit: u32,
    ) -> Result<Box<dyn BufRead + 'a>, BatchError> {
        const BUF: usize = 16 << 10;
        Ok(match self {
            Compression::None => Box::new(data),
            Compression::Lz4 => Box::new(BufReader::with_capacity(
                BUF,
                lz4_flex::frame::FrameDecoder::new(data),
            )),
            Compression::Zstd => Box::new(BufReader::with_capacity(
                BUF,
                zstd_decoder(data, u64::from(limit))
                    .map_err(|e| BatchError::Decompress(e.to_string()))?,
            )),
            Compression::Gzip | Compression::Snappy => {
                return Err(BatchError::Unsupported("decoding gzip or snappy batches"));
            }
        })
    }
}

/// The largest zstd window (log2 bytes) accepted when decoding at most `limit` bytes: enough
/// for the content itself and at least 2^23 (the window of zstd level 19, and more than
/// Kafka producers' defaults use), at most 2^27 (libzstd's own default ceiling). A frame
/// asking for more is refused before its window is allocated.
pub(crate) fn zstd_window_log_max(limit: u64) -> u32 {
    let needed = 64 - limit.saturating_sub(1).leading_zeros();
    needed.clamp(23, 27)
}

fn zstd_decoder(
    data: &[u8],
    limit: u64,
) -> std::io::Result<zstd::stream::read::Decoder<'static, &[u8]>> {
    let mut d = zstd::stream::read::Decoder::with_buffer(data)?;
    d.window_log_max(zstd_window_log_max(limit))?;
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_bomb_limit() {
        let data = vec![7u8; 1 << 20];
        for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
            let mut out = Vec::new();
            c.compress(&data, &mut out).unwrap();
            assert_eq!(c.decompress(&out, 1 << 20).unwrap(), data, "{c:?}");
            if c != Compression::None {
                // 1 MiB of one byte compresses to a few KiB; a 64 KiB limit must stop it.
                let err = c.decompress(&out, 64 << 10).unwrap_err();
                assert!(err.is_decompressed_size_limit(), "{c:?}: {err}");
            }
        }
    }

    #[test]
    fn garbage_does_not_decode() {
        for c in [Compression::Lz4, Compression::Zstd] {
            assert!(c.decompress(b"definitely not compressed", 1 << 20).is_err());
        }
    }
}
