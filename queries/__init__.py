"""Stage 3: DuckDB diagnostics over caches and run logs, and an HTML report of plots."""
