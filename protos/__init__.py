"""The wire contract (protos/folio/v1/*.proto) and its generated stubs (protos/gen, made by protos/generate.py)."""
