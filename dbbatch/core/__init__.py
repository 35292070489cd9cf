"""The bottom layer: the error hierarchy, stop signals, fault injection for tests, progress reporting."""
