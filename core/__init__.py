"""Plumbing every layer may import: the user-facing error, file reading and atomic writing, and the
KV policies' specification. Imports nothing else of infinisim's."""
