"""pyseqk microbenchmarks: `python -m bench` (see bench/NOTES.md)."""
