"""Side-by-side benchmarks against transformers (``llava-bench``, issue 6); nothing here yet."""
