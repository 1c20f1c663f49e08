"""The pipeline runtime: stage workers, executors (in-process or Ray actors) and the coordinator."""
