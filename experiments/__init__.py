"""Scripts that regenerate every number and figure in docs/results.md."""
