"""Mixed-precision bit allocation (``--scheme mixed``): each layer group gets the precision that buys the most
speed or size for the fidelity it costs, chosen from measurements.

    groups ─▶ sensitivity (one group at a time) ─▶ costs (per-node profiles of whole builds, bytes)
           ─▶ allocate (ILP over the Pareto frontier) ─▶ search (build, measure, re-solve; bounded) ─▶ report
"""
