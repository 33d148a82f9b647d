#!/usr/bin/env python3
"""Independent check of Spool's segment files against kafka-python's RecordBatch v2 codec.

Driven by log-engine/tests/kafka_interop.rs; prints JSON on stdout.

    kafka_interop.py SEGMENT.log...   decode every batch of the files with kafka-python
                                      (MemoryRecords / DefaultRecordBatch: its own CRC-32C
                                      check, record parsing and decompression)
    kafka_interop.py --build OUT      write batches built by kafka-python's
                                      DefaultRecordBatchBuilder to OUT (concatenated) and
                                      print what they hold

Bytes (keys, values, header values) are hex strings in the JSON; null is null.
Needs: pip install kafka-python==3.0.12 lz4==4.4.5 zstandard==0.25.0
"""

import json
import sys

PIP_HINT = "pip install kafka-python==3.0.12 lz4==4.4.5 zstandard==0.25.0"

try:
    import kafka
    import kafka.codec
    from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder
    from kafka.record.memory_records import MemoryRecords
    import lz4.frame  # noqa: F401  (kafka-python's LZ4 codec)
    import zstandard
except ImportError as e:  # pragma: no cover - environment problem, reported to the Rust test
    sys.stderr.write(
        "kafka_interop.py: %s\nThe Kafka interop test needs kafka-python and its LZ4/Zstandard "
        "codecs: %s\n" % (e, PIP_HINT)
    )
    sys.exit(3)

CODECS = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}
CODEC_NAMES = {v: k for k, v in CODECS.items()}


def hx(b):
    return None if b is None else bytes(b).hex()


def fail(msg):
    sys.stderr.write("kafka_interop.py: %s\n" % msg)
    sys.exit(1)


def frame_info(codec, payload):
    """What the compressed payload's frame header says (checked by the Rust side)."""
    if codec == "lz4":
        if payload[:4] != b"\x04\x22\x4d\x18":
            fail("LZ4 payload does not start with the LZ4 frame magic: %s" % payload[:8].hex())
        return {"flg": payload[4], "bd": payload[5]}
    if codec == "zstd":
        p = zstandard.get_frame_parameters(payload)
        return {
            "content_size": p.content_size,
            "has_checksum": bool(p.has_checksum),
            "dict_id": p.dict_id,
        }
    return None


def decode_file(path):
    with open(path, "rb") as f:
        data = f.read()
    records = MemoryRecords(data)
    batches = []
    pos = 0
    while records.has_next():
        batch = records.next_batch()
        if not isinstance(batch, DefaultRecordBatch):
            fail("%s@%d: kafka-python read a legacy (magic 0/1) batch" % (path, pos))
        size = batch.size_in_bytes
        raw = data[pos : pos + size]
        # kafka-python's own CRC-32C over attributes..end, before any decompression.
        crc_valid = batch.validate_crc()
        codec = CODEC_NAMES.get(batch.compression_type, str(batch.compression_type))
        out = {
            "position": pos,
            "size": size,
            "base_offset": batch.base_offset,
            "leader_epoch": batch.leader_epoch,
            "magic": batch.magic,
            "crc": batch.crc,
            "crc_valid": crc_valid,
            "attributes": batch.attributes,
            "compression": codec,
            "timestamp_type": batch.timestamp_type,
            "is_transactional": batch.is_transactional,
            "is_control": batch.is_control_batch,
            "last_offset_delta": batch.last_offset_delta,
            "first_timestamp": batch.first_timestamp,
            "max_timestamp": batch.max_timestamp,
            "producer_id": batch.producer_id,
            "producer_epoch": batch.producer_epoch,
            "base_sequence": batch.base_sequence,
            "records_count": batch.records_count,
            "frame": frame_info(codec, raw[61:]),
        }
        recs = []
        # Iterating decompresses (kafka.codec) and parses every record; kafka-python raises
        # CorruptRecordError on a malformed record or on bytes left after the last one.
        for r in batch:
            recs.append(
                {
                    "offset": r.offset,
                    "timestamp": r.timestamp,
                    "key": hx(r.key),
                    "value": hx(r.value),
                    "headers": [[k, hx(v)] for k, v in r.headers],
                }
            )
        if len(recs) != batch.records_count:
            fail("%s@%d: %d records decoded, header says %d" % (path, pos, len(recs), batch.records_count))
        out["records"] = recs
        batches.append(out)
        pos += size
    return {"path": path, "size": len(data), "valid_bytes": records.valid_bytes(), "batches": batches}


