"""Makes ``otlp_builders`` (beside this file) importable from the tests in ingest/ and
query/ below: pytest puts a conftest's directory on ``sys.path``."""
