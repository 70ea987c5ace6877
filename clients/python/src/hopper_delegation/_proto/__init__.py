"""Generated protobuf and gRPC modules of the Hopper delegation API (package hopper.delegation.v1).

Written by clients/python/scripts/generate.py; do not edit. Regenerate with that script.
"""
