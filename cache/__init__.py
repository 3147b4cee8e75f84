"""The HDF5 feature store: schema, fingerprint, writer (crash-safe) and reader."""
