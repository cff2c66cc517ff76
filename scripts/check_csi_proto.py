"""Check modelfs/csi/csi.proto against the CSI spec's own csi.proto.

Every service method, message, field (name, number, type, label, oneof) and enum value that
modelfs declares must be declared the same way by the spec; what modelfs leaves out does not
matter. The spec is not vendored: give its csi.proto, from a checkout of
github.com/container-storage-interface/spec at the tag the header of csi.proto names:

    .venv/bin/python scripts/check_csi_proto.py ../spec/csi.proto
"""

from __future__ import annotations

import os
import sys
import tempfile

from google.protobuf import descriptor_pb2


def compile_descriptors(proto: str) -> descriptor_pb2.FileDescriptorProto:
    """The FileDescriptorProto protoc makes of ``proto`` (grpcio-tools' bundled protoc)."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "set.bin")
        args = ["protoc", f"-I{os.path.dirname(os.path.abspath(proto))}", f"-I{well_known}",
                f"--descriptor_set_out={out}", os.path.basename(proto)]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc could not compile {proto}")
        files = descriptor_pb2.FileDescriptorSet()
        with open(out, "rb") as handle:
            files.ParseFromString(handle.read())
    return files.file[0]


def _messages(messages, prefix: str = "") -> dict:
    found = {}
    for message in messages:
        name = f"{prefix}{message.name}"
        found[name] = message
        found.update(_messages(message.nested_type, f"{name}."))
    return found


def _enums(file: descriptor_pb2.FileDescriptorProto) -> dict:
    found = {e.name: e for e in file.enum_type}
    for name, message in _messages(file.message_type).items():
        found.update({f"{name}.{e.name}": e for e in message.enum_type})
    return found


def _field(message, field) -> tuple:
    oneof = message.oneof_decl[field.oneof_index].name if field.HasField("oneof_index") else None
    return field.number, field.type, field.label, field.type_name, oneof


def differences(ours: descriptor_pb2.FileDescriptorProto, spec: descriptor_pb2.FileDescriptorProto) -> list[str]:
    """What ``ours`` declares differently from ``spec``, one line each (empty: a true subset)."""
    problems = []
    if ours.package != spec.package:
        problems.append(f"package {ours.package} is {spec.package} in the spec")
    spec_services = {s.name: {m.name: m for m in s.method} for s in spec.service}
    for service in ours.service:
        for method in service.method:
            theirs = spec_services.get(service.name, {}).get(method.name)
            if theirs is None or (theirs.input_type, theirs.output_type) != (method.input_type, method.output_type):
                problems.append(f"rpc {service.name}.{method.name} differs from the spec or is not in it")
    spec_messages = _messages(spec.message_type)
    for name, message in _messages(ours.message_type).items():
        theirs = spec_messages.get(name)
        if theirs is None:
            problems.append(f"message {name} is not in the spec")
            continue
        their_fields = {f.name: f for f in theirs.field}
        for field in message.field:
            other = their_fields.get(field.name)
            if other is None or _field(message, field) != _field(theirs, other):
                problems.append(f"field {name}.{field.name} differs from the spec or is not in it")
    spec_enums = _enums(spec)
    for name, enum in _enums(ours).items():
        values = {v.name: v.number for v in spec_enums[name].value} if name in spec_enums else {}
        for value in enum.value:
            if values.get(value.name) != value.number:
                problems.append(f"enum value {name}.{value.name} = {value.number} differs from the spec")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    ours = compile_descriptors(os.path.join(os.path.dirname(__file__), "..", "modelfs", "csi", "csi.proto"))
    problems = differences(ours, compile_descriptors(argv[0]))
    for problem in problems:
        print(problem)
    count = sum(len(m.field) for m in _messages(ours.message_type).values())
    print(f"{len(problems)} differences; checked {len(_messages(ours.message_type))} messages, {count} fields, "
          f"{sum(len(s.method) for s in ours.service)} methods")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