# Batches built with kafka-python for the reverse direction. Values are compressible where the
# batch is compressed: kafka-python falls back to an uncompressed batch when compression does
# not make it smaller, and the point is to exercise its codecs.
T = 1_700_000_000_000


def build_specs():
    specs = []
    specs.append(
        {
            "compression": "none",
            "records": [
                (T, b"key-0", b"value-0", [("h", b"v")]),
                (T - 5, None, b"null key", []),
                (T + 10, b"tomb", None, [("gone", None)]),
                (T + 11, b"", b"", [("\u043a\u043b\u044e\u0447", b"\x00\xff"), ("e", b"")]),
            ],
        }
    )
    specs.append(
        {
            "compression": "gzip",
            "records": [(T + 20 + i, b"g", b"gzip " * 20, []) for i in range(3)],
        }
    )
    specs.append(
        {
            "compression": "lz4",
            "records": [
                (T + 100 + i, None if i % 3 == 0 else b"k%d" % i, b"lz4 value %d " % i * 8, [("i", b"%d" % i)])
                for i in range(50)
            ],
        }
    )
    specs.append(
        {
            "compression": "zstd",
            "records": [
                (T + 200 - i, b"z%d" % (i % 7), b"zstd value %d " % i * 8, [("n", None)] if i % 2 else [])
                for i in range(50)
            ],
        }
    )
    specs.append(
        {
            "compression": "none",
            "producer": (12345, 2, 40),
            "records": [(T + 300, b"idem", b"potent", []), (T + 301, b"idem", b"again", [])],
        }
    )
    # Larger than one 64 KiB LZ4 block: several blocks in one frame, with a content size.
    big = bytes((i * 7 + (i >> 9)) % 251 for i in range(4096)) * 20
    specs.append(
        {
            "compression": "lz4",
            "records": [(T + 400, b"big", big, []), (T + 401, b"big2", big[::-1], [])],
        }
    )
    specs.append(
        {
            "compression": "zstd",
            "records": [(T + 500, b"big", big, [("x", b"y")])],
        }
    )
    return specs


def build(out_path):
    batches = []
    with open(out_path, "wb") as f:
        for spec in build_specs():
            codec = CODECS[spec["compression"]]
            pid, epoch, seq = spec.get("producer", (-1, -1, -1))
            b = DefaultRecordBatchBuilder(
                magic=2,
                compression_type=codec,
                is_transactional=False,
                producer_id=pid,
                producer_epoch=epoch,
                base_sequence=seq,
                batch_size=1 << 30,
            )
            for i, (ts, key, value, headers) in enumerate(spec["records"]):
                if b.append(i, timestamp=ts, key=key, value=value, headers=headers) is None:
                    fail("kafka-python refused record %d" % i)
            data = bytes(b.build())
            got = DefaultRecordBatch(data)
            if got.compression_type != codec:
                fail("kafka-python stored a %s batch uncompressed" % spec["compression"])
            if not got.validate_crc():
                fail("kafka-python built a batch with a bad CRC")
            f.write(data)
            batches.append(
                {
                    "size": len(data),
                    "compression": spec["compression"],
                    "producer_id": pid,
                    "producer_epoch": epoch,
                    "base_sequence": seq,
                    "crc": got.crc,
                    "frame": frame_info(spec["compression"], data[61:]),
                    "records": [
                        {
                            "offset_delta": i,
                            "timestamp": ts,
                            "key": hx(key),
                            "value": hx(value),
                            "headers": [[k, hx(v)] for k, v in headers],
                        }
                        for i, (ts, key, value, headers) in enumerate(spec["records"])
                    ],
                }
            )
    return {"batches": batches}


def main(argv):
    info = {
        "kafka_python": kafka.__version__,
        "lz4": __import__("lz4").__version__,
        "zstandard": zstandard.__version__,
        "python": sys.version.split()[0],
    }
    if len(argv) == 2 and argv[0] == "--build":
        out = build(argv[1])
    elif argv and not argv[0].startswith("-"):
        out = {"files": [decode_file(p) for p in argv]}
    else:
        sys.stderr.write(__doc__)
        return 2
    out["versions"] = info
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
