"""Stage 3: DuckDB diagnostics over caches and run logs, and an HTML report of plots.

    con = queries.connect(runs=["runs/a"], caches=None)   # caches named in the runs' config.json
    queries.list_queries()                                # named diagnostics (queries/*.sql)
    queries.run_query(con, "drift", {"tol": 0.01})        # -> polars.DataFrame
    queries.run_sql(con, "SELECT ...")                    # ad-hoc, read-only
    queries.findings(con)                                 # a few plain-words findings
    queries.report.write_report(runs, out_dir=...)        # report.html + PNGs
"""

from queries.db import connect
from queries.findings import findings
from queries.runner import list_queries, run_query, run_sql

__all__ = ["connect", "findings", "list_queries", "run_query", "run_sql"]
