#!/usr/bin/env python3
"""Writes the seed corpus of safetensors_fuzz into tests/fuzz/corpus-safetensors/.

A few small valid files (the layout the reference writer produces: header padded with spaces to a
multiple of 8, tensors contiguous in the data buffer) and invalid ones near the edges the reader
checks, plus two index JSON texts (the fuzzer also runs them through SafetensorsIndex::parse_index).
Run: python3 tests/fuzz/make_safetensors_corpus.py  (deterministic; rewrites the directory).
"""
import json
import pathlib
import shutil
import struct

OUT = pathlib.Path(__file__).resolve().parent / "corpus-safetensors"


def file_of(header_text: str, data: bytes = b"", length=None) -> bytes:
    h = header_text.encode("utf-8")
    return struct.pack("<Q", len(h) if length is None else length) + h + data


def build(tensors, metadata=None) -> bytes:
    """tensors: list of (name, dtype, shape, raw bytes), laid out in order."""
    header, offset, data = {}, 0, b""
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        data += raw
    text = json.dumps(header, separators=(",", ":"))
    text += " " * (-len(text) % 8)
    return file_of(text, data)


def entry(dtype, shape, offsets):
    return json.dumps({"dtype": dtype, "shape": shape, "data_offsets": offsets}, separators=(",", ":"))


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir()
    seeds = {
        # valid
        "valid-one-f32": build([("w", "F32", [2, 2], struct.pack("<4f", 1, 2, 3, 4))]),
        "valid-mixed": build(
            [
                ("a.weight", "F16", [3], struct.pack("<3H", 0x3C00, 0xC000, 0x7BFF)),
                ("b.bias", "BF16", [2], struct.pack("<2H", 0x3F80, 0xBFC0)),
                ("empty", "F32", [0, 4], b""),
                ("i", "I64", [1], struct.pack("<q", -1)),
                ("flags", "BOOL", [2], b"\x01\x00"),
                ("scalar", "U8", [], b"\x2a"),
                ("f8", "F8_E5M2", [1, 1], b"\x3c"),
            ],
            {"format": "pt"},
        ),
        "valid-empty-header": file_of("{}"),
        "valid-metadata-only": build([], {"k": "v", "x": ""}),
        # invalid
        "bad-short": b"\x05\x00\x00",
        "bad-length-zero": file_of("{}", length=0),
        "bad-length-past-eof": file_of("{}", length=64),
        "bad-length-max": file_of("{}", length=2**64 - 1),
        "bad-not-object": file_of("[1,2,3]"),
        "bad-deep": file_of('{"a":' + "[" * 64),
        "bad-overlap": file_of('{"a":' + entry("F32", [2], [0, 8]) + ',"b":' + entry("F32", [2], [4, 12]) + "}", bytes(12)),
        "bad-gap": file_of('{"a":' + entry("F32", [1], [0, 4]) + ',"b":' + entry("F32", [1], [8, 12]) + "}", bytes(12)),
        "bad-trailing": file_of('{"a":' + entry("U8", [1], [0, 1]) + "}", bytes(5)),
        "bad-shape-overflow": file_of('{"a":' + entry("F32", [2**32, 2**32, 16], [0, 8]) + "}", bytes(8)),
        "bad-duplicate": file_of('{"a":' + entry("U8", [1], [0, 1]) + ',"a":' + entry("U8", [1], [1, 2]) + "}", bytes(2)),
        "bad-float-offset": file_of('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1.0]}}', bytes(1)),
        "bad-negative-offset": file_of('{"a":{"dtype":"U8","shape":[1],"data_offsets":[-1,0]}}', bytes(1)),
        "bad-extra-key": file_of('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":0}}', bytes(1)),
        "bad-utf8": struct.pack("<Q", 7) + b'{"\xff":1}',
        # index texts
        "index-valid": json.dumps(
            {"metadata": {"total_size": 28}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                                            "b": "model-00002-of-00002.safetensors"}}
        ).encode(),
        "index-bad-path": b'{"weight_map": {"a": "../x.safetensors"}}',
    }
    for name, data in seeds.items():
        (OUT / name).write_bytes(data)
    print(f"wrote {len(seeds)} files to {OUT}")


if __name__ == "__main__":
    main()
