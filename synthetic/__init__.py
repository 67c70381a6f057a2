"""Generated data for the tests and the benchmarks (photo folders the way people's folders are).
Nothing in train/, serve/ or models/ imports it, so a Space never bundles it."""
