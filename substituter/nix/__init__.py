"""Pure Nix formats: base32, hashes, store paths, narinfo, signatures, NAR, compression.

Nothing here does network I/O or knows about Syndicate, HTTP or plugins.
"""
