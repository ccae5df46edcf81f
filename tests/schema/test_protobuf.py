"""Protobuf schemas: our .proto parser against protoc's own descriptors, and the wire-compatibility rules.

The oracle for parsing is the protobuf runtime: a descriptor compiled by protoc (the ``*_pb2`` modules the
protobuf package ships, and the one confluent-kafka ships) read as a base64 ``FileDescriptorProto`` must
give the same messages and fields as our parser gives for the same file written as .proto text.
"""

from __future__ import annotations

import base64

import pytest

from fieldmesh.schema.base import InvalidSchema
from fieldmesh.schema.protobuf import ProtobufFormat

FMT = ProtobufFormat()

V1 = """
syntax = "proto3";
package telemetry.v1;
import "google/protobuf/timestamp.proto";

// a reading
message Reading {
  string device_id = 1;
  int32 seq = 2;
  double value = 3;
  google.protobuf.Timestamp at = 4;
  map<string, string> tags = 5;
  Unit unit = 6;
  enum Unit { UNIT_UNSPECIFIED = 0; CELSIUS = 1; }
  message Meta { string fw = 1; }
  Meta meta = 7;
  reserved 20 to 30;
  oneof source { string sensor = 8; string gateway = 9; }
}
"""


def test_parses_what_protoc_compiles() -> None:
    s = FMT.parse(V1, {})
    fields = s.messages["telemetry.v1.Reading"]
    assert {n: (f.name, f.type) for n, f in fields.items()} == {
        1: ("device_id", "string"), 2: ("seq", "int32"), 3: ("value", "double"),
        4: ("at", "google.protobuf.Timestamp"), 5: ("tags", "map<string,string>"), 6: ("unit", "enum"),
        7: ("meta", "telemetry.v1.Reading.Meta"), 8: ("sensor", "string"), 9: ("gateway", "string")}
    assert fields[8].oneof == fields[9].oneof == "source"
    assert "telemetry.v1.Reading.Meta" in s.messages


def test_serialized_descriptors_match_the_runtime() -> None:
    from google.protobuf import timestamp_pb2

    text = base64.b64encode(timestamp_pb2.DESCRIPTOR.serialized_pb).decode()
    s = FMT.parse(text, {})
    assert {n: (f.name, f.type) for n, f in s.messages["google.protobuf.Timestamp"].items()} == {
        1: ("seconds", "int64"), 2: ("nanos", "int32")}
    as_text = FMT.parse('syntax = "proto3"; package google.protobuf;'
                        " message Timestamp { int64 seconds = 1; int32 nanos = 2; }", {})
    assert as_text.messages == s.messages
    assert FMT.incompatibilities(as_text, s) == [] and s.canonical() == text


V2_OK = V1.replace("  reserved 20 to 30;", "  string note = 10;\n  reserved 20 to 30;").replace(
    "int32 seq = 2;", "int64 seq = 2;")
CASES = [
    ("field added and int32 -> int64", V2_OK, True, ""),
    ("field removed", V1.replace("  double value = 3;\n", ""), True, ""),
    ("field renamed", V1.replace("double value = 3", "double reading = 3"), True, ""),
    ("scalar kind changed", V1.replace("double value = 3", "string value = 3"), False, "FIELD_KIND_CHANGED"),
    ("sint32 is not int32 on the wire", V1.replace("int32 seq = 2", "sint32 seq = 2"), False, "FIELD_KIND_CHANGED"),
    ("message type changed", V1.replace("Meta meta = 7", "google.protobuf.Timestamp meta = 7"), False,
     "FIELD_NAMED_TYPE_CHANGED"),
    ("message removed", V1.replace("message Reading", "message Sample"), False, "MESSAGE_REMOVED"),
    ("package changed", V1.replace("package telemetry.v1;", "package telemetry.v2;"), False, "PACKAGE_CHANGED"),
    ("fields moved into a oneof", V1.replace("  string device_id = 1;\n  int32 seq = 2;\n",
                                             "  oneof id { string device_id = 1; int32 seq = 2; }\n"), False,
     "MULTIPLE_FIELDS_MOVED_TO_ONEOF"),
]


