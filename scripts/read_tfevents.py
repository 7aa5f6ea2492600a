#!/usr/bin/python3
# Independent reader of TensorBoard events files, for keel's round-trip test: checks TFRecord framing
# and both masked CRC-32Cs (python3-crcmod), parses each record as tensorflow.Event with Debian's
# python3-protobuf using the schema below, and prints one JSON object per event. Exits non-zero on
# any framing, CRC or parse error.
#
# Schema: the subset of tensorflow/core/util/event.proto and tensorflow/core/framework/summary.proto
# that scalar logging uses, with TensorFlow's field numbers, built at run time (no protoc needed).
#   Event { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
#   Summary { repeated Value value = 1; }   Summary.Value { string tag = 1; float simple_value = 2; }
# (file_version/summary share the oneof "what", simple_value the oneof "value", as in TensorFlow.)
import json
import struct
import sys

import crcmod.predefined
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

F = descriptor_pb2.FieldDescriptorProto
crc32c = crcmod.predefined.mkCrcFun("crc-32c")


def masked(data):
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def add_field(msg, name, number, ftype, label=F.LABEL_OPTIONAL, type_name=None, oneof=None):
    f = msg.field.add(name=name, number=number, type=ftype, label=label)
    if type_name:
        f.type_name = type_name
    if oneof is not None:
        f.oneof_index = oneof


def event_class():
    fdp = descriptor_pb2.FileDescriptorProto(name="keel_event_subset.proto", package="tensorflow", syntax="proto3")
    summary = fdp.message_type.add(name="Summary")
    value = summary.nested_type.add(name="Value")
    add_field(value, "tag", 1, F.TYPE_STRING)
    value.oneof_decl.add(name="value")  # as in summary.proto, so a 0.0 value is still present
    add_field(value, "simple_value", 2, F.TYPE_FLOAT, oneof=0)
    add_field(summary, "value", 1, F.TYPE_MESSAGE, F.LABEL_REPEATED, ".tensorflow.Summary.Value")
    event = fdp.message_type.add(name="Event")
    add_field(event, "wall_time", 1, F.TYPE_DOUBLE)
    add_field(event, "step", 2, F.TYPE_INT64)
    event.oneof_decl.add(name="what")  # as in event.proto
    add_field(event, "file_version", 3, F.TYPE_STRING, oneof=0)
    add_field(event, "summary", 5, F.TYPE_MESSAGE, type_name=".tensorflow.Summary", oneof=0)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    desc = pool.FindMessageTypeByName("tensorflow.Event")
    if hasattr(message_factory, "GetMessageClass"):
        return message_factory.GetMessageClass(desc)
    return message_factory.MessageFactory(pool).GetPrototype(desc)


def main(path):
    Event = event_class()
    data = open(path, "rb").read()
    pos = 0
    n = 0
    while pos < len(data):
        if len(data) - pos < 12:
            sys.exit(f"{path}: truncated record header at byte {pos}")
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (len_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        if len_crc != masked(header):
            sys.exit(f"{path}: record {n}: length CRC mismatch at byte {pos}")
        body = data[pos + 12:pos + 12 + length]
        if len(body) != length or len(data) < pos + 16 + length:
            sys.exit(f"{path}: record {n}: truncated data at byte {pos}")
        (data_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
        if data_crc != masked(body):
            sys.exit(f"{path}: record {n}: data CRC mismatch at byte {pos}")
        ev = Event()
        ev.ParseFromString(body)
        # Re-serialising must give the same bytes: nothing was written that this schema does not know.
        if ev.SerializeToString(deterministic=True) != body:
            sys.exit(f"{path}: record {n}: fields outside the Event schema or non-canonical encoding")
        out = {"wall_time": ev.wall_time, "step": ev.step}
        what = ev.WhichOneof("what")
        if what == "file_version":
            out["file_version"] = ev.file_version
        elif what == "summary":
            vals = []
            for v in ev.summary.value:
                if v.WhichOneof("value") != "simple_value":
                    sys.exit(f"{path}: record {n}: summary value '{v.tag}' has no simple_value")
                vals.append({"tag": v.tag, "simple_value": v.simple_value})
            out["values"] = vals
        else:
            sys.exit(f"{path}: record {n}: event has neither file_version nor summary")
        print(json.dumps(out))
        pos += 16 + length
        n += 1
    if n == 0:
        sys.exit(f"{path}: no records")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: read_tfevents.py EVENTS_FILE")
    main(sys.argv[1])
