"""The firehose: durable, high-throughput event ingestion (DESIGN.md, "firehose")."""
