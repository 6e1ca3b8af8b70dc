"""Commands beside the service: ``modgate scan``, ``modgate bench`` and the sample images
that ``make demo``, the benchmarks and the tests generate."""
