"""SFTP (v3, as OpenSSH speaks it) observed on the relay: framing, decoding and file audit.

Pure and synchronous: the relay feeds it the bytes it forwards anyway; it never blocks, buffers
or alters them, and it never raises into the data path.
"""
