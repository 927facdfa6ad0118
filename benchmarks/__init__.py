"""Development benchmarks for mmsep (not part of the installed package); see BENCHMARKS.md."""