@pytest.mark.parametrize(("new", "compatible", "kind"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_backward_rules(new: str, compatible: bool, kind: str) -> None:
    reasons = FMT.incompatibilities(FMT.parse(new, {}), FMT.parse(V1, {}))
    assert (not reasons) == compatible, reasons
    if not compatible:
        assert any(r.startswith(kind) for r in reasons), reasons


def test_required_fields_proto2() -> None:
    old = FMT.parse('syntax = "proto2"; message M { required int32 a = 1; }', {})
    new = FMT.parse('syntax = "proto2"; message M { required int32 a = 1; required int32 b = 2; }', {})
    assert FMT.incompatibilities(new, old)[0].startswith("REQUIRED_FIELD_ADDED")
    assert FMT.incompatibilities(old, new)[0].startswith("REQUIRED_FIELD_REMOVED")


def test_invalid_proto_is_refused() -> None:
    for bad in ("message {", 'syntax = "proto3"; message M { int32 a = 1; int32 b = 1; }',
                'syntax = "proto3"; message M { int32 a = 0; }', 'import "other.proto"; message M { other.T t = 1; }',
                "", "garbage here"):
        with pytest.raises(InvalidSchema):
            FMT.parse(bad, {})
    assert FMT.parse('import "other.proto"; message M { other.T t = 1; }',
                     {"other.proto": "package other; message T {}"})
    with pytest.raises(InvalidSchema):  # T is not in package other
        FMT.parse('import "other.proto"; message M { other.T t = 1; }', {"other.proto": "message T {}"})
    with pytest.raises(InvalidSchema):
        FMT.parse("message M { Missing m = 1; }", {})


STRUCT = """
syntax = "proto3";
package google.protobuf;
option java_package = "com.google.protobuf";
message Struct {
  // Unordered map of dynamically typed values.
  map<string, Value> fields = 1;
}
message Value {
  oneof kind {
    NullValue null_value = 1;
    double number_value = 2;
    string string_value = 3;
    bool bool_value = 4;
    Struct struct_value = 5;
    ListValue list_value = 6;
  }
}
enum NullValue { NULL_VALUE = 0; }
message ListValue { repeated Value values = 1; }
"""


def test_text_compiles_to_the_descriptor_protoc_made() -> None:
    """struct.proto written as text gives the descriptor protoc compiled into the protobuf runtime
    (maps, oneofs, enums, nested entries), field by field."""
    from google.protobuf import descriptor_pb2, struct_pb2

    ours = descriptor_pb2.FileDescriptorProto.FromString(FMT.parse(STRUCT, {}).descriptor)
    theirs = descriptor_pb2.FileDescriptorProto()
    struct_pb2.DESCRIPTOR.CopyToProto(theirs)

    def shape(fdp: descriptor_pb2.FileDescriptorProto) -> object:
        def msg(m: descriptor_pb2.DescriptorProto) -> object:
            return (m.name, [(f.name, f.number, f.label, f.type, f.type_name,
                              f.oneof_index if f.HasField("oneof_index") else None) for f in m.field],
                    [o.name for o in m.oneof_decl], [msg(n) for n in m.nested_type], m.options.map_entry)
        return (fdp.package, fdp.syntax, [msg(m) for m in fdp.message_type],
                [(e.name, [(v.name, v.number) for v in e.value]) for e in fdp.enum_type])

    assert shape(ours) == shape(theirs)


def test_proto3_optional_and_imports_build_in_the_runtime() -> None:
    """A descriptor we compile is accepted by the protobuf runtime's pool (what deserializers do)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, timestamp_pb2

    text = ('syntax = "proto3"; package fm; import "google/protobuf/timestamp.proto";'
            " message Tick { optional int32 seq = 1; google.protobuf.Timestamp at = 2; map<string, Tick> kids = 3;"
            " enum Kind { A = 0; B = 1; } Kind kind = 4; }")
    fdp = descriptor_pb2.FileDescriptorProto.FromString(FMT.parse(text, {}).descriptor)
    fdp.name = "fm/tick.proto"
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(timestamp_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(fdp)
    tick = message_factory.GetMessageClass(pool.FindMessageTypeByName("fm.Tick"))
    m = tick(seq=0, kind=1)
    m.at.seconds = 5
    m.kids["x"].seq = 2
    back = tick.FromString(m.SerializeToString())
    assert back.HasField("seq") and back.at.seconds == 5 and back.kids["x"].seq == 2 and back.kind == 1
