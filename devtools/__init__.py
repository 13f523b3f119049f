"""Development tools: the demo, tiny local models, the documentation generator, server helpers and the
text-to-SQL row generator. Used by `make`, the tests and the benchmarks; never copied into an image."""
