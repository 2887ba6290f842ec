"""TF Serving's config protos that tensorflow-serving-api does not ship compiled, and reading
their text files.

Why: `--monitoring-config-file` (MonitoringConfig) and `--batching-parameters-file`
(BatchingParameters) are text protos a user writes for `tensorflow_model_server`. Building the
message from its fields, as the .proto declares them, lets `text_format` parse such a file
strictly (an unknown field or a wrong type is an error), which a hand-written parser would not.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format


def message_class(proto: descriptor_pb2.FileDescriptorProto, full_name: str,
                  dependencies=()) -> type:
    """The message class `full_name` of `proto`, in a pool of its own with `dependencies`
    (the FileDescriptors it imports, e.g. wrappers_pb2.DESCRIPTOR)."""
    pool = descriptor_pool.DescriptorPool()
    for dependency in dependencies:
        pool.AddSerializedFile(dependency.serialized_pb)
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))


def read_text_proto(path: str, message_type: type, what: str):
    """`path` parsed as a text proto of `message_type`.

    Raises:
      ValueError: the file is unreadable or not such a proto, in one line naming it.
    """
    try:
        with open(path) as f:
            text = f.read()
    except OSError as error:
        raise ValueError(f"{path}: cannot read the {what} ({error.strerror})") from None
    message = message_type()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as error:
        raise ValueError(
            f"{path}: not a {message_type.DESCRIPTOR.name} text proto ({error})") from None
    return message
