//! `topic.json`: a topic's [`TopicConfig`] as pretty-printed JSON, with a checksum.
//!
//! ```text
//! { "partitions": 3, …every TopicConfig field…, "crc32c": 1234567890 }
//! ```
//!
//! `crc32c` is the CRC-32C of the configuration's compact JSON (`serde_json::to_vec` of the
//! `TopicConfig` read back), so a damaged value is caught even where it would still parse: a
//! flipped bit can turn `"partitions": 3` into `2` or shorten `retention_ms`, which without a
//! checksum would silently hide a partition or delete data (found by the power-cut loop).
//! A file without the field (written before the checksum existed) is still read; one flipped
//! bit cannot remove the field (a damaged key is an unknown field, which is refused).

use std::path::Path;

use serde::Serialize;

use crate::config::TopicConfig;
use crate::error::{Error, Result};

const CRC_FIELD: &str = "crc32c";
/// Largest `topic.json` read.
pub(crate) const MAX_LEN: usize = 1 << 20;

#[derive(Serialize)]
struct Stored<'a> {
    #[serde(flatten)]
    config: &'a TopicConfig,
    crc32c: u32,
}

fn checksum(cfg: &TopicConfig) -> Result<u32> {
    let compact = serde_json::to_vec(cfg).map_err(|e| Error::InvalidConfig(e.to_string()))?;
    Ok(crc32c::crc32c(&compact))
}

/// The file's bytes for `cfg`.
pub(crate) fn encode(cfg: &TopicConfig) -> Result<Vec<u8>> {
    let stored = Stored {
        config: cfg,
        crc32c: checksum(cfg)?,
    };
    serde_json::to_vec_pretty(&stored).map_err(|e| Error::InvalidConfig(e.to_string()))
}

/// Reads the file's bytes (`path` names it in errors): bounded, checked against its checksum,
/// validated.
pub(crate) fn decode(path: &Path, bytes: &[u8]) -> Result<TopicConfig> {
    if bytes.len() > MAX_LEN {
        return Err(Error::corruption(
            path,
            0,
            None,
            "topic metadata larger than 1 MiB",
        ));
    }
    let bad = |column: usize, reason: String| Error::corruption(path, column as u64, None, reason);
    let mut value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| bad(e.column(), format!("bad topic metadata: {e}")))?;
    let stored = match value.as_object_mut() {
        Some(map) => map.remove(CRC_FIELD),
        None => return Err(bad(0, "bad topic metadata: not a JSON object".into())),
    };
    let cfg: TopicConfig =
        serde_json::from_value(value).map_err(|e| bad(0, format!("bad topic metadata: {e}")))?;
    if let Some(stored) = stored {
        let want = checksum(&cfg)?;
        if stored.as_u64() != Some(u64::from(want)) {
            return Err(bad(
                0,
                format!(
                    "topic metadata fails its checksum (crc32c {stored}, the content gives {want})"
                ),
            ));
        }
    }
    cfg.validate()?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_legacy_and_every_single_bit_flip_is_refused() {
        let cfg = TopicConfig {
            partitions: 3,
            retention_ms: Some(604_800_000),
            ..TopicConfig::default()
        };
        let bytes = encode(&cfg).unwrap();
        let p = Path::new("topic.json");
        assert_eq!(decode(p, &bytes).unwrap(), cfg);
        // Written before the checksum existed: still read.
        let legacy = serde_json::to_vec_pretty(&cfg).unwrap();
        assert_eq!(decode(p, &legacy).unwrap(), cfg);
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                if let Ok(got) = decode(p, &b) {
                    assert_eq!(
                        got, cfg,
                        "byte {i} bit {bit} changed the configuration silently"
                    );
                }
            }
        }
    }
}
