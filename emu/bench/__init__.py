"""Benchmarks: mc2-emu's round trip against the raw all-to-all of the same bytes and a
Megatron-style dispatcher (:mod:`emu.bench.baseline`), side by side in one run
(:mod:`emu.bench.suite`; ``mc2-emu bench``)."""
