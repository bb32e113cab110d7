"""Prefect front door for mgdm: `flows.pipeline.mgdm_pipeline` and `python -m flows.serve`.

Nothing here holds stage logic: every task calls `mgdm_core.launch.run_stage` or the evaluation
grid functions (`plan`, `run_unit`, `summarise`). See docs/prefect.md.
"""
