"""Cross-validation, what-if planning, plots and reports. Only the CLI imports this package."""
