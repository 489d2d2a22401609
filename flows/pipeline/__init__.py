"""The pipeline: the flow, the stage graph and its keys, the runner, this run's inputs, publishing."""
