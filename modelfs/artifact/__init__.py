"""Artifact commands: a Modelfile read, a model built into a local OCI layout, pushed,
and extracted to plain files."""
