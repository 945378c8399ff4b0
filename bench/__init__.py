"""fastnn benchmarks: python -m bench [--suite NAME] [--device cpu|cuda] [--quick]."""
