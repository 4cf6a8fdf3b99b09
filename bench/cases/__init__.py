"""Benchmark case modules. Every module here that does not start with "_" and defines
``cases(preset, device) -> list[bench.case.Case]`` is discovered by the runner; ``preset`` is
"quick", "default" or "full". Add a file to add cases; nothing else needs to change."""
