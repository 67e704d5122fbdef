"""Helpers of ``benchmarks/compare_peers.py``: one module per engine, plus the shared table and plot.

Each engine module imports its optional package lazily and raises :class:`PeerUnavailable`
with the install hint when it is missing, so the script can skip that peer and go on.
"""
