"""The code that travels inside every artifact (format 2), so that plain transformers and
vLLM load it (the user opting in to remote code) and without svdforge.

The two modules import only torch and transformers, and they are copied byte for byte into
each artifact folder: `configuration_svdforge.py` and `modeling_svdforge.py`. Their sha256
is in the manifest and in README, so that a review of the remote code is done once per
svdforge release. svdforge itself uses `LowRankLinear` from here, so the module a pipeline
builds and the one a deployment loads are the same class.
"""
