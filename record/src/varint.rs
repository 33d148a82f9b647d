//! Kafka's zig-zag varints (protobuf `sint32`/`sint64` encoding).
//!
//! Decoding is bounded: at most 5 bytes for a varint and 10 for a varlong; anything longer is
//! rejected rather than looped over.

use super::BatchError;

/// Encoded length of `v` as a zig-zag varint.
#[inline]
pub fn len_i32(v: i32) -> usize {
    len_u64(zigzag32(v) as u64)
}

/// Encoded length of `v` as a zig-zag varlong.
#[inline]
pub fn len_i64(v: i64) -> usize {
    len_u64(zigzag64(v))
}

#[inline]
fn len_u64(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

#[inline]
fn zigzag32(v: i32) -> u32 {
    ((v << 1) ^ (v >> 31)) as u32
}

#[inline]
fn zigzag64(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

#[inline]
fn put_u64(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends `v` as a zig-zag varint.
#[inline]
pub fn put_i32(out: &mut Vec<u8>, v: i32) {
    put_u64(out, zigzag32(v) as u64);
}

/// Appends `v` as a zig-zag varlong.
#[inline]
pub fn put_i64(out: &mut Vec<u8>, v: i64) {
    put_u64(out, zigzag64(v));
}

#[inline]
fn get_u64(buf: &[u8], pos: &mut usize, max_bytes: usize) -> Result<u64, BatchError> {
    // Most varints of a record (deltas, null keys, header counts, short lengths) are one byte:
    // decoded here without the loop, the rest by it.
    if let Some(&b) = buf.get(*pos)
        && b < 0x80
    {
        *pos += 1;
        return Ok(u64::from(b));
    }
    get_u64_long(buf, pos, max_bytes)
}

fn get_u64_long(buf: &[u8], pos: &mut usize, max_bytes: usize) -> Result<u64, BatchError> {
    let mut v: u64 = 0;
    for i in 0..max_bytes {
        let Some(&b) = buf.get(*pos) else {
            return Err(BatchError::Truncated("varint"));
        };
        *pos += 1;
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(BatchError::BadVarint)
}

/// Reads a zig-zag varint at `*pos`, advancing it.
#[inline]
pub fn get_i32(buf: &[u8], pos: &mut usize) -> Result<i32, BatchError> {
    let raw = get_u64(buf, pos, 5)?;
    if raw > u64::from(u32::MAX) {
        return Err(BatchError::BadVarint);
    }
    let raw = raw as u32;
    Ok(((raw >> 1) as i32) ^ -((raw & 1) as i32))
}

/// Reads a zig-zag varlong at `*pos`, advancing it.
#[inline]
pub fn get_i64(buf: &[u8], pos: &mut usize) -> Result<i64, BatchError> {
    let raw = get_u64(buf, pos, 10)?;
    Ok(((raw >> 1) as i64) ^ -((raw & 1) as i64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_encodings() {
        // Values from the protobuf sint32 documentation.
        for (v, bytes) in [
            (0, vec![0u8]),
            (-1, vec![1]),
            (1, vec![2]),
            (-2, vec![3]),
            (63, vec![0x7e]),
            (-64, vec![0x7f]),
            (64, vec![0x80, 0x01]),
        ] {
            let mut out = Vec::new();
            put_i32(&mut out, v);
            assert_eq!(out, bytes, "encoding {v}");
            assert_eq!(len_i32(v), bytes.len());
        }
    }

    #[test]
    fn overlong_varint_is_rejected() {
        let buf = [0xffu8; 11];
        assert_eq!(get_i32(&buf, &mut 0), Err(BatchError::BadVarint));
        assert_eq!(get_i64(&buf, &mut 0), Err(BatchError::BadVarint));
        assert_eq!(
            get_i32(&[0x80], &mut 0),
            Err(BatchError::Truncated("varint"))
        );
    }

    proptest! {
        #[test]
        fn roundtrip_i32(v: i32) {
            let mut out = Vec::new();
            put_i32(&mut out, v);
            prop_assert_eq!(out.len(), len_i32(v));
            let mut pos = 0;
            prop_assert_eq!(get_i32(&out, &mut pos).unwrap(), v);
            prop_assert_eq!(pos, out.len());
        }

        #[test]
        fn roundtrip_i64(v: i64) {
            let mut out = Vec::new();
            put_i64(&mut out, v);
            prop_assert_eq!(out.len(), len_i64(v));
            let mut pos = 0;
            prop_assert_eq!(get_i64(&out, &mut pos).unwrap(), v);
        }
    }
}
