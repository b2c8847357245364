"""The trace contract between executor and simulator: model specs, schema, writer, reader, summary."""
